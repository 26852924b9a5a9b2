//! `merge`: adds the reports of several generator machines that loaded the same target at
//! the same time, and says how long their measured windows overlapped.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;

use super::{pct, within, OpReport, Report, SecondPoint, Summary, Tool, Verification, FORMAT};
use crate::histogram::{decode_histogram, new_histogram, new_second_histogram, Percentiles};
use crate::Error;

/// Adds reports from several generator machines that loaded the same target at the
/// same time: histograms, counts and per-second points (aligned on Unix seconds) add;
/// throughputs add.
pub fn merge(reports: &[Report]) -> Result<Report, Error> {
    let first = reports.first().ok_or("nothing to merge")?;
    let mut merged = first.clone();
    merged.kind = "merged".into();
    merged.tool = Tool::default();
    merged.steps.clear();
    merged.max_rate_meeting_slo = None;
    // `--kms` views add when every generator had one.
    let views: Option<Vec<&crate::kms::View>> = reports.iter().map(|r| r.kms.as_ref()).collect();
    merged.kms = match views {
        Some(views) => crate::kms::View::merge(&views)?,
        None => None,
    };
    let mut histograms: BTreeMap<String, (Histogram<u64>, u64, f64)> = BTreeMap::new();
    let mut seconds: BTreeMap<u64, (Histogram<u64>, u64)> = BTreeMap::new();
    let mut status = BTreeMap::new();
    let mut errors = BTreeMap::new();
    let mut verification: Option<Verification> = None;
    let mut machines = Vec::new();
    let mut late = 0;
    let mut unsent = 0;
    let mut duration: f64 = 0.0;
    let start = reports.iter().map(|r| r.start_unix_ms).min().unwrap_or(0);
    for report in reports {
        if report.format != FORMAT {
            return Err(format!("report format {} is not {FORMAT}", report.format).into());
        }
        for (name, op) in &report.operations {
            let entry = histograms
                .entry(name.clone())
                .or_insert_with(|| (new_histogram(), 0, 0.0));
            entry.0.add(decode_histogram(&op.histogram)?)?;
            entry.1 += op.errors;
            entry.2 += op.throughput_rps;
        }
        for point in &report.series {
            let entry = seconds
                .entry(point.t_unix)
                .or_insert_with(|| (new_second_histogram(), 0));
            entry.0.add(decode_histogram(&point.histogram)?)?;
            entry.1 += point.errors;
        }
        for (k, v) in &report.status_counts {
            *status.entry(k.clone()).or_insert(0) += v;
        }
        for (k, v) in &report.error_counts {
            *errors.entry(k.clone()).or_insert(0) += v;
        }
        if let Some(v) = &report.verification {
            verification
                .get_or_insert_with(Verification::default)
                .add(v);
        }
        machines.extend(report.machines.iter().cloned());
        late += report.summary.late;
        unsent += report.summary.unsent;
        duration = duration.max(report.duration_s);
        if report.started_at < merged.started_at {
            merged.started_at = report.started_at.clone();
        }
    }
    merged.start_unix_ms = start;
    merged.window_start_unix_ms = reports.iter().filter_map(|r| r.window_start_unix_ms).min();
    merged.together_s = together_s(reports);
    merged.machines = machines;
    merged.duration_s = duration;
    merged.status_counts = status;
    merged.error_counts = errors;
    merged.verification = verification;
    merged.operations = histograms
        .iter()
        .map(|(name, (h, e, throughput))| {
            let mut op = OpReport::new(h, *e, duration);
            op.throughput_rps = *throughput;
            (name.clone(), op)
        })
        .collect();
    let first_second = seconds.keys().next().copied().unwrap_or(0);
    merged.series = seconds
        .iter()
        .map(|(t, (h, e))| SecondPoint::new(*t, t - first_second, h, *e))
        .collect();
    let (all, all_errors, throughput) = histograms
        .get("overall")
        .map(|(h, e, t)| (h.clone(), *e, *t))
        .unwrap_or_else(|| (new_histogram(), 0, 0.0));
    merged.summary = Summary::new(&all, all_errors, throughput, late, unsent);
    if let Some(slo) = &mut merged.slo {
        slo.within_p99_target_pct = within(&all, slo.p99_ms);
        slo.met = !all.is_empty()
            && Percentiles::of(&all).p99 <= slo.p99_ms
            && pct(all_errors, all.len()) <= slo.error_pct;
    }
    Ok(merged)
}

/// Seconds in which every report's measured window was running, or `None` when a
/// report does not say when its window started (reports from before that was recorded).
fn together_s(reports: &[Report]) -> Option<f64> {
    let mut start = 0;
    let mut end = u64::MAX;
    for report in reports {
        let from = report.window_start_unix_ms?;
        start = start.max(from);
        end = end.min(from + (report.duration_s.max(0.0) * 1000.0) as u64);
    }
    Some(end.saturating_sub(start) as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::fixtures::report;

    #[test]
    fn merge_adds_counts_and_aligns_seconds() {
        let a = report(&[1_000, 2_000], 0, 100);
        let b = report(&[3_000, 4_000, 5_000], 1, 100);
        let c = report(&[6_000], 0, 101);
        let m = merge(&[a, b, c]).unwrap();
        assert_eq!(m.kind, "merged");
        assert_eq!(m.summary.requests, 6);
        assert_eq!(m.summary.errors, 1);
        assert_eq!(m.operations["Encrypt"].count, 6);
        assert_eq!(m.status_counts["200"], 5);
        assert_eq!(m.error_counts["ThrottlingException"], 1);
        assert_eq!(m.machines.len(), 3);
        assert_eq!(m.series.len(), 2);
        assert_eq!(m.series[0].count, 5);
        assert_eq!(m.series[1].offset_s, 1);
        assert!((m.summary.throughput_rps - 6.0).abs() < 1e-9);
        assert!((m.operations["overall"].latency_ms.max - 6.0).abs() < 0.01);
    }

    #[test]
    fn merge_says_how_long_the_generators_ran_together() {
        // Both windows 1 s long, from Unix second 100.
        let m = merge(&[report(&[1_000], 0, 100), report(&[2_000], 0, 100)]).unwrap();
        assert_eq!(m.together_s, Some(1.0));
        assert_eq!(m.window_start_unix_ms, Some(100_000));
        assert!(m.text().contains("ran together for 1.00 of 1.00 s"));
        assert!(!m.text().contains("warning"), "{}", m.text());

        // One started 0.6 s later: they shared 0.4 s, and the text says what to do.
        let mut late = report(&[2_000], 0, 100);
        late.window_start_unix_ms = Some(100_600);
        let m = merge(&[report(&[1_000], 0, 100), late]).unwrap();
        assert!((m.together_s.unwrap() - 0.4).abs() < 1e-9);
        assert!(m.text().contains("same --start-at"), "{}", m.text());

        // Apart: nothing together.
        let m = merge(&[report(&[1_000], 0, 100), report(&[2_000], 0, 105)]).unwrap();
        assert_eq!(m.together_s, Some(0.0));

        // A report that does not say when its window started: cannot tell.
        let mut old = report(&[2_000], 0, 100);
        old.window_start_unix_ms = None;
        let m = merge(&[report(&[1_000], 0, 100), old]).unwrap();
        assert_eq!(m.together_s, None);
        assert!(!m.text().contains("together"));
    }
}
