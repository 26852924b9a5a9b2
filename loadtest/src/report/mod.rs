//! The JSON report: its types, how a measured window becomes one, reading and writing
//! it. What a window hands over ([`Measured`]) is in `measured.rs`; the report's text
//! (tables and lines) in `text.rs`; `merge` and `compare`, which read reports and make a
//! report or a text of them, in `merge.rs` and `compare.rs`.
//!
//! Latencies are recorded in microseconds; every histogram a report holds is in the form
//! [`crate::histogram`] gives it, so reports from several machines can be added exactly.

use std::collections::BTreeMap;
use std::path::Path;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::histogram::{decode_histogram, encode_histogram, new_histogram, Percentiles};
use crate::stalls::Stalls;
use crate::target::TargetInfo;
use crate::Error;

mod compare;
#[cfg(test)]
mod fixtures;
pub mod gate;
mod measured;
mod merge;
mod text;

pub use compare::compare;
pub use measured::Measured;
pub use merge::merge;
pub use text::steps_text;

/// Report format version.
pub const FORMAT: u32 = 1;
/// What KMS waits for an answer before giving up (spec: the proxy's latency budget).
pub const KMS_BUDGET_MS: f64 = 250.0;

/// One operation's results (or `overall`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpReport {
    /// Requests answered (or failed) in the measured window.
    pub count: u64,
    /// Of those, not HTTP 200 (or no answer).
    pub errors: u64,
    /// count / measured seconds.
    pub throughput_rps: f64,
    /// Latency percentiles, ms.
    pub latency_ms: Percentiles,
    /// The full latency histogram (µs), V2 deflate, Base64.
    pub histogram: String,
}

impl OpReport {
    /// From a histogram and counts.
    pub fn new(h: &Histogram<u64>, errors: u64, seconds: f64) -> Self {
        Self {
            count: h.len(),
            errors,
            throughput_rps: rate(h.len(), seconds),
            latency_ms: Percentiles::of(h),
            histogram: encode_histogram(h),
        }
    }
}

/// requests / seconds, 0 for an empty window.
pub fn rate(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

/// One second of the run (by completion time).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SecondPoint {
    /// Unix time of the second's start.
    pub t_unix: u64,
    /// Seconds since the measured window began.
    pub offset_s: u64,
    /// Requests completed.
    pub count: u64,
    /// Of those, errors.
    pub errors: u64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Largest, ms.
    pub max_ms: f64,
    /// The second's histogram (µs, 2 significant digits), for `merge`.
    pub histogram: String,
}

impl SecondPoint {
    /// From a second's histogram.
    pub fn new(t_unix: u64, offset_s: u64, h: &Histogram<u64>, errors: u64) -> Self {
        let p = Percentiles::of(h);
        Self {
            t_unix,
            offset_s,
            count: h.len(),
            errors,
            p50_ms: p.p50,
            p99_ms: p.p99,
            max_ms: p.max,
            histogram: encode_histogram(h),
        }
    }
}

/// The machine the generator ran on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Machine {
    /// Host name.
    pub hostname: String,
    /// Logical CPUs available to the process.
    pub cores: usize,
    /// Kernel release.
    pub kernel: String,
    /// How long the machine itself stalled a sleeping thread during the measured
    /// window (see [`crate::stalls`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalls: Option<Stalls>,
    /// Open loop: how late this machine's generator sent requests after their due
    /// time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
}

/// Open loop: how late requests left the generator after their due time. Their
/// latency counts from the due time either way (coordinated omission corrected); this
/// says how much of it the generator added before the target saw anything.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Schedule {
    /// How late the pacer thread released each request: its own wake-up, so the
    /// machine's doing, ms.
    pub released_late_ms: Percentiles,
    /// How late each request was sent: for `run` and `search`, when a connection
    /// took it (the pacer's lateness plus the wait for a free connection and for a
    /// generator thread to run); for `hsm`, whose session threads pace themselves,
    /// the same as the pacer's, ms.
    pub sent_late_ms: Percentiles,
    /// Requests sent more than 2 ms late (the summary's `late`) that the pacer had
    /// already released more than 2 ms late.
    pub late_released: u64,
    /// The pacer's lateness (µs), V2 deflate, Base64.
    pub released_histogram: String,
    /// The sending lateness (µs), V2 deflate, Base64.
    pub sent_histogram: String,
}

impl Schedule {
    /// From histograms of the pacer's and the sending lateness, in µs.
    pub fn new(released: &Histogram<u64>, sent: &Histogram<u64>, late_released: u64) -> Self {
        Self {
            released_late_ms: Percentiles::of(released),
            sent_late_ms: Percentiles::of(sent),
            late_released,
            released_histogram: encode_histogram(released),
            sent_histogram: encode_histogram(sent),
        }
    }
}

impl Machine {
    /// This machine.
    pub fn this() -> Self {
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        let mut hostname = read("/proc/sys/kernel/hostname");
        if hostname.is_empty() {
            hostname = std::env::var("HOSTNAME").unwrap_or_else(|_| "unknown".into());
        }
        let kernel = format!(
            "{} {} {}",
            read("/proc/sys/kernel/ostype"),
            read("/proc/sys/kernel/osrelease"),
            std::env::consts::ARCH
        )
        .trim()
        .to_owned();
        Self {
            hostname,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel,
            stalls: None,
            schedule: None,
        }
    }
}

/// The generator's name and version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tool {
    /// `xks-loadtest`.
    pub name: String,
    /// Its version.
    pub version: String,
}

impl Default for Tool {
    fn default() -> Self {
        Self {
            name: env!("CARGO_PKG_NAME").into(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

/// Correctness checks made during the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Verification {
    /// Ciphertexts made by Encrypt for Decrypt requests to use.
    pub pool_size: u64,
    /// Encrypt results later decrypted to check the plaintext comes back.
    pub encrypt_samples_checked: u64,
    /// Of those, not decrypted to the original plaintext.
    pub encrypt_sample_failures: u64,
    /// Decrypt answers compared with the known plaintext.
    pub decrypts_checked: u64,
    /// Of those, a different plaintext (or an unreadable answer).
    pub decrypt_mismatches: u64,
    /// Encrypt answers whose CDIV was recomputed (with `--cdiv`).
    pub cdivs_checked: u64,
    /// Of those, missing or wrong.
    pub cdiv_failures: u64,
    /// 200 answers that were not the JSON the spec defines.
    pub malformed_responses: u64,
}

impl Verification {
    /// All failures.
    pub fn failures(&self) -> u64 {
        self.encrypt_sample_failures
            + self.decrypt_mismatches
            + self.cdiv_failures
            + self.malformed_responses
    }

    /// Adds another's counts.
    pub fn add(&mut self, other: &Self) {
        self.pool_size += other.pool_size;
        self.encrypt_samples_checked += other.encrypt_samples_checked;
        self.encrypt_sample_failures += other.encrypt_sample_failures;
        self.decrypts_checked += other.decrypts_checked;
        self.decrypt_mismatches += other.decrypt_mismatches;
        self.cdivs_checked += other.cdivs_checked;
        self.cdiv_failures += other.cdiv_failures;
        self.malformed_responses += other.malformed_responses;
    }
}

/// The latency objective, and how the run did against it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Slo {
    /// The p99 objective, ms.
    pub p99_ms: f64,
    /// The error objective, percent.
    pub error_pct: f64,
    /// Share of requests answered within `p99_ms`, percent.
    pub within_p99_target_pct: f64,
    /// Whether p99 ≤ objective and errors ≤ objective.
    pub met: bool,
}

/// One step of `search` (offered rate) or `hsm` (sessions).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    /// Offered rate (search), req/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offered_rps: Option<f64>,
    /// Concurrent sessions (hsm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<usize>,
    /// Achieved rate, req/s.
    pub achieved_rps: f64,
    /// Requests in the step's measured window.
    pub requests: u64,
    /// Errors.
    pub errors: u64,
    /// errors / requests, percent.
    pub error_pct: f64,
    /// Open loop: requests sent more than 2 ms after they were due.
    pub late: u64,
    /// Requests due in the step that were never sent (open loop).
    #[serde(default)]
    pub unsent: u64,
    /// Latency percentiles, ms.
    pub latency_ms: Percentiles,
    /// Whether the step met the SLO (search).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub met_slo: Option<bool>,
    /// The generator machine's own stalls during the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalls: Option<Stalls>,
    /// Open loop: how late the generator sent the step's requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    /// The step's histogram (µs).
    pub histogram: String,
    /// `--kms`: what KMS would have seen of the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms: Option<crate::kms::View>,
}

/// Totals of a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    /// Requests in the measured window.
    pub requests: u64,
    /// HTTP 200.
    pub ok: u64,
    /// Everything else (HTTP errors and requests without an answer).
    pub errors: u64,
    /// errors / requests, percent.
    pub error_pct: f64,
    /// requests / measured seconds.
    pub throughput_rps: f64,
    /// Open loop: requests sent more than 2 ms after their intended time, because no
    /// connection was free or the generator itself was held up (their latency still
    /// counts from the intended time; see [`Schedule`]).
    pub late: u64,
    /// Open loop: requests due in the measured window that were never sent (the
    /// generator gave up on its backlog a few seconds after the window).
    #[serde(default)]
    pub unsent: u64,
    /// Share answered within KMS's 250 ms, percent.
    pub within_kms_budget_pct: f64,
}

impl Summary {
    /// From all requests' latencies and errors, the throughput, and the open loop's
    /// late and unsent counts.
    pub fn new(
        all: &Histogram<u64>,
        errors: u64,
        throughput_rps: f64,
        late: u64,
        unsent: u64,
    ) -> Self {
        let requests = all.len();
        Self {
            requests,
            ok: requests - errors,
            errors,
            error_pct: pct(errors, requests),
            throughput_rps,
            late,
            unsent,
            within_kms_budget_pct: within(all, KMS_BUDGET_MS),
        }
    }
}

/// A whole report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// [`FORMAT`].
    pub format: u32,
    /// `run`, `search`, `hsm` or `merged`.
    pub kind: String,
    /// The generator.
    pub tool: Tool,
    /// RFC 3339 UTC start time.
    pub started_at: String,
    /// Start time, Unix milliseconds.
    pub start_unix_ms: u64,
    /// The generator machines (several after `merge`).
    pub machines: Vec<Machine>,
    /// The proxy (absent for `hsm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<TargetInfo>,
    /// The PKCS#11 module and token (`hsm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hsm: Option<serde_json::Value>,
    /// The command's settings.
    pub config: serde_json::Value,
    /// Length of the measured window, seconds.
    pub duration_s: f64,
    /// When the measured window started, Unix milliseconds (`merged`: the earliest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_start_unix_ms: Option<u64>,
    /// `merged`: seconds in which every generator's measured window was running, when
    /// every report says when its window started. Throughputs add only over these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub together_s: Option<f64>,
    /// Totals.
    pub summary: Summary,
    /// Answers by HTTP status (`0`: no answer).
    pub status_counts: BTreeMap<String, u64>,
    /// Errors by errorName (or `transport:*`).
    pub error_counts: BTreeMap<String, u64>,
    /// Per operation, and `overall`.
    pub operations: BTreeMap<String, OpReport>,
    /// Per second.
    pub series: Vec<SecondPoint>,
    /// Correctness checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<Verification>,
    /// The objective.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo: Option<Slo>,
    /// `search` and `hsm` steps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<Step>,
    /// `search`: the highest offered rate that met the SLO.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rate_meeting_slo: Option<f64>,
    /// `--kms`: what KMS would have seen (versioned on its own: `kms.format`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms: Option<crate::kms::View>,
}

/// part / whole in percent (0 for an empty whole).
pub fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

/// Share of `h` at or below `ms`, percent.
pub fn within(h: &Histogram<u64>, ms: f64) -> f64 {
    if h.is_empty() {
        return 100.0;
    }
    let us = (ms * 1000.0) as u64;
    pct(h.count_between(0, us), h.len())
}

impl Report {
    /// A report of `kind` from a measured window.
    pub fn new(
        kind: &str,
        started: time::OffsetDateTime,
        target: Option<TargetInfo>,
        config: serde_json::Value,
        measured: &Measured,
        slo: Option<(f64, f64)>,
    ) -> Self {
        let (all, errors) = measured.overall();
        let mut operations = BTreeMap::new();
        for (name, h, e) in &measured.per_op {
            if !h.is_empty() {
                operations.insert(name.clone(), OpReport::new(h, *e, measured.seconds));
            }
        }
        operations.insert(
            "overall".into(),
            OpReport::new(&all, errors, measured.seconds),
        );
        let requests = all.len();
        let slo = slo.map(|(p99_ms, error_pct)| {
            let p99 = Percentiles::of(&all).p99;
            Slo {
                p99_ms,
                error_pct,
                within_p99_target_pct: within(&all, p99_ms),
                met: requests > 0
                    && measured.unsent == 0
                    && p99 <= p99_ms
                    && pct(errors, requests) <= error_pct,
            }
        });
        Self {
            format: FORMAT,
            kind: kind.into(),
            tool: Tool::default(),
            started_at: started
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            start_unix_ms: u64::try_from(started.unix_timestamp_nanos() / 1_000_000).unwrap_or(0),
            machines: vec![Machine {
                stalls: measured.stalls.clone(),
                schedule: measured.schedule.clone(),
                ..Machine::this()
            }],
            target,
            hsm: None,
            config,
            duration_s: measured.seconds,
            window_start_unix_ms: measured.window_start_unix_ms,
            together_s: None,
            summary: Summary::new(
                &all,
                errors,
                rate(requests, measured.seconds),
                measured.late,
                measured.unsent,
            ),
            status_counts: measured.status_counts.clone(),
            error_counts: measured.error_counts.clone(),
            operations,
            series: measured
                .series
                .iter()
                .map(|(t, offset, h, e)| SecondPoint::new(*t, *offset, h, *e))
                .collect(),
            verification: None,
            slo,
            steps: Vec::new(),
            max_rate_meeting_slo: None,
            kms: None,
        }
    }

    /// Reads a report file.
    pub fn read(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_slice(&text)
            .map_err(|e| format!("{}: not an xks-loadtest report: {e}", path.display()).into())
    }

    /// Writes the report as pretty JSON.
    pub fn write(&self, path: &Path) -> Result<(), Error> {
        let text = serde_json::to_vec_pretty(self)?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()).into())
    }

    /// The overall histogram.
    pub fn overall_histogram(&self) -> Result<Histogram<u64>, Error> {
        match self.operations.get("overall") {
            Some(op) => decode_histogram(&op.histogram),
            None => Ok(new_histogram()),
        }
    }
}
#[cfg(test)]
mod tests {
    use super::fixtures::{compare_row, report, report_with_schedule};
    use super::*;

    #[test]
    fn reports_summarize_and_survive_json() {
        let r = report(&[1_000, 2_000, 3_000, 20_000], 1, 100);
        assert_eq!(r.summary.requests, 4);
        assert_eq!(r.summary.errors, 1);
        assert_eq!(r.operations["overall"].count, 4);
        assert!((r.operations["Encrypt"].latency_ms.p50 - 2.0).abs() < 0.01);
        let slo = r.slo.as_ref().unwrap();
        assert!(!slo.met, "p99 is 20 ms and 25% errors");
        assert!((slo.within_p99_target_pct - 75.0).abs() < 0.01);
        let text = serde_json::to_string(&r).unwrap();
        let back: Report = serde_json::from_str(&text).unwrap();
        assert_eq!(back.summary.requests, 4);
        assert!(r.text().contains("Encrypt"), "{}", r.text());
    }

    #[test]
    fn the_schedule_tells_the_pacer_from_waiting_and_survives_merge() {
        let a = report_with_schedule(3, 1);
        let schedule = a.machines[0].schedule.as_ref().unwrap();
        assert!(
            (schedule.released_late_ms.max - 3.0).abs() < 0.01,
            "{schedule:?}"
        );
        assert!(
            (schedule.sent_late_ms.max - 4.0).abs() < 0.01,
            "{schedule:?}"
        );
        let text = a.text();
        assert!(
            text.contains("3 requests (30.00%) were sent over 2 ms after their due time: 1 already released that late by the pacer"),
            "{text}"
        );
        assert!(text.contains(", 2 waiting for a free connection"), "{text}");
        assert!(text.contains("open-loop schedule"), "{text}");
        let back: Report = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(back.machines[0].schedule, a.machines[0].schedule);

        // Each generator keeps its own schedule, and the late counts add up.
        let b = report_with_schedule(2, 2);
        let row = compare_row(&a, &b, "generator sent late", "max ms");
        assert!(
            row.contains("4.001") && row.contains("3.101") && row.contains("0.775"),
            "{row}"
        );
        assert!(
            !compare(&a, &report(&[1_000], 0, 100), "a", "closed").contains("generator sent late")
        );
        let merged = merge(&[a, b]).unwrap();
        assert_eq!(merged.summary.late, 5);
        assert_eq!(merged.machines.len(), 2);
        let text = merged.text();
        assert!(text.contains("3 already released that late"), "{text}");
        assert_eq!(text.matches("open-loop schedule").count(), 2, "{text}");
    }
}
