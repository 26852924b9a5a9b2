//! What a task records (its own histograms and counts, so that nothing but the open
//! loop's ticket channel is shared per request), the seconds it sends to the collector,
//! and the [`Totals`] its records are added into once every task has finished.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::mpsc;

use super::progress::Seconds;
use super::{Window, WindowResult, LATE_AFTER};
use crate::histogram::{new_histogram, new_second_histogram};
use crate::report::{Measured, Schedule, Verification};
use crate::stalls::Stalls;
use crate::workload::{Mix, Op, Sealed};
use crate::Error;

/// A finished second of one task.
pub(super) struct SecondMsg {
    /// Seconds since the measured window began.
    pub(super) offset: u64,
    /// The second's latencies (µs).
    pub(super) histogram: Histogram<u64>,
    /// The second's errors.
    pub(super) errors: u64,
}

/// A task's records.
pub(super) struct Recorder {
    per_op: [Option<Histogram<u64>>; 4],
    errors: [u64; 4],
    /// Answers by HTTP status (`0`: none).
    pub(super) status: HashMap<u16, u64>,
    error_names: HashMap<String, u64>,
    late: u64,
    /// Open loop: how late the pacer released each measured request (µs).
    released_late: Option<Histogram<u64>>,
    /// Open loop: how late a connection took each measured request (µs).
    sent_late: Option<Histogram<u64>>,
    /// Late requests the pacer had already released late.
    late_released: u64,
    second: u64,
    second_histogram: Histogram<u64>,
    second_errors: u64,
    /// Where finished seconds go; dropped when the task ends, so the collector ends.
    seconds: Option<mpsc::UnboundedSender<SecondMsg>>,
    /// Checks of the answers.
    pub(super) verification: Verification,
    /// Encrypt answers kept to decrypt after the window: key, answer, plaintext (Base64).
    pub(super) samples: Vec<(usize, Sealed, String)>,
    /// Encrypt answers seen (one in `SAMPLE_EVERY` is kept, up to a task's share).
    pub(super) encrypts: u64,
    /// When the last recorded request finished.
    pub(super) last_done: Option<Instant>,
    /// `--kms`: the logical calls and attempts as KMS saw them.
    pub(super) kms: crate::kms::Recorder,
}

impl Recorder {
    /// A recorder whose histograms for `mix` (and, open loop, for the schedule) exist
    /// already: made lazily, 64 tasks would each allocate and zero some 140 KB per
    /// histogram on their first measured request, all within the window's first few
    /// milliseconds, and that burst held up the open-loop schedule by up to 30 ms.
    pub(super) fn new(
        seconds: mpsc::UnboundedSender<SecondMsg>,
        mix: &Mix,
        open_loop: bool,
    ) -> Self {
        let histogram = |wanted: bool| wanted.then(new_histogram);
        Self {
            per_op: Op::ALL.map(|op| histogram(mix.uses(op))),
            errors: [0; 4],
            status: HashMap::new(),
            error_names: HashMap::new(),
            late: 0,
            released_late: histogram(open_loop),
            sent_late: histogram(open_loop),
            late_released: 0,
            second: 0,
            second_histogram: new_second_histogram(),
            second_errors: 0,
            seconds: Some(seconds),
            verification: Verification::default(),
            samples: Vec::new(),
            encrypts: 0,
            last_done: None,
            kms: crate::kms::Recorder::default(),
        }
    }

    fn flush_second(&mut self) {
        if self.second_histogram.is_empty() {
            return;
        }
        let histogram = std::mem::replace(&mut self.second_histogram, new_second_histogram());
        let errors = std::mem::take(&mut self.second_errors);
        if let Some(seconds) = &self.seconds {
            // The collector only goes away after every task has finished.
            let _ = seconds.send(SecondMsg {
                offset: self.second,
                histogram,
                errors,
            });
        }
    }

    /// Sends the last second and lets the collector finish.
    pub(super) fn finish(&mut self) {
        self.flush_second();
        self.seconds = None;
    }

    /// Open loop: a measured request that the pacer released `released` and a
    /// connection took `sent` after its due time.
    pub(super) fn schedule(&mut self, released: Duration, sent: Duration) {
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.released_late
            .get_or_insert_with(new_histogram)
            .saturating_record(us(released));
        self.sent_late
            .get_or_insert_with(new_histogram)
            .saturating_record(us(sent));
        if sent > LATE_AFTER {
            self.late += 1;
            if released > LATE_AFTER {
                self.late_released += 1;
            }
        }
    }

    /// A measured request of `op` that took `latency` and finished `offset` seconds into
    /// the window, with the errorName it failed with.
    pub(super) fn record(&mut self, op: Op, latency: Duration, offset: u64, error: Option<&str>) {
        let us = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        self.per_op[op.index()]
            .get_or_insert_with(new_histogram)
            .saturating_record(us);
        if offset != self.second {
            self.flush_second();
            self.second = offset;
        }
        self.second_histogram.saturating_record(us);
        if let Some(name) = error {
            self.errors[op.index()] += 1;
            self.second_errors += 1;
            match self.error_names.get_mut(name) {
                Some(n) => *n += 1,
                None => {
                    self.error_names.insert(name.to_owned(), 1);
                }
            }
        }
    }
}

/// The records of a window's tasks, added together once every task has finished.
pub(super) struct Totals {
    /// Per operation (index [`Op::index`]): its name, latencies and errors.
    per_op: Vec<(String, Histogram<u64>, u64)>,
    /// Answers by HTTP status.
    status_counts: BTreeMap<String, u64>,
    /// Errors by errorName.
    error_counts: BTreeMap<String, u64>,
    /// The tasks' checks (the end-of-window decrypts are added later).
    pub(super) verification: Verification,
    /// Open loop: requests sent late.
    late: u64,
    /// Open loop: how late the pacer released each request (µs).
    released_late: Histogram<u64>,
    /// Open loop: how late a connection took each request (µs).
    sent_late: Histogram<u64>,
    /// Late requests the pacer had already released late.
    late_released: u64,
    /// Encrypt answers kept to decrypt after the window.
    pub(super) samples: Vec<(usize, Sealed, String)>,
    /// When the last recorded request finished (the window's end if none finished later).
    last_done: Instant,
    /// `--kms`: the profile and the tasks' records of KMS's view.
    pub(super) kms: Option<(crate::kms::Profile, crate::kms::Recorder)>,
}

impl Totals {
    /// Nothing added yet, for a window that ends at `end`, with `pool_size` pooled
    /// ciphertexts.
    pub(super) fn new(pool_size: u64, end: Instant) -> Self {
        Self {
            per_op: Op::ALL
                .iter()
                .map(|op| (op.name().to_owned(), new_histogram(), 0))
                .collect(),
            status_counts: BTreeMap::new(),
            error_counts: BTreeMap::new(),
            verification: Verification {
                pool_size,
                ..Verification::default()
            },
            late: 0,
            released_late: new_histogram(),
            sent_late: new_histogram(),
            late_released: 0,
            samples: Vec::new(),
            last_done: end,
            kms: None,
        }
    }

    /// Adds one task's records.
    pub(super) fn add(&mut self, recorder: Recorder) -> Result<(), Error> {
        if let Some(done) = recorder.last_done {
            self.last_done = self.last_done.max(done);
        }
        for op in Op::ALL {
            let (_, histogram, errors) = &mut self.per_op[op.index()];
            if let Some(h) = &recorder.per_op[op.index()] {
                histogram.add(h)?;
            }
            *errors += recorder.errors[op.index()];
        }
        for (status, n) in recorder.status {
            *self.status_counts.entry(status.to_string()).or_insert(0) += n;
        }
        for (name, n) in recorder.error_names {
            *self.error_counts.entry(name).or_insert(0) += n;
        }
        self.verification.add(&recorder.verification);
        self.late += recorder.late;
        self.late_released += recorder.late_released;
        if let (Some(r), Some(s)) = (&recorder.released_late, &recorder.sent_late) {
            self.released_late.add(r)?;
            self.sent_late.add(s)?;
        }
        self.samples.extend(recorder.samples);
        if let Some((_, kms)) = &mut self.kms {
            kms.add(&recorder.kms)?;
        }
        Ok(())
    }

    /// What the window produced: the totals, with the collector's `seconds` as the
    /// series (the measured window began `measure_since_epoch` after the Unix epoch) and
    /// the machine's `stalls`.
    pub(super) fn into_result(
        self,
        window: &Window,
        seconds: Seconds,
        measure_since_epoch: Duration,
        stalls: Stalls,
    ) -> WindowResult {
        let settings = &window.settings;
        // `--kms`: retries and the health checks beside the load are requests, not
        // due ones.
        let extra = self
            .kms
            .as_ref()
            .map_or(0, |(_, k)| k.retries() + k.health_check_count());
        let measured_count: u64 = self
            .per_op
            .iter()
            .map(|(_, h, _)| h.len())
            .sum::<u64>()
            .saturating_sub(extra);
        // Open loop: the requests due in the window that were never sent.
        let unsent = settings.rate.map_or(0, |rate| {
            let index = |d: Duration| (d.as_secs_f64() * rate).ceil() as u64;
            let due = index(settings.warmup + settings.duration) - index(settings.warmup);
            due.saturating_sub(measured_count)
        });
        let measure_unix = measure_since_epoch.as_secs();
        let series = seconds
            .into_iter()
            .enumerate()
            .filter_map(|(offset, s)| {
                s.map(|(h, e)| (measure_unix + offset as u64, offset as u64, h, e))
            })
            .collect();
        WindowResult {
            measured: Measured {
                per_op: self.per_op,
                status_counts: self.status_counts,
                error_counts: self.error_counts,
                late: self.late,
                unsent,
                series,
                window_start_unix_ms: Some(measure_since_epoch.as_millis() as u64),
                // Until the last answer: an open loop that fell behind is still catching
                // up after the window, and its achieved rate must show that.
                seconds: (self.last_done - window.measure_start).as_secs_f64(),
                stalls: Some(stalls),
                schedule: settings.rate.map(|_| {
                    Schedule::new(&self.released_late, &self.sent_late, self.late_released)
                }),
            },
            verification: self.verification,
            kms: self.kms.as_ref().map(|(profile, k)| k.view(profile)),
        }
    }
}
