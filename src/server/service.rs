//! The per-request pipeline, in order: load balancer probes, routing, bounded body,
//! SigV4, the key store's quota, the XKS handler, metrics and the log line. Each stage
//! is a function of its own.
//!
//! Every request gets a deadline when it arrives (`server.request_deadline_ms`); the
//! HSM pool refuses work that cannot finish by then (429) and gives up on calls that
//! run past it (503).

use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use super::guard::{CloseReason, ConnectionClock, RequestGuard};
use super::live::{KeyStore, Live};
use super::App;
use crate::auth::RequestParts;
use crate::logging::limit::{Kind as LimitKind, Verdict};
use crate::metrics::{
    note_stage, Metrics, RequestLabels, ShedReason, Stage, StageTimes, REQUEST_STAGES,
};
use crate::router::RouteMatch;
use crate::xks::{Audit, ErrorName, XksError};

/// Unauthenticated load balancer liveness probe (spec: Other considerations): 200 while
/// the process serves.
pub const LIVENESS_PATH: &str = "/livez";
/// Readiness: 200 while the EKM can serve and we are not shutting down, 503 otherwise.
pub const READINESS_PATH: &str = "/readyz";

/// Counts a request in flight for as long as it lives.
struct InFlight<'a>(&'a Metrics);

impl<'a> InFlight<'a> {
    fn new(metrics: &'a Metrics) -> Self {
        metrics.in_flight.inc();
        Self(metrics)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

/// Serves one request that arrived on the connection `clock` watches. Infallible: every
/// failure becomes a JSON error response.
pub async fn serve_request(
    app: Arc<App>,
    clock: &ConnectionClock,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let http1 = request.version() < Version::HTTP_2;
    let mut response = REQUEST_STAGES
        .scope(
            Cell::new(StageTimes::default()),
            serve(app, clock.request(), request),
        )
        .await;
    if http1 && clock.closing() {
        // hyper closes the connection after this response (HTTP/2 has GOAWAY for it).
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

async fn serve(
    app: Arc<App>,
    mut on_connection: RequestGuard<'_>,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let deadline = started + app.limits.request_deadline;
    if request.method() == Method::GET {
        if let Some(response) = probe(&app, request.uri().path()) {
            return response;
        }
    }
    let _in_flight = InFlight::new(&app.metrics);
    if crate::logging::congested() {
        // The log reader is not keeping up: refuse new work at once, so that the lines
        // of the requests in flight still fit and nothing waits on the log.
        app.metrics.shed(ShedReason::LogBacklog);
        count(
            &app.metrics,
            "none",
            ErrorName::Throttling.as_str(),
            started.elapsed(),
        );
        return error_response(&XksError::new(
            ErrorName::Throttling,
            "the proxy's audit log is not being written fast enough",
        ));
    }
    // The configuration this request is served with, even if a reload swaps it.
    let live = app.live.load_full();
    let path = request.uri().path().to_owned();
    let route = match live.router.route(request.method(), &path) {
        Ok(route) => route,
        Err(error) => {
            if may_log(&app, LimitKind::Routing) {
                tracing::info!(method = %request.method(), path = %sanitize(&path), error = %error.name(), "request rejected by routing");
            }
            // Read (at most the limit of) the body before answering: a response that
            // overtakes the upload makes HTTP/2 reset the stream, and clients such as
            // curl then drop the response.
            let (parts, body) = request.into_parts();
            let _ = read_body_in_time(&app, on_connection.clock(), body, &parts.headers).await;
            count(
                &app.metrics,
                "none",
                error.name().as_str(),
                started.elapsed(),
            );
            return error_response(&error);
        }
    };
    let store = &live.key_stores[route.key_store];
    let (parts, body) = request.into_parts();
    // Read here, so that the body outlives the log line, which borrows from it.
    let read;
    let (result, audit) =
        match read_body_in_time(&app, on_connection.clock(), body, &parts.headers).await {
            Ok(body) => {
                read = body;
                let request = Admitted {
                    route: &route,
                    parts: &parts,
                    body: &read,
                    deadline,
                };
                authenticated(&app, &live, store, request, &mut on_connection).await
            }
            Err(error) => (Err(error), Audit::default()),
        };
    let response = match &result {
        Ok(body) => json(StatusCode::OK, body.clone()),
        Err(error) => error_response(error),
    };
    let latency = started.elapsed();
    let outcome = match &result {
        Ok(_) => "ok",
        Err(e) => e.name().as_str(),
    };
    count(&app.metrics, route.operation.as_str(), outcome, latency);
    // An authenticated request's audit line is always written. A client without
    // credentials chooses how many lines its rejects write: those are rate-limited.
    let unauthenticated = match &result {
        _ if on_connection.is_authenticated() => None,
        Err(e) if e.name() == ErrorName::AuthenticationFailed => Some(LimitKind::Authentication),
        _ => Some(LimitKind::Body),
    };
    if unauthenticated.map_or(true, |kind| may_log(&app, kind)) {
        if let (Some(LimitKind::Authentication), Err(error)) = (unauthenticated, &result) {
            tracing::warn!(key_store = %store.name, reason = error.message(), "SigV4 authentication failed");
        }
        log_request(store, &route, &audit, &result, latency);
    }
    response
}

/// Whether a line for an unauthenticated reject of `kind` may be written now (see
/// [`crate::logging::limit`]); says how many were left out before it.
fn may_log(app: &App, kind: LimitKind) -> bool {
    match app.log_limits.check(kind, Instant::now()) {
        Verdict::Suppress => {
            app.metrics.log_suppressed(kind.as_str());
            false
        }
        Verdict::Write { suppressed_before } => {
            if suppressed_before > 0 {
                tracing::info!(
                    kind = kind.as_str(),
                    suppressed = suppressed_before,
                    "similar lines for unauthenticated rejects were suppressed"
                );
            }
            true
        }
    }
}

/// The load balancer probes, answered the same on the main and the admin listener.
pub fn probe(app: &App, path: &str) -> Option<Response<Full<Bytes>>> {
    match path {
        LIVENESS_PATH => Some(json(StatusCode::OK, br#"{"status":"live"}"#.to_vec())),
        READINESS_PATH => Some(readiness(app)),
        _ => None,
    }
}

fn count(metrics: &Metrics, operation: &'static str, outcome: &'static str, latency: Duration) {
    metrics
        .requests
        .get_or_create(&RequestLabels { operation, outcome })
        .inc();
    metrics.latencies.record_total(operation, outcome, latency);
}

/// A routed request with its body read.
struct Admitted<'r, 'a> {
    route: &'r RouteMatch<'r>,
    parts: &'r http::request::Parts,
    body: &'a Bytes,
    deadline: Instant,
}

async fn authenticated<'a>(
    app: &App,
    live: &Live,
    store: &KeyStore,
    request: Admitted<'_, 'a>,
    on_connection: &mut RequestGuard<'_>,
) -> (Result<Vec<u8>, XksError>, Audit<'a>) {
    let Admitted {
        route,
        parts,
        body,
        deadline,
    } = request;
    let request_parts = RequestParts {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query(),
        authority: parts.uri.authority().map(|a| a.as_str()),
        headers: &parts.headers,
        body,
    };
    let auth_started = Instant::now();
    let verified = store
        .verifier
        .verify_signature(&request_parts, SystemTime::now());
    let auth_time = auth_started.elapsed();
    note_stage(Stage::Auth, auth_time);
    app.metrics
        .latencies
        .record_stage(Stage::Auth, route.operation.as_str(), auth_time);
    let signature = match verified {
        Ok((_, signature)) => signature,
        // Logged (rate-limited) with the request's line.
        Err(error) => return (Err(error.into()), Audit::default()),
    };
    on_connection.authenticated();
    if store.quota.as_ref().is_some_and(|q| !q.try_acquire()) {
        app.metrics.shed(ShedReason::Quota);
        store.verifier.release(&signature);
        let error = XksError::new(
            ErrorName::Throttling,
            "request rate exceeds this key store's quota",
        );
        return (Err(error), Audit::default());
    }
    let authz = live
        .authorizer
        .as_deref()
        .map(|authorizer| (authorizer, store.name.as_str()));
    let outcome = app
        .handler
        .handle(
            route.operation,
            &store.keys,
            route.key_id,
            body,
            deadline,
            authz,
        )
        .await;
    if matches!(&outcome.result, Err(e) if e.name() == ErrorName::Throttling) {
        // Refused by admission, before any work: KMS may retry it as it was signed.
        store.verifier.release(&signature);
    }
    (outcome.result, outcome.audit)
}

/// Reads the body within `server.body_read_timeout_ms`; a body too slow asks the
/// connection to close (the client is broken or hostile: KMS sends a body at once).
async fn read_body_in_time(
    app: &App,
    clock: &ConnectionClock,
    body: Incoming,
    headers: &http::HeaderMap,
) -> Result<Bytes, XksError> {
    let timeout = app.limits.body_read_timeout;
    match tokio::time::timeout(timeout, read_body(body, headers, app.max_body_bytes)).await {
        Ok(result) => result,
        Err(_) => {
            app.metrics
                .connection_closed(CloseReason::BodyTimeout.as_str());
            clock.close(CloseReason::BodyTimeout);
            Err(XksError::validation(format!(
                "request body not received within {} ms",
                timeout.as_millis()
            )))
        }
    }
}

/// Bytes of an over-limit body read and thrown away before answering, so the answer
/// does not overtake the upload (an HTTP/1.1 server that closes with unread data in
/// its socket sends a TCP reset, and the client loses the answer). Bigger bodies are
/// answered at once and the connection closes.
const DISCARD_LIMIT: u64 = 1024 * 1024;

/// Reads the body, never buffering more than `limit` bytes: a declared length over the
/// limit is refused without buffering, and a chunked body is cut off at the limit.
async fn read_body(
    body: Incoming,
    headers: &http::HeaderMap,
    limit: usize,
) -> Result<Bytes, XksError> {
    let too_large = || {
        // spec: UnsupportedOperationException covers "a parameter value exceeded the
        // maximum size supported by a specific implementation".
        XksError::new(
            ErrorName::UnsupportedOperation,
            format!("request body exceeds the {limit}-byte limit"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        discard(body, DISCARD_LIMIT).await;
        return Err(too_large());
    }
    let mut body = body;
    let mut buffer = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Err(XksError::validation("request body could not be read"));
        };
        if let Ok(data) = frame.into_data() {
            if buffer.len() + data.len() > limit {
                discard(body, DISCARD_LIMIT).await;
                return Err(too_large());
            }
            buffer.extend_from_slice(&data);
        }
    }
    Ok(buffer.freeze())
}

/// Reads and drops up to `cap` bytes of the rest of a body.
async fn discard(mut body: Incoming, cap: u64) {
    let mut seen = 0u64;
    while seen <= cap {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    seen += data.len() as u64;
                }
            }
            _ => return,
        }
    }
}

fn readiness(app: &App) -> Response<Full<Bytes>> {
    let unavailable = |reason: &str| {
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(r#"{{"status":"unavailable","reason":"{reason}"}}"#).into_bytes(),
        )
    };
    if !app.handler.monitor().ready() {
        return unavailable("the key manager cannot serve, or the proxy is shutting down");
    }
    if crate::logging::congested() {
        return unavailable("the audit log is not being written fast enough");
    }
    // Every connection slot taken: new clients wait in the backlog, so a load
    // balancer should send them elsewhere.
    if app.metrics.connections_open.get() >= app.limits.max_connections as i64 {
        return unavailable("every connection slot (server.max_connections) is taken");
    }
    json(StatusCode::OK, br#"{"status":"ready"}"#.to_vec())
}

pub(crate) fn json(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The spec's JSON error body with the error's status.
pub fn error_response(error: &XksError) -> Response<Full<Bytes>> {
    let status =
        StatusCode::from_u16(error.status()).expect("spec error statuses are valid HTTP statuses");
    json(status, error.to_json())
}

/// One log line per request (spec: Logging): who, what, which key, outcome, latency.
/// Never plaintext, AAD or ciphertext.
fn log_request(
    store: &KeyStore,
    route: &RouteMatch<'_>,
    audit: &Audit<'_>,
    result: &Result<Vec<u8>, XksError>,
    latency: Duration,
) {
    let latency_us = latency.as_micros() as u64;
    let stages = REQUEST_STAGES.try_with(Cell::get).unwrap_or_default();
    let none = "-";
    let (outcome, message) = match result {
        Ok(_) => ("ok", ""),
        Err(e) => (e.name().as_str(), e.message()),
    };
    tracing::info!(
        key_store = %store.name,
        operation = route.operation.as_str(),
        key_id = route.key_id,
        kms_request_id = audit.kms_request_id.as_deref().unwrap_or(none),
        kms_operation = audit.kms_operation.as_deref().unwrap_or(none),
        principal = audit.aws_principal_arn.as_deref().unwrap_or(none),
        kms_key_arn = audit.kms_key_arn.as_deref().unwrap_or(none),
        via = audit.kms_via_service.as_deref().unwrap_or(none),
        outcome,
        error_message = message,
        authorization = audit.authorization.as_deref().unwrap_or(none),
        latency_us,
        auth_us = stages.auth.as_micros() as u64,
        queue_us = stages.queue_wait.as_micros() as u64,
        hsm_us = stages.hsm.as_micros() as u64,
        "xks request"
    );
}

/// Paths of rejected requests are attacker-chosen: keep logs printable and short.
fn sanitize(path: &str) -> String {
    path.chars()
        .take(256)
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .collect()
}
