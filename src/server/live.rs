//! The part of the configuration that changes without a restart: key stores (their
//! credentials, key membership and quotas), the TLS certificate and key, mTLS settings
//! and the authorization policies.
//!
//! A reload (SIGHUP, or a watched file changed) builds a complete new [`Live`] from the
//! configuration file and swaps it in atomically; a request in flight finishes with the
//! `Live` it started with, and open connections keep their TLS session. A reload that
//! fails validation changes nothing and says why in the log. This is how an operator
//! rotates SigV4 credentials as the spec describes (add the new one, update KMS,
//! remove the old one) and renews certificates before they expire.
//!
//! Changes to anything else (listen addresses, the HSM, deadlines and limits) need a
//! restart; a reload that sees them says so.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use super::quota::Quota;
use super::tls;
use super::{App, StartError};
use crate::auth::{ReplayCache, Verifier};
use crate::authz::Authorizer;
use crate::config::{BackendConfig, Config, RestartOnly};
use crate::metrics::{ReloadLabels, SecretDates};
use crate::router::Router;
use crate::xks::KeySet;

/// A key store at run time.
#[derive(Debug)]
pub struct KeyStore {
    /// Name for logs.
    pub name: String,
    /// Verifies SigV4 with this key store's region and credentials.
    pub verifier: Verifier,
    /// External key ids this key store may use.
    pub keys: KeySet,
    /// Request quota, if any.
    pub quota: Option<Quota>,
}

/// The reloadable state.
#[derive(Debug)]
pub struct Live {
    /// Routes (key store prefixes).
    pub router: Router,
    /// Key stores, indexed as the router's matches.
    pub key_stores: Vec<KeyStore>,
    /// The TLS configuration new connections get.
    pub tls: Arc<rustls::ServerConfig>,
    /// Secondary authorization, if configured.
    pub authorizer: Option<Arc<Authorizer>>,
    /// Dates for the metrics.
    pub secret_dates: SecretDates,
    /// What a reload compares to tell the operator that a restart is needed.
    fixed: RestartOnly,
}

impl Live {
    /// Builds the reloadable state from a configuration, taking its key stores.
    pub fn build(
        config: &mut Config,
        replay: Option<&Arc<ReplayCache>>,
    ) -> Result<Self, StartError> {
        let key_stores = std::mem::take(&mut config.key_stores);
        let router = Router::new(key_stores.iter().map(|s| s.uri_prefix.as_str()))?;
        let tls = tls::server_config(&config.tls)?;
        let authorizer = match &config.policy_file {
            Some(path) => Some(Arc::new(Authorizer::from_file(path)?)),
            None => None,
        };
        let mut secret_dates = SecretDates {
            certificate_not_after: tls::certificate_not_after(&config.tls.certificate).ok(),
            credentials: Vec::new(),
        };
        let key_stores = key_stores
            .into_iter()
            .map(|store| {
                for (access_key_id, created) in &store.credentials_created {
                    secret_dates.credentials.push((
                        store.name.clone(),
                        access_key_id.clone(),
                        *created,
                    ));
                }
                let mut verifier = Verifier::new(store.region, store.credentials);
                if let Some(cache) = replay {
                    verifier = verifier.with_replay_cache(Arc::clone(cache));
                }
                KeyStore {
                    verifier,
                    keys: KeySet::new(store.keys).with_aws_sample_compat(store.aws_sample_metadata),
                    quota: store.quota.map(|(rate, burst)| Quota::new(rate, burst)),
                    name: store.name,
                }
            })
            .collect();
        Ok(Self {
            router,
            key_stores,
            tls,
            authorizer,
            secret_dates,
            fixed: config.restart_only(),
        })
    }

    /// The key stores' names and credential ids, for the reload log line.
    fn summary(&self) -> String {
        self.key_stores
            .iter()
            .map(|s| format!("{} ({})", s.name, s.verifier.access_key_ids().join(", ")))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Reloads the configuration file into `app`. On failure nothing changes.
pub fn reload(app: &App, path: &Path) -> Result<(), String> {
    let result = Config::load(path)
        .map_err(|e| e.to_string())
        .and_then(|mut config| {
            let watched = config.watched_files.clone();
            Live::build(&mut config, app.replay.as_ref())
                .map(|live| (live, watched, config.backend))
                .map_err(|e| e.to_string())
        });
    match result {
        Ok((live, watched, backend)) => {
            // A corrected PIN is taken up at once (it ends a login suspension); the
            // rest of [hsm] needs a restart.
            if let BackendConfig::Pkcs11(ekms) = &backend {
                app.handler.backend().update_pins(ekms);
            }
            // A reload is also how an operator says "the keys changed": a rotation or
            // a disabled key takes effect now, not after hsm.key_refresh_seconds.
            app.handler.backend().refresh_keys();
            let old = app.live.load();
            if old.fixed != live.fixed {
                tracing::warn!(
                    "the configuration changes listen addresses, [hsm], limits, deadlines or thread pinning: those need a restart and keep their running values"
                );
            }
            *app.metrics.secrets.lock() = live.secret_dates.clone();
            tracing::info!(key_stores = %live.summary(), "configuration reloaded");
            app.live.store(Arc::new(live));
            *app.watched.lock() = watched;
            app.metrics
                .reloads
                .get_or_create(&ReloadLabels { result: "ok" })
                .inc();
            app.metrics.reload_ok.set(1);
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, "configuration reload failed; the running configuration stays");
            app.metrics
                .reloads
                .get_or_create(&ReloadLabels { result: "error" })
                .inc();
            app.metrics.reload_ok.set(0);
            Err(e)
        }
    }
}

/// A file's identity for change detection: modification time and length.
pub fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len()))
}

/// Reloads on SIGHUP and whenever a watched file changes (checked every `poll`).
pub async fn watch(app: Arc<App>, path: PathBuf, poll: Option<std::time::Duration>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reload by file changes only");
            None
        }
    };
    let stamps = |app: &App| -> Vec<_> { app.watched.lock().iter().map(|p| stamp(p)).collect() };
    let mut seen = stamps(&app);
    let period = poll.unwrap_or(std::time::Duration::from_secs(3600));
    loop {
        let hup = async {
            match hangup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = hup => {
                tracing::info!("SIGHUP: reloading the configuration");
                let _ = reload(&app, &path);
                seen = stamps(&app);
            }
            () = tokio::time::sleep(period), if poll.is_some() => {
                let now = stamps(&app);
                if now != seen {
                    tracing::info!("a configuration file changed: reloading");
                    let _ = reload(&app, &path);
                    seen = stamps(&app);
                }
            }
        }
    }
}
