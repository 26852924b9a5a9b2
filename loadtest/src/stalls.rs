//! The generator machine's own stalls, measured while the load runs.
//!
//! A latency target of a millisecond means little on a machine that stops a runnable
//! thread for longer than that by itself: a virtual CPU the hypervisor took away (steal
//! time), an interrupt storm, a busy neighbour. The idea is jHiccup's: a thread that
//! does nothing but sleep a fixed interval records how much later than asked it wakes.
//! Whatever delays it delays the proxy and the generator too, so a report can say how
//! much of its tail the machine alone would have caused.
//!
//! On Linux a sleeping thread wakes 50–80 µs late even on an idle machine (the default
//! timer slack plus the wake-up); that floor shows as the median. The share of CPU time
//! the hypervisor stole comes from the `steal` column of `/proc/stat`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::histogram::{encode_histogram, new_histogram, Percentiles};
use crate::Error;

/// How long the meter sleeps between wake-ups (jHiccup's default is 1 ms too). Short
/// enough that a stall of a millisecond or more cannot fall between two wake-ups
/// unseen; long enough that the meter costs about a thousandth of a core.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(1);

/// Stalls of at least this long are counted on their own.
const LONG_STALL_US: u64 = 1_000;

/// What the meter saw in the measured window.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Stalls {
    /// The meter's sleep, µs.
    pub interval_us: u64,
    /// Wake-ups recorded.
    pub samples: u64,
    /// How late the wake-ups came, ms.
    pub late_ms: Percentiles,
    /// Wake-ups at least 1 ms late.
    pub over_1ms: u64,
    /// Share of all CPUs' time the hypervisor gave to someone else, percent (Linux).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stolen_pct: Option<f64>,
    /// The full histogram of lateness (µs), V2 deflate, Base64.
    pub histogram: String,
}

impl Stalls {
    /// One line for a report's text.
    pub fn line(&self) -> String {
        let p = &self.late_ms;
        let stolen = self
            .stolen_pct
            .map_or(String::new(), |s| format!("; {s:.2}% of CPU time stolen"));
        format!(
            "machine stalls (a thread sleeping {} µs woke late by): p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms, {} of {} wake-ups late by 1 ms or more{stolen}",
            self.interval_us, p.p50, p.p99, p.p99_9, p.max, self.over_1ms, self.samples
        )
    }
}

/// Counters of `/proc/stat`'s first line: (steal, all).
fn cpu_ticks() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]: the guest
    // columns are already counted in user and nice.
    let steal = *ticks.get(7)?;
    Some((steal, ticks.iter().take(8).sum()))
}

fn stolen_pct(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> Option<f64> {
    let ((s0, t0), (s1, t1)) = (before?, after?);
    let all = t1.checked_sub(t0).filter(|&t| t > 0)?;
    Some(100.0 * s1.saturating_sub(s0) as f64 / all as f64)
}

/// Records how late a sleeping thread wakes, between `measure_start` and `end` or until
/// [`Meter::finish`], whichever comes first.
#[derive(Debug)]
pub struct Meter {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<Stalls>,
}

impl Meter {
    /// Starts the meter's thread.
    pub fn start(interval: Duration, measure_start: Instant, end: Instant) -> Result<Self, Error> {
        let interval = interval.max(Duration::from_micros(10));
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name("stall-meter".into())
            .spawn(move || measure(interval, measure_start, end, &stopped))?;
        Ok(Self { stop, thread })
    }

    /// Stops the meter and returns what it saw.
    pub fn finish(self) -> Result<Stalls, Error> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| "the stall meter panicked".into())
    }
}

fn measure(interval: Duration, measure_start: Instant, end: Instant, stop: &AtomicBool) -> Stalls {
    let mut late = new_histogram();
    // Wait for the window in short sleeps, so that an early finish is not held up.
    loop {
        let now = Instant::now();
        if now >= measure_start || stop.load(Ordering::Relaxed) {
            break;
        }
        thread::sleep((measure_start - now).min(Duration::from_millis(10)));
    }
    let ticks_at_start = cpu_ticks();
    let mut due = Instant::now() + interval;
    while !stop.load(Ordering::Relaxed) {
        thread::sleep(due.saturating_duration_since(Instant::now()));
        let woke = Instant::now();
        if woke >= end {
            break;
        }
        let us = woke.saturating_duration_since(due).as_micros();
        late.saturating_record(u64::try_from(us).unwrap_or(u64::MAX));
        due = woke + interval;
    }
    let ticks_at_end = cpu_ticks();
    summarize(interval, &late, stolen_pct(ticks_at_start, ticks_at_end))
}

fn summarize(interval: Duration, late: &Histogram<u64>, stolen_pct: Option<f64>) -> Stalls {
    Stalls {
        interval_us: u64::try_from(interval.as_micros()).unwrap_or(u64::MAX),
        samples: late.len(),
        late_ms: Percentiles::of(late),
        over_1ms: late.count_between(LONG_STALL_US, u64::MAX),
        stolen_pct,
        histogram: encode_histogram(late),
    }
}

/// `xks-loadtest stalls`: the machine's stalls with nothing else of ours running.
#[derive(Debug, Clone, clap::Args)]
pub struct StallsArgs {
    /// Seconds to measure.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// The meter's sleep between wake-ups, µs.
    #[arg(long, default_value_t = 1_000)]
    pub interval_us: u64,
    /// Write the result as JSON here.
    #[arg(long, value_name = "FILE")]
    pub report: Option<std::path::PathBuf>,
}

/// Runs `stalls`.
pub fn run_stalls(args: &StallsArgs) -> Result<Stalls, Error> {
    if !(args.duration.is_finite() && args.duration > 0.0) {
        return Err("--duration must be above 0".into());
    }
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(args.duration);
    let meter = Meter::start(Duration::from_micros(args.interval_us), start, end)?;
    thread::sleep(end.saturating_duration_since(Instant::now()));
    let stalls = meter.finish()?;
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_vec_pretty(&stalls)?)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(stalls)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::histogram::decode_histogram;

    #[test]
    fn a_stall_shows_and_counts_over_one_millisecond() {
        let mut late = new_histogram();
        for _ in 0..998 {
            late.record(60).unwrap();
        }
        late.record(1_500).unwrap();
        late.record(4_000).unwrap();
        let s = summarize(Duration::from_millis(1), &late, Some(0.5));
        assert_eq!(s.samples, 1000);
        assert_eq!(s.over_1ms, 2);
        assert!((s.late_ms.p50 - 0.060).abs() < 0.001);
        assert!((s.late_ms.max - 4.0).abs() < 0.01, "{:?}", s.late_ms);
        assert_eq!(decode_histogram(&s.histogram).unwrap().len(), 1000);
        let line = s.line();
        assert!(line.contains("2 of 1000"), "{line}");
        assert!(line.contains("0.50% of CPU time stolen"), "{line}");
    }

    #[test]
    fn stolen_share_is_the_steal_delta_over_all_ticks() {
        assert_eq!(stolen_pct(Some((10, 1_000)), Some((20, 2_000))), Some(1.0));
        assert_eq!(stolen_pct(Some((10, 1_000)), Some((10, 1_000))), None);
        assert_eq!(stolen_pct(None, Some((10, 1_000))), None);
    }

    #[test]
    fn the_meter_records_only_inside_its_window() {
        // The meter only records inside its window, and its wake-ups are at least one
        // interval apart: 200 ms at 1 ms is at most 200 wake-ups (and, on a machine
        // running other tests, surely more than 10).
        let start = Instant::now() + Duration::from_millis(20);
        let meter = Meter::start(
            Duration::from_millis(1),
            start,
            start + Duration::from_millis(200),
        )
        .unwrap();
        thread::sleep(Duration::from_millis(300));
        let s = meter.finish().unwrap();
        assert!(s.samples > 10 && s.samples <= 200, "{s:?}");
        if cfg!(target_os = "linux") {
            assert!(s.stolen_pct.is_some(), "{s:?}");
        }
    }

    #[test]
    fn finish_stops_the_meter_before_its_end() {
        let start = Instant::now();
        let meter = Meter::start(
            Duration::from_millis(1),
            start,
            start + Duration::from_secs(3600),
        )
        .unwrap();
        thread::sleep(Duration::from_millis(30));
        // Without the stop this would wait an hour.
        let s = meter.finish().unwrap();
        assert!(s.samples > 0, "{s:?}");
    }
}
