//! xks-loadtest: load generator, capacity search and raw-HSM baseline for XKS proxies.
//!
//! - [`target`]: which proxy, with which credential (flags or the quickstart's
//!   `test-client.env`).
//! - [`workload`]: the operation mix, pre-rendered bodies, CDIV checks.
//! - [`client`]: TLS + HTTP/1.1 or HTTP/2 connections and signed requests (the proxy
//!   library's SigV4 signer).
//! - [`engine`]: the open- and closed-loop load with task-local histograms.
//! - [`commands`]: `run` and `search`.
//! - [`hsm`]: raw PKCS#11 AES-GCM capacity at 1..N sessions.
//! - [`presign`]: one pre-signed request as a wrk script.
//! - [`report`]: the JSON report, tables, `merge`, `compare`; [`chart`]: SVG/HTML.
//! - [`stalls`]: how long the generator machine itself stalls a sleeping thread.
//! - [`histogram`]: latency histograms, their Base64 form in reports, percentiles (a
//!   leaf the others share).

#![forbid(unsafe_code)]

pub mod chart;
pub mod client;
pub mod commands;
pub mod engine;
pub mod histogram;
pub mod hsm;
pub mod presign;
pub mod report;
pub mod stalls;
pub mod target;
pub mod workload;

/// Errors are reported to the user as text; their type never matters to a caller.
pub type Error = Box<dyn std::error::Error + Send + Sync>;
