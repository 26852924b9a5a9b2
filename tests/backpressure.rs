//! Admission control and lifecycle against the simulated HSM, which runs on the same
//! session pool as PKCS#11 with a service time we choose: a hung call, shutdown
//! draining, and health states that follow the HSM. (Overload is in `overload.rs`, a
//! binary of its own so that it has the machine to itself.)

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// A call that never returns answers 503 DependencyTimeoutException at its timeout,
/// keeps its session, and the other session goes on serving.
#[tokio::test]
async fn hung_hsm_call_gets_503_and_others_are_served() {
    let setup = Setup::new();
    setup.simulated(
        "request_deadline_ms = 2000",
        "sessions = 2\ncall_timeout_ms = 200\n[hsm.simulated]\ndistribution = \"fixed\"\nmean_ms = 1.0\n[[hsm.simulated.key_latency]]\nid = \"hang\"\nlatency_ms = 60000",
        "",
    );
    let proxy = setup.start();
    let client = proxy.client();
    let hung = client
        .post(
            Version::Http1,
            &key_path("hang", "encrypt"),
            &encrypt_body(b"x", None, false),
        )
        .await;
    assert_eq!(hung.status, 503, "{:?}", hung.body);
    assert_eq!(hung.error_name(), "DependencyTimeoutException");
    // The hung call still holds its session ...
    let metrics = proxy.scrape().await;
    assert_eq!(metrics.value("xks_hsm_sessions_busy", &[]), 1.0);
    // ... and the other one serves everything else.
    for version in [Version::Http1, Version::Http2] {
        for _ in 0..5 {
            let reply = client
                .post(
                    version,
                    &key_path("foo", "encrypt"),
                    &encrypt_body(b"y", None, false),
                )
                .await;
            assert_eq!(reply.status, 200, "{:?}", reply.body);
            let decrypted = client
                .post(
                    version,
                    &key_path("foo", "decrypt"),
                    &decrypt_body(&reply.body, None),
                )
                .await;
            assert_eq!(unb64(&decrypted.body["plaintext"]), b"y");
        }
    }
    assert!(proxy.logged("HSM call exceeded its time"));
}

/// SIGTERM: readiness turns off, new connections are refused, the request in flight
/// completes, and the process exits 0.
#[tokio::test]
async fn shutdown_drains_in_flight_requests() {
    let setup = Setup::new();
    setup.simulated(
        "request_deadline_ms = 10000\nshutdown_grace_seconds = 20",
        "sessions = 2\ncall_timeout_ms = 10000\n[hsm.simulated]\ndistribution = \"fixed\"\nmean_ms = 1500.0",
        "",
    );
    let proxy = setup.start();
    let client = Arc::new(proxy.client());
    assert_eq!(proxy.admin_get("/readyz").await.0, 200);
    let in_flight = {
        let client = Arc::clone(&client);
        tokio::spawn(async move {
            client
                .post(
                    Version::Http2,
                    &key_path("foo", "encrypt"),
                    &encrypt_body(b"drain me", None, false),
                )
                .await
        })
    };
    // Wait until the request is being served.
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.scrape().await.value("xks_in_flight", &[]) < 1.0 {
        assert!(Instant::now() < deadline, "the request never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.signal_term();
    // New connections are refused while the old one drains.
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(proxy.addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !in_flight.is_finished(),
        "the slow request should still be in flight"
    );
    assert_eq!(proxy.admin_get("/readyz").await.0, 503);
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let status = proxy.wait();
    assert!(status.success(), "exit status {status:?}");
}

/// `shutdown_grace_seconds` bounds the exit: a request still running when the grace
/// ends is cut off, and the process exits 0 right after.
#[tokio::test]
async fn the_shutdown_grace_bounds_the_exit() {
    let setup = Setup::new();
    setup.simulated(
        "request_deadline_ms = 30000\nshutdown_grace_seconds = 2",
        "sessions = 2\ncall_timeout_ms = 30000\nhealth_check_key = \"health\"\n[hsm.simulated]\ndistribution = \"fixed\"\nmean_ms = 20000.0\n[[hsm.simulated.key_latency]]\nid = \"health\"\nlatency_ms = 1",
        "",
    );
    let proxy = setup.start();
    let client = proxy.client();
    let mut sender = client.h2_connection().await;
    let body = serde_json::to_vec(&encrypt_body(b"too slow", None, false)).unwrap();
    let mut signing = client.signing.clone();
    signing.time = std::time::SystemTime::now();
    let mut request = client.signed("POST", &key_path("foo", "encrypt"), &body, &signing);
    request.headers_mut().remove("host");
    let in_flight = tokio::spawn(async move { sender.send_request(request).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.scrape().await.value("xks_in_flight", &[]) < 1.0 {
        assert!(Instant::now() < deadline, "the request never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let signalled = Instant::now();
    proxy.signal_term();
    let status = tokio::task::spawn_blocking(move || proxy.wait())
        .await
        .unwrap();
    let took = signalled.elapsed();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        took >= Duration::from_secs(2),
        "exited before the grace: {took:?}"
    );
    // Before, dropping the HSM pool waited 2 s more for the call still running.
    assert!(
        took < Duration::from_millis(3500),
        "the grace did not bound the exit: {took:?}"
    );
    assert!(
        in_flight.await.unwrap().is_err(),
        "the request still running when the grace ended was answered"
    );
}

/// GetHealthStatus and readiness follow the health-check key's real round trip:
/// fast → ACTIVE, slow → DEGRADED, hung → UNAVAILABLE (and not ready).
#[tokio::test]
async fn health_status_follows_the_health_check() {
    for (latency_ms, expected, ready) in [
        (1, "ACTIVE", 200),
        (70, "DEGRADED", 200),
        (60_000, "UNAVAILABLE", 503),
    ] {
        let setup = Setup::new();
        setup.simulated(
            "request_deadline_ms = 100",
            &format!(
                "sessions = 2\ncall_timeout_ms = 100\nhealth_check_key = \"health\"\n[hsm.simulated]\ndistribution = \"fixed\"\nmean_ms = 1.0\n[[hsm.simulated.key_latency]]\nid = \"health\"\nlatency_ms = {latency_ms}"
            ),
            "",
        );
        let proxy = setup.start();
        let client = proxy.client();
        let started = Instant::now();
        let reply = client
            .post(
                Version::Http1,
                &health_path(),
                &json!({"requestMetadata": {"kmsRequestId": "r-1", "kmsOperation": "KmsHealthCheck"}}),
            )
            .await;
        // Cached: answered without waiting for the (possibly hung) HSM.
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        assert_eq!(
            reply.body["ekmFleetDetails"][0]["healthStatus"], expected,
            "health key latency {latency_ms} ms"
        );
        assert_eq!(proxy.admin_get("/readyz").await.0, ready);
        assert_eq!(proxy.admin_get("/livez").await.0, 200);
        let metrics = proxy.scrape().await;
        assert_eq!(
            metrics.value("xks_ekm_health", &[("status", expected)]),
            1.0
        );
    }
}
