//! `compare`: two reports side by side (throughput and percentiles per operation, with
//! B/A ratios and B−A differences), and, when both measured them, the machines' own
//! stalls and how late the generators sent, so that a worse tail on a machine that
//! stalled more is not blamed on the proxy.

use std::fmt::Write as _;

use super::{Machine, Report, Schedule};
use crate::stalls::Stalls;

/// Side-by-side throughput and percentiles of two reports, with B/A ratios.
pub fn compare(a: &Report, b: &Report, a_name: &str, b_name: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "A = {a_name} ({}, {})", a.kind, a.started_at);
    let _ = writeln!(out, "B = {b_name} ({}, {})", b.kind, b.started_at);
    let mut names: Vec<&String> = a
        .operations
        .keys()
        .filter(|n| b.operations.contains_key(*n) && *n != "overall")
        .collect();
    if a.operations.contains_key("overall") && b.operations.contains_key("overall") {
        names.push(
            a.operations
                .keys()
                .find(|n| *n == "overall")
                .expect("checked just above"),
        );
    }
    let _ = writeln!(
        out,
        "{:<16} {:<10} {:>12} {:>12} {:>8} {:>12}",
        "operation", "metric", "A", "B", "B/A", "B-A"
    );
    for name in names {
        let (x, y) = (&a.operations[name], &b.operations[name]);
        let rows = [
            ("req/s", x.throughput_rps, y.throughput_rps),
            ("p50 ms", x.latency_ms.p50, y.latency_ms.p50),
            ("p90 ms", x.latency_ms.p90, y.latency_ms.p90),
            ("p99 ms", x.latency_ms.p99, y.latency_ms.p99),
            ("p99.9 ms", x.latency_ms.p99_9, y.latency_ms.p99_9),
            ("max ms", x.latency_ms.max, y.latency_ms.max),
            ("mean ms", x.latency_ms.mean, y.latency_ms.mean),
        ];
        compare_rows(&mut out, name, &rows);
    }
    // The machines' own stalls: a worse tail in B on a machine that stalled more is
    // not the proxy's doing.
    if let (Some(x), Some(y)) = (worst_stalls(a), worst_stalls(b)) {
        let rows = [
            ("p99.9 ms", x.late_ms.p99_9, y.late_ms.p99_9),
            ("max ms", x.late_ms.max, y.late_ms.max),
            ("≥1ms", x.over_1ms as f64, y.over_1ms as f64),
            (
                "stolen %",
                x.stolen_pct.unwrap_or(0.0),
                y.stolen_pct.unwrap_or(0.0),
            ),
        ];
        compare_rows(&mut out, "machine stalls", &rows);
    }
    if let (Some(x), Some(y)) = (worst_schedule(a), worst_schedule(b)) {
        let rows = [
            ("p99.9 ms", x.sent_late_ms.p99_9, y.sent_late_ms.p99_9),
            ("max ms", x.sent_late_ms.max, y.sent_late_ms.max),
        ];
        compare_rows(&mut out, "generator sent late", &rows);
    }
    let _ = writeln!(
        out,
        "errors: A {} ({:.3}%), B {} ({:.3}%)",
        a.summary.errors, a.summary.error_pct, b.summary.errors, b.summary.error_pct
    );
    out
}

/// Rows of `compare`: `name`, then per metric A, B, B/A and B−A.
fn compare_rows(out: &mut String, name: &str, rows: &[(&str, f64, f64)]) {
    for &(metric, va, vb) in rows {
        let ratio = if va > 0.0 {
            format!("{:.3}", vb / va)
        } else {
            "-".into()
        };
        let _ = writeln!(
            out,
            "{name:<16} {metric:<10} {va:>12.3} {vb:>12.3} {ratio:>8} {:>12.3}",
            vb - va
        );
    }
}

/// Of a report's generator machines, the one whose meter saw the worst stall.
fn worst_stalls(report: &Report) -> Option<&Stalls> {
    worst(report, |m| m.stalls.as_ref(), |s| s.late_ms.max)
}

/// Of a report's generator machines, the one that sent requests the latest.
fn worst_schedule(report: &Report) -> Option<&Schedule> {
    worst(report, |m| m.schedule.as_ref(), |s| s.sent_late_ms.max)
}

/// Of the `part`s the report's machines have, the one whose `max` is largest.
fn worst<T>(
    report: &Report,
    part: impl Fn(&Machine) -> Option<&T>,
    max: impl Fn(&T) -> f64,
) -> Option<&T> {
    report
        .machines
        .iter()
        .filter_map(part)
        .max_by(|x, y| max(x).total_cmp(&max(y)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::fixtures::{compare_row, report, report_with_stalls};
    use crate::report::merge;

    #[test]
    fn compare_shows_ratios() {
        let a = report(&[1_000, 1_000], 0, 100);
        let b = report(&[2_000, 2_000], 0, 100);
        let text = compare(&a, &b, "a.json", "b.json");
        assert!(text.contains("p50 ms"), "{text}");
        assert!(text.contains("2.000"), "{text}");
        assert!(
            !text.contains("machine stalls"),
            "neither measured them: {text}"
        );
    }

    #[test]
    fn stalls_are_kept_per_machine_and_compared() {
        let a = report_with_stalls(4_000, 3);
        assert_eq!(a.machines[0].stalls.as_ref().unwrap().over_1ms, 3);
        assert!(a.text().contains("machine stalls"), "{}", a.text());
        let back: Report = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(back.machines[0].stalls, a.machines[0].stalls);

        let b = report_with_stalls(8_000, 6);
        let row = compare_row(&a, &b, "machine stalls", "≥1ms");
        assert!(row.contains("2.000"), "{row}");

        // Several machines: the worst one is compared.
        let merged = merge(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(worst_stalls(&merged).unwrap().over_1ms, 6);
    }
}
