//! The open loop's pacer: a thread that releases request *i* as a [`Ticket`] at
//! `t0 + i/rate`. A thread, not a tokio timer: tokio's timers round up to whole
//! milliseconds, which added up to a millisecond to every open-loop latency. It sleeps
//! until just before each due time and, at rates up to [`SPIN_MAX_RATE`], spins the last
//! [`SPIN`] so a ticket leaves within microseconds of its time. `hsm`'s session threads
//! pace themselves with the same [`wait_until`].

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

/// How long before a due time the pacer stops sleeping and spins.
const SPIN: Duration = Duration::from_micros(80);

/// Above this rate the pacer does not spin (its requests are closer together than a
/// thread's sleep is precise anyway, and spinning would take a core from the proxy).
const SPIN_MAX_RATE: f64 = 2000.0;

/// Blocks the calling thread until `due`: sleeps until just before it and, for a
/// thread pacing at most `SPIN_MAX_RATE` (2000) events a second, spins the rest.
pub fn wait_until(due: Instant, rate: f64) {
    let now = Instant::now();
    if due > now + SPIN {
        std::thread::sleep(due - now - SPIN);
    }
    if rate <= SPIN_MAX_RATE {
        while Instant::now() < due {
            std::hint::spin_loop();
        }
    }
}

/// Open loop: a request's due time, and when the pacer released it.
pub(super) struct Ticket {
    /// When the request is due: its latency counts from here.
    pub(super) due: Instant,
    /// When the pacer let it go (late if its thread woke late).
    pub(super) released: Instant,
}

/// Releases request `i` at `t0 + i/rate` until `end`, on its own thread.
pub(super) fn pace(t0: Instant, rate: f64, end: Instant, tickets: mpsc::UnboundedSender<Ticket>) {
    let interval = 1.0 / rate;
    for i in 0u64.. {
        let due = t0 + Duration::from_secs_f64(i as f64 * interval);
        if due >= end {
            return;
        }
        wait_until(due, rate);
        let ticket = Ticket {
            due,
            released: Instant::now(),
        };
        if tickets.send(ticket).is_err() {
            return;
        }
    }
}
