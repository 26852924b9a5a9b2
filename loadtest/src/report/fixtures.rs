//! Reports for the report module's tests: made from a few latencies, with the machine's
//! stalls or an open-loop schedule when a test needs them.

use std::collections::BTreeMap;

use super::{compare, Measured, Report, Schedule};
use crate::histogram::{encode_histogram, new_histogram, new_second_histogram, Percentiles};
use crate::stalls::Stalls;

/// A one-second window of Encrypt latencies (µs), `errors` of them throttled, at Unix
/// second `t0`.
pub(super) fn measured(values: &[u64], errors: u64, t0: u64) -> Measured {
    let mut h = new_histogram();
    let mut second = new_second_histogram();
    for v in values {
        h.record(*v).unwrap();
        second.record(*v).unwrap();
    }
    Measured {
        per_op: vec![("Encrypt".into(), h, errors)],
        status_counts: [("200".to_owned(), values.len() as u64 - errors)].into(),
        error_counts: if errors > 0 {
            [("ThrottlingException".to_owned(), errors)].into()
        } else {
            BTreeMap::new()
        },
        late: 0,
        unsent: 0,
        series: vec![(t0, 0, second, errors)],
        window_start_unix_ms: Some(t0 * 1000),
        seconds: 1.0,
        stalls: None,
        schedule: None,
    }
}

/// A `run` report of [`measured`] with an SLO of p99 10 ms and 1% errors.
pub(super) fn report(values: &[u64], errors: u64, t0: u64) -> Report {
    run(&measured(values, errors, t0), Some((10.0, 1.0)))
}

/// A meter that saw `over_1ms` wake-ups `max_us` late, and one on time.
pub(super) fn stalls(max_us: u64, over_1ms: u64) -> Stalls {
    let mut late = new_histogram();
    late.record(60).unwrap();
    for _ in 0..over_1ms {
        late.record(max_us).unwrap();
    }
    Stalls {
        interval_us: 1000,
        samples: late.len(),
        late_ms: Percentiles::of(&late),
        over_1ms,
        stolen_pct: Some(0.5),
        histogram: encode_histogram(&late),
    }
}

/// A `run` report of `m` without an SLO.
pub(super) fn run_report(m: &Measured) -> Report {
    run(m, None)
}

/// A `run` report of `m`, started now, against the objective `slo` (p99 ms, errors %).
fn run(m: &Measured, slo: Option<(f64, f64)>) -> Report {
    Report::new(
        "run",
        time::OffsetDateTime::now_utc(),
        None,
        serde_json::json!({}),
        m,
        slo,
    )
}

/// A `run` report whose machine saw [`stalls`].
pub(super) fn report_with_stalls(max_us: u64, over_1ms: u64) -> Report {
    let mut m = measured(&[1_000], 0, 100);
    m.stalls = Some(stalls(max_us, over_1ms));
    run_report(&m)
}

/// The row of `compare(a, b)` for `metric` of the section `name`.
pub(super) fn compare_row(a: &Report, b: &Report, name: &str, metric: &str) -> String {
    let text = compare(a, b, "a", "b");
    text.lines()
        .find(|l| l.starts_with(name) && l.contains(metric))
        .unwrap_or_else(|| panic!("no {name} {metric} in {text}"))
        .to_owned()
}

/// An open-loop report in which `late` requests left over 2 ms late, `by_pacer` of
/// them already released that late.
pub(super) fn report_with_schedule(late: u64, by_pacer: u64) -> Report {
    let (mut released, mut sent) = (new_histogram(), new_histogram());
    for i in 0..10 {
        let (r, s) = match i {
            i if i < by_pacer => (3_000, 3_100),
            i if i < late => (20, 4_000),
            _ => (20, 40),
        };
        released.record(r).unwrap();
        sent.record(s).unwrap();
    }
    let mut m = measured(&[1_000; 10], 0, 100);
    m.late = late;
    m.schedule = Some(Schedule::new(&released, &sent, by_pacer));
    run_report(&m)
}
