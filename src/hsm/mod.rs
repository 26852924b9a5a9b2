//! The external key manager side: AES-256-GCM and key metadata by external key id.
//!
//! [`Backend`] is what the XKS handlers call. It knows nothing of HTTP or JSON: it takes
//! bytes and an external key id and returns bytes, [`KeyMetadata`] or an [`HsmError`].
//!
//! - [`pkcs11`]: the product. A bounded pool of logged-in PKCS#11 sessions, each owned by
//!   a dedicated OS thread, fed through a bounded queue; key handles cached by id.
//! - [`software`]: AES-GCM in process with aws-lc-rs and keys in memory, for benchmarks
//!   that want to separate proxy overhead from HSM cost. Not for production.
//! - [`simulated`]: the software backend's AES-GCM behind the real session pool, with a
//!   modelled service time and parallelism: backpressure tests and capacity planning.
//!
//! Every operation takes the request's deadline; the pool ([`pool`]) refuses work that
//! cannot finish before it.

pub mod faults;
pub mod fleet;
pub mod pkcs11;
mod pool;
pub mod simulated;

pub(crate) use pool::exit_by;
pub mod software;

use std::fmt;
use std::time::Instant;

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

/// What GetKeyMetadata reports, read from the key's real attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMetadata {
    /// `AES_256` for a 256-bit AES key; otherwise a description such as `AES_128`.
    pub key_spec: String,
    /// The usages the key allows (at most seven, within the spec's limit of ten).
    pub usages: Vec<KeyUsage>,
    /// False when the key is disabled (for PKCS#11: CKA_END_DATE in the past or
    /// CKA_START_DATE in the future).
    pub enabled: bool,
}

impl KeyMetadata {
    /// True for a 256-bit AES key, the only kind XKS v1 supports.
    pub fn is_aes_256(&self) -> bool {
        self.key_spec == "AES_256"
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

/// The backend the handlers talk to. An enum rather than a trait object: the set is
/// closed, and static dispatch keeps the hot path free of boxing.
pub enum Backend {
    /// A PKCS#11 module and token.
    Pkcs11(pkcs11::Pkcs11Backend),
    /// In-process AES-GCM (benchmarks only).
    Software(software::SoftwareBackend),
    /// A modelled HSM (backpressure tests, capacity planning).
    Simulated(simulated::SimulatedBackend),
    /// Several EKMs holding the same keys (PKCS#11 configurations are always a fleet,
    /// of one or more). Its members are never fleets themselves.
    Fleet(fleet::Fleet),
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pkcs11(b) => f.debug_tuple("Pkcs11").field(b).finish(),
            Self::Software(b) => f.debug_tuple("Software").field(b).finish(),
            Self::Simulated(b) => f.debug_tuple("Simulated").field(b).finish(),
            Self::Fleet(b) => f.debug_tuple("Fleet").field(b).finish(),
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

/// A fleet's members are single EKMs.
fn nested_fleet() -> HsmError {
    HsmError::Unavailable("a fleet cannot be an EKM of another fleet".into())
}

impl Backend {
    /// Encrypts `plaintext` under the key with the HSM's AES-GCM; `aad` is the HSM AAD
    /// (already built by the spec formula).
    pub async fn encrypt(
        &self,
        key_id: &str,
        plaintext: Plaintext,
        aad: Vec<u8>,
        deadline: Instant,
    ) -> Result<Sealed, HsmError> {
        match self {
            Self::Fleet(f) => f.encrypt(key_id, plaintext, aad, deadline).await,
            _ => self.leaf_encrypt(key_id, plaintext, aad, deadline).await,
        }
    }

    async fn leaf_encrypt(
        &self,
        key_id: &str,
        plaintext: Plaintext,
        aad: Vec<u8>,
        deadline: Instant,
    ) -> Result<Sealed, HsmError> {
        match self {
            Self::Pkcs11(b) => b.encrypt(key_id, plaintext, aad, deadline).await,
            Self::Software(b) => b.encrypt(key_id, &plaintext, &aad),
            Self::Simulated(b) => b.encrypt(key_id, plaintext, aad, deadline).await,
            Self::Fleet(_) => Err(nested_fleet()),
        }
    }

    /// Decrypts and authenticates.
    pub async fn decrypt(
        &self,
        key_id: &str,
        sealed: Sealed,
        aad: Vec<u8>,
        deadline: Instant,
    ) -> Result<Plaintext, HsmError> {
        match self {
            Self::Fleet(f) => f.decrypt(key_id, sealed, aad, deadline).await,
            _ => self.leaf_decrypt(key_id, sealed, aad, deadline).await,
        }
    }

    async fn leaf_decrypt(
        &self,
        key_id: &str,
        sealed: Sealed,
        aad: Vec<u8>,
        deadline: Instant,
    ) -> Result<Plaintext, HsmError> {
        match self {
            Self::Pkcs11(b) => b.decrypt(key_id, sealed, aad, deadline).await,
            Self::Software(b) => b.decrypt(key_id, &sealed, &aad),
            Self::Simulated(b) => b.decrypt(key_id, sealed, aad, deadline).await,
            Self::Fleet(_) => Err(nested_fleet()),
        }
    }

    /// The external key's current version (see [`version_label`]): the highest N for
    /// which versions 2..=N exist in the HSM, 1 when the key was never rotated. The
    /// PKCS#11 backend caches it for `key_refresh_seconds`; the others have no versions.
    pub async fn current_version(&self, key_id: &str, deadline: Instant) -> Result<u32, HsmError> {
        match self {
            Self::Fleet(f) => f.current_version(key_id, deadline).await,
            _ => self.leaf_current_version(key_id, deadline).await,
        }
    }

    async fn leaf_current_version(&self, key_id: &str, deadline: Instant) -> Result<u32, HsmError> {
        match self {
            Self::Pkcs11(b) => b.current_version(key_id, deadline).await,
            Self::Software(_) | Self::Simulated(_) => Ok(1),
            Self::Fleet(_) => Err(nested_fleet()),
        }
    }

    /// Reads the key's metadata.
    pub async fn key_metadata(
        &self,
        key_id: &str,
        deadline: Instant,
    ) -> Result<KeyMetadata, HsmError> {
        match self {
            Self::Fleet(f) => f.key_metadata(key_id, deadline).await,
            _ => self.leaf_key_metadata(key_id, deadline).await,
        }
    }

    async fn leaf_key_metadata(
        &self,
        key_id: &str,
        deadline: Instant,
    ) -> Result<KeyMetadata, HsmError> {
        match self {
            Self::Pkcs11(b) => b.key_metadata(key_id, deadline).await,
            Self::Software(b) => b.key_metadata(key_id),
            Self::Simulated(b) => b.key_metadata(key_id, deadline).await,
            Self::Fleet(_) => Err(nested_fleet()),
        }
    }

    /// False while the EKM is known to be out of service (its calls would fail at
    /// once); a fleet is in service while any member is.
    pub fn in_service(&self) -> bool {
        match self {
            Self::Pkcs11(b) => b.in_service(),
            Self::Software(_) | Self::Simulated(_) => true,
            Self::Fleet(f) => f.members().iter().any(|m| m.backend().in_service()),
        }
    }

    /// Requests admitted and not finished, and the most the EKM admits.
    pub fn load(&self) -> (usize, usize) {
        match self {
            Self::Pkcs11(b) => b.load(),
            Self::Simulated(b) => b.load(),
            Self::Software(_) => (0, usize::MAX),
            Self::Fleet(f) => f.members().iter().fold((0, 0), |(t, c), m| {
                let (taken, capacity) = m.backend().load();
                (t + taken, c.saturating_add(capacity))
            }),
        }
    }

    /// Why this EKM's logins are suspended (its token refused the PIN), if they are.
    pub fn login_suspended(&self) -> Option<&'static str> {
        match self {
            Self::Pkcs11(b) => b.login_suspended(),
            _ => None,
        }
    }

    /// Treats every EKM's cached keys and versions as due (see
    /// [`pkcs11::Pkcs11Backend::refresh_keys`]).
    pub fn refresh_keys(&self) {
        self.pkcs11_ekms()
            .for_each(pkcs11::Pkcs11Backend::refresh_keys);
    }

    /// Takes up the PINs of a reloaded configuration, EKM by EKM (matched by token).
    pub fn update_pins(&self, settings: &[pkcs11::Pkcs11Settings]) {
        for ekm in self.pkcs11_ekms() {
            if let Some(new) = settings.iter().find(|s| s.token == *ekm.token()) {
                ekm.update_pin(&new.pin);
            }
        }
    }

    /// The PKCS#11 EKMs behind this backend.
    fn pkcs11_ekms(&self) -> impl Iterator<Item = &pkcs11::Pkcs11Backend> {
        self.ekms().into_iter().filter_map(|ekm| match ekm {
            Self::Pkcs11(b) => Some(b),
            _ => None,
        })
    }

    /// The single EKMs behind this backend: a fleet's members, or itself.
    pub fn ekms(&self) -> Vec<&Self> {
        match self {
            Self::Fleet(f) => f.members().iter().map(fleet::Member::backend).collect(),
            _ => vec![self],
        }
    }

    /// A deep check: a real encrypt and decrypt with `key_id` (a health-check key, never
    /// a KMS key). Without a key, the PKCS#11 backend checks that a session answers.
    pub async fn health_check(
        &self,
        key_id: Option<&str>,
        deadline: Instant,
    ) -> Result<(), HsmError> {
        match (self, key_id) {
            (Self::Pkcs11(b), Some(key)) => b.health_check(key, deadline).await,
            (Self::Pkcs11(b), None) => b.probe(deadline).await,
            (Self::Software(b), Some(key)) => health_round_trip(
                &mut (),
                |(), p| b.encrypt(key, p, b""),
                |(), s| b.decrypt(key, s, b""),
            ),
            (Self::Software(_), None) => Ok(()),
            (Self::Simulated(b), key) => b.health_check(key, deadline).await,
            (Self::Fleet(_), _) => Err(HsmError::Unavailable(
                "check a fleet's members one by one".into(),
            )),
        }
    }

    /// Facts about the EKM for GetHealthStatus.
    pub fn ekm_info(&self) -> &EkmInfo {
        match self {
            Self::Pkcs11(b) => b.ekm_info(),
            Self::Software(b) => b.ekm_info(),
            Self::Simulated(b) => b.ekm_info(),
            Self::Fleet(f) => f.members()[0].backend().ekm_info(),
        }
    }
}
