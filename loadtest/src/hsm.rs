//! `hsm`: raw PKCS#11 AES-256-GCM capacity of a token, without the proxy.
//!
//! For each session count N, N OS threads each open their own logged-in session, look
//! the key up once (a cached handle, as the proxy does), then call C_Encrypt (and
//! C_Decrypt, per the mix) in a loop. The session, the key and the calls are the
//! proxy's own measuring core, `xks_proxy::hsm::pkcs11::probe::GcmSession`, which
//! `xks-proxy hsm probe` samples with too: a 12-byte IV from the HSM's RNG
//! (C_GenerateRandom, drawn IV_BATCH IVs at a time like the proxy's default
//! `iv_source`) or the host's, 128-bit tags, the proxy's output checks, and the spec's
//! length-prefixed AAD. Latencies go into thread-local histograms merged at the end of
//! the step, and the report has the same format as `run`'s, so proxy overhead =
//! end-to-end minus raw HSM. With `--session-copy` each thread works on a session copy
//! of the key, as the proxy does with `hsm.session_key_copies`, so the two are
//! measured like for like.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cryptoki::context::Pkcs11;
use cryptoki::slot::Slot;
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use xks_proxy::hsm::pkcs11::probe::{find_token_key, GcmSession, SampleKey};
use xks_proxy::hsm::pkcs11::{open_token, IvSource, TokenSelector};
use zeroize::Zeroizing;

use crate::engine::{wait_until, LATE_AFTER};
use crate::histogram::{new_histogram, new_second_histogram};
use crate::report::{Measured, Report, Schedule};
use crate::stalls::{Meter, DEFAULT_INTERVAL};
use crate::workload::{Mix, Op};
use crate::Error;

/// Flags of `hsm`.
#[derive(Debug, Clone, clap::Args)]
pub struct HsmArgs {
    /// The proxy's config.toml (e.g. xks-quickstart/config.toml): module, token label,
    /// PIN file and [hsm.environment] are read from its [hsm] table. Flags override it.
    #[arg(long, visible_alias = "env", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// PKCS#11 module.
    #[arg(long, value_name = "PATH")]
    pub module: Option<PathBuf>,
    /// Token label.
    #[arg(long)]
    pub token_label: Option<String>,
    /// File holding the user PIN.
    #[arg(long, value_name = "FILE")]
    pub pin_file: Option<PathBuf>,
    /// The key's CKA_LABEL (the external key id).
    #[arg(long, default_value = "foo")]
    pub key_label: String,
    /// Session counts to measure, e.g. 1,2,4,8.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub sessions: Vec<usize>,
    /// Measured seconds per session count.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Unmeasured seconds before each session count.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Operation mix (encrypt and decrypt only).
    #[arg(long, default_value = "encrypt=1")]
    pub mix: Mix,
    /// Plaintext bytes.
    #[arg(long, default_value_t = 32)]
    pub plaintext_bytes: usize,
    /// Request AAD bytes (the HSM gets the spec's encoding of it, 3 bytes longer).
    #[arg(long, default_value_t = 100)]
    pub aad_bytes: usize,
    /// Where IVs come from: `hsm` (C_GenerateRandom, a batch of 64 IVs per call, as the
    /// proxy) or `host`.
    #[arg(long, default_value = "hsm", value_parser = ["hsm", "host"])]
    pub iv: String,
    /// Work on a session copy of the key (C_CopyObject with CKA_TOKEN false), as the
    /// proxy does with `hsm.session_key_copies`: SoftHSM2 re-reads a token object's file
    /// on every use, so without this the baseline measures a cost the proxy avoids.
    #[arg(long)]
    pub session_copy: bool,
    /// Open loop: this many operations a second in all, spread evenly over the
    /// sessions, each timed from when it was due (so a call that waits for a busy
    /// session counts its wait). Without it, every session calls as fast as it can.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Write the JSON report here.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// No per-second progress lines.
    #[arg(long)]
    pub quiet: bool,
}

/// Module, token and PIN after reading the config file.
struct Token {
    module: PathBuf,
    label: String,
    pin: Zeroizing<String>,
}

fn resolve(args: &HsmArgs) -> Result<Token, Error> {
    let mut module = args.module.clone();
    let mut label = args.token_label.clone();
    let mut pin_file = args.pin_file.clone();
    let mut pin = None;
    if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let value: toml::Value =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let hsm = value
            .get("hsm")
            .ok_or_else(|| format!("{}: no [hsm] table", path.display()))?;
        let text_of = |name: &str| hsm.get(name).and_then(|v| v.as_str()).map(str::to_owned);
        module = module.or_else(|| text_of("module").map(PathBuf::from));
        label = label.or_else(|| text_of("token_label"));
        pin_file = pin_file.or_else(|| text_of("pin_file").map(|f| base.join(f)));
        pin = text_of("pin");
        if let Some(environment) = hsm.get("environment").and_then(|v| v.as_table()) {
            for (name, value) in environment {
                if let Some(value) = value.as_str() {
                    // Edition 2021: set before any session thread exists (`run_hsm` is
                    // called from main's single thread, before the module loads).
                    std::env::set_var(name, base.join(value));
                }
            }
        }
    }
    let pin = match (pin_file, pin) {
        (Some(file), _) => std::fs::read_to_string(&file)
            .map_err(|e| format!("{}: {e}", file.display()))?
            .trim()
            .to_owned(),
        (None, Some(pin)) => pin,
        (None, None) => return Err("no PIN: give --pin-file (or --config)".into()),
    };
    Ok(Token {
        module: module
            .or_else(|| xks_proxy::quickstart::find_softhsm2().ok())
            .ok_or("no module: give --module (or --config)")?,
        label: label.ok_or("no token: give --token-label (or --config)")?,
        pin: Zeroizing::new(pin),
    })
}

/// What the report records about the HSM.
#[derive(Debug, Serialize)]
struct HsmInfo {
    module: String,
    token_label: String,
    manufacturer: String,
    model: String,
    key_label: String,
}

/// Runs `hsm`; returns the report.
pub fn run_hsm(args: &HsmArgs) -> Result<Report, Error> {
    if args.mix.uses(Op::Metadata) || args.mix.uses(Op::Health) {
        return Err("hsm measures encrypt and decrypt only".into());
    }
    if args.sessions.is_empty() || args.sessions.contains(&0) {
        return Err("--sessions needs counts above 0".into());
    }
    if args.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        return Err("--rate must be above 0".into());
    }
    let token = resolve(args)?;
    let selector = TokenSelector::Label(token.label.clone());
    let (pkcs11, slot, first) = open_token(&token.module, &selector, &token.pin)?;
    let info = pkcs11.get_token_info(slot)?;
    // Fail early, with a clear message, if the key is not there.
    find_token_key(&first, &args.key_label)?;
    let hsm_info = HsmInfo {
        module: token.module.display().to_string(),
        token_label: token.label.clone(),
        manufacturer: info.manufacturer_id().trim().to_owned(),
        model: info.model().trim().to_owned(),
        key_label: args.key_label.clone(),
    };
    let started = time::OffsetDateTime::now_utc();
    let aad = xks_proxy::xks::aad::hsm_aad(&vec![0x61; args.aad_bytes], &[])
        .map_err(|e| format!("--aad-bytes: {}", e.message()))?;
    let mut steps = Vec::new();
    let mut best: Option<(f64, Measured)> = None;
    for &sessions in &args.sessions {
        let measured = step(args, &pkcs11, slot, &token.pin, sessions, &aad)?;
        let mut summary = measured.step();
        summary.sessions = Some(sessions);
        summary.offered_rps = args.rate;
        if !args.quiet {
            eprintln!(
                "{sessions} sessions: {:.0} ops/s, p50 {:.3} ms, p99 {:.3} ms, {} errors",
                summary.achieved_rps,
                summary.latency_ms.p50,
                summary.latency_ms.p99,
                summary.errors
            );
        }
        if best
            .as_ref()
            .map_or(true, |(rate, _)| summary.achieved_rps > *rate)
        {
            best = Some((summary.achieved_rps, measured));
        }
        steps.push(summary);
    }
    drop(first);
    let (_, best) = best.expect("at least one session count");
    let config = serde_json::json!({
        "sessions": args.sessions,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "mix": args.mix.to_string(),
        "plaintext_bytes": args.plaintext_bytes,
        "aad_bytes": args.aad_bytes,
        "iv": args.iv,
        "session_copy": args.session_copy,
        "mode": if args.rate.is_some() { "open loop" } else { "closed loop" },
        "rate_rps": args.rate,
        "histograms_from": "the session count with the highest throughput",
    });
    let mut report = Report::new("hsm", started, None, config, &best, None);
    report.hsm = Some(serde_json::to_value(hsm_info)?);
    report.steps = steps;
    Ok(report)
}

/// One thread's records.
struct ThreadRecords {
    per_op: [Histogram<u64>; 2],
    errors: [u64; 2],
    error_names: BTreeMap<String, u64>,
    seconds: Vec<(Histogram<u64>, u64)>,
    /// Open loop: how late each measured call started after it was due (µs), and how
    /// many started over [`LATE_AFTER`] late.
    started_late: Option<Histogram<u64>>,
    late: u64,
}

fn step(
    args: &HsmArgs,
    pkcs11: &Pkcs11,
    slot: Slot,
    pin: &str,
    sessions: usize,
    aad: &[u8],
) -> Result<Measured, Error> {
    let warmup = Duration::from_secs_f64(args.warmup.max(0.0));
    let duration = Duration::from_secs_f64(args.duration.max(0.001));
    let start = Instant::now() + Duration::from_millis(50);
    let measure_start = start + warmup;
    let end = measure_start + duration;
    let measure_since_epoch = (SystemTime::now() + Duration::from_millis(50) + warmup)
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let measure_unix = measure_since_epoch.as_secs();
    let iv_source = if args.iv == "host" {
        IvSource::ProxyRandom
    } else {
        IvSource::HsmRandom
    };
    let meter = Meter::start(DEFAULT_INTERVAL, measure_start, end)?;
    let results: Vec<Result<ThreadRecords, Error>> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..sessions)
            .map(|index| {
                // Session `index` of N takes operations index, index + N, index + 2N…
                let pace = args.rate.map(|rate| Pace {
                    rate,
                    first: index as u64,
                    every: sessions as u64,
                });
                scope.spawn(move || {
                    session_loop(
                        args,
                        pkcs11,
                        slot,
                        pin,
                        aad,
                        iv_source,
                        pace,
                        (start, measure_start, end),
                    )
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err("a session thread panicked".into()))
            })
            .collect()
    });
    let stalls = meter.finish()?;
    let mut per_op = vec![
        (Op::Encrypt.name().to_owned(), new_histogram(), 0),
        (Op::Decrypt.name().to_owned(), new_histogram(), 0),
    ];
    let mut error_counts = BTreeMap::new();
    let mut seconds: Vec<(Histogram<u64>, u64)> = Vec::new();
    let (mut started_late, mut late) = (None::<Histogram<u64>>, 0);
    for result in results {
        let records = result?;
        if let Some(h) = &records.started_late {
            started_late.get_or_insert_with(new_histogram).add(h)?;
            late += records.late;
        }
        for (i, (_, histogram, errors)) in per_op.iter_mut().enumerate() {
            histogram.add(&records.per_op[i])?;
            *errors += records.errors[i];
        }
        for (name, n) in records.error_names {
            *error_counts.entry(name).or_insert(0) += n;
        }
        for (i, (h, e)) in records.seconds.into_iter().enumerate() {
            if i >= seconds.len() {
                seconds.push((new_second_histogram(), 0));
            }
            seconds[i].0.add(&h)?;
            seconds[i].1 += e;
        }
    }
    let total: u64 = per_op.iter().map(|(_, h, _)| h.len()).sum();
    let errors: u64 = per_op.iter().map(|(_, _, e)| e).sum();
    Ok(Measured {
        per_op,
        status_counts: [("ok".to_owned(), total - errors)]
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .collect(),
        error_counts,
        late,
        unsent: 0,
        series: seconds
            .into_iter()
            .enumerate()
            .filter(|(_, (h, _))| !h.is_empty())
            .map(|(i, (h, e))| (measure_unix + i as u64, i as u64, h, e))
            .collect(),
        window_start_unix_ms: Some(measure_since_epoch.as_millis() as u64),
        seconds: duration.as_secs_f64(),
        stalls: Some(stalls),
        // The session threads pace themselves: released and sent are one moment.
        schedule: started_late.map(|h| Schedule::new(&h, &h, late)),
    })
}

/// Open loop: operation `i` of all sessions is due at `start + i/rate`; one session
/// takes `first`, `first + every`, `first + 2·every`…
#[derive(Debug, Clone, Copy)]
struct Pace {
    rate: f64,
    first: u64,
    every: u64,
}

impl Pace {
    /// When this session's `n`-th operation is due.
    fn due(&self, start: Instant, n: u64) -> Instant {
        start + Duration::from_secs_f64((self.first + n * self.every) as f64 / self.rate)
    }
}

#[allow(clippy::too_many_arguments)]
fn session_loop(
    args: &HsmArgs,
    pkcs11: &Pkcs11,
    slot: Slot,
    pin: &str,
    aad: &[u8],
    iv_source: IvSource,
    pace: Option<Pace>,
    (start, measure_start, end): (Instant, Instant, Instant),
) -> Result<ThreadRecords, Error> {
    // The session, the key and the calls are the proxy's (the probe's measuring core):
    // the same IV batches, GCM parameters and output checks.
    let key = SampleKey::Token {
        label: args.key_label.clone(),
        session_copy: args.session_copy,
    };
    let mut session = GcmSession::open(pkcs11, slot, Some(pin), &key, iv_source, false, None)?;
    let mut rng = SmallRng::from_rng(&mut rand::rng());
    let mut plaintext = vec![0u8; args.plaintext_bytes];
    rng.fill(&mut plaintext[..]);
    // A ciphertext for Decrypt calls.
    let sealed = session.encrypt(&plaintext, aad)?;
    let mut records = ThreadRecords {
        per_op: [new_histogram(), new_histogram()],
        errors: [0; 2],
        error_names: BTreeMap::new(),
        seconds: Vec::new(),
        started_late: pace.map(|_| new_histogram()),
        late: 0,
    };
    std::thread::sleep(start.saturating_duration_since(Instant::now()));
    for n in 0u64.. {
        // Closed loop: from the call. Open loop: from when the operation was due, so
        // that a session still busy with the last one counts the wait.
        let begin = match pace {
            None => Instant::now(),
            Some(pace) => pace.due(start, n),
        };
        if begin >= end {
            break;
        }
        // Open loop: how late this thread, its own pacer, woke for the call.
        let started_late = pace.map(|pace| {
            wait_until(begin, pace.rate / pace.every as f64);
            Instant::now().saturating_duration_since(begin)
        });
        let op = args.mix.pick(&mut rng);
        let result = match op {
            Op::Decrypt => session.decrypt(&sealed, aad).map(drop),
            _ => session.encrypt(&plaintext, aad).map(drop),
        };
        let done = Instant::now();
        if begin < measure_start {
            continue;
        }
        if let (Some(late), Some(h)) = (started_late, &mut records.started_late) {
            h.saturating_record(u64::try_from(late.as_micros()).unwrap_or(u64::MAX));
            if late > LATE_AFTER {
                records.late += 1;
            }
        }
        let i = usize::from(op == Op::Decrypt);
        let us = u64::try_from((done - begin).as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        records.per_op[i].saturating_record(us);
        let second = usize::try_from((done - measure_start).as_secs()).unwrap_or(usize::MAX);
        while records.seconds.len() <= second {
            records.seconds.push((new_second_histogram(), 0));
        }
        records.seconds[second].0.saturating_record(us);
        if let Err(e) = result {
            records.errors[i] += 1;
            records.seconds[second].1 += 1;
            *records.error_names.entry(e).or_insert(0) += 1;
        }
    }
    Ok(records)
}
