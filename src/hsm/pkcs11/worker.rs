//! A session thread's state: what the threads of one EKM share, the thread's own
//! session, and recovery from a lost session, token or module.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use cryptoki::context::{Function, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use super::{errors::*, gcm::*, keys::*, module::*, objects::token_is_empty, settings::*, trace};
use crate::hsm::faults::FaultInjector;
use crate::hsm::HsmError;

/// What the session threads of one EKM share.
pub(super) struct Shared {
    pub(super) module: Arc<Module>,
    pub(super) token: TokenSelector,
    pub(super) token_state: parking_lot::Mutex<TokenState>,
    /// The user PIN; replaced by a reload that brings another one.
    pub(super) pin: parking_lot::Mutex<AuthPin>,
    /// Set when the token refused the PIN: no more logins until a reload brings
    /// another PIN (or any reload, for a locked one; see
    /// [`Pkcs11Backend::update_pin`](super::Pkcs11Backend::update_pin)). HSMs lock a
    /// partition after a few failed logins, and every session, health check and
    /// recovery would otherwise try again.
    pub(super) login_refused: parking_lot::Mutex<Option<PinRefusal>>,
    pub(super) keys: KeyCache,
    pub(super) iv_source: IvSource,
    pub(super) session_key_copies: bool,
    pub(super) read_write_sessions: bool,
    pub(super) faults: Option<Arc<FaultInjector>>,
    /// Set while the token is lost; cleared by the next call that succeeds.
    pub(super) out: Arc<AtomicBool>,
    /// Serial numbers for the sessions the workers open.
    pub(super) sessions_opened: AtomicU64,
}

impl Shared {
    pub(super) fn inject(&self, function: Function) -> Result<(), CkError> {
        self.faults.as_ref().map_or(Ok(()), |f| f.before(function))
    }

    /// The token's slot under module generation `generation`, looked up once per
    /// generation (and again after the token was lost). While the token is missing
    /// this fails fast; when the next attempt is due it looks again, after
    /// re-initializing the module unless other tokens of the module serve.
    pub(super) fn slot(&self, pkcs11: &Pkcs11, generation: u64) -> Result<Slot, Failure> {
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
    pub(super) fn login_allowed(&self) -> Result<(), HsmError> {
        match *self.login_refused.lock() {
            None => Ok(()),
            Some(refusal) => Err(HsmError::Unavailable(format!(
                "login suspended: {}; correct the PIN and reload the configuration",
                refusal.reason()
            ))),
        }
    }

    /// Logs `session`'s application in; a PIN the token refuses suspends logins.
    ///
    /// One login at a time, and suspension is checked under the same lock: sessions
    /// that were opening while another's login was refused do not try the PIN again.
    pub(super) fn log_in(&self, session: &Session) -> Result<(), LoginError> {
        let pin = self.pin.lock();
        self.login_allowed().map_err(LoginError::Refused)?;
        tracing::debug!(token = %self.token, "C_Login");
        // An injected error stands for the token's answer, a refused PIN included.
        let result = self.inject(Function::Login).and_then(|()| {
            trace::traced(Function::Login, trace::On::Token(&self.token), || {
                login_ck(session, &pin)
            })
        });
        let refusal = match result {
            Ok(()) => return Ok(()),
            Err(e) => match PinRefusal::of(&e) {
                Some(refusal) => refusal,
                None => return Err(LoginError::Call(e)),
            },
        };
        *self.login_refused.lock() = Some(refusal);
        tracing::error!(
            token = %self.token,
            reason = refusal.reason(),
            "login suspended: no more login attempts until the PIN changes (HSMs lock a partition after a few failures); correct the PIN and reload the configuration"
        );
        Err(LoginError::Refused(
            self.login_allowed().expect_err("just suspended"),
        ))
    }

    /// Fails as a lost token (CKR_TOKEN_NOT_RECOGNIZED, the token class: re-initialize,
    /// find the token again, back off) when the token has shown this process keys and
    /// now shows no objects at all. A module may keep running while its token's objects
    /// vanish (SoftHSM2 whose token directory went away, an HSM partition swapped under
    /// a live client): searches then simply find nothing, and a key answered as
    /// KeyNotFound would be lost for good to KMS. `missing`: the key whose absence
    /// raised the question, if one did.
    pub(super) fn check_not_emptied(
        &self,
        session: &Session,
        missing: Option<&str>,
    ) -> Result<(), CkError> {
        if !self.keys.seen() || !token_is_empty(session)? {
            return Ok(());
        }
        tracing::error!(
            token = %self.token,
            key_id = missing,
            "the token shows no objects although it held keys: treating it as lost"
        );
        Err(CkError::Pkcs11(
            RvError::TokenNotRecognized,
            Function::FindObjects,
        ))
    }

    /// The token was lost: find it again before the next call.
    pub(super) fn lost(&self) {
        self.out.store(true, Ordering::Relaxed);
        self.token_state.lock().slot = None;
    }

    pub(super) fn is_missing(&self) -> bool {
        self.token_state
            .lock()
            .missing
            .as_ref()
            .is_some_and(|(o, _)| Instant::now() < o.retry_at)
    }
}

/// A session and the module generation it was opened in.
pub(super) struct OpenSession {
    pub(super) session: Session,
    pub(super) generation: u64,
    /// Unique among this EKM's sessions (see [`CachedKey::owner`]).
    pub(super) serial: u64,
}

/// A session thread's state.
pub(crate) struct Worker {
    pub(super) shared: Arc<Shared>,
    pub(super) session: Option<OpenSession>,
    pub(super) ivs: IvBatch,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.abandon_if_stale();
        if let Some(open) = &self.session {
            self.shared.keys.forget_copies_of(open.serial);
        }
    }
}

impl Worker {
    /// Forgets a session of an older module generation without closing it.
    pub(super) fn abandon_if_stale(&mut self) {
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
    pub(super) fn session(
        &mut self,
        pkcs11: &Pkcs11,
        generation: u64,
    ) -> Result<&Session, Failure> {
        self.abandon_if_stale();
        if self.session.is_none() {
            // Not even a session while logins are suspended: nothing to do without one.
            self.shared.login_allowed().map_err(Failure::Hsm)?;
            let call = |e| Failure::Call(e, generation);
            let slot = self.shared.slot(pkcs11, generation)?;
            self.shared.inject(Function::OpenSession).map_err(call)?;
            let session = trace::traced(
                Function::OpenSession,
                trace::On::Token(&self.shared.token),
                || {
                    if self.shared.read_write_sessions {
                        pkcs11.open_rw_session(slot)
                    } else {
                        pkcs11.open_ro_session(slot)
                    }
                },
            )
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
    pub(super) fn attempt<T>(
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
        let started = trace::on().then(Instant::now);
        let result = f(session);
        if let Some(started) = started {
            trace::emit(
                function,
                trace::On::Token(&self.shared.token),
                result.as_ref().err(),
                started,
            );
        }
        let result = result.map_err(|e| Failure::Call(e, generation));
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
    pub(super) fn recover(
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
                    self.shared.keys.forget_copies_of(open.serial);
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
    pub(super) fn call<T>(
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
                        return Err(unexpected(function)(e));
                    }
                }
            }
            retried = true;
        }
    }
}
