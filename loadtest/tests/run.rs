//! `run`, `search`, `merge`, `compare` and `chart` against a real proxy (software
//! backend, served in-process by the xks-proxy library). Nothing here asserts timings:
//! only counts, the report's structure and the verification results, and that
//! generators given the same `--start-at` measure the same window.

#![allow(clippy::unwrap_used)]

mod common;

use common::{loadtest, loadtest_ok, Proxy};
use xks_loadtest::report::Report;

fn with(proxy: &Proxy, args: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    all.extend(proxy.target_args());
    all
}

#[test]
fn closed_loop_run_counts_every_request_the_proxy_saw() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::software(dir.path());
    let report_path = dir.path().join("run.json");
    let before = proxy.requests_total();
    let out = loadtest_ok(&with(
        &proxy,
        &[
            "run",
            "--quiet",
            "--duration",
            "1",
            "--warmup",
            "0",
            "--connections",
            "3",
            "--cdiv",
            "--pool-size",
            "8",
            "--mix",
            "encrypt=4,decrypt=2,metadata=1,health=1",
            "--slo-p99-ms",
            "250",
            "--report",
            report_path.to_str().unwrap(),
        ],
    ));
    assert!(out.contains("overall"), "{out}");
    let report = Report::read(&report_path).unwrap();
    let s = &report.summary;
    assert!(s.requests > 0);
    assert_eq!(s.ok + s.errors, s.requests);
    assert_eq!(s.errors, 0, "{:?}", report.error_counts);
    assert_eq!(report.status_counts.values().sum::<u64>(), s.requests);
    for op in [
        "Encrypt",
        "Decrypt",
        "GetKeyMetadata",
        "GetHealthStatus",
        "overall",
    ] {
        assert!(report.operations[op].count > 0, "{op}");
    }
    let ops: u64 = report
        .operations
        .iter()
        .filter(|(n, _)| *n != "overall")
        .map(|(_, o)| o.count)
        .sum();
    assert_eq!(ops, s.requests);
    assert_eq!(
        report.series.iter().map(|p| p.count).sum::<u64>(),
        s.requests
    );
    assert!(report.slo.as_ref().is_some());
    let v = report.verification.as_ref().unwrap();
    assert_eq!(v.failures(), 0, "{v:?}");
    assert_eq!(v.pool_size, 8);
    assert!(v.encrypt_samples_checked > 0 && v.decrypts_checked > 0 && v.cdivs_checked > 0);
    assert!(report
        .target
        .as_ref()
        .unwrap()
        .endpoint
        .starts_with("https://localhost:"));
    assert!(report.machines[0].cores > 0);
    // The machine's own stalls were measured beside the load, and said.
    let stalls = report.machines[0].stalls.as_ref().unwrap();
    assert!(stalls.samples > 0, "{stalls:?}");
    assert!(out.contains("machine stalls"), "{out}");

    // The proxy answered exactly: the pre-flight check of each operation but Decrypt
    // (3), the pool (8), the measured requests (no warm-up) and the sample decrypts.
    let expected = 3 + 8 + s.requests + v.encrypt_samples_checked;
    assert_eq!(proxy.requests_total() - before, expected);
}

#[test]
fn open_loop_over_http2_sends_what_was_due() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::software(dir.path());
    let report_path = dir.path().join("open.json");
    loadtest_ok(&with(
        &proxy,
        &[
            "run",
            "--quiet",
            "--rate",
            "200",
            "--duration",
            "1",
            "--warmup",
            "0.2",
            "--http2",
            "--connections",
            "2",
            "--streams",
            "2",
            "--mix",
            "encrypt=1,decrypt=1",
            "--report",
            report_path.to_str().unwrap(),
        ],
    ));
    let report = Report::read(&report_path).unwrap();
    // 200 requests were due in the measured second; each was sent or counted unsent.
    assert_eq!(report.summary.requests + report.summary.unsent, 200);
    assert_eq!(report.summary.errors, 0, "{:?}", report.error_counts);
    assert_eq!(report.config["http"], "HTTP/2");
    assert_eq!(report.config["rate_rps"], 200.0);
    assert_eq!(report.verification.unwrap().failures(), 0);
}

#[test]
fn open_loop_reports_how_late_the_generator_sent() {
    // One connection to an HSM that takes 20 ms a call, offered a request every 5 ms:
    // the second request cannot leave before the first is answered, 15 ms after it was
    // due, while the pacer releases it on time. The report must tell the two apart.
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::simulated(dir.path(), 20);
    let report_path = dir.path().join("late.json");
    // Encrypt over one connection, with these settings, into `path`.
    let one_connection = |settings: &[&str], path: &std::path::Path| {
        let mut args = vec!["run", "--quiet", "--warmup", "0", "--connections", "1"];
        args.extend(["--pool-size", "1", "--mix", "encrypt=1"]);
        args.extend(settings);
        args.extend(["--report", path.to_str().unwrap()]);
        loadtest_ok(&with(&proxy, &args))
    };
    let out = one_connection(&["--rate", "200", "--duration", "0.5"], &report_path);
    let report = Report::read(&report_path).unwrap();
    let schedule = report.machines[0].schedule.as_ref().unwrap();
    assert!(schedule.sent_late_ms.max >= 15.0, "{schedule:?}");
    // A request is taken by a connection no earlier than the pacer released it.
    let (r, s) = (&schedule.released_late_ms, &schedule.sent_late_ms);
    for (released, sent) in [(r.p50, s.p50), (r.p99, s.p99), (r.max, s.max)] {
        assert!(released <= sent, "{schedule:?}");
    }
    assert!(report.summary.late > 0, "{:?}", report.summary);
    assert!(schedule.late_released <= report.summary.late);
    // Whatever was sent late still counts its latency from when it was due.
    assert!(report.operations["overall"].latency_ms.max >= schedule.sent_late_ms.max);
    assert!(out.contains("open-loop schedule"), "{out}");
    assert!(
        out.contains("were sent over 2 ms after their due time"),
        "{out}"
    );

    // Closed loop has no schedule to report.
    let closed_path = dir.path().join("closed.json");
    one_connection(&["--duration", "0.3"], &closed_path);
    let closed = Report::read(&closed_path).unwrap();
    assert!(closed.machines[0].schedule.is_none());
}

#[test]
fn new_connection_per_request_works() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::software(dir.path());
    let report_path = dir.path().join("new.json");
    loadtest_ok(&with(
        &proxy,
        &[
            "run",
            "--quiet",
            "--duration",
            "0.5",
            "--warmup",
            "0",
            "--connections",
            "2",
            "--new-connection-per-request",
            "--sign-content-sha256",
            "--mix",
            "encrypt=1",
            "--report",
            report_path.to_str().unwrap(),
        ],
    ));
    let report = Report::read(&report_path).unwrap();
    assert!(report.summary.requests > 0);
    assert_eq!(report.summary.errors, 0, "{:?}", report.error_counts);
}

/// `merge` of `a.json` and `b.json` in `dir` into `m.json`: its text and the report.
fn merge_a_and_b(dir: &std::path::Path) -> (String, Report) {
    let path = |name: &str| dir.join(name).display().to_string();
    let text = loadtest_ok(&[
        "merge",
        &path("a.json"),
        &path("b.json"),
        "-o",
        &path("m.json"),
    ]);
    (text, Report::read(dir.join("m.json").as_path()).unwrap())
}

#[test]
fn merge_compare_and_chart() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::software(dir.path());
    let path = |name: &str| dir.path().join(name).display().to_string();
    for name in ["a.json", "b.json"] {
        loadtest_ok(&with(
            &proxy,
            &[
                "run",
                "--quiet",
                "--duration",
                "0.5",
                "--warmup",
                "0.1",
                "--connections",
                "2",
                "--report",
                &path(name),
            ],
        ));
    }
    let (merged, m) = merge_a_and_b(dir.path());
    let a = Report::read(dir.path().join("a.json").as_path()).unwrap();
    let b = Report::read(dir.path().join("b.json").as_path()).unwrap();
    assert_eq!(m.kind, "merged");
    assert_eq!(m.summary.requests, a.summary.requests + b.summary.requests);
    assert_eq!(
        m.operations["Encrypt"].count,
        a.operations["Encrypt"].count + b.operations["Encrypt"].count
    );
    assert_eq!(m.machines.len(), 2);
    assert!(m.machines.iter().all(|machine| machine.stalls.is_some()));
    assert_eq!(
        m.series.iter().map(|p| p.count).sum::<u64>(),
        m.summary.requests
    );

    // Each generator machine's stalls stay its own, named by host.
    assert_eq!(merged.matches(": machine stalls").count(), 2, "{merged}");

    let text = loadtest_ok(&["compare", &path("a.json"), &path("b.json")]);
    for expected in ["overall", "req/s", "p99 ms", "B/A"] {
        assert!(text.contains(expected), "{expected} missing:\n{text}");
    }

    loadtest_ok(&["chart", &path("m.json"), "-o", &path("m.svg")]);
    let svg = std::fs::read_to_string(path("m.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("latency by percentile"));
    loadtest_ok(&["chart", &path("m.json"), "-o", &path("m.html")]);
    let html = std::fs::read_to_string(path("m.html")).unwrap();
    assert!(html.contains("<html") && html.contains("<svg") && html.contains("overall"));
}

#[test]
fn generators_given_the_same_start_measure_the_same_window() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::software(dir.path());
    let path = |name: &str| dir.path().join(name).display().to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let start_at = (now + 5).to_string();
    let generator = |name: &str| {
        with(
            &proxy,
            &[
                "run",
                "--quiet",
                "--duration",
                "2",
                "--warmup",
                "0.2",
                "--connections",
                "2",
                "--start-at",
                &start_at,
                "--report",
                &path(name),
            ],
        )
    };
    // The second generator is started 1.5 s after the first, as on another machine.
    let (first, second) = (generator("a.json"), generator("b.json"));
    std::thread::scope(|scope| {
        let a = scope.spawn(|| loadtest_ok(&first));
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let b = scope.spawn(|| loadtest_ok(&second));
        a.join().unwrap();
        b.join().unwrap();
    });
    let (merged, m) = merge_a_and_b(dir.path());
    let earliest = (now + 5) * 1000 + 200;
    for name in ["a.json", "b.json"] {
        let report = Report::read(dir.path().join(name).as_path()).unwrap();
        let window = report.window_start_unix_ms.unwrap();
        assert!(
            window >= earliest,
            "{name} measured from {window}, before {earliest}"
        );
        assert_eq!(report.config["start_at_unix"], (now + 5) as f64);
    }
    let together = m.together_s.unwrap();
    // Without waiting for --start-at the windows would share 0.5 of their 2 s.
    assert!(
        together > 1.0,
        "together {together} s of {} s",
        m.duration_s
    );
    assert!(
        merged.contains("the 2 generators ran together for"),
        "{merged}"
    );
}

#[test]
fn a_start_time_in_the_past_or_a_day_ahead_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::software(dir.path());
    for (at, says) in [("100", "in the past"), ("1e12", "more than a day ahead")] {
        let out = loadtest(&with(
            &proxy,
            &["run", "--quiet", "--duration", "0.2", "--start-at", at],
        ));
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{at}: {stderr}");
    }
}

#[test]
fn search_reports_the_curve() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::software(dir.path());
    let report_path = dir.path().join("search.json");
    let out = loadtest_ok(&with(
        &proxy,
        &[
            "search",
            "--quiet",
            "--start",
            "50",
            "--factor",
            "2",
            "--max",
            "100",
            "--step-duration",
            "0.5",
            "--step-warmup",
            "0.1",
            "--connections",
            "4",
            "--slo-p99-ms",
            "5000",
            "--slo-error-pct",
            "100",
            "--report",
            report_path.to_str().unwrap(),
        ],
    ));
    assert!(out.contains("highest rate meeting"), "{out}");
    let report = Report::read(&report_path).unwrap();
    assert_eq!(report.kind, "search");
    let offered: Vec<f64> = report
        .steps
        .iter()
        .map(|s| s.offered_rps.unwrap())
        .collect();
    assert_eq!(offered, [50.0, 100.0]);
    assert!(report.steps.iter().all(|s| s.met_slo == Some(true)));
    assert!(report
        .steps
        .iter()
        .all(|s| s.stalls.as_ref().is_some_and(|st| st.samples > 0)));
    assert_eq!(report.max_rate_meeting_slo, Some(100.0));
    assert!(report.slo.is_some());
}

#[test]
fn refusals_are_explained_and_fail_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::software(dir.path());
    // A key the key store does not have: the pre-flight check says what the proxy said.
    let mut args = with(&proxy, &["run", "--quiet", "--duration", "0.2"]);
    args.extend(["--key-id".to_owned(), "absent".to_owned()]);
    let out = loadtest(&args);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("KeyNotFoundException"), "{stderr}");

    // A wrong secret.
    std::fs::write(
        dir.path().join("wrong"),
        "d3Jvbmcgc2VjcmV0IHdyb25nIHNlY3JldCB3cm9uZyE=",
    )
    .unwrap();
    let mut args = with(&proxy, &["run", "--quiet", "--duration", "0.2"]);
    let at = args.iter().position(|a| a == "--secret-file").unwrap();
    args[at + 1] = dir.path().join("wrong").display().to_string();
    let out = loadtest(&args);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("HTTP 401") || stderr.contains("HTTP 403"),
        "{stderr}"
    );
}

/// The value of a Lua string literal as `presign` writes them (`\"`, `\\`, `\ddd`).
fn lua_value(literal: &str) -> Vec<u8> {
    let inner = literal
        .trim()
        .strip_prefix('"')
        .unwrap()
        .strip_suffix('"')
        .unwrap();
    let mut out = Vec::new();
    let mut bytes = inner.bytes();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next().unwrap() {
            d @ b'0'..=b'9' => {
                let digits = [d, bytes.next().unwrap(), bytes.next().unwrap()];
                out.push(std::str::from_utf8(&digits).unwrap().parse().unwrap());
            }
            other => out.push(other),
        }
    }
    out
}

#[test]
fn a_presigned_wrk_script_is_accepted_and_can_be_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::software(dir.path());
    let script_path = dir.path().join("encrypt.lua");
    loadtest_ok(&with(
        &proxy,
        &[
            "presign",
            "--aad-bytes",
            "7",
            "-o",
            script_path.to_str().unwrap(),
        ],
    ));
    let script = std::fs::read_to_string(&script_path).unwrap();
    let (mut path, mut body, mut headers) = (None, None, Vec::new());
    for line in script.lines().filter(|l| !l.starts_with("--")) {
        let (left, right) = line.split_once(" = ").unwrap();
        match left {
            "wrk.method" => assert_eq!(lua_value(right), b"POST"),
            "wrk.path" => path = Some(String::from_utf8(lua_value(right)).unwrap()),
            "wrk.body" => body = Some(lua_value(right)),
            _ => {
                let name = left
                    .strip_prefix("wrk.headers[\"")
                    .and_then(|n| n.strip_suffix("\"]"))
                    .unwrap();
                let value = String::from_utf8(lua_value(right)).unwrap();
                headers.push(format!("{name}: {value}"));
            }
        }
    }
    let (path, body) = (path.unwrap(), body.unwrap());
    assert!(path.ends_with("/keys/foo/encrypt"), "{path}");
    let request: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        request["additionalAuthenticatedData"]
            .as_str()
            .unwrap()
            .len(),
        12
    );

    // curl, not our client, sends exactly what the script says; wrk replays it, so
    // the second copy must be accepted as well.
    std::fs::write(dir.path().join("body.json"), &body).unwrap();
    let before = proxy.requests_total();
    for _ in 0..2 {
        let mut curl = std::process::Command::new("curl");
        curl.args(["-sS", "--cacert"])
            .arg(dir.path().join("ca.pem"))
            .args(["--resolve"])
            .arg(format!("localhost:{}:127.0.0.1", proxy.addr.port()))
            .args(["-H", "Expect:"]);
        for header in &headers {
            curl.args(["-H", header]);
        }
        let out = curl
            .arg("--data-binary")
            .arg(format!("@{}", dir.path().join("body.json").display()))
            .arg(format!("https://localhost:{}{path}", proxy.addr.port()))
            .output()
            .unwrap();
        let answer: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
        assert!(answer["ciphertext"].is_string(), "{answer}");
    }
    assert_eq!(proxy.requests_total() - before, 2);
}

#[test]
fn stalls_measures_the_idle_machine() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stalls.json");
    let out = loadtest_ok(&[
        "stalls",
        "--duration",
        "0.3",
        "--interval-us",
        "500",
        "--report",
        path.to_str().unwrap(),
    ]);
    assert!(
        out.contains("machine stalls (a thread sleeping 500 µs"),
        "{out}"
    );
    let stalls: xks_loadtest::stalls::Stalls =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(stalls.interval_us, 500);
    // At most one wake-up per interval in 0.3 s.
    assert!(stalls.samples > 0 && stalls.samples <= 600, "{stalls:?}");
    assert!(stalls.late_ms.max >= stalls.late_ms.p50);

    let refused = loadtest(&["stalls", "--duration", "0"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--duration must be above 0"));
}
