//! The per-request pipeline, in order: load balancer probes, routing, bounded body,
//! SigV4, the XKS handler, the log line. Each stage is a function of its own.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use crate::auth::{RequestParts, Verifier};
use crate::hsm::EkmHealth;
use crate::router::{RouteMatch, Router};
use crate::xks::{Audit, ErrorName, Handler, KeySet, XksError};

/// A key store at run time.
#[derive(Debug)]
pub struct KeyStore {
    /// Name for logs.
    pub name: String,
    /// Verifies SigV4 with this key store's region and credentials.
    pub verifier: Verifier,
    /// External key ids this key store may use.
    pub keys: KeySet,
}

/// Everything the service needs, shared by all connections.
#[derive(Debug)]
pub struct App {
    /// Routes.
    pub router: Router,
    /// Key stores, indexed as the router's matches.
    pub key_stores: Vec<KeyStore>,
    /// Executes operations.
    pub handler: Handler,
    /// Largest body buffered.
    pub max_body_bytes: usize,
}

/// Unauthenticated load balancer liveness probe (spec: Other considerations): 200 while
/// the process serves.
pub const LIVENESS_PATH: &str = "/livez";
/// Readiness: 200 while the HSM answers, 503 otherwise.
pub const READINESS_PATH: &str = "/readyz";

/// Serves one request. Infallible: every failure becomes a JSON error response.
pub async fn serve_request(app: Arc<App>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let started = Instant::now();
    if request.method() == Method::GET {
        match request.uri().path() {
            LIVENESS_PATH => return json(StatusCode::OK, br#"{"status":"live"}"#.to_vec()),
            READINESS_PATH => return readiness(&app).await,
            _ => {}
        }
    }
    let path = request.uri().path().to_owned();
    let route = match app.router.route(request.method(), &path) {
        Ok(route) => route,
        Err(error) => {
            tracing::info!(method = %request.method(), path = %sanitize(&path), error = %error.name(), "request rejected by routing");
            // Read (at most the limit of) the body before answering: a response that
            // overtakes the upload makes HTTP/2 reset the stream, and clients such as
            // curl then drop the response.
            let (parts, body) = request.into_parts();
            let _ = read_body(body, &parts.headers, app.max_body_bytes).await;
            return error_response(&error);
        }
    };
    let store = &app.key_stores[route.key_store];
    let (result, audit) = authenticated(&app, store, &route, request).await;
    let response = match &result {
        Ok(body) => json(StatusCode::OK, body.clone()),
        Err(error) => error_response(error),
    };
    log_request(store, &route, &audit, &result, started);
    response
}

async fn authenticated(
    app: &App,
    store: &KeyStore,
    route: &RouteMatch<'_>,
    request: Request<Incoming>,
) -> (Result<Vec<u8>, XksError>, Audit) {
    let (parts, body) = request.into_parts();
    let body = match read_body(body, &parts.headers, app.max_body_bytes).await {
        Ok(body) => body,
        Err(error) => return (Err(error), Audit::default()),
    };
    let request_parts = RequestParts {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query(),
        authority: parts.uri.authority().map(|a| a.as_str()),
        headers: &parts.headers,
        body: &body,
    };
    if let Err(error) = store.verifier.verify(&request_parts, SystemTime::now()) {
        tracing::warn!(key_store = %store.name, reason = %error, "SigV4 authentication failed");
        return (Err(error.into()), Audit::default());
    }
    let outcome = app
        .handler
        .handle(route.operation, &store.keys, route.key_id, &body)
        .await;
    (outcome.result, outcome.audit)
}

/// Reads the body, never buffering more than `limit` bytes: a declared length over the
/// limit is refused before reading, and a chunked body is cut off at the limit.
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
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large())
        }
        Err(_) => Err(XksError::validation("request body could not be read")),
    }
}

async fn readiness(app: &App) -> Response<Full<Bytes>> {
    match app.handler.backend().probe().await {
        EkmHealth::Active | EkmHealth::Degraded => {
            json(StatusCode::OK, br#"{"status":"ready"}"#.to_vec())
        }
        EkmHealth::Unavailable => json(
            StatusCode::SERVICE_UNAVAILABLE,
            br#"{"status":"unavailable"}"#.to_vec(),
        ),
    }
}

fn json(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
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
    audit: &Audit,
    result: &Result<Vec<u8>, XksError>,
    started: Instant,
) {
    let latency_us = started.elapsed().as_micros() as u64;
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
        message,
        latency_us,
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
