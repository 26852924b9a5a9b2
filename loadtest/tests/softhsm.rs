//! Against a real SoftHSM2 token made by the quickstart: `hsm` at 1 and 2 sessions,
//! and `run --env test-client.env` against a proxy on that token.
//!
//! One test only: the quickstart sets SOFTHSM2_CONF for this process, which must happen
//! before any other thread could read the environment.

#![allow(clippy::unwrap_used)]

mod common;

use common::{loadtest, loadtest_ok, Proxy};
use xks_loadtest::histogram::decode_histogram;
use xks_loadtest::report::Report;

#[test]
fn hsm_baseline_and_run_on_a_quickstart_token() {
    let dir = tempfile::tempdir().unwrap();
    let prepared = xks_proxy::quickstart::prepare(dir.path(), "127.0.0.1:0".parse().unwrap(), None)
        .expect("quickstart (is softhsm2 installed? run scripts/setup.sh)");
    let path = |name: &str| prepared.dir.join(name).display().to_string();

    // Raw PKCS#11, reading module, token, PIN and SOFTHSM2_CONF from config.toml.
    loadtest_ok(&[
        "hsm",
        "--quiet",
        "--config",
        &path("config.toml"),
        "--sessions",
        "1,2",
        "--duration",
        "0.5",
        "--warmup",
        "0.1",
        "--mix",
        "encrypt=3,decrypt=1",
        "--report",
        &path("hsm.json"),
    ]);
    let report = Report::read(prepared.dir.join("hsm.json").as_path()).unwrap();
    assert_eq!(report.kind, "hsm");
    let sessions: Vec<usize> = report.steps.iter().map(|s| s.sessions.unwrap()).collect();
    assert_eq!(sessions, [1, 2]);
    assert!(report.steps.iter().all(|s| s.requests > 0 && s.errors == 0));
    assert!(report.steps.iter().all(|s| s.stalls.is_some()));
    assert!(report.machines[0].stalls.is_some());
    assert!(report.operations["Encrypt"].count > 0);
    assert!(report.operations["Decrypt"].count > 0);
    assert_eq!(
        report.hsm.as_ref().unwrap()["token_label"],
        "xks-quickstart"
    );

    // The same flags, given directly, on a session copy of the key (as the proxy).
    loadtest_ok(&[
        "hsm",
        "--quiet",
        "--module",
        xks_proxy::quickstart::find_softhsm2()
            .unwrap()
            .to_str()
            .unwrap(),
        "--token-label",
        "xks-quickstart",
        "--pin-file",
        &path("hsm-pin"),
        "--key-label",
        "foo",
        "--sessions",
        "1",
        "--duration",
        "0.2",
        "--warmup",
        "0",
        "--session-copy",
        "--report",
        &path("hsm-copy.json"),
    ]);
    let copy = Report::read(prepared.dir.join("hsm-copy.json").as_path()).unwrap();
    assert!(copy.steps.iter().all(|s| s.requests > 0 && s.errors == 0));
    assert_eq!(copy.config["session_copy"], true);

    // Open loop at a fixed rate over two sessions, each copying the key (so each sees
    // the other's copy, a session object with the same label): exactly the operations
    // due in the measured window run, however long they take.
    loadtest_ok(&[
        "hsm",
        "--quiet",
        "--config",
        &path("config.toml"),
        "--sessions",
        "1,2",
        "--session-copy",
        "--rate",
        "400",
        "--duration",
        "0.5",
        "--warmup",
        "0.1",
        "--report",
        &path("hsm-rate.json"),
    ]);
    let paced = Report::read(prepared.dir.join("hsm-rate.json").as_path()).unwrap();
    assert_eq!(paced.config["mode"], "open loop");
    for step in &paced.steps {
        assert_eq!(step.offered_rps, Some(400.0));
        assert_eq!(step.errors, 0);
        // 400/s for 0.5 s: operations 40..240 of the schedule.
        assert!((199..=201).contains(&step.requests), "{step:?}");
        // Each measured call says how late its thread woke for it.
        let schedule = step.schedule.as_ref().unwrap();
        let woke = decode_histogram(&schedule.sent_histogram).unwrap();
        assert_eq!(woke.len(), step.requests, "{schedule:?}");
        assert_eq!(schedule.released_late_ms, schedule.sent_late_ms);
        assert!(schedule.late_released <= step.late);
    }
    let refused = loadtest(&["hsm", "--config", &path("config.toml"), "--rate", "0"]);
    assert!(!refused.status.success());

    // End to end through the proxy on the same token, with the quickstart's
    // test-client.env (its port is 0 here, so --endpoint overrides it).
    let proxy = Proxy::serve(&prepared.config);
    let report_path = path("run.json");
    loadtest_ok(&[
        "run",
        "--quiet",
        "--env",
        &path("test-client.env"),
        "--endpoint",
        &format!("https://localhost:{}", proxy.addr.port()),
        "--duration",
        "0.5",
        "--warmup",
        "0.1",
        "--connections",
        "2",
        "--cdiv",
        "--report",
        &report_path,
    ]);
    let run = Report::read(std::path::Path::new(&report_path)).unwrap();
    assert!(run.summary.requests > 0);
    assert_eq!(run.summary.errors, 0, "{:?}", run.error_counts);
    assert_eq!(run.verification.unwrap().failures(), 0);
    assert_eq!(run.target.unwrap().key_ids, ["foo"]);

    // proxy overhead = end to end minus raw HSM: compare reads both.
    let text = loadtest_ok(&["compare", &path("hsm.json"), &report_path]);
    assert!(text.contains("Encrypt"), "{text}");
}
