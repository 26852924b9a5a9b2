//! xks-proxy: an AWS KMS External Key Store (XKS) proxy in front of PKCS#11 HSMs.
//!
//! AWS KMS signs HTTPS requests with SigV4 and sends them to this proxy; the proxy
//! performs AES-256-GCM inside the customer's HSM and answers (the contract is the
//! XKS Proxy API specification). A request travels through these modules, in order:
//!
//! - [`server`]: TCP and TLS (rustls on aws-lc-rs), HTTP/1.1 and HTTP/2, connection
//!   limits and deadlines ([`server::guard`]) and shutdown; [`server::service`] is the
//!   per-request pipeline.
//! - [`router`]: routes parsed once at start-up: path → (key store, operation, key id);
//!   the operations themselves are the leaf [`operation`].
//! - [`auth`]: SigV4 verification with cached signing keys.
//! - [`authz`]: optional secondary authorization of `requestMetadata` with Cedar policies.
//! - [`xks`]: the four APIs — request validation, the spec's AAD and CDIV encodings,
//!   and the error model ([`xks::XksError`], one variant per spec error name).
//! - [`hsm`]: the backend. [`hsm::pkcs11`] runs a bounded pool of logged-in sessions
//!   on dedicated threads; [`hsm::software`] is an in-process stand-in for benchmarks.
//! - [`health`]: the background deep health check that GetHealthStatus and the
//!   readiness probe read.
//! - [`metrics`]: latency histograms (sharded hdrhistograms), counters, Prometheus text.
//! - [`config`]: the TOML configuration and its validation. A setting's type belongs to
//!   the module that uses it (`hsm::pkcs11::Pkcs11Settings`, `hsm::simulated::SimulatedSettings`),
//!   and `config` only builds it; the server's own settings (`TlsSettings`, `Limits`)
//!   live in `config`, so no arrow runs from `config` up into `server`.
//! - [`logging`]: the log writer that batches lines off the request path, sheds work
//!   when its reader stalls, and rate-limits unauthenticated rejects' lines.
//! - [`affinity`]: optional pinning of the workers and session threads to CPUs.
//! - [`systemd`]: READY=1, STOPPING=1 and the watchdog for a `Type=notify` unit.
//! - [`quickstart`]: a local SoftHSM2 token, keys, credentials, certificates and config
//!   in one command.
//!
//! Deliberately not supported: creating or destroying keys through the XKS API (the
//! spec has no such API; `xks-proxy keys` does it on the token), asymmetric keys or
//! AES key sizes other than 256 bits (XKS v1), plain HTTP for the API.

#![forbid(unsafe_code)]

pub mod affinity;
pub mod auth;
pub mod authz;
pub mod config;
pub mod health;
pub mod hsm;
pub mod logging;
pub mod metrics;
pub mod operation;
pub mod quickstart;
pub mod router;
pub mod server;
pub mod systemd;
pub mod xks;
