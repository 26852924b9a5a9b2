//! `run` and `search`: flags, the runtime, and turning windows into reports.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use xks_proxy::auth::SignOptions;

use crate::engine::{run_window, LoadSettings, Progress, WindowResult, Workload};
use crate::kms::{self, KmsArgs};
use crate::report::{steps_text, Report};
use crate::target::{Target, TargetArgs};
use crate::workload::{BodySettings, Mix};
use crate::{chart, Error};

/// What to send and how: shared by `run` and `search`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Weighted operation mix [default: encrypt=8,decrypt=1,metadata=1,health=0; with
    /// --kms: encrypt=50,decrypt=49,metadata=1,health=0].
    #[arg(long)]
    pub mix: Option<Mix>,
    /// Plaintext bytes per Encrypt.
    #[arg(long, default_value_t = 32)]
    pub plaintext_bytes: usize,
    /// AAD bytes per Encrypt and Decrypt (0: none) [default: 100; with --kms: 1024].
    #[arg(long)]
    pub aad_bytes: Option<usize>,
    /// Ask for a CDIV on every Encrypt, and check each one.
    #[arg(long)]
    pub cdiv: bool,
    /// HTTP/2 (ALPN h2) instead of HTTP/1.1.
    #[arg(long)]
    pub http2: bool,
    /// Connections (closed loop: each sends as soon as its answer arrives).
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// Concurrent streams per HTTP/2 connection.
    #[arg(long, default_value_t = 1)]
    pub streams: usize,
    /// Open a new TCP+TLS connection for every request (as KMS often does).
    #[arg(long)]
    pub new_connection_per_request: bool,
    /// Longest wait for an answer, ms (KMS waits 250).
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// Ciphertexts made by Encrypt before the load, for Decrypt requests.
    #[arg(long, default_value_t = 64)]
    pub pool_size: usize,
    /// Encrypt answers to decrypt at the end to check the plaintext comes back.
    #[arg(long, default_value_t = 100)]
    pub verify_samples: usize,
    /// Also send and sign x-amz-content-sha256 (KMS does not).
    #[arg(long)]
    pub sign_content_sha256: bool,
    /// Runtime worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// No live progress.
    #[arg(long, short)]
    pub quiet: bool,
    /// Write the JSON report here.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Write charts here (.svg, or .html for a page with tables and charts).
    #[arg(long, value_name = "FILE")]
    pub chart: Option<PathBuf>,
    /// `--metrics-listen` and `--metrics-hold`.
    #[command(flatten)]
    pub metrics: crate::metrics::MetricsArgs,
    /// `--kms` and its settings.
    #[command(flatten)]
    pub kms: KmsArgs,
}

/// Flags of `run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    load: LoadArgs,
    /// Open loop at this many requests per second (latency from the intended send
    /// time). Without it: closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Start the warm-up at this wall-clock time, Unix seconds (connecting 3 s before). Give
    /// generators on several machines the same time (their clocks in sync, e.g. by NTP)
    /// and their measured windows coincide, for `merge`.
    #[arg(long, value_name = "UNIX_SECONDS")]
    start_at: Option<f64>,
    /// Latency objective: p99 at most this many ms.
    #[arg(long)]
    slo_p99_ms: Option<f64>,
    /// Error objective, percent.
    #[arg(long, default_value_t = 0.1)]
    slo_error_pct: f64,
}

/// Flags of `search`.
#[derive(Debug, Clone, clap::Args)]
pub struct SearchArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    load: LoadArgs,
    /// First offered rate, req/s.
    #[arg(long, default_value_t = 100.0)]
    start: f64,
    /// Add this to the rate after each step that met the SLO.
    #[arg(long, conflicts_with = "factor")]
    step: Option<f64>,
    /// Multiply the rate by this after each step that met the SLO (default 1.5).
    #[arg(long)]
    factor: Option<f64>,
    /// Highest rate to try.
    #[arg(long, default_value_t = 1_000_000.0)]
    max: f64,
    /// Measured seconds per step.
    #[arg(long, default_value_t = 10.0)]
    step_duration: f64,
    /// Unmeasured seconds before each step.
    #[arg(long, default_value_t = 2.0)]
    step_warmup: f64,
    /// Latency objective: p99 at most this many ms.
    #[arg(long, default_value_t = 250.0)]
    slo_p99_ms: f64,
    /// Error objective, percent.
    #[arg(long, default_value_t = 0.1)]
    slo_error_pct: f64,
}

fn runtime(threads: Option<usize>) -> Result<tokio::runtime::Runtime, Error> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("xks-loadtest");
    if let Some(threads) = threads {
        builder.worker_threads(threads.max(1));
    }
    Ok(builder.build()?)
}

/// `--start-at`: a wall-clock time in the future, and not so far that it must be a
/// mistake (milliseconds given for seconds).
fn start_time(unix_seconds: f64) -> Result<SystemTime, Error> {
    let at = UNIX_EPOCH + seconds(unix_seconds, "--start-at")?;
    let now = SystemTime::now();
    match at.duration_since(now) {
        Err(past) => Err(format!(
            "--start-at is {:.1} s in the past: give every generator the same future time, e.g. $(( $(date +%s) + 30 ))",
            past.duration().as_secs_f64()
        )
        .into()),
        Ok(wait) if wait > START_AT_HORIZON => {
            Err("--start-at is more than a day ahead: it takes Unix seconds".into())
        }
        Ok(_) => Ok(at),
    }
}

/// The furthest ahead `--start-at` may be.
const START_AT_HORIZON: Duration = Duration::from_secs(24 * 3600);

fn seconds(value: f64, flag: &str) -> Result<Duration, Error> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| format!("{flag} must be a number of seconds ≥ 0").into())
}

impl LoadArgs {
    /// The mix: `--mix`, else the default (KMS's with `--kms`).
    fn mix(&self) -> Mix {
        self.mix.unwrap_or(if self.kms.kms {
            kms::MIX
        } else {
            Mix {
                weights: [8, 1, 1, 0],
            }
        })
    }

    fn aad_bytes(&self) -> usize {
        self.aad_bytes
            .unwrap_or(if self.kms.kms { kms::AAD_BYTES } else { 100 })
    }

    fn bodies(&self) -> BodySettings {
        BodySettings {
            plaintext_bytes: self.plaintext_bytes,
            aad_bytes: self.aad_bytes(),
            cdiv: self.cdiv,
        }
    }

    pub(crate) fn settings(
        &self,
        rate: Option<f64>,
        warmup: Duration,
        duration: Duration,
        label: String,
    ) -> Result<LoadSettings, Error> {
        Ok(LoadSettings {
            rate,
            connections: self.connections.max(1),
            streams: self.streams.max(1),
            warmup,
            duration,
            new_connection_per_request: self.new_connection_per_request,
            timeout: Duration::from_millis(self.timeout_ms.max(1)),
            mix: self.mix(),
            verify_samples: self.verify_samples,
            progress: Progress::choose(self.quiet),
            label,
            start_at: None,
            live: None,
            kms: self.kms.profile()?,
        })
    }

    pub(crate) fn config(&self, settings: &LoadSettings) -> Result<serde_json::Value, Error> {
        let mut config = serde_json::to_value(settings)?;
        config["http"] = if self.http2 { "HTTP/2" } else { "HTTP/1.1" }.into();
        config["bodies"] = serde_json::to_value(self.bodies())?;
        config["sign_content_sha256"] = self.sign_content_sha256.into();
        config["threads"] = self
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .into();
        config["pool_size"] = self.pool_size.into();
        Ok(config)
    }

    pub(crate) async fn workload(&self, target: Target) -> Result<Arc<Workload>, Error> {
        if self.aad_bytes() > xks_proxy::xks::aad::MAX_AAD_LEN {
            return Err("--aad-bytes must be at most 65535".into());
        }
        Ok(Arc::new(
            Workload::prepare(
                target,
                self.http2,
                SignOptions {
                    content_sha256_header: self.sign_content_sha256,
                },
                self.bodies(),
                self.mix(),
                self.pool_size,
            )
            .await?,
        ))
    }

    pub(crate) fn finish(&self, report: &Report) -> Result<(), Error> {
        if let Some(path) = &self.report {
            report.write(path)?;
        }
        if let Some(path) = &self.chart {
            chart::write(report, path)?;
        }
        Ok(())
    }
}

/// `run`.
pub fn run(args: &RunArgs) -> Result<ExitCode, Error> {
    if args.rate.is_some_and(|r| r.is_nan() || r <= 0.0) {
        return Err("--rate must be above 0".into());
    }
    let start_at = args.start_at.map(start_time).transpose()?;
    let target = Target::from_args(&args.target)?;
    let info = target.info();
    let mut settings = args.load.settings(
        args.rate,
        seconds(args.warmup, "--warmup")?,
        seconds(args.duration, "--duration")?,
        "run".into(),
    )?;
    if settings.duration.is_zero() {
        return Err("--duration must be above 0".into());
    }
    settings.start_at = start_at;
    let runtime = runtime(args.load.threads)?;
    let live = args.load.metrics.start(&runtime)?;
    settings.live = live.clone();
    let started = time::OffsetDateTime::now_utc();
    let mut config = args.load.config(&settings)?;
    if let Some(at) = args.start_at {
        config["start_at_unix"] = at.into();
    }
    config["mode"] = if args.rate.is_some() {
        "open loop"
    } else {
        "closed loop"
    }
    .into();
    let result: WindowResult = runtime.block_on(async {
        let workload = args.load.workload(target).await?;
        run_window(&workload, settings).await
    })?;
    let mut report = Report::new(
        "run",
        started,
        Some(info),
        config,
        &result.measured,
        args.slo_p99_ms.map(|p99| (p99, args.slo_error_pct)),
    );
    report.verification = Some(result.verification.clone());
    kms::judge(&mut report, result.kms.clone());
    print!("{}", report.text());
    args.load.finish(&report)?;
    args.load.metrics.hold(&runtime, live.as_ref());
    if result.verification.failures() > 0 {
        eprintln!(
            "error: {} verification failures: the proxy returned wrong results",
            result.verification.failures()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// `search`.
pub fn search(args: &SearchArgs) -> Result<ExitCode, Error> {
    if args.start.is_nan() || args.start <= 0.0 || args.max < args.start {
        return Err("--start must be above 0 and at most --max".into());
    }
    let factor = args.factor.unwrap_or(1.5);
    if args.step.is_none() && (factor.is_nan() || factor <= 1.0) {
        return Err("--factor must be above 1".into());
    }
    if args.step.is_some_and(|s| s.is_nan() || s <= 0.0) {
        return Err("--step must be above 0".into());
    }
    let target = Target::from_args(&args.target)?;
    let info = target.info();
    let warmup = seconds(args.step_warmup, "--step-warmup")?;
    let duration = seconds(args.step_duration, "--step-duration")?;
    if duration.is_zero() {
        return Err("--step-duration must be above 0".into());
    }
    let started = time::OffsetDateTime::now_utc();
    let slo = (args.slo_p99_ms, args.slo_error_pct);
    let runtime = runtime(args.load.threads)?;
    let live = args.load.metrics.start(&runtime)?;
    let workload = runtime.block_on(args.load.workload(target))?;

    let mut steps = Vec::new();
    let mut best: Option<(f64, WindowResult)> = None;
    let mut last: Option<WindowResult> = None;
    let mut failures = 0;
    let mut rate = args.start;
    let mut config = serde_json::Value::Null;
    while rate <= args.max {
        let mut settings =
            args.load
                .settings(Some(rate), warmup, duration, format!("{rate:.0} req/s"))?;
        settings.live = live.clone();
        if config.is_null() {
            config = args.load.config(&settings)?;
        }
        let result = runtime.block_on(run_window(&workload, settings))?;
        failures += result.verification.failures();
        let mut step = result.measured.step();
        step.offered_rps = Some(rate);
        step.kms = result.kms.clone();
        let met = kms::step_met(&step, slo);
        step.met_slo = Some(met);
        if !args.load.quiet {
            eprintln!(
                "{rate:>10.0} req/s offered: {:.0} achieved, p99 {:.3} ms, {:.3}% errors, {} late, machine stalls up to {:.3} ms: {}",
                step.achieved_rps,
                step.latency_ms.p99,
                step.error_pct,
                step.late,
                step.stalls.as_ref().map_or(0.0, |s| s.late_ms.max),
                if met { "met" } else { "FAILED" }
            );
        }
        steps.push(step);
        if !met {
            last = Some(result);
            break;
        }
        best = Some((rate, result));
        rate = match args.step {
            Some(step) => rate + step,
            None => rate * factor,
        };
    }
    config["mode"] = "search".into();
    config["search"] = serde_json::json!({
        "start": args.start, "step": args.step, "factor": args.step.is_none().then_some(factor),
        "max": args.max, "step_duration_s": args.step_duration, "step_warmup_s": args.step_warmup,
        "histograms_from": "the highest step that met the SLO (else the first step)",
    });
    let (max_rate, shown) = match (best, last) {
        (Some((rate, result)), _) => (Some(rate), result),
        (None, Some(result)) => (None, result),
        (None, None) => return Err("no step ran (is --start above --max?)".into()),
    };
    let mut report = Report::new(
        "search",
        started,
        Some(info),
        config,
        &shown.measured,
        Some(slo),
    );
    report.verification = Some(shown.verification);
    kms::judge(&mut report, shown.kms);
    report.steps = steps;
    report.max_rate_meeting_slo = max_rate;
    println!("{}", steps_text(&report.steps));
    match max_rate {
        Some(rate) => println!(
            "highest rate meeting p99 <= {} ms and errors <= {}%: {rate:.0} req/s\n",
            slo.0, slo.1
        ),
        None => println!(
            "no rate met p99 <= {} ms and errors <= {}% (the first step is shown)\n",
            slo.0, slo.1
        ),
    }
    print!("{}", report.text());
    args.load.finish(&report)?;
    args.load.metrics.hold(&runtime, live.as_ref());
    if failures > 0 {
        eprintln!("error: {failures} verification failures: the proxy returned wrong results");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
