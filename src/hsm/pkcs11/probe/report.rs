//! The probe's report: its JSON schema (`--json`, documented in docs/hsm-onboarding.md,
//! "The JSON report"), the verdict, the `[hsm]` section it recommends, the vendor
//! profile it matches, and the text an operator reads.

use std::fmt::Write as _;

use serde::Serialize;

use super::sample::SampleStep;
use super::Configured;
use crate::hsm::pkcs11::IvSource;

/// The `schema` value of this version of the report. Fields are only ever added under
/// it; a change of meaning gets a new one.
pub const PROBE_SCHEMA: &str = "xks-proxy/hsm-probe/1";

/// Everything the probe found.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    /// [`PROBE_SCHEMA`].
    pub schema: &'static str,
    /// The module's path.
    pub module: String,
    /// C_GetInfo.
    pub library: Option<LibraryReport>,
    /// Every slot with a token (C_GetSlotList, C_GetTokenInfo).
    pub tokens_seen: Vec<TokenSeen>,
    /// The chosen token's slot (C_GetSlotInfo).
    pub slot: Option<SlotReport>,
    /// The chosen token (C_GetTokenInfo).
    pub token: Option<TokenReport>,
    /// CKM_AES_GCM and CKM_AES_KEY_GEN.
    pub mechanisms: Vec<MechanismReport>,
    /// The session and the login.
    pub session: SessionReport,
    /// Only with `--try-wrong-pin`.
    pub pin_checks: Option<PinChecks>,
    /// Whether the temporary AES-256 key could be generated.
    pub key_generation: Option<String>,
    /// The IV conventions tried, and the one the module follows.
    pub iv: Option<IvReport>,
    /// The attributes GetKeyMetadata reads, per key tried.
    pub key_attributes: Vec<AttributeReport>,
    /// Session key copies.
    pub session_key_copies: Option<CopyReport>,
    /// Latency and throughput at each session count.
    pub sample: Vec<SampleStep>,
    /// The example configuration of the vendor the module looks like.
    pub vendor_profile: Option<VendorProfile>,
    /// The `[hsm]` settings that fit the module (absent when it cannot serve XKS).
    pub recommended: Option<Recommended>,
    /// Where a given configuration differs from `recommended`.
    pub differences: Vec<String>,
    /// Why the module cannot serve XKS; empty when it can.
    pub problems: Vec<String>,
    /// Whether the module can serve XKS (no problems).
    pub serves_xks: bool,
}

/// C_GetInfo.
#[derive(Debug, Clone, Serialize)]
pub struct LibraryReport {
    /// The PKCS#11 version the library implements.
    pub cryptoki_version: String,
    /// manufacturerID.
    pub manufacturer: String,
    /// libraryDescription.
    pub description: String,
    /// libraryVersion.
    pub version: String,
}

/// A slot with a token.
#[derive(Debug, Clone, Serialize)]
pub struct TokenSeen {
    /// Slot id (not stable on real HSMs: select tokens by label or serial).
    pub slot: u64,
    /// Token label.
    pub label: String,
    /// Token serial.
    pub serial: String,
    /// CKF_TOKEN_INITIALIZED.
    pub initialized: bool,
}

/// C_GetSlotInfo.
#[derive(Debug, Clone, Serialize)]
pub struct SlotReport {
    /// Slot id.
    pub id: u64,
    /// slotDescription.
    pub description: String,
    /// manufacturerID.
    pub manufacturer: String,
    /// CKF_HW_SLOT.
    pub hardware_slot: bool,
    /// CKF_REMOVABLE_DEVICE.
    pub removable_device: bool,
}

/// A session limit as the token reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionLimit {
    /// At most this many.
    Max(u64),
    /// CK_EFFECTIVELY_INFINITE.
    Unlimited,
    /// CK_UNAVAILABLE_INFORMATION.
    NotReported,
}

impl std::fmt::Display for SessionLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Max(n) => write!(f, "{n}"),
            Self::Unlimited => f.write_str("unlimited"),
            Self::NotReported => f.write_str("not reported"),
        }
    }
}

/// C_GetTokenInfo.
#[derive(Debug, Clone, Serialize)]
pub struct TokenReport {
    /// label.
    pub label: String,
    /// manufacturerID.
    pub manufacturer: String,
    /// model.
    pub model: String,
    /// serialNumber.
    pub serial: String,
    /// hardwareVersion.
    pub hardware_version: String,
    /// firmwareVersion.
    pub firmware_version: String,
    /// ulMaxSessionCount.
    pub max_sessions: SessionLimit,
    /// ulSessionCount (all applications), when reported.
    pub sessions_open: Option<u64>,
    /// ulMaxRwSessionCount.
    pub max_rw_sessions: SessionLimit,
    /// ulRwSessionCount, when reported.
    pub rw_sessions_open: Option<u64>,
    /// The flags that matter.
    pub flags: TokenFlags,
}

/// The token flags that matter to XKS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TokenFlags {
    /// CKF_LOGIN_REQUIRED.
    pub login_required: bool,
    /// CKF_RNG: the token has a random number generator (`iv_source = "hsm_random"`).
    pub rng: bool,
    /// CKF_CLOCK_ON_TOKEN.
    pub clock_on_token: bool,
    /// CKF_TOKEN_INITIALIZED.
    pub token_initialized: bool,
    /// CKF_USER_PIN_INITIALIZED.
    pub user_pin_initialized: bool,
    /// CKF_USER_PIN_COUNT_LOW: a wrong PIN was given since the last good login.
    pub user_pin_count_low: bool,
    /// CKF_USER_PIN_FINAL_TRY: one more wrong PIN locks it.
    pub user_pin_final_try: bool,
    /// CKF_USER_PIN_LOCKED.
    pub user_pin_locked: bool,
    /// CKF_USER_PIN_TO_BE_CHANGED.
    pub user_pin_to_be_changed: bool,
    /// CKF_WRITE_PROTECTED.
    pub write_protected: bool,
    /// CKF_PROTECTED_AUTHENTICATION_PATH (a PIN pad or PED).
    pub protected_authentication_path: bool,
}

impl TokenFlags {
    pub(super) fn of(info: &cryptoki::slot::TokenInfo) -> Self {
        Self {
            login_required: info.login_required(),
            rng: info.rng(),
            clock_on_token: info.clock_on_token(),
            token_initialized: info.token_initialized(),
            user_pin_initialized: info.user_pin_initialized(),
            user_pin_count_low: info.user_pin_count_low(),
            user_pin_final_try: info.user_pin_final_try(),
            user_pin_locked: info.user_pin_locked(),
            user_pin_to_be_changed: info.user_pin_to_be_changed(),
            write_protected: info.write_protected(),
            protected_authentication_path: info.protected_authentication_path(),
        }
    }

    fn set(&self) -> Vec<&'static str> {
        [
            (self.login_required, "login required"),
            (self.rng, "RNG"),
            (self.clock_on_token, "clock"),
            (self.token_initialized, "initialized"),
            (self.user_pin_initialized, "user PIN initialized"),
            (self.user_pin_count_low, "USER PIN COUNT LOW"),
            (self.user_pin_final_try, "USER PIN FINAL TRY"),
            (self.user_pin_locked, "USER PIN LOCKED"),
            (self.user_pin_to_be_changed, "user PIN to be changed"),
            (self.write_protected, "write-protected"),
            (
                self.protected_authentication_path,
                "protected authentication path",
            ),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect()
    }
}

/// One mechanism (C_GetMechanismInfo). Key sizes as the module
/// reports them: bytes for AES by the standard, though some modules report bits.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MechanismReport {
    /// CKM_ name.
    pub name: String,
    /// The token has it (C_GetMechanismInfo answers).
    pub supported: bool,
    /// ulMinKeySize.
    pub min_key_size: Option<usize>,
    /// ulMaxKeySize.
    pub max_key_size: Option<usize>,
    /// CKF_ENCRYPT.
    pub encrypt: bool,
    /// CKF_DECRYPT.
    pub decrypt: bool,
    /// CKF_GENERATE.
    pub generate: bool,
    /// CKF_HW.
    pub hardware: bool,
    /// Why the information is missing.
    pub error: Option<String>,
}

/// The session and the login.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SessionReport {
    /// The module refused read-only sessions and accepted a read-write one
    /// (`read_write_sessions = true`).
    pub read_write_needed: bool,
    /// What generating a private session key without a login gives (no login is
    /// attempted for this).
    pub without_login: Option<String>,
    /// The login with the given PIN: `ok`, `not required`, or the error.
    pub login: String,
}

/// `--try-wrong-pin`.
#[derive(Debug, Clone, Serialize)]
pub struct PinChecks {
    /// C_Login with an empty PIN.
    pub empty_pin: String,
    /// C_Login with a wrong PIN.
    pub wrong_pin: String,
    /// The token's flags afterwards (PIN count low, final try, locked).
    pub flags_after: Option<TokenFlags>,
}

/// One IV convention tried.
#[derive(Debug, Clone, Serialize)]
pub struct Trial {
    /// The module encrypted this way and the result decrypted back.
    pub works: bool,
    /// What happened.
    pub detail: String,
}

impl Trial {
    pub(super) fn failed(detail: impl Into<String>) -> Self {
        Self {
            works: false,
            detail: detail.into(),
        }
    }
}

/// How the module handles the GCM IV.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IvConvention {
    /// It takes the caller's 12-byte IV (SoftHSM2, Luna outside FIPS mode).
    CallerIv,
    /// It writes the IV it chose into a zeroed 12-byte buffer (CloudHSM; expected of
    /// Utimaco and nShield).
    FillsZeroedBuffer,
    /// It takes no IV and appends a 16-byte one after the tag (Luna in FIPS mode).
    AppendsAfterTag,
    /// None of them works: the module cannot serve XKS.
    Refused,
}

impl IvConvention {
    fn describe(self) -> &'static str {
        match self {
            Self::CallerIv => "caller IV accepted",
            Self::FillsZeroedBuffer => "HSM fills a zeroed IV buffer",
            Self::AppendsAfterTag => "HSM appends its IV after the tag",
            Self::Refused => "refused: no convention works",
        }
    }
}

/// The IV conventions tried.
#[derive(Debug, Clone, Serialize)]
pub struct IvReport {
    /// A random 12-byte IV from the caller.
    pub caller_iv: Trial,
    /// A zeroed 12-byte buffer for the HSM to fill.
    pub zeroed_buffer: Trial,
    /// No IV; the HSM appends one.
    pub appended: Trial,
    /// C_GenerateRandom of 12 bytes (`hsm_random` needs it).
    pub generate_random: String,
    /// The convention the module follows.
    pub convention: IvConvention,
    /// The `hsm.iv_source` that fits it.
    pub iv_source: Option<IvSource>,
}

/// Which of the attributes GetKeyMetadata reads (CKA_KEY_TYPE, CKA_VALUE_LEN and the
/// usage flags) come back for a key.
#[derive(Debug, Clone, Serialize)]
pub struct AttributeReport {
    /// Which key.
    pub key: String,
    /// Readable.
    pub readable: Vec<String>,
    /// Not returned (sensitive, invalid or unavailable).
    pub unreadable: Vec<String>,
    /// The call failed as a whole.
    pub error: Option<String>,
}

/// Session key copies (C_CopyObject with CKA_TOKEN false).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CopyReport {
    /// `works`, or the error.
    pub copy: String,
    /// C_CopyObject to a session object works.
    pub works: bool,
    /// The token key timed against its copy (none: only a temporary key was copied,
    /// so there is no timing).
    pub token_key: Option<String>,
    /// Median C_Encrypt with the token object, µs.
    pub token_object_us: Option<u64>,
    /// Median C_Encrypt with the session copy, µs.
    pub session_copy_us: Option<u64>,
    /// The copy is at least a tenth faster.
    pub faster: Option<bool>,
}

/// The example configuration of a vendor.
#[derive(Debug, Clone, Serialize)]
pub struct VendorProfile {
    /// The vendor.
    pub name: &'static str,
    /// Its example configuration in the repository.
    pub file: &'static str,
    /// The `iv_source` that file sets.
    pub iv_source: IvSource,
    /// The probe found another convention than the profile expects.
    pub iv_source_differs: bool,
}

/// The `[hsm]` settings that fit the module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Recommended {
    /// `hsm.sessions`.
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

impl Serialize for IvSource {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl IvSource {
    /// The setting's value as written in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            Self::HsmRandom => "hsm_random",
            Self::ProxyRandom => "proxy_random",
            Self::HsmGenerated => "hsm_generated",
            Self::HsmAppended => "hsm_appended",
        }
    }
}

/// The vendors of `config/vendors/` (and SoftHSM2), recognized by substrings of the
/// token's or library's manufacturer and model (lower case). The strings are what the
/// vendors' libraries are known or expected to report; only SoftHSM2's is tested.
const PROFILES: &[(&str, &str, IvSource, &[&str])] = &[
    (
        "SoftHSM2",
        "config/softhsm2.toml",
        IvSource::HsmRandom,
        &["softhsm"],
    ),
    (
        "Thales Luna",
        "config/vendors/luna.toml",
        IvSource::HsmAppended,
        &["safenet", "luna", "thales"],
    ),
    (
        "Entrust nShield",
        "config/vendors/nshield.toml",
        IvSource::HsmGenerated,
        &["ncipher", "nshield", "entrust"],
    ),
    (
        "Utimaco",
        "config/vendors/utimaco.toml",
        IvSource::HsmGenerated,
        &["utimaco", "cryptoserver"],
    ),
    (
        "AWS CloudHSM",
        "config/vendors/cloudhsm.toml",
        IvSource::HsmGenerated,
        &["cloudhsm", "marvell", "cavium"],
    ),
];

impl ProbeReport {
    pub(super) fn new(module: String) -> Self {
        Self {
            schema: PROBE_SCHEMA,
            module,
            library: None,
            tokens_seen: Vec::new(),
            slot: None,
            token: None,
            mechanisms: Vec::new(),
            session: SessionReport::default(),
            pin_checks: None,
            key_generation: None,
            iv: None,
            key_attributes: Vec::new(),
            session_key_copies: None,
            sample: Vec::new(),
            vendor_profile: None,
            recommended: None,
            differences: Vec::new(),
            problems: Vec::new(),
            serves_xks: false,
        }
    }

    /// The verdict, the vendor profile and the recommendation, from what was found.
    pub(super) fn finish(&mut self, configured: Option<&Configured>) {
        let mut problems = Vec::new();
        let mechanism = |name: &str| self.mechanisms.iter().find(|m| m.name == name);
        if self.token.is_some() {
            match mechanism("CKM_AES_GCM") {
                Some(m) if m.supported && m.encrypt && m.decrypt => {}
                Some(m) if m.supported => problems.push(
                    "CKM_AES_GCM is there but not for both encryption and decryption".to_owned(),
                ),
                _ => problems.push("the token has no CKM_AES_GCM".to_owned()),
            }
            match mechanism("CKM_AES_KEY_GEN") {
                Some(m) if m.supported && m.max_key_size.is_some_and(|max| max >= 32) => {}
                Some(m) if m.supported => {
                    problems.push("CKM_AES_KEY_GEN does not reach 32-byte (AES-256) keys".into())
                }
                _ => problems.push("the token has no CKM_AES_KEY_GEN".to_owned()),
            }
        }
        if let Some(iv) = &self.iv {
            if iv.convention == IvConvention::Refused {
                problems.push(
                    "no usable GCM IV convention: the module refused the caller's IV, a zeroed \
                     buffer and an appended IV"
                        .into(),
                );
            }
        }
        // Problems found earlier (login, key generation) came first.
        for p in problems {
            if !self.problems.contains(&p) {
                self.problems.push(p);
            }
        }
        let haystack = [
            self.token.as_ref().map(|t| t.manufacturer.as_str()),
            self.token.as_ref().map(|t| t.model.as_str()),
            self.library.as_ref().map(|l| l.manufacturer.as_str()),
            self.library.as_ref().map(|l| l.description.as_str()),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase();
        let found = self.iv.as_ref().and_then(|iv| iv.iv_source);
        self.vendor_profile = PROFILES
            .iter()
            .find(|(_, _, _, needles)| needles.iter().any(|n| haystack.contains(n)))
            .map(|(name, file, iv_source, _)| VendorProfile {
                name,
                file,
                iv_source: *iv_source,
                iv_source_differs: found.is_some_and(|f| !same_family(f, *iv_source)),
            });
        self.serves_xks = self.problems.is_empty();
        if self.serves_xks {
            self.recommended = self.recommend();
        }
        if let (Some(r), Some(c)) = (&self.recommended, configured) {
            let mut differ = |field: &str, have: String, want: String| {
                if have != want {
                    self.differences.push(format!(
                        "hsm.{field} is {have} in the configuration; the probe recommends {want}"
                    ));
                }
            };
            differ("sessions", c.sessions.to_string(), r.sessions.to_string());
            differ(
                "call_timeout_ms",
                c.call_timeout_ms.to_string(),
                r.call_timeout_ms.to_string(),
            );
            if !same_family(c.iv_source, r.iv_source) {
                differ(
                    "iv_source",
                    c.iv_source.name().into(),
                    r.iv_source.name().into(),
                );
            }
            differ(
                "session_key_copies",
                c.session_key_copies.to_string(),
                r.session_key_copies.to_string(),
            );
            if r.read_write_sessions && !c.read_write_sessions {
                differ("read_write_sessions", "false".into(), "true".into());
            }
        }
    }

    fn recommend(&self) -> Option<Recommended> {
        let iv_source = self.iv.as_ref()?.iv_source?;
        // The smallest session count within a tenth of the best throughput: more
        // sessions than that only add waiting. No sample: the proxy's default.
        let best = self
            .sample
            .iter()
            .filter(|s| s.errors == 0)
            .map(|s| s.ops_per_second)
            .fold(0.0_f64, f64::max);
        let knee = self
            .sample
            .iter()
            .filter(|s| s.errors == 0 && s.ops_per_second >= best * 0.9 && best > 0.0)
            .min_by_key(|s| s.sessions);
        let mut sessions = knee.map_or(2, |s| s.sessions);
        // Leave room under the token's own limit (the proxy's key tools and health
        // checks open sessions too).
        if let Some(SessionLimit::Max(max)) = self.token.as_ref().map(|t| t.max_sessions) {
            let room = usize::try_from(max.saturating_sub(2)).unwrap_or(usize::MAX);
            sessions = sessions.min(room.max(1));
        }
        // Five times the p99 of one call at that session count, never under the
        // proxy's default of 100 ms, rounded up to 10 ms.
        let p99 = knee.map_or(0.0, |s| s.p99_ms);
        let call_timeout_ms = (((p99 * 5.0).ceil() as u64).div_ceil(10) * 10).max(100);
        let copies = self.session_key_copies.as_ref();
        Some(Recommended {
            sessions,
            call_timeout_ms,
            iv_source,
            session_key_copies: copies.is_some_and(|c| c.works && c.faster == Some(true)),
            read_write_sessions: self.session.read_write_needed,
        })
    }

    /// The `[hsm]` lines of the recommendation (module, token and PIN included).
    pub fn hsm_section(&self, pin_file: &str) -> Option<String> {
        let r = self.recommended.as_ref()?;
        let token = self.token.as_ref()?;
        let mut s = String::from("[hsm]\nbackend = \"pkcs11\"\n");
        let _ = writeln!(s, "module = {:?}", self.module);
        let _ = writeln!(s, "token_label = {:?}", token.label);
        let _ = writeln!(s, "pin_file = {pin_file:?}");
        let _ = writeln!(s, "sessions = {}", r.sessions);
        let _ = writeln!(s, "queue_depth = {}", (r.sessions * 8).max(64));
        let _ = writeln!(s, "call_timeout_ms = {}", r.call_timeout_ms);
        let _ = writeln!(s, "iv_source = {:?}", r.iv_source.name());
        let _ = writeln!(s, "session_key_copies = {}", r.session_key_copies);
        if r.read_write_sessions {
            s.push_str("read_write_sessions = true\n");
        }
        Some(s)
    }

    /// The report as an operator reads it.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let yes = |b: bool| if b { "yes" } else { "no" };
        let _ = writeln!(s, "Module   {}", self.module);
        if let Some(l) = &self.library {
            let _ = writeln!(
                s,
                "Library  {} {} (library {}, PKCS#11 {})",
                l.manufacturer, l.description, l.version, l.cryptoki_version
            );
        }
        if let Some(slot) = &self.slot {
            let _ = writeln!(
                s,
                "Slot     {} {:?} (hardware slot: {}, removable: {})",
                slot.id,
                slot.description,
                yes(slot.hardware_slot),
                yes(slot.removable_device)
            );
        }
        match &self.token {
            Some(t) => {
                let _ = writeln!(
                    s,
                    "Token    {:?} serial {} — {} {} (hardware {}, firmware {})",
                    t.label,
                    t.serial,
                    t.manufacturer,
                    t.model,
                    t.hardware_version,
                    t.firmware_version
                );
                let _ = writeln!(
                    s,
                    "Sessions at most {} ({} read-write); open now: {} ({} read-write)",
                    t.max_sessions,
                    t.max_rw_sessions,
                    t.sessions_open
                        .map_or_else(|| "not reported".into(), |n| n.to_string()),
                    t.rw_sessions_open
                        .map_or_else(|| "not reported".into(), |n| n.to_string()),
                );
                let _ = writeln!(s, "Flags    {}", t.flags.set().join(", "));
            }
            None => {
                for t in &self.tokens_seen {
                    let _ = writeln!(
                        s,
                        "Token    slot {}: {:?} serial {}{}",
                        t.slot,
                        t.label,
                        t.serial,
                        if t.initialized {
                            ""
                        } else {
                            " (not initialized)"
                        }
                    );
                }
            }
        }
        if !self.mechanisms.is_empty() {
            let _ = writeln!(s, "\nMechanisms");
        }
        for m in &self.mechanisms {
            if !m.supported {
                let _ = writeln!(s, "  {:<16} MISSING", m.name);
                continue;
            }
            let flags: Vec<&str> = [
                (m.encrypt, "encrypt"),
                (m.decrypt, "decrypt"),
                (m.generate, "generate"),
                (m.hardware, "hardware"),
            ]
            .into_iter()
            .filter_map(|(on, n)| on.then_some(n))
            .collect();
            let sizes = match (m.min_key_size, m.max_key_size) {
                (Some(min), Some(max)) => format!("key sizes {min}..{max}"),
                _ => m.error.clone().unwrap_or_default(),
            };
            let _ = writeln!(s, "  {:<16} {sizes}; {}", m.name, flags.join(", "));
        }
        let _ = writeln!(s, "\nSession");
        let _ = writeln!(
            s,
            "  read-only sessions  {}",
            if self.session.read_write_needed {
                "refused: read_write_sessions = true needed"
            } else {
                "accepted"
            }
        );
        if let Some(w) = &self.session.without_login {
            let _ = writeln!(s, "  without login       {w}");
        }
        if !self.session.login.is_empty() {
            let _ = writeln!(s, "  login               {}", self.session.login);
        }
        match &self.pin_checks {
            Some(p) => {
                let _ = writeln!(s, "  empty PIN           {}", p.empty_pin);
                let _ = writeln!(s, "  wrong PIN           {}", p.wrong_pin);
                if let Some(f) = &p.flags_after {
                    let _ = writeln!(s, "  flags afterwards    {}", f.set().join(", "));
                }
            }
            None => {
                let _ = writeln!(
                    s,
                    "  wrong PIN           not tried (--try-wrong-pin: failed logins count towards locking the partition)"
                );
            }
        }
        if let Some(k) = &self.key_generation {
            let _ = writeln!(s, "  key generation      {k}");
        }
        if let Some(iv) = &self.iv {
            let _ = writeln!(s, "\nGCM IV (temporary session key, destroyed afterwards)");
            let _ = writeln!(s, "  caller's IV         {}", iv.caller_iv.detail);
            let _ = writeln!(s, "  zeroed buffer       {}", iv.zeroed_buffer.detail);
            let _ = writeln!(s, "  appended IV         {}", iv.appended.detail);
            let _ = writeln!(s, "  C_GenerateRandom    {}", iv.generate_random);
            let _ = writeln!(
                s,
                "  convention          {}{}",
                iv.convention.describe(),
                iv.iv_source
                    .map(|i| format!(" → iv_source = \"{}\"", i.name()))
                    .unwrap_or_default()
            );
        }
        if !self.key_attributes.is_empty() {
            let _ = writeln!(s, "\nKey attributes GetKeyMetadata reads");
        }
        for a in &self.key_attributes {
            let state = match (&a.error, a.unreadable.is_empty()) {
                (Some(e), _) => e.clone(),
                (None, true) => format!("all {} readable", a.readable.len()),
                (None, false) => format!("NOT READABLE: {}", a.unreadable.join(", ")),
            };
            let _ = writeln!(s, "  {:<32} {state}", a.key);
        }
        if let Some(c) = &self.session_key_copies {
            let _ = writeln!(s, "\nSession key copies");
            let _ = writeln!(s, "  C_CopyObject        {}", c.copy);
            match (&c.token_key, c.token_object_us, c.session_copy_us) {
                (Some(label), Some(token), Some(copy)) => {
                    let _ = writeln!(
                        s,
                        "  C_Encrypt median    token key {label:?} {token} µs, session copy {copy} µs{}",
                        match c.faster {
                            Some(true) => " (faster)",
                            _ => " (not clearly faster)",
                        }
                    );
                }
                (None, _, _) if c.works => {
                    let _ = writeln!(
                        s,
                        "  timing              needs a token key (none found; --key-label names one)"
                    );
                }
                _ => {}
            }
        }
        if !self.sample.is_empty() {
            let _ = writeln!(s, "\nAES-256-GCM encrypt, 32 bytes (closed loop)");
            let _ = writeln!(s, "  sessions    ops/s    p50 ms    p99 ms  errors");
            for step in &self.sample {
                let _ = writeln!(
                    s,
                    "  {:>8} {:>8.0} {:>9.3} {:>9.3} {:>7}",
                    step.sessions, step.ops_per_second, step.p50_ms, step.p99_ms, step.errors
                );
                if let Some(e) = &step.first_error {
                    let _ = writeln!(s, "           first error: {e}");
                }
            }
        }
        let _ = writeln!(s);
        match &self.vendor_profile {
            Some(v) => {
                let _ = writeln!(
                    s,
                    "Vendor profile: {} ({}){}",
                    v.name,
                    v.file,
                    if v.iv_source_differs {
                        format!(
                            "; it sets iv_source = \"{}\", this module needs another",
                            v.iv_source.name()
                        )
                    } else {
                        String::new()
                    }
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "Vendor profile: none matches (config/VENDORS.md lists the known ones)"
                );
            }
        }
        if self.serves_xks {
            let _ = writeln!(s, "\nVerdict: this module can serve XKS.\n");
            let _ = writeln!(
                s,
                "Recommended (docs/configuration.md describes each setting):"
            );
            if let Some(section) = self.hsm_section("hsm-pin") {
                s.push_str(&section);
            }
        } else {
            let _ = writeln!(s, "Verdict: this module CANNOT serve XKS:");
            for p in &self.problems {
                let _ = writeln!(s, "  - {p}");
            }
        }
        if !self.differences.is_empty() {
            let _ = writeln!(s, "\nThe configuration differs:");
            for d in &self.differences {
                let _ = writeln!(s, "  - {d}");
            }
        }
        s
    }
}

/// `hsm_random` and `proxy_random` are one convention (the caller's IV); either fits.
fn same_family(a: IvSource, b: IvSource) -> bool {
    let caller = |s: IvSource| matches!(s, IvSource::HsmRandom | IvSource::ProxyRandom);
    a == b || (caller(a) && caller(b))
}
