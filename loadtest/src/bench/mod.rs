//! `bench`: the benchmark method for HSM vendors, `xks-bench/1` (docs/benchmark-method.md
//! is its text; this module runs it).
//!
//! One run measures three parts on the same cells (payload × load):
//! - `hsm`: the token itself through PKCS#11, no proxy (the `hsm` subcommand's code);
//! - `proxy_hsm`: the proxy on that token, end to end (TLS, SigV4, the handler, PKCS#11);
//! - `proxy_software`: the proxy on its in-process software backend, where the HSM costs
//!   next to nothing, so its throughput is the proxy's own ceiling on this machine.
//!
//! From the first two it derives the proxy's overhead per cell (latency added, the share
//! of the token's throughput kept); from the third, the ceiling. It writes one JSON report
//! ([`BenchReport`], schema [`SCHEMA`]) and a one-page Markdown summary. It starts the
//! proxies itself (given the `xks-proxy` binary and a quickstart folder), or is pointed at
//! running ones by their `test-client.env`.
//!
//! Each cell runs `repetitions` times; its throughput is the median repetition's (with
//! the lowest and highest beside it), its percentiles those of all repetitions'
//! histograms added (HDR histograms add exactly).
//!
//! Here: the method (payloads, scales, cells), the command, and what is derived from the
//! parts. `report.rs`: the report's types; `cells.rs`: running the cells; `proxies.rs`:
//! the proxies `bench` starts; `cpu.rs`: CPU use from `/proc`; `text.rs`: the summary and
//! `compare` of two bench reports.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use xks_proxy::auth::SignOptions;

use crate::engine::{run_window, LoadSettings, Progress, Workload};
use crate::histogram::{decode_histogram, encode_histogram, new_histogram, Percentiles};
use crate::hsm::{run_hsm, HsmArgs};
use crate::report::gate::Figures;
use crate::report::{pct, Machine, Tool};
use crate::stalls::{run_stalls, Stalls, StallsArgs};
use crate::target::{Target, TargetArgs, TargetInfo};
use crate::workload::{BodySettings, Mix};
use crate::Error;

mod cells;
mod cpu;
mod proxies;
mod report;
mod text;

use cells::{hsm_part, proxy_cells};
use cpu::CpuMark;
use proxies::{
    free_port, listen_port, session_key_copies, software_config, start_proxy, version_of,
    ProxySource,
};
pub use report::*;
pub use text::{compare, scopes, summary};

/// The method's version: what is measured and how. A change to payloads, mix, loads or
/// what a cell reports is a new version; reports of different versions are not compared.
pub const METHOD: &str = "xks-bench/1";
/// The report's format.
pub const SCHEMA: &str = "xks-bench-report/1";
/// The operation mix of every cell: as many Decrypts as Encrypts (each data key KMS
/// wraps is unwrapped later). GetKeyMetadata and health checks are not HSM crypto and
/// the raw part could not run them.
pub const MIX: &str = "encrypt=1,decrypt=1";

/// A payload of the method.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Payload {
    /// `small` or `large`.
    pub name: Cow<'static, str>,
    /// Plaintext bytes per Encrypt.
    pub plaintext_bytes: usize,
    /// AAD bytes per Encrypt and Decrypt.
    pub aad_bytes: usize,
}

/// The method's payloads: a data key as KMS wraps it (32 bytes, with an encryption
/// context's worth of AAD), and a 4 KiB plaintext with 1 KiB of AAD (KMS's Encrypt API
/// takes up to 4 KiB).
pub const PAYLOADS: [Payload; 2] = [
    Payload {
        name: Cow::Borrowed("small"),
        plaintext_bytes: 32,
        aad_bytes: 100,
    },
    Payload {
        name: Cow::Borrowed("large"),
        plaintext_bytes: 4096,
        aad_bytes: 1024,
    },
];

/// How much of the method a run does. Only `publication` is the method as published;
/// the others keep its cells' shape at a smaller cost, and say so in the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scale {
    /// The full method (about 20 minutes a part).
    Publication,
    /// Shorter windows, two repetitions (about 2 minutes a part): a shared machine.
    Reduced,
    /// Seconds: tests and CI.
    Quick,
}

/// What a scale runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Plan {
    /// The scale.
    pub scale: Scale,
    /// Unmeasured load before each repetition, s.
    pub warmup_s: f64,
    /// Measured window of each repetition, s.
    pub duration_s: f64,
    /// Repetitions of each cell.
    pub repetitions: usize,
    /// Closed loop: connections (proxy parts) or sessions (raw HSM).
    pub concurrency: Vec<usize>,
    /// Open loop: offered operations per second.
    pub rates: Vec<f64>,
    /// Open loop: connections the generator may use (proxy parts).
    pub open_loop_connections: usize,
    /// Open loop: sessions the raw HSM part spreads the rate over.
    pub open_loop_sessions: usize,
    /// How long the idle machine's stalls are measured before the run, s.
    pub stall_check_s: f64,
    /// The payloads.
    pub payloads: Vec<Payload>,
    /// The operation mix.
    pub mix: String,
}

impl Scale {
    /// The plan of this scale.
    pub fn plan(self) -> Plan {
        let (warmup_s, duration_s, repetitions, concurrency, rates, stall_check_s) = match self {
            Self::Publication => (5.0, 30.0, 3, vec![1, 4, 16, 64], vec![500.0, 1800.0], 30.0),
            Self::Reduced => (1.0, 4.0, 2, vec![1, 4, 16, 64], vec![500.0, 1800.0], 5.0),
            Self::Quick => (0.2, 0.5, 1, vec![1, 4], vec![200.0], 0.5),
        };
        Plan {
            scale: self,
            warmup_s,
            duration_s,
            repetitions,
            concurrency,
            rates,
            open_loop_connections: 64,
            open_loop_sessions: 8,
            stall_check_s,
            payloads: PAYLOADS.to_vec(),
            mix: MIX.into(),
        }
    }
}

/// A cell's load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Load {
    /// As fast as answers come, at this concurrency.
    Closed(usize),
    /// At this many operations per second.
    Open(f64),
}

impl Plan {
    /// Every cell, in the order they run: per payload, the closed-loop steps, then the
    /// open-loop rates.
    pub(super) fn cells(&self) -> Vec<(Payload, Load)> {
        let mut cells = Vec::new();
        for payload in &self.payloads {
            for &c in &self.concurrency {
                cells.push((payload.clone(), Load::Closed(c)));
            }
            for &r in &self.rates {
                cells.push((payload.clone(), Load::Open(r)));
            }
        }
        cells
    }
}

pub(super) fn cell_id(payload: &Payload, load: Load) -> String {
    match load {
        Load::Closed(c) => format!("{}/closed/c{c}", payload.name),
        Load::Open(r) => format!("{}/open/r{r:.0}", payload.name),
    }
}

/// The three parts, by their name in the report.
pub const PARTS: [&str; 3] = ["hsm", "proxy_hsm", "proxy_software"];

/// Flags of `bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// How much of the method to run.
    #[arg(long, value_enum, default_value = "publication")]
    pub scale: Scale,
    /// Same as `--scale quick`: seconds, for tests and CI.
    #[arg(long, conflicts_with = "scale")]
    pub quick: bool,
    /// Parts to run (hsm, proxy_hsm, proxy_software).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "hsm,proxy_hsm,proxy_software"
    )]
    pub parts: Vec<String>,
    /// The xks-proxy binary: `bench` starts the proxies itself (on the quickstart's
    /// token, and on the software backend with the quickstart's credential).
    #[arg(long, value_name = "PATH")]
    pub proxy_bin: Option<PathBuf>,
    /// A quickstart folder (made with SoftHSM2 if it does not exist): the token for the
    /// `hsm` part, the config and test-client.env for the proxies `bench` starts.
    #[arg(long, value_name = "DIR")]
    pub quickstart: Option<PathBuf>,
    /// The proxy config.toml whose [hsm] table names the token for the `hsm` part
    /// (default: the quickstart's).
    #[arg(long, value_name = "FILE")]
    pub hsm_config: Option<PathBuf>,
    /// The token key's CKA_LABEL for the `hsm` part.
    #[arg(long, default_value = "foo")]
    pub key_label: String,
    /// A running proxy on the HSM, by its test-client.env (instead of starting one).
    #[arg(long, value_name = "FILE")]
    pub hsm_env: Option<PathBuf>,
    /// A running proxy on the software backend, by its test-client.env.
    #[arg(long, value_name = "FILE")]
    pub software_env: Option<PathBuf>,
    /// A sentence about the machine for the report (e.g. "shared 2-core VM, generator on
    /// the same cores").
    #[arg(long, value_name = "TEXT")]
    pub machine_note: Option<String>,
    /// The JSON report.
    #[arg(long, short, value_name = "FILE", default_value = "bench.json")]
    pub output: PathBuf,
    /// The Markdown summary (default: the report's name with .md).
    #[arg(long, value_name = "FILE")]
    pub summary: Option<PathBuf>,
    /// Runtime worker threads of the generator (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Runs `bench`.
pub fn bench(args: &BenchArgs) -> Result<ExitCode, Error> {
    let scale = if args.quick { Scale::Quick } else { args.scale };
    let plan = scale.plan();
    for part in &args.parts {
        if !PARTS.contains(&part.as_str()) {
            return Err(
                format!("--parts: unknown part {part:?} (hsm, proxy_hsm, proxy_software)").into(),
            );
        }
    }
    let wants = |p: &str| args.parts.iter().any(|x| x == p);
    let started_at = time::OffsetDateTime::now_utc();
    let clock = Instant::now();

    // The quickstart first, on this single thread: it sets SOFTHSM2_CONF, and so does
    // the `hsm` part, before any other thread could read the environment.
    let quickstart = match &args.quickstart {
        Some(dir) => {
            let listen = format!("127.0.0.1:{}", free_port()?).parse()?;
            Some(xks_proxy::quickstart::prepare(dir, listen, None)?.dir)
        }
        None => None,
    };
    let hsm_config = args
        .hsm_config
        .clone()
        .or_else(|| quickstart.as_ref().map(|q| q.join("config.toml")));
    let proxy_hsm = match (&args.hsm_env, &quickstart, &args.proxy_bin) {
        _ if !wants("proxy_hsm") => None,
        (Some(env), _, _) => Some(ProxySource {
            env: env.clone(),
            endpoint: None,
            started: None,
        }),
        (None, Some(q), Some(_)) => {
            let config = q.join("config.toml");
            Some(ProxySource {
                env: q.join("test-client.env"),
                endpoint: Some(format!("https://localhost:{}", listen_port(&config)?)),
                started: Some((config, q.join("bench-proxy-hsm.log"))),
            })
        }
        _ => return Err("proxy_hsm needs --hsm-env, or --proxy-bin and --quickstart".into()),
    };
    let proxy_software = match (&args.software_env, &quickstart, &args.proxy_bin) {
        _ if !wants("proxy_software") => None,
        (Some(env), _, _) => Some(ProxySource {
            env: env.clone(),
            endpoint: None,
            started: None,
        }),
        (None, Some(q), Some(_)) => {
            let port = free_port()?;
            let config = q.join("bench-software.toml");
            std::fs::write(&config, software_config(q, port)?)?;
            Some(ProxySource {
                env: q.join("test-client.env"),
                endpoint: Some(format!("https://localhost:{port}")),
                started: Some((config, q.join("bench-proxy-software.log"))),
            })
        }
        _ => {
            return Err(
                "proxy_software needs --software-env, or --proxy-bin and --quickstart".into(),
            )
        }
    };
    if wants("hsm") && hsm_config.is_none() {
        return Err("the hsm part needs --hsm-config or --quickstart".into());
    }

    eprintln!(
        "{METHOD}, {:?} scale: {} cells a part, {} repetitions of {} s (+{} s warm-up)",
        plan.scale,
        plan.cells().len(),
        plan.repetitions,
        plan.duration_s,
        plan.warmup_s
    );
    let idle = run_stalls(&StallsArgs {
        duration: plan.stall_check_s,
        interval_us: 1_000,
        report: None,
    })?;
    eprintln!("idle {}", idle.line());
    let machine = BenchMachine::this(args.machine_note.clone(), Some(idle));

    let mut parts = BTreeMap::new();
    if let Some(config) = hsm_config.as_deref().filter(|_| wants("hsm")) {
        parts.insert("hsm".to_owned(), hsm_part(&plan, config, &args.key_label)?);
    }
    let runtime = {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.enable_all().thread_name("xks-loadtest");
        if let Some(threads) = args.threads {
            builder.worker_threads(threads.max(1));
        }
        builder.build()?
    };
    for (name, source, description) in [
        (
            "proxy_hsm",
            proxy_hsm,
            "the proxy on the HSM, end to end: TLS, SigV4, the XKS handler and PKCS#11",
        ),
        (
            "proxy_software",
            proxy_software,
            "the proxy on its in-process software backend: the proxy's own ceiling",
        ),
    ] {
        let Some(source) = source else { continue };
        let started = match (&source.started, &args.proxy_bin) {
            (Some((config, log)), Some(bin)) => {
                eprintln!(
                    "starting {} serve --config {}",
                    bin.display(),
                    config.display()
                );
                Some((start_proxy(bin, config, log)?, config.clone(), bin.clone()))
            }
            _ => None,
        };
        let target = Target::from_args(&TargetArgs {
            env: Some(source.env.clone()),
            endpoint: source.endpoint.clone(),
            uri_prefix: None,
            access_key_id: None,
            secret: None,
            secret_file: None,
            region: None,
            key_ids: Vec::new(),
            ca_file: None,
        })?;
        let proxy = ProxyInfo {
            version: started.as_ref().and_then(|(_, _, bin)| version_of(bin)),
            started_by_bench: started.is_some(),
            config: started.as_ref().map(|(_, c, _)| c.display().to_string()),
            target: target.info(),
        };
        let pid = started.as_ref().map(|(s, _, _)| s.child.id());
        let cells = runtime.block_on(proxy_cells(&plan, &target, pid, name))?;
        drop(started);
        parts.insert(
            name.to_owned(),
            Part {
                description: description.into(),
                hsm: None,
                proxy: Some(proxy),
                cells,
            },
        );
    }

    let report = BenchReport {
        schema: SCHEMA.into(),
        method: METHOD.into(),
        overhead: overhead(&parts),
        software_ceiling: ceiling(&parts),
        plan,
        tool: Tool::default(),
        started_at: started_at
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        elapsed_s: clock.elapsed().as_secs_f64(),
        machine,
        parts,
    };
    report.write(&args.output)?;
    let summary_path = args
        .summary
        .clone()
        .unwrap_or_else(|| args.output.with_extension("md"));
    let summary = summary(&report);
    std::fs::write(&summary_path, &summary)
        .map_err(|e| format!("{}: {e}", summary_path.display()))?;
    print!("{summary}");
    eprintln!(
        "wrote {} and {}",
        args.output.display(),
        summary_path.display()
    );
    let failures: u64 = report
        .parts
        .values()
        .flat_map(|p| &p.cells)
        .map(|c| c.errors + c.verification_failures)
        .sum();
    if failures > 0 {
        eprintln!("error: {failures} failed operations or wrong answers (see the report)");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// The proxy's overhead per cell both `hsm` and `proxy_hsm` ran.
pub(super) fn overhead(parts: &BTreeMap<String, Part>) -> Vec<Overhead> {
    let (Some(hsm), Some(proxy)) = (parts.get("hsm"), parts.get("proxy_hsm")) else {
        return Vec::new();
    };
    proxy
        .cells
        .iter()
        .filter_map(|p| {
            let h = hsm.cells.iter().find(|h| h.id == p.id)?;
            Some(Overhead {
                cell: p.id.clone(),
                hsm_p50_ms: h.latency_ms.p50,
                proxy_p50_ms: p.latency_ms.p50,
                added_p50_ms: p.latency_ms.p50 - h.latency_ms.p50,
                added_p99_ms: p.latency_ms.p99 - h.latency_ms.p99,
                added_p99_9_ms: p.latency_ms.p99_9 - h.latency_ms.p99_9,
                throughput_ratio: if h.throughput_rps > 0.0 {
                    p.throughput_rps / h.throughput_rps
                } else {
                    0.0
                },
                proxy_cpu_us_per_op: p.cpu.as_ref().and_then(|c| c.us_per_op),
            })
        })
        .collect()
}

/// The software backend's best closed-loop throughput per payload.
pub(super) fn ceiling(parts: &BTreeMap<String, Part>) -> Vec<Ceiling> {
    let Some(software) = parts.get("proxy_software") else {
        return Vec::new();
    };
    PAYLOADS
        .iter()
        .filter_map(|payload| {
            let best = software
                .cells
                .iter()
                .filter(|c| c.payload == payload.name && c.mode == "closed")
                .max_by(|a, b| a.throughput_rps.total_cmp(&b.throughput_rps))?;
            Some(Ceiling {
                payload: payload.name.to_string(),
                throughput_rps: best.throughput_rps,
                connections: best.concurrency,
                p99_ms: best.latency_ms.p99,
            })
        })
        .collect()
}
