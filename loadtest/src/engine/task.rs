//! One task of a window: its own connection (or HTTP/2 stream), its requests rendered
//! once ([`TaskRequests`]), the loop that sends them and records each answer, and the
//! checks of the answers, during the window and (for the kept Encrypt samples) after it.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use super::pacer::Ticket;
use super::prepare::{Route, Workload};
use super::recorder::Recorder;
use super::{Answer, Window};
use crate::client::{ClientError, Connector, RequestBuilder, Sender};
use crate::kms::{Attempt, Outcome};
use crate::metrics::Outcome as LiveOutcome;
use crate::report::Verification;
use crate::workload::{
    decrypt_body, encrypt_body, metadata_only_body, DecryptReply, ErrorReply, Op, Sealed, Template,
};
use crate::Error;

/// Every this many Encrypt answers, one is kept for the decrypt check at the end.
const SAMPLE_EVERY: u64 = 16;

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

/// One task: takes the next due request (open loop) or sends at once (closed loop)
/// until the window is over, checks each answer, and records the measured ones.
pub(super) async fn task(
    window: Arc<Window>,
    mut sender: Option<Sender>,
    mut recorder: Recorder,
) -> Recorder {
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
        exchange(
            &window,
            &requests,
            &mut sender,
            &mut recorder,
            &mut rng,
            (op, key, expected),
            route,
            body,
            due,
        )
        .await;
    }
    recorder.finish();
    recorder
}

/// Sends one request (`--kms`: one logical call, with KMS's timeout and its retry),
/// checks the answer, and records it when it was due in the measured window.
#[allow(clippy::too_many_arguments)]
async fn exchange(
    window: &Window,
    requests: &TaskRequests,
    sender: &mut Option<Sender>,
    recorder: &mut Recorder,
    rng: &mut SmallRng,
    (op, key, expected): (Op, usize, Option<&str>),
    route: &Route,
    body: Bytes,
    due: Instant,
) {
    let workload = &*window.workload;
    let settings = &window.settings;
    let measured = due >= window.measure_start;
    let offset = |done: Instant| {
        done.saturating_duration_since(window.measure_start)
            .as_secs()
    };
    let kms = settings.kms.as_ref();
    if kms.is_some_and(|k| rng.random_bool((k.new_connections_pct / 100.0).clamp(0.0, 1.0))) {
        *sender = None;
    }
    let timeout = kms.map_or(settings.timeout, |k| k.timeout);
    let retry_body = kms.map(|_| body.clone());
    if let Some(live) = &settings.live {
        live.sent(op, measured);
    }
    let request = requests
        .builder
        .post(&route.uri, &route.path, body, SystemTime::now());
    let mut answer = send(&workload.connector, sender, request, timeout).await;
    let mut done = Instant::now();
    let mut sent_from = due;
    if settings.new_connection_per_request {
        *sender = None;
    }
    if let Some(retry_body) = retry_body {
        let first = Attempt::of(&answer.as_ref().map(|(s, _)| *s));
        if measured {
            recorder.kms.attempt(offset(done), done - due, first);
        }
        let outcome = match first {
            Attempt::Ok => Outcome::FirstTry,
            Attempt::Fatal => Outcome::Failed,
            Attempt::Retryable => {
                // The first attempt is a request of its own in the raw figures.
                if measured {
                    record(window, recorder, op, &answer, done - due, done);
                    recorder.kms.retried();
                }
                sent_from = Instant::now();
                let request =
                    requests
                        .builder
                        .post(&route.uri, &route.path, retry_body, SystemTime::now());
                answer = send(&workload.connector, sender, request, timeout).await;
                done = Instant::now();
                let second = Attempt::of(&answer.as_ref().map(|(s, _)| *s));
                if measured {
                    recorder.kms.attempt(offset(done), done - sent_from, second);
                }
                if second == Attempt::Ok {
                    Outcome::AfterRetry
                } else {
                    Outcome::Failed
                }
            }
        };
        if measured {
            recorder
                .kms
                .call(offset(done), done - due, outcome, op == Op::Health);
        }
    }
    if let Some(live) = &settings.live {
        let outcome = match &answer {
            Ok((200, _)) => LiveOutcome::Ok,
            Ok(_) => LiveOutcome::Error,
            Err(_) => LiveOutcome::NoAnswer,
        };
        live.completed(op, measured, outcome, done - due);
    }
    if let Ok((200, body)) = &answer {
        check_answer(
            op,
            key,
            body,
            expected,
            workload,
            &requests.plaintext_b64,
            window.samples_per_task,
            recorder,
        );
    }
    if measured {
        record(window, recorder, op, &answer, done - sent_from, done);
    }
}

/// Records an answer (its status, latency and errorName) in the raw figures.
fn record(
    window: &Window,
    recorder: &mut Recorder,
    op: Op,
    answer: &Answer,
    latency: Duration,
    done: Instant,
) {
    let error_name: Option<std::borrow::Cow<'_, str>> = match answer {
        Ok((200, _)) => None,
        Ok((status, body)) => Some(
            serde_json::from_slice::<ErrorReply<'_>>(body)
                .ok()
                .and_then(|e| e.error_name)
                .unwrap_or_else(|| format!("HTTP {status}").into()),
        ),
        Err(e) => Some(e.kind().into()),
    };
    let status = answer.as_ref().map_or(0, |(s, _)| *s);
    *recorder.status.entry(status).or_insert(0) += 1;
    let offset = done
        .saturating_duration_since(window.measure_start)
        .as_secs();
    recorder.record(op, latency, offset, error_name.as_deref());
    recorder.last_done = Some(done);
}

/// `--kms`: GetHealthStatus every `interval` from the window's start, beside the load,
/// on a connection of its own, as KMS's periodic health checks.
pub(super) async fn health_checks(
    window: Arc<Window>,
    interval: Duration,
    mut recorder: Recorder,
) -> Recorder {
    let workload = &*window.workload;
    let mut rng = SmallRng::from_rng(&mut rand::rng());
    let requests = TaskRequests::new(workload, &mut rng);
    let mut sender = None;
    let mut due = window.measure_start;
    while due < window.end {
        tokio::time::sleep_until(due.into()).await;
        let body = requests.health.1.render(&mut rng);
        exchange(
            &window,
            &requests,
            &mut sender,
            &mut recorder,
            &mut rng,
            (Op::Health, 0, None),
            &requests.health.0,
            body,
            due,
        )
        .await;
        due += interval;
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
pub(super) async fn check_samples(
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
