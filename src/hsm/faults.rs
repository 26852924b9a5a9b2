//! Fault injection at the PKCS#11 call boundary, on command.
//!
//! A [`FaultInjector`] sits between the PKCS#11 backend's session threads and the module:
//! before every PKCS#11 function the backend calls, the injector may add latency or
//! answer a CKR_ error instead of the module. The module underneath stays real (the
//! tests use SoftHSM2), so an injected CKR_DEVICE_REMOVED goes through the backend's
//! real classification and recovery: the module is finalized and initialized again,
//! the token found again, sessions reopened and keys looked up again.
//!
//! It also stands in for HSMs we cannot run in CI in one respect that matters to the
//! proxy: how AES-GCM hands back the IV ([`VendorIv`]). The encryption itself is still
//! SoftHSM2's; the injector only reshapes the call the way such an HSM would.
//!
//! A call can also be held forever ([`FaultInjector::hang`]), as a vendor library whose
//! call never returns would hold it, until the test lets it go
//! ([`FaultInjector::release`]).
//!
//! The backend holds an injector only when one is given to
//! [`Pkcs11Settings`](super::pkcs11::Pkcs11Settings) (tests, chaos drills); without one
//! the hot path pays a single `Option` check.

use std::time::Duration;

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::MechanismType;
use parking_lot::{Condvar, Mutex};

/// How a simulated HSM returns the GCM IV (the real one, SoftHSM2, takes the caller's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VendorIv {
    /// Like Utimaco, Entrust nShield and Marvell-based HSMs: the caller passes a zeroed
    /// 12-byte IV buffer and the HSM writes the IV it chose into it.
    FillsZeroedBuffer,
    /// Like Thales Luna in FIPS mode: the caller passes no IV, the HSM picks a 16-byte
    /// one and appends it after the tag in the output.
    AppendsAfterTag,
}

/// One armed error.
#[derive(Debug, Clone)]
struct ArmedError {
    rv: RvError,
    /// Only calls to this PKCS#11 function fail; `None`: every call.
    function: Option<Function>,
    /// Calls left to fail; `None`: until cleared.
    remaining: Option<u32>,
}

#[derive(Debug, Default)]
struct State {
    errors: Vec<ArmedError>,
    latency: Option<Duration>,
    /// Latency added to one function only, on top of `latency`.
    function_latency: Vec<(Function, Duration)>,
    vendor_iv: Option<VendorIv>,
    /// Mechanisms the module is made to lack.
    missing: Vec<MechanismType>,
    injected: u64,
    delayed: u64,
    /// Calls to hang: those to this function (`None`: any), this many more times.
    hang: Option<(Option<Function>, u32)>,
    /// Calls hanging now.
    hanging: u64,
    /// Bumped by each release: a hanging call ends when it changes.
    releases: u64,
}

/// Errors and latency injected into PKCS#11 calls on command. Share it with `Arc`.
#[derive(Debug, Default)]
pub struct FaultInjector {
    state: Mutex<State>,
    released: Condvar,
}

impl FaultInjector {
    /// An injector that injects nothing until told to.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the next `times` calls (every call until [`clear`](Self::clear) when
    /// `None`) to `function` (any function when `None`) fail with `rv`.
    pub fn fail(&self, rv: RvError, function: Option<Function>, times: Option<u32>) {
        self.state.lock().errors.push(ArmedError {
            rv,
            function,
            remaining: times,
        });
    }

    /// Adds `latency` before every PKCS#11 call (`None`: none).
    pub fn set_latency(&self, latency: Option<Duration>) {
        self.state.lock().latency = latency;
    }

    /// Adds `latency` before every call to `function` (`None`: none), e.g. a slow
    /// C_FindObjects on a token with many objects.
    pub fn set_function_latency(&self, function: Function, latency: Option<Duration>) {
        let mut state = self.state.lock();
        state.function_latency.retain(|(f, _)| !same(*f, function));
        if let Some(latency) = latency {
            state.function_latency.push((function, latency));
        }
    }

    /// Makes AES-GCM encryption behave like an HSM that chooses its own IV.
    pub fn set_vendor_iv(&self, vendor_iv: Option<VendorIv>) {
        self.state.lock().vendor_iv = vendor_iv;
    }

    /// Makes the module lack `mechanism`, as an HSM without it would: C_GetMechanismInfo
    /// (which `xks-proxy hsm probe` asks) and every use of it the proxy or the probe
    /// makes (AES-GCM encryption, AES key generation) fail with CKR_MECHANISM_INVALID.
    /// Stays until the injector is dropped.
    pub fn remove_mechanism(&self, mechanism: MechanismType) {
        self.state.lock().missing.push(mechanism);
    }

    /// Whether the module is made to lack `mechanism`.
    pub(crate) fn lacks(&self, mechanism: MechanismType) -> bool {
        self.state.lock().missing.contains(&mechanism)
    }

    /// Disarms every error and removes the latency (the IV behaviour stays).
    pub fn clear(&self) {
        let mut state = self.state.lock();
        state.errors.clear();
        state.latency = None;
        state.function_latency.clear();
    }

    /// Makes the next `times` calls to `function` (any function when `None`) hang
    /// until [`release`](Self::release), like a vendor library whose call never
    /// returns.
    pub fn hang(&self, function: Option<Function>, times: u32) {
        self.state.lock().hang = Some((function, times));
    }

    /// Ends every hanging call (each then goes on to the module) and disarms
    /// [`hang`](Self::hang). Tests call it before they end, so no thread stays behind.
    pub fn release(&self) {
        let mut state = self.state.lock();
        state.hang = None;
        state.releases += 1;
        self.released.notify_all();
    }

    /// Calls hanging now.
    pub fn hanging(&self) -> u64 {
        self.state.lock().hanging
    }

    /// Errors injected so far.
    pub fn injected(&self) -> u64 {
        self.state.lock().injected
    }

    /// Calls delayed by an injected latency so far (counted as each delay begins).
    pub fn delayed(&self) -> u64 {
        self.state.lock().delayed
    }

    pub(crate) fn vendor_iv(&self) -> Option<VendorIv> {
        self.state.lock().vendor_iv
    }

    /// Called before the backend calls `function`: hangs if told to, sleeps the
    /// latency, then answers the armed error if one matches.
    pub(crate) fn before(&self, function: Function) -> Result<(), CkError> {
        let (latency, rv) = {
            let mut state = self.state.lock();
            if let Some((armed, left)) = state.hang {
                if armed.map_or(true, |f| same(f, function)) {
                    state.hang = (left > 1).then_some((armed, left - 1));
                    state.hanging += 1;
                    let release = state.releases;
                    while state.releases == release {
                        self.released.wait(&mut state);
                    }
                    state.hanging -= 1;
                }
            }
            let position = state
                .errors
                .iter()
                .position(|e| e.function.map_or(true, |f| same(f, function)));
            let rv = position.map(|i| {
                let armed = &mut state.errors[i];
                let rv = armed.rv;
                if let Some(left) = armed.remaining.as_mut() {
                    *left -= 1;
                    if *left == 0 {
                        state.errors.remove(i);
                    }
                }
                rv
            });
            if rv.is_some() {
                state.injected += 1;
            }
            let own = state
                .function_latency
                .iter()
                .filter(|(f, _)| same(*f, function))
                .map(|(_, d)| *d)
                .sum::<Duration>();
            let latency = match (state.latency, own) {
                (None, own) if own.is_zero() => None,
                (latency, own) => Some(latency.unwrap_or_default() + own),
            };
            if latency.is_some() {
                state.delayed += 1;
            }
            (latency, rv)
        };
        if let Some(latency) = latency {
            std::thread::sleep(latency);
        }
        match rv {
            Some(rv) => Err(CkError::Pkcs11(rv, function)),
            None => Ok(()),
        }
    }
}

fn same(a: Function, b: Function) -> bool {
    std::mem::discriminant(&a) == std::mem::discriminant(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_armed_for_n_calls_fails_exactly_n_matching_calls() {
        let faults = FaultInjector::new();
        faults.fail(RvError::DeviceError, Some(Function::Encrypt), Some(2));
        assert!(faults.before(Function::Decrypt).is_ok());
        for _ in 0..2 {
            match faults.before(Function::Encrypt) {
                Err(CkError::Pkcs11(RvError::DeviceError, Function::Encrypt)) => {}
                other => panic!("expected the injected error, got {other:?}"),
            }
        }
        assert!(faults.before(Function::Encrypt).is_ok());
        assert_eq!(faults.injected(), 2);
    }

    #[test]
    fn an_unbounded_error_lasts_until_cleared() {
        let faults = FaultInjector::new();
        faults.fail(RvError::TokenNotPresent, None, None);
        for function in [
            Function::OpenSession,
            Function::Encrypt,
            Function::Initialize,
        ] {
            assert!(faults.before(function).is_err());
        }
        faults.clear();
        assert!(faults.before(Function::Encrypt).is_ok());
    }

    #[test]
    fn a_hung_call_waits_for_its_release_and_only_the_armed_ones_hang() {
        let faults = std::sync::Arc::new(FaultInjector::new());
        faults.hang(Some(Function::Encrypt), 1);
        assert!(faults.before(Function::Decrypt).is_ok());
        let hung = {
            let faults = std::sync::Arc::clone(&faults);
            std::thread::spawn(move || faults.before(Function::Encrypt))
        };
        while faults.hanging() == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        // Armed once: the next call goes through.
        assert!(faults.before(Function::Encrypt).is_ok());
        assert!(!hung.is_finished());
        faults.release();
        assert!(hung.join().unwrap().is_ok());
        assert_eq!(faults.hanging(), 0);
    }
}
