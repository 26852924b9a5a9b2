//! What the handlers call: one [`Ekm`], or a [`Fleet`] of them, built from a
//! [`BackendConfig`].
//!
//! The two levels are two types, so a fleet of fleets cannot be built: a fleet's members
//! are [`Ekm`]s, and only [`Backend`] can be a fleet. Both are enums rather than trait
//! objects: the sets are closed, and static dispatch keeps the hot path free of boxing.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use super::fleet::{self, Fleet};
use super::pkcs11::{Pkcs11Backend, Pkcs11Settings};
use super::simulated::{SimulatedBackend, SimulatedSettings};
use super::software::{SoftwareBackend, SoftwareKeySpec};
use super::{health_round_trip, EkmInfo, HsmError, KeyMetadata, Plaintext, PoolThreads, Sealed};
use crate::metrics::Metrics;

/// The validated backend choice (the `[hsm]` section).
#[derive(Debug)]
pub enum BackendConfig {
    /// PKCS#11: one to ten EKMs (tokens) holding the same keys.
    Pkcs11(Vec<Pkcs11Settings>),
    /// Software keys.
    Software(Vec<SoftwareKeySpec>),
    /// The simulated HSM.
    Simulated(SimulatedSettings),
}

/// One external key manager.
pub enum Ekm {
    /// A PKCS#11 module and token.
    Pkcs11(Pkcs11Backend),
    /// In-process AES-GCM (benchmarks only).
    Software(SoftwareBackend),
    /// A modelled HSM (backpressure tests, capacity planning).
    Simulated(SimulatedBackend),
}

impl fmt::Debug for Ekm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pkcs11(b) => f.debug_tuple("Pkcs11").field(b).finish(),
            Self::Software(b) => f.debug_tuple("Software").field(b).finish(),
            Self::Simulated(b) => f.debug_tuple("Simulated").field(b).finish(),
        }
    }
}

impl Ekm {
    /// Encrypts `plaintext` under the key with the EKM's AES-GCM; `aad` is the HSM AAD
    /// (already built by the spec formula).
    pub async fn encrypt(
        &self,
        key_id: &str,
        plaintext: Plaintext,
        aad: Vec<u8>,
        deadline: Instant,
    ) -> Result<Sealed, HsmError> {
        match self {
            Self::Pkcs11(b) => b.sessions().encrypt(key_id, plaintext, aad, deadline).await,
            Self::Software(b) => b.encrypt(key_id, &plaintext, &aad),
            Self::Simulated(b) => b.sessions().encrypt(key_id, plaintext, aad, deadline).await,
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
            Self::Pkcs11(b) => b.sessions().decrypt(key_id, sealed, aad, deadline).await,
            Self::Software(b) => b.decrypt(key_id, &sealed, &aad),
            Self::Simulated(b) => b.sessions().decrypt(key_id, sealed, aad, deadline).await,
        }
    }

    /// The external key's current version (see [`super::version_label`]).
    pub async fn current_version(&self, key_id: &str, deadline: Instant) -> Result<u32, HsmError> {
        match self {
            Self::Pkcs11(b) => b.current_version(key_id, deadline).await,
            Self::Software(_) | Self::Simulated(_) => Ok(1),
        }
    }

    /// Reads the key's metadata.
    pub async fn key_metadata(
        &self,
        key_id: &str,
        deadline: Instant,
    ) -> Result<KeyMetadata, HsmError> {
        match self {
            Self::Pkcs11(b) => b.sessions().key_metadata(key_id, deadline).await,
            Self::Software(b) => b.key_metadata(key_id),
            Self::Simulated(b) => b.sessions().key_metadata(key_id, deadline).await,
        }
    }

    /// A deep check: a real encrypt and decrypt with `key_id` (a health-check key, never
    /// a KMS key). Without a key, a round trip through a session that shows the EKM
    /// answers.
    pub async fn health_check(
        &self,
        key_id: Option<&str>,
        deadline: Instant,
    ) -> Result<(), HsmError> {
        match self {
            Self::Pkcs11(b) => b.sessions().health_check(key_id, deadline).await,
            Self::Software(b) => match key_id {
                Some(key) => health_round_trip(
                    &mut (),
                    |(), p| b.encrypt(key, p, b""),
                    |(), s| b.decrypt(key, s, b""),
                ),
                None => Ok(()),
            },
            Self::Simulated(b) => b.sessions().health_check(key_id, deadline).await,
        }
    }

    /// False while the EKM is known to be out of service (its calls would fail at once).
    pub fn in_service(&self) -> bool {
        match self {
            Self::Pkcs11(b) => b.in_service(),
            Self::Software(_) | Self::Simulated(_) => true,
        }
    }

    /// Requests admitted and not finished, and the most the EKM admits.
    pub fn load(&self) -> (usize, usize) {
        match self {
            Self::Pkcs11(b) => b.sessions().load(),
            Self::Simulated(b) => b.sessions().load(),
            Self::Software(_) => (0, usize::MAX),
        }
    }

    /// The EKM's session threads: its size, how many run, how many are stuck in a call
    /// that has not returned (`None`: no session pool).
    pub fn pool_threads(&self) -> Option<PoolThreads> {
        match self {
            Self::Pkcs11(b) => Some(b.sessions().threads()),
            Self::Simulated(b) => Some(b.sessions().threads()),
            Self::Software(_) => None,
        }
    }

    /// Why this EKM's logins are suspended (its token refused the PIN), if they are.
    pub fn login_suspended(&self) -> Option<&'static str> {
        match self {
            Self::Pkcs11(b) => b.login_suspended(),
            Self::Software(_) | Self::Simulated(_) => None,
        }
    }

    /// Facts about the EKM for GetHealthStatus.
    pub fn ekm_info(&self) -> &EkmInfo {
        match self {
            Self::Pkcs11(b) => b.ekm_info(),
            Self::Software(b) => b.ekm_info(),
            Self::Simulated(b) => b.ekm_info(),
        }
    }

    /// The PKCS#11 backend, when this EKM is one.
    pub fn pkcs11(&self) -> Option<&Pkcs11Backend> {
        match self {
            Self::Pkcs11(b) => Some(b),
            Self::Software(_) | Self::Simulated(_) => None,
        }
    }
}

/// The backend the handlers talk to: one EKM, or a fleet of them.
#[derive(Debug)]
pub enum Backend {
    /// One EKM on its own (the software and simulated backends).
    Single(Ekm),
    /// Several EKMs holding the same keys (PKCS#11 configurations are always a fleet,
    /// of one or more).
    Fleet(Fleet),
}

impl From<Ekm> for Backend {
    fn from(ekm: Ekm) -> Self {
        Self::Single(ekm)
    }
}

impl Backend {
    /// Connects to (or starts) what `config` asks for: a fleet of PKCS#11 tokens, the
    /// software keys, or the simulated HSM.
    pub fn build(config: &BackendConfig, metrics: &Arc<Metrics>) -> Result<Self, HsmError> {
        Ok(match config {
            BackendConfig::Pkcs11(ekms) => Self::Fleet(Fleet::new(
                ekms.iter()
                    .map(|settings| {
                        Pkcs11Backend::connect(settings, Arc::clone(metrics)).map(Ekm::Pkcs11)
                    })
                    .collect::<Result<_, _>>()?,
            )?),
            BackendConfig::Software(keys) => {
                Self::Single(Ekm::Software(SoftwareBackend::new(keys.clone())?))
            }
            BackendConfig::Simulated(settings) => Self::Single(Ekm::Simulated(
                SimulatedBackend::start(settings.clone(), Arc::clone(metrics))?,
            )),
        })
    }

    /// Encrypts `plaintext` under the key; `aad` is the HSM AAD (already built by the
    /// spec formula).
    pub async fn encrypt(
        &self,
        key_id: &str,
        plaintext: Plaintext,
        aad: Vec<u8>,
        deadline: Instant,
    ) -> Result<Sealed, HsmError> {
        match self {
            Self::Single(e) => e.encrypt(key_id, plaintext, aad, deadline).await,
            Self::Fleet(f) => f.encrypt(key_id, plaintext, aad, deadline).await,
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
            Self::Single(e) => e.decrypt(key_id, sealed, aad, deadline).await,
            Self::Fleet(f) => f.decrypt(key_id, sealed, aad, deadline).await,
        }
    }

    /// The external key's current version (see [`super::version_label`]): the highest N
    /// for which versions 2..=N exist in the HSM, 1 when the key was never rotated. The
    /// PKCS#11 backend caches it for `key_refresh_seconds`; the others have no versions.
    pub async fn current_version(&self, key_id: &str, deadline: Instant) -> Result<u32, HsmError> {
        match self {
            Self::Single(e) => e.current_version(key_id, deadline).await,
            Self::Fleet(f) => f.current_version(key_id, deadline).await,
        }
    }

    /// Reads the key's metadata.
    pub async fn key_metadata(
        &self,
        key_id: &str,
        deadline: Instant,
    ) -> Result<KeyMetadata, HsmError> {
        match self {
            Self::Single(e) => e.key_metadata(key_id, deadline).await,
            Self::Fleet(f) => f.key_metadata(key_id, deadline).await,
        }
    }

    /// False while no EKM is in service.
    pub fn in_service(&self) -> bool {
        self.ekms().any(Ekm::in_service)
    }

    /// Requests admitted and not finished, and the most the EKMs admit, summed.
    pub fn load(&self) -> (usize, usize) {
        self.ekms().fold((0, 0), |(t, c), ekm| {
            let (taken, capacity) = ekm.load();
            (t + taken, c.saturating_add(capacity))
        })
    }

    /// The EKMs behind this backend, in configuration order.
    pub fn ekms(&self) -> impl Iterator<Item = &Ekm> {
        let (single, members) = match self {
            Self::Single(e) => (Some(e), &[][..]),
            Self::Fleet(f) => (None, f.members()),
        };
        single
            .into_iter()
            .chain(members.iter().map(fleet::Member::ekm))
    }

    /// The fleet, when this backend is one (for the health monitor's verdicts).
    pub fn fleet(&self) -> Option<&Fleet> {
        match self {
            Self::Fleet(f) => Some(f),
            Self::Single(_) => None,
        }
    }

    /// Facts about the first EKM, for GetHealthStatus's vendor.
    pub fn ekm_info(&self) -> &EkmInfo {
        match self {
            Self::Single(e) => e.ekm_info(),
            Self::Fleet(f) => f.members()[0].ekm().ekm_info(),
        }
    }

    /// Treats every EKM's cached keys and versions as due (see
    /// [`Pkcs11Backend::refresh_keys`]).
    pub fn refresh_keys(&self) {
        self.ekms()
            .filter_map(Ekm::pkcs11)
            .for_each(Pkcs11Backend::refresh_keys);
    }

    /// Takes up the PINs of a reloaded configuration, EKM by EKM (matched by token).
    pub fn update_pins(&self, settings: &[Pkcs11Settings]) {
        for ekm in self.ekms().filter_map(Ekm::pkcs11) {
            if let Some(new) = settings.iter().find(|s| s.token == *ekm.token()) {
                ekm.update_pin(&new.pin);
            }
        }
    }
}
