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
//!
//! The session pool's threads weigh in too (`crate::hsm::pool`): an EKM with a thread
//! stuck in a call that has not returned is at most DEGRADED (it serves on the other
//! threads and replacements), and UNAVAILABLE when no thread is left to serve.
//!
//! A fleet's EKMs are checked one by one; each verdict also tells the fleet whether to
//! route requests to that EKM. While any EKM is not ACTIVE the monitor checks every
//! second, so a returning HSM is seen (and reported) within seconds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use crate::hsm::{Backend, Ekm, EkmHealth, HsmError};
use crate::metrics::{EkmIdLabels, EkmLabels, Metrics};

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
    /// One result per EKM (see [`Backend::ekms`]).
    last: RwLock<Vec<Checked>>,
    shutting_down: AtomicBool,
    /// Turns true at the first check that finds an EKM able to serve (ACTIVE or
    /// DEGRADED), and stays so: the moment the proxy tells systemd it is ready.
    served: tokio::sync::watch::Sender<bool>,
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
        let never = Checked {
            status: EkmHealth::Unavailable,
            at: now.checked_sub(MAX_AGE).unwrap_or(now),
        };
        let ekms = backend.ekms().count();
        Self {
            backend,
            key,
            interval,
            budget,
            last: RwLock::new(vec![never; ekms]),
            shutting_down: AtomicBool::new(false),
            served: tokio::sync::watch::Sender::new(false),
            metrics,
        }
    }

    /// Checks every EKM now and caches the results; returns the best of them.
    pub async fn check(&self) -> EkmHealth {
        for (i, ekm) in self.backend.ekms().enumerate() {
            let status = self.check_one(i, ekm).await;
            if let Some(fleet) = self.backend.fleet() {
                fleet.note_health(i, status);
            }
        }
        let current = self.current();
        if current != EkmHealth::Unavailable {
            self.served
                .send_if_modified(|served| !std::mem::replace(served, true));
        }
        current
    }

    /// Completes once a check has found an EKM able to serve (at once if one has).
    pub async fn first_served(&self) {
        let mut served = self.served.subscribe();
        // The sender lives as long as `self`, so waiting cannot fail.
        let _ = served.wait_for(|served| *served).await;
    }

    async fn check_one(&self, i: usize, ekm: &Ekm) -> EkmHealth {
        let started = Instant::now();
        let result = ekm
            .health_check(self.key.as_deref(), started + self.budget)
            .await;
        let elapsed = started.elapsed();
        let mut status = match &result {
            Ok(()) if elapsed <= self.budget / 2 => EkmHealth::Active,
            Ok(()) | Err(HsmError::Busy(_)) => EkmHealth::Degraded,
            Err(_) => EkmHealth::Unavailable,
        };
        if let Some(threads) = ekm.pool_threads().filter(|t| t.stuck > 0) {
            status = if threads.serving() == 0 {
                EkmHealth::Unavailable
            } else if status == EkmHealth::Active {
                EkmHealth::Degraded
            } else {
                status
            };
        }
        let previous = std::mem::replace(
            &mut self.last.write()[i],
            Checked {
                status,
                at: Instant::now(),
            },
        );
        let ekm_id = &ekm.ekm_info().id;
        if previous.status != status {
            let elapsed_us = elapsed.as_micros() as u64;
            match &result {
                Err(e) => {
                    tracing::warn!(ekm = %ekm_id, status = status.as_str(), error = %e, elapsed_us, "EKM health changed")
                }
                Ok(()) => {
                    tracing::info!(ekm = %ekm_id, status = status.as_str(), elapsed_us, "EKM health changed")
                }
            }
        }
        self.publish(ekm_id, status);
        self.metrics
            .ekm_login_suspended
            .get_or_create(&EkmIdLabels {
                ekm: ekm_id.clone(),
            })
            .set(i64::from(ekm.login_suspended().is_some()));
        status
    }

    fn publish(&self, ekm: &str, current: EkmHealth) {
        for status in [
            EkmHealth::Active,
            EkmHealth::Degraded,
            EkmHealth::Unavailable,
        ] {
            self.metrics
                .ekm_health
                .get_or_create(&EkmLabels {
                    ekm: ekm.to_owned(),
                    status: status.as_str(),
                })
                .set(i64::from(status == current));
        }
    }

    /// Checks every interval, forever (the first check is one interval from now:
    /// the caller checks once at start-up).
    pub async fn run(self: Arc<Self>) {
        let quick = self.interval.min(Duration::from_secs(1));
        let mut wait = self.interval;
        loop {
            tokio::time::sleep(wait).await;
            self.check().await;
            let all_active = self.statuses().iter().all(|s| *s == EkmHealth::Active);
            wait = if all_active { self.interval } else { quick };
        }
    }

    /// Each EKM's cached status (in [`Backend::ekms`] order); UNAVAILABLE when older
    /// than [`MAX_AGE`].
    pub fn statuses(&self) -> Vec<EkmHealth> {
        self.last
            .read()
            .iter()
            .map(|last| {
                if last.at.elapsed() > MAX_AGE {
                    EkmHealth::Unavailable
                } else {
                    last.status
                }
            })
            .collect()
    }

    /// The best EKM's cached status: the proxy serves while any EKM does.
    pub fn current(&self) -> EkmHealth {
        let statuses = self.statuses();
        [EkmHealth::Active, EkmHealth::Degraded]
            .into_iter()
            .find(|s| statuses.contains(s))
            .unwrap_or(EkmHealth::Unavailable)
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
