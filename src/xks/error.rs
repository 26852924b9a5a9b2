//! The XKS error model: every failure a client can see is an [`XksError`], whose
//! [`ErrorName`] is one of the spec's error names (spec: Error codes). The HTTP status
//! of each name is decided here and nowhere else, and so is what an internal error
//! ([`HsmError`], [`AuthError`]) may tell the client.

use std::borrow::Cow;
use std::fmt;

use crate::auth::AuthError;
use crate::hsm::HsmError;

/// The spec's error names (spec: Error codes table), plus the 405 the spec requires for
/// GET and other methods on API URIs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorName {
    /// 400: one or more input parameters is invalid.
    Validation,
    /// 400: the external key or key store is disabled.
    InvalidState,
    /// 400: ciphertext, IV, AAD, metadata or tag is corrupted, missing or invalid.
    InvalidCiphertext,
    /// 400: the key does not support the requested operation.
    InvalidKeyUsage,
    /// 401: the SigV4 signature is invalid.
    AuthenticationFailed,
    /// 403: the operation is not authorized based on request metadata.
    AccessDenied,
    /// 404: the external key is not found.
    KeyNotFound,
    /// 404: the URI path is not valid.
    InvalidUriPath,
    /// 405: an API URI was called with a method other than POST (spec: API operations).
    MethodNotAllowed,
    /// 429: the request rate is too high.
    Throttling,
    /// 501: the operation, or a parameter of that size, is not supported.
    UnsupportedOperation,
    /// 503: a dependency (the HSM) timed out.
    DependencyTimeout,
    /// 500: generic server error, e.g. the HSM failed.
    Internal,
}

impl ErrorName {
    /// Every name, for metrics and tests.
    pub const ALL: [Self; 13] = [
        Self::Validation,
        Self::InvalidState,
        Self::InvalidCiphertext,
        Self::InvalidKeyUsage,
        Self::AuthenticationFailed,
        Self::AccessDenied,
        Self::KeyNotFound,
        Self::InvalidUriPath,
        Self::MethodNotAllowed,
        Self::Throttling,
        Self::UnsupportedOperation,
        Self::DependencyTimeout,
        Self::Internal,
    ];

    /// The `errorName` string on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Validation => "ValidationException",
            Self::InvalidState => "InvalidStateException",
            Self::InvalidCiphertext => "InvalidCiphertextException",
            Self::InvalidKeyUsage => "InvalidKeyUsageException",
            Self::AuthenticationFailed => "AuthenticationFailedException",
            Self::AccessDenied => "AccessDeniedException",
            Self::KeyNotFound => "KeyNotFoundException",
            Self::InvalidUriPath => "InvalidUriPathException",
            // Not in the spec's table, which has no name for a wrong method; the spec
            // only requires the 405 status.
            Self::MethodNotAllowed => "MethodNotAllowedException",
            Self::Throttling => "ThrottlingException",
            Self::UnsupportedOperation => "UnsupportedOperationException",
            Self::DependencyTimeout => "DependencyTimeoutException",
            Self::Internal => "InternalException",
        }
    }

    /// The HTTP status code the spec assigns to this name.
    pub fn status(self) -> u16 {
        match self {
            Self::Validation
            | Self::InvalidState
            | Self::InvalidCiphertext
            | Self::InvalidKeyUsage => 400,
            Self::AuthenticationFailed => 401,
            Self::AccessDenied => 403,
            Self::KeyNotFound | Self::InvalidUriPath => 404,
            Self::MethodNotAllowed => 405,
            Self::Throttling => 429,
            Self::Internal => 500,
            Self::UnsupportedOperation => 501,
            Self::DependencyTimeout => 503,
        }
    }
}

impl fmt::Display for ErrorName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error answered to the client: a spec error name and a short message.
///
/// The message is what the client and the log see. It is built only from our own
/// strings and from names of fields, never from request values, so it cannot carry
/// plaintext, AAD or secrets; [`XksError::new`] also forces it to printable ASCII
/// under 512 characters (spec: Error codes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XksError {
    name: ErrorName,
    message: Cow<'static, str>,
}

/// The spec's limit on `errorMessage` is "less than 512 characters".
const MAX_MESSAGE_LEN: usize = 511;

impl XksError {
    /// An error with a message; non-printable characters are replaced and the length capped.
    pub fn new(name: ErrorName, message: impl Into<Cow<'static, str>>) -> Self {
        let mut message = message.into();
        let printable = |c: char| (' '..='~').contains(&c);
        if message.len() > MAX_MESSAGE_LEN || !message.chars().all(printable) {
            let cleaned: String = message
                .chars()
                .map(|c| if printable(c) { c } else { '?' })
                .take(MAX_MESSAGE_LEN)
                .collect();
            message = Cow::Owned(cleaned);
        }
        Self { name, message }
    }

    /// 400 ValidationException.
    pub fn validation(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorName::Validation, message)
    }

    /// 400 InvalidCiphertextException.
    pub fn invalid_ciphertext(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorName::InvalidCiphertext, message)
    }

    /// 501 UnsupportedOperationException.
    pub fn unsupported(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorName::UnsupportedOperation, message)
    }

    /// 500 InternalException.
    pub fn internal(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorName::Internal, message)
    }

    /// The spec error name.
    pub fn name(&self) -> ErrorName {
        self.name
    }

    /// The HTTP status.
    pub fn status(&self) -> u16 {
        self.name.status()
    }

    /// The `errorMessage`.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The JSON body: `{"errorName": ..., "errorMessage": ...}`.
    pub fn to_json(&self) -> Vec<u8> {
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Body<'a> {
            error_name: &'a str,
            error_message: &'a str,
        }
        serde_json::to_vec(&Body {
            error_name: self.name.as_str(),
            error_message: &self.message,
        })
        .expect("serializing two strings cannot fail")
    }
}

impl fmt::Display for XksError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name, self.message)
    }
}

impl std::error::Error for XksError {}

impl From<AuthError> for XksError {
    /// All authentication failures are 401. The message says which check failed (never
    /// the signature or secret), which is what an operator debugging a misconfigured
    /// key store in KMS needs; an attacker learns nothing a failed attempt doesn't show.
    fn from(error: AuthError) -> Self {
        Self::new(ErrorName::AuthenticationFailed, error.to_string())
    }
}

impl From<HsmError> for XksError {
    /// Where we decide what the client learns of an HSM failure: key state and usage
    /// problems are the client's to fix and are named; module failures are summarized
    /// (the details go to the log, not to KMS).
    fn from(error: HsmError) -> Self {
        match error {
            HsmError::KeyNotFound => Self::new(ErrorName::KeyNotFound, "external key not found"),
            HsmError::KeyDisabled => Self::new(
                ErrorName::InvalidState,
                "external key is disabled in the HSM",
            ),
            HsmError::UsageNotPermitted(op) => Self::new(
                ErrorName::InvalidKeyUsage,
                match op {
                    crate::hsm::Operation::Encrypt => "external key does not allow ENCRYPT",
                    crate::hsm::Operation::Decrypt => "external key does not allow DECRYPT",
                },
            ),
            HsmError::NotAes256 => Self::new(
                ErrorName::InvalidKeyUsage,
                "external key is not an AES-256 key",
            ),
            HsmError::InvalidCiphertext => Self::invalid_ciphertext(
                "ciphertext, IV, AAD, metadata or tag is corrupted or invalid",
            ),
            HsmError::Busy(_) => Self::new(ErrorName::Throttling, "HSM session pool is saturated"),
            HsmError::Timeout => {
                Self::new(ErrorName::DependencyTimeout, "HSM did not answer in time")
            }
            HsmError::AmbiguousKey => {
                tracing::error!("several HSM key objects carry the same external key id");
                Self::internal("several HSM objects carry this external key id")
            }
            HsmError::Unavailable(_) | HsmError::Pkcs11 { .. } | HsmError::Inconsistent(_) => {
                // The client learns only that the HSM failed; the operator gets the cause.
                tracing::error!(error = %error, "HSM operation failed");
                Self::internal("HSM operation failed")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_spec_table() {
        let expected = [
            ("ValidationException", 400),
            ("InvalidStateException", 400),
            ("InvalidCiphertextException", 400),
            ("InvalidKeyUsageException", 400),
            ("AuthenticationFailedException", 401),
            ("AccessDeniedException", 403),
            ("KeyNotFoundException", 404),
            ("InvalidUriPathException", 404),
            ("MethodNotAllowedException", 405),
            ("ThrottlingException", 429),
            ("UnsupportedOperationException", 501),
            ("DependencyTimeoutException", 503),
            ("InternalException", 500),
        ];
        for (name, (wire, status)) in ErrorName::ALL.iter().zip(expected) {
            assert_eq!(name.as_str(), wire);
            assert_eq!(name.status(), status, "{wire}");
        }
    }

    #[test]
    fn message_is_printable_ascii_and_bounded() {
        let error = XksError::validation(format!("bad\u{7}\n\u{e9}{}", "x".repeat(1000)));
        assert!(error.message().len() <= MAX_MESSAGE_LEN);
        assert!(error.message().bytes().all(|b| (0x20..=0x7e).contains(&b)));
        assert!(error.message().starts_with("bad???"));
    }

    #[test]
    fn json_body_has_both_fields() {
        let json: serde_json::Value =
            serde_json::from_slice(&XksError::invalid_ciphertext("nope").to_json()).unwrap();
        assert_eq!(json["errorName"], "InvalidCiphertextException");
        assert_eq!(json["errorMessage"], "nope");
    }
}
