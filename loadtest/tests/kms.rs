//! `run --kms` and `plan` against a real proxy on the simulated HSM (served in-process
//! by the xks-proxy library). What is injected is a per-key service time or a pool too
//! small for the load; what is asserted is how the calls were counted (first try, after
//! the retry, failed), never how long anything took.

#![allow(clippy::unwrap_used)]

mod common;

use common::{loadtest_ok, Proxy};
use xks_loadtest::kms::View;
use xks_loadtest::report::Report;

fn with(proxy: &Proxy, args: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    all.extend(proxy.target_args());
    all
}

/// Every logical call is counted once, and every attempt beyond the first is a retry.
fn check_accounting(report: &Report) -> &View {
    let kms = report.kms.as_ref().expect("--kms reports KMS's view");
    assert_eq!(kms.first_try + kms.after_retry + kms.failed, kms.calls);
    assert_eq!(report.summary.requests, kms.calls + kms.retries, "{kms:?}");
    let attempts: u64 = kms.minutes.iter().map(|m| m.attempts).sum();
    assert_eq!(attempts, report.summary.requests);
    assert_eq!(kms.minutes.iter().map(|m| m.calls).sum::<u64>(), kms.calls);
    kms
}

#[test]
fn calls_to_a_key_slower_than_250_ms_fail_after_one_retry() {
    let dir = tempfile::tempdir().unwrap();
    // `bar` answers after 400 ms (the proxy's deadline raised past KMS's 250 ms, so
    // KMS's own timeout is what ends the attempt); `foo` at once.
    let proxy = Proxy::with_sections(
        dir.path(),
        "request_deadline_ms = 2000",
        r#"backend = "simulated"
sessions = 64
call_timeout_ms = 2000
[hsm.simulated]
distribution = "fixed"
mean_ms = 0
[[hsm.simulated.key_latency]]
id = "bar"
latency_ms = 400"#,
    );
    let report_path = dir.path().join("kms.json");
    let out = loadtest_ok(&with(
        &proxy,
        &[
            "run",
            "--quiet",
            "--kms",
            "--kms-health-interval",
            "0",
            "--rate",
            "40",
            "--duration",
            "3",
            "--warmup",
            "0",
            "--connections",
            "32",
            "--mix",
            "encrypt=1,decrypt=1",
            "--pool-size",
            "2",
            "--key-id",
            "bar",
            "--report",
            report_path.to_str().unwrap(),
        ],
    ));
    assert!(out.contains("what KMS would have seen"), "{out}");
    let report = Report::read(&report_path).unwrap();
    let kms = check_accounting(&report);
    // Every call went to foo or bar at random: bar's time out twice and fail, foo's
    // are answered on the first try. (Nothing here depends on foo's calls staying
    // under 250 ms on a loaded machine: one that did not is retried and counted the
    // same way.)
    assert!(kms.failed > 0 && kms.first_try > 0, "{kms:?}");
    assert_eq!(kms.retries, kms.failed + kms.after_retry, "{kms:?}");
    assert!(
        (20.0..80.0).contains(&kms.failed_pct),
        "about half the calls go to bar: {kms:?}"
    );
    // Every retry followed a timeout, and every failed call timed out twice.
    assert_eq!(
        report.error_counts.get("transport:timeout"),
        Some(&(kms.retries + kms.failed)),
        "{:?}",
        report.error_counts
    );
    assert_eq!(report.error_counts.len(), 1, "{:?}", report.error_counts);
    assert!(kms.latency_ms.max >= 500.0, "two 250 ms attempts: {kms:?}");
    assert!(kms.alarms.retryable_errors_fired, "{kms:?}");
}

#[test]
fn a_proxy_shedding_with_429_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    // One session and no queue: whatever arrives while a call is in the HSM is shed
    // with 429 ThrottlingException, which KMS retries.
    let proxy = Proxy::with_sections(
        dir.path(),
        "",
        r#"backend = "simulated"
sessions = 1
queue_depth = 1
[hsm.simulated]
distribution = "fixed"
mean_ms = 20"#,
    );
    let report_path = dir.path().join("kms.json");
    loadtest_ok(&with(
        &proxy,
        &[
            "run",
            "--quiet",
            "--kms",
            "--kms-health-interval",
            "0",
            "--kms-new-connections",
            "0",
            "--rate",
            "200",
            "--duration",
            "2",
            "--warmup",
            "0",
            "--connections",
            "16",
            "--mix",
            "encrypt=1",
            "--report",
            report_path.to_str().unwrap(),
        ],
    ));
    let report = Report::read(&report_path).unwrap();
    let kms = check_accounting(&report);
    let throttled = report
        .error_counts
        .get("ThrottlingException")
        .copied()
        .unwrap_or(0);
    assert!(throttled > 0, "{:?}", report.error_counts);
    assert!(kms.retries > 0, "{kms:?}");
    // Each retry follows a shed (or timed-out) first attempt; a retry shed again fails
    // the call.
    assert!(
        kms.retries
            <= throttled
                + report
                    .error_counts
                    .get("transport:timeout")
                    .copied()
                    .unwrap_or(0)
    );
    assert!(kms.failed <= kms.retries);
    assert_eq!(kms.after_retry + kms.failed, kms.retries, "{kms:?}");
}

#[test]
fn health_checks_go_beside_the_load() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::software(dir.path());
    let report_path = dir.path().join("kms.json");
    loadtest_ok(&with(
        &proxy,
        &[
            "run",
            "--quiet",
            "--kms",
            "--kms-health-interval",
            "0.5",
            "--rate",
            "20",
            "--duration",
            "2",
            "--warmup",
            "0",
            "--connections",
            "4",
            "--report",
            report_path.to_str().unwrap(),
        ],
    ));
    let report = Report::read(&report_path).unwrap();
    let kms = check_accounting(&report);
    // At 0, 0.5, 1 and 1.5 s into the window.
    assert_eq!(kms.health_checks, 4, "{kms:?}");
    assert_eq!(report.operations["GetHealthStatus"].count, 4);
    assert_eq!(report.summary.unsent, 0);
    assert_eq!(
        report.config["mix"],
        "encrypt=50,decrypt=49,metadata=1,health=0"
    );
    assert_eq!(report.config["bodies"]["aad_bytes"], 1024);
    assert_eq!(report.config["kms"]["timeout_ms"], 250);
}

#[test]
fn plan_writes_a_plan_in_kms_terms() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::with_sections(
        dir.path(),
        "",
        r#"backend = "simulated"
sessions = 4
[hsm.simulated]
distribution = "fixed"
mean_ms = 1"#,
    );
    let md = dir.path().join("plan.md");
    let html = dir.path().join("plan.html");
    let json = dir.path().join("plan.json");
    let metrics = format!("http://{}/metrics", proxy.admin);
    let pid = std::process::id().to_string();
    loadtest_ok(&with(
        &proxy,
        &[
            "plan",
            "--quiet",
            "--start",
            "10",
            "--factor",
            "2",
            "--max",
            "40",
            "--step-duration",
            "0.5",
            "--step-warmup",
            "0",
            "--sweep-connections",
            "2,8",
            "--kms-health-interval",
            "0",
            "--objective-p99-ms",
            "5000",
            // Not a test of the machine's speed: every step with answers meets it.
            "--objective-failed-pct",
            "100",
            "--metrics-url",
            &metrics,
            "--proxy-pid",
            &pid,
            "--target-tps",
            "5400",
            "--key-stores",
            "3",
            "-o",
            md.to_str().unwrap(),
            "--html",
            html.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
        ],
    ));
    let text = std::fs::read_to_string(&md).unwrap();
    for section in [
        "# Capacity plan for",
        "## Objective",
        "## Results per setting",
        "### connections=2",
        "### connections=8",
        "## Sustainable rate and knee",
        "## What saturates first",
        "## For the target",
        "## KMS quota",
    ] {
        assert!(text.contains(section), "{section}:\n{text}");
    }
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let settings = plan["settings"].as_array().unwrap();
    assert_eq!(settings.len(), 2);
    // The pool's size came from /metrics.
    assert_eq!(settings[0]["sessions"], 4.0);
    let best = settings
        .iter()
        .filter_map(|s| s["sustainable_rps"].as_f64())
        .fold(0.0, f64::max);
    assert!(best >= 10.0, "{plan}");
    let replicas = xks_loadtest::plan::replicas(5400.0, best * 0.7);
    assert!(replicas >= 2);
    assert!(
        text.contains(&format!("proxy replicas: **{replicas}**")),
        "{replicas}:\n{text}"
    );
    assert!(text.contains("within the default quota"), "{text}");
    assert!(std::fs::read_to_string(&html).unwrap().contains("<svg"));
}
