//! PKCS#11 call tracing (`hsm.trace`): one log line per call the proxy makes into the
//! module, with the function, the CKR_ value it returned and how long it took, so that
//! a vendor's support can read what the proxy asked of their module.
//!
//! The lines go to the tracing target [`TARGET`] at INFO. They carry no argument of
//! the call: never a PIN, key material, plaintext, AAD or IV, only the function, the
//! return value, the duration and the token. One line stands for one unit the proxy
//! labels with a function (see `worker::Worker::call`): a `C_Encrypt` line includes its
//! `C_EncryptInit`, a `C_FindObjects` line its `C_FindObjectsInit` and `Final`.
//!
//! Off (the default) it costs one relaxed atomic load per call: nothing is timed or
//! formatted.

use std::fmt::Display;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use cryptoki::context::Function;
use cryptoki::error::Error as CkError;

/// The tracing target of the call lines (`RUST_LOG` filters can name it).
pub const TARGET: &str = "xks_proxy::pkcs11_trace";

static ON: AtomicBool = AtomicBool::new(false);

/// Turns tracing on for every PKCS#11 backend of the process (`hsm.trace`); it stays on.
pub(crate) fn enable() {
    ON.store(true, Ordering::Relaxed);
}

/// Whether calls are traced.
#[inline]
pub(super) fn on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// What a call was about: a token (session calls) or the module itself (C_Initialize,
/// C_Finalize).
#[derive(Clone, Copy)]
pub(super) enum On<'a> {
    /// A token.
    Token(&'a dyn Display),
    /// The module at a path.
    Module(&'a dyn Display),
}

/// Runs `f`, the proxy's call of `function` into the module, and traces it.
#[inline]
pub(super) fn traced<T>(
    function: Function,
    token: On<'_>,
    f: impl FnOnce() -> Result<T, CkError>,
) -> Result<T, CkError> {
    if !on() {
        return f();
    }
    let started = Instant::now();
    let result = f();
    emit(function, token, result.as_ref().err(), started);
    result
}

/// Writes the line of a call that started at `started` and failed with `error` (or
/// returned CKR_OK).
#[cold]
pub(super) fn emit(function: Function, on: On<'_>, error: Option<&CkError>, started: Instant) {
    let duration_us = started.elapsed().as_micros() as u64;
    let rv = error.map_or_else(|| "CKR_OK".to_owned(), rv_name);
    let function = format_args!("C_{function:?}");
    match on {
        On::Token(token) => tracing::info!(
            target: TARGET,
            function = %function,
            rv = %rv,
            duration_us,
            token = %token,
            "PKCS#11 call"
        ),
        On::Module(module) => tracing::info!(
            target: TARGET,
            function = %function,
            rv = %rv,
            duration_us,
            module = %module,
            "PKCS#11 call"
        ),
    }
}

/// The CKR_ name of a PKCS#11 error (`CKR_DEVICE_ERROR`), or what went wrong before
/// the module answered (a library that could not be called).
pub(crate) fn rv_name(error: &CkError) -> String {
    let CkError::Pkcs11(rv, _) = error else {
        return error.to_string();
    };
    // cryptoki's variants are the CKR_ names in camel case (DeviceError).
    let camel = format!("{rv:?}");
    let mut name = String::from("CKR");
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryptoki::error::RvError;

    #[test]
    fn return_values_read_as_their_ckr_names() {
        let name = |rv| rv_name(&CkError::Pkcs11(rv, Function::Encrypt));
        assert_eq!(name(RvError::DeviceError), "CKR_DEVICE_ERROR");
        assert_eq!(name(RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(name(RvError::KeyHandleInvalid), "CKR_KEY_HANDLE_INVALID");
    }
}
