//! A log reader that stops reading (a stalled stderr pipe) on a real proxy: probes and
//! metrics still answer, new requests are refused at once with a clear error instead
//! of hanging, readiness says why, junk requests do not flood the log, and once the
//! reader resumes every admitted request's audit line is there and service resumes.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// An Encrypt body with its own kmsRequestId.
fn encrypt_with_id(id: &str) -> Value {
    let mut body = encrypt_body(b"logged", None, false);
    body["requestMetadata"]["kmsRequestId"] = Value::String(id.to_owned());
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_log_reader_sheds_new_work_and_loses_no_audit_line() {
    let setup = Setup::new();
    setup.edit_config(
        "request_deadline_ms = 100",
        "request_deadline_ms = 100\nlog_buffer_bytes = 65536",
    );
    let gate = LogGate::default();
    let proxy = Proxy::start_gated(setup, &[], gate.clone());
    let client = proxy.client();
    let path = key_path("foo", "encrypt");
    assert_eq!(
        client
            .post(Version::Http1, &path, &encrypt_with_id("warm-up"))
            .await
            .status,
        200
    );

    // The reader stops. Signed requests and junk keep coming until the proxy refuses.
    gate.set_open(false);
    let mut sender = client.h2_connection().await;
    let mut served = BTreeSet::new();
    let mut refused = None;
    for i in 0..5000 {
        for _ in 0..3 {
            let junk = client
                .post(Version::Http1, "/no/such/path", &Value::Null)
                .await;
            // 404, or 429 once the proxy refuses everything new.
            assert!(matches!(junk.status, 404 | 429), "{:?}", junk.body);
        }
        let id = format!("audited-{i}");
        let reply = tokio::time::timeout(
            Duration::from_secs(5),
            client.post_on(&mut sender, &path, &encrypt_with_id(&id)),
        )
        .await
        .expect("a request hung on the stalled log");
        match reply.status {
            200 => {
                served.insert(id);
            }
            _ => {
                refused = Some(reply);
                break;
            }
        }
    }
    let refused = refused.expect("the proxy never refused work while its log was stalled");
    assert_eq!(refused.status, 429, "{:?}", refused.body);
    assert_eq!(refused.error_name(), "ThrottlingException");
    assert!(refused.body["errorMessage"]
        .as_str()
        .unwrap()
        .contains("audit log"));
    assert!(served.len() > 20, "only {} served before", served.len());

    // Probes and metrics answer at once while the reader is still stalled.
    let started = Instant::now();
    let (live, _) = tokio::time::timeout(Duration::from_secs(2), proxy.admin_get("/livez"))
        .await
        .expect("/livez waited on the log");
    assert_eq!(live, 200);
    let (ready, reason) = tokio::time::timeout(Duration::from_secs(2), proxy.admin_get("/readyz"))
        .await
        .expect("/readyz waited on the log");
    assert_eq!(ready, 503);
    assert!(reason.contains("audit log"), "{reason}");
    let metrics = tokio::time::timeout(Duration::from_secs(2), proxy.scrape())
        .await
        .expect("/metrics waited on the log");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(metrics.value("xks_shed_total", &[("reason", "log_backlog")]) >= 1.0);
    assert!(
        metrics.value("xks_log_lines_suppressed_total", &[("kind", "routing")]) >= 1.0,
        "{}",
        metrics.text
    );

    // The reader resumes: every admitted request's audit line is written, and the
    // proxy serves again.
    gate.set_open(true);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let logs = proxy.logs();
        let missing: Vec<_> = served
            .iter()
            .filter(|id| !logs.contains(&format!("kms_request_id=\"{id}\" ")))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} audit lines lost, e.g. {:?}",
            missing.len(),
            missing.first()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = client
            .post(Version::Http1, &path, &encrypt_with_id("after"))
            .await;
        if reply.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not served again: {:?}",
            reply.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(proxy.admin_get("/readyz").await.0, 200);
    // The junk left out is summed up by the next line of its kind written after its
    // one-second window.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let junk = client
        .post(Version::Http1, "/no/such/path", &Value::Null)
        .await;
    assert_eq!(junk.status, 404);
    assert!(proxy.logged("similar lines for unauthenticated rejects were suppressed"));
}
