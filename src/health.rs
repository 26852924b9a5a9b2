//! The health monitor: a background task that runs a real encrypt+decrypt on a
//! dedicated health-check key, and the cached result that GetHealthStatus and the
//! readiness probe read.
//!
//! The spec lets a proxy answer GetHealthStatus from a cached deep check no older than
//! one minute; answering from the cache keeps the API fast however slow the HSM is. The
//! check goes through the same session pool as KMS's requests, so it sees what they
//! see: a saturated pool, a slow HSM, a lost token.
//!
//! - ACTIVE: the round trip succeeded within half the request deadline.
//! - DEGRADED: it succeeded but slowly, or was shed because the pool is saturated:
//!   unhealthy but serving.
//! - UNAVAILABLE: it failed or timed out, or no check has succeeded within the last
//!   minute (the monitor itself is stuck).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use crate::hsm::{Backend, EkmHealth, HsmError};
use crate::metrics::{EkmLabels, Metrics};

/// A cached result may not be older than this (spec: GetHealthStatus).
pub const MAX_AGE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
struct Checked {
    status: EkmHealth,
    at: Instant,
}

/// The monitor of one EKM.
#[derive(Debug)]
pub struct HealthMonitor {
    backend: Arc<Backend>,
    key: Option<String>,
    interval: Duration,
    /// How long a check may take: the request deadline, as for KMS's requests.
    budget: Duration,
    last: RwLock<Checked>,
    shutting_down: AtomicBool,
    metrics: Arc<Metrics>,
}

impl HealthMonitor {
    /// A monitor that has not checked yet (reports UNAVAILABLE until it has).
    pub fn new(
        backend: Arc<Backend>,
        key: Option<String>,
        interval: Duration,
        budget: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        if key.is_none() {
            tracing::warn!(
                "no hsm.health_check_key: the health monitor checks that the HSM answers, not that it encrypts"
            );
        }
        let now = Instant::now();
        Self {
            backend,
            key,
            interval,
            budget,
            last: RwLock::new(Checked {
                status: EkmHealth::Unavailable,
                at: now.checked_sub(MAX_AGE).unwrap_or(now),
            }),
            shutting_down: AtomicBool::new(false),
            metrics,
        }
    }

    /// Runs one check now and caches its result.
    pub async fn check(&self) -> EkmHealth {
        let started = Instant::now();
        let result = self
            .backend
            .health_check(self.key.as_deref(), started + self.budget)
            .await;
        let elapsed = started.elapsed();
        let status = match &result {
            Ok(()) if elapsed <= self.budget / 2 => EkmHealth::Active,
            Ok(()) | Err(HsmError::Busy) => EkmHealth::Degraded,
            Err(_) => EkmHealth::Unavailable,
        };
        let previous = std::mem::replace(
            &mut *self.last.write(),
            Checked {
                status,
                at: Instant::now(),
            },
        );
        if previous.status != status {
            let ekm = &self.backend.ekm_info().id;
            let elapsed_us = elapsed.as_micros() as u64;
            match &result {
                Err(e) => {
                    tracing::warn!(%ekm, status = status.as_str(), error = %e, elapsed_us, "EKM health changed")
                }
                Ok(()) => {
                    tracing::info!(%ekm, status = status.as_str(), elapsed_us, "EKM health changed")
                }
            }
        }
        self.publish(status);
        status
    }

    fn publish(&self, current: EkmHealth) {
        let ekm = self.backend.ekm_info().id.clone();
        for status in [
            EkmHealth::Active,
            EkmHealth::Degraded,
            EkmHealth::Unavailable,
        ] {
            self.metrics
                .ekm_health
                .get_or_create(&EkmLabels {
                    ekm: ekm.clone(),
                    status: status.as_str(),
                })
                .set(i64::from(status == current));
        }
    }

    /// Checks every interval, forever (the first check is one interval from now:
    /// the caller checks once at start-up).
    pub async fn run(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            self.check().await;
        }
    }

    /// The cached status; UNAVAILABLE when it is older than [`MAX_AGE`].
    pub fn current(&self) -> EkmHealth {
        let last = *self.last.read();
        if last.at.elapsed() > MAX_AGE {
            EkmHealth::Unavailable
        } else {
            last.status
        }
    }

    /// Ready for traffic: not shutting down and the EKM can serve.
    pub fn ready(&self) -> bool {
        !self.shutting_down.load(Ordering::Acquire) && self.current() != EkmHealth::Unavailable
    }

    /// Turns readiness off for good (shutdown has begun).
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    /// The EKM's facts.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }
}
