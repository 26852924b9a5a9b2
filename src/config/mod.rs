//! The TOML configuration: schema, loading and validation.
//!
//! Validation happens once, at start-up, and every message names the field and what to
//! do about it. Relative paths are resolved against the configuration file's folder;
//! a path may start with `${CREDENTIALS_DIRECTORY}`, systemd's credentials folder.
//! Secrets (the PIN, SigV4 secrets) may come from a file or an environment variable;
//! inline values are accepted for tests and draw a warning.
//!
//! Parts: [`file`] (the sections as written, with their defaults), `backend` (`[hsm]`),
//! `key_stores` (`[[key_store]]`), `secrets` (PINs and SigV4 secrets). Settings a
//! module uses are that module's types (e.g. `hsm::pkcs11::Pkcs11Settings`), which
//! this module only builds; the server's own settings ([`TlsSettings`], [`Limits`])
//! live here, because `server` sits above `config`.

mod backend;
mod file;
mod key_stores;
mod secrets;
#[cfg(test)]
mod tests;

use backend::*;
pub use file::*;
use key_stores::*;
use secrets::*;
pub use secrets::{is_valid_access_key_id, is_valid_secret};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use zeroize::Zeroizing;

use crate::hsm::pkcs11::{IvSource, Pkcs11Settings, TokenSelector};
pub use crate::hsm::BackendConfig;
use crate::hsm::KeyUsage;
use crate::router::{is_valid_key_id, normalize_prefix};

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

/// Client certificate authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MtlsSettings {
    /// PEM bundle of the CAs that issue client certificates.
    pub ca_bundle: PathBuf,
    /// Names a client certificate must carry (CN or DNS SAN), compared without case.
    pub allowed_subjects: Vec<String>,
}

/// Everything the server's TLS configuration is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first.
    pub certificate: PathBuf,
    /// PEM private key.
    pub private_key: PathBuf,
    /// Offer h2.
    pub http2: bool,
    /// Client certificates, if required.
    pub mtls: Option<MtlsSettings>,
}

/// The settings a reload cannot change: a reload that brings other values says a
/// restart is needed. Compared field by field; the PIN is not among them (a reload
/// takes it up), nor the key stores, TLS files, policies or credentials.
#[derive(Debug, PartialEq)]
pub struct RestartOnly {
    listen: SocketAddr,
    admin_listen: Option<SocketAddr>,
    limits: Limits,
    health: HealthSettings,
    max_body_bytes: usize,
    pin_threads: bool,
    log_buffer_bytes: usize,
    backend: BackendShape,
}

/// [`BackendConfig`] without what a reload may change (PINs) or cannot compare (an
/// injected fault source).
#[derive(Debug, PartialEq)]
enum BackendShape {
    Pkcs11(Vec<EkmShape>),
    Software(Vec<crate::hsm::software::SoftwareKeySpec>),
    Simulated(crate::hsm::simulated::SimulatedSettings),
}

/// One EKM's restart-only settings.
#[derive(Debug, PartialEq)]
struct EkmShape {
    module: PathBuf,
    token: TokenSelector,
    sessions: usize,
    queue_depth: usize,
    iv_source: IvSource,
    session_key_copies: bool,
    key_refresh: Duration,
    call_timeout: Duration,
    read_write_sessions: bool,
    trace: bool,
    max_replacement_sessions: usize,
}

impl From<&BackendConfig> for BackendShape {
    fn from(backend: &BackendConfig) -> Self {
        match backend {
            BackendConfig::Pkcs11(ekms) => Self::Pkcs11(
                ekms.iter()
                    .map(|ekm| EkmShape {
                        module: ekm.module.clone(),
                        token: ekm.token.clone(),
                        sessions: ekm.sessions,
                        queue_depth: ekm.queue_depth,
                        iv_source: ekm.iv_source,
                        session_key_copies: ekm.session_key_copies,
                        key_refresh: ekm.key_refresh,
                        call_timeout: ekm.call_timeout,
                        read_write_sessions: ekm.read_write_sessions,
                        trace: ekm.trace,
                        max_replacement_sessions: ekm.max_replacement_sessions,
                    })
                    .collect(),
            ),
            BackendConfig::Software(keys) => Self::Software(keys.clone()),
            BackendConfig::Simulated(settings) => Self::Simulated(settings.clone()),
        }
    }
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
#[derive(Debug, Clone, PartialEq)]
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
#[derive(Debug, Clone, PartialEq)]
pub struct HealthSettings {
    /// The health-check key.
    pub key: Option<String>,
    /// Time between checks.
    pub interval: Duration,
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
    /// The settings a reload cannot change, to compare with the running ones.
    pub fn restart_only(&self) -> RestartOnly {
        RestartOnly {
            listen: self.listen,
            admin_listen: self.admin_listen,
            limits: self.limits.clone(),
            health: self.health.clone(),
            max_body_bytes: self.max_body_bytes,
            pin_threads: self.pin_threads,
            log_buffer_bytes: self.log_buffer_bytes,
            backend: BackendShape::from(&self.backend),
        }
    }

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

    /// Validates a parsed file; relative paths are taken from `base`, and a leading
    /// `${CREDENTIALS_DIRECTORY}` from the environment (systemd credentials).
    pub fn from_file(mut file: FileConfig, base: &Path) -> Result<Self, ConfigError> {
        let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        file.expand_credentials_directory(credentials.as_deref())?;
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
