//! The report as text: the end-of-run tables ([`Report::text`]), the steps table of
//! `search` and `hsm` ([`steps_text`]) and the open-loop schedule's line
//! ([`Schedule::line`]): what `run`, `search`, `hsm` and `merge` print, and the tables
//! of the HTML chart page.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::{pct, Report, Schedule, Step, KMS_BUDGET_MS};
use crate::stalls::Stalls;

impl Schedule {
    /// One line for a report's text.
    pub fn line(&self) -> String {
        let (r, s) = (&self.released_late_ms, &self.sent_late_ms);
        format!(
            "open-loop schedule (how late requests left the generator): released by the pacer p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms; sent p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
            r.p99, r.p99_9, r.max, s.p99, s.p99_9, s.max
        )
    }
}

impl Report {
    /// The end-of-run text: percentile table, throughput, errors, SLO, verification.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<16} {:>9} {:>7} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "operation",
            "requests",
            "errors",
            "req/s",
            "p50",
            "p90",
            "p99",
            "p99.9",
            "p99.99",
            "max"
        );
        let mut names: Vec<&String> = self.operations.keys().filter(|n| *n != "overall").collect();
        names.push(
            self.operations
                .keys()
                .find(|n| *n == "overall")
                .expect("every report has overall"),
        );
        for name in names {
            let op = &self.operations[name];
            let p = &op.latency_ms;
            let _ = writeln!(
                out,
                "{:<16} {:>9} {:>7} {:>10.1} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}",
                name,
                op.count,
                op.errors,
                op.throughput_rps,
                p.p50,
                p.p90,
                p.p99,
                p.p99_9,
                p.p99_99,
                p.max
            );
        }
        let _ = writeln!(out, "(latencies in ms)");
        let s = &self.summary;
        let _ =
            writeln!(
            out,
            "{} requests in {:.2} s: {:.1} req/s, {} errors ({:.3}%), {:.3}% within KMS's {} ms",
            s.requests, self.duration_s, s.throughput_rps, s.errors, s.error_pct,
            s.within_kms_budget_pct, KMS_BUDGET_MS
        );
        if s.unsent > 0 {
            let _ = writeln!(
                out,
                "{} requests due in the window were never sent (the generator gave up its backlog)",
                s.unsent
            );
        }
        if s.late > 0 {
            let released: u64 = self
                .machines
                .iter()
                .filter_map(|m| m.schedule.as_ref())
                .map(|sc| sc.late_released)
                .sum();
            let _ = writeln!(
                out,
                "{} requests ({:.2}%) were sent over 2 ms after their due time: {} already released that late by the pacer (the generator's machine held it up), {} waiting for a free connection or generator thread (if these are many, add --connections)",
                s.late,
                pct(s.late, s.requests),
                released,
                s.late.saturating_sub(released)
            );
        }
        if let Some(together) = self.together_s {
            let _ = writeln!(
                out,
                "the {} generators ran together for {together:.2} of {:.2} s",
                self.machines.len(),
                self.duration_s
            );
            if together < 0.9 * self.duration_s {
                let _ = writeln!(
                    out,
                    "warning: their throughputs add only while they ran together; start every generator with the same --start-at"
                );
            }
        }
        let _ = writeln!(out, "status: {}", counts(&self.status_counts));
        if !self.error_counts.is_empty() {
            let _ = writeln!(out, "errors: {}", counts(&self.error_counts));
        }
        if let Some(slo) = &self.slo {
            let _ = writeln!(
                out,
                "SLO p99 <= {} ms, errors <= {}%: {} ({:.3}% within {} ms)",
                slo.p99_ms,
                slo.error_pct,
                if slo.met { "met" } else { "NOT met" },
                slo.within_p99_target_pct,
                slo.p99_ms
            );
        }
        if let Some(kms) = &self.kms {
            out.push_str(&kms.text());
        }
        for machine in &self.machines {
            let lines = machine.stalls.as_ref().map(Stalls::line).into_iter();
            for line in lines.chain(machine.schedule.as_ref().map(Schedule::line)) {
                let _ = if self.machines.len() > 1 {
                    writeln!(out, "{}: {line}", machine.hostname)
                } else {
                    writeln!(out, "{line}")
                };
            }
        }
        if let Some(v) = &self.verification {
            let _ = writeln!(
                out,
                "verification: {} encrypt samples decrypted ({} failed), {} decrypts checked ({} wrong), {} CDIVs checked ({} wrong), {} malformed answers",
                v.encrypt_samples_checked,
                v.encrypt_sample_failures,
                v.decrypts_checked,
                v.decrypt_mismatches,
                v.cdivs_checked,
                v.cdiv_failures,
                v.malformed_responses
            );
        }
        out
    }
}

fn counts(map: &BTreeMap<String, u64>) -> String {
    map.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A table of steps (search, hsm).
pub fn steps_text(steps: &[Step]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>10} {:>8} {:>10} {:>9} {:>8} {:>9} {:>7} {:>9} {:>9} {:>9}  SLO",
        "offered",
        "sessions",
        "achieved",
        "requests",
        "err%",
        "late",
        "unsent",
        "p50 ms",
        "p99 ms",
        "p99.9 ms"
    );
    for s in steps {
        let _ = writeln!(
            out,
            "{:>10} {:>8} {:>10.1} {:>9} {:>8.3} {:>9} {:>7} {:>9.3} {:>9.3} {:>9.3}  {}",
            s.offered_rps.map_or("-".into(), |r| format!("{r:.0}")),
            s.sessions.map_or("-".into(), |n| n.to_string()),
            s.achieved_rps,
            s.requests,
            s.error_pct,
            s.late,
            s.unsent,
            s.latency_ms.p50,
            s.latency_ms.p99,
            s.latency_ms.p99_9,
            match s.met_slo {
                Some(true) => "met",
                Some(false) => "FAILED",
                None => "",
            }
        );
        if let Some(k) = &s.kms {
            let _ = writeln!(
                out,
                "{:>10} KMS's view: p99 {:.3} ms, {:.3}% first try, {:.3}% after retry, {:.3}% failed",
                "",
                k.latency_ms.p99,
                k.first_try_pct,
                k.after_retry_pct,
                k.failed_pct
            );
        }
    }
    out
}
