//! The load loop: many tasks, each with its own connection (or HTTP/2 stream), sending
//! signed requests open-loop (at a fixed arrival rate) or closed-loop (as fast as the
//! answers come), and recording latencies into task-local histograms.
//!
//! - **Open loop** (`--rate`): request *i* is due at `t0 + i/rate`. A pacer thread
//!   releases each request at its due time as a ticket; a free task takes the next
//!   ticket and sends. Latency is measured from the due time, not from when it was
//!   actually sent, so time spent waiting for a free connection counts (coordinated
//!   omission corrected, as wrk2 does). A ticket taken more than [`LATE_AFTER`] after
//!   it was due is counted as late. Each ticket carries when the pacer released it,
//!   so the report's [`Schedule`](crate::report::Schedule) tells the generator's own
//!   lateness (the pacer thread woke late: the machine) from waiting for a free
//!   connection.
//!   The pacer is a thread, not a tokio timer, that spins the last microseconds
//!   before each due time (`pacer.rs` says why).
//! - **Closed loop**: each task sends as soon as its previous answer arrived.
//!
//! Nothing is shared per request but that counter: each task owns its histograms and
//! counts, sends each finished second's histogram to a collector (for the per-second
//! series and the live progress), and hands its totals back at the end.
//!
//! Preparing what the windows share (connector, bodies, the Decrypt pool) is in
//! `prepare.rs`; the open loop's pacer in `pacer.rs`; the per-second collector and live
//! progress in `progress.rs`; a task's records and their totals in `recorder.rs`; a
//! task's loop and the checks of its answers in `task.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::client::{ClientError, Sender};
use crate::report::{Measured, Verification};
use crate::stalls::{Meter, DEFAULT_INTERVAL};
use crate::workload::Mix;
use crate::Error;

mod pacer;
mod prepare;
mod progress;
mod recorder;
mod task;

pub use pacer::wait_until;
use pacer::{pace, Ticket};
pub use prepare::Workload;
use progress::collect;
pub use progress::Progress;
use recorder::{Recorder, SecondMsg, Totals};
use task::{check_samples, health_checks, task};

/// A request claimed this long after it was due counts as late (tokio's timer has a
/// resolution of 1 ms, so anything finer would count timer jitter).
pub const LATE_AFTER: Duration = Duration::from_millis(2);
/// Open loop: how long after the window a backlog of due requests may still be sent.
const DRAIN: Duration = Duration::from_secs(5);

/// One measured window's settings.
#[derive(Debug, Clone, Serialize)]
pub struct LoadSettings {
    /// Open loop at this many requests per second; closed loop when `None`.
    #[serde(rename = "rate_rps")]
    pub rate: Option<f64>,
    /// Connections.
    pub connections: usize,
    /// Concurrent streams per HTTP/2 connection.
    pub streams: usize,
    /// Load before the measured window, not recorded.
    #[serde(with = "secs", rename = "warmup_s")]
    pub warmup: Duration,
    /// The measured window.
    #[serde(with = "secs", rename = "duration_s")]
    pub duration: Duration,
    /// A new TCP+TLS connection for every request (as KMS often does).
    pub new_connection_per_request: bool,
    /// Longest wait for an answer.
    #[serde(with = "secs", rename = "timeout_s")]
    pub timeout: Duration,
    /// The operation mix.
    pub mix: Mix,
    /// Encrypt decrypt samples to check at the end (at most).
    pub verify_samples: usize,
    /// Live progress.
    #[serde(skip)]
    pub progress: Progress,
    /// What the progress line calls this window.
    #[serde(skip)]
    pub label: String,
    /// Start the warm-up at this wall-clock time (several generators at once).
    #[serde(skip)]
    pub start_at: Option<SystemTime>,
    /// `--metrics-listen`: the live figures the tasks update.
    #[serde(skip)]
    pub live: Option<Arc<crate::metrics::Live>>,
    /// Send as KMS does (`--kms`; see [`crate::kms`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kms: Option<crate::kms::Profile>,
}

mod secs {
    pub(super) fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// The answer to a request.
type Answer = Result<(u16, Bytes), ClientError>;

/// Shared by the tasks of one window.
struct Window {
    workload: Arc<Workload>,
    settings: LoadSettings,
    t0: Instant,
    measure_start: Instant,
    end: Instant,
    /// Open loop: requests still unsent by then are given up (see `unsent`).
    hard_end: Instant,
    /// Open loop: the pacer's tickets, taken by one task at a time.
    tickets: Option<tokio::sync::Mutex<mpsc::UnboundedReceiver<Ticket>>>,
    samples_per_task: usize,
}

/// What one window produced.
#[derive(Debug)]
pub struct WindowResult {
    /// Histograms and counts.
    pub measured: Measured,
    /// Correctness checks.
    pub verification: Verification,
    /// `--kms`: what KMS would have seen.
    pub kms: Option<crate::kms::View>,
}

/// Runs one window: warm-up, then the measured duration.
pub async fn run_window(
    workload: &Arc<Workload>,
    settings: LoadSettings,
) -> Result<WindowResult, Error> {
    let streams = if workload.connector.http2() {
        settings.streams.max(1)
    } else {
        1
    };
    let tasks = settings.connections.max(1) * streams;
    if let Some(live) = &settings.live {
        live.offer(settings.rate);
    }
    if let Some(at) = settings.start_at {
        if settings.progress != Progress::Quiet {
            let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
            eprintln!("waiting {:.1} s for --start-at", wait.as_secs_f64());
        }
        if let Some(connect_at) = at.checked_sub(CONNECT_LEAD) {
            let _ = sleep_until(connect_at).await;
        }
    }
    // Open every connection first, so the schedule does not start with handshakes.
    let mut senders: Vec<Option<Sender>> = Vec::with_capacity(tasks);
    if !settings.new_connection_per_request {
        let mut opening = tokio::task::JoinSet::new();
        for _ in 0..settings.connections.max(1) {
            let connector = workload.connector.clone();
            opening.spawn(async move { connector.connect().await });
        }
        while let Some(opened) = opening.join_next().await {
            let sender = opened?.map_err(|e| format!("cannot connect: {e}"))?;
            for _ in 1..streams {
                senders.push(sender.share());
            }
            senders.push(Some(sender));
        }
    }
    senders.resize_with(tasks, || None);
    // The tasks' recorders, made before the clock starts (see `Recorder::new`).
    let (seconds_tx, seconds_rx) = mpsc::unbounded_channel();
    let fresh: Vec<Recorder> = (0..tasks)
        .map(|_| Recorder::new(seconds_tx.clone(), &settings.mix, settings.rate.is_some()))
        .collect();
    // `--kms`: the health checks beside the load have a recorder of their own (made
    // only when they run: an unused one would hold the collector's channel open).
    let health = settings
        .kms
        .as_ref()
        .and_then(|k| k.health_interval)
        .map(|interval| {
            let mix = crate::workload::Mix {
                weights: [0, 0, 0, 1],
            };
            (interval, Recorder::new(seconds_tx.clone(), &mix, false))
        });
    drop(seconds_tx);

    if let Some(at) = settings.start_at {
        if let Err(late) = sleep_until(at).await {
            eprintln!(
                "warning: starting {:.3} s after --start-at: connecting took that long",
                late.as_secs_f64()
            );
        }
    }
    let t0 = Instant::now();
    let unix0 = SystemTime::now();
    let measure_start = t0 + settings.warmup;
    let measure_since_epoch = (unix0 + settings.warmup)
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let window = Arc::new(Window {
        workload: Arc::clone(workload),
        settings: settings.clone(),
        t0,
        measure_start,
        end: measure_start + settings.duration,
        hard_end: measure_start + settings.duration + settings.timeout.min(DRAIN),
        tickets: None,
        samples_per_task: settings.verify_samples.div_ceil(tasks),
    });
    let mut window = window;
    if let Some(rate) = settings.rate {
        let (tickets, receiver) = mpsc::unbounded_channel();
        Arc::get_mut(&mut window).expect("not shared yet").tickets =
            Some(tokio::sync::Mutex::new(receiver));
        let end = window.end;
        std::thread::Builder::new()
            .name("pacer".into())
            .spawn(move || pace(t0, rate, end, tickets))?;
    }
    let meter = Meter::start(DEFAULT_INTERVAL, window.measure_start, window.end)?;
    let mut running = tokio::task::JoinSet::new();
    for (sender, recorder) in senders.into_iter().zip(fresh) {
        running.spawn(task(Arc::clone(&window), sender, recorder));
    }
    if let Some((interval, recorder)) = health {
        running.spawn(health_checks(Arc::clone(&window), interval, recorder));
    }
    let collector = tokio::spawn(collect(seconds_rx, Arc::clone(&window)));

    let mut recorders = Vec::with_capacity(tasks);
    while let Some(done) = running.join_next().await {
        recorders.push(done?);
    }
    let seconds = collector.await?;
    let stalls = meter.finish()?;

    let mut totals = Totals::new(workload.pool_size() as u64, window.end);
    totals.kms = settings
        .kms
        .clone()
        .map(|p| (p, crate::kms::Recorder::default()));
    for recorder in recorders {
        totals.add(recorder)?;
    }
    check_samples(workload, &totals.samples, &mut totals.verification).await?;
    Ok(totals.into_result(&window, seconds, measure_since_epoch, stalls))
}

/// How long before `--start-at` the connections are opened: time enough to open them,
/// too little for a proxy to close them as idle.
const CONNECT_LEAD: Duration = Duration::from_secs(3);

/// Sleeps until the wall-clock time `at`, or says how long ago it was.
async fn sleep_until(at: SystemTime) -> Result<(), Duration> {
    match at.duration_since(SystemTime::now()) {
        Ok(wait) => {
            tokio::time::sleep(wait).await;
            Ok(())
        }
        Err(late) => Err(late.duration()),
    }
}
