//! xks-loadtest: load generator, capacity search and raw-HSM baseline for XKS proxies.
//!
//! - [`target`]: which proxy, with which credential (flags or the quickstart's
//!   `test-client.env`).
//! - [`workload`]: the operation mix, pre-rendered bodies, CDIV checks.
//! - [`client`]: TLS + HTTP/1.1 or HTTP/2 connections and signed requests (the proxy
//!   library's SigV4 signer).
//! - [`engine`]: one measured window of open- or closed-loop load, with task-local
//!   histograms:
//!   - `prepare`: the [`engine::Workload`] every window shares (connector, bodies, the
//!     Decrypt pool), checked against the proxy first;
//!   - `pacer`: the open loop's pacer thread;
//!   - `task`: one task's request loop, and the checks of its answers;
//!   - `recorder`: a task's histograms and counts, and their totals at the end;
//!   - `progress`: the per-second collector and the live progress line or bar.
//! - [`commands`]: `run` and `search`.
//! - [`bench`]: the benchmark method for HSM vendors (`xks-bench/1`): raw HSM, proxy
//!   on it and proxy on the software backend, in one report.
//! - [`kms`]: the `--kms` client profile (KMS's timeout, retry, connections and mix)
//!   and what KMS would have seen: outcomes of logical calls, their latency, AWS's
//!   alarms.
//! - [`plan`]: capacity plans in KMS's terms: `search` per setting an operator can
//!   change, the proxy watched, and the plan written as Markdown and HTML.
//! - [`hsm`]: raw PKCS#11 AES-GCM capacity at 1..N sessions.
//! - [`metrics`]: `--metrics-listen`, the live figures on a Prometheus endpoint.
//! - [`presign`]: one pre-signed request as a wrk script.
//! - [`report`]: the JSON report: its types, made from a measured window, read and
//!   written:
//!   - `measured`: what a window hands over ([`report::Measured`]) before it is a report;
//!   - `text`: the end-of-run tables and lines;
//!   - `merge`: the reports of several generator machines added;
//!   - `compare`: two reports side by side;
//!   - [`report::gate`]: `compare --fail-above`, the regression gate;
//!   - `fixtures` (tests only): reports made from a few latencies.
//! - [`chart`]: SVG charts of a report, and the HTML page with its tables.
//! - [`stalls`]: how long the generator machine itself stalls a sleeping thread.
//! - [`histogram`]: latency histograms, their Base64 form in reports, percentiles: a
//!   leaf that `report`, `stalls`, `engine`, `hsm` and `chart` share, so none of them
//!   imports another for it.

#![forbid(unsafe_code)]

pub mod bench;
pub mod chart;
pub mod client;
pub mod commands;
pub mod engine;
pub mod histogram;
pub mod hsm;
pub mod kms;
pub mod metrics;
pub mod plan;
pub mod presign;
pub mod report;
pub mod stalls;
pub mod target;
pub mod workload;

/// Errors are reported to the user as text; their type never matters to a caller.
pub type Error = Box<dyn std::error::Error + Send + Sync>;
