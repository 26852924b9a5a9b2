//! What reaching a token takes: which token, where the GCM IV comes from, and the
//! settings an EKM is connected with.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use zeroize::Zeroizing;

use crate::hsm::faults::FaultInjector;

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

/// Where the GCM IV comes from. HSMs differ, and the proxy must hand KMS the IV, the
/// ciphertext and the tag apart whichever way the HSM returns them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IvSource {
    /// The proxy takes 12 bytes from the HSM's RNG (C_GenerateRandom) and passes them
    /// in (generic; SoftHSM2). Each session draws them [`IV_BATCH`](super::IV_BATCH) IVs at a time.
    #[default]
    HsmRandom,
    /// The proxy draws 12 bytes from its own DRBG (AWS-LC) and passes them in: one
    /// PKCS#11 call per encryption fewer.
    ProxyRandom,
    /// The proxy passes a zeroed 12-byte IV buffer and the HSM writes the IV it chose
    /// into it (Utimaco, Entrust nShield, Marvell-based HSMs).
    HsmGenerated,
    /// The proxy passes no IV; the HSM picks a 16-byte IV and appends it after the tag
    /// in the output (Thales Luna in FIPS mode).
    HsmAppended,
}

/// The IV length an HSM that appends its IV after the tag uses.
pub const APPENDED_IV_LEN: usize = 16;

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
    /// Requests that may wait for a session; beyond that, [`HsmError::Busy`](crate::hsm::HsmError::Busy).
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
    /// Open read-write sessions (AWS CloudHSM's SDK 5 refuses read-only ones); the
    /// proxy itself never modifies token objects.
    pub read_write_sessions: bool,
    /// Log every PKCS#11 call: function, return value, duration (see
    /// [`TRACE_TARGET`](super::TRACE_TARGET)). Turned on for the whole process by the
    /// first backend that asks.
    pub trace: bool,
    /// Session threads the pool may open beyond `sessions` while others are stuck in
    /// calls that do not return (see `crate::hsm::pool`).
    pub max_replacement_sessions: usize,
    /// Errors and latency injected on command (tests and chaos drills; normally `None`).
    pub faults: Option<Arc<FaultInjector>>,
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
            .field("read_write_sessions", &self.read_write_sessions)
            .field("trace", &self.trace)
            .field("max_replacement_sessions", &self.max_replacement_sessions)
            .field("faults", &self.faults.is_some())
            .finish()
    }
}
