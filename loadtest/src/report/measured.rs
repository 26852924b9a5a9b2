//! [`Measured`]: what a measured window produced (the load engine's or `hsm`'s), in
//! histograms and counts, before [`Report::new`](super::Report::new) makes a report of it.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;

use super::{pct, rate, Schedule, Step};
use crate::histogram::{encode_histogram, new_histogram, Percentiles};
use crate::stalls::Stalls;

/// Everything a measured window produced, before it becomes a report.
#[derive(Debug, Clone)]
pub struct Measured {
    /// Per operation (index [`crate::workload::Op::index`]; for `hsm`, Encrypt/Decrypt).
    pub per_op: Vec<(String, Histogram<u64>, u64)>,
    /// Status counts.
    pub status_counts: BTreeMap<String, u64>,
    /// Error counts.
    pub error_counts: BTreeMap<String, u64>,
    /// Late sends.
    pub late: u64,
    /// Open loop: requests due in the window that were never sent.
    pub unsent: u64,
    /// Per-second (unix second, offset, histogram, errors).
    pub series: Vec<(u64, u64, Histogram<u64>, u64)>,
    /// When the measured window started, Unix milliseconds.
    pub window_start_unix_ms: Option<u64>,
    /// Window length, seconds.
    pub seconds: f64,
    /// The generator machine's own stalls in the window.
    pub stalls: Option<Stalls>,
    /// Open loop: how late the generator sent requests.
    pub schedule: Option<Schedule>,
}

impl Measured {
    /// All operations added together.
    pub fn overall(&self) -> (Histogram<u64>, u64) {
        let mut all = new_histogram();
        let mut errors = 0;
        for (_, h, e) in &self.per_op {
            all.add(h).expect("histograms auto-resize");
            errors += e;
        }
        (all, errors)
    }

    /// A search/hsm step of this window.
    pub fn step(&self) -> Step {
        let (all, errors) = self.overall();
        Step {
            offered_rps: None,
            sessions: None,
            achieved_rps: rate(all.len(), self.seconds),
            requests: all.len(),
            errors,
            error_pct: pct(errors, all.len()),
            late: self.late,
            unsent: self.unsent,
            latency_ms: Percentiles::of(&all),
            met_slo: None,
            stalls: self.stalls.clone(),
            schedule: self.schedule.clone(),
            histogram: encode_histogram(&all),
            kms: None,
        }
    }
}
