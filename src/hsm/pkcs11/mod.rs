//! PKCS#11 backend: a bounded pool of logged-in sessions on dedicated threads.
//!
//! Each session is owned by one OS thread ("pkcs11-session-N") for its whole life (see
//! `super::pool`), so PKCS#11 calls never run on tokio worker threads and a session is
//! never used by two threads at once (PKCS#11 forbids that, and some modules bind
//! sessions to threads). Admission (queue bound, deadlines, call timeouts) is the
//! pool's.
//!
//! Key object handles are cached by external key id together with the key's attributes;
//! an entry is re-read after `key_refresh` (so a key disabled in the HSM is noticed) and
//! dropped at once when the HSM reports the handle stale. One session re-reads an entry
//! that is due while the others go on with it, so the lookup never stalls them all.
//!
//! We use dedicated threads and a channel rather than deadpool: deadpool hands pooled
//! objects to async tasks, which would then need `spawn_blocking` per call to get off
//! the tokio workers. A thread that owns its session needs no handoff of the session.
//!
//! The module's parts, in the order a request descends through them:
//! `worker` (a session thread: `call`, `attempt`, `recover`), `gcm` (encrypt and
//! decrypt on a key, IV batches, output splitting), `keys` (the key cache and lookups),
//! `objects` (attributes and disabled markers), `module` (library, C_Initialize,
//! slot and login), `errors` (classification), `trace` (`hsm.trace`), `settings`;
//! `admin` is key administration for `xks-proxy keys`, [`probe`] is `xks-proxy hsm
//! probe`.

mod admin;
mod errors;
mod gcm;
mod keys;
mod module;
mod objects;
pub mod probe;
mod settings;
mod trace;
mod worker;

pub use admin::{
    administer, create_key, destroy_key, list_keys, rotate_key, set_key_enabled, KeyAction,
    KeyAdminError, KeyReport, NewKeyUsage,
};
pub use gcm::IV_BATCH;
pub(crate) use module::initialize;
pub use module::open_token;
pub use objects::{current_version, DISABLED_MARKER_APPLICATION};
pub use settings::{IvSource, Pkcs11Settings, TokenSelector, APPENDED_IV_LEN};
pub use trace::TARGET as TRACE_TARGET;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Instant;

use cryptoki::context::Function;
use cryptoki::types::AuthPin;

use self::{errors::*, gcm::*, keys::KeyCache, module::*, worker::*};
use crate::hsm::pool::{Call, Pool, PoolSettings};
use crate::hsm::pooled::SessionOps;
use crate::hsm::{health_round_trip, EkmInfo, HsmError, KeyMetadata, Plaintext, Sealed};
use crate::metrics::Metrics;

/// The PKCS#11 backend; cheap to share behind an `Arc`.
pub struct Pkcs11Backend {
    pool: Pool<Worker>,
    shared: Arc<Shared>,
    info: EkmInfo,
}

impl fmt::Debug for Pkcs11Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Backend")
            .field("ekm", &self.info)
            .field("pool", &self.pool)
            .finish()
    }
}

impl Pkcs11Backend {
    /// Connects to the token, logs in and starts the session threads.
    pub fn connect(settings: &Pkcs11Settings, metrics: Arc<Metrics>) -> Result<Self, HsmError> {
        if settings.trace {
            trace::enable();
        }
        let module = Module::load(&settings.module)?;
        let out = Arc::new(AtomicBool::new(false));
        module.register(&settings.token, &out);
        let shared = Arc::new(Shared {
            module,
            token: settings.token.clone(),
            token_state: parking_lot::Mutex::new(TokenState::default()),
            pin: parking_lot::Mutex::new(AuthPin::new(settings.pin.as_str().into())),
            login_refused: parking_lot::Mutex::new(None),
            keys: KeyCache::new(settings.key_refresh),
            iv_source: settings.iv_source,
            session_key_copies: settings.session_key_copies,
            read_write_sessions: settings.read_write_sessions,
            faults: settings.faults.clone(),
            out,
            sessions_opened: AtomicU64::new(0),
        });
        // The first worker opens its session (and logs in) now, so a wrong PIN or a
        // missing token stops start-up with the reason.
        let mut first = Worker {
            shared: Arc::clone(&shared),
            session: None,
            ivs: IvBatch::new(),
        };
        let slot = first
            .call(|s| s.get_session_info(), Function::GetSessionInfo)?
            .slot_id();
        let token = trace::traced(
            Function::GetTokenInfo,
            trace::On::Token(&settings.token),
            || shared.module.state.read().pkcs11.get_token_info(slot),
        )
        .map_err(unexpected(Function::GetTokenInfo))?;
        let fw = token.firmware_version();
        let hw = token.hardware_version();
        let info = EkmInfo {
            id: non_empty(token.serial_number().trim(), "ekm-1"),
            model: format!(
                "{} {} (hardware {}.{}, firmware {}.{})",
                token.manufacturer_id().trim(),
                token.model().trim(),
                hw.major(),
                hw.minor(),
                fw.major(),
                fw.minor()
            ),
            vendor: non_empty(token.manufacturer_id().trim(), "unknown"),
        };
        let mut first = Some(first);
        let workers = (0..settings.sessions.max(1))
            .map(|_| {
                first.take().unwrap_or_else(|| {
                    let mut worker = Worker {
                        shared: Arc::clone(&shared),
                        session: None,
                        ivs: IvBatch::new(),
                    };
                    // Open every session now so the first requests don't pay for it; a
                    // failure here is retried on the session's first job.
                    if let Err(e) = worker.call(|_| Ok(()), Function::OpenSession) {
                        tracing::warn!(error = %e, "could not open a PKCS#11 session yet");
                    }
                    worker
                })
            })
            .collect();
        let replacement = {
            let shared = Arc::clone(&shared);
            move || Worker {
                shared: Arc::clone(&shared),
                session: None,
                ivs: IvBatch::new(),
            }
        };
        let pool = Pool::start(
            &PoolSettings {
                name: "pkcs11-session",
                queue_depth: settings.queue_depth,
                call_timeout: settings.call_timeout,
                max_replacements: settings.max_replacement_sessions,
                ekm: info.id.clone(),
            },
            workers,
            replacement,
            metrics,
        )?;
        Ok(Self { pool, shared, info })
    }

    /// False while the module is down or the token missing: calls fail fast until the
    /// next attempt to bring it back is due.
    pub fn in_service(&self) -> bool {
        !self.shared.module.is_down() && !self.shared.is_missing()
    }

    /// How many times the module has been re-initialized in this process.
    pub fn module_generation(&self) -> u64 {
        self.shared.module.generation()
    }

    /// The session pool, which runs the operations (see [`super::pooled`]).
    pub(crate) fn sessions(&self) -> &Pool<Worker> {
        &self.pool
    }

    /// The key's current version (see [`super::version_label`]), cached for
    /// `key_refresh`, so a rotation is picked up within that time without a restart.
    pub async fn current_version(&self, key_id: &str, deadline: Instant) -> Result<u32, HsmError> {
        if let Some(version) = self.shared.keys.version(key_id) {
            return Ok(version);
        }
        let id = key_id.to_owned();
        let version = self
            .pool
            .run(Call::KeyVersion, deadline, move |w| {
                w.call(|s| current_version(s, &id), Function::FindObjects)
            })
            .await?;
        self.shared.keys.set_version(key_id, version);
        Ok(version)
    }

    /// Treats every cached key handle, attribute set and key version as due: the next
    /// use reads the token (a reload asks for this, so that `xks-proxy keys rotate` or
    /// `keys disable` followed by SIGHUP takes effect at once).
    pub fn refresh_keys(&self) {
        self.shared.keys.expire();
    }

    /// The token this backend serves.
    pub fn token(&self) -> &TokenSelector {
        &self.shared.token
    }

    /// Why logins are suspended (the token refused the PIN), if they are.
    pub fn login_suspended(&self) -> Option<&'static str> {
        self.shared.login_refused.lock().map(PinRefusal::reason)
    }

    /// Takes up the PIN of a reloaded configuration, and ends a login suspension
    /// when one more attempt may succeed: the PIN is another than the one the token
    /// found incorrect, or the PIN was locked (an officer may have unlocked it
    /// without changing it; an attempt on a locked PIN does not count towards
    /// anything). Each reload is at most one attempt, never a loop.
    pub fn update_pin(&self, pin: &str) {
        use secrecy::ExposeSecret as _;
        let mut current = self.shared.pin.lock();
        let changed = current.expose_secret() != pin;
        if changed {
            *current = AuthPin::new(pin.into());
        }
        let mut refused = self.shared.login_refused.lock();
        let resume = match *refused {
            Some(PinRefusal::Incorrect) => changed,
            Some(PinRefusal::Locked) => true,
            None => false,
        };
        if resume {
            *refused = None;
            if changed {
                tracing::info!(token = %self.shared.token, "the PIN changed: logins resume");
            } else {
                tracing::info!(token = %self.shared.token, "reloaded after the PIN was locked: logins resume");
            }
        }
    }

    /// Facts about the token.
    pub fn ekm_info(&self) -> &EkmInfo {
        &self.info
    }
}

impl SessionOps for Worker {
    fn encrypt(&mut self, key_id: &str, plaintext: &[u8], aad: &[u8]) -> Result<Sealed, HsmError> {
        self.seal(key_id, plaintext, aad)
    }

    fn decrypt(
        &mut self,
        key_id: &str,
        sealed: &Sealed,
        aad: &[u8],
    ) -> Result<Plaintext, HsmError> {
        self.open(key_id, sealed, aad)
    }

    /// Read fresh from the HSM: GetKeyMetadata is rare and must reflect the key as it
    /// is now.
    fn key_metadata(&mut self, key_id: &str) -> Result<KeyMetadata, HsmError> {
        self.fresh_metadata(key_id)
    }

    /// With a key: the key read from the token itself (session copies and cached
    /// handles can go on working for a while after the token is gone), then an encrypt
    /// and decrypt with it. Without: a cheap round trip through the token
    /// (C_GetSessionInfo); a token that held keys and now shows no objects fails it as
    /// a lost token (see [`Shared::check_not_emptied`]).
    fn health_check(&mut self, key_id: Option<&str>) -> Result<(), HsmError> {
        let Some(key_id) = key_id else {
            let shared = Arc::clone(&self.shared);
            return self.call(
                |s| {
                    s.get_session_info()?;
                    shared.check_not_emptied(s, None)
                },
                Function::GetSessionInfo,
            );
        };
        // With the key cached, read it from the token too; without, the round trip's
        // own lookup reads it.
        if self.cached(key_id).is_some() {
            self.read_token_key(key_id)?;
        }
        health_round_trip(
            self,
            |w, p| w.seal(key_id, p, b""),
            |w, s| w.open(key_id, s, b""),
        )
    }
}

fn non_empty(s: &str, fallback: &str) -> String {
    if s.is_empty() { fallback } else { s }.to_owned()
}
