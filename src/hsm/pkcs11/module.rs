//! The module's lifecycle and the token's place in it: loading a library once per
//! process, the tolerant C_Initialize, re-initialization by generation, finding a token
//! by label or serial, and logging in.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use parking_lot::{RwLock, RwLockReadGuard};

use super::{errors::*, settings::*, trace};
use crate::hsm::faults::FaultInjector;
use crate::hsm::HsmError;

/// Shortest and longest wait between attempts to bring a failed module or a missing
/// token back. Doubling from the shortest, an HSM that returns is in service again
/// within a few seconds, and one that stays away costs one attempt every few seconds.
pub(super) const RETRY_MIN: Duration = Duration::from_millis(100);

pub(super) const RETRY_MAX: Duration = Duration::from_secs(4);

/// Why a module or token is out of service, and when to try again.
#[derive(Debug, Clone)]
pub(super) struct Outage {
    pub(super) reason: String,
    pub(super) retry_at: Instant,
    /// The wait before `retry_at`; the next one is twice as long.
    pub(super) backoff: Duration,
}

impl Outage {
    pub(super) fn after(previous: Option<&Self>, reason: String) -> Self {
        let backoff = previous.map_or(RETRY_MIN, |o| (o.backoff * 2).min(RETRY_MAX));
        Self {
            reason,
            retry_at: Instant::now() + backoff,
            backoff,
        }
    }

    pub(super) fn error(&self, what: &str) -> HsmError {
        let wait = self.retry_at.saturating_duration_since(Instant::now());
        HsmError::Unavailable(format!(
            "{what} is out of service ({}); next attempt in {} ms",
            self.reason,
            wait.as_millis()
        ))
    }
}

/// A PKCS#11 module as loaded in this process.
///
/// C_Initialize is per process and module, not per token, so every EKM on the same
/// module shares one `Module`, and re-initializing it after a module-level error
/// (C_Finalize, C_Initialize) affects all of them: their sessions, slot ids and object
/// handles belong to the old *generation*. Handle numbers are reused after
/// re-initialization, so a stale session or object is forgotten, never closed or
/// destroyed (that could hit a new one with the same number).
pub(crate) struct Module {
    pub(super) path: PathBuf,
    pub(super) generation: AtomicU64,
    /// Re-initializations since the module last served a call; paces them.
    pub(super) failures: AtomicU32,
    /// Held shared by every PKCS#11 call and exclusively by re-initialization, which
    /// must not finalize the module under a running call.
    pub(super) state: RwLock<ModuleState>,
    /// The tokens (EKMs) using the module, each with its "out of service" flag.
    pub(super) tokens: parking_lot::Mutex<Vec<(TokenSelector, std::sync::Weak<AtomicBool>)>>,
}

pub(super) struct ModuleState {
    pub(super) pkcs11: Pkcs11,
    /// When it was last re-initialized.
    pub(super) last_init: Option<Instant>,
    /// Set while the module cannot be initialized: calls fail fast until `retry_at`.
    pub(super) down: Option<Outage>,
}

/// The modules loaded so far, by path: one `Module` per library for the whole process.
pub(super) static MODULES: parking_lot::Mutex<Vec<std::sync::Weak<Module>>> =
    parking_lot::Mutex::new(Vec::new());

/// C_Initialize that accepts a module this process initialized already (another EKM,
/// or the quickstart before the proxy starts).
pub(crate) fn initialize(pkcs11: &Pkcs11) -> Result<(), CkError> {
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(e) => Err(e),
    }
}

impl Module {
    /// The module at `path`, loaded and initialized once per process.
    pub(super) fn load(path: &std::path::Path) -> Result<Arc<Self>, HsmError> {
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
        trace::traced(
            Function::Initialize,
            trace::On::Module(&path.display()),
            || initialize(&pkcs11),
        )
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

    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Registers a token that uses the module; `out` says when it is out of service.
    pub(super) fn register(&self, token: &TokenSelector, out: &Arc<AtomicBool>) {
        let mut tokens = self.tokens.lock();
        tokens.retain(|(_, flag)| flag.strong_count() > 0);
        tokens.push((token.clone(), Arc::downgrade(out)));
    }

    /// Whether another token on this module serves right now. Re-initializing the
    /// module would cut it off, so a lost token is then looked for again without.
    pub(super) fn others_serving(&self, mine: &TokenSelector) -> bool {
        self.tokens.lock().iter().any(|(token, out)| {
            token != mine
                && out
                    .upgrade()
                    .is_some_and(|out| !out.load(Ordering::Relaxed))
        })
    }

    /// Whether the module is out of service right now.
    pub(super) fn is_down(&self) -> bool {
        self.state
            .read()
            .down
            .as_ref()
            .is_some_and(|o| Instant::now() < o.retry_at)
    }

    /// Admission for a PKCS#11 call: the shared guard, or a fast error while the module
    /// is down. When the next attempt is due, this call makes it.
    pub(super) fn enter(
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
    pub(super) fn served(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// Finalizes and initializes the module again, unless that already happened since
    /// generation `seen`. Re-initializations that do not bring the module back are
    /// spaced by a doubling backoff; between them the module is down and calls fail
    /// fast.
    pub(super) fn reinitialize(
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
        let _ = trace::traced(
            Function::Finalize,
            trace::On::Module(&self.path.display()),
            || state.pkcs11.clone().finalize(),
        );
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.failures.fetch_add(1, Ordering::Relaxed);
        state.last_init = Some(now);
        let result = faults
            .map_or(Ok(()), |f| f.before(Function::Initialize))
            .and_then(|()| {
                trace::traced(
                    Function::Initialize,
                    trace::On::Module(&self.path.display()),
                    || initialize(&state.pkcs11),
                )
            });
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
pub(super) struct TokenState {
    pub(super) slot: Option<(Slot, u64)>,
    /// Set while the token cannot be found; `u64` is the generation it was missed in.
    pub(super) missing: Option<(Outage, u64)>,
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
    let session = pkcs11
        .open_rw_session(slot)
        .map_err(unexpected(Function::OpenSession))?;
    login(&session, &AuthPin::new(pin.into()))?;
    Ok((pkcs11, slot, session))
}

pub(super) fn find_slot(pkcs11: &Pkcs11, token: &TokenSelector) -> Result<Slot, HsmError> {
    let slots = pkcs11
        .get_slots_with_token()
        .map_err(unexpected(Function::GetSlotList))?;
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

pub(super) fn login(session: &Session, pin: &AuthPin) -> Result<(), HsmError> {
    login_ck(session, pin).map_err(|e| match PinRefusal::of(&e) {
        Some(refusal) => HsmError::Unavailable(refusal.reason().into()),
        None => HsmError::Unavailable(format!("C_Login failed: {e}")),
    })
}
