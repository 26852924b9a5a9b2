//! The operator's dashboard and alert rules (`deploy/monitoring/`) against the proxy:
//! every metric their PromQL selects is one a real proxy exports after traffic, every
//! label matcher names a label of that metric (and an equality matcher a value it
//! takes), every alert has a unit test in `alerts.test.yml` and a section in
//! `docs/runbook.md`. `promtool check rules` and `promtool test rules` run in
//! `scripts/check-monitoring.sh`.
//!
//! The PromQL is parsed with the `promql-parser` crate and its selectors are compared
//! with the sample names of the scrape, which carry their suffixes (`_total`,
//! `_bucket`, `_sum`, `_count`) as PromQL sees them: a rule selecting
//! `xks_request_duration_seconds_bucket` needs that exact series, not a family name.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use promql_parser::label::MatchOp;
use promql_parser::parser::{self, Expr, VectorSelector};
use promql_parser::util::{walk_expr, ExprVisitor};
use serde_json::{json, Value};
use yaml_rust2::{Yaml, YamlLoader};

/// Series Prometheus makes itself rather than scraping them.
const PROMETHEUS_OWN: &[&str] = &["up"];

/// The dashboard's "Load generators" row selects the load generator's metrics
/// (`xks-loadtest --metrics-listen`), not the proxy's: loadtest/tests/generators.rs
/// checks those against a generator's scrape.
const GENERATOR_PREFIX: &str = "xks_loadtest_";

/// Labels Prometheus attaches to every scraped series.
const TARGET_LABELS: &[&str] = &["job", "instance"];

fn monitoring(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/monitoring")
        .join(file)
}

fn yaml(file: &str) -> Yaml {
    let text = std::fs::read_to_string(monitoring(file)).unwrap();
    YamlLoader::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{file}: {e}"))
        .remove(0)
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(monitoring("xks-proxy-dashboard.json")).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("the dashboard is not JSON: {e}"))
}

/// One alerting rule.
struct Alert {
    name: String,
    expr: String,
    rule: Yaml,
}

fn alerts() -> Vec<Alert> {
    let rules = yaml("alerts.yml");
    let mut alerts = Vec::new();
    for group in rules["groups"].as_vec().expect("alerts.yml: groups") {
        for rule in group["rules"].as_vec().expect("alerts.yml: rules") {
            alerts.push(Alert {
                name: rule["alert"].as_str().expect("an alerting rule").to_owned(),
                expr: rule["expr"].as_str().expect("expr").to_owned(),
                rule: rule.clone(),
            });
        }
    }
    alerts
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn collect<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            collect(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    collect(&dashboard["panels"], &mut out);
    out
}

/// Grafana's interval variables replaced by durations, so that the query is PromQL;
/// `$job` and `$instance` only occur inside matcher strings and stay.
fn grafana_to_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "3h")
}

/// (where, PromQL) of every query of the dashboard: panel targets and the variables'
/// `label_values(SELECTOR, label)`.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut queries = Vec::new();
    for panel in panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {:?}: a target without expr", panel["title"]));
            queries.push((
                format!("panel {:?}", panel["title"].as_str().unwrap_or("")),
                grafana_to_promql(expr),
            ));
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        let Some(query) = variable["query"]["query"].as_str() else {
            continue;
        };
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.rsplit_once(','))
            .map(|(selector, _)| selector)
            .unwrap_or_else(|| panic!("variable {:?}: not label_values(…)", variable["name"]));
        queries.push((
            format!("variable {:?}", variable["name"].as_str().unwrap_or("")),
            inner.to_owned(),
        ));
    }
    queries
}

/// A metric selector of a query: its name and its matchers (label, the value of an
/// equality matcher).
#[derive(Debug)]
struct Selector {
    name: String,
    matchers: Vec<(String, Option<String>)>,
}

struct Selectors(Vec<Selector>);

impl Selectors {
    fn add(&mut self, vs: &VectorSelector) -> Result<(), String> {
        let name = vs
            .name
            .clone()
            .ok_or_else(|| format!("a selector without a metric name: {vs}"))?;
        let matchers = vs
            .matchers
            .matchers
            .iter()
            .filter(|m| m.name != "__name__")
            .map(|m| {
                let value = matches!(m.op, MatchOp::Equal).then(|| m.value.clone());
                (m.name.clone(), value)
            })
            .collect();
        self.0.push(Selector { name, matchers });
        Ok(())
    }
}

impl ExprVisitor for Selectors {
    type Error = String;

    fn pre_visit(&mut self, expr: &Expr) -> Result<bool, String> {
        match expr {
            Expr::VectorSelector(vs) => self.add(vs)?,
            Expr::MatrixSelector(ms) => self.add(&ms.vs)?,
            _ => {}
        }
        Ok(true)
    }
}

/// The selectors of a PromQL expression.
fn selectors(expr: &str) -> Result<Vec<Selector>, String> {
    let ast = parser::parse(expr)?;
    let mut found = Selectors(Vec::new());
    walk_expr(&mut found, &ast)?;
    if found.0.is_empty() {
        return Err("selects no metric".into());
    }
    Ok(found.0)
}

/// The scrape as PromQL sees it: sample name → the label sets of its series.
#[derive(Default)]
struct Exposition(BTreeMap<String, Vec<BTreeMap<String, String>>>);

impl Exposition {
    fn parse(text: &str) -> Self {
        let mut series = Self::default();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = &line[..end];
            let mut labels = BTreeMap::new();
            if line[end..].starts_with('{') {
                let mut rest = &line[end + 1..];
                while let Some((label, after)) = rest.split_once("=\"") {
                    let mut value = String::new();
                    let mut chars = after.char_indices();
                    let mut close = after.len();
                    while let Some((i, c)) = chars.next() {
                        match c {
                            '\\' => {
                                if let Some((_, escaped)) = chars.next() {
                                    value.push(if escaped == 'n' { '\n' } else { escaped });
                                }
                            }
                            '"' => {
                                close = i;
                                break;
                            }
                            c => value.push(c),
                        }
                    }
                    labels.insert(label.trim_start_matches(',').to_owned(), value);
                    rest = &after[(close + 1).min(after.len())..];
                    if rest.starts_with('}') {
                        break;
                    }
                }
            }
            series.0.entry(name.to_owned()).or_default().push(labels);
        }
        series
    }

    /// What is wrong with `selector` against this scrape (nothing: empty).
    fn problems(&self, at: &str, selector: &Selector) -> Vec<String> {
        if PROMETHEUS_OWN.contains(&selector.name.as_str())
            || selector.name.starts_with(GENERATOR_PREFIX)
        {
            return Vec::new();
        }
        let Some(series) = self.0.get(&selector.name) else {
            return vec![format!(
                "{at}: metric {} is not exported by the proxy",
                selector.name
            )];
        };
        let mut problems = Vec::new();
        for (label, value) in &selector.matchers {
            if TARGET_LABELS.contains(&label.as_str()) {
                continue;
            }
            let values: BTreeSet<&str> = series
                .iter()
                .filter_map(|s| s.get(label).map(String::as_str))
                .collect();
            if values.is_empty() {
                problems.push(format!("{at}: {} has no label {label:?}", selector.name));
            } else if let Some(value) = value {
                if !values.contains(value.as_str()) {
                    problems.push(format!(
                        "{at}: {}{{{label}={value:?}}} matches none of the exported values {values:?}",
                        selector.name
                    ));
                }
            }
        }
        problems
    }
}

/// Every selector of the rules and the dashboard, with where it comes from.
fn every_selector() -> Vec<(String, Selector)> {
    let mut out = Vec::new();
    for alert in alerts() {
        for s in selectors(&alert.expr).unwrap_or_else(|e| panic!("{}: {e}", alert.name)) {
            out.push((format!("alert {}", alert.name), s));
        }
    }
    for (at, expr) in dashboard_queries(&dashboard()) {
        for s in selectors(&expr).unwrap_or_else(|e| panic!("{at}: {e}\n{expr}")) {
            out.push((at.clone(), s));
        }
    }
    out
}

/// GitHub's anchor of a Markdown heading (the alert names have no spaces or marks).
fn anchor(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn every_alert_has_a_unit_test_a_severity_and_a_runbook_section() {
    let runbook =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/runbook.md"))
            .unwrap();
    let headings: BTreeSet<String> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(anchor)
        .collect();
    let tests = yaml("alerts.test.yml");
    let mut fired = BTreeSet::new();
    for test in tests["tests"].as_vec().unwrap() {
        for case in test["alert_rule_test"].as_vec().into_iter().flatten() {
            let expected = case["exp_alerts"].as_vec().map_or(0, Vec::len);
            if expected > 0 {
                fired.insert(case["alertname"].as_str().unwrap().to_owned());
            }
        }
    }
    let alerts = alerts();
    assert!(alerts.len() >= 10, "{} alerts", alerts.len());
    let mut names = BTreeSet::new();
    for alert in &alerts {
        assert!(names.insert(&alert.name), "{} twice", alert.name);
        assert!(
            fired.contains(&alert.name),
            "{}: no test in alerts.test.yml expects it to fire",
            alert.name
        );
        let severity = alert.rule["labels"]["severity"].as_str();
        assert!(
            matches!(severity, Some("critical" | "warning")),
            "{}: severity {severity:?}",
            alert.name
        );
        assert!(
            alert.rule["annotations"]["summary"].as_str().is_some(),
            "{}: no summary",
            alert.name
        );
        let url = alert.rule["annotations"]["runbook_url"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: no runbook_url", alert.name));
        let (page, section) = url
            .split_once('#')
            .unwrap_or_else(|| panic!("{}: {url} names no section", alert.name));
        assert!(page.ends_with("/docs/runbook.md"), "{}: {url}", alert.name);
        assert_eq!(section, anchor(&alert.name), "{}: {url}", alert.name);
        assert!(
            headings.contains(section),
            "{}: docs/runbook.md has no section #{section}",
            alert.name
        );
    }
}

#[test]
fn the_dashboard_is_importable_and_its_queries_are_promql() {
    let dashboard = dashboard();
    let variables: BTreeMap<&str, &Value> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v))
        .collect();
    assert_eq!(variables["datasource"]["type"], "datasource");
    assert_eq!(variables["datasource"]["query"], "prometheus");
    for name in ["job", "instance"] {
        assert_eq!(variables[name]["type"], "query", "{name}");
        assert_eq!(variables[name]["datasource"]["uid"], "${datasource}");
    }
    let mut ids = BTreeSet::new();
    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().unwrap();
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "{title}: id reused"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            // The generators are their own scrape job, chosen by $generator.
            let variables: &[&str] = if expr.contains(GENERATOR_PREFIX) {
                &["$generator"]
            } else {
                &["$job", "$instance"]
            };
            for variable in variables {
                assert!(
                    expr.contains(variable),
                    "{title}: {expr} ignores {variable}"
                );
            }
        }
    }
    let queries = dashboard_queries(&dashboard);
    for (at, expr) in &queries {
        if let Err(e) = selectors(expr) {
            panic!("{at}: {e}\n{expr}");
        }
    }
    promtool_parses(&queries);
    // The latency panel draws KMS's 250 ms budget.
    let latency = panels(&dashboard)
        .into_iter()
        .find(|p| p["title"].as_str().unwrap().starts_with("Latency p50"))
        .unwrap();
    let steps = &latency["fieldConfig"]["defaults"]["thresholds"]["steps"];
    assert!(
        steps.as_array().unwrap().iter().any(|s| s["value"] == 0.25),
        "{steps}"
    );
    assert_eq!(
        latency["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"],
        "line"
    );
}

/// Prometheus's own parser on the dashboard's queries too: as recording rules through
/// `promtool check rules`. scripts/check-monitoring.sh installs promtool and runs this
/// test again with XKS_REQUIRE_PROMTOOL=1, so that it cannot be skipped there.
fn promtool_parses(queries: &[(String, String)]) {
    let found = std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("XKS_REQUIRE_PROMTOOL").is_none(),
            "promtool is not installed"
        );
        eprintln!(
            "SKIPPED: promtool's check of the dashboard's queries (promtool is not installed; scripts/check-monitoring.sh installs it and runs this test again)"
        );
        return;
    }
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in queries.iter().enumerate() {
        // A JSON string is a YAML scalar.
        let expr = serde_json::to_string(expr).unwrap();
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {expr}\n"
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-queries.yml");
    std::fs::write(&file, &rules).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool refuses a dashboard query:\n{}{}\n{rules}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The checker itself finds a misspelt metric, a misspelt label and a value the proxy
/// never exports, against a scrape.
fn assert_checker_catches_mistakes(exposition: &Exposition) {
    for (expr, expected) in [
        (
            "rate(xks_request_total[5m])",
            "xks_request_total is not exported",
        ),
        (
            "histogram_quantile(0.99, rate(xks_request_duration_bucket[5m]))",
            "xks_request_duration_bucket is not exported",
        ),
        (
            r#"xks_requests_total{outcom="ok"}"#,
            "has no label \"outcom\"",
        ),
        (
            r#"xks_ekm_health{status="HEALTHY"}"#,
            "matches none of the exported values",
        ),
    ] {
        let problems: Vec<String> = selectors(expr)
            .unwrap()
            .iter()
            .flat_map(|s| exposition.problems("self-check", s))
            .collect();
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "{expr}: {problems:?}"
        );
    }
}

/// Scrapes until `done` holds (things counted by a background task), or fails.
async fn scrape_until(proxy: &Proxy, what: &str, done: impl Fn(&Metrics) -> bool) -> Metrics {
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = proxy.scrape().await;
        if done(&metrics) {
            return metrics;
        }
        assert!(Instant::now() < give_up, "{what}:\n{}", metrics.text);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn hup(proxy: &Proxy) {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &proxy.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn every_metric_the_rules_and_the_dashboard_use_is_exported_after_traffic() {
    let setup = Setup::new();
    // A quota to shed on, and a short limit for connections that never authenticate.
    setup.edit_config(
        "keys = [",
        "max_requests_per_second = 1\nburst = 20\nkeys = [",
    );
    setup.edit_config(
        "[server]\n",
        "[server]\nunauthenticated_timeout_seconds = 1\n",
    );
    let proxy = setup.start();

    // A reload that fails (the running configuration stays), then one that succeeds.
    let config = std::fs::read_to_string(proxy.setup.config()).unwrap();
    std::fs::write(proxy.setup.config(), format!("{config}\nnot toml [")).unwrap();
    hup(&proxy);
    scrape_until(&proxy, "the failed reload is not reported", |m| {
        m.value("xks_config_reloads_total", &[("result", "error")]) >= 1.0
            && m.value("xks_config_last_reload_successful", &[]) == 0.0
    })
    .await;
    std::fs::write(proxy.setup.config(), &config).unwrap();
    hup(&proxy);
    scrape_until(&proxy, "the successful reload is not reported", |m| {
        m.value("xks_config_reloads_total", &[("result", "ok")]) >= 1.0
            && m.value("xks_config_last_reload_successful", &[]) == 1.0
    })
    .await;

    // KMS's traffic: a health check, Encrypt and Decrypt, and errors.
    let client = Arc::new(proxy.client());
    let health = client
        .post(
            Version::Http1,
            &health_path(),
            &json!({"requestMetadata": {"kmsRequestId": "r-1", "kmsOperation": "KmsHealthCheck"}}),
        )
        .await;
    assert_eq!(health.status, 200, "{:?}", health.body);
    let encrypted = client
        .round_trip(Version::Http2, b"watched", Some(b"aad"), false)
        .await;
    let tampered = client
        .post(
            Version::Http1,
            &key_path("foo", "decrypt"),
            &decrypt_body(&encrypted.body, Some(b"other aad")),
        )
        .await;
    assert_eq!(tampered.error_name(), "InvalidCiphertextException");
    let missing = client
        .post(
            Version::Http1,
            &key_path("nope", "encrypt"),
            &encrypt_body(b"x", None, false),
        )
        .await;
    assert_eq!(missing.error_name(), "KeyNotFoundException");
    let bad = client
        .post(Version::Http1, &key_path("foo", "encrypt"), &json!({}))
        .await;
    assert_eq!(bad.error_name(), "ValidationException");

    // Past the quota's burst: 429 ThrottlingException, counted as shed. Bursts of
    // concurrent requests outrun the refill of one a second however slow the box.
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        let mut burst = tokio::task::JoinSet::new();
        for _ in 0..30 {
            let client = Arc::clone(&client);
            burst.spawn(async move {
                client
                    .post(
                        Version::Http1,
                        &key_path("foo", "encrypt"),
                        &encrypt_body(b"x", None, false),
                    )
                    .await
            });
        }
        let mut throttled = 0;
        while let Some(reply) = burst.join_next().await {
            if reply.unwrap().error_name() == "ThrottlingException" {
                throttled += 1;
            }
        }
        if throttled > 0 {
            break;
        }
        assert!(Instant::now() < give_up, "the quota shed nothing");
    }

    // A connection that never authenticates is closed by the proxy.
    let _idle = client.h2_connection().await;
    // Requests that match no route, in bursts, until the log's rate limit leaves some of
    // their lines out.
    let unrouted = "/no/such/prefix/kms/xks/v1/keys/foo/encrypt";
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        let mut burst = tokio::task::JoinSet::new();
        for _ in 0..30 {
            let client = Arc::clone(&client);
            burst.spawn(async move {
                client
                    .post(Version::Http1, unrouted, &encrypt_body(b"x", None, false))
                    .await
            });
        }
        while let Some(reply) = burst.join_next().await {
            assert_eq!(reply.unwrap().error_name(), "InvalidUriPathException");
        }
        let metrics = proxy.scrape().await;
        if metrics.value("xks_log_lines_suppressed_total", &[]) > 0.0 {
            break;
        }
        assert!(Instant::now() < give_up, "no log line was suppressed");
    }
    let metrics = scrape_until(&proxy, "the idle connection was not closed", |m| {
        m.value(
            "xks_connections_closed_total",
            &[("reason", "unauthenticated")],
        ) >= 1.0
    })
    .await;

    let exposition = Exposition::parse(&metrics.text);
    assert_checker_catches_mistakes(&exposition);
    let uses = every_selector();
    let used: BTreeSet<&str> = uses.iter().map(|(_, s)| s.name.as_str()).collect();
    assert!(used.len() >= 20, "{used:?}");
    let problems: Vec<String> = uses
        .iter()
        .flat_map(|(at, s)| exposition.problems(at, s))
        .collect();
    assert!(
        problems.is_empty(),
        "{}\n\nthe scrape:\n{}",
        problems.join("\n"),
        metrics.text
    );
}
