//! The TOML configuration: schema, loading and validation.
//!
//! Validation happens once, at start-up, and every message names the field and what to
//! do about it. Relative paths are resolved against the configuration file's folder.
//! Secrets (the PIN, SigV4 secrets) may come from a file or an environment variable;
//! inline values are accepted for tests and draw a warning.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use zeroize::Zeroizing;

use crate::hsm::pkcs11::{IvSource, Pkcs11Settings, TokenSelector};
use crate::hsm::KeyUsage;
use crate::router::{is_valid_key_id, normalize_prefix};
use crate::server::tls::{MtlsSettings, TlsSettings};

/// A configuration problem, with the field it concerns.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax or schema error (unknown fields are errors, to catch typos).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML parser's message (it names the line and the field).
        message: String,
    },
    /// A field has a value we cannot use.
    #[error("{field}: {problem}")]
    Invalid {
        /// Dotted path of the field, e.g. `key_store[0].region`.
        field: String,
        /// What is wrong and how to fix it.
        problem: String,
    },
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Listener and TLS.
    pub server: ServerSection,
    /// What GetHealthStatus reports about the proxy.
    #[serde(default)]
    pub proxy: ProxySection,
    /// The key manager.
    pub hsm: HsmSection,
    /// Key stores served by this proxy (one per URI path prefix).
    #[serde(rename = "key_store")]
    pub key_stores: Vec<KeyStoreSection>,
    /// The plain-HTTP admin listener (metrics, probes).
    pub admin: Option<AdminSection>,
    /// Client certificate authentication.
    pub mtls: Option<MtlsSection>,
    /// Secondary authorization with Cedar policies.
    pub authorization: Option<AuthorizationSection>,
}

/// `[mtls]`: require client certificates (spec: Authentication, SHOULD).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtlsSection {
    /// PEM bundle of the CAs that issue client certificates.
    pub ca_bundle: PathBuf,
    /// Names the client certificate must carry as CN or DNS SAN, e.g.
    /// `cks.kms.us-east-1.amazonaws.com`.
    pub allowed_subjects: Vec<String>,
}

/// `[authorization]`: Cedar policies over each request's `requestMetadata`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationSection {
    /// The policy file (Cedar).
    pub policy_file: PathBuf,
}

/// `[admin]`: a second listener, plain HTTP, for Prometheus and load balancer probes.
/// Bind it to a management interface: it is not authenticated.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Address, e.g. `127.0.0.1:9090`.
    pub listen: SocketAddr,
}

/// `[server]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Address to listen on, e.g. `0.0.0.0:443`.
    pub listen: SocketAddr,
    /// PEM certificate chain, leaf first.
    pub tls_certificate: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub tls_private_key: PathBuf,
    /// Largest request body accepted, in bytes. The spec's largest valid request is
    /// about 17 KiB (5736 B of Base64 ciphertext, 10924 B of Base64 AAD, 2 KiB ARNs).
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Offer HTTP/2 through ALPN (HTTP/1.1 is always offered).
    #[serde(default = "yes")]
    pub http2: bool,
    /// Server-side deadline of every request, from the request's arrival, in ms. KMS
    /// gives a call 250 ms in all, and a new connection spends about three round trips
    /// (TCP, TLS, request) of up to 35 ms each before the proxy sees the request and
    /// one more for the answer: 250 − 4 × 35 = 110 ms are left, so 100 ms.
    #[serde(default = "default_deadline_ms")]
    pub request_deadline_ms: u64,
    /// Open client connections at most; beyond that, new ones wait in the kernel's
    /// backlog until one closes.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Seconds a client has to complete the TLS handshake.
    #[serde(default = "ten")]
    pub handshake_timeout_seconds: u64,
    /// Seconds an HTTP/1.1 client has to send a request's headers, counted from the
    /// request's first byte (slowloris). Waiting for the next request on a kept-alive
    /// connection is idleness, not header reading.
    #[serde(default = "ten")]
    pub header_read_timeout_seconds: u64,
    /// Milliseconds a client has to send a request's whole body once its headers are
    /// in. KMS sends bodies of a few KiB at once; a slower body closes the connection
    /// (HTTP/1.1) or resets the stream and sends GOAWAY (HTTP/2).
    #[serde(default = "default_body_read_timeout_ms")]
    pub body_read_timeout_ms: u64,
    /// A connection that has served no authenticated request is closed this many
    /// seconds after it opened, whatever it sends: unauthenticated clients cannot hold
    /// a connection slot longer (an idle HTTP/2 connection included).
    #[serde(default = "ten")]
    pub unauthenticated_timeout_seconds: u64,
    /// A connection is closed once this long has passed since its last authenticated
    /// request ended, with none in flight. KMS keeps connections to reuse them, so this
    /// is long.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_seconds: u64,
    /// Open connections from one client address at most; beyond that a new connection
    /// is closed at once. 0 (the default) sets no limit: behind an AWS PrivateLink
    /// load balancer every KMS connection comes from the balancer's few addresses.
    #[serde(default)]
    pub max_connections_per_client: usize,
    /// HTTP/2 streams one connection may have open at once.
    #[serde(default = "default_h2_streams")]
    pub http2_max_concurrent_streams: u32,
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT.
    #[serde(default = "ten")]
    pub shutdown_grace_seconds: u64,
    /// Seconds between INFO summary lines (p50/p99/p99.9 per operation); 0 turns them off.
    #[serde(default = "default_summary_interval")]
    pub summary_interval_seconds: u64,
    /// Seconds between checks of the configuration's files for changes (a change
    /// reloads, as SIGHUP does); 0 turns the checks off.
    #[serde(default = "default_reload_poll")]
    pub reload_poll_seconds: u64,
    /// Bytes of log lines buffered for stderr at most. Past three quarters of it the
    /// proxy refuses new requests (429) and is unready until the reader catches up;
    /// audit lines are never dropped.
    #[serde(default = "default_log_buffer")]
    pub log_buffer_bytes: usize,
    /// Refuse a SigV4 signature seen before within its validity window. Off by default:
    /// KMS may legitimately retry a request with the same signature.
    #[serde(default)]
    pub sigv4_replay_protection: bool,
    /// Hold each tokio worker (one per CPU the process may use) and the HSM session
    /// threads on CPUs of their own, for a box the proxy shares with few other busy
    /// processes (perf/RESULTS.md, step 31). Off by default.
    #[serde(default)]
    pub pin_threads: bool,
}

fn default_reload_poll() -> u64 {
    2
}

fn default_max_body() -> usize {
    64 * 1024
}

fn default_deadline_ms() -> u64 {
    100
}

fn default_max_connections() -> usize {
    4096
}

fn ten() -> u64 {
    10
}

fn default_log_buffer() -> usize {
    crate::logging::MAX_PENDING
}

fn default_body_read_timeout_ms() -> u64 {
    1000
}

fn default_idle_timeout() -> u64 {
    300
}

fn default_h2_streams() -> u32 {
    256
}

fn default_summary_interval() -> u64 {
    60
}

fn yes() -> bool {
    true
}

/// `[proxy]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySection {
    /// spec: xksProxyFleetSize — how many proxy instances serve this endpoint.
    #[serde(default = "one")]
    pub fleet_size: u32,
    /// spec: xksProxyVendor.
    #[serde(default = "default_vendor")]
    pub vendor: String,
    /// spec: ekmVendor; defaults to the token's manufacturer.
    pub ekm_vendor: Option<String>,
}

impl Default for ProxySection {
    fn default() -> Self {
        Self {
            fleet_size: 1,
            vendor: default_vendor(),
            ekm_vendor: None,
        }
    }
}

fn one() -> u32 {
    1
}

fn default_vendor() -> String {
    "xks-proxy".into()
}

/// Which backend serves the keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// A PKCS#11 module (the product).
    #[default]
    Pkcs11,
    /// In-process AES-GCM with keys in memory: benchmarks only, never production.
    Software,
    /// The software keys behind the session pool with a modelled HSM service time:
    /// backpressure tests and capacity planning, never production.
    Simulated,
}

/// `[hsm]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsmSection {
    /// `pkcs11` (default), `software` or `simulated`.
    #[serde(default)]
    pub backend: BackendKind,
    /// Path of the PKCS#11 module.
    pub module: Option<PathBuf>,
    /// Select the token by label ...
    pub token_label: Option<String>,
    /// ... or by serial number.
    pub token_serial: Option<String>,
    /// A file holding the user PIN (trailing newline ignored).
    pub pin_file: Option<PathBuf>,
    /// An environment variable holding the user PIN.
    pub pin_env: Option<String>,
    /// The PIN inline (discouraged: draws a warning).
    pub pin: Option<String>,
    /// Number of PKCS#11 sessions, each on its own thread. SoftHSM2 contends beyond one
    /// or two; network HSMs want many (their latency is mostly waiting).
    #[serde(default = "default_sessions")]
    pub sessions: usize,
    /// Requests allowed to wait for a session; more are answered 429 at once.
    #[serde(default = "default_queue_depth")]
    pub queue_depth: usize,
    /// `hsm_random` (default: the HSM's RNG, C_GenerateRandom) or `hsm_generated`.
    #[serde(default)]
    pub iv_source: IvSource,
    /// Work on a session copy of each key (C_CopyObject, CKA_TOKEN false) instead of
    /// the token object: much faster on SoftHSM2, which re-reads token objects from
    /// disk on every use. Off by default (some HSMs limit or refuse session objects).
    #[serde(default)]
    pub session_key_copies: bool,
    /// Open read-write sessions instead of read-only ones (AWS CloudHSM's SDK 5
    /// refuses read-only sessions). The proxy never modifies token objects.
    #[serde(default)]
    pub read_write_sessions: bool,
    /// Seconds a key's cached attributes are trusted (how fast a key disabled in the
    /// HSM is noticed: within this, plus the time of one lookup, which one session does
    /// while the others go on with the cached entry).
    #[serde(default = "default_key_refresh")]
    pub key_refresh_seconds: u64,
    /// Milliseconds one HSM call may take before its request answers 503
    /// DependencyTimeoutException (never later than the request's deadline). The
    /// session stays out of the pool until the call returns.
    #[serde(default = "default_call_timeout_ms")]
    pub call_timeout_ms: u64,
    /// A key used only by the health monitor's encrypt+decrypt (never a KMS key: it
    /// must not be in any key store). Without one, the monitor only checks that a
    /// session answers.
    pub health_check_key: Option<String>,
    /// Seconds between health checks (GetHealthStatus answers the last result; a result
    /// older than 60 s is reported UNAVAILABLE).
    #[serde(default = "default_health_interval")]
    pub health_check_interval_seconds: u64,
    /// Environment variables set before the module loads (e.g. SOFTHSM2_CONF).
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    /// Several EKMs (HSMs of a cluster holding the same keys) for the key store: each
    /// `[[hsm.ekm]]` names a token, and may name its own module, PIN and sessions
    /// (defaults: those of `[hsm]`). Without any, `[hsm]` names the one token.
    #[serde(default, rename = "ekm")]
    pub ekms: Vec<EkmSection>,
    /// Keys of the software and simulated backends.
    #[serde(default, rename = "software_key")]
    pub software_keys: Vec<SoftwareKeySection>,
    /// The simulated HSM's service time.
    pub simulated: Option<SimulatedSection>,
}

/// `[[hsm.ekm]]`: one EKM of a fleet.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EkmSection {
    /// Path of the PKCS#11 module (default: `hsm.module`).
    pub module: Option<PathBuf>,
    /// Select the token by label ...
    pub token_label: Option<String>,
    /// ... or by serial number.
    pub token_serial: Option<String>,
    /// A file holding the user PIN (default: the PIN of `[hsm]`).
    pub pin_file: Option<PathBuf>,
    /// An environment variable holding the user PIN.
    pub pin_env: Option<String>,
    /// The PIN inline (discouraged).
    pub pin: Option<String>,
    /// Sessions on this EKM (default: `hsm.sessions`).
    pub sessions: Option<usize>,
}

fn default_call_timeout_ms() -> u64 {
    100
}

fn default_health_interval() -> u64 {
    10
}

/// `[hsm.simulated]`: the service time of the simulated HSM (its parallelism is
/// `hsm.sessions`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatedSection {
    /// `fixed`, `normal` or `lognormal`.
    pub distribution: Distribution,
    /// Mean service time in milliseconds.
    pub mean_ms: f64,
    /// Standard deviation in milliseconds (normal and lognormal).
    #[serde(default)]
    pub stddev_ms: f64,
    /// Keys with a service time of their own (a slow or hung key).
    #[serde(default)]
    pub key_latency: Vec<KeyLatencySection>,
}

/// A service-time distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Distribution {
    /// Always the mean.
    Fixed,
    /// Normal.
    Normal,
    /// Lognormal.
    Lognormal,
}

/// `[[hsm.simulated.key_latency]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyLatencySection {
    /// External key id.
    pub id: String,
    /// Its fixed service time in milliseconds.
    pub latency_ms: u64,
}

fn default_sessions() -> usize {
    2
}

fn default_queue_depth() -> usize {
    256
}

fn default_key_refresh() -> u64 {
    10
}

/// `[[hsm.software_key]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SoftwareKeySection {
    /// External key id.
    pub id: String,
    /// Usages, e.g. `["ENCRYPT", "DECRYPT"]`.
    #[serde(default = "both_usages")]
    pub usage: Vec<String>,
    /// Whether the key is enabled.
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn both_usages() -> Vec<String> {
    vec!["ENCRYPT".into(), "DECRYPT".into()]
}

/// `[[key_store]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyStoreSection {
    /// A name for logs.
    pub name: String,
    /// The `<optional-path-prefix>` before `/kms/xks/v1` (may be empty).
    #[serde(default)]
    pub uri_prefix: String,
    /// The region KMS signs with (the SigV4 credential scope's region).
    pub region: String,
    /// External key ids this key store may use.
    pub keys: Vec<String>,
    /// SigV4 credentials; two at once during rotation.
    #[serde(rename = "credential")]
    pub credentials: Vec<CredentialSection>,
    /// Authenticated requests per second this key store may make (spec: independent
    /// request quotas on each path prefix); beyond it, 429 ThrottlingException.
    pub max_requests_per_second: Option<f64>,
    /// Requests allowed in a burst above the rate (default: one second's worth).
    pub burst: Option<f64>,
    /// Migration from the AWS sample proxy: the `ciphertext_metadata_b64` it was
    /// configured with (`""` if none). Decrypt then also accepts its ciphertexts.
    pub aws_sample_ciphertext_metadata: Option<String>,
}

/// `[[key_store.credential]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialSection {
    /// 20–30 characters of A–Z and 2–7.
    pub access_key_id: String,
    /// A file holding the secret access key.
    pub secret_access_key_file: Option<PathBuf>,
    /// An environment variable holding it.
    pub secret_access_key_env: Option<String>,
    /// The secret inline (discouraged: draws a warning).
    pub secret_access_key: Option<String>,
    /// When the credential was made (`YYYY-MM-DD`), for its age in the metrics;
    /// default: the secret file's modification time.
    pub created: Option<String>,
}

/// A validated configuration, ready to run.
#[derive(Debug)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// TLS files and mTLS.
    pub tls: TlsSettings,
    /// Body limit.
    pub max_body_bytes: usize,
    /// `[proxy]`.
    pub proxy: ProxySection,
    /// The backend.
    pub backend: BackendConfig,
    /// Environment for the module.
    pub environment: BTreeMap<String, String>,
    /// Key stores.
    pub key_stores: Vec<KeyStoreConfig>,
    /// Deadlines, timeouts and connection limits.
    pub limits: Limits,
    /// The health monitor.
    pub health: HealthSettings,
    /// The admin listener, if any.
    pub admin_listen: Option<SocketAddr>,
    /// The Cedar policy file, if any.
    pub policy_file: Option<PathBuf>,
    /// Refuse replayed signatures.
    pub sigv4_replay_protection: bool,
    /// Pin the tokio workers and the HSM session threads to CPUs.
    pub pin_threads: bool,
    /// The log writer's buffer.
    pub log_buffer_bytes: usize,
    /// How often the files below are checked for changes (`None`: never).
    pub reload_poll: Option<Duration>,
    /// The files whose change reloads the configuration: the file itself, TLS files,
    /// the mTLS bundle, the policy file and credential secret files.
    pub watched_files: Vec<PathBuf>,
}

/// Deadlines, timeouts and connection limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Server-side deadline of every request.
    pub request_deadline: Duration,
    /// Open connections at most.
    pub max_connections: usize,
    /// TLS handshake timeout.
    pub handshake_timeout: Duration,
    /// HTTP/1.1 header read timeout, from a request's first byte.
    pub header_read_timeout: Duration,
    /// Time a client has for a request's body once the headers are in.
    pub body_read_timeout: Duration,
    /// Lifetime of a connection that has served no authenticated request.
    pub unauthenticated_timeout: Duration,
    /// Idle connection timeout, from the last authenticated request.
    pub idle_timeout: Duration,
    /// Open connections per client address at most (`None`: no limit).
    pub max_connections_per_client: Option<usize>,
    /// HTTP/2 concurrent streams per connection.
    pub http2_max_concurrent_streams: u32,
    /// Drain time at shutdown.
    pub shutdown_grace: Duration,
    /// Summary log interval (`None`: off).
    pub summary_interval: Option<Duration>,
}

/// The health monitor's settings.
#[derive(Debug, Clone)]
pub struct HealthSettings {
    /// The health-check key.
    pub key: Option<String>,
    /// Time between checks.
    pub interval: Duration,
}

/// The validated backend choice.
#[derive(Debug)]
pub enum BackendConfig {
    /// PKCS#11: one to ten EKMs (tokens) holding the same keys.
    Pkcs11(Vec<Pkcs11Settings>),
    /// Software keys.
    Software(Vec<crate::hsm::software::SoftwareKeySpec>),
    /// The simulated HSM.
    Simulated(crate::hsm::simulated::SimulatedSettings),
}

/// A validated key store.
#[derive(Debug)]
pub struct KeyStoreConfig {
    /// Name for logs.
    pub name: String,
    /// Normalized prefix (`""` or `/a/b`).
    pub uri_prefix: String,
    /// Region.
    pub region: String,
    /// External key ids.
    pub keys: Vec<String>,
    /// Credentials.
    pub credentials: Vec<crate::auth::Credential>,
    /// When each credential (by access key id) was made.
    pub credentials_created: Vec<(String, SystemTime)>,
    /// Request quota: (requests per second, burst).
    pub quota: Option<(f64, f64)>,
    /// The AWS sample proxy's ciphertext metadata, when migrating from it.
    pub aws_sample_metadata: Option<Vec<u8>>,
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let file: FileConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut config = Self::from_file(file, base)?;
        config.watched_files.insert(0, path.to_owned());
        warn_if_readable_by_others(path, &text);
        Ok(config)
    }

    /// Validates a parsed file; relative paths are taken from `base`.
    pub fn from_file(file: FileConfig, base: &Path) -> Result<Self, ConfigError> {
        let resolve = |p: &Path| base.join(p);
        if file.server.max_body_bytes < 32 * 1024 {
            return Err(invalid(
                "server.max_body_bytes",
                "must be at least 32768: the spec's largest valid request is about 17 KiB",
            ));
        }
        if file.proxy.fleet_size == 0 {
            return Err(invalid("proxy.fleet_size", "must be greater than zero"));
        }
        let limits = limits(&file.server)?;
        if file.hsm.call_timeout_ms == 0 {
            return Err(invalid("hsm.call_timeout_ms", "must be greater than zero"));
        }
        let backend = match file.hsm.backend {
            BackendKind::Pkcs11 => BackendConfig::Pkcs11(pkcs11_fleet(&file.hsm, base)?),
            BackendKind::Software => BackendConfig::Software(software_keys(&file.hsm)?),
            BackendKind::Simulated => BackendConfig::Simulated(simulated(&file.hsm)?),
        };
        let health = HealthSettings {
            key: file.hsm.health_check_key.clone(),
            interval: Duration::from_secs(file.hsm.health_check_interval_seconds),
        };
        if !(1..=30).contains(&file.hsm.health_check_interval_seconds) {
            return Err(invalid(
                "hsm.health_check_interval_seconds",
                "must be between 1 and 30 (a cached health result may not be older than a minute)",
            ));
        }
        if let Some(key) = &health.key {
            if !is_valid_key_id(key) {
                return Err(invalid("hsm.health_check_key", KEY_ID_RULE));
            }
            if file.key_stores.iter().any(|s| s.keys.contains(key)) {
                return Err(invalid(
                    "hsm.health_check_key",
                    "must not be a key of any key store: the spec forbids health checks on keys KMS uses",
                ));
            }
        }
        if file.key_stores.is_empty() {
            return Err(invalid(
                "key_store",
                "at least one [[key_store]] is required",
            ));
        }
        let mut key_stores = Vec::with_capacity(file.key_stores.len());
        // PIN files too: a corrected PIN is taken up by a reload, and a login that a
        // wrong PIN suspended resumes (hsm::pkcs11, Pkcs11Backend::update_pin).
        let mut watched_files: Vec<PathBuf> = match file.hsm.backend {
            BackendKind::Pkcs11 => std::iter::once(&file.hsm.pin_file)
                .chain(file.hsm.ekms.iter().map(|ekm| &ekm.pin_file))
                .filter_map(|pin| pin.as_deref().map(resolve))
                .collect(),
            _ => Vec::new(),
        };
        for (i, store) in file.key_stores.into_iter().enumerate() {
            watched_files.extend(
                store
                    .credentials
                    .iter()
                    .filter_map(|c| c.secret_access_key_file.as_deref().map(resolve)),
            );
            key_stores.push(key_store(store, i, base)?);
        }
        let mtls = match file.mtls {
            None => None,
            Some(m) if m.allowed_subjects.is_empty() => {
                return Err(invalid(
                    "mtls.allowed_subjects",
                    "list the names client certificates must carry, e.g. cks.kms.us-east-1.amazonaws.com",
                ))
            }
            Some(m) => Some(MtlsSettings {
                ca_bundle: resolve(&m.ca_bundle),
                allowed_subjects: m.allowed_subjects,
            }),
        };
        let tls = TlsSettings {
            certificate: resolve(&file.server.tls_certificate),
            private_key: resolve(&file.server.tls_private_key),
            http2: file.server.http2,
            mtls,
        };
        let policy_file = file.authorization.map(|a| resolve(&a.policy_file));
        watched_files.extend([tls.certificate.clone(), tls.private_key.clone()]);
        watched_files.extend(tls.mtls.as_ref().map(|m| m.ca_bundle.clone()));
        watched_files.extend(policy_file.clone());
        Ok(Self {
            listen: file.server.listen,
            tls,
            max_body_bytes: file.server.max_body_bytes,
            policy_file,
            sigv4_replay_protection: file.server.sigv4_replay_protection,
            pin_threads: file.server.pin_threads,
            log_buffer_bytes: file.server.log_buffer_bytes,
            reload_poll: (file.server.reload_poll_seconds > 0)
                .then(|| Duration::from_secs(file.server.reload_poll_seconds)),
            watched_files,
            proxy: file.proxy,
            backend,
            environment: file.hsm.environment,
            key_stores,
            limits,
            health,
            admin_listen: file.admin.map(|a| a.listen),
        })
    }
}

fn limits(server: &ServerSection) -> Result<Limits, ConfigError> {
    if !(1..=60_000).contains(&server.request_deadline_ms) {
        return Err(invalid(
            "server.request_deadline_ms",
            "must be between 1 and 60000 (KMS itself waits 250 ms)",
        ));
    }
    if server.request_deadline_ms > 250 {
        tracing::warn!(
            deadline_ms = server.request_deadline_ms,
            "server.request_deadline_ms exceeds KMS's 250 ms timeout: KMS gives up before the proxy does"
        );
    }
    if server.max_connections == 0 {
        return Err(invalid("server.max_connections", "must be at least 1"));
    }
    if server.http2_max_concurrent_streams == 0 {
        return Err(invalid(
            "server.http2_max_concurrent_streams",
            "must be at least 1",
        ));
    }
    for (field, value) in [
        (
            "server.handshake_timeout_seconds",
            server.handshake_timeout_seconds,
        ),
        (
            "server.header_read_timeout_seconds",
            server.header_read_timeout_seconds,
        ),
        ("server.idle_timeout_seconds", server.idle_timeout_seconds),
        (
            "server.unauthenticated_timeout_seconds",
            server.unauthenticated_timeout_seconds,
        ),
    ] {
        if value == 0 {
            return Err(invalid(field, "must be at least 1"));
        }
    }
    if server.log_buffer_bytes < 64 * 1024 {
        return Err(invalid(
            "server.log_buffer_bytes",
            "must be at least 65536 (the default, 8388608, suits most)",
        ));
    }
    if !(1..=60_000).contains(&server.body_read_timeout_ms) {
        return Err(invalid(
            "server.body_read_timeout_ms",
            "must be between 1 and 60000 (KMS sends a body at once: 1000 is plenty)",
        ));
    }
    Ok(Limits {
        request_deadline: Duration::from_millis(server.request_deadline_ms),
        max_connections: server.max_connections,
        handshake_timeout: Duration::from_secs(server.handshake_timeout_seconds),
        header_read_timeout: Duration::from_secs(server.header_read_timeout_seconds),
        body_read_timeout: Duration::from_millis(server.body_read_timeout_ms),
        unauthenticated_timeout: Duration::from_secs(server.unauthenticated_timeout_seconds),
        idle_timeout: Duration::from_secs(server.idle_timeout_seconds),
        max_connections_per_client: (server.max_connections_per_client > 0)
            .then_some(server.max_connections_per_client),
        http2_max_concurrent_streams: server.http2_max_concurrent_streams,
        shutdown_grace: Duration::from_secs(server.shutdown_grace_seconds),
        summary_interval: (server.summary_interval_seconds > 0)
            .then(|| Duration::from_secs(server.summary_interval_seconds)),
    })
}

fn simulated(hsm: &HsmSection) -> Result<crate::hsm::simulated::SimulatedSettings, ConfigError> {
    use crate::hsm::simulated::{Latency, SimulatedSettings};
    let section = hsm.simulated.as_ref().ok_or_else(|| {
        invalid(
            "hsm.simulated",
            "the simulated backend needs [hsm.simulated] with distribution and mean_ms",
        )
    })?;
    let ms = |v: f64, field: &str| {
        if v.is_finite() && (0.0..=3_600_000.0).contains(&v) {
            Ok(Duration::from_secs_f64(v / 1000.0))
        } else {
            Err(invalid(
                format!("hsm.simulated.{field}"),
                "milliseconds between 0 and 3600000",
            ))
        }
    };
    let mean = ms(section.mean_ms, "mean_ms")?;
    let stddev = ms(section.stddev_ms, "stddev_ms")?;
    let latency = match section.distribution {
        Distribution::Fixed => Latency::Fixed(mean),
        Distribution::Normal => Latency::Normal { mean, stddev },
        Distribution::Lognormal if mean.is_zero() => {
            return Err(invalid(
                "hsm.simulated.mean_ms",
                "a lognormal distribution needs a mean above zero",
            ))
        }
        Distribution::Lognormal => Latency::LogNormal { mean, stddev },
    };
    if hsm.sessions == 0 || hsm.sessions > 4096 {
        return Err(invalid("hsm.sessions", "must be between 1 and 4096"));
    }
    if hsm.queue_depth == 0 {
        return Err(invalid("hsm.queue_depth", "must be at least 1"));
    }
    Ok(SimulatedSettings {
        parallelism: hsm.sessions,
        queue_depth: hsm.queue_depth,
        call_timeout: Duration::from_millis(hsm.call_timeout_ms),
        latency,
        key_latency: section
            .key_latency
            .iter()
            .map(|k| (k.id.clone(), Duration::from_millis(k.latency_ms)))
            .collect(),
        keys: software_keys(hsm)?,
    })
}

/// The EKMs of a PKCS#11 configuration: each `[[hsm.ekm]]`, or `[hsm]` itself.
fn pkcs11_fleet(hsm: &HsmSection, base: &Path) -> Result<Vec<Pkcs11Settings>, ConfigError> {
    if hsm.ekms.is_empty() {
        let one = EkmSection {
            module: None,
            token_label: hsm.token_label.clone(),
            token_serial: hsm.token_serial.clone(),
            pin_file: None,
            pin_env: None,
            pin: None,
            sessions: None,
        };
        return Ok(vec![pkcs11_settings(hsm, &one, "hsm", base)?]);
    }
    if hsm.ekms.len() > crate::hsm::fleet::MAX_EKMS {
        return Err(invalid(
            "hsm.ekm",
            format!("at most {} EKMs per key store", crate::hsm::fleet::MAX_EKMS),
        ));
    }
    if hsm.token_label.is_some() || hsm.token_serial.is_some() {
        return Err(invalid(
            "hsm.token_label",
            "with [[hsm.ekm]], name each token in its [[hsm.ekm]] table",
        ));
    }
    let settings = hsm
        .ekms
        .iter()
        .enumerate()
        .map(|(i, ekm)| pkcs11_settings(hsm, ekm, &format!("hsm.ekm[{i}]"), base))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, a) in settings.iter().enumerate() {
        if settings[..i]
            .iter()
            .any(|b| a.module == b.module && a.token == b.token)
        {
            return Err(invalid(
                format!("hsm.ekm[{i}]"),
                "names the same token as an earlier [[hsm.ekm]]",
            ));
        }
    }
    Ok(settings)
}

fn pkcs11_settings(
    hsm: &HsmSection,
    ekm: &EkmSection,
    field: &str,
    base: &Path,
) -> Result<Pkcs11Settings, ConfigError> {
    let module = ekm.module.as_ref().or(hsm.module.as_ref()).ok_or_else(|| {
        invalid(
            format!("{field}.module"),
            "required: the path of the PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so",
        )
    })?;
    let token = match (&ekm.token_label, &ekm.token_serial) {
        (Some(label), None) => TokenSelector::Label(label.clone()),
        (None, Some(serial)) => TokenSelector::Serial(serial.clone()),
        _ => {
            return Err(invalid(
                format!("{field}.token_label"),
                "set exactly one of token_label and token_serial",
            ))
        }
    };
    // The EKM's own PIN if it names one, else the one of [hsm].
    let own_pin = ekm.pin_file.is_some() || ekm.pin_env.is_some() || ekm.pin.is_some();
    let (pin_field, pin_file, pin_env, pin_inline) = if own_pin {
        (
            format!("{field}.pin"),
            &ekm.pin_file,
            &ekm.pin_env,
            &ekm.pin,
        )
    } else {
        ("hsm.pin".to_owned(), &hsm.pin_file, &hsm.pin_env, &hsm.pin)
    };
    if let Some(path) = pin_file {
        warn_if_readable_by_others(&base.join(path), "");
    }
    let pin = secret(
        &pin_field,
        pin_file.as_deref().map(|p| base.join(p)),
        pin_env.as_deref(),
        pin_inline.as_deref(),
    )?;
    let sessions = ekm.sessions.unwrap_or(hsm.sessions);
    if sessions == 0 || sessions > 1024 {
        return Err(invalid(
            format!("{field}.sessions"),
            "must be between 1 and 1024",
        ));
    }
    if hsm.queue_depth == 0 {
        return Err(invalid("hsm.queue_depth", "must be at least 1"));
    }
    Ok(Pkcs11Settings {
        module: base.join(module),
        token,
        pin,
        sessions,
        queue_depth: hsm.queue_depth,
        iv_source: hsm.iv_source,
        session_key_copies: hsm.session_key_copies,
        key_refresh: Duration::from_secs(hsm.key_refresh_seconds),
        call_timeout: Duration::from_millis(hsm.call_timeout_ms),
        read_write_sessions: hsm.read_write_sessions,
        faults: None,
    })
}

fn software_keys(
    hsm: &HsmSection,
) -> Result<Vec<crate::hsm::software::SoftwareKeySpec>, ConfigError> {
    tracing::warn!(
        "the software and simulated backends keep keys in process memory: not for production"
    );
    hsm.software_keys
        .iter()
        .enumerate()
        .map(|(i, key)| {
            let field = format!("hsm.software_key[{i}]");
            if !is_valid_key_id(&key.id) {
                return Err(invalid(format!("{field}.id"), KEY_ID_RULE));
            }
            let usages = key
                .usage
                .iter()
                .map(|u| {
                    parse_usage(u).ok_or_else(|| {
                        invalid(
                            format!("{field}.usage"),
                            "use ENCRYPT, DECRYPT, SIGN, VERIFY, WRAP, UNWRAP or DERIVE",
                        )
                    })
                })
                .collect::<Result<_, _>>()?;
            Ok(crate::hsm::software::SoftwareKeySpec {
                id: key.id.clone(),
                material: None,
                usages,
                enabled: key.enabled,
            })
        })
        .collect()
}

fn parse_usage(usage: &str) -> Option<KeyUsage> {
    Some(match usage {
        "ENCRYPT" => KeyUsage::Encrypt,
        "DECRYPT" => KeyUsage::Decrypt,
        "SIGN" => KeyUsage::Sign,
        "VERIFY" => KeyUsage::Verify,
        "WRAP" => KeyUsage::Wrap,
        "UNWRAP" => KeyUsage::Unwrap,
        "DERIVE" => KeyUsage::Derive,
        _ => return None,
    })
}

const KEY_ID_RULE: &str =
    "an external key id is 1 to 128 characters of A-Z, a-z, 0-9, '-', '.' and '_'";

fn key_store(store: KeyStoreSection, i: usize, base: &Path) -> Result<KeyStoreConfig, ConfigError> {
    let field = format!("key_store[{i}]");
    let uri_prefix = normalize_prefix(&store.uri_prefix)
        .map_err(|e| invalid(format!("{field}.uri_prefix"), e.to_string()))?;
    if store.region.is_empty()
        || !store
            .region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(invalid(
            format!("{field}.region"),
            "an AWS region such as us-east-1 (lowercase letters, digits and '-')",
        ));
    }
    if store.keys.is_empty() {
        return Err(invalid(
            format!("{field}.keys"),
            "list the external key ids this key store may use",
        ));
    }
    for key in &store.keys {
        if !is_valid_key_id(key) {
            return Err(invalid(
                format!("{field}.keys"),
                format!("{key:?}: {KEY_ID_RULE}"),
            ));
        }
    }
    if store.credentials.is_empty() {
        return Err(invalid(
            format!("{field}.credential"),
            "at least one [[key_store.credential]] is required",
        ));
    }
    let mut credentials = Vec::with_capacity(store.credentials.len());
    let mut credentials_created = Vec::with_capacity(store.credentials.len());
    for (j, credential) in store.credentials.into_iter().enumerate() {
        let cfield = format!("{field}.credential[{j}]");
        if !is_valid_access_key_id(&credential.access_key_id) {
            return Err(invalid(
                format!("{cfield}.access_key_id"),
                "must be 20 to 30 characters of A-Z and 2-7 (spec: Appendix A); `xks-proxy quickstart` generates one",
            ));
        }
        if credentials
            .iter()
            .any(|c: &crate::auth::Credential| c.access_key_id() == credential.access_key_id)
        {
            return Err(invalid(
                format!("{cfield}.access_key_id"),
                "the same access key id appears twice in this key store",
            ));
        }
        let secret = secret(
            &format!("{cfield}.secret_access_key"),
            credential
                .secret_access_key_file
                .as_deref()
                .map(|p| base.join(p)),
            credential.secret_access_key_env.as_deref(),
            credential.secret_access_key.as_deref(),
        )?;
        if !is_valid_secret(&secret) {
            return Err(invalid(
                format!("{cfield}.secret_access_key"),
                "must be 43 to 64 characters of A-Z, a-z, 0-9, '+', '/' and '=' (spec: XKS proxy configuration file)",
            ));
        }
        let created = match &credential.created {
            Some(date) => parse_date(date)
                .ok_or_else(|| invalid(format!("{cfield}.created"), "a date as YYYY-MM-DD"))?,
            None => credential
                .secret_access_key_file
                .as_deref()
                .and_then(|p| std::fs::metadata(base.join(p)).ok())
                .and_then(|m| m.modified().ok())
                .unwrap_or_else(SystemTime::now),
        };
        if let Some(path) = &credential.secret_access_key_file {
            warn_if_readable_by_others(&base.join(path), "");
        }
        credentials_created.push((credential.access_key_id.clone(), created));
        credentials.push(crate::auth::Credential::new(
            credential.access_key_id,
            secret,
        ));
    }
    let quota = match (store.max_requests_per_second, store.burst) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(invalid(
                format!("{field}.burst"),
                "only meaningful with max_requests_per_second",
            ))
        }
        (Some(rate), burst) => {
            let burst = burst.unwrap_or(rate);
            if !(rate.is_finite() && rate > 0.0) {
                return Err(invalid(
                    format!("{field}.max_requests_per_second"),
                    "must be a number above zero",
                ));
            }
            if !(burst.is_finite() && burst >= 1.0) {
                return Err(invalid(format!("{field}.burst"), "must be at least 1"));
            }
            Some((rate, burst))
        }
    };
    let aws_sample_metadata = match &store.aws_sample_ciphertext_metadata {
        None => None,
        Some(encoded) => {
            use base64::Engine;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .ok()
                .filter(|b| b.len() <= crate::xks::aad::MAX_METADATA_LEN)
                .ok_or_else(|| {
                    invalid(
                        format!("{field}.aws_sample_ciphertext_metadata"),
                        "Base64 of at most 20 bytes",
                    )
                })?;
            Some(bytes)
        }
    };
    Ok(KeyStoreConfig {
        name: store.name,
        uri_prefix,
        region: store.region,
        keys: store.keys,
        credentials,
        credentials_created,
        quota,
        aws_sample_metadata,
    })
}

/// `YYYY-MM-DD` as midnight UTC.
fn parse_date(date: &str) -> Option<SystemTime> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let day = time::Date::parse(date, &format).ok()?;
    let seconds = day.midnight().assume_utc().unix_timestamp();
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).ok()?))
}

/// Warns when a file that holds secrets can be read by group or others. `text` is the
/// file's content when known: a configuration file without inline secrets is fine.
fn warn_if_readable_by_others(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    let holds_secrets = text.is_empty()
        || text.lines().any(|l| {
            let l = l.trim_start();
            l.starts_with("pin ")
                || l.starts_with("pin=")
                || l.starts_with("secret_access_key ")
                || l.starts_with("secret_access_key=")
        });
    if !holds_secrets {
        return;
    }
    if let Ok(metadata) = std::fs::metadata(path) {
        let mode = metadata.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                file = %path.display(),
                mode = format!("{:o}", mode & 0o777),
                "a file holding secrets is readable by group or others; chmod 600 it"
            );
        }
    }
}

/// spec Appendix A: 20–30 characters, `A`–`Z` and `2`–`7` only.
pub fn is_valid_access_key_id(id: &str) -> bool {
    (20..=30).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
}

/// spec (XKS proxy configuration file): 43–64 characters of `A-Za-z0-9+/=`.
pub fn is_valid_secret(secret: &str) -> bool {
    (43..=64).contains(&secret.len())
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
}

/// Reads a secret from exactly one of a file, an environment variable or inline.
fn secret(
    field: &str,
    file: Option<PathBuf>,
    env: Option<&str>,
    inline: Option<&str>,
) -> Result<Zeroizing<String>, ConfigError> {
    match (file, env, inline) {
        (Some(path), None, None) => {
            let text = Zeroizing::new(std::fs::read_to_string(&path).map_err(|e| {
                invalid(
                    format!("{field}_file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?);
            Ok(Zeroizing::new(
                text.trim_end_matches(['\r', '\n']).to_owned(),
            ))
        }
        (None, Some(var), None) => std::env::var(var).map(Zeroizing::new).map_err(|_| {
            invalid(
                format!("{field}_env"),
                format!("environment variable {var} is not set"),
            )
        }),
        (None, None, Some(value)) => {
            tracing::warn!(field, "secret given inline in the configuration; prefer a file or an environment variable");
            Ok(Zeroizing::new(value.to_owned()))
        }
        _ => Err(invalid(
            field,
            format!("set exactly one of {field}_file, {field}_env and {field}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[server]
listen = "127.0.0.1:0"
tls_certificate = "cert.pem"
tls_private_key = "key.pem"

[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "t"
pin = "1234"

[[key_store]]
name = "a"
uri_prefix = "x/y"
region = "us-east-1"
keys = ["foo"]
[[key_store.credential]]
access_key_id = "ABCDEFGHIJKLMNOPQRST"
secret_access_key = "0123456789012345678901234567890123456789abc"
"#;

    fn load(text: &str) -> Result<Config, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "test.toml".into(),
            message: e.to_string(),
        })?;
        Config::from_file(file, Path::new("/etc/xks"))
    }

    #[test]
    fn good_config_loads_with_defaults_and_resolved_paths() {
        let c = load(GOOD).unwrap();
        assert_eq!(c.tls.certificate, Path::new("/etc/xks/cert.pem"));
        assert_eq!(c.max_body_bytes, 65536);
        assert_eq!(c.key_stores[0].uri_prefix, "/x/y");
        assert!(c.tls.http2);
        let BackendConfig::Pkcs11(p) = &c.backend else {
            panic!("pkcs11 expected")
        };
        let [p] = p.as_slice() else {
            panic!("one EKM expected")
        };
        assert_eq!(p.sessions, 2);
        assert_eq!(p.token, TokenSelector::Label("t".into()));
        assert_eq!(p.pin.as_str(), "1234");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                GOOD.replace("ABCDEFGHIJKLMNOPQRST", "abc"),
                "key_store[0].credential[0].access_key_id",
            ),
            (
                GOOD.replace("0123456789012345678901234567890123456789abc", "short"),
                "key_store[0].credential[0].secret_access_key",
            ),
            (GOOD.replace("us-east-1", "US EAST"), "key_store[0].region"),
            (GOOD.replace("x/y", "x.y"), "key_store[0].uri_prefix"),
            (GOOD.replace("[\"foo\"]", "[\"f/o\"]"), "key_store[0].keys"),
            (GOOD.replace("token_label = \"t\"", ""), "hsm.token_label"),
            (
                GOOD.replace("pin = \"1234\"", "pin = \"1\"\npin_env = \"X\""),
                "hsm.pin",
            ),
        ];
        for (text, field) in cases {
            let message = load(&text).unwrap_err().to_string();
            assert!(message.starts_with(field), "{message} should name {field}");
        }
    }

    #[test]
    fn budget_health_and_quota_settings_are_validated() {
        let c = load(GOOD).unwrap();
        assert_eq!(c.limits.request_deadline, Duration::from_millis(100));
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(300));
        assert_eq!(c.key_stores[0].quota, None);
        let with = |server: &str, hsm: &str, store: &str| {
            GOOD.replace("[server]\n", &format!("[server]\n{server}\n"))
                .replace("[hsm]\n", &format!("[hsm]\n{hsm}\n"))
                .replace(
                    "keys = [\"foo\"]\n",
                    &format!("keys = [\"foo\"]\n{store}\n"),
                )
        };
        let c = load(&with("", "", "max_requests_per_second = 50.0")).unwrap();
        assert_eq!(c.key_stores[0].quota, Some((50.0, 50.0)));
        let cases = [
            (
                with("request_deadline_ms = 0", "", ""),
                "server.request_deadline_ms",
            ),
            (
                with("max_connections = 0", "", ""),
                "server.max_connections",
            ),
            (
                with("idle_timeout_seconds = 0", "", ""),
                "server.idle_timeout_seconds",
            ),
            (with("", "call_timeout_ms = 0", ""), "hsm.call_timeout_ms"),
            (
                with("", "health_check_key = \"foo\"", ""),
                "hsm.health_check_key",
            ),
            (
                with("", "health_check_interval_seconds = 90", ""),
                "hsm.health_check_interval_seconds",
            ),
            (with("", "", "burst = 5.0"), "key_store[0].burst"),
            (
                with("", "", "max_requests_per_second = -1.0"),
                "key_store[0].max_requests_per_second",
            ),
            (
                with("", "", "max_requests_per_second = 10.0\nburst = 0.5"),
                "key_store[0].burst",
            ),
            (with("", "backend = \"simulated\"", ""), "hsm.simulated"),
        ];
        for (text, field) in cases {
            let message = load(&text).unwrap_err().to_string();
            assert!(message.starts_with(field), "{message} should name {field}");
        }
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let text = GOOD.replace("[hsm]", "[hsm]\nsesions = 4");
        let message = load(&text).unwrap_err().to_string();
        assert!(message.contains("sesions"), "{message}");
    }

    #[test]
    fn secrets_come_from_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pin"), "5678\n").unwrap();
        let text = GOOD.replace("pin = \"1234\"", "pin_file = \"pin\"");
        let file: FileConfig = toml::from_str(&text).unwrap();
        let c = Config::from_file(file, dir.path()).unwrap();
        let BackendConfig::Pkcs11(p) = &c.backend else {
            panic!("pkcs11 expected")
        };
        let [p] = p.as_slice() else {
            panic!("one EKM expected")
        };
        assert_eq!(p.pin.as_str(), "5678");
    }

    #[test]
    fn several_ekms_inherit_what_they_do_not_set() {
        let with_ekms = |ekms: &str| {
            GOOD.replace("token_label = \"t\"\n", "")
                .replace("pin = \"1234\"\n", &format!("pin = \"1234\"\n{ekms}"))
        };
        let fleet = with_ekms(
            "sessions = 3\n\
             [[hsm.ekm]]\ntoken_label = \"a\"\n\
             [[hsm.ekm]]\ntoken_serial = \"42\"\npin = \"9999\"\nsessions = 7\n\
             module = \"/opt/other.so\"\n",
        );
        let c = load(&fleet).unwrap();
        let BackendConfig::Pkcs11(ekms) = &c.backend else {
            panic!("pkcs11 expected")
        };
        let [a, b] = ekms.as_slice() else {
            panic!("two EKMs expected")
        };
        assert_eq!(a.token, TokenSelector::Label("a".into()));
        assert_eq!(a.module, Path::new("/usr/lib/softhsm/libsofthsm2.so"));
        assert_eq!((a.pin.as_str(), a.sessions), ("1234", 3));
        assert_eq!(b.token, TokenSelector::Serial("42".into()));
        assert_eq!(b.module, Path::new("/opt/other.so"));
        assert_eq!((b.pin.as_str(), b.sessions), ("9999", 7));

        for (text, field) in [
            // The same token twice.
            (
                with_ekms("[[hsm.ekm]]\ntoken_label = \"a\"\n[[hsm.ekm]]\ntoken_label = \"a\"\n"),
                "hsm.ekm[1]",
            ),
            // A token in [hsm] as well as [[hsm.ekm]].
            (
                GOOD.replace(
                    "pin = \"1234\"\n",
                    "pin = \"1234\"\n[[hsm.ekm]]\ntoken_label = \"a\"\n",
                ),
                "hsm.token_label",
            ),
            // Neither label nor serial.
            (
                with_ekms("[[hsm.ekm]]\nsessions = 2\n"),
                "hsm.ekm[0].token_label",
            ),
            // More than the spec's ten.
            (
                with_ekms(
                    &(0..11)
                        .map(|i| format!("[[hsm.ekm]]\ntoken_label = \"t{i}\"\n"))
                        .collect::<String>(),
                ),
                "hsm.ekm",
            ),
        ] {
            match load(&text) {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field, "{text}"),
                other => panic!("{field}: expected invalid, got {other:?}"),
            }
        }
    }

    /// The examples in config/ follow the schema (their secrets come from elsewhere,
    /// so only the schema is checked here).
    #[test]
    fn example_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut seen = 0;
        let entries = std::fs::read_dir(&dir)
            .unwrap()
            .chain(std::fs::read_dir(dir.join("vendors")).unwrap());
        for entry in entries {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).unwrap();
                toml::from_str::<FileConfig>(&text)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 7, "{seen} examples");
    }

    #[test]
    fn credential_rules() {
        assert!(is_valid_access_key_id("ABCDEFGHIJKLMNOPQRST234567"));
        assert!(!is_valid_access_key_id("ABCDEFGHIJKLMNOPQRS1"));
        assert!(!is_valid_access_key_id(&"A".repeat(31)));
        assert!(is_valid_secret(&"a+/=".repeat(11)));
        assert!(!is_valid_secret(&"a".repeat(42)));
        assert!(!is_valid_secret(&"a".repeat(65)));
    }
}
