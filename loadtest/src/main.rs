//! The `xks-loadtest` command: thin; parses the command line and calls the library.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use xks_loadtest::report::gate::{self, GateArgs};
use xks_loadtest::{bench, chart, commands, hsm, plan, presign, report, stalls, Error};

/// The proxy's allocator, the PKCS#11 module's included (see the proxy's `main.rs`), so
/// that `hsm` measures the module as the proxy runs it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Load generator and capacity search for AWS KMS XKS proxies, with a raw PKCS#11 baseline"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load a proxy for a while (open loop with --rate, closed loop without) and report.
    Run(commands::RunArgs),
    /// Find the highest rate that meets the SLO: open-loop steps of rising rate.
    Search(commands::SearchArgs),
    /// The benchmark method for HSM vendors (docs/benchmark-method.md): raw HSM, the
    /// proxy on it and on the software backend, in one JSON report and a summary.
    Bench(bench::BenchArgs),
    /// A capacity plan in KMS's terms: the highest rate meeting a KMS objective for each
    /// setting swept, what saturates first, replicas and sessions for a target rate.
    Plan(Box<plan::PlanArgs>),
    /// Raw PKCS#11 AES-256-GCM capacity of a token at 1..N sessions (no proxy).
    Hsm(hsm::HsmArgs),
    /// How long this machine stalls a sleeping thread by itself (run it idle, before
    /// trusting a tail latency measured here).
    Stalls(stalls::StallsArgs),
    /// Sign one request and write it as a wrk Lua script (valid for five minutes).
    Presign(presign::PresignArgs),
    /// Add reports of several generator machines that ran at the same time.
    Merge {
        /// Reports to add.
        #[arg(required = true)]
        reports: Vec<PathBuf>,
        /// The merged report.
        #[arg(long, short)]
        output: PathBuf,
    },
    /// Throughput and percentiles of two reports (`run`, `search`, `hsm` or `bench`)
    /// side by side, with ratios; with --fail-above, a regression gate.
    Compare {
        /// Baseline (A).
        a: PathBuf,
        /// Compared (B).
        b: PathBuf,
        #[command(flatten)]
        gate: GateArgs,
    },
    /// Charts of a report: SVG, or an HTML page with tables and charts (`-o x.html`).
    Chart {
        /// The report.
        report: PathBuf,
        /// Output file (.svg or .html).
        #[arg(long, short)]
        output: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => commands::run(&args),
        Command::Search(args) => commands::search(&args),
        Command::Bench(args) => bench::bench(&args),
        Command::Plan(args) => plan::plan(&args),
        Command::Hsm(args) => run_hsm(&args),
        Command::Stalls(args) => stalls::run_stalls(&args).map(|s| {
            println!("{}", s.line());
            ExitCode::SUCCESS
        }),
        Command::Presign(args) => presign::presign(&args).map(|()| ExitCode::SUCCESS),
        Command::Merge { reports, output } => merge(&reports, &output),
        Command::Compare { a, b, gate } => compare(&a, &b, &gate),
        Command::Chart { report, output } => report::Report::read(&report)
            .and_then(|r| chart::write(&r, &output))
            .map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_hsm(args: &hsm::HsmArgs) -> Result<ExitCode, Error> {
    let report = hsm::run_hsm(args)?;
    print!("{}", report::steps_text(&report.steps));
    println!("\nbest session count:");
    print!("{}", report.text());
    if let Some(path) = &args.report {
        report.write(path)?;
    }
    Ok(if report.summary.errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn merge(inputs: &[PathBuf], output: &std::path::Path) -> Result<ExitCode, Error> {
    let reports = inputs
        .iter()
        .map(|p| report::Report::read(p))
        .collect::<Result<Vec<_>, _>>()?;
    let merged = report::merge(&reports)?;
    print!("{}", merged.text());
    merged.write(output)?;
    Ok(ExitCode::SUCCESS)
}

fn compare(a: &std::path::Path, b: &std::path::Path, args: &GateArgs) -> Result<ExitCode, Error> {
    let (a_name, b_name) = (a.display().to_string(), b.display().to_string());
    let is_bench = |path: &std::path::Path| -> Result<bool, Error> {
        let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(serde_json::from_slice::<serde_json::Value>(&text)
            .is_ok_and(|v| bench::BenchReport::is_bench(&v)))
    };
    let scopes = match (is_bench(a)?, is_bench(b)?) {
        (true, true) => {
            let (ra, rb) = (bench::BenchReport::read(a)?, bench::BenchReport::read(b)?);
            print!("{}", bench::compare(&ra, &rb, &a_name, &b_name)?);
            bench::scopes(&ra, &rb)
        }
        (false, false) => {
            let (ra, rb) = (report::Report::read(a)?, report::Report::read(b)?);
            print!("{}", report::compare(&ra, &rb, &a_name, &b_name));
            gate::report_scopes(&ra, &rb)
        }
        _ => return Err("a bench report is compared with a bench report only".into()),
    };
    let Some(pct) = args.fail_above else {
        return Ok(ExitCode::SUCCESS);
    };
    if !(pct.is_finite() && pct >= 0.0) {
        return Err("--fail-above must be a percentage of 0 or more".into());
    }
    let verdict = gate::verdict(&gate::check(&scopes, &args.metrics(), pct), pct);
    print!("{}", verdict.text);
    Ok(if verdict.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
