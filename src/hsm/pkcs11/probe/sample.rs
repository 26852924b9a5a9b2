//! The measuring core shared by `xks-proxy hsm probe` and `xks-loadtest hsm`: one
//! logged-in session with an AES key, encrypting and decrypting the way the proxy does
//! (the IV from [`IvSource`], the call through the proxy's own
//! `gcm_encrypt`, the output split by `split_gcm_output`), and a short closed-loop
//! sample of latency and throughput at a given number of sessions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cryptoki::context::{Function, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use hdrhistogram::Histogram;
use zeroize::Zeroizing;

use super::super::errors::login_ck;
use super::super::gcm::{gcm_encrypt, split_gcm_output, IvBatch};
use super::super::settings::IvSource;
use crate::hsm::faults::FaultInjector;
use crate::hsm::{Sealed, IV_LEN, TAG_LEN};

/// Which key a [`GcmSession`] works with.
#[derive(Debug, Clone)]
pub enum SampleKey {
    /// A fresh AES-256 session object (CKA_TOKEN false), destroyed when the session is
    /// dropped: needs no write access to the token and leaves nothing behind.
    Temporary,
    /// The token's secret key with this CKA_LABEL; with `session_copy`, a session
    /// copy of it (C_CopyObject, CKA_TOKEN false), as `hsm.session_key_copies` does.
    Token {
        /// CKA_LABEL (the external key id).
        label: String,
        /// Work on a session copy.
        session_copy: bool,
    },
}

/// The template of a temporary AES-256 key: a session object, sensitive, never
/// extractable, for encryption and decryption only.
pub(super) fn temporary_key_template() -> [Attribute; 9] {
    [
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Label(b"xks-proxy-probe".to_vec()),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
    ]
}

/// Calls the fault injector's hook for `function`, as the proxy's session threads do.
pub(super) fn inject(faults: Option<&FaultInjector>, function: Function) -> Result<(), CkError> {
    faults.map_or(Ok(()), |f| f.before(function))
}

/// Generates a temporary AES-256 session key (see [`SampleKey::Temporary`]).
pub(super) fn generate_temporary_key(
    session: &Session,
    faults: Option<&FaultInjector>,
) -> Result<ObjectHandle, CkError> {
    inject(faults, Function::GenerateKey)?;
    if faults.is_some_and(|f| f.lacks(MechanismType::AES_KEY_GEN)) {
        return Err(CkError::Pkcs11(
            RvError::MechanismInvalid,
            Function::GenerateKey,
        ));
    }
    session.generate_key(&Mechanism::AesKeyGen, &temporary_key_template())
}

/// The token's secret key labelled `label` (token objects only: another session's copy
/// of it is a session object with the same label).
pub fn find_token_key(session: &Session, label: &str) -> Result<ObjectHandle, String> {
    let handles = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Token(true),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .map_err(|e| format!("C_FindObjects: {e}"))?;
    match handles.as_slice() {
        [handle] => Ok(*handle),
        [] => Err(format!("no secret key labelled {label:?} on the token")),
        _ => Err(format!("several secret keys are labelled {label:?}")),
    }
}

/// One logged-in session with a key, encrypting and decrypting as the proxy does.
pub struct GcmSession {
    session: Session,
    key: ObjectHandle,
    /// Destroy `key` on drop (a temporary key or a session copy).
    owned: bool,
    iv_source: IvSource,
    ivs: IvBatch,
    faults: Option<Arc<FaultInjector>>,
}

impl std::fmt::Debug for GcmSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcmSession")
            .field("iv_source", &self.iv_source)
            .field("owned_key", &self.owned)
            .finish_non_exhaustive()
    }
}

impl GcmSession {
    /// Opens a session on `slot` (read-write with `read_write`), logs in (a process
    /// that is logged in already is fine) and gets the key.
    pub fn open(
        pkcs11: &Pkcs11,
        slot: Slot,
        pin: Option<&str>,
        key: &SampleKey,
        iv_source: IvSource,
        read_write: bool,
        faults: Option<Arc<FaultInjector>>,
    ) -> Result<Self, String> {
        let hook = faults.as_deref();
        inject(hook, Function::OpenSession).map_err(|e| format!("C_OpenSession: {e}"))?;
        let session = if read_write {
            pkcs11.open_rw_session(slot)
        } else {
            pkcs11.open_ro_session(slot)
        }
        .map_err(|e| format!("C_OpenSession: {e}"))?;
        if let Some(pin) = pin {
            let pin = AuthPin::new(pin.into());
            inject(hook, Function::Login)
                .and_then(|()| login_ck(&session, &pin))
                .map_err(|e| format!("C_Login: {e}"))?;
        }
        let (key, owned) = match key {
            SampleKey::Temporary => (
                generate_temporary_key(&session, hook)
                    .map_err(|e| format!("C_GenerateKey of a temporary AES-256 key: {e}"))?,
                true,
            ),
            SampleKey::Token {
                label,
                session_copy,
            } => {
                let key = find_token_key(&session, label)?;
                if *session_copy {
                    let copy = inject(hook, Function::CopyObject)
                        .and_then(|()| session.copy_object(key, &[Attribute::Token(false)]))
                        .map_err(|e| format!("C_CopyObject of the key into the session: {e}"))?;
                    (copy, true)
                } else {
                    (key, false)
                }
            }
        };
        Ok(Self {
            session,
            key,
            owned,
            iv_source,
            ivs: IvBatch::new(),
            faults,
        })
    }

    /// The session itself.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The key's handle.
    pub fn key(&self) -> ObjectHandle {
        self.key
    }

    /// Encrypts `plaintext` under `aad` as the proxy's `seal` does, IV and all.
    pub fn encrypt(&mut self, plaintext: &[u8], aad: &[u8]) -> Result<Sealed, String> {
        let mut iv = match self.iv_source {
            IvSource::HsmRandom => {
                if let Some(iv) = self.ivs.take() {
                    iv.map_err(|e| e.to_string())?.to_vec()
                } else {
                    // The refill's time counts against the encryption that needs it,
                    // as in the proxy.
                    let mut bytes = self.ivs.take_buffer();
                    let drawn = inject(self.faults.as_deref(), Function::GenerateRandom)
                        .and_then(|()| self.session.generate_random_slice(&mut bytes));
                    match drawn {
                        Ok(()) => self.ivs.filled(bytes),
                        Err(e) => {
                            self.ivs.put_back_unfilled(bytes);
                            return Err(format!("C_GenerateRandom: {e}"));
                        }
                    }
                    self.ivs
                        .take()
                        .unwrap_or(Err(crate::hsm::HsmError::Inconsistent(
                            "an IV batch was empty when filled",
                        )))
                        .map_err(|e| e.to_string())?
                        .to_vec()
                }
            }
            IvSource::ProxyRandom => {
                let mut iv = vec![0u8; IV_LEN];
                aws_lc_rs::rand::fill(&mut iv).map_err(|_| "the proxy's DRBG failed")?;
                iv
            }
            IvSource::HsmGenerated => vec![0u8; IV_LEN],
            IvSource::HsmAppended => Vec::new(),
        };
        let hook = self.faults.as_deref();
        let output = inject(hook, Function::Encrypt)
            .and_then(|()| gcm_encrypt(&self.session, self.key, &mut iv, aad, plaintext, hook))
            .map_err(|e| format!("C_Encrypt: {e}"))?;
        split_gcm_output(self.iv_source, plaintext.len(), output, iv).map_err(|e| e.to_string())
    }

    /// Decrypts `sealed` as the proxy's `open` does.
    pub fn decrypt(&mut self, sealed: &Sealed, aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, String> {
        let mut input = Vec::with_capacity(sealed.ciphertext.len() + TAG_LEN);
        input.extend_from_slice(&sealed.ciphertext);
        input.extend_from_slice(&sealed.tag);
        let mut iv = sealed.iv.clone();
        inject(self.faults.as_deref(), Function::Decrypt)
            .and_then(|()| GcmParams::new(&mut iv, aad, (TAG_LEN as u64 * 8).into()))
            .and_then(|params| {
                self.session
                    .decrypt(&Mechanism::AesGcm(params), self.key, &input)
            })
            .map(Zeroizing::new)
            .map_err(|e| format!("C_Decrypt: {e}"))
    }
}

impl Drop for GcmSession {
    fn drop(&mut self) {
        if self.owned {
            // Closing the session destroys its objects anyway; say so explicitly.
            let _ = self.session.destroy_object(self.key);
        }
    }
}

/// What one session count achieved.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SampleStep {
    /// Sessions, each on its own thread.
    pub sessions: usize,
    /// Encryptions completed per second, all sessions together.
    pub ops_per_second: f64,
    /// Median latency of one encryption, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile, milliseconds.
    pub p99_ms: f64,
    /// Calls that failed.
    pub errors: u64,
    /// The first error, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

/// One session thread's latencies (µs), errors and first error.
type ThreadSample = (Histogram<u64>, u64, Option<String>);

/// What [`sample`] needs to open its sessions.
#[derive(Debug, Clone)]
pub struct SampleTarget<'a> {
    /// The module.
    pub pkcs11: &'a Pkcs11,
    /// The token's slot.
    pub slot: Slot,
    /// The user PIN (`None`: the token needs no login).
    pub pin: Option<&'a str>,
    /// IV convention to encrypt with.
    pub iv_source: IvSource,
    /// Open read-write sessions.
    pub read_write: bool,
    /// The fault injector (tests).
    pub faults: Option<Arc<FaultInjector>>,
}

/// Closed loop: `sessions` threads, each with its own session and temporary key, encrypt
/// 32 bytes under 103 bytes of AAD (KMS's usual sizes) as fast as they can for
/// `duration`.
pub fn sample(target: &SampleTarget<'_>, sessions: usize, duration: Duration) -> SampleStep {
    let plaintext = [0x5a_u8; 32];
    let aad = [0x61_u8; 103];
    let results: Vec<Result<ThreadSample, String>> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..sessions)
            .map(|_| {
                scope.spawn(|| {
                    let mut session = GcmSession::open(
                        target.pkcs11,
                        target.slot,
                        target.pin,
                        &SampleKey::Temporary,
                        target.iv_source,
                        target.read_write,
                        target.faults.clone(),
                    )?;
                    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                        .map_err(|e| e.to_string())?;
                    let (mut errors, mut first_error) = (0, None);
                    let end = Instant::now() + duration;
                    while Instant::now() < end {
                        let began = Instant::now();
                        let result = session.encrypt(&plaintext, &aad);
                        let us = u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX);
                        histogram.saturating_record(us.max(1));
                        if let Err(e) = result {
                            errors += 1;
                            first_error.get_or_insert(e);
                        }
                    }
                    Ok((histogram, errors, first_error))
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err("a session thread panicked".into()))
            })
            .collect()
    });
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .expect("constant histogram bounds are valid");
    let (mut errors, mut first_error) = (0, None);
    for result in results {
        match result {
            Ok((h, e, first)) => {
                let _ = total.add(&h);
                errors += e;
                if first_error.is_none() {
                    first_error = first;
                }
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    let completed = total.len().saturating_sub(errors);
    let ms = |q: f64| {
        if total.is_empty() {
            0.0
        } else {
            total.value_at_quantile(q) as f64 / 1000.0
        }
    };
    SampleStep {
        sessions,
        ops_per_second: completed as f64 / duration.as_secs_f64().max(1e-3),
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        errors,
        first_error,
    }
}
