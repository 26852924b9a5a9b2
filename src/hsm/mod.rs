//! The external key manager side: AES-256-GCM and key metadata by external key id.
//!
//! [`Backend`] is what the XKS handlers call: one [`Ekm`] or a [`fleet`] of them, built
//! from the `[hsm]` settings by [`Backend::build`]. It knows nothing of HTTP or JSON: it
//! takes bytes and an external key id and returns bytes, [`KeyMetadata`] or an
//! [`HsmError`].
//!
//! - [`pkcs11`]: the product. A bounded pool of logged-in PKCS#11 sessions, each owned by
//!   a dedicated OS thread, fed through a bounded queue; key handles cached by id.
//! - [`software`]: AES-GCM in process with aws-lc-rs and keys in memory, for benchmarks
//!   that want to separate proxy overhead from HSM cost. Not for production.
//! - [`simulated`]: the software backend's AES-GCM behind the real session pool, with a
//!   modelled service time and parallelism: backpressure tests and capacity planning.
//!
//! Every operation takes the request's deadline; the session pool (`pool`) refuses work
//! that cannot finish before it. The PKCS#11 and simulated EKMs say what one session
//! does (`pooled::SessionOps`); the pool's facade over them is written once.

mod backend;
pub mod faults;
pub mod fleet;
pub mod pkcs11;
mod pool;
mod pooled;
pub mod simulated;
pub mod software;

pub use backend::{Backend, BackendConfig, Ekm};
pub(crate) use pool::exit_by;
pub use pool::PoolThreads;

/// The cryptographic operation a request asks of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// AES-GCM encryption.
    Encrypt,
    /// AES-GCM decryption.
    Decrypt,
}

/// A usage a key allows, as reported by GetKeyMetadata (spec: keyUsage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyUsage {
    /// CKA_ENCRYPT.
    Encrypt,
    /// CKA_DECRYPT.
    Decrypt,
    /// CKA_SIGN.
    Sign,
    /// CKA_VERIFY.
    Verify,
    /// CKA_WRAP.
    Wrap,
    /// CKA_UNWRAP.
    Unwrap,
    /// CKA_DERIVE.
    Derive,
}

impl KeyUsage {
    /// The spec's uppercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Encrypt => "ENCRYPT",
            Self::Decrypt => "DECRYPT",
            Self::Sign => "SIGN",
            Self::Verify => "VERIFY",
            Self::Wrap => "WRAP",
            Self::Unwrap => "UNWRAP",
            Self::Derive => "DERIVE",
        }
    }
}

/// A key's type and size, as GetKeyMetadata reports it (spec: keySpec).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySpec {
    /// An AES key of this many bits; XKS v1 serves only 256.
    Aes(u64),
    /// Another key type, by the PKCS#11 name of its CKK_ value (e.g. `GENERIC_SECRET`).
    Other(String),
    /// The token did not say.
    Unknown,
}

impl KeySpec {
    /// The spec's `AES_256` and, for keys XKS cannot use, a name of the same form.
    pub fn name(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Self::Aes(bits) => format!("AES_{bits}").into(),
            Self::Other(name) => name.as_str().into(),
            Self::Unknown => "UNKNOWN".into(),
        }
    }
}

/// What GetKeyMetadata reports, read from the key's real attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMetadata {
    /// [`KeySpec::Aes`]`(256)` for the only keys XKS v1 serves.
    pub key_spec: KeySpec,
    /// The usages the key allows (at most seven, within the spec's limit of ten).
    pub usages: Vec<KeyUsage>,
    /// False when the key is disabled (for PKCS#11: CKA_END_DATE in the past or
    /// CKA_START_DATE in the future).
    pub enabled: bool,
}

impl KeyMetadata {
    /// True for a 256-bit AES key, the only kind XKS v1 supports.
    pub fn is_aes_256(&self) -> bool {
        self.key_spec == KeySpec::Aes(256)
    }

    /// Whether the key may be used for `operation`, as the HSM will enforce it.
    pub fn allows(&self, operation: Operation) -> bool {
        let needed = match operation {
            Operation::Encrypt => KeyUsage::Encrypt,
            Operation::Decrypt => KeyUsage::Decrypt,
        };
        self.usages.contains(&needed)
    }

    /// The checks done before every encrypt or decrypt, in the order whose error the
    /// client should see first: a disabled key is reported as such even if it also
    /// lacks the usage.
    pub fn check(&self, operation: Operation) -> Result<(), HsmError> {
        if !self.enabled {
            return Err(HsmError::KeyDisabled);
        }
        if !self.is_aes_256() {
            return Err(HsmError::NotAes256);
        }
        if !self.allows(operation) {
            return Err(HsmError::UsageNotPermitted(operation));
        }
        Ok(())
    }
}

/// The result of an AES-GCM encryption, separated as the spec wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The IV actually used (12 bytes from us, or 12/16 from an HSM that picks its own).
    pub iv: Vec<u8>,
    /// Same length as the plaintext.
    pub ciphertext: Vec<u8>,
    /// The 16-byte authentication tag.
    pub tag: [u8; TAG_LEN],
}

/// AES-GCM tag length the spec requires.
pub const TAG_LEN: usize = 16;
/// The GCM IV length we generate.
pub const IV_LEN: usize = 12;

/// Plaintext held by the proxy: zeroized when dropped.
pub type Plaintext = zeroize::Zeroizing<Vec<u8>>;

/// Why an HSM operation failed. The conversion into the client's error lives in
/// `xks::error`; the log gets the full cause.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum HsmError {
    /// No key object carries this external key id.
    #[error("key not found")]
    KeyNotFound,
    /// More than one key object carries this external key id.
    #[error("several key objects carry this id")]
    AmbiguousKey,
    /// The key is disabled.
    #[error("key is disabled")]
    KeyDisabled,
    /// The key lacks the usage the operation needs.
    #[error("key does not allow {0:?}")]
    UsageNotPermitted(Operation),
    /// The key is not a 256-bit AES key.
    #[error("key is not AES-256")]
    NotAes256,
    /// Authentication of the ciphertext failed (wrong tag, IV, AAD or ciphertext).
    #[error("ciphertext failed authentication")]
    InvalidCiphertext,
    /// The session pool refused the request (it is counted under its reason).
    #[error("session pool saturated ({})", .0.as_str())]
    Busy(crate::metrics::ShedReason),
    /// The HSM did not answer in time.
    #[error("HSM call timed out")]
    Timeout,
    /// The backend cannot serve at all (module failed, pool stopped).
    #[error("HSM unavailable: {0}")]
    Unavailable(String),
    /// A PKCS#11 function returned an error we do not map to a client error.
    #[error("{function} failed: {rv}")]
    Pkcs11 {
        /// The PKCS#11 function.
        function: String,
        /// The CKR_ value's name.
        rv: String,
    },
    /// The HSM answered something that cannot be right (e.g. a short ciphertext).
    #[error("inconsistent HSM answer: {0}")]
    Inconsistent(&'static str),
}

/// Facts about one external key manager, for GetHealthStatus (spec: ekmFleetDetails).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EkmInfo {
    /// Unique id of the EKM: for PKCS#11, the token serial number.
    pub id: String,
    /// Model: manufacturer, model and firmware of the token.
    pub model: String,
    /// Vendor: the token's manufacturer.
    pub vendor: String,
}

/// Health of one EKM (spec: ekmFleetDetails.healthStatus).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EkmHealth {
    /// Healthy.
    Active,
    /// Unhealthy but serving.
    Degraded,
    /// Cannot serve.
    Unavailable,
}

impl EkmHealth {
    /// The spec's string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "ACTIVE",
            Self::Degraded => "DEGRADED",
            Self::Unavailable => "UNAVAILABLE",
        }
    }
}

/// The HSM label of `version` of an external key: version 1 is the key labelled with
/// the id itself (every key before its first rotation), version N ≥ 2 is labelled
/// `<id>#vN`. `#` is not allowed in key ids, so no external key id can look like a
/// version of another.
pub fn version_label(key_id: &str, version: u32) -> std::borrow::Cow<'_, str> {
    if version <= 1 {
        std::borrow::Cow::Borrowed(key_id)
    } else {
        std::borrow::Cow::Owned(format!("{key_id}#v{version}"))
    }
}

/// The external key id of an HSM label (strips a `#vN` version suffix).
pub fn base_key_id(label: &str) -> &str {
    label.split_once('#').map_or(label, |(id, _)| id)
}

/// The bytes a deep health check encrypts and expects back.
pub(crate) const HEALTH_PROBE: &[u8] = b"xks-proxy health check";

/// A deep health check's round trip: encrypt [`HEALTH_PROBE`], decrypt it, compare.
/// `session` is whatever both steps need mutably.
pub(crate) fn health_round_trip<S>(
    session: &mut S,
    encrypt: impl FnOnce(&mut S, &[u8]) -> Result<Sealed, HsmError>,
    decrypt: impl FnOnce(&mut S, &Sealed) -> Result<Plaintext, HsmError>,
) -> Result<(), HsmError> {
    let sealed = encrypt(session, HEALTH_PROBE)?;
    if decrypt(session, &sealed)?.as_slice() == HEALTH_PROBE {
        Ok(())
    } else {
        Err(HsmError::Inconsistent(
            "health check decrypted to other bytes",
        ))
    }
}
