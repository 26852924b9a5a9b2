//! Several external key managers behind one key store (spec: ekmFleetDetails, at most
//! ten): HSMs of a cluster that hold the same keys, each with its own module, token
//! and session pool.
//!
//! Each request goes to an EKM that is in service, preferring one the health monitor
//! found ACTIVE over a DEGRADED one, and among those the one with the most free
//! capacity (session pool places not taken). When the EKM fails the request in a way
//! that is the EKM's fault (unavailable, timed out, a PKCS#11 failure) or sheds it, the
//! request moves on to the next EKM while its deadline allows; an EKM that failed is
//! taken out of service for a backoff that doubles with each failure in a row, after
//! which one request at a time probes it. A successful request or health check puts it
//! back. While no EKM is in service, requests fail at once instead of queueing.
//!
//! A fleet of one is the same machinery: a single HSM that hangs is taken out after its
//! first timeout, so the requests behind it fail fast instead of each waiting for the
//! call timeout.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use super::{Ekm, EkmHealth, HsmError, KeyMetadata, Plaintext, Sealed};

/// The most EKMs a key store may have (spec: ekmFleetDetails).
pub const MAX_EKMS: usize = 10;

/// First and longest time an EKM stays out after a failure.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// One EKM and what the fleet knows of it.
pub struct Member {
    ekm: Ekm,
    /// Out of service until this many nanoseconds after the fleet's epoch (0: in).
    out_until_ns: AtomicU64,
    /// Failures in a row.
    failures: AtomicU32,
    /// The health monitor's last verdict ([`EkmHealth`] as u8).
    health: AtomicU8,
    /// Requests this EKM answered (any answer that was not its own failure).
    served: AtomicU64,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("ekm", &self.ekm.ekm_info().id)
            .field("failures", &self.failures.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

const fn health_code(health: EkmHealth) -> u8 {
    match health {
        EkmHealth::Active => 0,
        EkmHealth::Degraded => 1,
        EkmHealth::Unavailable => 2,
    }
}

impl Member {
    /// The EKM.
    pub fn ekm(&self) -> &Ekm {
        &self.ekm
    }

    /// Requests this EKM has answered.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    fn health(&self) -> EkmHealth {
        match self.health.load(Ordering::Relaxed) {
            0 => EkmHealth::Active,
            1 => EkmHealth::Degraded,
            _ => EkmHealth::Unavailable,
        }
    }

    /// Free places in the EKM's session pool.
    fn free(&self) -> usize {
        let (taken, capacity) = self.ekm.load();
        capacity.saturating_sub(taken)
    }
}

/// Errors that say the EKM is failing (rather than the request, the key, or a full pool).
fn is_ekm_failure(error: &HsmError) -> bool {
    matches!(
        error,
        HsmError::Unavailable(_)
            | HsmError::Timeout
            | HsmError::Pkcs11 { .. }
            | HsmError::Inconsistent(_)
    )
}

/// The EKMs of a key store.
#[derive(Debug)]
pub struct Fleet {
    members: Vec<Member>,
    epoch: Instant,
}

impl Fleet {
    /// A fleet of 1 to [`MAX_EKMS`] EKMs, in configuration order.
    pub fn new(ekms: Vec<Ekm>) -> Result<Self, HsmError> {
        if ekms.is_empty() || ekms.len() > MAX_EKMS {
            return Err(HsmError::Unavailable(format!(
                "a key store has 1 to {MAX_EKMS} EKMs, not {}",
                ekms.len()
            )));
        }
        Ok(Self {
            members: ekms
                .into_iter()
                .map(|ekm| Member {
                    ekm,
                    out_until_ns: AtomicU64::new(0),
                    failures: AtomicU32::new(0),
                    health: AtomicU8::new(health_code(EkmHealth::Active)),
                    served: AtomicU64::new(0),
                })
                .collect(),
            epoch: Instant::now(),
        })
    }

    /// The EKMs, in configuration order.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    fn now_ns(&self) -> u64 {
        // Never 0, which means "in service".
        self.epoch.elapsed().as_nanos() as u64 + 1
    }

    /// Whether member `i` may take a request now. A member whose time out is over is
    /// claimed by one request (the probe) by pushing its time out forward.
    fn admit(&self, i: usize, now: u64) -> bool {
        let member = &self.members[i];
        if !member.ekm.in_service() {
            return false;
        }
        let until = member.out_until_ns.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        if now < until {
            return false;
        }
        let probe_window = Self::backoff(member.failures.load(Ordering::Relaxed)).as_nanos() as u64;
        member
            .out_until_ns
            .compare_exchange(
                until,
                now + probe_window,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    fn backoff(failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        (BACKOFF_MIN * 2u32.pow(doublings)).min(BACKOFF_MAX)
    }

    /// The order in which to try the members: in-service ones, ACTIVE before DEGRADED
    /// before UNAVAILABLE, most free capacity first.
    fn candidates(&self) -> Vec<usize> {
        if self.members.len() == 1 {
            return if self.admit(0, self.now_ns()) {
                vec![0]
            } else {
                Vec::new()
            };
        }
        let mut order: Vec<(usize, u8, usize)> = self
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| (i, health_code(m.health()), m.free()))
            .collect();
        order.sort_by(|a, b| a.1.cmp(&b.1).then(b.2.cmp(&a.2)));
        let now = self.now_ns();
        order
            .into_iter()
            .map(|(i, _, _)| i)
            .filter(|&i| self.admit(i, now))
            .collect()
    }

    /// Takes member `i` out of service after a failure.
    fn failed(&self, i: usize, error: &HsmError) {
        let member = &self.members[i];
        let failures = member.failures.fetch_add(1, Ordering::AcqRel) + 1;
        let backoff = Self::backoff(failures);
        member
            .out_until_ns
            .store(self.now_ns() + backoff.as_nanos() as u64, Ordering::Release);
        if failures == 1 {
            tracing::warn!(ekm = %member.ekm.ekm_info().id, error = %error, backoff_ms = backoff.as_millis() as u64, "EKM taken out of service");
        }
    }

    /// Puts member `i` back in service.
    fn succeeded(&self, i: usize) {
        let member = &self.members[i];
        member.served.fetch_add(1, Ordering::Relaxed);
        if member.out_until_ns.load(Ordering::Relaxed) != 0 {
            member.out_until_ns.store(0, Ordering::Release);
            if member.failures.swap(0, Ordering::AcqRel) != 0 {
                tracing::info!(ekm = %member.ekm.ekm_info().id, "EKM back in service");
            }
        }
    }

    /// The health monitor's verdict on member `i`: UNAVAILABLE takes it out, anything
    /// else puts it back.
    pub fn note_health(&self, i: usize, health: EkmHealth) {
        self.members[i]
            .health
            .store(health_code(health), Ordering::Relaxed);
        match health {
            EkmHealth::Unavailable => {
                self.failed(i, &HsmError::Unavailable("health check failed".into()))
            }
            EkmHealth::Active | EkmHealth::Degraded => {
                let member = &self.members[i];
                if member.out_until_ns.swap(0, Ordering::AcqRel) != 0
                    && member.failures.swap(0, Ordering::AcqRel) != 0
                {
                    tracing::info!(ekm = %member.ekm.ekm_info().id, "EKM back in service");
                }
            }
        }
    }

    /// Runs `op` on the best member, moving on to the next while the member fails or
    /// sheds and the deadline allows.
    async fn run<'a, T, F, Fut>(&'a self, deadline: Instant, mut op: F) -> Result<T, HsmError>
    where
        F: FnMut(&'a Ekm, bool) -> Fut,
        Fut: std::future::Future<Output = Result<T, HsmError>>,
    {
        let candidates = self.candidates();
        let Some(&last) = candidates.last() else {
            return Err(HsmError::Unavailable("no EKM is in service".into()));
        };
        // The deadline passed before any member was tried.
        let mut outcome = Err(HsmError::Busy(crate::metrics::ShedReason::Deadline));
        for i in candidates {
            if Instant::now() >= deadline {
                break;
            }
            outcome = op(&self.members[i].ekm, i == last).await;
            match &outcome {
                Err(HsmError::Busy(_)) => {} // a full pool is not a failure: try another
                Err(e) if is_ekm_failure(e) => self.failed(i, e),
                _ => {
                    self.succeeded(i);
                    return outcome;
                }
            }
        }
        outcome
    }

    /// Encrypts on the best EKM.
    pub async fn encrypt(
        &self,
        key_id: &str,
        plaintext: Plaintext,
        aad: Vec<u8>,
        deadline: Instant,
    ) -> Result<Sealed, HsmError> {
        let mut plaintext = Some(plaintext);
        self.run(deadline, |ekm, last| {
            // The last candidate may have the plaintext itself; others get a copy
            // (zeroized when dropped, like the original).
            let plaintext = if last {
                plaintext.take()
            } else {
                plaintext.clone()
            }
            .unwrap_or_default();
            let aad = aad.clone();
            ekm.encrypt(key_id, plaintext, aad, deadline)
        })
        .await
    }

    /// Decrypts on the best EKM.
    pub async fn decrypt(
        &self,
        key_id: &str,
        sealed: Sealed,
        aad: Vec<u8>,
        deadline: Instant,
    ) -> Result<Plaintext, HsmError> {
        self.run(deadline, |ekm, _| {
            let sealed = sealed.clone();
            let aad = aad.clone();
            ekm.decrypt(key_id, sealed, aad, deadline)
        })
        .await
    }

    /// The key's current version, from the best EKM.
    pub async fn current_version(&self, key_id: &str, deadline: Instant) -> Result<u32, HsmError> {
        self.run(deadline, |ekm, _| ekm.current_version(key_id, deadline))
            .await
    }

    /// The key's metadata, from the best EKM.
    pub async fn key_metadata(
        &self,
        key_id: &str,
        deadline: Instant,
    ) -> Result<KeyMetadata, HsmError> {
        self.run(deadline, |ekm, _| ekm.key_metadata(key_id, deadline))
            .await
    }
}
