//! `compare --fail-above PCT`: a regression gate. Each compared figure of B is held
//! against the same figure of A (the baseline): a latency percentile regresses when B's
//! is more than PCT percent above A's, throughput when B's is more than PCT percent
//! below A's (lower is worse). Figures come in scopes: `overall` of a `run`, `search` or
//! `hsm` report, or each part and cell of a `bench` report.

use std::fmt::Write as _;

use super::{OpReport, Report};
use crate::histogram::Percentiles;

/// A figure the gate can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Metric {
    /// Operations per second (a regression is a drop).
    Throughput,
    /// Median latency.
    P50,
    /// 90th percentile.
    P90,
    /// 99th percentile.
    P99,
    /// 99.9th percentile.
    #[value(name = "p99.9")]
    P99_9,
    /// Largest latency.
    Max,
    /// Mean latency.
    Mean,
}

impl Metric {
    /// The metric's name on the command line and in the gate's lines.
    pub fn name(self) -> &'static str {
        match self {
            Self::Throughput => "throughput",
            Self::P50 => "p50",
            Self::P90 => "p90",
            Self::P99 => "p99",
            Self::P99_9 => "p99.9",
            Self::Max => "max",
            Self::Mean => "mean",
        }
    }

    /// Whether a larger value is better (throughput) or worse (latencies).
    fn higher_is_better(self) -> bool {
        self == Self::Throughput
    }

    fn unit(self) -> &'static str {
        if self.higher_is_better() {
            "ops/s"
        } else {
            "ms"
        }
    }

    /// This metric's value in `figures`.
    pub fn of(self, figures: &Figures) -> f64 {
        let p = &figures.latency_ms;
        match self {
            Self::Throughput => figures.throughput_rps,
            Self::P50 => p.p50,
            Self::P90 => p.p90,
            Self::P99 => p.p99,
            Self::P99_9 => p.p99_9,
            Self::Max => p.max,
            Self::Mean => p.mean,
        }
    }
}

/// `compare`'s gate flags.
#[derive(Debug, Clone, clap::Args)]
pub struct GateArgs {
    /// Fail (exit 1) when B is worse than A by more than this many percent on a held
    /// metric: a latency higher, throughput lower. Without it, `compare` only shows.
    #[arg(long, value_name = "PCT")]
    pub fail_above: Option<f64>,
    /// A metric the gate holds (repeat; default: p99 and throughput).
    #[arg(long = "metric", value_enum, requires = "fail_above")]
    pub metrics: Vec<Metric>,
}

impl GateArgs {
    /// The metrics to hold.
    pub fn metrics(&self) -> Vec<Metric> {
        if self.metrics.is_empty() {
            DEFAULT_METRICS.to_vec()
        } else {
            self.metrics.clone()
        }
    }
}

/// The metrics held when `--metric` is not given.
pub const DEFAULT_METRICS: [Metric; 2] = [Metric::P99, Metric::Throughput];

/// The figures of one scope of a report.
#[derive(Debug, Clone)]
pub struct Figures {
    /// Operations per second.
    pub throughput_rps: f64,
    /// Latency percentiles, ms.
    pub latency_ms: Percentiles,
}

impl From<&OpReport> for Figures {
    fn from(op: &OpReport) -> Self {
        Self {
            throughput_rps: op.throughput_rps,
            latency_ms: op.latency_ms,
        }
    }
}

/// The scopes of two `run`, `search` or `hsm` reports: their `overall` figures (the
/// operations' own are fewer requests each, and swing more from run to run).
pub fn report_scopes(a: &Report, b: &Report) -> Vec<(String, Figures, Figures)> {
    match (a.operations.get("overall"), b.operations.get("overall")) {
        (Some(x), Some(y)) => vec![("overall".to_owned(), x.into(), y.into())],
        _ => Vec::new(),
    }
}

/// One figure held against the baseline.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// Where the figure comes from (`overall`, `proxy_software small/closed/c16`).
    pub scope: String,
    /// Which figure.
    pub metric: Metric,
    /// The baseline's value (A).
    pub baseline: f64,
    /// The compared value (B).
    pub value: f64,
    /// How much worse B is, percent of A (negative: better). `None` when A is 0, so no
    /// share of it can be taken.
    pub worse_pct: Option<f64>,
    /// Whether B is worse by more than the allowed percentage.
    pub regressed: bool,
}

/// How much worse `value` is than `baseline`, percent of the baseline: for latencies
/// the rise, for throughput the drop. `None` for a baseline of 0 (or not finite).
pub fn worse_pct(metric: Metric, baseline: f64, value: f64) -> Option<f64> {
    if !(baseline.is_finite() && baseline > 0.0 && value.is_finite()) {
        return None;
    }
    let change = 100.0 * (value - baseline) / baseline;
    Some(if metric.higher_is_better() {
        -change
    } else {
        change
    })
}

/// Holds each metric of each scope present in both reports against `fail_above_pct`.
pub fn check(
    scopes: &[(String, Figures, Figures)],
    metrics: &[Metric],
    fail_above_pct: f64,
) -> Vec<Check> {
    let mut checks = Vec::new();
    for (scope, a, b) in scopes {
        for &metric in metrics {
            let (baseline, value) = (metric.of(a), metric.of(b));
            let worse = worse_pct(metric, baseline, value);
            checks.push(Check {
                scope: scope.clone(),
                metric,
                baseline,
                value,
                worse_pct: worse,
                regressed: worse.is_some_and(|w| w > fail_above_pct),
            });
        }
    }
    checks
}

/// The gate's verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// The lines to print: one per regressed figure, then a closing line.
    pub text: String,
    /// Whether the gate passed.
    pub passed: bool,
}

/// The gate's lines: each regression named, then how many figures were held. A gate
/// with nothing to hold fails: a baseline that shares no scope with the compared
/// report cannot vouch for it.
pub fn verdict(checks: &[Check], fail_above_pct: f64) -> Verdict {
    let mut text = String::new();
    let regressed: Vec<&Check> = checks.iter().filter(|c| c.regressed).collect();
    for c in &regressed {
        let direction = if c.metric.higher_is_better() {
            "lower"
        } else {
            "higher"
        };
        let _ = writeln!(
            text,
            "REGRESSION {} {}: {:.3} -> {:.3} {} ({:.1}% {direction}, allowed {fail_above_pct}%)",
            c.scope,
            c.metric.name(),
            c.baseline,
            c.value,
            c.metric.unit(),
            c.worse_pct.unwrap_or(0.0).abs(),
        );
    }
    let unheld = checks.iter().filter(|c| c.worse_pct.is_none()).count();
    if unheld > 0 {
        let _ = writeln!(
            text,
            "gate: {unheld} figures not held (the baseline's value is 0)"
        );
    }
    let held = checks.len() - unheld;
    let passed = regressed.is_empty() && held > 0;
    if held == 0 {
        let _ = writeln!(
            text,
            "gate: FAILED: no figure of the baseline could be held against the compared report"
        );
    } else if passed {
        let _ = writeln!(
            text,
            "gate: passed: {held} figures within {fail_above_pct}% of the baseline"
        );
    } else {
        let _ = writeln!(
            text,
            "gate: FAILED: {} of {held} figures worse than the baseline by more than {fail_above_pct}%",
            regressed.len()
        );
    }
    Verdict { text, passed }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(throughput_rps: f64, p99: f64) -> Figures {
        Figures {
            throughput_rps,
            latency_ms: Percentiles {
                p50: p99 / 2.0,
                p90: p99 / 1.5,
                p99,
                p99_9: p99 * 1.5,
                p99_99: p99 * 2.0,
                max: p99 * 3.0,
                mean: p99 / 2.0,
            },
        }
    }

    #[test]
    fn latency_regresses_upward_and_throughput_downward() {
        assert_eq!(
            worse_pct(Metric::P99, 2.0, 2.2).map(|w| w.round()),
            Some(10.0)
        );
        assert_eq!(
            worse_pct(Metric::P99, 2.0, 1.0).map(|w| w.round()),
            Some(-50.0)
        );
        assert_eq!(
            worse_pct(Metric::Throughput, 1000.0, 900.0).map(|w| w.round()),
            Some(10.0)
        );
        assert_eq!(
            worse_pct(Metric::Throughput, 1000.0, 1500.0).map(|w| w.round()),
            Some(-50.0)
        );
        assert_eq!(worse_pct(Metric::P99, 0.0, 1.0), None);
        assert_eq!(worse_pct(Metric::Throughput, f64::NAN, 1.0), None);
    }

    #[test]
    fn the_threshold_is_strict_and_each_regression_is_named() {
        let scopes = vec![
            (
                "same".to_owned(),
                figures(1000.0, 2.0),
                figures(1000.0, 2.0),
            ),
            // Exactly 10% worse on both: allowed at 10%.
            ("edge".to_owned(), figures(1000.0, 2.0), figures(900.0, 2.2)),
            // 20% slower, 25% less throughput.
            ("slow".to_owned(), figures(1000.0, 2.0), figures(750.0, 2.4)),
        ];
        let checks = check(&scopes, &DEFAULT_METRICS, 10.5);
        assert_eq!(checks.len(), 6);
        let regressed: Vec<(&str, Metric)> = checks
            .iter()
            .filter(|c| c.regressed)
            .map(|c| (c.scope.as_str(), c.metric))
            .collect();
        assert_eq!(
            regressed,
            [("slow", Metric::P99), ("slow", Metric::Throughput)]
        );
        let v = verdict(&checks, 10.5);
        assert!(!v.passed);
        assert!(
            v.text
                .contains("REGRESSION slow p99: 2.000 -> 2.400 ms (20.0% higher, allowed 10.5%)"),
            "{}",
            v.text
        );
        assert!(
            v.text.contains(
                "REGRESSION slow throughput: 1000.000 -> 750.000 ops/s (25.0% lower, allowed 10.5%)"
            ),
            "{}",
            v.text
        );
        assert!(v.text.contains("2 of 6 figures"), "{}", v.text);

        // A looser gate lets the same figures through; p50 alone was never checked.
        let v = verdict(&check(&scopes, &DEFAULT_METRICS, 30.0), 30.0);
        assert!(v.passed, "{}", v.text);
        assert!(!v.text.contains("REGRESSION"), "{}", v.text);
        let v = verdict(&check(&scopes, &[Metric::P50], 19.0), 19.0);
        assert!(!v.passed, "p50 rose 20%: {}", v.text);
    }

    #[test]
    fn a_gate_with_nothing_to_hold_fails() {
        let v = verdict(&check(&[], &DEFAULT_METRICS, 10.0), 10.0);
        assert!(!v.passed);
        let zero = vec![("idle".to_owned(), figures(0.0, 0.0), figures(5.0, 1.0))];
        let v = verdict(&check(&zero, &DEFAULT_METRICS, 10.0), 10.0);
        assert!(!v.passed, "{}", v.text);
        assert!(v.text.contains("not held"), "{}", v.text);
    }
}
