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
//!   so the report's [`Schedule`] tells the generator's own lateness (the pacer thread
//!   woke late: the machine) from waiting for a free connection.
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
//! progress in `progress.rs`; a task's records and their totals in `recorder.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::client::{ClientError, Connector, RequestBuilder, Sender};
use crate::report::{Measured, Verification};
use crate::stalls::{Meter, DEFAULT_INTERVAL};
use crate::workload::{
    decrypt_body, encrypt_body, metadata_only_body, DecryptReply, ErrorReply, Mix, Op, Sealed,
    Template,
};
use crate::Error;

mod pacer;
mod prepare;
mod progress;
mod recorder;

pub use pacer::wait_until;
use pacer::{pace, Ticket};
use prepare::Route;
pub use prepare::Workload;
use progress::collect;
pub use progress::Progress;
use recorder::{Recorder, SecondMsg, Totals};

/// A request claimed this long after it was due counts as late (tokio's timer has a
/// resolution of 1 ms, so anything finer would count timer jitter).
pub const LATE_AFTER: Duration = Duration::from_millis(2);
/// Every this many Encrypt answers, one is kept for the decrypt check at the end.
const SAMPLE_EVERY: u64 = 16;
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

/// What a task needs to build its requests, made once per task.
struct TaskRequests {
    builder: RequestBuilder,
    /// Per key: Encrypt route and body.
    encrypt: Vec<(Route, Template)>,
    /// Per key: GetKeyMetadata route and body.
    metadata: Vec<(Route, Template)>,
    /// Per key: Decrypt route (bodies come from the pool).
    decrypt: Vec<Route>,
    health: (Route, Template),
    /// This task's Encrypt plaintext, Base64.
    plaintext_b64: String,
}

impl TaskRequests {
    fn new(workload: &Workload, rng: &mut SmallRng) -> Self {
        let builder = RequestBuilder::new(
            &workload.target,
            workload.connector.http2(),
            workload.sign_options,
        );
        let region = &workload.target.region;
        let keys = 0..workload.target.key_ids.len();
        let mut plaintext = vec![0u8; workload.bodies.plaintext_bytes];
        rng.fill(&mut plaintext[..]);
        Self {
            encrypt: keys
                .clone()
                .map(|k| {
                    (
                        workload.route(&builder, Op::Encrypt, k),
                        encrypt_body(region, &plaintext, &workload.aad, workload.bodies.cdiv),
                    )
                })
                .collect(),
            metadata: keys
                .clone()
                .map(|k| {
                    (
                        workload.route(&builder, Op::Metadata, k),
                        metadata_only_body(Op::Metadata, region),
                    )
                })
                .collect(),
            decrypt: keys
                .map(|k| workload.route(&builder, Op::Decrypt, k))
                .collect(),
            health: (
                workload.route(&builder, Op::Health, 0),
                metadata_only_body(Op::Health, region),
            ),
            plaintext_b64: STANDARD.encode(&plaintext),
            builder,
        }
    }
}

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
    let collector = tokio::spawn(collect(seconds_rx, Arc::clone(&window)));

    let mut recorders = Vec::with_capacity(tasks);
    while let Some(done) = running.join_next().await {
        recorders.push(done?);
    }
    let seconds = collector.await?;
    let stalls = meter.finish()?;

    let mut totals = Totals::new(workload.pool_size() as u64, window.end);
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

/// Sends `request`, connecting first if needed; drops the connection on failure.
async fn send(
    connector: &Connector,
    sender: &mut Option<Sender>,
    request: http::Request<http_body_util::Full<Bytes>>,
    timeout: Duration,
) -> Answer {
    let attempt = tokio::time::timeout(timeout, async {
        if sender.as_ref().map_or(true, Sender::closed) {
            *sender = Some(connector.connect().await?);
        }
        sender
            .as_mut()
            .expect("connected just above")
            .send(request)
            .await
    })
    .await;
    let answer = attempt.unwrap_or(Err(ClientError::Timeout));
    if answer.is_err() {
        *sender = None;
    }
    answer
}

async fn task(window: Arc<Window>, mut sender: Option<Sender>, mut recorder: Recorder) -> Recorder {
    let workload = &*window.workload;
    let settings = &window.settings;
    let mut rng = SmallRng::from_rng(&mut rand::rng());
    let requests = TaskRequests::new(workload, &mut rng);
    loop {
        // When is this request due?
        let due = match &window.tickets {
            Some(tickets) => {
                let Some(Ticket { due, released }) = tickets.lock().await.recv().await else {
                    break; // the schedule is over
                };
                let now = Instant::now();
                if now >= window.hard_end {
                    break;
                }
                if due >= window.measure_start {
                    recorder.schedule(
                        released.saturating_duration_since(due),
                        now.saturating_duration_since(due),
                    );
                }
                due
            }
            None => {
                let now = Instant::now();
                if now >= window.end {
                    break;
                }
                now
            }
        };

        let op = settings.mix.pick(&mut rng);
        let key = rng.random_range(0..requests.encrypt.len());
        let (route, body, expected) = match op {
            Op::Encrypt => {
                let (route, template) = &requests.encrypt[key];
                (route, template.render(&mut rng), None)
            }
            Op::Metadata => {
                let (route, template) = &requests.metadata[key];
                (route, template.render(&mut rng), None)
            }
            Op::Health => (&requests.health.0, requests.health.1.render(&mut rng), None),
            Op::Decrypt => {
                let entry = &workload.pool[rng.random_range(0..workload.pool.len())];
                (
                    &requests.decrypt[entry.key],
                    entry.template.render(&mut rng),
                    Some(entry.plaintext_b64.as_str()),
                )
            }
        };
        let request = requests
            .builder
            .post(&route.uri, &route.path, body, SystemTime::now());
        let answer = send(&workload.connector, &mut sender, request, settings.timeout).await;
        let done = Instant::now();
        if settings.new_connection_per_request {
            sender = None;
        }

        let error_name: Option<std::borrow::Cow<'_, str>> = match &answer {
            Ok((200, body)) => {
                check_answer(
                    op,
                    key,
                    body,
                    expected,
                    workload,
                    &requests.plaintext_b64,
                    window.samples_per_task,
                    &mut recorder,
                );
                None
            }
            Ok((status, body)) => Some(
                serde_json::from_slice::<ErrorReply<'_>>(body)
                    .ok()
                    .and_then(|e| e.error_name)
                    .unwrap_or_else(|| format!("HTTP {status}").into()),
            ),
            Err(e) => Some(e.kind().into()),
        };
        if due >= window.measure_start {
            let status = answer.as_ref().map_or(0, |(s, _)| *s);
            *recorder.status.entry(status).or_insert(0) += 1;
            let offset = done
                .saturating_duration_since(window.measure_start)
                .as_secs();
            recorder.record(op, done - due, offset, error_name.as_deref());
            recorder.last_done = Some(done);
        }
    }
    recorder.finish();
    recorder
}

/// Checks a 200 answer: Decrypt gives back the pooled plaintext, Encrypt's CDIV is
/// right (with `--cdiv`), and some Encrypt answers are kept to decrypt at the end.
#[allow(clippy::too_many_arguments)]
fn check_answer(
    op: Op,
    key: usize,
    body: &[u8],
    expected: Option<&str>,
    workload: &Workload,
    plaintext_b64: &str,
    samples_per_task: usize,
    recorder: &mut Recorder,
) {
    let v = &mut recorder.verification;
    match op {
        Op::Decrypt => {
            v.decrypts_checked += 1;
            match serde_json::from_slice::<DecryptReply<'_>>(body) {
                Ok(reply) if Some(&*reply.plaintext) == expected => {}
                Ok(_) => v.decrypt_mismatches += 1,
                Err(_) => v.malformed_responses += 1,
            }
        }
        Op::Encrypt => {
            recorder.encrypts += 1;
            let sample =
                recorder.samples.len() < samples_per_task && recorder.encrypts % SAMPLE_EVERY == 1;
            if !workload.bodies.cdiv && !sample {
                return;
            }
            let Ok(sealed) = serde_json::from_slice::<Sealed>(body) else {
                v.malformed_responses += 1;
                return;
            };
            if workload.bodies.cdiv {
                v.cdivs_checked += 1;
                if sealed.check_cdiv(&workload.aad).is_err() {
                    v.cdiv_failures += 1;
                }
            }
            if sample {
                recorder
                    .samples
                    .push((key, sealed, plaintext_b64.to_owned()));
            }
        }
        Op::Metadata | Op::Health => {
            if serde_json::from_slice::<serde_json::Value>(body).is_err() {
                v.malformed_responses += 1;
            }
        }
    }
}

/// Decrypts the kept Encrypt answers and compares the plaintexts.
async fn check_samples(
    workload: &Workload,
    samples: &[(usize, Sealed, String)],
    verification: &mut Verification,
) -> Result<(), Error> {
    if samples.is_empty() {
        return Ok(());
    }
    let builder = RequestBuilder::new(
        &workload.target,
        workload.connector.http2(),
        workload.sign_options,
    );
    let mut rng = SmallRng::from_rng(&mut rand::rng());
    let mut sender = None;
    for (key, sealed, plaintext_b64) in samples {
        let route = workload.route(&builder, Op::Decrypt, *key);
        let body = decrypt_body(&workload.target.region, sealed, &workload.aad).render(&mut rng);
        let request = builder.post(&route.uri, &route.path, body, SystemTime::now());
        let answer = send(
            &workload.connector,
            &mut sender,
            request,
            Duration::from_secs(10),
        )
        .await;
        verification.encrypt_samples_checked += 1;
        let ok = match &answer {
            Ok((200, body)) => serde_json::from_slice::<DecryptReply<'_>>(body)
                .is_ok_and(|r| r.plaintext == plaintext_b64.as_str()),
            _ => false,
        };
        if !ok {
            verification.encrypt_sample_failures += 1;
        }
    }
    Ok(())
}
