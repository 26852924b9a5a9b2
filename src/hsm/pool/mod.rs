//! A bounded pool of HSM sessions on dedicated threads, with admission control.
//!
//! Each session is state `S` owned by one OS thread for its whole life, so HSM calls
//! never run on tokio worker threads and a session is never shared. Requests reach the
//! threads through one bounded MPMC queue. Admission is explicit:
//!
//! - every admitted request holds a place counted in `outstanding` (queued or running);
//!   a request whose expected completion (the waves of service ahead of it × the mean
//!   service time, plus its own call) would take more than half the time it has left
//!   is refused at once ([`HsmError::Busy`] → 429), and so is one that finds the queue
//!   full: nothing queues to time out. The place is taken with one atomic add, so
//!   concurrent admissions cannot all see the same short queue;
//! - a request whose deadline passes while it waits, or is too near for a call of the
//!   usual length, is never sent to the HSM;
//! - a call that runs past its call timeout (or the request's deadline) answers
//!   [`HsmError::Timeout`] (→ 503) at once, while its thread finishes the call: the
//!   session only returns to the pool when the HSM lets go of it. The fleet takes an
//!   EKM whose call timed out out of service, so a request whose deadline passes
//!   while its call has run for less than half the time it could have had (the call
//!   timeout, or the request's time left when it was submitted) is shed instead
//!   ([`HsmError::Busy`], `expired_in_call`): it waited long in the queue first, which
//!   is load, not a hung HSM.
//!
//! A call that does not return at all (a hung vendor library) holds its thread, and
//! its session, until it does. Once such a call has run past its call timeout the pool
//! counts its thread stuck (`xks_hsm_sessions_stuck{ekm}`, one WARN line naming the
//! call) and opens a replacement thread with a fresh session, so the EKM keeps its
//! capacity; at most `max_replacements` threads beyond the pool's size, since each
//! stuck thread still holds a vendor session. When a stuck call returns, its thread
//! retires if the pool is then over its size, and otherwise rejoins. While every
//! thread is stuck, requests are answered [`HsmError::Timeout`] at once. The health
//! monitor reports an EKM with stuck threads DEGRADED, and UNAVAILABLE when none serves
//! ([`Pool::threads`]).
//!
//! The PKCS#11 backend and the simulated HSM both run on this pool, so backpressure
//! tests with the simulated HSM exercise the product's admission code.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TrySendError};

use self::threads::{Finished, Threads, WatchOnDrop};
use super::HsmError;
use crate::metrics::{note_stage, Metrics, ShedReason, Stage};

mod threads;

pub use threads::PoolThreads;

type Job<S> = Box<dyn FnOnce(&mut S) + Send>;

const QUEUED: u8 = 0;
const RUNNING: u8 = 1;
const CANCELLED: u8 = 2;
/// The call returned.
const DONE: u8 = 3;
/// The call ran past its timeout and its thread is counted stuck until it returns.
const STUCK: u8 = 4;

/// Where a request is: queued, running on a session thread, or given up by its caller.
struct JobState {
    state: AtomicU8,
    /// When the call started, in nanoseconds after the pool's epoch.
    started_ns: AtomicU64,
}

/// What the pool's threads and callers share.
struct Shared {
    epoch: Instant,
    sessions: usize,
    queue_depth: usize,
    /// Admitted requests not yet finished or skipped: queued plus running.
    outstanding: AtomicUsize,
    busy: AtomicUsize,
    /// Exponentially weighted mean service time in nanoseconds (0 until measured).
    service_ewma_ns: AtomicU64,
    call_timeout: Duration,
    metrics: Arc<Metrics>,
    /// Session threads not retired: serving or stuck.
    threads: AtomicUsize,
    /// Threads in a call that ran past the call timeout and has not returned.
    stuck: AtomicUsize,
    /// Threads the pool may open beyond `sessions` to replace stuck ones.
    max_replacements: usize,
    /// `xks_hsm_sessions_stuck` of this pool's EKM.
    stuck_gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Shared {
    fn observe_service(&self, service: Duration) {
        let sample = service.as_nanos().min(u128::from(u64::MAX)) as u64;
        let _ = self
            .service_ewma_ns
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(next_estimate(old, sample))
            });
    }

    /// Counts a refusal and makes its error.
    fn refuse(&self, reason: ShedReason) -> HsmError {
        self.metrics.shed(reason);
        HsmError::Busy(reason)
    }

    fn mean_service(&self) -> Duration {
        Duration::from_nanos(self.service_ewma_ns.load(Ordering::Relaxed))
    }
}

/// The service-time estimate after one more call took `sample` ns (`old` 0: none yet).
///
/// An exponentially weighted mean with weight 1/8 follows a changing HSM within tens of
/// calls and smooths noise. A sample counts for at most [`OUTLIER_CAP`] times the mean:
/// one call that stalled (a thread preempted on a busy box, a key refresh) must not
/// move the estimate so far that admission, which multiplies it by the queue ahead,
/// refuses every request until enough fast calls pull it back, while a real slowdown
/// still raises it by up to 3/8 per call (from 20 µs to 5 ms in under 20 calls).
fn next_estimate(old: u64, sample: u64) -> u64 {
    if old == 0 {
        return sample;
    }
    let sample = sample.min(old.saturating_mul(OUTLIER_CAP));
    old - old / 8 + sample / 8
}

/// How many times the current estimate one sample may count for.
const OUTLIER_CAP: u64 = 4;

/// What a pooled call does: labels its stage timings and its log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Call {
    /// A request's encryption.
    Encrypt,
    /// A request's decryption.
    Decrypt,
    /// A request's key metadata, read fresh.
    GetKeyMetadata,
    /// A lookup of a key's current version.
    KeyVersion,
    /// The health monitor's check.
    HealthCheck,
}

impl Call {
    /// The label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Encrypt => "Encrypt",
            Self::Decrypt => "Decrypt",
            Self::GetKeyMetadata => "GetKeyMetadata",
            Self::KeyVersion => "KeyVersion",
            Self::HealthCheck => "HealthCheck",
        }
    }

    /// Whether the call's time is a sample of the service time requests wait for:
    /// first control calls log in, copy keys or search the token and take far longer
    /// than the requests queued behind them will.
    fn teaches(self) -> bool {
        matches!(self, Self::Encrypt | Self::Decrypt)
    }
}

/// A bounded pool of sessions `S`.
pub(crate) struct Pool<S> {
    /// `None` once the pool is being dropped (which disconnects the threads).
    jobs: Option<Sender<Job<S>>>,
    shared: Arc<Shared>,
    threads: Arc<Threads<S>>,
}

/// How long dropping a pool waits for its threads to finish their calls.
const STOP_WAIT: Duration = Duration::from_secs(2);

/// When the process must have exited: set once when shutdown starts, so that waiting
/// for session threads never runs past `server.shutdown_grace_seconds`.
static EXIT_BY: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Dropping a pool after `deadline` no longer waits for calls still running.
pub(crate) fn exit_by(deadline: Instant) {
    let _ = EXIT_BY.set(deadline);
}

impl<S> Drop for Pool<S> {
    /// Disconnects the session threads and waits (up to [`STOP_WAIT`], and never past
    /// [`exit_by`]'s deadline) until they have
    /// ended, and with them their sessions: a module must not be unloaded, nor the
    /// process exit and run the module's destructors, under a running call.
    fn drop(&mut self) {
        self.jobs = None;
        let give_up = EXIT_BY.get().map_or(Instant::now() + STOP_WAIT, |by| {
            (*by).min(Instant::now() + STOP_WAIT)
        });
        let threads = std::mem::take(&mut *self.threads.handles.lock());
        for thread in threads {
            while !thread.is_finished() && Instant::now() < give_up {
                thread::sleep(Duration::from_millis(1));
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                tracing::warn!("an HSM session thread is still in a call; leaving it behind");
            }
        }
    }
}

impl<S> fmt::Debug for Pool<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("sessions", &self.shared.sessions)
            .field("busy", &self.shared.busy.load(Ordering::Relaxed))
            .field("queued", &self.jobs.as_ref().map_or(0, Sender::len))
            .finish()
    }
}

/// Settings of a pool.
#[derive(Debug, Clone)]
pub(crate) struct PoolSettings {
    /// Thread name prefix.
    pub(crate) name: &'static str,
    /// Requests allowed to wait for a session.
    pub(crate) queue_depth: usize,
    /// Longest a single HSM call may take before the caller gets 503.
    pub(crate) call_timeout: Duration,
    /// Threads the pool may open beyond its size to replace stuck ones.
    pub(crate) max_replacements: usize,
    /// The EKM's id, for `xks_hsm_sessions_stuck`.
    pub(crate) ekm: String,
}

/// Gives the caller's place up if the caller goes away (client disconnected) before
/// its request started: the session thread then skips it.
struct CancelOnDrop(Arc<JobState>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let _ =
            self.0
                .state
                .compare_exchange(QUEUED, CANCELLED, Ordering::AcqRel, Ordering::Acquire);
    }
}

impl<S: Send + 'static> Pool<S> {
    /// Starts one thread per session state; `make` makes the state of a replacement
    /// thread (its session opens on its first job).
    pub(crate) fn start(
        settings: &PoolSettings,
        sessions: Vec<S>,
        make: impl Fn() -> S + Send + Sync + 'static,
        metrics: Arc<Metrics>,
    ) -> Result<Self, HsmError> {
        let (jobs, queue) = crossbeam_channel::bounded::<Job<S>>(settings.queue_depth.max(1));
        metrics.pool_sessions.set(sessions.len() as i64);
        let stuck_gauge = metrics
            .sessions_stuck
            .get_or_create(&crate::metrics::EkmIdLabels {
                ekm: settings.ekm.clone(),
            })
            .clone();
        stuck_gauge.set(0);
        let shared = Arc::new(Shared {
            epoch: Instant::now(),
            sessions: sessions.len().max(1),
            queue_depth: settings.queue_depth.max(1),
            outstanding: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            service_ewma_ns: AtomicU64::new(0),
            call_timeout: settings.call_timeout,
            metrics,
            threads: AtomicUsize::new(sessions.len()),
            stuck: AtomicUsize::new(0),
            max_replacements: settings.max_replacements,
            stuck_gauge,
        });
        let threads = Arc::new(Threads {
            shared: Arc::clone(&shared),
            queue,
            make: Box::new(make),
            name: settings.name,
            opened: AtomicUsize::new(0),
            handles: parking_lot::Mutex::new(Vec::with_capacity(sessions.len())),
        });
        for session in sessions {
            threads.spawn(session)?;
        }
        Ok(Self {
            jobs: Some(jobs),
            shared,
            threads,
        })
    }

    /// Requests admitted and not finished (queued or running), and the most the pool
    /// admits (sessions plus queue places).
    pub(crate) fn load(&self) -> (usize, usize) {
        let shared = &*self.shared;
        (
            shared.outstanding.load(Ordering::Relaxed),
            shared.sessions + shared.queue_depth,
        )
    }

    /// The pool's threads: its size, how many run and how many are stuck.
    pub(crate) fn threads(&self) -> PoolThreads {
        let shared = &*self.shared;
        PoolThreads {
            sessions: shared.sessions,
            threads: shared.threads.load(Ordering::Acquire),
            stuck: shared.stuck.load(Ordering::Acquire),
        }
    }

    /// Requests waiting for a session.
    pub(crate) fn queued(&self) -> usize {
        self.jobs.as_ref().map_or(0, Sender::len)
    }

    /// Takes a place for a request, or says why there is none.
    fn admit(&self, remaining: Duration) -> Result<Place<'_>, ShedReason> {
        let shared = &*self.shared;
        let ahead = shared.outstanding.fetch_add(1, Ordering::AcqRel);
        let place = Place(shared);
        if ahead >= shared.sessions + shared.queue_depth {
            return Err(ShedReason::QueueFull);
        }
        // Whole waves of service before a session frees up for us, plus our own call.
        let waves = (ahead / shared.serving().clamp(1, shared.sessions)) as u32 + 1;
        let expected = shared.mean_service() * waves;
        // Admit only what is expected to finish within half the time left. The other
        // half absorbs the estimate's error, which grows with the waves ahead (each
        // wave's time varies), and the response path: a request admitted near the
        // edge was often refused later anyway, after waiting (expired_in_queue), and
        // a refusal after a wait costs KMS its retry budget where an immediate one
        // does not.
        if expected > remaining / 2 {
            return Err(ShedReason::ExpectedWait);
        }
        Ok(place)
    }

    /// Runs `call`'s work `f` on a session before `deadline`. The time of a request's
    /// call (Encrypt, Decrypt) teaches the service-time estimate; a control call's (a
    /// health check, a key lookup) says nothing about the requests behind it.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        call: Call,
        deadline: Instant,
        f: impl FnOnce(&mut S) -> Result<T, HsmError> + Send + 'static,
    ) -> Result<T, HsmError> {
        let operation = call.as_str();
        let shared = &self.shared;
        let now = Instant::now();
        let Some(remaining) = deadline
            .checked_duration_since(now)
            .filter(|d| !d.is_zero())
        else {
            return Err(shared.refuse(ShedReason::Deadline));
        };
        if shared.serving() == 0 {
            // Every thread is held by a call that has not returned, and the bound on
            // replacements is reached: nothing would take the request.
            return Err(HsmError::Timeout);
        }
        let place = match self.admit(remaining) {
            Ok(place) => place,
            Err(reason) => {
                return Err(shared.refuse(reason));
            }
        };

        let state = Arc::new(JobState {
            state: AtomicU8::new(QUEUED),
            started_ns: AtomicU64::new(0),
        });
        let (reply, mut answer) = tokio::sync::oneshot::channel();
        let job_state = Arc::clone(&state);
        let job_shared = Arc::clone(shared);
        let job: Job<S> = Box::new(move |session| {
            let shared = job_shared;
            // However the job ends, its place is given back.
            let _place = Place(&shared);
            if job_state
                .state
                .compare_exchange(QUEUED, RUNNING, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                return; // the caller gave up; it has answered already
            }
            let started = Instant::now();
            // However the call ends (even by a panic), it is marked done, and a thread
            // counted stuck is counted again.
            let finished = Finished {
                state: &job_state,
                shared: &shared,
                call,
                started,
            };
            job_state.started_ns.store(
                started.duration_since(shared.epoch).as_nanos() as u64,
                Ordering::Release,
            );
            // Not sent to the HSM if the deadline has passed, or is so near that the
            // call (at its usual time, with half again for noise) would overrun it.
            let mean = shared.mean_service();
            if started + mean + mean / 2 >= deadline {
                let _ = reply.send(Err(shared.refuse(ShedReason::ExpiredInQueue)));
                return;
            }
            shared
                .metrics
                .latencies
                .record_stage(Stage::QueueWait, operation, started - now);
            shared.busy.fetch_add(1, Ordering::Relaxed);
            shared.metrics.pool_busy.inc();
            let result = f(session);
            let service = started.elapsed();
            drop(finished);
            shared.busy.fetch_sub(1, Ordering::Relaxed);
            shared.metrics.pool_busy.dec();
            if call.teaches() {
                shared.observe_service(service);
            }
            shared
                .metrics
                .latencies
                .record_stage(Stage::Hsm, operation, service);
            let _ = reply.send(result);
        });
        let Some(jobs) = &self.jobs else {
            return Err(HsmError::Unavailable("session pool stopped".into()));
        };
        match jobs.try_send(job) {
            Ok(()) => std::mem::forget(place), // the job gives the place back now
            Err(TrySendError::Full(_)) => {
                return Err(shared.refuse(ShedReason::QueueFull));
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(HsmError::Unavailable("session pool stopped".into()))
            }
        }
        shared.metrics.queue_depth.set(self.queued() as i64);
        let _cancel = CancelOnDrop(Arc::clone(&state));
        let _watch = WatchOnDrop {
            state: Arc::clone(&state),
            threads: Arc::clone(&self.threads),
            call,
        };

        // Wake at the deadline or when a running call's timeout would be up, whichever
        // is first. A call cannot have started before `now`, so `now + call_timeout`
        // is never later than its own limit.
        let mut wake = deadline.min(now + shared.call_timeout);
        // The longest the call could have run: its timeout, or what was left of the
        // request's time when it was submitted.
        let call_budget = shared
            .call_timeout
            .min(deadline.saturating_duration_since(now));
        loop {
            match tokio::time::timeout_at(wake.into(), &mut answer).await {
                Ok(result) => {
                    shared.metrics.queue_depth.set(self.queued() as i64);
                    let started_ns = state.started_ns.load(Ordering::Acquire);
                    if started_ns > 0 {
                        let started = shared.epoch + Duration::from_nanos(started_ns);
                        note_stage(Stage::QueueWait, started.saturating_duration_since(now));
                        note_stage(Stage::Hsm, started.elapsed());
                    }
                    return result
                        .map_err(|_| HsmError::Unavailable("session thread failed".into()))?;
                }
                Err(_) => {
                    let now = Instant::now();
                    match state.state.load(Ordering::Acquire) {
                        QUEUED if now >= deadline => {
                            if state
                                .state
                                .compare_exchange(
                                    QUEUED,
                                    CANCELLED,
                                    Ordering::AcqRel,
                                    Ordering::Acquire,
                                )
                                .is_ok()
                            {
                                return Err(shared.refuse(ShedReason::ExpiredInQueue));
                            }
                            // It started just now: treat as running.
                            wake = now;
                        }
                        QUEUED => wake = deadline.min(now + shared.call_timeout),
                        _ => {
                            let started = shared.epoch
                                + Duration::from_nanos(state.started_ns.load(Ordering::Acquire));
                            let call_limit = started + shared.call_timeout;
                            let limit = deadline.min(call_limit);
                            if now >= limit
                                && now < call_limit
                                && now.duration_since(started) < call_budget / 2
                            {
                                // The request's deadline passed while its call had run
                                // for less than half the time it could have had: the
                                // request spent most of its time in the queue. That is
                                // load, not a hung HSM. It is shed like a request that
                                // expired in the queue; a Timeout would take the EKM
                                // out of service.
                                return Err(shared.refuse(ShedReason::ExpiredInCall));
                            }
                            if now >= limit {
                                tracing::warn!(
                                    operation,
                                    elapsed_ms = now.duration_since(started).as_millis() as u64,
                                    "HSM call exceeded its time; answering 503 while the session finishes it"
                                );
                                return Err(HsmError::Timeout);
                            }
                            wake = limit;
                        }
                    }
                }
            }
        }
    }
}

/// A place among the outstanding requests, given back when dropped.
struct Place<'a>(&'a Shared);

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests;
