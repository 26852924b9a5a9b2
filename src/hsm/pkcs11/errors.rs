//! PKCS#11 errors: how each class is handled (recovery in [`super::worker`]), and how
//! one becomes the [`HsmError`] a request answers.

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;

use crate::hsm::{HsmError, Operation};

/// Turns a cryptoki error nothing else maps into [`HsmError::Pkcs11`], naming the
/// PKCS#11 function (the error's own where it carries one, else `function`).
pub(super) fn unexpected(function: Function) -> impl Fn(CkError) -> HsmError {
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

/// The token refused a login's PIN. Never retried as such: HSMs such as Luna and
/// nShield lock a partition after a few failed logins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PinRefusal {
    /// CKR_PIN_INCORRECT: the same PIN again would only count towards a lock.
    Incorrect,
    /// CKR_PIN_LOCKED: nothing succeeds until an officer unlocks it, perhaps keeping
    /// the PIN.
    Locked,
}

impl PinRefusal {
    /// The refusal `error` is, if it is one.
    pub(super) fn of(error: &CkError) -> Option<Self> {
        match error {
            CkError::Pkcs11(RvError::PinIncorrect, _) => Some(Self::Incorrect),
            CkError::Pkcs11(RvError::PinLocked, _) => Some(Self::Locked),
            _ => None,
        }
    }

    /// Why, for logs and health.
    pub(super) fn reason(self) -> &'static str {
        match self {
            Self::Incorrect => "token PIN is incorrect",
            Self::Locked => "token PIN is locked",
        }
    }
}

/// Why a login failed.
pub(super) enum LoginError {
    /// The token refused the PIN; logins are suspended.
    Refused(HsmError),
    /// Any other failure, classified like any call's.
    Call(CkError),
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
        // kryoptic answers C_EncryptInit/C_DecryptInit on the handle of a token key that
        // another process destroyed with CKR_GENERAL_ERROR (the handle still maps to the
        // key's sqlite row, which is gone), where SoftHSM2 says CKR_KEY_HANDLE_INVALID.
        // One lookup and one retry tell the cases apart: a key that is gone is then
        // KeyNotFound, any other general error fails again. config/VENDORS.md, kryoptic.
        RvError::GeneralError
            if matches!(
                error,
                CkError::Pkcs11(_, Function::EncryptInit | Function::DecryptInit)
            ) =>
        {
            ErrorClass::StaleHandle
        }
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
pub(super) enum Failure {
    /// The PKCS#11 call (or opening the session for it) failed, under this module
    /// generation.
    Call(CkError, u64),
    /// No call was made: the module or token is out of service, or login was refused.
    Hsm(HsmError),
}

/// Logs in, accepting a session of an application that is logged in already.
pub(super) fn login_ck(session: &Session, pin: &AuthPin) -> Result<(), CkError> {
    match session.login(UserType::User, Some(pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Errors of C_Encrypt/C_Decrypt that are the request's fault, not the HSM's.
pub(super) fn map_crypto_error(error: CkError, operation: Operation) -> HsmError {
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
        _ => unexpected(match operation {
            Operation::Encrypt => Function::Encrypt,
            Operation::Decrypt => Function::Decrypt,
        })(error),
    }
}
