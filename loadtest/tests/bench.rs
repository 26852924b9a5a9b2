//! `bench --quick` against a real proxy on the software backend (served in-process),
//! pointed at it by a test-client.env; then the regression gate of `compare` on the
//! report: against itself it passes, against a doctored slower copy it fails and names
//! each regressed figure. Nothing here asserts timings.

#![allow(clippy::unwrap_used)]

mod common;

use common::{loadtest, loadtest_ok, Proxy, ACCESS_KEY_ID, PREFIX};
use xks_loadtest::bench::{BenchReport, METHOD, SCHEMA};

#[test]
fn quick_bench_on_the_software_backend_and_the_gate_on_its_report() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::software(dir.path());
    let env = dir.path().join("test-client.env");
    std::fs::write(
        &env,
        format!(
            "XKS_PROXY_HOST=\"localhost:{}\"\nURI_PREFIX=\"{PREFIX}\"\nSIGV4_ACCESS_KEY_ID=\"{ACCESS_KEY_ID}\"\nSIGV4_SECRET_ACCESS_KEY=\"{}\"\nKEY_ID=\"foo\"\nCACERT=\"{}\"\n",
            proxy.addr.port(),
            std::fs::read_to_string(dir.path().join("sigv4-secret")).unwrap(),
            dir.path().join("ca.pem").display()
        ),
    )
    .unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    let before = proxy.requests_total();
    let summary = loadtest_ok(&[
        "bench",
        "--quick",
        "--parts",
        "proxy_software",
        "--software-env",
        &path("test-client.env"),
        "--machine-note",
        "a test",
        "--output",
        &path("bench.json"),
    ]);
    assert!(summary.contains("## proxy_software"), "{summary}");
    assert!(summary.contains("## The proxy's own ceiling"), "{summary}");
    let md = std::fs::read_to_string(dir.path().join("bench.md")).unwrap();
    assert_eq!(md, summary);

    let report = BenchReport::read(&dir.path().join("bench.json")).unwrap();
    assert_eq!(report.schema, SCHEMA);
    assert_eq!(report.method, METHOD);
    assert_eq!(report.machine.note.as_deref(), Some("a test"));
    assert!(report.machine.idle_stalls.is_some());
    assert_eq!(
        report.parts.keys().collect::<Vec<_>>(),
        ["proxy_software"],
        "only the part asked for"
    );
    let part = &report.parts["proxy_software"];
    let ids: Vec<&str> = part.cells.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "small/closed/c1",
            "small/closed/c4",
            "small/open/r200",
            "large/closed/c1",
            "large/closed/c4",
            "large/open/r200"
        ]
    );
    let mut measured = 0;
    for cell in &part.cells {
        assert!(cell.requests > 0, "{cell:?}");
        assert_eq!(cell.errors, 0, "{cell:?}");
        assert_eq!(cell.verification_failures, 0, "{cell:?}");
        assert_eq!(cell.repetitions.len(), report.plan.repetitions);
        assert!(cell.throughput_min_rps <= cell.throughput_rps);
        assert!(cell.throughput_rps <= cell.throughput_max_rps);
        measured += cell.requests;
    }
    // Warm-ups and the Decrypt pool come on top of the measured requests.
    assert!(proxy.requests_total() - before >= measured);
    assert!(report.overhead.is_empty(), "no hsm parts ran");
    assert_eq!(report.software_ceiling.len(), 2);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("bench.json")).unwrap()).unwrap();
    assert!(BenchReport::is_bench(&json));

    // Against itself the gate passes.
    let same = loadtest_ok(&[
        "compare",
        &path("bench.json"),
        &path("bench.json"),
        "--fail-above",
        "5",
        "--metric",
        "p99",
        "--metric",
        "throughput",
    ]);
    assert!(same.contains("gate: passed: 12 figures"), "{same}");

    // A copy whose small/closed/c4 cell is twice as slow at half the throughput fails,
    // naming both figures; the others pass.
    let mut slower = json.clone();
    let cell = slower["parts"]["proxy_software"]["cells"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|c| c["id"] == "small/closed/c4")
        .unwrap();
    let p99 = cell["latency_ms"]["p99"].as_f64().unwrap();
    cell["latency_ms"]["p99"] = (p99 * 2.0 + 1.0).into();
    let rps = cell["throughput_rps"].as_f64().unwrap();
    cell["throughput_rps"] = (rps / 2.0).into();
    std::fs::write(
        dir.path().join("slower.json"),
        serde_json::to_vec(&slower).unwrap(),
    )
    .unwrap();
    let out = loadtest(&[
        "compare",
        &path("bench.json"),
        &path("slower.json"),
        "--fail-above",
        "10",
        "--metric",
        "p99",
        "--metric",
        "throughput",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("REGRESSION proxy_software small/closed/c4 p99: "),
        "{text}"
    );
    assert!(
        text.contains("REGRESSION proxy_software small/closed/c4 throughput: "),
        "{text}"
    );
    assert_eq!(text.matches("REGRESSION").count(), 2, "{text}");
    assert!(text.contains("gate: FAILED: 2 of 12 figures"), "{text}");
    // Held only on p50, which the doctor left alone, the same copy passes; and the
    // better copy (B faster than A) passes the other way round only if not slower.
    loadtest_ok(&[
        "compare",
        &path("bench.json"),
        &path("slower.json"),
        "--fail-above",
        "10",
        "--metric",
        "p50",
    ]);
    let reverse = loadtest(&[
        "compare",
        &path("slower.json"),
        &path("bench.json"),
        "--fail-above",
        "10",
    ]);
    assert!(
        reverse.status.success(),
        "{}",
        String::from_utf8_lossy(&reverse.stdout)
    );

    // The gate on `run` reports: the overall figures.
    let mut run = vec![
        "run".to_owned(),
        "--quiet".into(),
        "--duration".into(),
        "0.5".into(),
        "--warmup".into(),
        "0".into(),
        "--connections".into(),
        "2".into(),
        "--report".into(),
        path("run.json"),
    ];
    run.extend(proxy.target_args());
    loadtest_ok(&run);
    let mut doctored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("run.json")).unwrap()).unwrap();
    let rps = doctored["operations"]["overall"]["throughput_rps"]
        .as_f64()
        .unwrap();
    doctored["operations"]["overall"]["throughput_rps"] = (rps * 0.8).into();
    std::fs::write(
        dir.path().join("run-slower.json"),
        serde_json::to_vec(&doctored).unwrap(),
    )
    .unwrap();
    let out = loadtest(&[
        "compare",
        &path("run.json"),
        &path("run-slower.json"),
        "--fail-above",
        "15",
        "--metric",
        "throughput",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("REGRESSION overall throughput: ") && text.contains("(20.0% lower"),
        "{text}"
    );
    loadtest_ok(&[
        "compare",
        &path("run.json"),
        &path("run-slower.json"),
        "--fail-above",
        "25",
        "--metric",
        "throughput",
    ]);
    // A bench report is not compared with a run report.
    assert!(
        !loadtest(&["compare", &path("bench.json"), &path("run.json")])
            .status
            .success()
    );
}

/// The committed baselines stay readable by this xks-loadtest, follow the current
/// method, hold all three parts, and their summaries are what `bench` writes for them.
#[test]
fn committed_baselines_parse_and_match_their_summaries() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../perf/baselines");
    let mut found = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        found += 1;
        let report = BenchReport::read(&path).unwrap();
        assert_eq!(report.method, METHOD, "{}", path.display());
        assert_eq!(
            report.parts.keys().collect::<Vec<_>>(),
            ["hsm", "proxy_hsm", "proxy_software"],
            "{}",
            path.display()
        );
        assert!(!report.overhead.is_empty() && !report.software_ceiling.is_empty());
        assert!(report.machine.note.is_some(), "say what the machine was");
        let md = std::fs::read_to_string(path.with_extension("md")).unwrap();
        assert_eq!(
            md,
            xks_loadtest::bench::summary(&report),
            "{} is not the summary of its report",
            path.with_extension("md").display()
        );
    }
    assert!(found > 0, "no baseline in {}", dir.display());
}
