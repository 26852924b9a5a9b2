//! The plain-HTTP admin listener: probes and a parsed `/metrics` scrape.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;

/// A plain-HTTP request: (status, body).
pub async fn admin_request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

/// A parsed scrape.
pub struct Metrics {
    pub scrape: prometheus_parse::Scrape,
    pub text: String,
}

impl Metrics {
    /// The value of the sample `name` whose labels include `labels` (0 when absent:
    /// counters of things that never happened are not exposed).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                other => panic!("{name}: not a single value: {other:?}"),
            })
            .sum()
    }

    /// A histogram's count and its cumulative count at bucket `le`.
    pub fn histogram(&self, name: &str, labels: &[(&str, &str)], le: f64) -> (u64, u64) {
        let mut total = 0;
        let mut below = 0;
        for sample in self.scrape.samples.iter().filter(|s| s.metric == name) {
            if !labels.iter().all(|(k, v)| sample.labels.get(k) == Some(*v)) {
                continue;
            }
            if let prometheus_parse::Value::Histogram(buckets) = &sample.value {
                for bucket in buckets {
                    if bucket.less_than.is_infinite() {
                        total += bucket.count as u64;
                    }
                    if (bucket.less_than - le).abs() < 1e-9 {
                        below += bucket.count as u64;
                    }
                }
            }
        }
        (total, below)
    }
}
