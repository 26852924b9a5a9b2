//! The bench report's types, reading and writing it.

use super::*;

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
    pub(super) fn this(note: Option<String>, idle_stalls: Option<Stalls>) -> Self {
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
