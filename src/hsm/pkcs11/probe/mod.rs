//! `xks-proxy hsm probe`: what a PKCS#11 module offers XKS, measured on the module
//! itself, and the `[hsm]` section that fits it.
//!
//! Read-only: the probe makes no token object. It generates one temporary AES-256
//! *session* key (CKA_TOKEN false, which needs no write access to the token) for the
//! IV and attribute checks, one per session for the sample, and destroys them. Logins
//! with a wrong PIN, which HSMs count towards locking the partition, happen only when
//! asked for (`try_wrong_pin`).
//!
//! Its parts: this file (the checks, in the order they run), `report` (the report, its
//! JSON schema, the text rendering, the recommended `[hsm]` section and the vendor
//! profiles), `sample` (the measuring core, shared with `xks-loadtest hsm`).
//!
//! Tests attach a [`FaultInjector`] through [`ProbeSettings::faults`], as they do with
//! [`Pkcs11Settings::faults`](super::Pkcs11Settings::faults): the probe's GCM calls go
//! through the proxy's own `gcm_encrypt`, so the injector's emulated vendor
//! conventions ([`VendorIv`](crate::hsm::faults::VendorIv)) and missing mechanisms
//! reach the probe exactly as they reach the proxy. The command line has no way to
//! attach one: a shipped binary whose behaviour changes with an environment variable
//! or the build profile would be one more thing to rule out when a probe surprises.

mod report;
mod sample;

pub use report::*;
pub use sample::{find_token_key, sample, GcmSession, SampleKey, SampleStep, SampleTarget};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::MechanismType;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::{Limit, Slot};
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use self::sample::{generate_temporary_key, inject};
use super::errors::{classify, login_ck, ErrorClass, PinRefusal};
use super::gcm::{gcm_encrypt, split_gcm_output};
use super::objects::KEY_ATTRIBUTES;
use super::settings::{IvSource, TokenSelector, APPENDED_IV_LEN};
use crate::hsm::faults::FaultInjector;
use crate::hsm::{IV_LEN, TAG_LEN};

/// What to probe, and how.
#[derive(Clone)]
pub struct ProbeSettings {
    /// Path of the PKCS#11 module.
    pub module: PathBuf,
    /// The token; `None`: the module's only initialized token.
    pub token: Option<TokenSelector>,
    /// The user PIN; `None`: no login (only a token that requires none can serve).
    pub pin: Option<Zeroizing<String>>,
    /// A token key (CKA_LABEL) to time against its session copy; `None`: the first AES
    /// key on the token, if any. Only read and copied into a session, never changed.
    pub key_label: Option<String>,
    /// Session counts of the latency and throughput sample (empty: no sample).
    pub sessions: Vec<usize>,
    /// How long each session count is measured.
    pub sample_duration: Duration,
    /// Also log in with an empty and a wrong PIN, to show what the module answers.
    /// HSMs lock a partition after a few failed logins: off unless asked for.
    pub try_wrong_pin: bool,
    /// The `[hsm]` settings of a configuration, to compare with what the probe finds.
    pub configured: Option<Configured>,
    /// Errors, latency and vendor conventions injected on command (tests only).
    pub faults: Option<Arc<FaultInjector>>,
}

impl std::fmt::Debug for ProbeSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeSettings")
            .field("module", &self.module)
            .field("token", &self.token)
            .field("pin", &self.pin.as_ref().map(|_| "<redacted>"))
            .field("key_label", &self.key_label)
            .field("sessions", &self.sessions)
            .field("sample_duration", &self.sample_duration)
            .field("try_wrong_pin", &self.try_wrong_pin)
            .field("configured", &self.configured)
            .field("faults", &self.faults.is_some())
            .finish()
    }
}

impl ProbeSettings {
    /// Settings for `module` with the defaults of the command line.
    pub fn new(module: PathBuf) -> Self {
        Self {
            module,
            token: None,
            pin: None,
            key_label: None,
            sessions: vec![1, 2, 4, 8],
            sample_duration: Duration::from_secs(1),
            try_wrong_pin: false,
            configured: None,
            faults: None,
        }
    }
}

impl ProbeSettings {
    /// The command line's settings: module, token and PIN from the flags, else from
    /// the first EKM of `config`, whose `[hsm.environment]` is applied to this process
    /// (call it before any other thread starts) and whose `[hsm]` settings the report
    /// compares with its recommendation.
    pub fn resolve(
        config: Option<&Path>,
        module: Option<PathBuf>,
        token: Option<TokenSelector>,
        pin_file: Option<&Path>,
    ) -> Result<Self, ProbeError> {
        let ekm = match config {
            Some(path) => {
                let config =
                    crate::config::Config::load(path).map_err(|e| ProbeError(e.to_string()))?;
                for (name, value) in &config.environment {
                    std::env::set_var(name, value);
                }
                match config.backend {
                    crate::hsm::BackendConfig::Pkcs11(ekms) => ekms.into_iter().next(),
                    _ => {
                        return Err(ProbeError(format!(
                            "{}: [hsm] is not a PKCS#11 backend",
                            path.display()
                        )))
                    }
                }
            }
            None => None,
        };
        let module = module
            .or_else(|| ekm.as_ref().map(|c| c.module.clone()))
            .ok_or_else(|| ProbeError("give --module (or --config)".into()))?;
        let mut settings = Self::new(module);
        settings.token = token.or_else(|| ekm.as_ref().map(|c| c.token.clone()));
        settings.pin = match pin_file {
            Some(file) => Some(
                std::fs::read_to_string(file)
                    .map_err(|e| ProbeError(format!("{}: {e}", file.display())))?
                    .trim_end_matches(['\r', '\n'])
                    .to_owned()
                    .into(),
            ),
            None => ekm.as_ref().map(|c| c.pin.clone()),
        };
        settings.configured = ekm.as_ref().map(|c| Configured {
            sessions: c.sessions,
            call_timeout_ms: u64::try_from(c.call_timeout.as_millis()).unwrap_or(u64::MAX),
            iv_source: c.iv_source,
            session_key_copies: c.session_key_copies,
            read_write_sessions: c.read_write_sessions,
        });
        Ok(settings)
    }
}

/// The settings of a configuration's `[hsm]` the probe has an opinion on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Configured {
    /// `hsm.sessions` (or the EKM's).
    pub sessions: usize,
    /// `hsm.call_timeout_ms`.
    pub call_timeout_ms: u64,
    /// `hsm.iv_source`.
    pub iv_source: IvSource,
    /// `hsm.session_key_copies`.
    pub session_key_copies: bool,
    /// `hsm.read_write_sessions`.
    pub read_write_sessions: bool,
}

/// Why a probe could not run at all (the module did not load or initialize). Anything
/// later is a finding in the report.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ProbeError(String);

const PLAINTEXT: &[u8] = b"xks-proxy hsm probe";
const AAD: &[u8] = b"xks-proxy hsm probe aad";

/// Probes the module. Fails only when the module cannot be loaded or initialized;
/// everything else, including a refused login, is in the report
/// ([`ProbeReport::serves_xks`] says whether the module can serve XKS).
pub fn probe(settings: &ProbeSettings) -> Result<ProbeReport, ProbeError> {
    let module = settings.module.display().to_string();
    let pkcs11 = Pkcs11::new(&settings.module)
        .map_err(|e| ProbeError(format!("cannot load PKCS#11 module {module}: {e}")))?;
    let initialized_here =
        match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) => true,
            Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => false,
            Err(e) => return Err(ProbeError(format!("C_Initialize failed: {e}"))),
        };
    let mut report = ProbeReport::new(module);
    report.library = pkcs11.get_library_info().ok().map(|info| LibraryReport {
        cryptoki_version: version(info.cryptoki_version()),
        manufacturer: info.manufacturer_id().trim().to_owned(),
        description: info.library_description().trim().to_owned(),
        version: version(info.library_version()),
    });
    let outcome = Probe {
        settings,
        pkcs11: &pkcs11,
        faults: settings.faults.as_deref(),
    }
    .run(&mut report);
    if let Err(problem) = outcome {
        report.problems.push(problem);
    }
    report.finish(settings.configured.as_ref());
    // Every session is closed by now, so the login ended with them. Finalize only what
    // this call initialized: another part of the process may be using the module.
    if initialized_here {
        let _ = pkcs11.finalize();
    }
    Ok(report)
}

struct Probe<'a> {
    settings: &'a ProbeSettings,
    pkcs11: &'a Pkcs11,
    faults: Option<&'a FaultInjector>,
}

impl Probe<'_> {
    /// The checks in order; an `Err` is a problem that ends the probe.
    fn run(&self, report: &mut ProbeReport) -> Result<(), String> {
        let slot = self.find_slot(report)?;
        self.slot_and_token(slot, report)?;
        self.mechanisms(slot, report);

        // A session, read-only unless the module refuses those (AWS CloudHSM).
        let (session, read_write) = self.open_session(slot)?;
        report.session.read_write_needed = read_write;
        report.session.without_login = Some(self.without_login(&session));
        if self.settings.try_wrong_pin {
            report.pin_checks = Some(self.wrong_pins(slot, &session));
        }
        self.login(&session, report)?;

        let key = generate_temporary_key(&session, self.faults).map_err(|e| {
            format!(
                "cannot generate an AES-256 key (C_GenerateKey, CKM_AES_KEY_GEN, 32 bytes): {e}"
            )
        })?;
        report.key_generation = Some("AES-256 session key generated".into());
        let iv = self.iv_conventions(&session, key);
        report
            .key_attributes
            .push(self.attributes(&session, key, "temporary session key"));
        let _ = session.destroy_object(key);
        report.iv = Some(iv);

        let token_key = self.token_key(&session);
        if let Some((label, handle)) = &token_key {
            report.key_attributes.push(self.attributes(
                &session,
                *handle,
                &format!("token key {label:?}"),
            ));
        }
        let iv_source = report.iv.as_ref().and_then(|iv| iv.iv_source);
        report.session_key_copies = Some(self.copies(&session, token_key.as_ref(), iv_source));
        drop(session);

        self.sample(slot, read_write, report);
        Ok(())
    }

    fn find_slot(&self, report: &mut ProbeReport) -> Result<Slot, String> {
        let slots = inject(self.faults, Function::GetSlotList)
            .and_then(|()| self.pkcs11.get_slots_with_token())
            .map_err(|e| format!("C_GetSlotList: {e}"))?;
        let mut candidates = Vec::new();
        for slot in slots {
            let Ok(info) = self.pkcs11.get_token_info(slot) else {
                continue;
            };
            let (label, serial) = (info.label().trim_end(), info.serial_number().trim_end());
            report.tokens_seen.push(TokenSeen {
                slot: slot.id(),
                label: label.to_owned(),
                serial: serial.to_owned(),
                initialized: info.token_initialized(),
            });
            let matches = match &self.settings.token {
                Some(TokenSelector::Label(l)) => label == l,
                Some(TokenSelector::Serial(s)) => serial == s,
                None => true,
            };
            if matches && info.token_initialized() {
                candidates.push(slot);
            }
        }
        match (candidates.as_slice(), &self.settings.token) {
            ([slot], _) => Ok(*slot),
            ([], Some(token)) => Err(format!("no initialized token with {token}")),
            ([], None) => Err("the module shows no initialized token".into()),
            (_, None) => Err(format!(
                "{} initialized tokens: choose one with --token-label or --token-serial",
                candidates.len()
            )),
            (_, Some(token)) => Err(format!(
                "{} tokens match {token}; select by serial instead",
                candidates.len()
            )),
        }
    }

    fn slot_and_token(&self, slot: Slot, report: &mut ProbeReport) -> Result<(), String> {
        if let Ok(info) = self.pkcs11.get_slot_info(slot) {
            report.slot = Some(SlotReport {
                id: slot.id(),
                description: info.slot_description().trim().to_owned(),
                manufacturer: info.manufacturer_id().trim().to_owned(),
                hardware_slot: info.hardware_slot(),
                removable_device: info.removable_device(),
            });
        }
        let info = self
            .pkcs11
            .get_token_info(slot)
            .map_err(|e| format!("C_GetTokenInfo: {e}"))?;
        let limit = |l: Limit| match l {
            Limit::Max(n) => SessionLimit::Max(n),
            Limit::Infinite => SessionLimit::Unlimited,
            Limit::Unavailable => SessionLimit::NotReported,
        };
        report.token = Some(TokenReport {
            label: info.label().trim_end().to_owned(),
            manufacturer: info.manufacturer_id().trim().to_owned(),
            model: info.model().trim().to_owned(),
            serial: info.serial_number().trim().to_owned(),
            hardware_version: version(info.hardware_version()),
            firmware_version: version(info.firmware_version()),
            max_sessions: limit(info.max_session_count()),
            sessions_open: info.session_count(),
            max_rw_sessions: limit(info.max_rw_session_count()),
            rw_sessions_open: info.rw_session_count(),
            flags: TokenFlags::of(&info),
        });
        Ok(())
    }

    /// C_GetMechanismInfo of each mechanism XKS needs: CKR_MECHANISM_INVALID means the
    /// token lacks it. (Not C_GetMechanismList: the list is long on real HSMs, and
    /// cryptoki logs an error for every vendor mechanism in it that it does not know.)
    fn mechanisms(&self, slot: Slot, report: &mut ProbeReport) {
        for (name, mechanism) in [
            ("CKM_AES_GCM", MechanismType::AES_GCM),
            ("CKM_AES_KEY_GEN", MechanismType::AES_KEY_GEN),
        ] {
            let mut found = MechanismReport {
                name: name.to_owned(),
                ..MechanismReport::default()
            };
            let info = inject(self.faults, Function::GetMechanismInfo).and_then(|()| {
                if self.faults.is_some_and(|f| f.lacks(mechanism)) {
                    Err(CkError::Pkcs11(
                        RvError::MechanismInvalid,
                        Function::GetMechanismInfo,
                    ))
                } else {
                    self.pkcs11.get_mechanism_info(slot, mechanism)
                }
            });
            match info {
                Ok(info) => {
                    found.supported = true;
                    found.min_key_size = Some(info.min_key_size());
                    found.max_key_size = Some(info.max_key_size());
                    found.encrypt = info.encrypt();
                    found.decrypt = info.decrypt();
                    found.generate = info.generate();
                    found.hardware = info.hardware();
                }
                Err(CkError::Pkcs11(RvError::MechanismInvalid, _)) => {}
                Err(e) => found.error = Some(format!("C_GetMechanismInfo: {}", answer(&e))),
            }
            report.mechanisms.push(found);
        }
    }

    fn open_session(&self, slot: Slot) -> Result<(Session, bool), String> {
        let open = |rw: bool| {
            inject(self.faults, Function::OpenSession).and_then(|()| {
                if rw {
                    self.pkcs11.open_rw_session(slot)
                } else {
                    self.pkcs11.open_ro_session(slot)
                }
            })
        };
        match open(false) {
            Ok(session) => Ok((session, false)),
            Err(ro) => match open(true) {
                Ok(session) => Ok((session, true)),
                Err(rw) => Err(format!(
                    "cannot open a session: read-only: {ro}; read-write: {rw}"
                )),
            },
        }
    }

    /// What using the token without a login gives: a private session key is generated
    /// (and destroyed at once if the module allows it). No login is attempted, so
    /// nothing counts towards a lockout.
    fn without_login(&self, session: &Session) -> String {
        match generate_temporary_key(session, self.faults) {
            Ok(key) => {
                let _ = session.destroy_object(key);
                "allowed: the module generates private keys without a login".into()
            }
            Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {
                "not checked: this process is logged in already".into()
            }
            Err(e) => answer(&e),
        }
    }

    /// An empty and a wrong PIN, each in its own C_Login, then the token's PIN flags.
    fn wrong_pins(&self, slot: Slot, session: &Session) -> PinChecks {
        let try_pin =
            |pin: &str| match session.login(UserType::User, Some(&AuthPin::new(pin.into()))) {
                Ok(()) => {
                    let _ = session.logout();
                    "accepted (!)".to_owned()
                }
                Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {
                    "not checked: this process is logged in already".to_owned()
                }
                Err(e) => answer(&e),
            };
        let empty = try_pin("");
        let wrong = try_pin("xks-proxy-probe-not-the-pin");
        let flags_after = self
            .pkcs11
            .get_token_info(slot)
            .ok()
            .map(|info| TokenFlags::of(&info));
        PinChecks {
            empty_pin: empty,
            wrong_pin: wrong,
            flags_after,
        }
    }

    fn login(&self, session: &Session, report: &mut ProbeReport) -> Result<(), String> {
        let required = report
            .token
            .as_ref()
            .map_or(true, |t| t.flags.login_required);
        let Some(pin) = &self.settings.pin else {
            if required {
                report.session.login = "no PIN given".into();
                return Err(
                    "the token requires a login: give the user PIN (--pin-file or --config)".into(),
                );
            }
            report.session.login = "not required".into();
            return Ok(());
        };
        let result = inject(self.faults, Function::Login)
            .and_then(|()| login_ck(session, &AuthPin::new(pin.as_str().into())));
        match result {
            Ok(()) => {
                report.session.login = "ok".into();
                Ok(())
            }
            Err(e) => {
                report.session.login = answer(&e);
                Err(format!("login failed: {}", answer(&e)))
            }
        }
    }

    /// The four IV conventions, each tried with one encryption and checked by
    /// decrypting what came back.
    fn iv_conventions(&self, session: &Session, key: ObjectHandle) -> IvReport {
        let mut caller = [0u8; IV_LEN];
        let caller_iv = match aws_lc_rs::rand::fill(&mut caller) {
            Ok(()) => self.try_iv(session, key, caller.to_vec(), IvSource::HsmRandom),
            Err(_) => Trial::failed("the proxy's DRBG failed"),
        };
        let zeroed_buffer = self.try_iv(session, key, vec![0; IV_LEN], IvSource::HsmGenerated);
        let appended = self.try_iv(session, key, Vec::new(), IvSource::HsmAppended);
        let rng = inject(self.faults, Function::GenerateRandom)
            .and_then(|()| session.generate_random_slice(&mut [0u8; IV_LEN]))
            .map_err(|e| answer(&e));
        let (convention, iv_source) = if caller_iv.works {
            let source = if rng.is_ok() {
                IvSource::HsmRandom
            } else {
                IvSource::ProxyRandom
            };
            (IvConvention::CallerIv, Some(source))
        } else if zeroed_buffer.works {
            (
                IvConvention::FillsZeroedBuffer,
                Some(IvSource::HsmGenerated),
            )
        } else if appended.works {
            (IvConvention::AppendsAfterTag, Some(IvSource::HsmAppended))
        } else {
            (IvConvention::Refused, None)
        };
        IvReport {
            caller_iv,
            zeroed_buffer,
            appended,
            generate_random: match rng {
                Ok(()) => "ok".into(),
                Err(e) => e,
            },
            convention,
            iv_source,
        }
    }

    /// One encryption with `iv` as the IV buffer, read as `as_source` reads it, and
    /// the decryption of the result.
    fn try_iv(
        &self,
        session: &Session,
        key: ObjectHandle,
        mut iv: Vec<u8>,
        as_source: IvSource,
    ) -> Trial {
        let given = iv.clone();
        let output = match inject(self.faults, Function::Encrypt)
            .and_then(|()| gcm_encrypt(session, key, &mut iv, AAD, PLAINTEXT, self.faults))
        {
            Ok(output) => output,
            Err(e) => return Trial::failed(format!("refused: {}", answer(&e))),
        };
        let len = output.len();
        let changed = iv != given;
        if as_source == IvSource::HsmGenerated && !changed && len == PLAINTEXT.len() + TAG_LEN {
            return Trial::failed(
                "encrypted with the all-zero IV as given: the module takes the caller's IV",
            );
        }
        if as_source == IvSource::HsmRandom && changed {
            return Trial::failed(
                "the module overwrote the caller's IV: it picks its own (the zeroed-buffer convention)",
            );
        }
        let sealed = match split_gcm_output(as_source, PLAINTEXT.len(), output, iv) {
            Ok(sealed) => sealed,
            Err(e) => {
                let expected = match as_source {
                    IvSource::HsmAppended => PLAINTEXT.len() + TAG_LEN + APPENDED_IV_LEN,
                    _ => PLAINTEXT.len() + TAG_LEN,
                };
                return Trial::failed(format!(
                    "encrypted, but not this convention: {e} ({len} bytes out, {expected} expected)"
                ));
            }
        };
        let mut input = sealed.ciphertext.clone();
        input.extend_from_slice(&sealed.tag);
        let mut iv = sealed.iv.clone();
        let decrypted =
            cryptoki::mechanism::aead::GcmParams::new(&mut iv, AAD, (TAG_LEN as u64 * 8).into())
                .and_then(|params| {
                    session.decrypt(&cryptoki::mechanism::Mechanism::AesGcm(params), key, &input)
                });
        match decrypted {
            Ok(plaintext) if plaintext == PLAINTEXT => Trial {
                works: true,
                detail: format!(
                    "works: {}-byte IV, {len} bytes out, decrypts back",
                    sealed.iv.len()
                ),
            },
            Ok(_) => Trial::failed("encrypted, but decrypting gave another plaintext"),
            Err(e) => Trial::failed(format!(
                "encrypted, but the result does not decrypt: {}",
                answer(&e)
            )),
        }
    }

    /// Which of the attributes GetKeyMetadata reads come back for `key`.
    fn attributes(&self, session: &Session, key: ObjectHandle, what: &str) -> AttributeReport {
        let mut report = AttributeReport {
            key: what.to_owned(),
            readable: Vec::new(),
            unreadable: Vec::new(),
            error: None,
        };
        let read = inject(self.faults, Function::GetAttributeValue)
            .and_then(|()| session.get_attributes(key, &KEY_ATTRIBUTES));
        match read {
            Ok(attributes) => {
                let got: Vec<AttributeType> =
                    attributes.iter().map(Attribute::attribute_type).collect();
                for wanted in KEY_ATTRIBUTES {
                    let name = attribute_name(wanted);
                    if got.contains(&wanted) {
                        report.readable.push(name);
                    } else {
                        report.unreadable.push(name);
                    }
                }
            }
            Err(e) => report.error = Some(format!("C_GetAttributeValue: {}", answer(&e))),
        }
        report
    }

    /// The token key to time against its copy: the one named, else the first AES key.
    fn token_key(&self, session: &Session) -> Option<(String, ObjectHandle)> {
        if let Some(label) = &self.settings.key_label {
            return find_token_key(session, label)
                .ok()
                .map(|h| (label.clone(), h));
        }
        let found = session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Token(true),
                Attribute::KeyType(KeyType::AES),
                Attribute::Encrypt(true),
            ])
            .ok()?;
        let handle = *found.first()?;
        let label = session
            .get_attributes(handle, &[AttributeType::Label])
            .ok()?
            .into_iter()
            .find_map(|a| match a {
                Attribute::Label(l) => Some(String::from_utf8_lossy(&l).into_owned()),
                _ => None,
            })?;
        Some((label, handle))
    }

    /// Whether a key copies into a session object, and whether encrypting with the
    /// copy is faster than with the token object.
    fn copies(
        &self,
        session: &Session,
        token_key: Option<&(String, ObjectHandle)>,
        iv_source: Option<IvSource>,
    ) -> CopyReport {
        let mut report = CopyReport::default();
        let (source, label) = match token_key {
            Some((label, handle)) => (*handle, Some(label.clone())),
            None => match generate_temporary_key(session, self.faults) {
                Ok(key) => (key, None),
                Err(e) => {
                    report.copy = format!("not checked: no key ({})", answer(&e));
                    return report;
                }
            },
        };
        report.token_key = label.clone();
        let copy = inject(self.faults, Function::CopyObject)
            .and_then(|()| session.copy_object(source, &[Attribute::Token(false)]));
        match copy {
            Ok(copy) => {
                report.copy = "works".into();
                report.works = true;
                if let (Some(_), Some(iv_source)) = (&label, iv_source) {
                    report.token_object_us = self.median_us(session, source, iv_source);
                    report.session_copy_us = self.median_us(session, copy, iv_source);
                    if let (Some(token), Some(copy)) =
                        (report.token_object_us, report.session_copy_us)
                    {
                        // A clear margin, not noise: a tenth less time per call.
                        report.faster = Some(copy * 10 < token * 9);
                    }
                }
                let _ = session.destroy_object(copy);
            }
            Err(e) => report.copy = format!("refused: {}", answer(&e)),
        }
        if label.is_none() {
            let _ = session.destroy_object(source);
        }
        report
    }

    /// Median time of 100 encryptions with `key` in the module's IV convention,
    /// microseconds. Caller IVs are random: the key may be a production key.
    fn median_us(&self, session: &Session, key: ObjectHandle, iv_source: IvSource) -> Option<u64> {
        let mut times = Vec::with_capacity(100);
        for _ in 0..100 {
            let mut iv = match iv_source {
                IvSource::HsmRandom | IvSource::ProxyRandom => {
                    let mut iv = vec![0u8; IV_LEN];
                    aws_lc_rs::rand::fill(&mut iv).ok()?;
                    iv
                }
                IvSource::HsmGenerated => vec![0u8; IV_LEN],
                IvSource::HsmAppended => Vec::new(),
            };
            let began = Instant::now();
            gcm_encrypt(session, key, &mut iv, AAD, PLAINTEXT, self.faults).ok()?;
            times.push(u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX));
        }
        times.sort_unstable();
        times.get(times.len() / 2).copied()
    }

    fn sample(&self, slot: Slot, read_write: bool, report: &mut ProbeReport) {
        let Some(iv_source) = report.iv.as_ref().and_then(|iv| iv.iv_source) else {
            return;
        };
        let target = SampleTarget {
            pkcs11: self.pkcs11,
            slot,
            pin: self.settings.pin.as_deref().map(String::as_str),
            iv_source,
            read_write,
            faults: self.settings.faults.clone(),
        };
        for &sessions in &self.settings.sessions {
            if sessions == 0 {
                continue;
            }
            report
                .sample
                .push(sample(&target, sessions, self.settings.sample_duration));
        }
    }
}

fn version(v: cryptoki::types::Version) -> String {
    format!("{}.{}", v.major(), v.minor())
}

/// A PKCS#11 error as the module returned it, and what the proxy makes of it.
fn answer(e: &CkError) -> String {
    let CkError::Pkcs11(rv, function) = e else {
        return e.to_string();
    };
    let code = ck_name(*rv);
    let meaning = match PinRefusal::of(e) {
        Some(refusal) => format!("the proxy suspends logins: {}", refusal.reason()),
        None => match classify(e) {
            ErrorClass::Request => "the proxy answers the request with an error".into(),
            ErrorClass::StaleHandle => "the proxy looks the key up again".into(),
            ErrorClass::Session { .. } => "the proxy opens a new session and logs in".into(),
            ErrorClass::Token => "the proxy looks for the token again".into(),
            ErrorClass::Module => "the proxy re-initializes the module".into(),
        },
    };
    format!("{code} from {function:?} ({meaning})")
}

/// `CKR_PIN_INCORRECT` for `PinIncorrect`: the names the PKCS#11 standard and vendor
/// manuals use (cryptoki's `Display` is the standard's long description instead).
fn ck_name(rv: RvError) -> String {
    let mut name = String::from("CKR");
    for c in format!("{rv:?}").chars() {
        if c.is_ascii_uppercase() {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

fn attribute_name(attribute: AttributeType) -> String {
    attribute.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_read_as_the_standard_names_them() {
        assert_eq!(ck_name(RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(ck_name(RvError::MechanismInvalid), "CKR_MECHANISM_INVALID");
        assert_eq!(attribute_name(AttributeType::ValueLen), "CKA_VALUE_LEN");
        assert_eq!(attribute_name(AttributeType::KeyType), "CKA_KEY_TYPE");
    }
}
