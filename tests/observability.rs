//! Metrics, probes, quotas and connection hygiene on the real PKCS#11 path (SoftHSM2).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `/metrics` parses as Prometheus exposition and its counters match the requests sent.
#[tokio::test]
async fn metrics_count_what_was_sent() {
    let proxy = Setup::new().start();
    let client = proxy.client();
    let mut encrypted = Vec::new();
    for version in [Version::Http1, Version::Http2, Version::Http1] {
        let reply = client
            .post(
                version,
                &key_path("foo", "encrypt"),
                &encrypt_body(b"counted", None, false),
            )
            .await;
        assert_eq!(reply.status, 200);
        encrypted.push(reply.body);
    }
    for body in &encrypted[..2] {
        let reply = client
            .post(
                Version::Http2,
                &key_path("foo", "decrypt"),
                &decrypt_body(body, None),
            )
            .await;
        assert_eq!(reply.status, 200);
    }
    for _ in 0..2 {
        let reply = client
            .post(
                Version::Http1,
                &key_path("nope", "encrypt"),
                &encrypt_body(b"x", None, false),
            )
            .await;
        assert_eq!(reply.error_name(), "KeyNotFoundException");
    }
    let health = client
        .post(
            Version::Http1,
            &health_path(),
            &json!({"requestMetadata": {"kmsRequestId": "r-1", "kmsOperation": "KmsHealthCheck"}}),
        )
        .await;
    assert_eq!(health.body["ekmFleetDetails"][0]["healthStatus"], "ACTIVE");

    let metrics = proxy.scrape().await;
    let requests = |operation, outcome| {
        metrics.value(
            "xks_requests_total",
            &[("operation", operation), ("outcome", outcome)],
        )
    };
    assert_eq!(requests("Encrypt", "ok"), 3.0);
    assert_eq!(requests("Decrypt", "ok"), 2.0);
    assert_eq!(requests("Encrypt", "KeyNotFoundException"), 2.0);
    assert_eq!(requests("GetHealthStatus", "ok"), 1.0);
    assert_eq!(metrics.value("xks_requests_total", &[]), 8.0);
    let encrypt_ok = [("operation", "Encrypt"), ("outcome", "ok")];
    let (count, within) = metrics.histogram("xks_request_duration_seconds", &encrypt_ok, 1.0);
    assert_eq!((count, within), (3, 3));
    // Every HSM call is timed, and so is authentication.
    let (hsm_calls, _) = metrics.histogram(
        "xks_stage_duration_seconds",
        &[("stage", "hsm"), ("operation", "Encrypt")],
        1.0,
    );
    assert_eq!(hsm_calls, 3, "the unknown key never reaches the HSM");
    let (auth, _) = metrics.histogram(
        "xks_stage_duration_seconds",
        &[("stage", "auth"), ("operation", "Encrypt")],
        1.0,
    );
    assert_eq!(auth, 5);
    // Pool, health, connections.
    assert_eq!(metrics.value("xks_hsm_sessions", &[]), 2.0);
    assert_eq!(metrics.value("xks_hsm_sessions_busy", &[]), 0.0);
    assert_eq!(metrics.value("xks_in_flight", &[]), 0.0);
    assert_eq!(
        metrics.value("xks_ekm_health", &[("status", "ACTIVE")]),
        1.0
    );
    assert_eq!(
        metrics.value("xks_ekm_health", &[("status", "UNAVAILABLE")]),
        0.0
    );
    assert_eq!(
        metrics.value("xks_tls_handshakes_total", &[("result", "ok")]),
        8.0,
        "one connection per request"
    );
    assert_eq!(
        metrics.value("xks_budget_share", &[("operation", "Encrypt")]),
        1.0
    );
    assert!(metrics.text.ends_with("# EOF\n"));
    // The admin listener serves nothing else.
    assert_eq!(proxy.admin_get("/nope").await.0, 404);
    assert_eq!(
        admin_request(proxy.admin.unwrap(), "POST", "/metrics")
            .await
            .0,
        405
    );
    // /metrics is not on the KMS-facing listener.
    let (status, _) = curl(&proxy, "/metrics", "", &["-X", "GET"]);
    assert_ne!(status, 200);
}

/// Probes answer without authentication on both listeners.
#[tokio::test]
async fn probes_on_both_listeners() {
    let proxy = Setup::new().start();
    for path in ["/livez", "/readyz"] {
        assert_eq!(proxy.admin_get(path).await.0, 200, "{path}");
        let output = std::process::Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(proxy.setup.path("ca.pem"))
            .arg(proxy.url(path))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&output.stdout), "200", "{path}");
    }
}

/// A key store's quota answers 429 ThrottlingException once its burst is spent.
#[tokio::test]
async fn key_store_quota_throttles() {
    let setup = Setup::new();
    setup.edit_config(
        "\n[[key_store.credential]]",
        "max_requests_per_second = 1\nburst = 3\n\n[[key_store.credential]]",
    );
    let proxy = setup.start();
    let client = proxy.client();
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let reply = client
            .post(
                Version::Http1,
                &key_path("foo", "encrypt"),
                &encrypt_body(b"q", None, false),
            )
            .await;
        if reply.status == 429 {
            assert_eq!(reply.error_name(), "ThrottlingException");
        }
        statuses.push(reply.status);
    }
    assert_eq!(&statuses[..3], &[200, 200, 200]);
    assert!(
        statuses[3..].iter().filter(|s| **s == 429).count() >= 2,
        "{statuses:?}"
    );
    let metrics = proxy.scrape().await;
    assert!(metrics.value("xks_shed_total", &[("reason", "quota")]) >= 2.0);
}

/// Opens a TLS connection offering HTTP/1.1 only.
async fn tls_connect(proxy: &Proxy) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let config = tls_client_config(&proxy.setup.path("ca.pem"), &[b"http/1.1"]);
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

/// Reads until the server closes the connection; returns how long that took.
async fn wait_for_close(
    stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("the server kept the connection open"),
        }
    }
}

/// Idle connections are closed after `idle_timeout_seconds`.
#[tokio::test]
async fn idle_connections_are_closed() {
    let setup = Setup::new();
    setup.edit_config(
        "request_deadline_ms = 100",
        "request_deadline_ms = 100\nidle_timeout_seconds = 1",
    );
    let proxy = setup.start();
    let mut stream = tls_connect(&proxy).await;
    stream
        .write_all(b"GET /livez HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Kept alive after the response, then closed for idleness (header timeout is 10 s).
    let waited = wait_for_close(&mut stream).await;
    assert!(waited < Duration::from_secs(8), "closed after {waited:?}");
}

/// A client dribbling headers (slowloris) is cut off by the header-read timeout, and
/// connections beyond `max_connections` wait until one closes.
#[tokio::test]
async fn slow_headers_and_connection_limit() {
    let setup = Setup::new();
    setup.edit_config(
        "request_deadline_ms = 100",
        "request_deadline_ms = 100\nheader_read_timeout_seconds = 1\nmax_connections = 2",
    );
    let proxy = setup.start();

    // Two connections fill the limit; a third completes TCP (backlog) but not TLS.
    let first = tls_connect(&proxy).await;
    let _second = tls_connect(&proxy).await;
    let third = tokio::spawn({
        let config = tls_client_config(&proxy.setup.path("ca.pem"), &[b"http/1.1"]);
        let addr = proxy.addr;
        async move {
            let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            connector.connect(name, tcp).await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!third.is_finished(), "a third connection was served");
    drop(first);
    let third = tokio::time::timeout(Duration::from_secs(10), third)
        .await
        .expect("the third connection must be served once a slot frees")
        .unwrap();
    let mut third = third.unwrap();

    // Slowloris on the third: part of a request line and headers, then nothing.
    third
        .write_all(b"POST /example HTTP/1.1\r\nhost: localhost\r\n")
        .await
        .unwrap();
    let waited = wait_for_close(&mut third).await;
    assert!(waited < Duration::from_secs(8), "closed after {waited:?}");
}
