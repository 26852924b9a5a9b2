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
//! dropped at once when the HSM reports the handle stale.
//!
//! We use dedicated threads and a channel rather than deadpool: deadpool hands pooled
//! objects to async tasks, which would then need `spawn_blocking` per call to get off
//! the tokio workers. A thread that owns its session needs no handoff of the session.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use parking_lot::RwLock;
use zeroize::Zeroizing;

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

/// Where the GCM IV comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IvSource {
    /// The proxy asks the HSM's RNG (C_GenerateRandom) for 12 bytes and passes them in.
    #[default]
    HsmRandom,
    /// The HSM fills a zeroed 12-byte IV buffer itself (HSMs that refuse caller IVs in
    /// FIPS mode).
    HsmGenerated,
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
            .finish()
    }
}

/// A key handle with the attributes read with it.
#[derive(Debug, Clone)]
struct CachedKey {
    handle: ObjectHandle,
    /// `handle` is this proxy's session copy of the token key (destroyed when replaced).
    copied: bool,
    metadata: KeyMetadata,
    read_at: Instant,
}

/// What the session threads share.
struct Shared {
    pkcs11: Pkcs11,
    slot: Slot,
    pin: AuthPin,
    /// Handles are per application, not per session, so one cache serves all threads.
    keys: RwLock<HashMap<String, CachedKey>>,
    iv_source: IvSource,
    session_key_copies: bool,
    key_refresh: Duration,
}

/// The PKCS#11 backend; cheap to share behind an `Arc`.
pub struct Pkcs11Backend {
    pool: Pool<Worker>,
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

impl Pkcs11Backend {
    /// Connects to the token, logs in and starts the session threads.
    pub fn connect(settings: &Pkcs11Settings, metrics: Arc<Metrics>) -> Result<Self, HsmError> {
        let (pkcs11, slot, first_session) =
            open_token(&settings.module, &settings.token, &settings.pin)?;
        let token = pkcs11.get_token_info(slot).map_err(ck("C_GetTokenInfo"))?;
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
        let shared = Arc::new(Shared {
            pkcs11,
            slot,
            pin: AuthPin::new(settings.pin.as_str().into()),
            keys: RwLock::new(HashMap::new()),
            iv_source: settings.iv_source,
            session_key_copies: settings.session_key_copies,
            key_refresh: settings.key_refresh,
        });
        let mut first_session = Some(first_session);
        let workers = (0..settings.sessions.max(1))
            .map(|_| {
                let mut worker = Worker {
                    shared: Arc::clone(&shared),
                    session: first_session.take(),
                };
                // Open every session now so the first requests don't pay for it; a
                // failure here is retried on the session's first job.
                if let Err(e) = worker.session() {
                    tracing::warn!(error = %e, "could not open a PKCS#11 session yet");
                }
                worker
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
            info,
            versions: Arc::new(RwLock::new(HashMap::new())),
            key_refresh: settings.key_refresh,
        })
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
            .run("KeyVersion", deadline, move |w| {
                w.call(|s| current_version(s, &id), "C_FindObjects")
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
            .run("GetKeyMetadata", deadline, move |w| {
                w.forget(&key_id);
                w.key(&key_id).map(|k| k.metadata)
            })
            .await
    }

    /// A deep check: encrypt and decrypt with `key_id` in one trip to a session.
    pub async fn health_check(&self, key_id: &str, deadline: Instant) -> Result<(), HsmError> {
        let key_id = key_id.to_owned();
        self.pool
            .run("HealthCheck", deadline, move |w| {
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
            .run("HealthCheck", deadline, |w| {
                w.call(|s| s.get_session_info(), "C_GetSessionInfo")
                    .map(|_| ())
            })
            .await
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

/// A session thread's state.
struct Worker {
    shared: Arc<Shared>,
    session: Option<Session>,
}

/// What to do after a PKCS#11 call failed.
enum Recovery {
    /// The key handle is stale: look the key up again.
    RefindKey,
    /// The session is gone or logged out: open a new one.
    ReopenSession,
    /// Nothing to retry.
    None,
}

fn recovery_for(error: &CkError) -> Recovery {
    match error {
        CkError::Pkcs11(RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid, _) => {
            Recovery::RefindKey
        }
        CkError::Pkcs11(
            RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::UserNotLoggedIn
            | RvError::DeviceRemoved
            | RvError::TokenNotPresent,
            _,
        ) => Recovery::ReopenSession,
        _ => Recovery::None,
    }
}

impl Worker {
    fn session(&mut self) -> Result<&Session, HsmError> {
        if self.session.is_none() {
            let session = self
                .shared
                .pkcs11
                .open_ro_session(self.shared.slot)
                .map_err(ck("C_OpenSession"))?;
            login(&session, &self.shared.pin)?;
            self.session = Some(session);
        }
        Ok(self.session.as_ref().expect("set just above"))
    }

    fn forget(&mut self, key_id: &str) {
        let old = self.shared.keys.write().remove(key_id);
        self.discard(old);
    }

    /// Destroys a replaced session copy. Another session may be using it right now: its
    /// call fails with an invalid handle and looks the key up again.
    fn discard(&mut self, old: Option<CachedKey>) {
        if let (Some(old), Some(session)) = (old.filter(|k| k.copied), self.session.as_ref()) {
            if let Err(e) = session.destroy_object(old.handle) {
                tracing::debug!(error = %e, "could not destroy a session copy of a key");
            }
        }
    }

    /// The key's handle and attributes, from the cache when fresh.
    fn key(&mut self, key_id: &str) -> Result<CachedKey, HsmError> {
        if let Some(key) = self.shared.keys.read().get(key_id) {
            if key.read_at.elapsed() < self.shared.key_refresh {
                return Ok(key.clone());
            }
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

    fn find_key(&mut self, key_id: &str) -> Result<CachedKey, HsmError> {
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Token(true),
            Attribute::Label(key_id.as_bytes().to_vec()),
        ];
        let handles = self.call(|s| s.find_objects(&template), "C_FindObjects")?;
        let handle = match handles.as_slice() {
            [handle] => *handle,
            [] => return Err(HsmError::KeyNotFound),
            _ => return Err(HsmError::AmbiguousKey),
        };
        let attributes = self.call(
            |s| s.get_attributes(handle, &KEY_ATTRIBUTES),
            "C_GetAttributeValue",
        )?;
        // Disabling applies to the external key, every version of it.
        let disabled = self.call(
            |s| is_disabled(s, super::base_key_id(key_id)),
            "C_FindObjects",
        )?;
        // A session copy spares modules that re-check token objects on every use
        // (SoftHSM2 stats and locks the object's file in each C_EncryptInit). The copy
        // carries the same attributes; a module that refuses to copy keeps the original.
        let (handle, copied) = if self.shared.session_key_copies {
            match self.call(
                |s| s.copy_object(handle, &[Attribute::Token(false)]),
                "C_CopyObject",
            ) {
                Ok(copy) => (copy, true),
                Err(e) => {
                    tracing::warn!(key_id, error = %e, "cannot copy the key into the session; using the token object");
                    (handle, false)
                }
            }
        } else {
            (handle, false)
        };
        Ok(CachedKey {
            handle,
            copied,
            metadata: metadata_from_attributes(&attributes, disabled),
            read_at: Instant::now(),
        })
    }

    /// Runs a session call, reopening the session once if it was lost.
    fn call<T>(
        &mut self,
        f: impl Fn(&Session) -> Result<T, CkError>,
        function: &'static str,
    ) -> Result<T, HsmError> {
        let first = f(self.session()?);
        match first {
            Err(ref e) if matches!(recovery_for(e), Recovery::ReopenSession) => {
                tracing::warn!(error = ?e, "PKCS#11 session lost; reopening");
                self.session = None;
                f(self.session()?).map_err(ck(function))
            }
            other => other.map_err(ck(function)),
        }
    }

    /// Runs a cryptographic call on a key, recovering once from a stale handle or a lost
    /// session. `map` turns call errors into client-meaningful [`HsmError`]s.
    fn with_key<T>(
        &mut self,
        key_id: &str,
        operation: Operation,
        f: impl Fn(&Session, ObjectHandle) -> Result<T, CkError>,
        map: impl Fn(CkError) -> HsmError,
    ) -> Result<T, HsmError> {
        let mut retried = false;
        loop {
            let key = self.key(key_id)?;
            key.metadata.check(operation)?;
            let result = f(self.session()?, key.handle);
            match result {
                Ok(value) => return Ok(value),
                Err(e) if !retried => match recovery_for(&e) {
                    Recovery::RefindKey => {
                        tracing::info!(key_id, "stale key handle; looking the key up again");
                        self.forget(key_id);
                    }
                    Recovery::ReopenSession => {
                        tracing::warn!(error = ?e, "PKCS#11 session lost; reopening");
                        self.session = None;
                    }
                    Recovery::None => return Err(map(e)),
                },
                Err(e) => return Err(map(e)),
            }
            retried = true;
        }
    }

    fn encrypt(&mut self, key_id: &str, plaintext: &[u8], aad: &[u8]) -> Result<Sealed, HsmError> {
        let iv_source = self.shared.iv_source;
        let (mut output, iv) = self.with_key(
            key_id,
            Operation::Encrypt,
            |session, handle| {
                let mut iv = [0u8; IV_LEN];
                if iv_source == IvSource::HsmRandom {
                    session.generate_random_slice(&mut iv)?;
                }
                let output = {
                    let params = GcmParams::new(&mut iv, aad, (TAG_LEN as u64 * 8).into())?;
                    session.encrypt(&Mechanism::AesGcm(params), handle, plaintext)?
                };
                Ok((output, iv))
            },
            |e| map_crypto_error(e, Operation::Encrypt),
        )?;
        if iv == [0u8; IV_LEN] {
            // A zero IV means the HSM did not fill it in (or the RNG returned zeros):
            // refuse to hand out a ciphertext whose IV may repeat.
            return Err(HsmError::Inconsistent("HSM returned an all-zero GCM IV"));
        }
        if output.len() != plaintext.len() + TAG_LEN {
            return Err(HsmError::Inconsistent(
                "AES-GCM output has the wrong length",
            ));
        }
        // The module appends the tag to the ciphertext; the spec wants them apart.
        let tag: [u8; TAG_LEN] = output[plaintext.len()..]
            .try_into()
            .expect("length checked just above");
        output.truncate(plaintext.len());
        Ok(Sealed {
            iv: iv.to_vec(),
            ciphertext: output,
            tag,
        })
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
}
