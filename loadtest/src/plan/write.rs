//! The plan a person reads: Markdown, and HTML with the curves (KMS-perceived p99 and
//! failed calls against the offered rate, one line per setting, drawn with plotters as
//! the report charts are).

use std::fmt::Write as _;

use plotters::prelude::*;

use super::{Plan, Setting};
use crate::kms::{LATENCY_ALARM_MS, QUOTA_PER_KEY_STORE, RETRYABLE_ALARM};
use crate::Error;

/// What the target takes, from the best setting.
#[derive(Debug, Clone, PartialEq)]
pub struct Capacity {
    /// The best setting's label.
    pub setting: String,
    /// Its sustainable rate per proxy, calls/s.
    pub per_proxy_rps: f64,
    /// Per HSM session, when the session count is known.
    pub per_session_rps: Option<f64>,
    /// Sessions per proxy, when known.
    pub sessions_per_proxy: Option<f64>,
    /// What one replica is planned to carry (sustainable × utilization).
    pub planned_per_replica_rps: f64,
    /// Replicas for the target: enough at the planned rate, plus one spare.
    pub replicas: u64,
    /// HSM sessions over all replicas, when known.
    pub sessions_total: Option<f64>,
    /// Target per key store, calls/s.
    pub per_key_store_rps: f64,
    /// Above KMS's default quota per key store.
    pub needs_quota_increase: bool,
}

/// Replicas for `target` when each carries `planned` at most: enough, plus one spare
/// (a replica down for an upgrade or a failure must not push the rest past their plan),
/// and never fewer than two.
pub fn replicas(target: f64, planned: f64) -> u64 {
    if planned <= 0.0 {
        return 0;
    }
    ((target / planned).ceil() as u64 + 1).max(2)
}

fn best(plan: &Plan) -> Option<&Setting> {
    plan.settings
        .iter()
        .filter(|s| s.sustainable_rps.is_some())
        .max_by(|a, b| {
            a.sustainable_rps
                .partial_cmp(&b.sustainable_rps)
                .unwrap_or(std::cmp::Ordering::Equal)
        })
}

/// The capacity for the plan's target (or for one key store at KMS's default quota).
pub fn capacity(plan: &Plan) -> Option<Capacity> {
    let best = best(plan)?;
    let per_proxy = best.sustainable_rps?;
    let target = plan
        .target_tps
        .unwrap_or(QUOTA_PER_KEY_STORE * f64::from(plan.key_stores));
    let planned = per_proxy * plan.utilization;
    let replicas = replicas(target, planned);
    Some(Capacity {
        setting: best.label.clone(),
        per_proxy_rps: per_proxy,
        per_session_rps: best.sessions.filter(|s| *s > 0.0).map(|s| per_proxy / s),
        sessions_per_proxy: best.sessions,
        planned_per_replica_rps: planned,
        replicas,
        sessions_total: best.sessions.map(|s| s * replicas as f64),
        per_key_store_rps: target / f64::from(plan.key_stores.max(1)),
        needs_quota_increase: target / f64::from(plan.key_stores.max(1)) > QUOTA_PER_KEY_STORE,
    })
}

fn opt(v: Option<f64>, unit: &str) -> String {
    v.map_or("-".into(), |v| format!("{v:.0}{unit}"))
}

/// The plan as Markdown.
pub fn markdown(plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Capacity plan for {}\n", plan.endpoint);
    let _ = writeln!(
        out,
        "Made {} by `xks-loadtest plan` on {} ({} cores, {}).\n\n```\n{}\n```\n",
        plan.started_at,
        plan.machine.hostname,
        plan.machine.cores,
        plan.machine.kernel,
        plan.command
    );
    let _ = writeln!(out, "## Objective\n");
    let _ = writeln!(
        out,
        "In KMS's terms: p99 of KMS-perceived latency ≤ {} ms and ≤ {}% of calls failing after KMS's retry. \
         Each call is sent as KMS sends it: {} ms timeout, one retry after a timeout or a retryable error \
         (429, 500, 503, no connection), {:.0}% of calls on a new connection; its latency counts from its \
         intended start (open loop), retry included. Open-loop steps of {} s, rates rising by a factor until one fails.\n",
        plan.objective_p99_ms,
        plan.objective_failed_pct,
        plan.kms.timeout.as_millis(),
        plan.kms.new_connections_pct,
        plan.step_duration_s
    );
    let _ = writeln!(out, "## Results per setting\n");
    let _ = writeln!(
        out,
        "| setting | sustainable calls/s | per session | knee calls/s | saturates first |\n| --- | ---: | ---: | ---: | --- |"
    );
    for s in &plan.settings {
        let per_session = match (s.sustainable_rps, s.sessions) {
            (Some(r), Some(n)) if n > 0.0 => format!("{:.0}", r / n),
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            s.label,
            opt(s.sustainable_rps, ""),
            per_session,
            opt(s.knee(), ""),
            s.saturation()
        );
    }
    out.push('\n');
    for s in &plan.settings {
        let _ = writeln!(out, "### {}\n", s.label);
        let _ = writeln!(
            out,
            "| offered | achieved req/s | KMS p99 ms | first try % | failed % | AWS alarm | proxy CPU | busy sessions | queue max | shed | objective |\n\
             | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |"
        );
        for st in &s.steps {
            let o = &st.observed;
            let _ = writeln!(
                out,
                "| {:.0} | {:.0} | {:.1} | {:.3} | {:.3} | {} | {} | {} | {} | {} | {} |",
                st.offered_rps,
                st.achieved_rps,
                st.kms_p99_ms,
                st.first_try_pct,
                st.failed_pct,
                if st.alarm { "would fire" } else { "quiet" },
                opt(o.proxy_cpu_pct, "%"),
                match (o.busy_avg, o.sessions) {
                    (Some(b), Some(n)) => format!("{b:.1}/{n:.0}"),
                    _ => "-".into(),
                },
                opt(o.queue_max, ""),
                opt(o.shed, ""),
                if st.met { "met" } else { "FAILED" }
            );
        }
        out.push('\n');
    }
    let _ = writeln!(out, "## Sustainable rate and knee\n");
    match capacity(plan) {
        None => {
            let _ = writeln!(
                out,
                "No setting met the objective at its first rate: start lower (`--start`) or look at the failing step above.\n"
            );
        }
        Some(c) => {
            let _ = writeln!(
                out,
                "Best setting: **{}**, sustaining **{:.0} calls/s per proxy**{}. The knee (where KMS-perceived p99 leaves the flat part of the curve: past twice its value at the first step) is the last rate to plan close to; past the sustainable rate the next step failed the objective.\n",
                c.setting,
                c.per_proxy_rps,
                c.per_session_rps
                    .map_or(String::new(), |r| format!(" ({r:.0} calls/s per HSM session)"))
            );
            let _ = writeln!(out, "## What saturates first\n");
            for s in &plan.settings {
                let _ = writeln!(out, "- {}: {}", s.label, s.saturation());
            }
            let _ = writeln!(
                out,
                "\nThe generator shared the machine with the proxy (when local): its CPU is taken from the proxy's, so a rate measured this way is a floor.\n"
            );
            let _ = writeln!(out, "## For the target\n");
            let target = plan
                .target_tps
                .unwrap_or(QUOTA_PER_KEY_STORE * f64::from(plan.key_stores));
            let _ = writeln!(
                out,
                "Target: **{target:.0} calls/s** over {} key store(s){}.\n\n\
                 Headroom rule: each replica is planned at {:.0}% of its sustainable rate ({:.0} calls/s), and one replica more than that \
                 (so one can be down for an upgrade or a failure), never fewer than two.\n\n\
                 - proxy replicas: **{}**\n- HSM sessions: {}\n",
                plan.key_stores,
                if plan.target_tps.is_none() { " (no --target-tps: KMS's default quota)" } else { "" },
                plan.utilization * 100.0,
                c.planned_per_replica_rps,
                c.replicas,
                match (c.sessions_per_proxy, c.sessions_total) {
                    (Some(per), Some(total)) => format!("**{total:.0}** ({per:.0} per replica; the HSM must serve them all at once)"),
                    _ => "unknown (give --sessions or --metrics-url)".into(),
                }
            );
            let _ = writeln!(out, "## KMS quota\n");
            let _ = writeln!(
                out,
                "KMS allows {QUOTA_PER_KEY_STORE:.0} requests per second per external key store by default. The target is {:.0} calls/s per key store: {}\n\n\
                 AWS's recommended alarms fire at an average latency above {LATENCY_ALARM_MS:.0} ms or more than {RETRYABLE_ALARM} retryable errors in a minute; \
                 the steps table says for each step whether either would have fired.\n",
                c.per_key_store_rps,
                if c.needs_quota_increase {
                    "above the default quota: a quota increase is needed, and this plan (the objective met at the sustainable rate, the replicas and sessions above) is the evidence the request asks for."
                } else {
                    "within the default quota."
                }
            );
        }
    }
    out
}

/// The plan as an HTML page: the Markdown's text and the curves.
pub fn html(plan: &Plan) -> Result<String, Error> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 880)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| format!("drawing: {e}"))?;
        let (top, bottom) = root.split_vertically(440);
        let x_max = plan
            .settings
            .iter()
            .flat_map(|s| s.steps.iter().map(|st| st.offered_rps))
            .fold(1.0, f64::max)
            * 1.1;
        curves(
            plan,
            &top,
            x_max,
            "KMS-perceived p99 (ms)",
            |st| st.kms_p99_ms.max(0.01),
            true,
        )?;
        curves(
            plan,
            &bottom,
            x_max,
            "calls failed after KMS's retry (%)",
            |st| st.failed_pct,
            false,
        )?;
        root.present().map_err(|e| format!("drawing: {e}"))?;
    }
    let escape = |t: &str| {
        t.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    Ok(format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>xks-loadtest plan</title>\n\
         <style>body{{font-family:sans-serif;margin:2em}}pre{{background:#f6f6f6;padding:1em;white-space:pre-wrap}}</style>\n\
         </head><body>\n{svg}\n<pre>{}</pre>\n</body></html>\n",
        escape(&markdown(plan))
    ))
}

fn curves(
    plan: &Plan,
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    x_max: f64,
    caption: &str,
    y: impl Fn(&super::PlanStep) -> f64,
    log: bool,
) -> Result<(), Error> {
    let err = |e: DrawingAreaErrorKind<_>| -> Error { format!("drawing: {e}").into() };
    let y_max = plan
        .settings
        .iter()
        .flat_map(|s| s.steps.iter().map(&y))
        .fold(if log { 300.0 } else { 1.0 }, f64::max)
        * 1.2;
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64);
    let colors = [&BLUE, &RED, &GREEN, &MAGENTA, &CYAN, &BLACK];
    if log {
        let mut chart = builder
            .build_cartesian_2d(0f64..x_max, (0.01f64..y_max).log_scale())
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("offered calls/s")
            .draw()
            .map_err(err)?;
        chart
            .draw_series(LineSeries::new(
                [(0.0, plan.objective_p99_ms), (x_max, plan.objective_p99_ms)],
                BLACK.mix(0.4),
            ))
            .map_err(err)?
            .label("objective");
        for (i, s) in plan.settings.iter().enumerate() {
            let color = colors[i % colors.len()];
            chart
                .draw_series(LineSeries::new(
                    s.steps.iter().map(|st| (st.offered_rps, y(st))),
                    color,
                ))
                .map_err(err)?
                .label(s.label.clone())
                .legend(move |(x, yy)| PathElement::new(vec![(x, yy), (x + 16, yy)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    } else {
        let mut chart = builder
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("offered calls/s")
            .draw()
            .map_err(err)?;
        for (i, s) in plan.settings.iter().enumerate() {
            let color = colors[i % colors.len()];
            chart
                .draw_series(LineSeries::new(
                    s.steps.iter().map(|st| (st.offered_rps, y(st))),
                    color,
                ))
                .map_err(err)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_keep_headroom_and_a_spare() {
        // 5400/s on proxies sustaining 2000/s each, planned at 70%: 1400/s each, so 4
        // carry it and a fifth is the spare.
        assert_eq!(replicas(5400.0, 2000.0 * 0.7), 5);
        assert_eq!(replicas(100.0, 10_000.0), 2);
        assert_eq!(replicas(100.0, 0.0), 0);
    }
}
