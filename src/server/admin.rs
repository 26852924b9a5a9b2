//! The admin listener: plain HTTP/1.1 for Prometheus and load balancer probes.
//!
//! `/metrics` lives here and not on the KMS-facing listener: it needs no TLS client
//! and no SigV4, so it belongs on a management interface that only operators reach
//! (bind it to 127.0.0.1 or a private network). NLB-style health checks that cannot
//! speak TLS use `/livez` and `/readyz` here; the same probes are on the main listener.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use super::service::{json, probe};
use super::App;

/// The Prometheus scrape path.
pub const METRICS_PATH: &str = "/metrics";

/// Serves the admin listener until the task is aborted.
pub async fn serve(listener: TcpListener, app: Arc<App>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let app = Arc::clone(&app);
                async move { Ok::<_, std::convert::Infallible>(answer(&app, &request)) }
            });
            let result = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "admin connection ended with an error");
            }
        });
    }
}

fn answer(app: &App, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if request.method() != Method::GET {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            br#"{"error":"only GET is served here"}"#.to_vec(),
        );
    }
    if path == METRICS_PATH {
        let mut response = Response::new(Full::new(Bytes::from(app.metrics.encode())));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        );
        return response;
    }
    probe(app, path).unwrap_or_else(|| {
        json(
            StatusCode::NOT_FOUND,
            br#"{"error":"not found: try /metrics, /livez or /readyz"}"#.to_vec(),
        )
    })
}
