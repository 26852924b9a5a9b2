//! The one-page Markdown summary, and `compare` of two bench reports (its table and
//! the gate's scopes).

use super::*;

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

/// The one-page Markdown summary.
pub fn summary(r: &BenchReport) -> String {
    let mut out = String::new();
    let m = &r.machine;
    let _ = writeln!(out, "# {} benchmark, {:?} scale\n", r.method, r.plan.scale);
    let _ = writeln!(
        out,
        "Run {} by {} {} in {:.0} s. Method: docs/benchmark-method.md of xks-proxy.\n",
        r.started_at, r.tool.name, r.tool.version, r.elapsed_s
    );
    let _ = writeln!(
        out,
        "Plan: {} s measured after {} s of warm-up, {} repetition(s) a cell; closed loop at {:?}; open loop at {:?} ops/s; mix {}; payloads {}.\n",
        r.plan.duration_s,
        r.plan.warmup_s,
        r.plan.repetitions,
        r.plan.concurrency,
        r.plan.rates,
        r.plan.mix,
        r.plan
            .payloads
            .iter()
            .map(|p| format!("{} ({} B plaintext, {} B AAD)", p.name, p.plaintext_bytes, p.aad_bytes))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(out, "## Machine\n");
    let _ = writeln!(
        out,
        "{} — {}, {} cores, {} MiB; {}; {}; load average at start {}.",
        m.hostname,
        m.cpu_model,
        m.cores,
        m.memory_mib.map_or("?".into(), |v| v.to_string()),
        m.kernel,
        m.os,
        m.load_average
    );
    if let Some(s) = &m.idle_stalls {
        let _ = writeln!(out, "Idle check: {}.", s.line());
    }
    if let Some(note) = &m.note {
        let _ = writeln!(out, "\n{note}");
    }
    for (name, part) in &r.parts {
        let _ = writeln!(out, "\n## {name}: {}\n", part.description);
        if let Some(hsm) = &part.hsm {
            let _ = writeln!(
                out,
                "Token: {} {} (`{}`, label {}).\n",
                hsm["manufacturer"].as_str().unwrap_or("?"),
                hsm["model"].as_str().unwrap_or("?"),
                hsm["module"].as_str().unwrap_or("?"),
                hsm["token_label"].as_str().unwrap_or("?")
            );
        }
        if let Some(proxy) = &part.proxy {
            let _ = writeln!(
                out,
                "Proxy: {} at {}{}.\n",
                proxy.version.as_deref().unwrap_or("version not known"),
                proxy.target.endpoint,
                if proxy.started_by_bench {
                    ", started by bench"
                } else {
                    ", already running"
                }
            );
        }
        let _ = writeln!(
            out,
            "| cell | ops/s (min–max) | p50 ms | p99 ms | p99.9 ms | errors | CPU µs/op | machine busy % |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
        for c in &part.cells {
            let _ = writeln!(
                out,
                "| {} | {:.0} ({:.0}–{:.0}) | {:.3} | {:.3} | {:.3} | {} | {} | {} |",
                c.id,
                c.throughput_rps,
                c.throughput_min_rps,
                c.throughput_max_rps,
                c.latency_ms.p50,
                c.latency_ms.p99,
                c.latency_ms.p99_9,
                c.errors,
                opt(c.cpu.as_ref().and_then(|c| c.us_per_op), 1),
                opt(c.cpu.as_ref().and_then(|c| c.machine_busy_pct), 0)
            );
        }
    }
    if !r.overhead.is_empty() {
        let _ = writeln!(
            out,
            "\n## Proxy overhead (proxy_hsm minus hsm, same cell)\n"
        );
        let _ = writeln!(
            out,
            "| cell | hsm p50 ms | proxy p50 ms | added p50 ms | added p99 ms | added p99.9 ms | throughput proxy/hsm | proxy CPU µs/op |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
        for o in &r.overhead {
            let _ = writeln!(
                out,
                "| {} | {:.3} | {:.3} | {:+.3} | {:+.3} | {:+.3} | {:.2} | {} |",
                o.cell,
                o.hsm_p50_ms,
                o.proxy_p50_ms,
                o.added_p50_ms,
                o.added_p99_ms,
                o.added_p99_9_ms,
                o.throughput_ratio,
                opt(o.proxy_cpu_us_per_op, 1)
            );
        }
    }
    if !r.software_ceiling.is_empty() {
        let _ = writeln!(out, "\n## The proxy's own ceiling (software backend)\n");
        for c in &r.software_ceiling {
            let _ = writeln!(
                out,
                "- {}: {:.0} ops/s at {} connections (p99 {:.3} ms)",
                c.payload, c.throughput_rps, c.connections, c.p99_ms
            );
        }
    }
    out
}

/// The gate's scopes of two bench reports: each cell of each part both ran.
pub fn scopes(a: &BenchReport, b: &BenchReport) -> Vec<(String, Figures, Figures)> {
    let mut scopes = Vec::new();
    for (name, pa) in &a.parts {
        let Some(pb) = b.parts.get(name) else {
            continue;
        };
        for ca in &pa.cells {
            if let Some(cb) = pb.cells.iter().find(|c| c.id == ca.id) {
                let figures = |c: &Cell| Figures {
                    throughput_rps: c.throughput_rps,
                    latency_ms: c.latency_ms,
                };
                scopes.push((format!("{name} {}", ca.id), figures(ca), figures(cb)));
            }
        }
    }
    scopes
}

/// `compare` of two bench reports: each common cell's throughput and tail side by side.
pub fn compare(
    a: &BenchReport,
    b: &BenchReport,
    a_name: &str,
    b_name: &str,
) -> Result<String, Error> {
    if a.method != b.method {
        return Err(format!(
            "{a_name} follows {} and {b_name} {}: different methods are not compared",
            a.method, b.method
        )
        .into());
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "A = {a_name} ({}, {:?} scale, {})",
        a.method, a.plan.scale, a.started_at
    );
    let _ = writeln!(
        out,
        "B = {b_name} ({}, {:?} scale, {})",
        b.method, b.plan.scale, b.started_at
    );
    if a.plan != b.plan {
        let _ = writeln!(
            out,
            "note: the two ran different plans (scale, durations or steps): compare with care"
        );
    }
    let _ = writeln!(
        out,
        "{:<36} {:>10} {:>10} {:>6} {:>9} {:>9} {:>6} {:>9} {:>9}",
        "part cell", "A ops/s", "B ops/s", "B/A", "A p99", "B p99", "B/A", "A p99.9", "B p99.9"
    );
    let ratio = |x: f64, y: f64| {
        if x > 0.0 {
            format!("{:.3}", y / x)
        } else {
            "-".into()
        }
    };
    for (scope, x, y) in scopes(a, b) {
        let _ = writeln!(
            out,
            "{scope:<36} {:>10.1} {:>10.1} {:>6} {:>9.3} {:>9.3} {:>6} {:>9.3} {:>9.3}",
            x.throughput_rps,
            y.throughput_rps,
            ratio(x.throughput_rps, y.throughput_rps),
            x.latency_ms.p99,
            y.latency_ms.p99,
            ratio(x.latency_ms.p99, y.latency_ms.p99),
            x.latency_ms.p99_9,
            y.latency_ms.p99_9,
        );
    }
    Ok(out)
}
