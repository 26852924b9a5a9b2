//! A simulated HSM: the software backend's real AES-GCM behind the product's session
//! pool, with each call held for a service time drawn from a distribution.
//!
//! It models an HSM by the two numbers that decide its capacity: how long one operation
//! takes (fixed, normal or lognormal) and how many run at once (the pool's sessions).
//! Because it runs on `super::pool::Pool`, admission, shedding and call timeouts are
//! the same code as for PKCS#11. Tests use it to drive the proxy past capacity
//! deterministically; capacity planners use it to ask "what if my HSM took 4 ms and ran
//! 32 operations at once". Per-key latencies model a slow or hung key.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::SeedableRng;
use rand_distr::{Distribution, LogNormal, Normal};

use super::pool::{Pool, PoolSettings};
use super::pooled::SessionOps;
use super::software::{SoftwareBackend, SoftwareKeySpec};
use super::{health_round_trip, EkmInfo, HsmError, KeyMetadata, Plaintext, Sealed};
use crate::metrics::Metrics;

/// The service-time distribution of one simulated HSM operation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Latency {
    /// Always `mean`.
    Fixed(Duration),
    /// Normal with this mean and standard deviation, cut off at zero.
    Normal {
        /// Mean.
        mean: Duration,
        /// Standard deviation.
        stddev: Duration,
    },
    /// Lognormal with this mean and standard deviation: the long right tail of real
    /// network HSMs.
    LogNormal {
        /// Mean.
        mean: Duration,
        /// Standard deviation.
        stddev: Duration,
    },
}

/// A sampler for a [`Latency`].
#[derive(Debug, Clone, Copy)]
enum Sampler {
    Fixed(f64),
    Normal(Normal<f64>),
    LogNormal(LogNormal<f64>),
}

impl Sampler {
    fn new(latency: Latency) -> Result<Self, HsmError> {
        let bad = |_| HsmError::Unavailable("invalid simulated latency distribution".into());
        Ok(match latency {
            Latency::Fixed(d) => Self::Fixed(d.as_secs_f64()),
            Latency::Normal { mean, stddev } => {
                Self::Normal(Normal::new(mean.as_secs_f64(), stddev.as_secs_f64()).map_err(bad)?)
            }
            Latency::LogNormal { mean, stddev } => {
                let mean = mean.as_secs_f64();
                let cv = stddev.as_secs_f64() / mean.max(f64::MIN_POSITIVE);
                Self::LogNormal(LogNormal::from_mean_cv(mean, cv).map_err(bad)?)
            }
        })
    }

    fn sample(&self, rng: &mut SmallRng) -> Duration {
        let seconds = match self {
            Self::Fixed(s) => *s,
            Self::Normal(d) => d.sample(rng),
            Self::LogNormal(d) => d.sample(rng),
        };
        Duration::from_secs_f64(seconds.clamp(0.0, 3600.0))
    }
}

/// Settings of the simulated HSM.
#[derive(Debug, Clone, PartialEq)]
pub struct SimulatedSettings {
    /// Operations that run at once (the pool's sessions).
    pub parallelism: usize,
    /// Requests that may wait for a session.
    pub queue_depth: usize,
    /// Longest one call may take before the request answers 503.
    pub call_timeout: Duration,
    /// Threads opened beyond `parallelism` while others are stuck in a call.
    pub max_replacement_sessions: usize,
    /// Service time of every operation ...
    pub latency: Latency,
    /// ... except on these keys (a slow or hung key).
    pub key_latency: HashMap<String, Duration>,
    /// The keys.
    pub keys: Vec<SoftwareKeySpec>,
}

/// One simulated session.
pub(crate) struct Worker {
    keys: Arc<SoftwareBackend>,
    sampler: Sampler,
    key_latency: Arc<HashMap<String, Duration>>,
    rng: SmallRng,
}

impl Worker {
    /// Holds the session for the operation's service time, like a blocking HSM call.
    fn serve(&mut self, key_id: &str) {
        let service = match self.key_latency.get(key_id) {
            Some(fixed) => *fixed,
            None => self.sampler.sample(&mut self.rng),
        };
        // Sleep rather than spin: a real HSM call waits on the device, not the CPU.
        let until = Instant::now() + service;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            std::thread::sleep(left);
        }
    }
}

impl SessionOps for Worker {
    fn encrypt(&mut self, key_id: &str, plaintext: &[u8], aad: &[u8]) -> Result<Sealed, HsmError> {
        self.serve(key_id);
        self.keys.encrypt(key_id, plaintext, aad)
    }

    fn decrypt(
        &mut self,
        key_id: &str,
        sealed: &Sealed,
        aad: &[u8],
    ) -> Result<Plaintext, HsmError> {
        self.serve(key_id);
        self.keys.decrypt(key_id, sealed, aad)
    }

    fn key_metadata(&mut self, key_id: &str) -> Result<KeyMetadata, HsmError> {
        self.serve(key_id);
        self.keys.key_metadata(key_id)
    }

    fn health_check(&mut self, key_id: Option<&str>) -> Result<(), HsmError> {
        self.serve(key_id.unwrap_or_default());
        let Some(key_id) = key_id else {
            return Ok(());
        };
        let keys = &self.keys;
        health_round_trip(
            &mut (),
            |(), p| keys.encrypt(key_id, p, b""),
            |(), s| keys.decrypt(key_id, s, b""),
        )
    }
}

/// The simulated HSM backend.
pub struct SimulatedBackend {
    pool: Pool<Worker>,
    keys: Arc<SoftwareBackend>,
    info: EkmInfo,
}

impl fmt::Debug for SimulatedBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimulatedBackend")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl SimulatedBackend {
    /// Builds the keys and starts `parallelism` session threads.
    pub fn start(settings: SimulatedSettings, metrics: Arc<Metrics>) -> Result<Self, HsmError> {
        let keys = Arc::new(SoftwareBackend::new(settings.keys)?);
        let sampler = Sampler::new(settings.latency)?;
        let key_latency = Arc::new(settings.key_latency);
        let worker = {
            let keys = Arc::clone(&keys);
            let seed = std::sync::atomic::AtomicU64::new(0x5eed);
            move || Worker {
                keys: Arc::clone(&keys),
                sampler,
                key_latency: Arc::clone(&key_latency),
                rng: SmallRng::seed_from_u64(
                    seed.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                ),
            }
        };
        let workers = (0..settings.parallelism.max(1)).map(|_| worker()).collect();
        let pool = Pool::start(
            &PoolSettings {
                name: "simulated-hsm",
                queue_depth: settings.queue_depth,
                call_timeout: settings.call_timeout,
                max_replacements: settings.max_replacement_sessions,
                ekm: "simulated-1".into(),
            },
            workers,
            worker,
            metrics,
        )?;
        Ok(Self {
            pool,
            keys,
            info: EkmInfo {
                id: "simulated-1".into(),
                model: format!("xks-proxy simulated HSM {}", env!("CARGO_PKG_VERSION")),
                vendor: "xks-proxy (simulated, not an HSM)".into(),
            },
        })
    }

    /// The session pool, which runs the operations (see [`super::pooled`]).
    pub(crate) fn sessions(&self) -> &Pool<Worker> {
        &self.pool
    }

    /// The keys, for tests that check results independently.
    pub fn keys(&self) -> &SoftwareBackend {
        &self.keys
    }

    /// Facts for GetHealthStatus.
    pub fn ekm_info(&self) -> &EkmInfo {
        &self.info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samplers_have_the_asked_mean() {
        let mut rng = SmallRng::seed_from_u64(1);
        let ms = Duration::from_millis;
        for latency in [
            Latency::Fixed(ms(4)),
            Latency::Normal {
                mean: ms(4),
                stddev: ms(1),
            },
            Latency::LogNormal {
                mean: ms(4),
                stddev: ms(2),
            },
        ] {
            let sampler = Sampler::new(latency).unwrap();
            let n = 20_000;
            let total: Duration = (0..n).map(|_| sampler.sample(&mut rng)).sum();
            let mean = total.as_secs_f64() / f64::from(n);
            assert!((mean - 0.004).abs() < 0.0002, "{latency:?}: mean {mean}");
        }
    }
}
