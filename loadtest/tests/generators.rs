//! Several generators, as a Kubernetes Job runs them (docs/capacity.md, "Load from
//! several machines on Kubernetes"), against one proxy (software backend, in-process):
//! three `xks-loadtest run` processes given one `--start-at`, their reports merged, and
//! the merge checked against the generators' own histograms added here by hand. And the
//! `--metrics-listen` endpoint, scraped during and after a run, against the run's report.
//! Nothing here asserts timings.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead as _, Read as _, Write as _};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{loadtest_ok, Proxy, BIN};
use xks_loadtest::histogram::{decode_histogram, new_histogram, Percentiles};
use xks_loadtest::report::Report;

fn with(proxy: &Proxy, args: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    all.extend(proxy.target_args());
    all
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn three_generators_with_one_start_merge_into_one_exact_report() {
    const GENERATORS: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::software(dir.path());
    let path = |name: &str| dir.path().join(name).display().to_string();
    // Time for three processes to start and connect on a loaded machine.
    let start_at = (unix_now() + 8).to_string();
    let names: Vec<String> = (0..GENERATORS)
        .map(|i| format!("generator-{i}.json"))
        .collect();
    std::thread::scope(|scope| {
        let running: Vec<_> = names
            .iter()
            .map(|name| {
                let args = with(
                    &proxy,
                    &[
                        "run",
                        "--quiet",
                        "--duration",
                        "1.5",
                        "--warmup",
                        "0.2",
                        "--connections",
                        "2",
                        "--mix",
                        "encrypt=6,decrypt=2,metadata=1,health=1",
                        "--start-at",
                        &start_at,
                        "--report",
                        &path(name),
                    ],
                );
                scope.spawn(move || loadtest_ok(&args))
            })
            .collect();
        for generator in running {
            generator.join().unwrap();
        }
    });
    let mut merge_args = vec!["merge".to_owned()];
    merge_args.extend(names.iter().map(|n| path(n)));
    merge_args.extend(["-o".to_owned(), path("merged.json")]);
    let text = loadtest_ok(&merge_args);
    assert!(
        text.contains(&format!("the {GENERATORS} generators ran together for")),
        "{text}"
    );

    let reports: Vec<Report> = names
        .iter()
        .map(|n| Report::read(dir.path().join(n).as_path()).unwrap())
        .collect();
    let merged = Report::read(dir.path().join("merged.json").as_path()).unwrap();
    assert_eq!(merged.kind, "merged");
    assert_eq!(merged.machines.len(), GENERATORS);
    // Every request each generator counted, and nothing else.
    assert_eq!(
        merged.summary.requests,
        reports.iter().map(|r| r.summary.requests).sum::<u64>()
    );
    assert_eq!(
        merged.summary.errors,
        reports.iter().map(|r| r.summary.errors).sum::<u64>()
    );
    for report in &reports {
        assert!(report.summary.requests > 0);
        assert_eq!(report.summary.errors, 0, "{:?}", report.error_counts);
    }
    // Per operation (and overall): the counts add, and the percentiles are those of
    // the generators' histograms added by hand.
    for (name, op) in &merged.operations {
        let mut by_hand = new_histogram();
        let mut count = 0;
        for report in &reports {
            if let Some(theirs) = report.operations.get(name) {
                by_hand
                    .add(decode_histogram(&theirs.histogram).unwrap())
                    .unwrap();
                count += theirs.count;
            }
        }
        assert_eq!(op.count, count, "{name}");
        assert_eq!(by_hand.len(), count, "{name}");
        // The merged histogram is exactly the sum, so its percentiles are exactly
        // those of the sum; the report's figures are those, as far as JSON's decimal
        // text carries an f64 (serde_json may parse it one ulp off).
        let back = decode_histogram(&op.histogram).unwrap();
        assert_eq!(back, by_hand, "{name}: the merged histogram itself");
        let expected = Percentiles::of(&by_hand);
        assert_eq!(Percentiles::of(&back), expected, "{name}");
        let reported = op.latency_ms;
        for (got, want) in [
            (reported.p50, expected.p50),
            (reported.p90, expected.p90),
            (reported.p99, expected.p99),
            (reported.p99_9, expected.p99_9),
            (reported.p99_99, expected.p99_99),
            (reported.max, expected.max),
            (reported.mean, expected.mean),
        ] {
            assert!(
                (got - want).abs() <= want.abs() * 1e-12,
                "{name}: reported {reported:?}, by hand {expected:?}"
            );
        }
    }
    for name in [
        "overall",
        "Encrypt",
        "Decrypt",
        "GetKeyMetadata",
        "GetHealthStatus",
    ] {
        assert!(
            merged.operations.get(name).is_some_and(|op| op.count > 0),
            "{name} missing or empty: {:?}",
            merged.operations.keys()
        );
    }
    // Each generator measured from the agreed start on.
    let earliest = start_at.parse::<u64>().unwrap() * 1000 + 200;
    for report in &reports {
        assert!(report.window_start_unix_ms.unwrap() >= earliest);
    }
}

/// `GET /metrics` on `addr`: the body.
fn scrape(addr: SocketAddr) -> String {
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.to_owned()
}

/// The sum of the samples of `name` whose labels include every one of `labels`.
fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().unwrap())
        })
        .sum()
}

/// Waits until `path` holds a whole report.
fn wait_for_report(path: &Path, deadline: Instant) -> Report {
    loop {
        if let Ok(report) = Report::read(path) {
            return report;
        }
        assert!(Instant::now() < deadline, "no report at {}", path.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_metrics_endpoint_counts_what_the_report_counts() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::software(dir.path());
    let report_path = dir.path().join("run.json");
    let mut child = Command::new(BIN)
        .args(with(
            &proxy,
            &[
                "run",
                "--quiet",
                "--rate",
                "200",
                "--duration",
                "3",
                "--warmup",
                "0.5",
                "--connections",
                "4",
                "--metrics-listen",
                "127.0.0.1:0",
                // Long enough for the scrape below; the child is killed after it.
                "--metrics-hold",
                "300",
                "--report",
                &report_path.display().to_string(),
            ],
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let addr: SocketAddr = loop {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "no metrics address"
        );
        if let Some(url) = line.trim().strip_prefix("metrics: http://") {
            break url.strip_suffix("/metrics").unwrap().parse().unwrap();
        }
    };
    // Drain the rest of stderr so the child never blocks on it.
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));

    // During the run (once the load has begun: the Decrypt pool is made first): the
    // families are there, the offered rate is the flag's.
    let deadline = Instant::now() + Duration::from_secs(60);
    let during = loop {
        let text = scrape(addr);
        // (A family shows once it has a series: wait for a first answer.)
        if sum(&text, "xks_loadtest_requests_completed_total", &[]) > 0.0 {
            break text;
        }
        assert!(Instant::now() < deadline, "no request answered:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        sum(&during, "xks_loadtest_offered_rate_rps", &[]),
        200.0,
        "{during}"
    );
    for family in [
        "# TYPE xks_loadtest_requests_sent counter",
        "# TYPE xks_loadtest_requests_completed counter",
        "# TYPE xks_loadtest_request_duration_seconds histogram",
        "# TYPE xks_loadtest_in_flight gauge",
    ] {
        assert!(during.contains(family), "{family} missing:\n{during}");
    }

    let report = wait_for_report(&report_path, Instant::now() + Duration::from_secs(120));
    let after = scrape(addr);
    let _ = child.kill();
    let _ = child.wait();

    assert!(report.summary.requests > 0);
    let measured = [("phase", "measured")];
    assert_eq!(
        sum(&after, "xks_loadtest_requests_completed_total", &measured) as u64,
        report.summary.requests,
        "{after}"
    );
    assert_eq!(
        sum(&after, "xks_loadtest_requests_sent_total", &measured) as u64,
        report.summary.requests
    );
    assert_eq!(
        sum(
            &after,
            "xks_loadtest_requests_completed_total",
            &[("phase", "measured"), ("outcome", "ok")]
        ) as u64,
        report.summary.ok
    );
    assert_eq!(sum(&after, "xks_loadtest_in_flight", &[]), 0.0);
    for (name, op) in &report.operations {
        if name == "overall" {
            continue;
        }
        let labels = [("operation", name.as_str()), ("phase", "measured")];
        assert_eq!(
            sum(&after, "xks_loadtest_requests_completed_total", &labels) as u64,
            op.count,
            "{name}"
        );
        assert_eq!(
            sum(
                &after,
                "xks_loadtest_request_duration_seconds_count",
                &labels
            ) as u64,
            op.count,
            "{name}"
        );
    }
    // The warm-up was load too, and shows, apart.
    assert!(
        sum(
            &after,
            "xks_loadtest_requests_completed_total",
            &[("phase", "warmup")]
        ) > 0.0
    );

    dashboard_selects_what_the_generator_exports(&after);
}

/// The sample names of a scrape, with the label names and values of their series.
fn exposition(text: &str) -> BTreeMap<String, Vec<BTreeMap<String, String>>> {
    let mut out: BTreeMap<String, Vec<BTreeMap<String, String>>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, _) = line.rsplit_once(' ').unwrap();
        let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
        let labels = labels
            .trim_end_matches('}')
            .split(',')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once('=').unwrap();
                (k.to_owned(), v.trim_matches('"').to_owned())
            })
            .collect();
        out.entry(name.to_owned()).or_default().push(labels);
    }
    out
}

/// Every selector of the proxy's dashboard that names a generator metric (its
/// "Load generators" row; tests/monitoring.rs leaves them to this test) selects a
/// series the generator exports: the name, each matcher's label, an equality
/// matcher's value, and each label a `by (...)` groups on.
fn dashboard_selects_what_the_generator_exports(scrape: &str) {
    use promql_parser::label::MatchOp;
    use promql_parser::parser::{self, Expr, LabelModifier};
    use promql_parser::util::{walk_expr, ExprVisitor};

    /// Selectors (name, matchers) and grouping labels of one query.
    /// A metric name and its matchers (label, an equality matcher's value).
    type Selector = (String, Vec<(String, Option<String>)>);
    struct Found(Vec<Selector>, Vec<String>);
    impl ExprVisitor for Found {
        type Error = String;
        fn pre_visit(&mut self, expr: &Expr) -> Result<bool, String> {
            let vs = match expr {
                Expr::VectorSelector(vs) => vs,
                Expr::MatrixSelector(ms) => &ms.vs,
                Expr::Aggregate(agg) => {
                    if let Some(LabelModifier::Include(labels)) = &agg.modifier {
                        self.1.extend(labels.labels.iter().cloned());
                    }
                    return Ok(true);
                }
                _ => return Ok(true),
            };
            let matchers = vs
                .matchers
                .matchers
                .iter()
                .map(|m| {
                    let value = matches!(m.op, MatchOp::Equal).then(|| m.value.clone());
                    (m.name.clone(), value)
                })
                .collect();
            self.0.push((vs.name.clone().unwrap_or_default(), matchers));
            Ok(true)
        }
    }

    let exported = exposition(scrape);
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/monitoring/xks-proxy-dashboard.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let target_labels = ["job", "instance"];
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            if !expr.contains("xks_loadtest_") {
                continue;
            }
            let promql = expr.replace("$__rate_interval", "5m");
            let mut found = Found(Vec::new(), Vec::new());
            walk_expr(&mut found, &parser::parse(&promql).unwrap()).unwrap();
            for (name, matchers) in &found.0 {
                let series = exported
                    .get(name)
                    .unwrap_or_else(|| panic!("{expr}: {name} is not exported by the generator"));
                for (label, value) in matchers {
                    if target_labels.contains(&label.as_str()) {
                        continue;
                    }
                    assert!(
                        series.iter().any(|s| s.contains_key(label)
                            && value.as_ref().map_or(true, |v| &s[label] == v)),
                        "{expr}: no {name} series with {label}={value:?}"
                    );
                }
                for label in &found.1 {
                    assert!(
                        target_labels.contains(&label.as_str())
                            || series.iter().any(|s| s.contains_key(label)),
                        "{expr}: {name} has no label {label} to group by"
                    );
                }
                checked += 1;
            }
        }
    }
    assert!(
        checked >= 4,
        "the dashboard selects {checked} generator metrics"
    );
}
