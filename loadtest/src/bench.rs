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
enum Load {
    /// As fast as answers come, at this concurrency.
    Closed(usize),
    /// At this many operations per second.
    Open(f64),
}

impl Plan {
    /// Every cell, in the order they run: per payload, the closed-loop steps, then the
    /// open-loop rates.
    fn cells(&self) -> Vec<(Payload, Load)> {
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

fn cell_id(payload: &Payload, load: Load) -> String {
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

/// CPU use while a cell ran (Linux; warm-up included, the load being the same).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Cpu {
    /// Wall-clock seconds the figures cover.
    pub wall_s: f64,
    /// Share of all cores busy, percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_busy_pct: Option<f64>,
    /// Cores the generator process used (for `hsm`: the token's own work).
    pub generator_cores: f64,
    /// Cores the proxy process used, when `bench` started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_cores: Option<f64>,
    /// CPU time per operation of what is measured (the proxy, or for `hsm` the
    /// generator, i.e. the token's library), µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub us_per_op: Option<f64>,
}

/// One repetition of a cell.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Repetition {
    /// Operations per second.
    pub throughput_rps: f64,
    /// Operations in the measured window.
    pub requests: u64,
    /// Of those, failed.
    pub errors: u64,
    /// Latency percentiles, ms.
    pub latency_ms: Percentiles,
    /// The machine's stalls in the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalls: Option<Stalls>,
    /// CPU use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Cpu>,
    /// Wrong answers found (proxy parts: plaintexts that did not come back).
    #[serde(default)]
    pub verification_failures: u64,
    /// The latency histogram (µs), V2 deflate, Base64.
    pub histogram: String,
}

/// One cell: a payload under one load.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cell {
    /// `small/closed/c16`, `large/open/r1800`.
    pub id: String,
    /// The payload's name.
    pub payload: String,
    /// `closed` or `open`.
    pub mode: String,
    /// Closed loop: connections or sessions. Open loop: the ones available.
    pub concurrency: usize,
    /// Open loop: offered operations per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offered_rps: Option<f64>,
    /// The median repetition's throughput.
    pub throughput_rps: f64,
    /// The lowest repetition's.
    pub throughput_min_rps: f64,
    /// The highest repetition's.
    pub throughput_max_rps: f64,
    /// Operations, all repetitions.
    pub requests: u64,
    /// Failed operations, all repetitions.
    pub errors: u64,
    /// errors / requests, percent.
    pub error_pct: f64,
    /// Percentiles of all repetitions together, ms.
    pub latency_ms: Percentiles,
    /// The median repetition's CPU use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Cpu>,
    /// Wrong answers, all repetitions.
    pub verification_failures: u64,
    /// Each repetition.
    pub repetitions: Vec<Repetition>,
}

/// The proxy a part ran against.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProxyInfo {
    /// `xks-proxy --version`, when `bench` started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Whether `bench` started it (else it was running already).
    pub started_by_bench: bool,
    /// Its config, when `bench` started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// Where it was reached.
    pub target: TargetInfo,
}

/// One part's results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Part {
    /// What the part measures.
    pub description: String,
    /// The token (`hsm`): module, label, manufacturer, model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hsm: Option<serde_json::Value>,
    /// The proxy (proxy parts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxyInfo>,
    /// The cells.
    pub cells: Vec<Cell>,
}

/// The proxy's cost on top of the HSM, for a cell both `hsm` and `proxy_hsm` ran.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Overhead {
    /// The cell.
    pub cell: String,
    /// Median latency of the raw token, ms.
    pub hsm_p50_ms: f64,
    /// Median latency through the proxy, ms.
    pub proxy_p50_ms: f64,
    /// What the proxy added to the median, ms.
    pub added_p50_ms: f64,
    /// What it added to p99, ms.
    pub added_p99_ms: f64,
    /// What it added to p99.9, ms.
    pub added_p99_9_ms: f64,
    /// Throughput through the proxy / the raw token's.
    pub throughput_ratio: f64,
    /// The proxy's CPU per request, µs (when `bench` started it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_cpu_us_per_op: Option<f64>,
}

/// The proxy's own ceiling: its best closed-loop throughput on the software backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ceiling {
    /// The payload.
    pub payload: String,
    /// The highest median throughput of the closed-loop cells.
    pub throughput_rps: f64,
    /// At this many connections.
    pub connections: usize,
    /// Its p99 there, ms.
    pub p99_ms: f64,
}

/// The machine a bench ran on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchMachine {
    /// Host name.
    pub hostname: String,
    /// CPU model (`/proc/cpuinfo`).
    pub cpu_model: String,
    /// Logical CPUs available.
    pub cores: usize,
    /// Memory, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// Kernel.
    pub kernel: String,
    /// Operating system (`/etc/os-release`).
    pub os: String,
    /// `/proc/loadavg` when the run began.
    pub load_average: String,
    /// The idle machine's stalls before the run (`xks-loadtest stalls`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_stalls: Option<Stalls>,
    /// What the operator said about the machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl BenchMachine {
    fn this(note: Option<String>, idle_stalls: Option<Stalls>) -> Self {
        let base = Machine::this();
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let field = |text: &str, name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_once([':', '=']))
                .map(|(_, v)| v.trim().trim_matches('"').to_owned())
        };
        let cpuinfo = read("/proc/cpuinfo");
        let meminfo = read("/proc/meminfo");
        let os_release = read("/etc/os-release");
        Self {
            hostname: base.hostname,
            cpu_model: field(&cpuinfo, "model name").unwrap_or_else(|| "unknown".into()),
            cores: base.cores,
            memory_mib: field(&meminfo, "MemTotal")
                .and_then(|v| v.trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|kb| kb / 1024),
            kernel: base.kernel,
            os: field(&os_release, "PRETTY_NAME").unwrap_or_else(|| "unknown".into()),
            load_average: read("/proc/loadavg").trim().to_owned(),
            idle_stalls,
            note,
        }
    }
}

/// A whole bench report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    /// [`SCHEMA`].
    pub schema: String,
    /// [`METHOD`].
    pub method: String,
    /// What was run of it.
    pub plan: Plan,
    /// The generator.
    pub tool: Tool,
    /// RFC 3339 UTC.
    pub started_at: String,
    /// Wall-clock seconds the whole bench took.
    pub elapsed_s: f64,
    /// The machine.
    pub machine: BenchMachine,
    /// `hsm`, `proxy_hsm`, `proxy_software`: those that ran.
    pub parts: BTreeMap<String, Part>,
    /// Per cell both `hsm` and `proxy_hsm` ran.
    #[serde(default)]
    pub overhead: Vec<Overhead>,
    /// Per payload, from `proxy_software`.
    #[serde(default)]
    pub software_ceiling: Vec<Ceiling>,
}

impl BenchReport {
    /// Whether a JSON document is a bench report (by its schema field).
    pub fn is_bench(value: &serde_json::Value) -> bool {
        value["schema"]
            .as_str()
            .is_some_and(|s| s.starts_with("xks-bench-report/"))
    }

    /// Reads a bench report.
    pub fn read(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let report: Self = serde_json::from_slice(&text)
            .map_err(|e| format!("{}: not an xks-bench report: {e}", path.display()))?;
        if report.schema != SCHEMA {
            return Err(format!(
                "{}: schema {} (this xks-loadtest reads {SCHEMA})",
                path.display(),
                report.schema
            )
            .into());
        }
        Ok(report)
    }

    /// Writes the report as pretty JSON.
    pub fn write(&self, path: &Path) -> Result<(), Error> {
        std::fs::write(path, serde_json::to_vec_pretty(self)?)
            .map_err(|e| format!("{}: {e}", path.display()).into())
    }
}

/// CPU counters: (machine busy ticks, machine all ticks) from `/proc/stat`.
fn machine_ticks() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal: idle and iowait are not busy.
    let all: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4)?;
    Some((all - idle, all))
}

/// A process's user + system CPU time, in clock ticks (`/proc/PID/stat`, fields 14
/// and 15, counted after the parenthesized command name).
fn process_ticks(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".into(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    let after = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the name: state is field 3, utime 14 and stime 15 (1-based over the line).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second of `/proc`'s counters (USER_HZ, 100 on every Linux port that
/// exposes it through `/proc`).
const USER_HZ: f64 = 100.0;

/// CPU counters at one moment.
struct CpuMark {
    at: Instant,
    machine: Option<(u64, u64)>,
    generator: Option<u64>,
    proxy: Option<u64>,
}

impl CpuMark {
    fn now(proxy_pid: Option<u32>) -> Self {
        Self {
            at: Instant::now(),
            machine: machine_ticks(),
            generator: process_ticks(None),
            proxy: proxy_pid.and_then(|p| process_ticks(Some(p))),
        }
    }

    /// CPU use since `self`; `measured_by_proxy` says whose CPU is per operation.
    fn since(&self, now: &Self, throughput_rps: f64, measured_by_proxy: bool) -> Option<Cpu> {
        let wall_s = now.at.duration_since(self.at).as_secs_f64();
        if wall_s <= 0.0 {
            return None;
        }
        let cores =
            |a: Option<u64>, b: Option<u64>| Some(b?.checked_sub(a?)? as f64 / USER_HZ / wall_s);
        let generator_cores = cores(self.generator, now.generator)?;
        let proxy_cores = cores(self.proxy, now.proxy);
        let machine_busy_pct = match (self.machine, now.machine) {
            (Some((b0, a0)), Some((b1, a1))) if a1 > a0 => {
                Some(100.0 * b1.saturating_sub(b0) as f64 / (a1 - a0) as f64)
            }
            _ => None,
        };
        let measured = if measured_by_proxy {
            proxy_cores
        } else {
            Some(generator_cores)
        };
        Some(Cpu {
            wall_s,
            machine_busy_pct,
            generator_cores,
            proxy_cores,
            us_per_op: measured
                .filter(|_| throughput_rps > 0.0)
                .map(|c| c * 1e6 / throughput_rps),
        })
    }
}

/// A proxy `bench` started; stopped when dropped.
struct Started {
    child: Child,
    drain: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(drain) = self.drain.take() {
            let _ = drain.join();
        }
    }
}

/// How long a started proxy may take to listen (SoftHSM2 opens its token first).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Starts `bin serve --config CONFIG`, its log (without the per-request audit lines,
/// hundreds of MB a run) in `log`, and waits until it serves.
fn start_proxy(bin: &Path, config: &Path, log: &Path) -> Result<Started, Error> {
    let mut child = Command::new(bin)
        .arg("serve")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let stderr = child.stderr.take().ok_or("the proxy's stderr")?;
    let mut file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let drain = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains(" xks request ") || line.contains("\"xks request\"") {
                continue;
            }
            if line.contains("serving the XKS API") {
                let _ = ready_tx.send(());
            }
            let _ = writeln!(file, "{line}");
        }
    });
    let mut started = Started {
        child,
        drain: Some(drain),
    };
    match ready_rx.recv_timeout(START_TIMEOUT) {
        Ok(()) => Ok(started),
        Err(_) => {
            let status = started.child.try_wait().ok().flatten();
            Err(format!(
                "{} serve --config {} did not start ({}); see {}",
                bin.display(),
                config.display(),
                status.map_or("still running".into(), |s| s.to_string()),
                log.display()
            )
            .into())
        }
    }
}

/// `bin --version`, trimmed.
fn version_of(bin: &Path) -> Option<String> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned()).filter(|v| !v.is_empty())
}

/// A free local port (bound, read, released).
fn free_port() -> Result<u16, Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `server.listen`'s port in a proxy config.
fn listen_port(config: &Path) -> Result<u16, Error> {
    let text = std::fs::read_to_string(config).map_err(|e| format!("{}: {e}", config.display()))?;
    let value: toml::Value =
        toml::from_str(&text).map_err(|e| format!("{}: {e}", config.display()))?;
    value["server"]
        .get("listen")
        .and_then(|l| l.as_str())
        .and_then(|l| l.parse::<std::net::SocketAddr>().ok())
        .map(|a| a.port())
        .ok_or_else(|| format!("{}: no server.listen address", config.display()).into())
}

/// Whether a proxy config's [hsm] works on session copies of its keys (then the raw
/// part does too, so both measure the same kind of key object).
fn session_key_copies(config: &Path) -> bool {
    std::fs::read_to_string(config)
        .ok()
        .and_then(|t| toml::from_str::<toml::Value>(&t).ok())
        .and_then(|v| v.get("hsm")?.get("session_key_copies")?.as_bool())
        .unwrap_or(false)
}

/// The quickstart's credential and certificate in front of the software backend, on
/// `port` (as perf/lib.sh's write_software_config).
fn software_config(quickstart: &Path, port: u16) -> Result<String, Error> {
    let env = crate::target::read_env_file(&quickstart.join("test-client.env"))?;
    let access_key_id = env
        .get("SIGV4_ACCESS_KEY_ID")
        .ok_or("the quickstart's test-client.env has no SIGV4_ACCESS_KEY_ID")?;
    let prefix = env.get("URI_PREFIX").cloned().unwrap_or_default();
    let key = env.get("KEY_ID").cloned().unwrap_or_else(|| "foo".into());
    let q = quickstart.display();
    Ok(format!(
        r#"# Written by `xks-loadtest bench`: the quickstart's credential in front of the
# software backend (benchmarks only: random keys in ordinary memory).
[server]
listen = "127.0.0.1:{port}"
tls_certificate = "{q}/server.pem"
tls_private_key = "{q}/server-key.pem"

[hsm]
backend = "software"
[[hsm.software_key]]
id = "{key}"
usage = ["ENCRYPT", "DECRYPT"]

[[key_store]]
name = "bench"
uri_prefix = "{prefix}"
region = "us-east-1"
keys = ["{key}"]
[[key_store.credential]]
access_key_id = "{access_key_id}"
secret_access_key_file = "{q}/sigv4-secret"
"#
    ))
}

/// Where a proxy part's target comes from.
struct ProxySource {
    env: PathBuf,
    endpoint: Option<String>,
    started: Option<(PathBuf, PathBuf)>,
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

/// The `hsm` part: the `hsm` subcommand's code, one call per cell and repetition.
fn hsm_part(plan: &Plan, config: &Path, key_label: &str) -> Result<Part, Error> {
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
async fn proxy_cells(
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

/// The proxy's overhead per cell both `hsm` and `proxy_hsm` ran.
fn overhead(parts: &BTreeMap<String, Part>) -> Vec<Overhead> {
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
fn ceiling(parts: &BTreeMap<String, Part>) -> Vec<Ceiling> {
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
