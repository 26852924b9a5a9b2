//! Measurement: latency histograms against the budget, counters, and their Prometheus
//! exposition.
//!
//! Latencies go into hdrhistograms sharded by thread: a recording locks only its own
//! thread's shard (uncontended), and a scrape or summary merges the shards. Counters
//! and gauges are prometheus-client's atomics. [`Metrics::encode`] renders everything
//! in the OpenMetrics text format.

use foldhash::HashMap;
use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hdrhistogram::Histogram;
use parking_lot::{Mutex, MutexGuard};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// A stage of a request, timed separately from the total.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// SigV4 verification.
    Auth,
    /// Waiting in the queue for an HSM session.
    QueueWait,
    /// The HSM call itself.
    Hsm,
}

impl Stage {
    fn as_str(self) -> &'static str {
        match self {
            Self::Auth => "auth",
            Self::QueueWait => "queue_wait",
            Self::Hsm => "hsm",
        }
    }
}

/// One request's time in each stage, for its log line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StageTimes {
    /// SigV4 verification.
    pub auth: Duration,
    /// Waiting for an HSM session.
    pub queue_wait: Duration,
    /// In the HSM.
    pub hsm: Duration,
}

tokio::task_local! {
    /// The stage times of the request this task serves.
    pub static REQUEST_STAGES: Cell<StageTimes>;
}

/// Adds `duration` to the current request's `stage` (no-op outside a request).
pub fn note_stage(stage: Stage, duration: Duration) {
    let _ = REQUEST_STAGES.try_with(|cell| {
        let mut times = cell.get();
        match stage {
            Stage::Auth => times.auth += duration,
            Stage::QueueWait => times.queue_wait += duration,
            Stage::Hsm => times.hsm += duration,
        }
        cell.set(times);
    });
}

/// Labels of request counters and latency: the API and its outcome (`ok` or the
/// errorName).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// GetHealthStatus, GetKeyMetadata, Encrypt, Decrypt.
    pub operation: &'static str,
    /// `ok` or the spec errorName.
    pub outcome: &'static str,
}

/// Why a request was shed with 429 ThrottlingException.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShedReason {
    /// The HSM pool's queue was full.
    QueueFull,
    /// The waves of work ahead would not fit the request's time (admission).
    ExpectedWait,
    /// The request's deadline had passed before it reached the pool.
    Deadline,
    /// Its deadline passed, or came too near for a call, while it waited for a session.
    ExpiredInQueue,
    /// Its deadline passed early in its call, after a long wait in the queue.
    ExpiredInCall,
    /// The log writer is congested: the audit lines would have to wait.
    LogBacklog,
    /// The key store's request quota.
    Quota,
}

impl ShedReason {
    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::ExpectedWait => "expected_wait",
            Self::Deadline => "deadline",
            Self::ExpiredInQueue => "expired_in_queue",
            Self::ExpiredInCall => "expired_in_call",
            Self::LogBacklog => "log_backlog",
            Self::Quota => "quota",
        }
    }
}

/// Why a request was shed with 429.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShedLabels {
    /// [`ShedReason::as_str`].
    pub reason: &'static str,
}

/// Why the proxy closed a client connection.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClosedLabels {
    /// `unauthenticated`, `idle`, `header_timeout`, `body_timeout`,
    /// `control_frame_flood`, `per_client_limit`.
    pub reason: &'static str,
}

/// One EKM.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EkmIdLabels {
    /// The EKM's id (as in GetHealthStatus).
    pub ekm: String,
}

/// A kind of log line (`routing`, `authentication`, `body`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// The kind.
    pub kind: &'static str,
}

/// Result of a TLS handshake.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `ok`, `error` or `timeout`.
    pub result: &'static str,
}

/// Health of one EKM: one series per status, 1 for the current one.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EkmLabels {
    /// The EKM's id (token serial).
    pub ekm: String,
    /// ACTIVE, DEGRADED or UNAVAILABLE.
    pub status: &'static str,
}

/// Microseconds from 1 µs to 60 s at two significant digits: ~1 % precision in a few
/// KiB per histogram.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("constant bounds are valid")
}

/// One shard's histograms.
#[derive(Default)]
struct Shard {
    totals: HashMap<(&'static str, &'static str), Histogram<u64>>,
    stages: HashMap<(Stage, &'static str), Histogram<u64>>,
}

/// Shards: more than the threads that record (tokio workers + session threads) would
/// buy nothing; fewer would make them share.
const SHARDS: usize = 16;

/// Latency histograms, sharded by thread.
pub struct Latencies {
    shards: Vec<Mutex<Shard>>,
}

impl fmt::Debug for Latencies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Latencies")
            .field("shards", &self.shards.len())
            .finish()
    }
}

thread_local! {
    static SHARD: Cell<Option<usize>> = const { Cell::new(None) };
}

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

/// Merged histograms at one moment.
#[derive(Default, Clone)]
pub struct Snapshot {
    /// Total latency by (operation, outcome).
    pub totals: HashMap<(&'static str, &'static str), Histogram<u64>>,
    /// Stage latency by (stage, operation).
    pub stages: HashMap<(Stage, &'static str), Histogram<u64>>,
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("totals", &self.totals.len())
            .field("stages", &self.stages.len())
            .finish()
    }
}

impl Snapshot {
    /// All outcomes of one operation merged.
    pub fn operation(&self, operation: &str) -> Option<Histogram<u64>> {
        let mut merged: Option<Histogram<u64>> = None;
        for ((op, _), h) in &self.totals {
            if *op == operation {
                match &mut merged {
                    Some(m) => {
                        let _ = m.add(h);
                    }
                    None => merged = Some(h.clone()),
                }
            }
        }
        merged
    }

    /// What was recorded since `earlier` (histograms only grow).
    pub fn since(&self, earlier: &Self) -> Self {
        let mut delta = self.clone();
        for (key, h) in &mut delta.totals {
            if let Some(old) = earlier.totals.get(key) {
                let _ = h.subtract(old);
            }
        }
        for (key, h) in &mut delta.stages {
            if let Some(old) = earlier.stages.get(key) {
                let _ = h.subtract(old);
            }
        }
        delta
    }
}

impl Latencies {
    fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }

    fn shard(&self) -> MutexGuard<'_, Shard> {
        let index = SHARD.with(|s| match s.get() {
            Some(i) => i,
            None => {
                let i = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
                s.set(Some(i));
                i
            }
        });
        self.shards[index].lock()
    }

    /// Records a request's total latency.
    pub fn record_total(&self, operation: &'static str, outcome: &'static str, latency: Duration) {
        let micros = latency.as_micros().min(u128::from(u64::MAX)) as u64;
        self.shard()
            .totals
            .entry((operation, outcome))
            .or_insert_with(new_histogram)
            .saturating_record(micros.max(1));
    }

    /// Records one stage's latency.
    pub fn record_stage(&self, stage: Stage, operation: &'static str, latency: Duration) {
        let micros = latency.as_micros().min(u128::from(u64::MAX)) as u64;
        self.shard()
            .stages
            .entry((stage, operation))
            .or_insert_with(new_histogram)
            .saturating_record(micros.max(1));
    }

    /// Merges the shards.
    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for shard in &self.shards {
            let shard = shard.lock();
            for (key, h) in &shard.totals {
                let _ = snapshot
                    .totals
                    .entry(*key)
                    .or_insert_with(new_histogram)
                    .add(h);
            }
            for (key, h) in &shard.stages {
                let _ = snapshot
                    .stages
                    .entry(*key)
                    .or_insert_with(new_histogram)
                    .add(h);
            }
        }
        snapshot
    }
}

/// Dates operators alarm on (KMS does: certificate expiry and credential age).
#[derive(Debug, Default, Clone)]
pub struct SecretDates {
    /// When the server certificate expires.
    pub certificate_not_after: Option<SystemTime>,
    /// (key store, access key id, created) of every credential.
    pub credentials: Vec<(String, String, SystemTime)>,
}

/// Renders [`SecretDates`] against the clock at scrape time.
#[derive(Debug)]
struct SecretCollector(Arc<Mutex<SecretDates>>);

impl Collector for SecretCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let dates = self.0.lock().clone();
        let now = SystemTime::now();
        let signed_days = |from: SystemTime, to: SystemTime| match to.duration_since(from) {
            Ok(d) => d.as_secs_f64() / 86_400.0,
            Err(e) => -e.duration().as_secs_f64() / 86_400.0,
        };
        if let Some(not_after) = dates.certificate_not_after {
            let gauge = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
            gauge.set(signed_days(now, not_after));
            let metric = encoder.encode_descriptor(
                "xks_tls_certificate_days_to_expiry",
                "Days until the server certificate expires (negative: expired)",
                None,
                MetricType::Gauge,
            )?;
            gauge.encode(metric)?;
        }
        let mut family = encoder.encode_descriptor(
            "xks_credential_age_days",
            "Age of each SigV4 credential in days (rotate old ones)",
            None,
            MetricType::Gauge,
        )?;
        for (key_store, access_key_id, created) in &dates.credentials {
            let gauge = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
            gauge.set(signed_days(*created, now));
            let labels = [
                ("key_store", key_store.as_str()),
                ("access_key_id", access_key_id.as_str()),
            ];
            gauge.encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Everything the proxy measures.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests answered, by operation and outcome.
    pub requests: Family<RequestLabels, Counter>,
    /// Requests being served.
    pub in_flight: Gauge,
    /// Requests shed with 429, by reason.
    pub sheds: Family<ShedLabels, Counter>,
    /// Open client connections.
    pub connections_open: Gauge,
    /// TLS handshakes by result.
    pub tls_handshakes: Family<HandshakeLabels, Counter>,
    /// Client connections the proxy closed, by reason.
    pub connections_closed: Family<ClosedLabels, Counter>,
    /// Log lines of unauthenticated rejects left out by the rate limit, by kind.
    pub log_suppressed: Family<KindLabels, Counter>,
    /// EKM health.
    pub ekm_health: Family<EkmLabels, Gauge>,
    /// 1 while an EKM's logins are suspended because its token refused the PIN.
    pub ekm_login_suspended: Family<EkmIdLabels, Gauge>,
    /// HSM sessions (threads) in the pool.
    pub pool_sessions: Gauge,
    /// Session threads of an EKM held by a call past its timeout that has not returned.
    pub sessions_stuck: Family<EkmIdLabels, Gauge>,
    /// Sessions busy with a call.
    pub pool_busy: Gauge,
    /// Requests waiting for a session.
    pub queue_depth: Gauge,
    /// Latency histograms.
    pub latencies: Arc<Latencies>,
    /// Certificate expiry and credential ages, updated at every (re)load.
    pub secrets: Arc<Mutex<SecretDates>>,
    /// Configuration reloads by result.
    pub reloads: Family<ReloadLabels, Counter>,
    /// 1 while the running configuration is the one on disk: set at start-up, cleared
    /// by a failed reload, set again by a successful one. An alert on the counter alone
    /// would keep firing after the fix, or miss a failure that a later success hid.
    pub reload_ok: Gauge,
}

/// Result of a configuration reload.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// Lines other than audit lines the log writer dropped for want of room
/// ([`crate::logging::dropped`]).
#[derive(Debug)]
struct DroppedLines;

impl Collector for DroppedLines {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let counter = Counter::<u64>::default();
        counter.inc_by(crate::logging::dropped());
        let metric = encoder.encode_descriptor(
            "xks_log_lines_dropped",
            "Log lines other than audit lines dropped because the log buffer was full",
            None,
            MetricType::Counter,
        )?;
        counter.encode(metric)
    }
}

/// Renders the hdrhistograms as Prometheus histograms, plus the budget share.
#[derive(Debug)]
struct LatencyCollector {
    latencies: Arc<Latencies>,
    deadline: Duration,
}

/// Histogram bucket bounds in seconds: sub-millisecond to the KMS timeout and beyond.
const BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0,
];

fn encode_histogram(
    encoder: &mut prometheus_client::encoding::MetricEncoder<'_>,
    h: &Histogram<u64>,
) -> Result<(), fmt::Error> {
    let sum: f64 = h
        .iter_recorded()
        .map(|v| v.value_iterated_to() as f64 * v.count_at_value() as f64)
        .sum::<f64>()
        / 1e6;
    // prometheus-client takes the count of each bucket alone and accumulates them.
    let mut below = 0;
    let mut buckets: Vec<(f64, u64)> = BUCKETS
        .iter()
        .map(|&le| {
            let cumulative = h.count_between(0, (le * 1e6) as u64);
            let own = cumulative - below;
            below = cumulative;
            (le, own)
        })
        .collect();
    buckets.push((f64::INFINITY, h.len() - below));
    encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
        sum,
        h.len(),
        &buckets,
        None,
    )
}

impl Collector for LatencyCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let snapshot = self.latencies.snapshot();
        let mut totals: Vec<_> = snapshot.totals.iter().collect();
        totals.sort_by_key(|(k, _)| **k);
        let mut family = encoder.encode_descriptor(
            "xks_request_duration_seconds",
            "Time from request received to response ready, by operation and outcome",
            None,
            MetricType::Histogram,
        )?;
        for ((operation, outcome), h) in &totals {
            let labels = RequestLabels { operation, outcome };
            encode_histogram(&mut family.encode_family(&labels)?, h)?;
        }

        let mut stages: Vec<_> = snapshot.stages.iter().collect();
        stages.sort_by_key(|((s, o), _)| (s.as_str(), *o));
        let mut family = encoder.encode_descriptor(
            "xks_stage_duration_seconds",
            "Time spent in one stage: auth (SigV4), queue_wait (for an HSM session), hsm (the HSM call)",
            None,
            MetricType::Histogram,
        )?;
        for ((stage, operation), h) in &stages {
            let labels = [("stage", stage.as_str()), ("operation", *operation)];
            encode_histogram(&mut family.encode_family(&labels)?, h)?;
        }

        let deadline_us = self.deadline.as_micros() as u64;
        let mut operations: Vec<&str> = totals.iter().map(|((op, _), _)| *op).collect();
        operations.dedup();
        let mut family = encoder.encode_descriptor(
            "xks_budget_share",
            "Share of requests answered within the server-side deadline",
            None,
            MetricType::Gauge,
        )?;
        for operation in operations {
            if let Some(h) = snapshot.operation(operation) {
                let share = h.count_between(0, deadline_us) as f64 / h.len().max(1) as f64;
                let gauge = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
                gauge.set(share);
                gauge.encode(family.encode_family(&[("operation", operation)])?)?;
            }
        }
        Ok(())
    }
}

impl Metrics {
    /// A registry with every metric; `deadline` is the budget the share is measured on.
    pub fn new(deadline: Duration) -> Arc<Self> {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "xks_requests",
            "XKS API requests answered",
            requests.clone(),
        );
        let in_flight = Gauge::default();
        registry.register("xks_in_flight", "Requests being served", in_flight.clone());
        let sheds = Family::<ShedLabels, Counter>::default();
        registry.register(
            "xks_shed",
            "Requests answered 429 ThrottlingException, by reason",
            sheds.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "xks_connections_open",
            "Open client connections",
            connections_open.clone(),
        );
        let tls_handshakes = Family::<HandshakeLabels, Counter>::default();
        registry.register(
            "xks_tls_handshakes",
            "TLS handshakes by result",
            tls_handshakes.clone(),
        );
        let connections_closed = Family::<ClosedLabels, Counter>::default();
        registry.register(
            "xks_connections_closed",
            "Client connections the proxy closed: unauthenticated, idle, header_timeout, \
             body_timeout, control_frame_flood, per_client_limit",
            connections_closed.clone(),
        );
        let log_suppressed = Family::<KindLabels, Counter>::default();
        registry.register(
            "xks_log_lines_suppressed",
            "Log lines of unauthenticated rejects left out by the rate limit, by kind",
            log_suppressed.clone(),
        );
        registry.register_collector(Box::new(DroppedLines));
        let ekm_health = Family::<EkmLabels, Gauge>::default();
        registry.register(
            "xks_ekm_health",
            "1 for the EKM's current health status",
            ekm_health.clone(),
        );
        let ekm_login_suspended = Family::<EkmIdLabels, Gauge>::default();
        registry.register(
            "xks_ekm_login_suspended",
            "1 while the EKM's logins are suspended: its token refused the PIN (fix it and reload)",
            ekm_login_suspended.clone(),
        );
        let pool_sessions = Gauge::default();
        registry.register(
            "xks_hsm_sessions",
            "HSM sessions in the pool",
            pool_sessions.clone(),
        );
        let sessions_stuck = Family::<EkmIdLabels, Gauge>::default();
        registry.register(
            "xks_hsm_sessions_stuck",
            "HSM session threads held by a call that ran past its timeout and has not returned",
            sessions_stuck.clone(),
        );
        let pool_busy = Gauge::default();
        registry.register(
            "xks_hsm_sessions_busy",
            "HSM sessions busy with a call",
            pool_busy.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "xks_hsm_queue_depth",
            "Requests waiting for an HSM session",
            queue_depth.clone(),
        );
        let latencies = Arc::new(Latencies::new());
        registry.register_collector(Box::new(LatencyCollector {
            latencies: Arc::clone(&latencies),
            deadline,
        }));
        let secrets = Arc::new(Mutex::new(SecretDates::default()));
        registry.register_collector(Box::new(SecretCollector(Arc::clone(&secrets))));
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "xks_config_reloads",
            "Configuration reloads (SIGHUP or changed files) by result",
            reloads.clone(),
        );
        let reload_ok = Gauge::default();
        reload_ok.set(1);
        registry.register(
            "xks_config_last_reload_successful",
            "1 unless the last configuration reload failed (the running configuration then stays)",
            reload_ok.clone(),
        );
        Arc::new(Self {
            registry,
            secrets,
            reloads,
            reload_ok,
            requests,
            in_flight,
            sheds,
            connections_open,
            tls_handshakes,
            connections_closed,
            log_suppressed,
            ekm_health,
            ekm_login_suspended,
            pool_sessions,
            sessions_stuck,
            pool_busy,
            queue_depth,
            latencies,
        })
    }

    /// Counts a shed request.
    pub fn shed(&self, reason: ShedReason) {
        self.sheds
            .get_or_create(&ShedLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Counts a client connection the proxy closed.
    pub fn connection_closed(&self, reason: &'static str) {
        self.connections_closed
            .get_or_create(&ClosedLabels { reason })
            .inc();
    }

    /// Counts a log line the rate limit left out.
    pub fn log_suppressed(&self, kind: &'static str) {
        self.log_suppressed
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// One INFO line per operation with traffic since `earlier`: count, p50, p99, p99.9 and
/// the share answered within `deadline`.
pub fn summary_lines(now: &Snapshot, earlier: &Snapshot, deadline: Duration) -> Vec<String> {
    let delta = now.since(earlier);
    let mut operations: Vec<&str> = delta.totals.keys().map(|(op, _)| *op).collect();
    operations.sort_unstable();
    operations.dedup();
    let deadline_us = deadline.as_micros() as u64;
    operations
        .into_iter()
        .filter_map(|op| {
            let h = delta.operation(op)?;
            (!h.is_empty()).then(|| {
                let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
                format!(
                    "{op}: {} requests, p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, {:.3}% within the {} ms deadline",
                    h.len(),
                    ms(0.5),
                    ms(0.99),
                    ms(0.999),
                    100.0 * h.count_between(0, deadline_us) as f64 / h.len() as f64,
                    deadline.as_millis()
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_merge_on_read() {
        let metrics = Metrics::new(Duration::from_millis(100));
        let latencies = Arc::clone(&metrics.latencies);
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let l = Arc::clone(&latencies);
                std::thread::spawn(move || {
                    for j in 0..1000u64 {
                        l.record_total("Encrypt", "ok", Duration::from_micros(100 + i * 1000 + j));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let snapshot = latencies.snapshot();
        assert_eq!(snapshot.operation("Encrypt").unwrap().len(), 4000);
        assert!(snapshot.operation("Decrypt").is_none());
    }

    #[test]
    fn exposition_parses_and_counts_match() {
        let metrics = Metrics::new(Duration::from_millis(100));
        for _ in 0..3 {
            metrics
                .requests
                .get_or_create(&RequestLabels {
                    operation: "Encrypt",
                    outcome: "ok",
                })
                .inc();
            metrics
                .latencies
                .record_total("Encrypt", "ok", Duration::from_micros(400));
        }
        metrics.latencies.record_total(
            "Encrypt",
            "ThrottlingException",
            Duration::from_millis(150),
        );
        metrics
            .latencies
            .record_stage(Stage::Hsm, "Encrypt", Duration::from_micros(50));
        metrics.shed(ShedReason::QueueFull);
        let text = metrics.encode();
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
        let value = |name: &str| {
            let sample = scrape
                .samples
                .iter()
                .find(|s| s.metric == name)
                .unwrap_or_else(|| panic!("{name} missing from\n{text}"));
            match sample.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                ref other => panic!("{name}: {other:?}"),
            }
        };
        assert_eq!(value("xks_requests_total"), 3.0);
        assert_eq!(value("xks_shed_total"), 1.0);
        // A process starts on a configuration that loaded.
        assert_eq!(value("xks_config_last_reload_successful"), 1.0);
        assert!((value("xks_budget_share") - 0.75).abs() < 1e-9);
        for (le, count) in [("0.00025", 0), ("0.0005", 3), ("1.0", 3), ("+Inf", 3)] {
            let line = format!(
                "xks_request_duration_seconds_bucket{{le=\"{le}\",operation=\"Encrypt\",outcome=\"ok\"}} {count}"
            );
            assert!(text.contains(&line), "{line} not in\n{text}");
        }
        assert!(text.contains("stage=\"hsm\""));
    }

    #[test]
    fn summary_reports_only_the_interval() {
        let metrics = Metrics::new(Duration::from_millis(100));
        metrics
            .latencies
            .record_total("Decrypt", "ok", Duration::from_millis(1));
        let first = metrics.latencies.snapshot();
        for _ in 0..10 {
            metrics
                .latencies
                .record_total("Decrypt", "ok", Duration::from_millis(2));
        }
        metrics
            .latencies
            .record_total("Decrypt", "ok", Duration::from_millis(300));
        let lines = summary_lines(
            &metrics.latencies.snapshot(),
            &first,
            Duration::from_millis(100),
        );
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].starts_with("Decrypt: 11 requests, p50 2.0"),
            "{}",
            lines[0]
        );
        assert!(
            lines[0].contains("90.909% within the 100 ms deadline"),
            "{}",
            lines[0]
        );
    }
}
