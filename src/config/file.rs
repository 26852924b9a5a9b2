//! The file as written: the TOML sections and their defaults, deserialized as they
//! are (unknown fields are errors). [`super::Config::from_file`] validates them.

use super::*;

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
    #[serde(default = "enabled")]
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
    #[serde(default = "ten_seconds")]
    pub handshake_timeout_seconds: u64,
    /// Seconds an HTTP/1.1 client has to send a request's headers, counted from the
    /// request's first byte (slowloris). Waiting for the next request on a kept-alive
    /// connection is idleness, not header reading.
    #[serde(default = "ten_seconds")]
    pub header_read_timeout_seconds: u64,
    /// Milliseconds a client has to send a request's whole body once its headers are
    /// in. KMS sends bodies of a few KiB at once; a slower body closes the connection
    /// (HTTP/1.1) or resets the stream and sends GOAWAY (HTTP/2).
    #[serde(default = "default_body_read_timeout_ms")]
    pub body_read_timeout_ms: u64,
    /// A connection that has served no authenticated request is closed this many
    /// seconds after it opened, whatever it sends: unauthenticated clients cannot hold
    /// a connection slot longer (an idle HTTP/2 connection included).
    #[serde(default = "ten_seconds")]
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
    #[serde(default = "ten_seconds")]
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
    /// processes (perf/steps.md, "SoftHSM2 without its locks (no), and the busy threads held on CPUs (yes)"). Off by default.
    #[serde(default)]
    pub pin_threads: bool,
}

pub(super) fn default_reload_poll() -> u64 {
    2
}

pub(super) fn default_max_body() -> usize {
    64 * 1024
}

pub(super) fn default_deadline_ms() -> u64 {
    100
}

pub(super) fn default_max_connections() -> usize {
    4096
}

pub(super) fn ten_seconds() -> u64 {
    10
}

pub(super) fn default_log_buffer() -> usize {
    crate::logging::MAX_PENDING
}

pub(super) fn default_body_read_timeout_ms() -> u64 {
    1000
}

pub(super) fn default_idle_timeout() -> u64 {
    300
}

pub(super) fn default_h2_streams() -> u32 {
    256
}

pub(super) fn default_summary_interval() -> u64 {
    60
}

pub(super) fn enabled() -> bool {
    true
}

/// `[proxy]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySection {
    /// spec: xksProxyFleetSize — how many proxy instances serve this endpoint.
    #[serde(default = "single_proxy")]
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

pub(super) fn single_proxy() -> u32 {
    1
}

pub(super) fn default_vendor() -> String {
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
    /// Session threads opened beyond `sessions` while others are stuck in a call
    /// that does not return (default: `sessions`, so at most twice as many threads).
    pub max_replacement_sessions: Option<usize>,
    /// Log every PKCS#11 call (function, CKR_ value, duration; never arguments) at
    /// INFO under the target `xks_proxy::pkcs11_trace`.
    #[serde(default)]
    pub trace: bool,
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

pub(super) fn default_call_timeout_ms() -> u64 {
    100
}

pub(super) fn default_health_interval() -> u64 {
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

pub(super) fn default_sessions() -> usize {
    2
}

pub(super) fn default_queue_depth() -> usize {
    256
}

pub(super) fn default_key_refresh() -> u64 {
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
    #[serde(default = "enabled")]
    pub enabled: bool,
}

pub(super) fn both_usages() -> Vec<String> {
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
