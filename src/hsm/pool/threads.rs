//! Session threads that a call never lets go of: counted stuck, replaced up to the
//! pool's bound, and retired when their call returns into a pool that is over its size
//! (see the module doc of `super`).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use super::{Call, Job, JobState, Shared, DONE, RUNNING, STUCK};
use crate::hsm::HsmError;

impl Shared {
    /// Threads that take jobs.
    pub(super) fn serving(&self) -> usize {
        self.threads
            .load(Ordering::Acquire)
            .saturating_sub(self.stuck.load(Ordering::Acquire))
    }

    /// Whether the thread that just finished a job retires: the pool serves with more
    /// threads than its size (a stuck call returned after a replacement opened).
    pub(super) fn retire(&self) -> bool {
        self.threads
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |threads| {
                let serving = threads.saturating_sub(self.stuck.load(Ordering::Acquire));
                (serving > self.sessions).then(|| threads - 1)
            })
            .is_ok()
    }

    /// A stuck call returned after `running`.
    pub(super) fn unstuck(&self, call: Call, running: Duration) {
        let stuck = self.stuck.fetch_sub(1, Ordering::AcqRel) - 1;
        self.stuck_gauge.set(stuck as i64);
        tracing::info!(
            operation = call.as_str(),
            elapsed_ms = running.as_millis() as u64,
            stuck,
            "a stuck HSM call returned; its session thread rejoins the pool or retires"
        );
    }
}

/// Makes the session state of a replacement thread.
pub(super) type MakeSession<S> = Box<dyn Fn() -> S + Send + Sync>;

/// The pool's session threads, and what it takes to open another.
pub(super) struct Threads<S> {
    pub(super) shared: Arc<Shared>,
    pub(super) queue: Receiver<Job<S>>,
    pub(super) make: MakeSession<S>,
    pub(super) name: &'static str,
    pub(super) opened: AtomicUsize,
    pub(super) handles: parking_lot::Mutex<Vec<thread::JoinHandle<()>>>,
}

impl<S: Send + 'static> Threads<S> {
    /// Starts a session thread on `session`; it takes jobs until the pool is dropped or
    /// it retires.
    pub(super) fn spawn(&self, mut session: S) -> Result<(), HsmError> {
        let queue = self.queue.clone();
        let shared = Arc::clone(&self.shared);
        let index = self.opened.fetch_add(1, Ordering::Relaxed);
        let thread = thread::Builder::new()
            .name(format!("{}-{index}", self.name))
            .spawn(move || {
                crate::affinity::pin_session_thread();
                // Ends when the pool (every Sender) is dropped.
                while let Ok(job) = queue.recv() {
                    // A panic inside a job must not take the session thread with it;
                    // the job's caller sees its reply dropped and answers 500.
                    if catch_unwind(AssertUnwindSafe(|| job(&mut session))).is_err() {
                        tracing::error!("HSM job panicked");
                    }
                    if shared.retire() {
                        tracing::info!(
                            "an HSM session thread retires: the pool is back to its size"
                        );
                        return;
                    }
                }
            })
            .map_err(|e| HsmError::Unavailable(format!("cannot start session thread: {e}")))?;
        self.handles.lock().push(thread);
        Ok(())
    }

    /// The call of a job in `state` ran past its timeout (started at `started`): if it
    /// still runs, its thread is stuck, and a replacement opens while the bound allows.
    fn check_stuck(&self, state: &JobState, call: Call, started: Instant) {
        if state
            .state
            .compare_exchange(RUNNING, STUCK, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return; // it returned
        }
        let shared = &*self.shared;
        let stuck = shared.stuck.fetch_add(1, Ordering::AcqRel) + 1;
        shared.stuck_gauge.set(stuck as i64);
        let threads = shared.threads.load(Ordering::Acquire);
        let replace = threads - stuck.min(threads) < shared.sessions
            && threads < shared.sessions + shared.max_replacements;
        tracing::warn!(
            operation = call.as_str(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            stuck,
            threads,
            replacement = replace,
            "an HSM call has not returned: its session thread is stuck{}",
            if replace {
                "; opening a replacement session thread"
            } else {
                "; no replacement (hsm.max_replacement_sessions reached)"
            }
        );
        if replace {
            shared.threads.fetch_add(1, Ordering::AcqRel);
            if let Err(e) = self.spawn((self.make)()) {
                shared.threads.fetch_sub(1, Ordering::AcqRel);
                tracing::error!(error = %e, "could not open a replacement session thread");
            }
        }
    }
}

/// Counts the call of a request that stops waiting for it (an answer given early, a
/// client gone) stuck if the call is still running at its call timeout.
pub(super) struct WatchOnDrop<S: Send + 'static> {
    pub(super) state: Arc<JobState>,
    pub(super) threads: Arc<Threads<S>>,
    pub(super) call: Call,
}

impl<S: Send + 'static> Drop for WatchOnDrop<S> {
    fn drop(&mut self) {
        if self.state.state.load(Ordering::Acquire) != RUNNING {
            return;
        }
        let shared = &self.threads.shared;
        // Zero only in the instant between the job's start and its timestamp.
        let started = match self.state.started_ns.load(Ordering::Acquire) {
            0 => Instant::now(),
            ns => shared.epoch + Duration::from_nanos(ns),
        };
        let due = started + shared.call_timeout;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (state, threads, call) = (
            Arc::clone(&self.state),
            Arc::clone(&self.threads),
            self.call,
        );
        runtime.spawn(async move {
            tokio::time::sleep_until(due.into()).await;
            threads.check_stuck(&state, call, started);
        });
    }
}

/// How many session threads a pool runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolThreads {
    /// The pool's size (`hsm.sessions`).
    pub sessions: usize,
    /// Threads running, replacements included.
    pub threads: usize,
    /// Threads held by a call past its timeout.
    pub stuck: usize,
}

impl PoolThreads {
    /// Threads that take requests.
    pub fn serving(&self) -> usize {
        self.threads.saturating_sub(self.stuck)
    }
}

/// Marks a running job's call done when dropped; a call counted stuck is uncounted.
pub(super) struct Finished<'a> {
    pub(super) state: &'a JobState,
    pub(super) shared: &'a Shared,
    pub(super) call: Call,
    pub(super) started: Instant,
}

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        if self
            .state
            .state
            .compare_exchange(RUNNING, DONE, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            self.shared.unstuck(self.call, self.started.elapsed());
        }
    }
}
