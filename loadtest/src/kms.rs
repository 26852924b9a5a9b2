//! The `--kms` client profile: the load as AWS KMS sends it, and what KMS would have
//! seen of it.
//!
//! KMS waits 250 ms for an answer and retries once after a timeout or a retryable
//! error (spec: "KMS Considerations"; the split is the one `docs/runbook.md`, "How KMS
//! sees errors", and the alert rules under `deploy/monitoring` use): HTTP 429
//! `ThrottlingException`, 500 `InternalException`, 503 `DependencyTimeoutException`,
//! and no answer at all (timeout, refused or broken connection). Everything else
//! (400, 401, 403, 404, 501) fails the call at once.
//!
//! A **logical call** is one KMS request: a first attempt and, when that one timed out
//! or failed retryably, a second. Its latency counts from the first attempt's intended
//! start (the open loop's due time), so the retry adds to it and the generator's own
//! lateness is not hidden (no coordinated omission). Every attempt is still recorded
//! as a request in the raw latency the report has always carried.
//!
//! AWS's recommended alarms (the external key store's CloudWatch metrics) are
//! evaluated per minute of the run: `XksProxyLatency` averaging over 200 ms, and more
//! than 5 retryable errors (`XksProxyErrors`, retryable, which includes KMS's own
//! timeouts). A timed-out attempt counts at 250 ms in the average: that is all KMS
//! saw of it.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::client::ClientError;
use crate::histogram::{decode_histogram, encode_histogram, new_histogram, Percentiles};
use crate::report::{pct, within, Report, Step};
use crate::workload::Mix;
use crate::Error;

/// KMS's wait for an answer.
pub const TIMEOUT: Duration = Duration::from_millis(250);
/// AWS's alarm on the average `XksProxyLatency` in a minute, ms.
pub const LATENCY_ALARM_MS: f64 = 200.0;
/// AWS's alarm on retryable errors in a minute: more than this many.
pub const RETRYABLE_ALARM: u64 = 5;
/// KMS's default request quota per external key store, requests per second.
pub const QUOTA_PER_KEY_STORE: f64 = 1800.0;
/// Version of the report's `kms` section (beside the report's own `format`).
pub const FORMAT: u32 = 1;
/// The operation mix of the profile: data keys made and opened in about equal numbers,
/// GetKeyMetadata rare (KMS calls it on CreateKey and DescribeKey paths, not per
/// cryptographic request); GetHealthStatus goes beside the load, at KMS's polling rate.
pub const MIX: Mix = Mix {
    weights: [50, 49, 1, 0],
};
/// The profile's AAD size: KMS binds the encryption context and its own metadata into
/// the AAD it sends, which typically comes to several hundred bytes up to a few KiB.
pub const AAD_BYTES: usize = 1024;

/// Flags of the profile, shared by `run`, `search` and `plan`.
#[derive(Debug, Clone, clap::Args)]
pub struct KmsArgs {
    /// Send as AWS KMS does: 250 ms timeout and one retry, a share of new connections,
    /// KMS's operation mix and AAD size (unless --mix/--aad-bytes are given), health
    /// checks beside the load; and report what KMS would have seen.
    #[arg(long)]
    pub kms: bool,
    /// With --kms: percent of logical calls that open a new TCP+TLS connection (its
    /// handshake inside the 250 ms).
    #[arg(long, value_name = "PCT", default_value_t = 10.0)]
    pub kms_new_connections: f64,
    /// With --kms: seconds between GetHealthStatus calls beside the load (KMS polls
    /// every few minutes from each of its hosts; 0: none).
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    pub kms_health_interval: f64,
}

impl KmsArgs {
    /// The profile, when `--kms` is given.
    pub fn profile(&self) -> Result<Option<Profile>, Error> {
        if !self.kms {
            return Ok(None);
        }
        if !(0.0..=100.0).contains(&self.kms_new_connections) {
            return Err("--kms-new-connections must be a percentage, 0 to 100".into());
        }
        let health_interval = Duration::try_from_secs_f64(self.kms_health_interval)
            .map_err(|_| "--kms-health-interval must be a number of seconds ≥ 0")?;
        Ok(Some(Profile {
            timeout: TIMEOUT,
            new_connections_pct: self.kms_new_connections,
            health_interval: (!health_interval.is_zero()).then_some(health_interval),
        }))
    }
}

/// The profile's settings for one window.
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    /// KMS's wait per attempt.
    #[serde(serialize_with = "millis", rename = "timeout_ms")]
    pub timeout: Duration,
    /// Percent of logical calls on a new connection.
    pub new_connections_pct: f64,
    /// Time between health checks beside the load.
    #[serde(serialize_with = "opt_secs", rename = "health_interval_s")]
    pub health_interval: Option<Duration>,
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

fn opt_secs<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

/// What an attempt got, as KMS classifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// HTTP 200.
    Ok,
    /// Timeout, no connection, or 429/500/503: KMS retries (once).
    Retryable,
    /// Any other error: the call fails.
    Fatal,
}

impl Attempt {
    /// Classifies an answer (HTTP status, or the transport error).
    pub fn of(answer: &Result<u16, &ClientError>) -> Self {
        match answer {
            Ok(200) => Self::Ok,
            // ThrottlingException, InternalException, DependencyTimeoutException; a
            // proxy other than ours may name them differently, the status is the same.
            Ok(429 | 500 | 503) => Self::Retryable,
            Ok(_) => Self::Fatal,
            Err(_) => Self::Retryable,
        }
    }
}

/// How a logical call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered within 250 ms on the first attempt.
    FirstTry,
    /// The first attempt timed out or failed retryably; the retry succeeded.
    AfterRetry,
    /// KMS returns an error to its caller.
    Failed,
}

/// One minute of the run, as KMS's CloudWatch metrics would count it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Minute {
    /// Minutes since the measured window began.
    pub minute: u64,
    /// Attempts (requests KMS sent), retries included.
    pub attempts: u64,
    /// Sum of the attempts' latencies as KMS saw them (a timeout counts 250), ms.
    pub latency_sum_ms: f64,
    /// Attempts that timed out or failed retryably.
    pub retryable_errors: u64,
    /// Logical calls that ended in this minute.
    pub calls: u64,
    /// Of those, failed after KMS's retry.
    pub failed: u64,
}

impl Minute {
    /// Average attempt latency, ms (`XksProxyLatency`'s average).
    pub fn average_ms(&self) -> f64 {
        if self.attempts == 0 {
            0.0
        } else {
            self.latency_sum_ms / self.attempts as f64
        }
    }
}

/// Whether AWS's recommended alarms would have fired, and in which minutes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Alarms {
    /// Some minute's average latency was above 200 ms.
    pub latency_fired: bool,
    /// Some minute had more than 5 retryable errors.
    pub retryable_errors_fired: bool,
    /// The minutes (since the window began) whose average latency was above 200 ms.
    pub latency_minutes: Vec<u64>,
    /// The minutes with more than 5 retryable errors.
    pub retryable_error_minutes: Vec<u64>,
}

/// AWS's alarms over `minutes`.
pub fn alarms(minutes: &[Minute]) -> Alarms {
    let latency_minutes: Vec<u64> = minutes
        .iter()
        .filter(|m| m.average_ms() > LATENCY_ALARM_MS)
        .map(|m| m.minute)
        .collect();
    let retryable_error_minutes: Vec<u64> = minutes
        .iter()
        .filter(|m| m.retryable_errors > RETRYABLE_ALARM)
        .map(|m| m.minute)
        .collect();
    Alarms {
        latency_fired: !latency_minutes.is_empty(),
        retryable_errors_fired: !retryable_error_minutes.is_empty(),
        latency_minutes,
        retryable_error_minutes,
    }
}

/// One task's (or a window's) record of KMS's view.
#[derive(Debug, Clone)]
pub struct Recorder {
    /// Latency of logical calls from their intended start (µs).
    latency: Histogram<u64>,
    first_try: u64,
    after_retry: u64,
    failed: u64,
    retries: u64,
    health_checks: u64,
    minutes: BTreeMap<u64, Minute>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self {
            latency: new_histogram(),
            first_try: 0,
            after_retry: 0,
            failed: 0,
            retries: 0,
            health_checks: 0,
            minutes: BTreeMap::new(),
        }
    }
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

impl Recorder {
    fn minute(&mut self, offset_s: u64) -> &mut Minute {
        let minute = offset_s / 60;
        self.minutes.entry(minute).or_insert(Minute {
            minute,
            ..Minute::default()
        })
    }

    /// An attempt that took `latency` (KMS's view: at most its timeout) and ended
    /// `offset_s` seconds into the window.
    pub fn attempt(&mut self, offset_s: u64, latency: Duration, kind: Attempt) {
        let seen = latency.min(TIMEOUT);
        let m = self.minute(offset_s);
        m.attempts += 1;
        m.latency_sum_ms += seen.as_secs_f64() * 1000.0;
        if kind == Attempt::Retryable {
            m.retryable_errors += 1;
        }
    }

    /// A logical call that took `latency` from its intended start, after `attempts`
    /// attempts, and ended `offset_s` seconds into the window; `health` for the checks
    /// sent beside the load.
    pub fn call(&mut self, offset_s: u64, latency: Duration, outcome: Outcome, health: bool) {
        self.latency.saturating_record(us(latency));
        match outcome {
            Outcome::FirstTry => self.first_try += 1,
            Outcome::AfterRetry => self.after_retry += 1,
            Outcome::Failed => self.failed += 1,
        }
        if health {
            self.health_checks += 1;
        }
        let m = self.minute(offset_s);
        m.calls += 1;
        if outcome == Outcome::Failed {
            m.failed += 1;
        }
    }

    /// A retry was sent.
    pub fn retried(&mut self) {
        self.retries += 1;
    }

    /// Retries sent (the raw request count less these is the logical call count).
    pub fn retries(&self) -> u64 {
        self.retries
    }

    /// Health checks sent beside the load.
    pub fn health_check_count(&self) -> u64 {
        self.health_checks
    }

    /// Adds another's records.
    pub fn add(&mut self, other: &Self) -> Result<(), Error> {
        self.latency.add(&other.latency)?;
        self.first_try += other.first_try;
        self.after_retry += other.after_retry;
        self.failed += other.failed;
        self.retries += other.retries;
        self.health_checks += other.health_checks;
        for (minute, m) in &other.minutes {
            let mine = self.minute(minute * 60);
            mine.attempts += m.attempts;
            mine.latency_sum_ms += m.latency_sum_ms;
            mine.retryable_errors += m.retryable_errors;
            mine.calls += m.calls;
            mine.failed += m.failed;
        }
        Ok(())
    }

    /// The report's section.
    pub fn view(&self, profile: &Profile) -> View {
        View::new(
            profile,
            &self.latency,
            [self.first_try, self.after_retry, self.failed],
            self.retries,
            self.health_checks,
            self.minutes.values().copied().collect(),
        )
    }
}

/// What KMS would have seen: the report's `kms` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct View {
    /// [`FORMAT`].
    pub format: u32,
    /// KMS's wait per attempt, ms.
    pub timeout_ms: u64,
    /// Percent of logical calls sent on a new connection.
    pub new_connections_pct: f64,
    /// Seconds between the health checks beside the load (absent: none).
    #[serde(default)]
    pub health_interval_s: Option<f64>,
    /// Logical calls (KMS requests) measured.
    pub calls: u64,
    /// Answered within 250 ms on the first attempt.
    pub first_try: u64,
    /// Answered by the retry.
    pub after_retry: u64,
    /// Failed after KMS's retry, or failed with a non-retryable error: what KMS turns
    /// into errors for its callers.
    pub failed: u64,
    /// first_try / calls, percent.
    pub first_try_pct: f64,
    /// after_retry / calls, percent.
    pub after_retry_pct: f64,
    /// failed / calls, percent.
    pub failed_pct: f64,
    /// Retries sent.
    pub retries: u64,
    /// Health checks among the calls.
    pub health_checks: u64,
    /// KMS-perceived latency of logical calls (retry included), ms.
    pub latency_ms: Percentiles,
    /// Its histogram (µs), V2 deflate, Base64.
    pub histogram: String,
    /// Per minute of the window.
    pub minutes: Vec<Minute>,
    /// AWS's recommended alarms over those minutes.
    pub alarms: Alarms,
}

impl View {
    /// From a window's counts.
    pub fn new(
        profile: &Profile,
        latency: &Histogram<u64>,
        [first_try, after_retry, failed]: [u64; 3],
        retries: u64,
        health_checks: u64,
        minutes: Vec<Minute>,
    ) -> Self {
        let calls = first_try + after_retry + failed;
        Self {
            format: FORMAT,
            timeout_ms: profile.timeout.as_millis() as u64,
            new_connections_pct: profile.new_connections_pct,
            health_interval_s: profile.health_interval.map(|d| d.as_secs_f64()),
            calls,
            first_try,
            after_retry,
            failed,
            first_try_pct: pct(first_try, calls),
            after_retry_pct: pct(after_retry, calls),
            failed_pct: pct(failed, calls),
            retries,
            health_checks,
            latency_ms: Percentiles::of(latency),
            histogram: encode_histogram(latency),
            alarms: alarms(&minutes),
            minutes,
        }
    }

    /// The KMS-perceived latency histogram (µs).
    pub fn latency_histogram(&self) -> Result<Histogram<u64>, Error> {
        decode_histogram(&self.histogram)
    }

    /// The view of several generators' windows added (`merge`).
    pub fn merge(views: &[&Self]) -> Result<Option<Self>, Error> {
        let Some(first) = views.first() else {
            return Ok(None);
        };
        let mut latency = new_histogram();
        let mut counts = [0u64; 3];
        let (mut retries, mut health) = (0, 0);
        let mut minutes: BTreeMap<u64, Minute> = BTreeMap::new();
        for v in views {
            latency.add(v.latency_histogram()?)?;
            counts[0] += v.first_try;
            counts[1] += v.after_retry;
            counts[2] += v.failed;
            retries += v.retries;
            health += v.health_checks;
            for m in &v.minutes {
                let e = minutes.entry(m.minute).or_insert(Minute {
                    minute: m.minute,
                    ..Minute::default()
                });
                e.attempts += m.attempts;
                e.latency_sum_ms += m.latency_sum_ms;
                e.retryable_errors += m.retryable_errors;
                e.calls += m.calls;
                e.failed += m.failed;
            }
        }
        let profile = Profile {
            timeout: Duration::from_millis(first.timeout_ms),
            new_connections_pct: first.new_connections_pct,
            health_interval: first.health_interval_s.map(Duration::from_secs_f64),
        };
        Ok(Some(Self::new(
            &profile,
            &latency,
            counts,
            retries,
            health,
            minutes.into_values().collect(),
        )))
    }

    /// Whether the view meets an objective in KMS's terms: p99 of KMS-perceived latency
    /// at most `p99_ms` and at most `failed_pct` percent of calls failing.
    pub fn meets(&self, p99_ms: f64, failed_pct: f64) -> bool {
        self.calls > 0 && self.latency_ms.p99 <= p99_ms && self.failed_pct <= failed_pct
    }

    /// The view's lines in a report's text.
    pub fn text(&self) -> String {
        let l = &self.latency_ms;
        let mut out = format!(
            "what KMS would have seen ({} ms timeout, one retry, {:.0}% new connections): {} calls: {:.3}% on the first try, {:.3}% after the retry, {:.3}% failed ({} retries, {} health checks)\n\
             KMS-perceived latency (retry included) ms: p50 {:.3}, p90 {:.3}, p99 {:.3}, p99.9 {:.3}, max {:.3}\n",
            self.timeout_ms,
            self.new_connections_pct,
            self.calls,
            self.first_try_pct,
            self.after_retry_pct,
            self.failed_pct,
            self.retries,
            self.health_checks,
            l.p50,
            l.p90,
            l.p99,
            l.p99_9,
            l.max,
        );
        let worst_avg = self
            .minutes
            .iter()
            .map(Minute::average_ms)
            .fold(0.0, f64::max);
        let worst_errors = self
            .minutes
            .iter()
            .map(|m| m.retryable_errors)
            .max()
            .unwrap_or(0);
        let fired = |f: bool| if f { "WOULD FIRE" } else { "quiet" };
        out.push_str(&format!(
            "AWS alarms per minute: average latency > {LATENCY_ALARM_MS:.0} ms: {} (worst minute {worst_avg:.1} ms); > {RETRYABLE_ALARM} retryable errors: {} (worst minute {worst_errors})\n",
            fired(self.alarms.latency_fired),
            fired(self.alarms.retryable_errors_fired),
        ));
        out
    }
}

/// With `--kms`, puts KMS's view in the report and judges the objective on it: p99 of
/// KMS-perceived latency, and calls failing after KMS's retry.
pub fn judge(report: &mut Report, view: Option<View>) {
    if let (Some(v), Some(slo)) = (&view, &mut report.slo) {
        slo.met = report.summary.unsent == 0 && v.meets(slo.p99_ms, slo.error_pct);
        slo.within_p99_target_pct = v
            .latency_histogram()
            .map_or(0.0, |h| within(&h, slo.p99_ms));
    }
    report.kms = view;
}

/// Whether a `search` step met the objective `(p99 ms, error %)`: in KMS's terms when
/// the step has KMS's view, else on the raw requests.
pub fn step_met(step: &Step, (p99_ms, error_pct): (f64, f64)) -> bool {
    step.requests > 0
        && step.unsent == 0
        && match &step.kms {
            Some(k) => k.meets(p99_ms, error_pct),
            None => step.latency_ms.p99 <= p99_ms && step.error_pct <= error_pct,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minute(minute: u64, attempts: u64, avg_ms: f64, retryable: u64) -> Minute {
        Minute {
            minute,
            attempts,
            latency_sum_ms: avg_ms * attempts as f64,
            retryable_errors: retryable,
            calls: attempts,
            failed: 0,
        }
    }

    #[test]
    fn alarms_fire_on_the_minutes_that_cross_aws_thresholds() {
        let quiet = [minute(0, 1000, 12.0, 5), minute(1, 1000, 200.0, 0)];
        assert_eq!(
            alarms(&quiet),
            Alarms::default(),
            "200 ms and 5 errors are allowed"
        );
        let loud = [
            minute(0, 1000, 12.0, 0),
            minute(1, 1000, 200.5, 2),
            minute(2, 1000, 30.0, 6),
            minute(3, 0, 0.0, 0),
        ];
        let a = alarms(&loud);
        assert!(a.latency_fired && a.retryable_errors_fired);
        assert_eq!(a.latency_minutes, vec![1]);
        assert_eq!(a.retryable_error_minutes, vec![2]);
    }

    #[test]
    fn attempts_and_calls_make_the_view() {
        let profile = Profile {
            timeout: TIMEOUT,
            new_connections_pct: 10.0,
            health_interval: None,
        };
        let mut r = Recorder::default();
        let ms = Duration::from_millis;
        // Minute 0: a fast call, and one whose first attempt timed out.
        r.attempt(1, ms(10), Attempt::Ok);
        r.call(1, ms(10), Outcome::FirstTry, false);
        r.attempt(2, ms(900), Attempt::Retryable);
        r.retried();
        r.attempt(2, ms(20), Attempt::Ok);
        r.call(2, ms(270), Outcome::AfterRetry, false);
        // Minute 1: a failed call, non-retryable.
        r.attempt(61, ms(5), Attempt::Fatal);
        r.call(61, ms(5), Outcome::Failed, true);
        let mut total = Recorder::default();
        total.add(&r).unwrap();
        let v = total.view(&profile);
        assert_eq!(
            (v.calls, v.first_try, v.after_retry, v.failed),
            (3, 1, 1, 1)
        );
        assert_eq!((v.retries, v.health_checks), (1, 1));
        assert_eq!(v.minutes.len(), 2);
        // The timed-out attempt counts 250 ms, as KMS saw it.
        assert!((v.minutes[0].average_ms() - (10.0 + 250.0 + 20.0) / 3.0).abs() < 1e-6);
        assert_eq!(v.minutes[0].retryable_errors, 1);
        assert!(!v.alarms.latency_fired);
        assert!(v.latency_ms.max >= 269.0);
        assert!(!v.meets(200.0, 0.1));
        assert!(v.text().contains("33.333% after the retry"), "{}", v.text());
        let merged = View::merge(&[&v, &v]).unwrap().unwrap();
        assert_eq!(merged.calls, 6);
        assert_eq!(merged.minutes[0].attempts, 6);
        let back: View = serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn statuses_are_classified_as_kms_does() {
        assert_eq!(Attempt::of(&Ok(200)), Attempt::Ok);
        for s in [429, 500, 503] {
            assert_eq!(Attempt::of(&Ok(s)), Attempt::Retryable, "{s}");
        }
        for s in [400, 401, 403, 404, 501] {
            assert_eq!(Attempt::of(&Ok(s)), Attempt::Fatal, "{s}");
        }
        assert_eq!(Attempt::of(&Err(&ClientError::Timeout)), Attempt::Retryable);
    }
}
