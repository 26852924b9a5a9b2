//! Running the cells: the `hsm` part through the `hsm` subcommand's code, the proxy
//! parts through the load engine; a cell of its repetitions.

use super::*;

/// The `hsm` part: the `hsm` subcommand's code, one call per cell and repetition.
pub(super) fn hsm_part(plan: &Plan, config: &Path, key_label: &str) -> Result<Part, Error> {
    let mix: Mix = plan.mix.parse()?;
    let session_copy = session_key_copies(config);
    let mut cells = Vec::new();
    let mut info = None;
    for (payload, load) in plan.cells() {
        let id = cell_id(&payload, load);
        let (sessions, rate) = match load {
            Load::Closed(c) => (c, None),
            Load::Open(r) => (plan.open_loop_sessions, Some(r)),
        };
        let mut reps = Vec::new();
        for _ in 0..plan.repetitions {
            let args = HsmArgs {
                config: Some(config.to_owned()),
                module: None,
                token_label: None,
                pin_file: None,
                key_label: key_label.to_owned(),
                sessions: vec![sessions],
                duration: plan.duration_s,
                warmup: plan.warmup_s,
                mix,
                plaintext_bytes: payload.plaintext_bytes,
                aad_bytes: payload.aad_bytes,
                iv: "hsm".into(),
                session_copy,
                rate,
                report: None,
                quiet: true,
            };
            let before = CpuMark::now(None);
            let report = run_hsm(&args)?;
            let after = CpuMark::now(None);
            let histogram = report.overall_histogram()?;
            let throughput = report.summary.throughput_rps;
            let mut cpu = before.since(&after, throughput, false);
            if let Some(cpu) = cpu.as_mut().filter(|_| rate.is_some()) {
                // Open loop, each session thread spins the last moments before an
                // operation is due: its CPU is the pacing's, not the token's.
                cpu.us_per_op = None;
            }
            info = report.hsm.clone();
            reps.push(Repetition {
                throughput_rps: throughput,
                requests: report.summary.requests,
                errors: report.summary.errors,
                latency_ms: Percentiles::of(&histogram),
                stalls: report.machines.first().and_then(|m| m.stalls.clone()),
                cpu,
                verification_failures: 0,
                histogram: encode_histogram(&histogram),
            });
        }
        let cell = cell(&id, &payload, load, sessions, reps)?;
        progress("hsm", &cell);
        cells.push(cell);
    }
    Ok(Part {
        description: format!(
            "the token through PKCS#11, no proxy: {} per session{}",
            "C_Encrypt/C_Decrypt AES-256-GCM, IVs from C_GenerateRandom",
            if session_copy {
                ", on a session copy of the key (as the proxy's session_key_copies)"
            } else {
                ""
            }
        ),
        hsm: info,
        proxy: None,
        cells,
    })
}

/// A proxy part's cells.
pub(super) async fn proxy_cells(
    plan: &Plan,
    target: &Target,
    proxy_pid: Option<u32>,
    part: &str,
) -> Result<Vec<Cell>, Error> {
    let mix: Mix = plan.mix.parse()?;
    let mut cells = Vec::new();
    let mut workloads: BTreeMap<String, Arc<Workload>> = BTreeMap::new();
    for (payload, load) in plan.cells() {
        let workload = match workloads.get(payload.name.as_ref()) {
            Some(w) => Arc::clone(w),
            None => {
                let w = Arc::new(
                    Workload::prepare(
                        target.clone(),
                        false,
                        SignOptions::default(),
                        BodySettings {
                            plaintext_bytes: payload.plaintext_bytes,
                            aad_bytes: payload.aad_bytes,
                            cdiv: false,
                        },
                        mix,
                        64,
                    )
                    .await?,
                );
                workloads.insert(payload.name.to_string(), Arc::clone(&w));
                w
            }
        };
        let id = cell_id(&payload, load);
        let (connections, rate) = match load {
            Load::Closed(c) => (c, None),
            Load::Open(r) => (plan.open_loop_connections, Some(r)),
        };
        let mut reps = Vec::new();
        for _ in 0..plan.repetitions {
            let settings = LoadSettings {
                rate,
                connections,
                streams: 1,
                warmup: Duration::from_secs_f64(plan.warmup_s),
                duration: Duration::from_secs_f64(plan.duration_s),
                new_connection_per_request: false,
                timeout: Duration::from_secs(10),
                mix,
                verify_samples: 20,
                progress: Progress::Quiet,
                label: id.clone(),
                start_at: None,
                live: None,
                kms: None,
            };
            let before = CpuMark::now(proxy_pid);
            let result = run_window(&workload, settings).await?;
            let after = CpuMark::now(proxy_pid);
            let (all, errors) = result.measured.overall();
            let throughput = crate::report::rate(all.len(), result.measured.seconds);
            reps.push(Repetition {
                throughput_rps: throughput,
                requests: all.len(),
                errors,
                latency_ms: Percentiles::of(&all),
                stalls: result.measured.stalls.clone(),
                cpu: before.since(&after, throughput, true),
                verification_failures: result.verification.failures(),
                histogram: encode_histogram(&all),
            });
        }
        let cell = cell(&id, &payload, load, connections, reps)?;
        progress(part, &cell);
        cells.push(cell);
    }
    Ok(cells)
}

fn progress(part: &str, cell: &Cell) {
    eprintln!(
        "{part:<15} {:<20} {:>10.1} ops/s  p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  {} errors",
        cell.id,
        cell.throughput_rps,
        cell.latency_ms.p50,
        cell.latency_ms.p99,
        cell.latency_ms.p99_9,
        cell.errors
    );
}

/// A cell of its repetitions: the median throughput, the percentiles of all
/// repetitions' histograms added.
fn cell(
    id: &str,
    payload: &Payload,
    load: Load,
    concurrency: usize,
    reps: Vec<Repetition>,
) -> Result<Cell, Error> {
    let mut all: Histogram<u64> = new_histogram();
    for rep in &reps {
        all.add(decode_histogram(&rep.histogram)?)?;
    }
    let mut order: Vec<usize> = (0..reps.len()).collect();
    order.sort_by(|&a, &b| reps[a].throughput_rps.total_cmp(&reps[b].throughput_rps));
    let median = order.get(order.len() / 2).copied().ok_or("no repetition")?;
    let requests = reps.iter().map(|r| r.requests).sum();
    let errors = reps.iter().map(|r| r.errors).sum();
    Ok(Cell {
        id: id.to_owned(),
        payload: payload.name.to_string(),
        mode: match load {
            Load::Closed(_) => "closed",
            Load::Open(_) => "open",
        }
        .into(),
        concurrency,
        offered_rps: match load {
            Load::Open(r) => Some(r),
            Load::Closed(_) => None,
        },
        throughput_rps: reps[median].throughput_rps,
        throughput_min_rps: order.first().map_or(0.0, |&i| reps[i].throughput_rps),
        throughput_max_rps: order.last().map_or(0.0, |&i| reps[i].throughput_rps),
        requests,
        errors,
        error_pct: pct(errors, requests),
        latency_ms: Percentiles::of(&all),
        cpu: reps[median].cpu.clone(),
        verification_failures: reps.iter().map(|r| r.verification_failures).sum(),
        repetitions: reps,
    })
}
