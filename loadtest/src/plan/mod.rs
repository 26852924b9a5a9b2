//! `plan`: a capacity plan in KMS's terms.
//!
//! For each setting an operator can change (connections; and, when `plan` starts the
//! proxy itself from `--proxy-cmd` or `--config-template`, anything the command or the
//! template names as `{NAME}` and `--set NAME=V1,V2` sweeps: session-pool size, EKMs,
//! the simulated HSM's latency and parallelism), it runs `search`'s open-loop steps of
//! rising rate with the `--kms` profile and finds the highest rate meeting the objective
//! (KMS-perceived p99 and calls failing after KMS's retry). While each step runs it
//! watches the proxy (`probe.rs`): CPU from `/proc` when the proxy's pid is known,
//! the session pool from `/metrics` when given. `write.rs` turns the results into the
//! Markdown and HTML plan: sustainable rate per proxy and per session, the knee, what
//! saturates first, and replicas and sessions for a target rate with headroom.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::commands::LoadArgs;
use crate::engine::run_window;
use crate::kms;
use crate::target::{Target, TargetArgs};
use crate::Error;

pub mod probe;
mod write;

pub use write::{capacity, html, markdown, replicas, Capacity};

/// Flags of `plan`.
#[derive(Debug, Clone, clap::Args)]
pub struct PlanArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    load: LoadArgs,
    /// Sweep client connections (comma-separated); default: --connections alone.
    #[arg(long, value_delimiter = ',', value_name = "N,N,...")]
    sweep_connections: Vec<usize>,
    /// Sweep a setting of the proxy: NAME=V1,V2,... replaces {NAME} in --proxy-cmd and
    /// --config-template (repeat for several; every combination runs). `sessions` also
    /// gives the per-session rate.
    #[arg(long = "set", value_name = "NAME=V1,V2")]
    sets: Vec<String>,
    /// Start the proxy for each setting with this shell command ({NAME} replaced, and
    /// {config} by the rendered --config-template); stopped after the setting's search.
    #[arg(long, value_name = "COMMAND")]
    proxy_cmd: Option<String>,
    /// A proxy configuration with {NAME} placeholders, rendered per setting next to the
    /// template (so its relative paths hold). Without --proxy-cmd the proxy is started
    /// as `xks-proxy serve --config {config}`.
    #[arg(long, value_name = "FILE")]
    config_template: Option<PathBuf>,
    /// The proxy's Prometheus /metrics URL (http://host:port/metrics): the session
    /// pool's figures. Optional.
    #[arg(long, value_name = "URL")]
    metrics_url: Option<String>,
    /// Pid of a proxy already running on this machine, for its CPU (a proxy `plan`
    /// starts is watched without it).
    #[arg(long)]
    proxy_pid: Option<u32>,
    /// HSM sessions per proxy, for the per-session rate when neither --set sessions=
    /// nor /metrics tells.
    #[arg(long)]
    sessions: Option<u32>,
    /// First offered rate of each search, calls/s.
    #[arg(long, default_value_t = 100.0)]
    start: f64,
    /// Multiply the rate by this after each step that met the objective.
    #[arg(long, default_value_t = 1.5)]
    factor: f64,
    /// Highest rate to try.
    #[arg(long, default_value_t = 100_000.0)]
    max: f64,
    /// Measured seconds per step.
    #[arg(long, default_value_t = 10.0)]
    step_duration: f64,
    /// Unmeasured seconds before each step.
    #[arg(long, default_value_t = 2.0)]
    step_warmup: f64,
    /// Objective: p99 of KMS-perceived latency at most this, ms.
    #[arg(long, default_value_t = 200.0)]
    objective_p99_ms: f64,
    /// Objective: at most this percent of calls failing after KMS's retry.
    #[arg(long, default_value_t = 0.1)]
    objective_failed_pct: f64,
    /// Target rate the plan sizes for, calls/s over all key stores.
    #[arg(long)]
    target_tps: Option<f64>,
    /// Key stores the target rate is spread over (KMS's quota is per key store).
    #[arg(long, default_value_t = 1)]
    key_stores: u32,
    /// Headroom: plan each replica to run at most this share of its sustainable rate.
    #[arg(long, default_value_t = 0.7)]
    utilization: f64,
    /// Write the plan as Markdown here.
    #[arg(long, short, value_name = "FILE.md")]
    output: Option<PathBuf>,
    /// Write the plan as HTML with the curves here.
    #[arg(long, value_name = "FILE.html")]
    html: Option<PathBuf>,
    /// Write the plan's data as JSON here.
    #[arg(long, value_name = "FILE.json")]
    json: Option<PathBuf>,
}

/// One step of one setting's search.
#[derive(Debug, Clone, Serialize)]
pub struct PlanStep {
    /// Offered rate, calls/s.
    pub offered_rps: f64,
    /// Achieved, requests/s (retries included).
    pub achieved_rps: f64,
    /// KMS-perceived p99, ms.
    pub kms_p99_ms: f64,
    /// Calls answered on the first try, percent.
    pub first_try_pct: f64,
    /// Calls failed after KMS's retry, percent.
    pub failed_pct: f64,
    /// Some minute would have fired an AWS alarm.
    pub alarm: bool,
    /// Met the objective.
    pub met: bool,
    /// Requests the generator could not send in time.
    pub unsent: u64,
    /// What was seen of the proxy.
    pub observed: probe::Observed,
}

/// One setting and its search.
#[derive(Debug, Clone, Serialize)]
pub struct Setting {
    /// `connections=32 sessions=4`.
    pub label: String,
    /// Client connections.
    pub connections: usize,
    /// The swept proxy values.
    pub values: BTreeMap<String, String>,
    /// HSM sessions per proxy, if known.
    pub sessions: Option<f64>,
    /// The steps.
    pub steps: Vec<PlanStep>,
    /// The highest offered rate that met the objective.
    pub sustainable_rps: Option<f64>,
}

impl Setting {
    /// The knee: the highest step before KMS-perceived p99 passed twice the first
    /// step's (the curve's flat part ends), or the last step that met the objective.
    pub fn knee(&self) -> Option<f64> {
        let base = self.steps.first()?.kms_p99_ms.max(0.001);
        let mut knee = None;
        for s in &self.steps {
            if s.kms_p99_ms > 2.0 * base || !s.met {
                break;
            }
            knee = Some(s.offered_rps);
        }
        knee
    }

    /// What saturated first: judged at the first step that failed (else the last).
    pub fn saturation(&self) -> String {
        let Some(step) = self.steps.iter().find(|s| !s.met).or(self.steps.last()) else {
            return "nothing ran".into();
        };
        let o = &step.observed;
        let cpu = o.proxy_cpu_pct;
        if cpu.is_some_and(|c| c >= 85.0) {
            return format!(
                "proxy CPU ({:.0}% of the machine's cores at {:.0} calls/s)",
                cpu.unwrap_or(0.0),
                step.offered_rps
            );
        }
        if let (Some(sessions), Some(busy)) = (o.sessions, o.busy_avg) {
            let queue = o.queue_max.unwrap_or(0.0);
            let shed = o.shed.unwrap_or(0.0);
            // A queue of a few requests comes and goes at any load; half the pool's size
            // waiting, or any shed, is the pool at its end.
            if busy >= 0.9 * sessions || queue >= (0.5 * sessions).max(2.0) || shed > 0.0 {
                return format!(
                    "session pool: {busy:.1} of {sessions:.0} sessions busy on average, up to {queue:.0} waiting, {shed:.0} shed at {:.0} calls/s (more sessions if the HSM has capacity to spare, else the HSM)",
                    step.offered_rps
                );
            }
            return format!(
                "neither the proxy's CPU nor its pool ({busy:.1} of {sessions:.0} sessions busy, proxy CPU {}, at {:.0} calls/s): the HSM, the path to it, or the machine itself (a generator on the same box: see its stalls)",
                cpu.map_or("unknown".into(), |c| format!("{c:.0}%")),
                step.offered_rps
            );
        }
        match cpu {
            Some(c) => format!(
                "not the proxy's CPU ({c:.0}%); the session pool or HSM (no /metrics to tell)"
            ),
            None => "unknown: give --metrics-url and a local proxy (--proxy-pid or --proxy-cmd) to attribute it".into(),
        }
    }
}

/// The whole plan: objective, settings, and the command that made it.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// The command line.
    pub command: String,
    /// RFC 3339 start.
    pub started_at: String,
    /// The generator machine.
    pub machine: crate::report::Machine,
    /// The proxy's endpoint.
    pub endpoint: String,
    /// Objective: KMS-perceived p99, ms.
    pub objective_p99_ms: f64,
    /// Objective: failed calls, percent.
    pub objective_failed_pct: f64,
    /// Step length, seconds.
    pub step_duration_s: f64,
    /// The KMS profile.
    pub kms: kms::Profile,
    /// The settings.
    pub settings: Vec<Setting>,
    /// Target rate, if given.
    pub target_tps: Option<f64>,
    /// Key stores.
    pub key_stores: u32,
    /// Planned utilization of a replica.
    pub utilization: f64,
}

/// The cartesian product of the `--set` sweeps.
fn combinations(sets: &[String]) -> Result<Vec<BTreeMap<String, String>>, Error> {
    let mut all = vec![BTreeMap::new()];
    for set in sets {
        let (name, values) = set
            .split_once('=')
            .ok_or_else(|| format!("--set {set:?}: expected NAME=V1,V2"))?;
        let values: Vec<&str> = values
            .split(',')
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        if name.is_empty() || values.is_empty() {
            return Err(format!("--set {set:?}: expected NAME=V1,V2").into());
        }
        all = all
            .into_iter()
            .flat_map(|base| {
                values.iter().map(move |v| {
                    let mut m = base.clone();
                    m.insert(name.trim().to_owned(), (*v).to_owned());
                    m
                })
            })
            .collect();
    }
    Ok(all)
}

/// `text` with every `{NAME}` of `values` replaced.
fn render(text: &str, values: &BTreeMap<String, String>) -> String {
    values.iter().fold(text.to_owned(), |t, (k, v)| {
        t.replace(&format!("{{{k}}}"), v)
    })
}

/// A proxy `plan` started; killed when dropped.
struct Started {
    child: Child,
    config: Option<PathBuf>,
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(config) = &self.config {
            let _ = std::fs::remove_file(config);
        }
    }
}

impl PlanArgs {
    fn start_proxy(
        &self,
        values: &BTreeMap<String, String>,
        index: usize,
    ) -> Result<Option<Started>, Error> {
        let mut values = values.clone();
        let mut config = None;
        if let Some(template) = &self.config_template {
            let text = std::fs::read_to_string(template)
                .map_err(|e| format!("{}: {e}", template.display()))?;
            let path = template.with_file_name(format!(
                ".xks-loadtest-plan-{}-{index}.toml",
                std::process::id()
            ));
            std::fs::write(&path, render(&text, &values))?;
            values.insert("config".into(), path.display().to_string());
            config = Some(path);
        }
        let command = match (&self.proxy_cmd, &config) {
            (Some(cmd), _) => render(cmd, &values),
            (None, Some(path)) => format!("xks-proxy serve --config '{}'", path.display()),
            (None, None) => return Ok(None),
        };
        // `exec`: the shell becomes the proxy, so its pid is the proxy's.
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("exec {command}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting the proxy ({command}): {e}"))?;
        Ok(Some(Started { child, config }))
    }
}

/// Waits until `target` takes TCP connections (a proxy just started).
fn wait_for(target: &Target, started: &mut Started) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&(target.host.as_str(), target.port))?
        .next()
        .ok_or("the endpoint's host does not resolve")?;
    loop {
        if let Some(status) = started.child.try_wait()? {
            return Err(format!("the proxy exited ({status}) before serving").into());
        }
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("the proxy did not listen within 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn seconds(value: f64, flag: &str) -> Result<Duration, Error> {
    Duration::try_from_secs_f64(value).map_err(|_| format!("{flag} must be seconds ≥ 0").into())
}

/// `plan`.
pub fn plan(args: &PlanArgs) -> Result<ExitCode, Error> {
    if args.start.is_nan()
        || args.start <= 0.0
        || args.max < args.start
        || args.factor.is_nan()
        || args.factor <= 1.0
    {
        return Err("--start must be above 0 and at most --max, --factor above 1".into());
    }
    if !(args.utilization > 0.0 && args.utilization <= 1.0) {
        return Err("--utilization must be above 0 and at most 1".into());
    }
    let mut load = args.load.clone();
    load.kms.kms = true;
    let profile = load.kms.profile()?.ok_or("the KMS profile")?;
    let warmup = seconds(args.step_warmup, "--step-warmup")?;
    let duration = seconds(args.step_duration, "--step-duration")?;
    if duration.is_zero() {
        return Err("--step-duration must be above 0".into());
    }
    let objective = (args.objective_p99_ms, args.objective_failed_pct);
    let target = Target::from_args(&args.target)?;
    let endpoint = target.info().endpoint;
    let started_at = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let connections = if args.sweep_connections.is_empty() {
        vec![load.connections]
    } else {
        args.sweep_connections.clone()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("xks-loadtest")
        .build()?;
    let mut settings = Vec::new();
    for (index, values) in combinations(&args.sets)?.into_iter().enumerate() {
        let mut proxy = args.start_proxy(&values, index)?;
        if let Some(p) = &mut proxy {
            wait_for(&target, p)?;
        }
        let pid = proxy.as_ref().map(|p| p.child.id()).or(args.proxy_pid);
        let workload = runtime.block_on(load.workload(Target::from_args(&args.target)?))?;
        for &conns in &connections {
            let mut label: Vec<String> = vec![format!("connections={conns}")];
            label.extend(values.iter().map(|(k, v)| format!("{k}={v}")));
            let label = label.join(" ");
            let mut steps = Vec::new();
            let mut best = None;
            let mut sessions = values
                .get("sessions")
                .and_then(|v| v.parse::<f64>().ok())
                .or(args.sessions.map(f64::from));
            let mut rate = args.start;
            while rate <= args.max {
                let mut step_load = load.clone();
                step_load.connections = conns;
                let window = step_load.settings(
                    Some(rate),
                    warmup,
                    duration,
                    format!("{label}: {rate:.0}/s"),
                )?;
                let watch = probe::Watch::start(pid, args.metrics_url.as_deref());
                let result = runtime.block_on(run_window(&workload, window))?;
                let observed = watch.finish();
                if sessions.is_none() {
                    sessions = observed.sessions;
                }
                let mut step = result.measured.step();
                step.kms = result.kms.clone();
                let met = kms::step_met(&step, objective);
                let view = result.kms.ok_or("the KMS profile reports KMS's view")?;
                if !load.quiet {
                    eprintln!(
                        "{label}: {rate:.0} calls/s: KMS p99 {:.1} ms, {:.3}% failed, proxy CPU {}: {}",
                        view.latency_ms.p99,
                        view.failed_pct,
                        observed.proxy_cpu_pct.map_or("-".into(), |c| format!("{c:.0}%")),
                        if met { "met" } else { "FAILED" }
                    );
                }
                steps.push(PlanStep {
                    offered_rps: rate,
                    achieved_rps: step.achieved_rps,
                    kms_p99_ms: view.latency_ms.p99,
                    first_try_pct: view.first_try_pct,
                    failed_pct: view.failed_pct,
                    alarm: view.alarms.latency_fired || view.alarms.retryable_errors_fired,
                    met,
                    unsent: step.unsent,
                    observed,
                });
                if !met {
                    break;
                }
                best = Some(rate);
                rate *= args.factor;
            }
            settings.push(Setting {
                label,
                connections: conns,
                values: values.clone(),
                sessions,
                steps,
                sustainable_rps: best,
            });
        }
        drop(proxy);
    }
    let plan = Plan {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started_at,
        machine: crate::report::Machine::this(),
        endpoint,
        objective_p99_ms: objective.0,
        objective_failed_pct: objective.1,
        step_duration_s: args.step_duration,
        kms: profile,
        settings,
        target_tps: args.target_tps,
        key_stores: args.key_stores.max(1),
        utilization: args.utilization,
    };
    let text = markdown(&plan);
    print!("{text}");
    if let Some(path) = &args.output {
        write_file(path, &text)?;
    }
    if let Some(path) = &args.html {
        write_file(path, &html(&plan)?)?;
    }
    if let Some(path) = &args.json {
        write_file(path, &serde_json::to_string_pretty(&plan)?)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn write_file(path: &Path, text: &str) -> Result<(), Error> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_combine_and_render() {
        let all = combinations(&["sessions=1,2".into(), "latency=4,8".into()]).unwrap();
        assert_eq!(all.len(), 4);
        assert_eq!(
            render("s={sessions} l={latency} {other}", &all[3]),
            "s=2 l=8 {other}"
        );
        assert!(combinations(&["sessions".into()]).is_err());
        assert_eq!(combinations(&[]).unwrap().len(), 1);
    }
}
