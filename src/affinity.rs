//! Pinning the proxy's busy threads to CPUs (`server.pin_threads`).
//!
//! When the proxy shares a few cores with other busy processes (a load generator on the
//! same box, an agent), the kernel keeps moving the tokio workers and the HSM session
//! threads between CPUs, and a request's turn on a CPU comes less evenly. With one
//! worker and a share of the session threads held on each CPU, p99 at 64 connections
//! came closer to the mean on a 2-core box (perf/steps.md, "SoftHSM2 without its locks (no), and the busy threads held on CPUs (yes)").
//!
//! The plan is made once at start-up from the CPUs the process may run on (its own
//! affinity mask, so `taskset`, cpusets and container limits are respected): tokio
//! worker *i* runs on the plan's CPU *i* mod *n*, and the *j*-th HSM session thread the
//! process starts (over all its pools) on CPU *j* mod *n*. The log writer and any
//! other thread keep the whole mask.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use core_affinity::CoreId;

/// Where the busy threads go.
#[derive(Debug)]
pub struct Plan {
    cpus: Vec<CoreId>,
    workers_started: AtomicUsize,
    sessions_started: AtomicUsize,
}

/// The process's plan, once `serve` has made one.
static PLAN: OnceLock<Plan> = OnceLock::new();

impl Plan {
    /// A plan over the CPUs this process may run on, or `None` if the system does not
    /// say which those are.
    pub fn from_allowed_cpus() -> Option<Self> {
        let mut cpus = core_affinity::get_core_ids()?;
        if cpus.is_empty() {
            return None;
        }
        cpus.sort_by_key(|c| c.id);
        Some(Self {
            cpus,
            workers_started: AtomicUsize::new(0),
            sessions_started: AtomicUsize::new(0),
        })
    }

    /// The CPUs' numbers, in the order threads are placed on them.
    pub fn cpus(&self) -> Vec<usize> {
        self.cpus.iter().map(|c| c.id).collect()
    }

    /// How many tokio workers to run: one per CPU.
    pub fn workers(&self) -> usize {
        self.cpus.len()
    }

    /// Makes this the process's plan (the first one made stays).
    pub fn install(self) -> &'static Self {
        PLAN.get_or_init(|| self)
    }

    /// For tokio's `on_thread_start`: pins the calling thread if it is one of the
    /// first [`Plan::workers`] threads the runtime starts. tokio starts its workers
    /// when the runtime is built, before anything can ask it for a blocking thread, so
    /// those are the workers; threads started later are left unpinned.
    pub fn pin_worker(&self) {
        let index = self.workers_started.fetch_add(1, Ordering::Relaxed);
        if index < self.workers() {
            self.pin_current(index, "tokio worker");
        }
    }

    fn pin_current(&self, index: usize, what: &str) {
        let cpu = self.cpus[index % self.cpus.len()];
        if !core_affinity::set_for_current(cpu) {
            tracing::warn!(
                cpu = cpu.id,
                thread = what,
                "could not pin a thread to its CPU"
            );
        }
    }
}

/// Pins the calling HSM session thread to the next CPU of the process's plan, if
/// `serve` made one.
pub fn pin_session_thread() {
    if let Some(plan) = PLAN.get() {
        let index = plan.sessions_started.fetch_add(1, Ordering::Relaxed);
        plan.pin_current(index, "HSM session");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPUs the calling thread may run on, as the kernel tells it now.
    fn allowed_here() -> Vec<usize> {
        let mut cpus: Vec<usize> = core_affinity::get_core_ids()
            .unwrap()
            .iter()
            .map(|c| c.id)
            .collect();
        cpus.sort_unstable();
        cpus
    }

    #[test]
    fn the_first_workers_get_a_cpu_each_and_later_threads_stay_free() {
        let allowed = allowed_here();
        let plan = std::sync::Arc::new(Plan::from_allowed_cpus().unwrap());
        assert_eq!(plan.cpus(), allowed);
        assert_eq!(plan.workers(), allowed.len());
        let mut pinned = Vec::new();
        for _ in 0..plan.workers() {
            let plan = std::sync::Arc::clone(&plan);
            let cpus = std::thread::spawn(move || {
                plan.pin_worker();
                allowed_here()
            })
            .join()
            .unwrap();
            assert_eq!(cpus.len(), 1, "a worker may run on {cpus:?}");
            pinned.push(cpus[0]);
        }
        assert_eq!(pinned, allowed, "one worker on each CPU, in order");
        // A thread the runtime starts after its workers (a blocking thread) stays free.
        let later = std::thread::spawn(move || {
            plan.pin_worker();
            allowed_here()
        })
        .join()
        .unwrap();
        assert_eq!(later, allowed);
    }
}
