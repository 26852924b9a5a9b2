//! `--metrics-listen ADDR`: the generator's live figures on a Prometheus endpoint, so a
//! load running on a cluster shows on the proxy's dashboard beside the proxy's own.
//!
//! The engine's tasks call [`Live`] around each request (sent, then completed with its
//! outcome and latency); the figures are prometheus-client's atomics, rendered in the
//! OpenMetrics text format on `GET /metrics` by a small hyper server on the run's
//! runtime. Names (all prefixed `xks_loadtest_`):
//!
//! - `requests_sent_total{operation,phase}`: requests handed to a connection;
//! - `requests_completed_total{operation,phase,outcome}`: answered (`ok`: HTTP 200;
//!   `error`: any other status, an XKS error) or not (`no_answer`: timeout or
//!   connection failure);
//! - `request_duration_seconds{operation,phase}`: histogram of the latency the report
//!   measures (open loop: from the request's due time, so waiting counts);
//! - `in_flight`: sent and not yet completed;
//! - `offered_rate_rps`: the open loop's rate (0: closed loop); the achieved rate is
//!   `rate(requests_completed_total[1m])`.
//!
//! `phase` is `warmup` or `measured`: the `measured` counts are exactly what the report
//! counts, by operation, when the run ends (the end-of-run decrypts that check kept
//! Encrypt answers are not load and are not counted here, nor in the report).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::workload::Op;
use crate::Error;

/// Labels of the sent counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SentLabels {
    operation: &'static str,
    phase: &'static str,
}

/// Labels of the completed counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CompletedLabels {
    operation: &'static str,
    phase: &'static str,
    outcome: &'static str,
}

/// How a request ended, as the `outcome` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// HTTP 200.
    Ok,
    /// Another status: an XKS error answer.
    Error,
    /// No answer: timeout, connection or TLS failure.
    NoAnswer,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Error => "error",
            Self::NoAnswer => "no_answer",
        }
    }
}

fn phase(measured: bool) -> &'static str {
    if measured {
        "measured"
    } else {
        "warmup"
    }
}

/// 100 µs to about 26 s, doubling: the proxy's budget (250 ms) falls mid-range.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_1, 2.0, 19))
}

/// The live figures of one generator.
pub struct Live {
    registry: Registry,
    sent: Family<SentLabels, Counter>,
    completed: Family<CompletedLabels, Counter>,
    latency: Family<SentLabels, Histogram, fn() -> Histogram>,
    in_flight: Gauge,
    offered: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live").finish_non_exhaustive()
    }
}

impl Default for Live {
    fn default() -> Self {
        Self::new()
    }
}

impl Live {
    /// Every figure at zero, registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("xks_loadtest");
        let sent = Family::<SentLabels, Counter>::default();
        let completed = Family::<CompletedLabels, Counter>::default();
        let latency: Family<SentLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        let in_flight = Gauge::default();
        let offered = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "requests_sent",
            "Requests handed to a connection",
            sent.clone(),
        );
        registry.register(
            "requests_completed",
            "Requests answered (ok, error) or given up (no_answer)",
            completed.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Latency as the report measures it (open loop: from the due time)",
            latency.clone(),
        );
        registry.register(
            "in_flight",
            "Requests sent and not yet completed",
            in_flight.clone(),
        );
        registry.register(
            "offered_rate_rps",
            "Open loop: the offered rate, requests per second (0: closed loop)",
            offered.clone(),
        );
        Self {
            registry,
            sent,
            completed,
            latency,
            in_flight,
            offered,
        }
    }

    /// The open loop's offered rate (`None`: closed loop, shown as 0).
    pub fn offer(&self, rate: Option<f64>) {
        self.offered.set(rate.unwrap_or(0.0));
    }

    /// A request of `op` is handed to a connection.
    pub fn sent(&self, op: Op, measured: bool) {
        self.sent
            .get_or_create(&SentLabels {
                operation: op.name(),
                phase: phase(measured),
            })
            .inc();
        self.in_flight.inc();
    }

    /// The request of `op` sent last by this task ended with `outcome` after `latency`.
    pub fn completed(&self, op: Op, measured: bool, outcome: Outcome, latency: Duration) {
        self.in_flight.dec();
        let labels = SentLabels {
            operation: op.name(),
            phase: phase(measured),
        };
        self.completed
            .get_or_create(&CompletedLabels {
                operation: labels.operation,
                phase: labels.phase,
                outcome: outcome.as_str(),
            })
            .inc();
        self.latency
            .get_or_create(&labels)
            .observe(latency.as_secs_f64());
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The flags of the endpoint, shared by `run` and `search`.
#[derive(Debug, Clone, clap::Args)]
pub struct MetricsArgs {
    /// Serve live figures for Prometheus on http://ADDR/metrics (e.g. 0.0.0.0:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// With --metrics-listen: keep serving this many seconds after the report is
    /// written, so that Prometheus scrapes the final counts (give its scrape interval).
    #[arg(long, value_name = "SECONDS", default_value_t = 0.0)]
    pub metrics_hold: f64,
}

impl MetricsArgs {
    /// With `--metrics-listen`: the figures, served on `runtime` (the address bound is
    /// printed on stderr, as `metrics: http://ADDR/metrics`).
    pub fn start(&self, runtime: &tokio::runtime::Runtime) -> Result<Option<Arc<Live>>, Error> {
        let Some(addr) = self.metrics_listen else {
            return Ok(None);
        };
        if Duration::try_from_secs_f64(self.metrics_hold).is_err() {
            return Err("--metrics-hold must be a number of seconds >= 0".into());
        }
        let live = Arc::new(Live::new());
        let bound = runtime.block_on(serve(addr, Arc::clone(&live)))?;
        eprintln!("metrics: http://{bound}/metrics");
        Ok(Some(live))
    }

    /// With `--metrics-listen`: serves `--metrics-hold` seconds more, on `runtime`.
    pub fn hold(&self, runtime: &tokio::runtime::Runtime, live: Option<&Arc<Live>>) {
        if live.is_some() && self.metrics_hold > 0.0 {
            eprintln!(
                "metrics: serving {} s more (--metrics-hold)",
                self.metrics_hold
            );
            let hold = Duration::try_from_secs_f64(self.metrics_hold).unwrap_or_default();
            runtime.block_on(tokio::time::sleep(hold));
        }
    }
}

/// Serves `live` on `GET /metrics` at `addr` on the current runtime until the runtime
/// ends; returns the bound address (`addr` may have port 0).
pub async fn serve(addr: SocketAddr, live: Arc<Live>) -> Result<SocketAddr, Error> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("--metrics-listen {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let live = Arc::clone(&live);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let live = Arc::clone(&live);
                    async move { Ok::<_, std::convert::Infallible>(answer(&live, &request)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Ok(bound)
}

fn answer<B>(live: &Live, request: &http::Request<B>) -> http::Response<Full<Bytes>> {
    let (status, content_type, body) = if request.uri().path() == "/metrics" {
        (
            http::StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            live.encode(),
        )
    } else {
        (
            http::StatusCode::NOT_FOUND,
            "text/plain",
            "only /metrics is served here\n".to_owned(),
        )
    };
    let mut response = http::Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_exposition_names_what_the_module_documents() {
        let live = Live::new();
        live.offer(Some(250.0));
        live.sent(Op::Encrypt, true);
        live.completed(Op::Encrypt, true, Outcome::Ok, Duration::from_millis(3));
        live.sent(Op::Decrypt, false);
        let text = live.encode();
        for expected in [
            r#"xks_loadtest_requests_sent_total{operation="Encrypt",phase="measured"} 1"#,
            r#"xks_loadtest_requests_completed_total{operation="Encrypt",phase="measured",outcome="ok"} 1"#,
            r#"xks_loadtest_request_duration_seconds_count{operation="Encrypt",phase="measured"} 1"#,
            "xks_loadtest_in_flight 1",
            "xks_loadtest_offered_rate_rps 250.0",
        ] {
            assert!(text.contains(expected), "{expected} missing:\n{text}");
        }
    }
}
