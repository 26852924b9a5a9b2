//! PKCS#11 backend: a bounded pool of logged-in sessions on dedicated threads.
//!
//! Each session is owned by one OS thread ("pkcs11-session-N") for its whole life (see
//! [`super::pool`]), so PKCS#11 calls never run on tokio worker threads and a session is
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

use foldhash::{HashMap, HashMapExt};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use parking_lot::{RwLock, RwLockReadGuard};
use zeroize::Zeroizing;

use super::faults::{FaultInjector, VendorIv};
use super::pool::{Pool, PoolSettings};
use super::{
    health_round_trip, EkmInfo, HsmError, KeyMetadata, KeyUsage, Operation, Plaintext, Sealed,
    IV_LEN, TAG_LEN,
};
use crate::metrics::Metrics;

/// Which token of the module to use. Never "the first slot": on a real HSM the slot
/// order is not stable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSelector {
    /// CKA token label (trailing blanks ignored).
    Label(String),
    /// Token serial number.
    Serial(String),
}

impl fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Label(l) => write!(f, "label {l:?}"),
            Self::Serial(s) => write!(f, "serial {s:?}"),
        }
    }
}

/// Where the GCM IV comes from. HSMs differ, and the proxy must hand KMS the IV, the
/// ciphertext and the tag apart whichever way the HSM returns them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IvSource {
    /// The proxy takes 12 bytes from the HSM's RNG (C_GenerateRandom) and passes them
    /// in (generic; SoftHSM2). Each session draws them [`IV_BATCH`] IVs at a time.
    #[default]
    HsmRandom,
    /// The proxy draws 12 bytes from its own DRBG (AWS-LC) and passes them in: one
    /// PKCS#11 call per encryption fewer.
    ProxyRandom,
    /// The proxy passes a zeroed 12-byte IV buffer and the HSM writes the IV it chose
    /// into it (Utimaco, Entrust nShield, Marvell-based HSMs).
    HsmGenerated,
    /// The proxy passes no IV; the HSM picks a 16-byte IV and appends it after the tag
    /// in the output (Thales Luna in FIPS mode).
    HsmAppended,
}

/// The IV length an HSM that appends its IV after the tag uses.
pub const APPENDED_IV_LEN: usize = 16;

/// IVs per C_GenerateRandom with [`IvSource::HsmRandom`]. In SoftHSM2 the call, not the
/// bytes, is the cost: 9.7k instructions for 768 bytes against 8.1k for 12, and those
/// 8.1k were a tenth of what it spent per Encrypt (perf/RESULTS.md, step 22).
pub const IV_BATCH: usize = 64;

/// IVs drawn from the HSM's RNG in batches, each handed out once. A session's own:
/// no locking, and nothing shared between sessions.
struct IvBatch {
    bytes: Vec<u8>,
    /// Bytes handed out so far; `bytes.len()` when empty.
    taken: usize,
}

impl IvBatch {
    fn new() -> Self {
        Self {
            bytes: vec![0; IV_LEN * IV_BATCH],
            taken: IV_LEN * IV_BATCH,
        }
    }

    /// The next IV, or `None` when the batch is used up. Its bytes are zeroed in the
    /// batch as they leave, so an IV can never be handed out twice.
    fn take(&mut self) -> Option<Result<[u8; IV_LEN], HsmError>> {
        let slot = self.bytes.get_mut(self.taken..self.taken + IV_LEN)?;
        let mut iv = [0u8; IV_LEN];
        iv.copy_from_slice(slot);
        slot.fill(0);
        self.taken += IV_LEN;
        if iv.iter().all(|b| *b == 0) {
            // 96 zero bits from an RNG: it is broken (or this code is).
            return Some(Err(HsmError::Inconsistent(
                "the HSM's RNG returned an all-zero IV",
            )));
        }
        Some(Ok(iv))
    }

    /// The buffer to refill, marked full again by [`IvBatch::filled`].
    fn take_buffer(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.bytes)
    }

    fn filled(&mut self, bytes: Vec<u8>) {
        self.bytes = bytes;
        self.taken = 0;
    }

    fn put_back_unfilled(&mut self, bytes: Vec<u8>) {
        self.taken = bytes.len();
        self.bytes = bytes;
    }
}

/// Everything needed to reach a token.
#[derive(Clone)]
pub struct Pkcs11Settings {
    /// Path of the PKCS#11 module (.so).
    pub module: PathBuf,
    /// The token.
    pub token: TokenSelector,
    /// The user PIN.
    pub pin: Zeroizing<String>,
    /// Number of sessions (= dedicated threads).
    pub sessions: usize,
    /// Requests that may wait for a session; beyond that, [`HsmError::Busy`].
    pub queue_depth: usize,
    /// IV generation.
    pub iv_source: IvSource,
    /// Use a session-object copy of each key (C_CopyObject with CKA_TOKEN false) rather
    /// than the token object itself.
    pub session_key_copies: bool,
    /// How long cached key attributes are trusted before being re-read.
    pub key_refresh: Duration,
    /// Longest one PKCS#11 call may take before the request answers 503.
    pub call_timeout: Duration,
    /// Open read-write sessions (AWS CloudHSM's SDK 5 refuses read-only ones); the
    /// proxy itself never modifies token objects.
    pub read_write_sessions: bool,
    /// Errors and latency injected on command (tests and chaos drills; normally `None`).
    pub faults: Option<Arc<FaultInjector>>,
}

impl fmt::Debug for Pkcs11Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Settings")
            .field("module", &self.module)
            .field("token", &self.token)
            .field("pin", &"<redacted>")
            .field("sessions", &self.sessions)
            .field("queue_depth", &self.queue_depth)
            .field("iv_source", &self.iv_source)
            .field("session_key_copies", &self.session_key_copies)
            .field("key_refresh", &self.key_refresh)
            .field("call_timeout", &self.call_timeout)
            .field("read_write_sessions", &self.read_write_sessions)
            .field("faults", &self.faults.is_some())
            .finish()
    }
}

/// A key handle with the attributes read with it.
#[derive(Debug, Clone)]
struct CachedKey {
    handle: ObjectHandle,
    /// The token object `handle` was copied from (`handle` itself without a copy).
    source: ObjectHandle,
    /// Set when `handle` is this proxy's session copy of the token key (destroyed when
    /// replaced): the serial of the session that made it. A session object dies with
    /// the session that created it, so the copy is forgotten when that session goes.
    owner: Option<u64>,
    metadata: KeyMetadata,
    read_at: Instant,
    /// The module generation the handle belongs to (see [`Module`]).
    generation: u64,
}

/// Shortest and longest wait between attempts to bring a failed module or a missing
/// token back. Doubling from the shortest, an HSM that returns is in service again
/// within a few seconds, and one that stays away costs one attempt every few seconds.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(4);

/// Why a module or token is out of service, and when to try again.
#[derive(Debug, Clone)]
struct Outage {
    reason: String,
    retry_at: Instant,
    /// The wait before `retry_at`; the next one is twice as long.
    backoff: Duration,
}

impl Outage {
    fn after(previous: Option<&Self>, reason: String) -> Self {
        let backoff = previous.map_or(RETRY_MIN, |o| (o.backoff * 2).min(RETRY_MAX));
        Self {
            reason,
            retry_at: Instant::now() + backoff,
            backoff,
        }
    }

    fn error(&self, what: &str) -> HsmError {
        let wait = self.retry_at.saturating_duration_since(Instant::now());
        HsmError::Unavailable(format!(
            "{what} is out of service ({}); next attempt in {} ms",
            self.reason,
            wait.as_millis()
        ))
    }
}

/// Whether a cached key entry is due to be re-read from the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Age {
    Fresh,
    /// Past `key_refresh`: re-read it, or use it while another session does.
    Stale,
}

/// How long a replaced session copy of a key lives on: longer than any call using it
/// can take (calls that outlive their timeout are abandoned by their requests).
const RETIRE_GRACE: Duration = Duration::from_secs(30);

/// A PKCS#11 module as loaded in this process.
///
/// C_Initialize is per process and module, not per token, so every EKM on the same
/// module shares one `Module`, and re-initializing it after a module-level error
/// (C_Finalize, C_Initialize) affects all of them: their sessions, slot ids and object
/// handles belong to the old *generation*. Handle numbers are reused after
/// re-initialization, so a stale session or object is forgotten, never closed or
/// destroyed (that could hit a new one with the same number).
pub(crate) struct Module {
    path: PathBuf,
    generation: AtomicU64,
    /// Re-initializations since the module last served a call; paces them.
    failures: AtomicU32,
    /// Held shared by every PKCS#11 call and exclusively by re-initialization, which
    /// must not finalize the module under a running call.
    state: RwLock<ModuleState>,
    /// The tokens (EKMs) using the module, each with its "out of service" flag.
    tokens: parking_lot::Mutex<Vec<(TokenSelector, std::sync::Weak<AtomicBool>)>>,
}

struct ModuleState {
    pkcs11: Pkcs11,
    /// When it was last re-initialized.
    last_init: Option<Instant>,
    /// Set while the module cannot be initialized: calls fail fast until `retry_at`.
    down: Option<Outage>,
}

/// The modules loaded so far, by path: one `Module` per library for the whole process.
static MODULES: parking_lot::Mutex<Vec<std::sync::Weak<Module>>> =
    parking_lot::Mutex::new(Vec::new());

fn initialize(pkcs11: &Pkcs11) -> Result<(), CkError> {
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(e) => Err(e),
    }
}

impl Module {
    /// The module at `path`, loaded and initialized once per process.
    fn load(path: &std::path::Path) -> Result<Arc<Self>, HsmError> {
        let mut modules = MODULES.lock();
        modules.retain(|m| m.strong_count() > 0);
        if let Some(module) = modules
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .find(|m| m.path == path)
        {
            return Ok(module);
        }
        let pkcs11 = Pkcs11::new(path).map_err(|e| {
            HsmError::Unavailable(format!(
                "cannot load PKCS#11 module {}: {e}",
                path.display()
            ))
        })?;
        initialize(&pkcs11)
            .map_err(|e| HsmError::Unavailable(format!("C_Initialize failed: {e}")))?;
        let module = Arc::new(Self {
            path: path.to_owned(),
            generation: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            state: RwLock::new(ModuleState {
                pkcs11,
                last_init: None,
                down: None,
            }),
            tokens: parking_lot::Mutex::new(Vec::new()),
        });
        modules.push(Arc::downgrade(&module));
        Ok(module)
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Registers a token that uses the module; `out` says when it is out of service.
    fn register(&self, token: &TokenSelector, out: &Arc<AtomicBool>) {
        let mut tokens = self.tokens.lock();
        tokens.retain(|(_, flag)| flag.strong_count() > 0);
        tokens.push((token.clone(), Arc::downgrade(out)));
    }

    /// Whether another token on this module serves right now. Re-initializing the
    /// module would cut it off, so a lost token is then looked for again without.
    fn others_serving(&self, mine: &TokenSelector) -> bool {
        self.tokens.lock().iter().any(|(token, out)| {
            token != mine
                && out
                    .upgrade()
                    .is_some_and(|out| !out.load(Ordering::Relaxed))
        })
    }

    /// Whether the module is out of service right now.
    fn is_down(&self) -> bool {
        self.state
            .read()
            .down
            .as_ref()
            .is_some_and(|o| Instant::now() < o.retry_at)
    }

    /// Admission for a PKCS#11 call: the shared guard, or a fast error while the module
    /// is down. When the next attempt is due, this call makes it.
    fn enter(
        &self,
        faults: Option<&FaultInjector>,
    ) -> Result<RwLockReadGuard<'_, ModuleState>, HsmError> {
        let state = self.state.read();
        match &state.down {
            None => Ok(state),
            Some(outage) if Instant::now() < outage.retry_at => Err(outage.error("PKCS#11 module")),
            Some(_) => {
                let generation = self.generation();
                drop(state);
                self.reinitialize(generation, "retrying", faults)?;
                Ok(self.state.read())
            }
        }
    }

    /// A call succeeded: the module serves again.
    fn served(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// Finalizes and initializes the module again, unless that already happened since
    /// generation `seen`. Re-initializations that do not bring the module back are
    /// spaced by a doubling backoff; between them the module is down and calls fail
    /// fast.
    fn reinitialize(
        &self,
        seen: u64,
        why: &str,
        faults: Option<&FaultInjector>,
    ) -> Result<(), HsmError> {
        let mut state = self.state.write();
        if self.generation() != seen && state.down.is_none() {
            return Ok(()); // another thread did it while we waited for the lock
        }
        let now = Instant::now();
        if let Some(outage) = state.down.as_ref().filter(|o| now < o.retry_at) {
            return Err(outage.error("PKCS#11 module"));
        }
        // Failed again right after a re-initialization: pace the next one.
        let failures = self.failures.load(Ordering::Relaxed);
        if state.down.is_none() && failures > 0 {
            let backoff = RETRY_MIN * 2u32.saturating_pow(failures - 1).min(64);
            let backoff = backoff.min(RETRY_MAX);
            if let Some(since) = state.last_init.filter(|at| now < *at + backoff) {
                let outage = Outage {
                    reason: format!("failed again after re-initialization: {why}"),
                    retry_at: since + backoff,
                    backoff,
                };
                let error = outage.error("PKCS#11 module");
                state.down = Some(outage);
                return Err(error);
            }
        }
        tracing::warn!(module = %self.path.display(), reason = why, "re-initializing the PKCS#11 module");
        // Fails with CKR_CRYPTOKI_NOT_INITIALIZED when the module was finalized under us.
        let _ = state.pkcs11.clone().finalize();
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.failures.fetch_add(1, Ordering::Relaxed);
        state.last_init = Some(now);
        let result = faults
            .map_or(Ok(()), |f| f.before(Function::Initialize))
            .and_then(|()| initialize(&state.pkcs11));
        match result {
            Ok(()) => {
                state.down = None;
                tracing::info!(module = %self.path.display(), "PKCS#11 module initialized again");
                Ok(())
            }
            Err(e) => {
                let outage =
                    Outage::after(state.down.as_ref(), format!("C_Initialize failed: {e}"));
                tracing::error!(module = %self.path.display(), error = %e, retry_ms = outage.backoff.as_millis() as u64, "PKCS#11 module is down");
                let error = outage.error("PKCS#11 module");
                state.down = Some(outage);
                Err(error)
            }
        }
    }
}

/// Where the token is under the module's current generation.
#[derive(Debug, Default)]
struct TokenState {
    slot: Option<(Slot, u64)>,
    /// Set while the token cannot be found; `u64` is the generation it was missed in.
    missing: Option<(Outage, u64)>,
}

/// What the session threads of one EKM share.
struct Shared {
    module: Arc<Module>,
    token: TokenSelector,
    token_state: parking_lot::Mutex<TokenState>,
    /// The user PIN; replaced by a reload that brings another one.
    pin: parking_lot::Mutex<AuthPin>,
    /// Set when the token refused the PIN (incorrect or locked): no more logins until
    /// the PIN changes. HSMs lock a partition after a few failed logins, and every
    /// health check and recovery would otherwise try again.
    login_refused: parking_lot::Mutex<Option<&'static str>>,
    /// Handles are per application, not per session, so one cache serves all threads.
    keys: RwLock<HashMap<String, CachedKey>>,
    iv_source: IvSource,
    session_key_copies: bool,
    key_refresh: Duration,
    read_write_sessions: bool,
    faults: Option<Arc<FaultInjector>>,
    /// Set while the token is lost; cleared by the next call that succeeds.
    out: Arc<AtomicBool>,
    /// Replaced session copies of keys, destroyed once no call can still use them.
    retired: parking_lot::Mutex<Vec<(ObjectHandle, u64, Instant)>>,
    /// Held while a key is looked up in the token.
    lookup: parking_lot::Mutex<()>,
    /// Serial numbers for the sessions the workers open.
    sessions_opened: AtomicU64,
    /// Keys found on the token at least once: one missing later makes the token
    /// suspect (see [`Worker::read_token_key`]).
    known_keys: parking_lot::Mutex<std::collections::HashSet<String>>,
}

impl Shared {
    /// Forgets the cached key copies made in session `serial`, which is going or gone
    /// and has taken them with it. They are not destroyed: their handles are dead.
    fn forget_copies_of(&self, serial: u64) {
        self.keys.write().retain(|_, key| key.owner != Some(serial));
    }

    fn inject(&self, function: Function) -> Result<(), CkError> {
        self.faults.as_ref().map_or(Ok(()), |f| f.before(function))
    }

    /// The token's slot under module generation `generation`, looked up once per
    /// generation (and again after the token was lost). While the token is missing
    /// this fails fast; when the next attempt is due it looks again, after
    /// re-initializing the module unless other tokens of the module serve.
    fn slot(&self, pkcs11: &Pkcs11, generation: u64) -> Result<Slot, Failure> {
        let mut token = self.token_state.lock();
        if let Some((slot, g)) = token.slot {
            if g == generation {
                return Ok(slot);
            }
        }
        if let Some((outage, g)) = &token.missing {
            if *g == generation {
                if Instant::now() < outage.retry_at {
                    return Err(Failure::Hsm(outage.error(&format!("token {}", self.token))));
                }
                if !self.module.others_serving(&self.token) {
                    // Most modules (SoftHSM2 among them) only see a returned token
                    // after C_Initialize: ask for it.
                    return Err(Failure::Call(
                        CkError::Pkcs11(RvError::TokenNotPresent, Function::GetSlotList),
                        generation,
                    ));
                }
                // Other tokens of the module serve: look again without re-initializing.
            }
        }
        let found = self
            .inject(Function::GetSlotList)
            .map_err(|e| Failure::Call(e, generation))
            .and_then(|()| find_slot(pkcs11, &self.token).map_err(Failure::Hsm));
        match found {
            Ok(slot) => {
                if token.missing.take().is_some() {
                    tracing::info!(token = %self.token, "token found again");
                }
                token.slot = Some((slot, generation));
                Ok(slot)
            }
            Err(Failure::Hsm(e)) => {
                let outage = Outage::after(token.missing.as_ref().map(|(o, _)| o), e.to_string());
                tracing::error!(token = %self.token, error = %e, retry_ms = outage.backoff.as_millis() as u64, "token not found");
                let error = outage.error(&format!("token {}", self.token));
                token.missing = Some((outage, generation));
                Err(Failure::Hsm(error))
            }
            Err(call) => Err(call),
        }
    }

    /// Why logins are suspended, if they are.
    fn login_allowed(&self) -> Result<(), HsmError> {
        match *self.login_refused.lock() {
            None => Ok(()),
            Some(reason) => Err(HsmError::Unavailable(format!(
                "login suspended: the {reason}; correct the PIN and reload the configuration"
            ))),
        }
    }

    /// Logs `session`'s application in; a PIN the token refuses suspends logins.
    fn log_in(&self, session: &Session) -> Result<(), LoginError> {
        self.inject(Function::Login).map_err(LoginError::Call)?;
        let pin = self.pin.lock();
        tracing::debug!(token = %self.token, "C_Login");
        let reason = match login_ck(session, &pin) {
            Ok(()) => return Ok(()),
            Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => "token refused the PIN as incorrect",
            Err(CkError::Pkcs11(RvError::PinLocked, _)) => "token's PIN is locked",
            Err(e) => return Err(LoginError::Call(e)),
        };
        *self.login_refused.lock() = Some(reason);
        tracing::error!(
            token = %self.token,
            reason,
            "login suspended: no more login attempts until the PIN changes (HSMs lock a partition after a few failures); correct the PIN and reload the configuration"
        );
        Err(LoginError::Refused(
            self.login_allowed().expect_err("just suspended"),
        ))
    }

    /// The token was lost: find it again before the next call.
    fn lost(&self) {
        self.out.store(true, Ordering::Relaxed);
        self.token_state.lock().slot = None;
    }

    fn is_missing(&self) -> bool {
        self.token_state
            .lock()
            .missing
            .as_ref()
            .is_some_and(|(o, _)| Instant::now() < o.retry_at)
    }
}

/// The PKCS#11 backend; cheap to share behind an `Arc`.
pub struct Pkcs11Backend {
    pool: Pool<Worker>,
    shared: Arc<Shared>,
    info: EkmInfo,
    /// Current version per external key, and when it was read.
    versions: Arc<RwLock<HashMap<String, (u32, Instant)>>>,
    key_refresh: Duration,
}

impl fmt::Debug for Pkcs11Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Backend")
            .field("ekm", &self.info)
            .field("pool", &self.pool)
            .finish()
    }
}

/// Loads the module, finds the token and logs in. Returns the context, the slot and one
/// logged-in session (PKCS#11 login state is per application and token, so every later
/// session of this process is logged in too).
pub fn open_token(
    module: &std::path::Path,
    token: &TokenSelector,
    pin: &str,
) -> Result<(Pkcs11, Slot, Session), HsmError> {
    let pkcs11 = Pkcs11::new(module).map_err(|e| {
        HsmError::Unavailable(format!(
            "cannot load PKCS#11 module {}: {e}",
            module.display()
        ))
    })?;
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(HsmError::Unavailable(format!("C_Initialize failed: {e}"))),
    }
    let slot = find_slot(&pkcs11, token)?;
    let session = pkcs11.open_rw_session(slot).map_err(ck("C_OpenSession"))?;
    login(&session, &AuthPin::new(pin.into()))?;
    Ok((pkcs11, slot, session))
}

fn find_slot(pkcs11: &Pkcs11, token: &TokenSelector) -> Result<Slot, HsmError> {
    let slots = pkcs11.get_slots_with_token().map_err(ck("C_GetSlotList"))?;
    let mut found = Vec::new();
    for slot in slots {
        let Ok(info) = pkcs11.get_token_info(slot) else {
            continue;
        };
        let matches = match token {
            TokenSelector::Label(l) => info.label().trim_end() == l,
            TokenSelector::Serial(s) => info.serial_number().trim_end() == s,
        };
        if matches && info.token_initialized() {
            found.push(slot);
        }
    }
    match found.as_slice() {
        [slot] => Ok(*slot),
        [] => Err(HsmError::Unavailable(format!(
            "no initialized token with {token}"
        ))),
        _ => Err(HsmError::Unavailable(format!(
            "{} tokens match {token}; select by serial instead",
            found.len()
        ))),
    }
}

fn login(session: &Session, pin: &AuthPin) -> Result<(), HsmError> {
    match session.login(UserType::User, Some(pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => {
            Err(HsmError::Unavailable("token PIN is incorrect".into()))
        }
        Err(CkError::Pkcs11(RvError::PinLocked, _)) => {
            Err(HsmError::Unavailable("token PIN is locked".into()))
        }
        Err(e) => Err(HsmError::Unavailable(format!("C_Login failed: {e}"))),
    }
}

/// Maps an unexpected cryptoki error into [`HsmError::Pkcs11`], naming the function.
fn ck(function: &'static str) -> impl Fn(CkError) -> HsmError {
    move |e| match e {
        CkError::Pkcs11(rv, f) => HsmError::Pkcs11 {
            function: format!("{f:?}"),
            rv: format!("{rv:?}"),
        },
        other => HsmError::Pkcs11 {
            function: function.into(),
            rv: other.to_string(),
        },
    }
}

/// Like [`ck`], naming the function by its cryptoki [`Function`].
fn ck_fn(function: Function) -> impl Fn(CkError) -> HsmError {
    move |e| match e {
        CkError::Pkcs11(rv, f) => HsmError::Pkcs11 {
            function: format!("{f:?}"),
            rv: format!("{rv:?}"),
        },
        other => HsmError::Pkcs11 {
            function: format!("{function:?}"),
            rv: other.to_string(),
        },
    }
}

impl Pkcs11Backend {
    /// Connects to the token, logs in and starts the session threads.
    pub fn connect(settings: &Pkcs11Settings, metrics: Arc<Metrics>) -> Result<Self, HsmError> {
        let module = Module::load(&settings.module)?;
        let out = Arc::new(AtomicBool::new(false));
        module.register(&settings.token, &out);
        let shared = Arc::new(Shared {
            module,
            token: settings.token.clone(),
            token_state: parking_lot::Mutex::new(TokenState::default()),
            pin: parking_lot::Mutex::new(AuthPin::new(settings.pin.as_str().into())),
            login_refused: parking_lot::Mutex::new(None),
            keys: RwLock::new(HashMap::new()),
            iv_source: settings.iv_source,
            session_key_copies: settings.session_key_copies,
            key_refresh: settings.key_refresh,
            read_write_sessions: settings.read_write_sessions,
            faults: settings.faults.clone(),
            out,
            retired: parking_lot::Mutex::new(Vec::new()),
            lookup: parking_lot::Mutex::new(()),
            sessions_opened: AtomicU64::new(0),
            known_keys: parking_lot::Mutex::default(),
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
        let token = shared
            .module
            .state
            .read()
            .pkcs11
            .get_token_info(slot)
            .map_err(ck("C_GetTokenInfo"))?;
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
        let pool = Pool::start(
            &PoolSettings {
                name: "pkcs11-session",
                queue_depth: settings.queue_depth,
                call_timeout: settings.call_timeout,
            },
            workers,
            metrics,
        )?;
        Ok(Self {
            pool,
            shared,
            info,
            versions: Arc::new(RwLock::new(HashMap::new())),
            key_refresh: settings.key_refresh,
        })
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

    /// Requests admitted and not finished (queued or running), and how many the pool
    /// takes in all: the EKM's free capacity is the difference.
    pub fn load(&self) -> (usize, usize) {
        self.pool.load()
    }

    /// The key's current version (see [`super::version_label`]), cached for
    /// `key_refresh`, so a rotation is picked up within that time without a restart.
    pub async fn current_version(&self, key_id: &str, deadline: Instant) -> Result<u32, HsmError> {
        if let Some((version, read_at)) = self.versions.read().get(key_id) {
            if read_at.elapsed() < self.key_refresh {
                return Ok(*version);
            }
        }
        let id = key_id.to_owned();
        let version = self
            .pool
            .run_control("KeyVersion", deadline, move |w| {
                w.call(|s| current_version(s, &id), Function::FindObjects)
            })
            .await?;
        self.versions
            .write()
            .insert(key_id.to_owned(), (version, Instant::now()));
        Ok(version)
    }

    /// AES-256-GCM encryption in the HSM.
    pub async fn encrypt(
        &self,
        key_id: &str,
        plaintext: Plaintext,
        aad: Vec<u8>,
        deadline: Instant,
    ) -> Result<Sealed, HsmError> {
        let key_id = key_id.to_owned();
        self.pool
            .run("Encrypt", deadline, move |w| {
                w.encrypt(&key_id, &plaintext, &aad)
            })
            .await
    }

    /// AES-256-GCM decryption in the HSM.
    pub async fn decrypt(
        &self,
        key_id: &str,
        sealed: Sealed,
        aad: Vec<u8>,
        deadline: Instant,
    ) -> Result<Plaintext, HsmError> {
        let key_id = key_id.to_owned();
        self.pool
            .run("Decrypt", deadline, move |w| {
                w.decrypt(&key_id, &sealed, &aad)
            })
            .await
    }

    /// The key's attributes, read fresh from the HSM (GetKeyMetadata is rare and must
    /// reflect the key as it is now).
    pub async fn key_metadata(
        &self,
        key_id: &str,
        deadline: Instant,
    ) -> Result<KeyMetadata, HsmError> {
        let key_id = key_id.to_owned();
        self.pool
            .run_control("GetKeyMetadata", deadline, move |w| {
                w.fresh_metadata(&key_id)
            })
            .await
    }

    /// A deep check in one trip to a session: the key read from the token itself
    /// (session copies and cached handles can go on working for a while after the
    /// token is gone), then an encrypt and decrypt with it.
    pub async fn health_check(&self, key_id: &str, deadline: Instant) -> Result<(), HsmError> {
        let key_id = key_id.to_owned();
        self.pool
            .run_control("HealthCheck", deadline, move |w| {
                w.read_token_key(&key_id)?;
                health_round_trip(
                    w,
                    |w, p| w.encrypt(&key_id, p, b""),
                    |w, s| w.decrypt(&key_id, s, b""),
                )
            })
            .await
    }

    /// A cheap round trip through a session thread and the token (C_GetSessionInfo),
    /// for configurations without a health-check key.
    pub async fn probe(&self, deadline: Instant) -> Result<(), HsmError> {
        self.pool
            .run_control("HealthCheck", deadline, |w| {
                w.call(|s| s.get_session_info(), Function::GetSessionInfo)
                    .map(|_| ())
            })
            .await
    }

    /// The token this backend serves.
    pub fn token(&self) -> &TokenSelector {
        &self.shared.token
    }

    /// Why logins are suspended (the token refused the PIN), if they are.
    pub fn login_suspended(&self) -> Option<&'static str> {
        *self.shared.login_refused.lock()
    }

    /// Takes up the PIN of a reloaded configuration. A different PIN ends a login
    /// suspension; the same one leaves it (the token would refuse it again).
    pub fn update_pin(&self, pin: &str) {
        use secrecy::ExposeSecret as _;
        let mut current = self.shared.pin.lock();
        if current.expose_secret() == pin {
            return;
        }
        *current = AuthPin::new(pin.into());
        if self.shared.login_refused.lock().take().is_some() {
            tracing::info!(token = %self.shared.token, "the PIN changed: logins resume");
        }
    }

    /// Requests waiting for a session.
    pub fn queued(&self) -> usize {
        self.pool.queued()
    }

    /// Facts about the token.
    pub fn ekm_info(&self) -> &EkmInfo {
        &self.info
    }
}

fn non_empty(s: &str, fallback: &str) -> String {
    if s.is_empty() { fallback } else { s }.to_owned()
}

/// Why a login failed.
enum LoginError {
    /// The token refused the PIN; logins are suspended.
    Refused(HsmError),
    /// Any other failure, classified like any call's.
    Call(CkError),
}

/// A session and the module generation it was opened in.
struct OpenSession {
    session: Session,
    generation: u64,
    /// Unique among this EKM's sessions (see [`CachedKey::owner`]).
    serial: u64,
}

/// A session thread's state.
struct Worker {
    shared: Arc<Shared>,
    session: Option<OpenSession>,
    ivs: IvBatch,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.abandon_if_stale();
        if let Some(open) = &self.session {
            self.shared.forget_copies_of(open.serial);
        }
    }
}

/// How a PKCS#11 error is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorClass {
    /// The request's own fault, or a refusal another attempt cannot change: answered
    /// as it is (bad ciphertext → InvalidCiphertextException, others → 500).
    Request,
    /// The key handle is stale: look the key up again and retry.
    StaleHandle,
    /// The session is unusable: open another (and log in) and retry. `close`: the old
    /// handle still exists and must be closed; otherwise it is already gone and its
    /// number may belong to someone else now.
    Session {
        /// Close the old session.
        close: bool,
    },
    /// The token (device) is gone: find it again and rebuild its sessions, after
    /// re-initializing the module unless other tokens of the module still serve.
    Token,
    /// The module lost its initialization: re-initialize it, find the token again,
    /// rebuild every session and retry.
    Module,
}

/// Classifies a PKCS#11 error.
pub(crate) fn classify(error: &CkError) -> ErrorClass {
    let CkError::Pkcs11(rv, _) = error else {
        return ErrorClass::Request;
    };
    match rv {
        RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid => ErrorClass::StaleHandle,
        RvError::SessionHandleInvalid | RvError::SessionClosed => {
            ErrorClass::Session { close: false }
        }
        RvError::UserNotLoggedIn | RvError::OperationActive => ErrorClass::Session { close: true },
        RvError::DeviceRemoved
        | RvError::DeviceError
        | RvError::TokenNotPresent
        | RvError::TokenNotRecognized
        | RvError::SlotIdInvalid => ErrorClass::Token,
        RvError::CryptokiNotInitialized => ErrorClass::Module,
        _ => ErrorClass::Request,
    }
}

/// Why one attempt at a call failed.
enum Failure {
    /// The PKCS#11 call (or opening the session for it) failed, under this module
    /// generation.
    Call(CkError, u64),
    /// No call was made: the module or token is out of service, or login was refused.
    Hsm(HsmError),
}

/// Logs in, accepting a session of an application that is logged in already.
fn login_ck(session: &Session, pin: &AuthPin) -> Result<(), CkError> {
    match session.login(UserType::User, Some(pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(e) => Err(e),
    }
}

impl Worker {
    /// Forgets a session of an older module generation without closing it.
    fn abandon_if_stale(&mut self) {
        if let Some(open) = self.session.take() {
            if open.generation == self.shared.module.generation() {
                self.session = Some(open);
            } else {
                std::mem::forget(open.session);
            }
        }
    }

    /// This thread's session under module generation `generation`, opened and logged
    /// in if needed.
    fn session(&mut self, pkcs11: &Pkcs11, generation: u64) -> Result<&Session, Failure> {
        self.abandon_if_stale();
        if self.session.is_none() {
            // Not even a session while logins are suspended: nothing to do without one.
            self.shared.login_allowed().map_err(Failure::Hsm)?;
            let call = |e| Failure::Call(e, generation);
            let slot = self.shared.slot(pkcs11, generation)?;
            self.shared.inject(Function::OpenSession).map_err(call)?;
            let session = if self.shared.read_write_sessions {
                pkcs11.open_rw_session(slot)
            } else {
                pkcs11.open_ro_session(slot)
            }
            .map_err(call)?;
            self.shared.log_in(&session).map_err(|e| match e {
                LoginError::Refused(e) => Failure::Hsm(e),
                LoginError::Call(e) => call(e),
            })?;
            self.session = Some(OpenSession {
                session,
                generation,
                serial: self.shared.sessions_opened.fetch_add(1, Ordering::Relaxed),
            });
        }
        Ok(&self.session.as_ref().expect("set just above").session)
    }

    /// One attempt at `f` on this thread's session, inside the module's shared guard.
    fn attempt<T>(
        &mut self,
        function: Function,
        f: &mut impl FnMut(&Session) -> Result<T, CkError>,
    ) -> Result<T, Failure> {
        let module = Arc::clone(&self.shared.module);
        let guard = module
            .enter(self.shared.faults.as_deref())
            .map_err(Failure::Hsm)?;
        let generation = module.generation();
        self.shared
            .inject(function)
            .map_err(|e| Failure::Call(e, generation))?;
        let session = self.session(&guard.pkcs11, generation)?;
        let result = f(session).map_err(|e| Failure::Call(e, generation));
        if result.is_ok() {
            module.served();
            if self.shared.out.load(Ordering::Relaxed) {
                self.shared.out.store(false, Ordering::Relaxed);
            }
        }
        result
    }

    /// Recovers from a failed call as its class requires. True when another attempt
    /// makes sense.
    fn recover(
        &mut self,
        error: &CkError,
        generation: u64,
        key_id: Option<&str>,
    ) -> Result<bool, HsmError> {
        match classify(error) {
            ErrorClass::Request => Ok(false),
            ErrorClass::StaleHandle => match key_id {
                Some(key_id) => {
                    tracing::info!(key_id, "stale key handle; looking the key up again");
                    self.forget(key_id);
                    Ok(true)
                }
                None => Ok(false),
            },
            ErrorClass::Session { close } => {
                tracing::warn!(error = %error, "PKCS#11 session lost; reopening");
                if let Some(open) = self.session.take() {
                    // Closed or lost, the session takes its objects with it.
                    self.shared.forget_copies_of(open.serial);
                    if !close || open.generation != generation {
                        std::mem::forget(open.session);
                    }
                }
                Ok(true)
            }
            ErrorClass::Token | ErrorClass::Module => {
                self.abandon_if_stale();
                if let Some(open) = self.session.take() {
                    std::mem::forget(open.session);
                }
                self.shared.lost();
                if classify(error) == ErrorClass::Token
                    && self.shared.module.others_serving(&self.shared.token)
                {
                    tracing::warn!(token = %self.shared.token, error = %error, "token lost; looking for it again");
                    return Ok(true);
                }
                self.shared.module.reinitialize(
                    generation,
                    &error.to_string(),
                    self.shared.faults.as_deref(),
                )?;
                Ok(true)
            }
        }
    }

    /// Runs a session call, recovering once from a lost session or module.
    fn call<T>(
        &mut self,
        mut f: impl FnMut(&Session) -> Result<T, CkError>,
        function: Function,
    ) -> Result<T, HsmError> {
        let mut retried = false;
        loop {
            match self.attempt(function, &mut f) {
                Ok(value) => return Ok(value),
                Err(Failure::Hsm(e)) => return Err(e),
                Err(Failure::Call(e, generation)) => {
                    if retried || !self.recover(&e, generation, None)? {
                        return Err(ck_fn(function)(e));
                    }
                }
            }
            retried = true;
        }
    }

    /// The next IV from the HSM's RNG, drawing a new batch when this one is used up.
    fn hsm_random_iv(&mut self) -> Result<[u8; IV_LEN], HsmError> {
        if let Some(iv) = self.ivs.take() {
            return iv;
        }
        let mut bytes = self.ivs.take_buffer();
        match self.call(
            |s| s.generate_random_slice(&mut bytes),
            Function::GenerateRandom,
        ) {
            Ok(()) => self.ivs.filled(bytes),
            Err(e) => {
                self.ivs.put_back_unfilled(bytes);
                return Err(e);
            }
        }
        self.ivs.take().unwrap_or(Err(HsmError::Inconsistent(
            "an IV batch was empty when filled",
        )))
    }

    fn forget(&mut self, key_id: &str) {
        let old = self.shared.keys.write().remove(key_id);
        self.discard(old);
    }

    /// Retires a replaced session copy of a key. Another session may be using it right
    /// now (SoftHSM2 then fails the call with CKR_KEY_TYPE_INCONSISTENT, not an invalid
    /// handle), so it is destroyed only after [`RETIRE_GRACE`], longer than any call.
    fn discard(&mut self, old: Option<CachedKey>) {
        let Some(old) = old.filter(|k| k.owner.is_some()) else {
            return;
        };
        let due: Vec<_> = {
            let mut retired = self.shared.retired.lock();
            retired.push((old.handle, old.generation, Instant::now()));
            let (due, keep) = retired
                .drain(..)
                .partition(|(_, _, at)| at.elapsed() >= RETIRE_GRACE);
            *retired = keep;
            due
        };
        if due.is_empty() {
            return;
        }
        let module = Arc::clone(&self.shared.module);
        let Ok(guard) = module.enter(None) else {
            return;
        };
        let generation = module.generation();
        let Some(open) = self.session.as_ref().filter(|o| o.generation == generation) else {
            return;
        };
        // Handles of an older generation may be someone else's now: never destroy them.
        for (handle, _, _) in due.into_iter().filter(|(_, g, _)| *g == generation) {
            if let Err(e) = open.session.destroy_object(handle) {
                tracing::debug!(error = %e, "could not destroy a session copy of a key");
            }
        }
        drop(guard);
    }

    /// The key's handle and attributes, from the cache when fresh.
    fn key(&mut self, key_id: &str) -> Result<CachedKey, HsmError> {
        let stale = match self.cached_entry(key_id) {
            Some((key, Age::Fresh)) => return Ok(key),
            Some((key, Age::Stale)) => Some(key),
            None => None,
        };
        // One lookup at a time per token: the sessions that missed together wait for
        // the first one's result instead of each copying the key. (SoftHSM2 also lets a
        // search for token objects see a copy being made, whose CKA_TOKEN is still the
        // original's, as a second key with the label.)
        let shared = Arc::clone(&self.shared);
        let _lookup = match stale {
            // While one session re-reads a key that is due for it (a millisecond and
            // more on SoftHSM2), the others go on with the entry they have instead of
            // queueing behind the lookup. The replaced copy outlives them
            // (RETIRE_GRACE).
            Some(key) => match shared.lookup.try_lock() {
                Some(guard) => guard,
                None => return Ok(key),
            },
            None => shared.lookup.lock(),
        };
        if let Some(key) = self.cached(key_id) {
            return Ok(key);
        }
        let found = self.find_key(key_id);
        if found.is_err() {
            self.forget(key_id);
        }
        let key = found?;
        let old = self
            .shared
            .keys
            .write()
            .insert(key_id.to_owned(), key.clone());
        self.discard(old);
        Ok(key)
    }

    fn cached(&self, key_id: &str) -> Option<CachedKey> {
        match self.cached_entry(key_id) {
            Some((key, Age::Fresh)) => Some(key),
            _ => None,
        }
    }

    /// The cached entry of the module's current generation, and whether it is due to be
    /// re-read. An entry more than twice `key_refresh` old is not used at all.
    fn cached_entry(&self, key_id: &str) -> Option<(CachedKey, Age)> {
        let keys = self.shared.keys.read();
        let key = keys
            .get(key_id)
            .filter(|key| key.generation == self.shared.module.generation())?;
        let age = key.read_at.elapsed();
        let refresh = self.shared.key_refresh;
        if age < refresh {
            Some((key.clone(), Age::Fresh))
        } else if age < refresh.saturating_mul(2) {
            Some((key.clone(), Age::Stale))
        } else {
            None
        }
    }

    /// The key's token object and its metadata as the token holds them now.
    ///
    /// A key this process has found before and that is missing now is an EKM fault
    /// until proven otherwise: KMS takes KeyNotFound as permanent for the key. If the
    /// token shows no objects at all, it is not the token it was (SoftHSM2 whose token
    /// directory went away, an HSM partition swapped under a running module): the
    /// lookup fails as a lost token, and the token class's recovery (re-initialize,
    /// find the token again, back off) takes over. A key gone from a token that still
    /// holds others is gone: KeyNotFound.
    fn read_token_key(&mut self, key_id: &str) -> Result<(ObjectHandle, KeyMetadata), HsmError> {
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Token(true),
            Attribute::Label(key_id.as_bytes().to_vec()),
        ];
        let seen_before = self.shared.known_keys.lock().contains(key_id);
        let token = self.shared.token.clone();
        let handles = self.call(
            |s| {
                let handles = s.find_objects(&template)?;
                if handles.is_empty() && seen_before && token_is_empty(s)? {
                    tracing::error!(key_id, %token, "a key found before is missing and the token shows no objects: treating the token as lost");
                    return Err(CkError::Pkcs11(
                        RvError::TokenNotRecognized,
                        Function::FindObjects,
                    ));
                }
                Ok(handles)
            },
            Function::FindObjects,
        )?;
        let handle = match handles.as_slice() {
            [handle] => *handle,
            [] => return Err(HsmError::KeyNotFound),
            _ => return Err(HsmError::AmbiguousKey),
        };
        if !seen_before {
            self.shared.known_keys.lock().insert(key_id.to_owned());
        }
        let attributes = self.call(
            |s| s.get_attributes(handle, &KEY_ATTRIBUTES),
            Function::GetAttributeValue,
        )?;
        // Disabling applies to the external key, every version of it.
        let disabled = self.call(
            |s| is_disabled(s, super::base_key_id(key_id)),
            Function::FindObjects,
        )?;
        Ok((handle, metadata_from_attributes(&attributes, disabled)))
    }

    /// The key's metadata read fresh from the token (GetKeyMetadata must reflect the key
    /// as it is now), without a new session copy: GetKeyMetadata may come often, and
    /// each copy is an object the module keeps until [`RETIRE_GRACE`] is over (on
    /// SoftHSM2, every search then walks them all). The cached entry stays while it
    /// still matches the token; a key replaced or changed is re-read at its next use.
    fn fresh_metadata(&mut self, key_id: &str) -> Result<KeyMetadata, HsmError> {
        // Under the lookup lock, like [`Self::key`]: a search while another session
        // copies the key can see the copy as a second key with the label.
        let shared = Arc::clone(&self.shared);
        let _lookup = shared.lookup.lock();
        let generation = self.shared.module.generation();
        let (source, metadata) = match self.read_token_key(key_id) {
            Ok(read) => read,
            Err(e) => {
                if e == HsmError::KeyNotFound {
                    self.forget(key_id);
                }
                return Err(e);
            }
        };
        let stale = {
            let mut keys = self.shared.keys.write();
            let matches = keys.get(key_id).is_some_and(|k| {
                k.source == source && k.generation == generation && k.metadata == metadata
            });
            if matches {
                None
            } else {
                keys.remove(key_id)
            }
        };
        self.discard(stale);
        Ok(metadata)
    }

    fn find_key(&mut self, key_id: &str) -> Result<CachedKey, HsmError> {
        let generation = self.shared.module.generation();
        let (handle, metadata) = self.read_token_key(key_id)?;
        let source = handle;
        // A session copy spares modules that re-check token objects on every use
        // (SoftHSM2 stats and locks the object's file in each C_EncryptInit). The copy
        // carries the same attributes; a module that refuses to copy keeps the original.
        let (handle, owner) = if self.shared.session_key_copies {
            match self.call(
                |s| s.copy_object(handle, &[Attribute::Token(false)]),
                Function::CopyObject,
            ) {
                // The call succeeded in the session this worker holds now.
                Ok(copy) => (copy, self.session.as_ref().map(|open| open.serial)),
                Err(e) => {
                    tracing::warn!(key_id, error = %e, "cannot copy the key into the session; using the token object");
                    (handle, None)
                }
            }
        } else {
            (handle, None)
        };
        if self.shared.module.generation() != generation {
            // The module was re-initialized between our calls: the handles are dead.
            return Err(HsmError::Unavailable(
                "PKCS#11 module re-initialized during key lookup".into(),
            ));
        }
        Ok(CachedKey {
            handle,
            source,
            owner,
            metadata,
            read_at: Instant::now(),
            generation,
        })
    }

    /// Runs a cryptographic call on a key, recovering once from a stale handle, a lost
    /// session or a lost module. `map` turns call errors into client-meaningful
    /// [`HsmError`]s.
    fn with_key<T>(
        &mut self,
        key_id: &str,
        operation: Operation,
        function: Function,
        mut f: impl FnMut(&Session, ObjectHandle) -> Result<T, CkError>,
        map: impl Fn(CkError) -> HsmError,
    ) -> Result<T, HsmError> {
        let mut retried = false;
        loop {
            let key = self.key(key_id)?;
            key.metadata.check(operation)?;
            if key.generation != self.shared.module.generation() {
                retried = true;
                continue;
            }
            match self.attempt(function, &mut |s| f(s, key.handle)) {
                Ok(value) => return Ok(value),
                Err(Failure::Hsm(e)) => return Err(e),
                Err(Failure::Call(e, generation)) => {
                    if retried || !self.recover(&e, generation, Some(key_id))? {
                        return Err(map(e));
                    }
                }
            }
            retried = true;
        }
    }

    fn encrypt(&mut self, key_id: &str, plaintext: &[u8], aad: &[u8]) -> Result<Sealed, HsmError> {
        let iv_source = self.shared.iv_source;
        let iv: Vec<u8> = match iv_source {
            IvSource::HsmRandom => self.hsm_random_iv()?.to_vec(),
            IvSource::ProxyRandom => {
                let mut iv = vec![0u8; IV_LEN];
                aws_lc_rs::rand::fill(&mut iv)
                    .map_err(|_| HsmError::Inconsistent("the proxy's DRBG failed"))?;
                iv
            }
            IvSource::HsmGenerated => vec![0u8; IV_LEN],
            IvSource::HsmAppended => Vec::new(),
        };
        let vendor = self.shared.faults.as_ref().and_then(|f| f.vendor_iv());
        let (output, iv) = self.with_key(
            key_id,
            Operation::Encrypt,
            Function::Encrypt,
            |session, handle| {
                // Every attempt starts from the IV we chose (or the empty buffer).
                let mut iv = iv.clone();
                let output = match vendor {
                    Some(vendor) => {
                        emulate_vendor_iv(vendor, session, handle, &mut iv, aad, plaintext)?
                    }
                    None => {
                        let params = GcmParams::new(&mut iv, aad, (TAG_LEN as u64 * 8).into())?;
                        session.encrypt(&Mechanism::AesGcm(params), handle, plaintext)?
                    }
                };
                Ok((output, iv))
            },
            |e| map_crypto_error(e, Operation::Encrypt),
        )?;
        split_gcm_output(iv_source, plaintext.len(), output, iv)
    }

    fn decrypt(
        &mut self,
        key_id: &str,
        sealed: &Sealed,
        aad: &[u8],
    ) -> Result<Plaintext, HsmError> {
        let mut input = Vec::with_capacity(sealed.ciphertext.len() + TAG_LEN);
        input.extend_from_slice(&sealed.ciphertext);
        input.extend_from_slice(&sealed.tag);
        let plaintext = self.with_key(
            key_id,
            Operation::Decrypt,
            Function::Decrypt,
            |session, handle| {
                let mut iv = sealed.iv.clone();
                let params = GcmParams::new(&mut iv, aad, (TAG_LEN as u64 * 8).into())?;
                match session.decrypt(&Mechanism::AesGcm(params), handle, &input) {
                    // SoftHSM2 reports a GCM tag mismatch as CKR_GENERAL_ERROR. If the
                    // session still answers, the HSM is fine and the input was at fault.
                    Err(CkError::Pkcs11(RvError::GeneralError | RvError::FunctionFailed, f))
                        if session.get_session_info().is_ok() =>
                    {
                        Err(CkError::Pkcs11(RvError::EncryptedDataInvalid, f))
                    }
                    other => other.map(Zeroizing::new),
                }
            },
            |e| map_crypto_error(e, Operation::Decrypt),
        )?;
        if plaintext.len() != sealed.ciphertext.len() {
            return Err(HsmError::Inconsistent(
                "AES-GCM plaintext has the wrong length",
            ));
        }
        Ok(plaintext)
    }
}

/// Separates what C_Encrypt returned into IV, ciphertext and tag, as the spec wants
/// them, for each way an HSM may hand back the IV. `iv` is the IV buffer after the call.
pub(crate) fn split_gcm_output(
    iv_source: IvSource,
    plaintext_len: usize,
    mut output: Vec<u8>,
    iv: Vec<u8>,
) -> Result<Sealed, HsmError> {
    let (iv, expected) = match iv_source {
        IvSource::HsmRandom | IvSource::ProxyRandom | IvSource::HsmGenerated => {
            (iv, plaintext_len + TAG_LEN)
        }
        IvSource::HsmAppended => {
            let expected = plaintext_len + TAG_LEN + APPENDED_IV_LEN;
            if output.len() != expected {
                return Err(HsmError::Inconsistent(
                    "AES-GCM output is not ciphertext, tag and a 16-byte IV",
                ));
            }
            let iv = output.split_off(plaintext_len + TAG_LEN);
            (iv, plaintext_len + TAG_LEN)
        }
    };
    if iv.len() != IV_LEN && iv.len() != APPENDED_IV_LEN {
        return Err(HsmError::Inconsistent("GCM IV is neither 12 nor 16 bytes"));
    }
    if iv.iter().all(|b| *b == 0) {
        // A zero IV means the HSM did not fill it in (or the RNG returned zeros):
        // refuse to hand out a ciphertext whose IV may repeat.
        return Err(HsmError::Inconsistent("HSM returned an all-zero GCM IV"));
    }
    if output.len() != expected {
        return Err(HsmError::Inconsistent(
            "AES-GCM output has the wrong length",
        ));
    }
    // The module appends the tag to the ciphertext; the spec wants them apart.
    let tag: [u8; TAG_LEN] = output[plaintext_len..]
        .try_into()
        .expect("length checked just above");
    output.truncate(plaintext_len);
    Ok(Sealed {
        iv,
        ciphertext: output,
        tag,
    })
}

/// What an HSM that picks its own GCM IV does, done with SoftHSM2 underneath (see
/// [`VendorIv`]). Refuses an IV buffer such an HSM would refuse, so the proxy's side
/// of each convention is checked too.
fn emulate_vendor_iv(
    vendor: VendorIv,
    session: &Session,
    handle: ObjectHandle,
    iv: &mut [u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, CkError> {
    let refuse = || CkError::Pkcs11(RvError::MechanismParamInvalid, Function::EncryptInit);
    let tag_bits = (TAG_LEN as u64 * 8).into();
    match vendor {
        VendorIv::FillsZeroedBuffer => {
            if iv.len() != IV_LEN || iv.iter().any(|b| *b != 0) {
                return Err(refuse());
            }
            session.generate_random_slice(iv)?;
            let params = GcmParams::new(iv, aad, tag_bits)?;
            session.encrypt(&Mechanism::AesGcm(params), handle, plaintext)
        }
        VendorIv::AppendsAfterTag => {
            if !iv.is_empty() {
                return Err(refuse());
            }
            let mut own = [0u8; APPENDED_IV_LEN];
            session.generate_random_slice(&mut own)?;
            let mut chosen = own;
            let params = GcmParams::new(&mut chosen, aad, tag_bits)?;
            let mut output = session.encrypt(&Mechanism::AesGcm(params), handle, plaintext)?;
            output.extend_from_slice(&own);
            Ok(output)
        }
    }
}

/// Errors of C_Encrypt/C_Decrypt that are the request's fault, not the HSM's.
fn map_crypto_error(error: CkError, operation: Operation) -> HsmError {
    match (&error, operation) {
        (
            CkError::Pkcs11(
                RvError::EncryptedDataInvalid
                | RvError::EncryptedDataLenRange
                | RvError::MechanismParamInvalid
                | RvError::DataInvalid,
                _,
            ),
            Operation::Decrypt,
        ) => HsmError::InvalidCiphertext,
        (CkError::Pkcs11(RvError::KeyFunctionNotPermitted, _), op) => {
            HsmError::UsageNotPermitted(op)
        }
        (CkError::Pkcs11(RvError::KeyTypeInconsistent, _), _) => HsmError::NotAes256,
        _ => ck("C_EncryptOrDecrypt")(error),
    }
}

/// The attributes GetKeyMetadata and the usage checks need.
const KEY_ATTRIBUTES: [AttributeType; 9] = [
    AttributeType::KeyType,
    AttributeType::ValueLen,
    AttributeType::Encrypt,
    AttributeType::Decrypt,
    AttributeType::Sign,
    AttributeType::Verify,
    AttributeType::Wrap,
    AttributeType::Unwrap,
    AttributeType::Derive,
];

/// CKA_APPLICATION of the data objects that mark keys disabled.
pub const DISABLED_MARKER_APPLICATION: &str = "xks-proxy/disabled";

/// Builds [`KeyMetadata`] from a key's attributes and whether a disabled marker exists.
///
/// PKCS#11 has no "disabled" attribute. Its validity dates (CKA_START_DATE/END_DATE)
/// would be the natural choice, but SoftHSM2 cannot read them back from private keys
/// once set (it stores them unencrypted and then tries to decrypt them). So a key is
/// DISABLED while the token holds a data object (CKO_DATA) whose CKA_APPLICATION is
/// [`DISABLED_MARKER_APPLICATION`] and whose CKA_LABEL is the external key id:
/// `xks-proxy keys disable` creates it, `enable` destroys it, and any PKCS#11 tool can.
fn metadata_from_attributes(attributes: &[Attribute], disabled: bool) -> KeyMetadata {
    let mut key_type = None;
    let mut value_len = None;
    let mut usages = Vec::new();
    for attribute in attributes {
        match attribute {
            Attribute::KeyType(t) => key_type = Some(*t),
            Attribute::ValueLen(len) => value_len = Some(u64::from(*len)),
            Attribute::Encrypt(true) => usages.push(KeyUsage::Encrypt),
            Attribute::Decrypt(true) => usages.push(KeyUsage::Decrypt),
            Attribute::Sign(true) => usages.push(KeyUsage::Sign),
            Attribute::Verify(true) => usages.push(KeyUsage::Verify),
            Attribute::Wrap(true) => usages.push(KeyUsage::Wrap),
            Attribute::Unwrap(true) => usages.push(KeyUsage::Unwrap),
            Attribute::Derive(true) => usages.push(KeyUsage::Derive),
            _ => {}
        }
    }
    let key_spec = match (key_type, value_len) {
        (Some(KeyType::AES), Some(len)) => format!("AES_{}", len * 8),
        (Some(t), _) => format!("{t}").to_uppercase().replace(' ', "_"),
        (None, _) => "UNKNOWN".into(),
    };
    KeyMetadata {
        key_spec,
        usages,
        enabled: !disabled,
    }
}

fn marker_template(key_id: &str) -> [Attribute; 3] {
    [
        Attribute::Class(ObjectClass::DATA),
        Attribute::Application(DISABLED_MARKER_APPLICATION.as_bytes().to_vec()),
        Attribute::Label(key_id.as_bytes().to_vec()),
    ]
}

/// Whether the token shows no token objects at all: not one key, not one marker.
fn token_is_empty(session: &Session) -> Result<bool, CkError> {
    Ok(session.find_objects(&[Attribute::Token(true)])?.is_empty())
}

/// Whether the key's disabled marker exists (see [`metadata_from_attributes`]).
fn is_disabled(session: &Session, key_id: &str) -> Result<bool, CkError> {
    session
        .find_objects(&marker_template(key_id))
        .map(|found| !found.is_empty())
}

/// The external key's current version: the highest N such that every version label
/// 2..=N exists (1 when none does).
pub fn current_version(session: &Session, key_id: &str) -> Result<u32, CkError> {
    let mut version = 1;
    loop {
        let label = super::version_label(key_id, version + 1);
        let found = session.find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ])?;
        if found.is_empty() {
            return Ok(version);
        }
        version += 1;
    }
}

/// Rotates an external key: creates version N+1 with the current version's usages,
/// which makes it current. Returns the new version.
pub fn rotate_key(session: &Session, key_id: &str) -> Result<u32, HsmError> {
    let current = current_version(session, key_id).map_err(ck("C_FindObjects"))?;
    let label = super::version_label(key_id, current);
    let handle = match session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .map_err(ck("C_FindObjects"))?
        .as_slice()
    {
        [handle] => *handle,
        [] => return Err(HsmError::KeyNotFound),
        _ => return Err(HsmError::AmbiguousKey),
    };
    let metadata = metadata_from_attributes(
        &session
            .get_attributes(handle, &KEY_ATTRIBUTES)
            .map_err(ck("C_GetAttributeValue"))?,
        false,
    );
    let usage = NewKeyUsage {
        encrypt: metadata.usages.contains(&KeyUsage::Encrypt),
        decrypt: metadata.usages.contains(&KeyUsage::Decrypt),
    };
    let next = current + 1;
    create_key(session, &super::version_label(key_id, next), usage)?;
    Ok(next)
}

/// Usages a key created by `xks-proxy keys create` gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewKeyUsage {
    /// CKA_ENCRYPT.
    pub encrypt: bool,
    /// CKA_DECRYPT.
    pub decrypt: bool,
}

/// Creates an AES-256 key labelled with the external key id: a token object, private,
/// sensitive and never extractable. Fails if a key with that label exists.
pub fn create_key(session: &Session, key_id: &str, usage: NewKeyUsage) -> Result<(), HsmError> {
    let existing = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(key_id.as_bytes().to_vec()),
        ])
        .map_err(ck("C_FindObjects"))?;
    if !existing.is_empty() {
        return Err(HsmError::AmbiguousKey);
    }
    let template = [
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Modifiable(true),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Label(key_id.as_bytes().to_vec()),
        Attribute::Id(key_id.as_bytes().to_vec()),
        Attribute::Encrypt(usage.encrypt),
        Attribute::Decrypt(usage.decrypt),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
    ];
    session
        .generate_key(&Mechanism::AesKeyGen, &template)
        .map_err(ck("C_GenerateKey"))?;
    Ok(())
}

/// Destroys the key labelled `key_id` and its disabled marker.
pub fn destroy_key(session: &Session, key_id: &str) -> Result<(), HsmError> {
    let keys = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(key_id.as_bytes().to_vec()),
        ])
        .map_err(ck("C_FindObjects"))?;
    match keys.as_slice() {
        [key] => session
            .destroy_object(*key)
            .map_err(ck("C_DestroyObject"))?,
        [] => return Err(HsmError::KeyNotFound),
        _ => return Err(HsmError::AmbiguousKey),
    }
    for marker in session
        .find_objects(&marker_template(key_id))
        .map_err(ck("C_FindObjects"))?
    {
        session
            .destroy_object(marker)
            .map_err(ck("C_DestroyObject"))?;
    }
    Ok(())
}

/// Lists secret keys on the token by label with their metadata.
pub fn list_keys(session: &Session) -> Result<Vec<(String, KeyMetadata)>, HsmError> {
    let handles = session
        .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])
        .map_err(ck("C_FindObjects"))?;
    let mut keys = Vec::with_capacity(handles.len());
    for handle in handles {
        let label = session
            .get_attributes(handle, &[AttributeType::Label])
            .map_err(ck("C_GetAttributeValue"))?
            .into_iter()
            .find_map(|a| match a {
                Attribute::Label(l) => Some(String::from_utf8_lossy(&l).into_owned()),
                _ => None,
            })
            .unwrap_or_default();
        let attributes = session
            .get_attributes(handle, &KEY_ATTRIBUTES)
            .map_err(ck("C_GetAttributeValue"))?;
        let disabled = is_disabled(session, &label).map_err(ck("C_FindObjects"))?;
        keys.push((label, metadata_from_attributes(&attributes, disabled)));
    }
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(keys)
}

/// Enables or disables a key by destroying or creating its disabled marker (see
/// [`metadata_from_attributes`]). Idempotent.
pub fn set_key_enabled(session: &Session, key_id: &str, enabled: bool) -> Result<(), HsmError> {
    let keys = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(key_id.as_bytes().to_vec()),
        ])
        .map_err(ck("C_FindObjects"))?;
    if keys.is_empty() {
        return Err(HsmError::KeyNotFound);
    }
    let markers = session
        .find_objects(&marker_template(key_id))
        .map_err(ck("C_FindObjects"))?;
    if enabled {
        for marker in markers {
            session
                .destroy_object(marker)
                .map_err(ck("C_DestroyObject"))?;
        }
    } else if markers.is_empty() {
        let mut template = marker_template(key_id).to_vec();
        template.extend([
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Value(b"DISABLED".to_vec()),
        ]);
        session
            .create_object(&template)
            .map_err(ck("C_CreateObject"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_reports_usages_spec_and_status() {
        let attrs = vec![
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Encrypt(true),
            Attribute::Decrypt(false),
            Attribute::Wrap(true),
        ];
        let m = metadata_from_attributes(&attrs, false);
        assert_eq!(m.key_spec, "AES_256");
        assert_eq!(m.usages, vec![KeyUsage::Encrypt, KeyUsage::Wrap]);
        assert!(m.enabled);
        let m = metadata_from_attributes(&attrs, true);
        assert!(!m.enabled);
        assert_eq!(m.check(Operation::Encrypt), Err(HsmError::KeyDisabled));
    }

    #[test]
    fn aes_128_is_not_aes_256() {
        let attrs = [
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(16.into()),
            Attribute::Encrypt(true),
        ];
        let m = metadata_from_attributes(&attrs, false);
        assert_eq!(m.key_spec, "AES_128");
        assert_eq!(m.check(Operation::Encrypt), Err(HsmError::NotAes256));
    }

    /// A batch filled with these bytes: IV `i` is twelve bytes of `i + 1`.
    fn numbered_batch() -> IvBatch {
        let mut batch = IvBatch::new();
        let mut bytes = batch.take_buffer();
        for (i, iv) in bytes.chunks_mut(IV_LEN).enumerate() {
            iv.fill(i as u8 + 1);
        }
        batch.filled(bytes);
        batch
    }

    #[test]
    fn a_new_iv_batch_is_empty() {
        assert!(IvBatch::new().take().is_none());
    }

    #[test]
    fn an_iv_batch_hands_out_each_iv_once_in_order_then_runs_dry() {
        let mut batch = numbered_batch();
        for i in 0..IV_BATCH {
            let iv = batch.take().unwrap().unwrap();
            assert_eq!(iv, [i as u8 + 1; IV_LEN]);
        }
        assert!(batch.take().is_none());
        // What left the batch is gone from it.
        assert!(batch.bytes.iter().all(|b| *b == 0));
    }

    #[test]
    fn an_all_zero_iv_is_refused_and_the_next_one_served() {
        let mut batch = numbered_batch();
        batch.bytes[..IV_LEN].fill(0);
        assert!(matches!(batch.take(), Some(Err(HsmError::Inconsistent(_)))));
        assert_eq!(batch.take().unwrap().unwrap(), [2; IV_LEN]);
    }

    #[test]
    fn a_failed_refill_leaves_the_batch_empty() {
        let mut batch = numbered_batch();
        batch.take().unwrap().unwrap();
        let mut bytes = batch.take_buffer();
        bytes[..5].fill(7); // partly written before the call failed
        batch.put_back_unfilled(bytes);
        assert!(batch.take().is_none());
        assert_eq!(batch.bytes.len(), IV_LEN * IV_BATCH);
    }
}
