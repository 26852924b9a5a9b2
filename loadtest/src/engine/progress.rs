//! The collector: adds the seconds the tasks send into the window's per-second series,
//! and shows the live progress once a second (a bar on a terminal, a plain line
//! otherwise, or nothing).

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::mpsc;

use super::{SecondMsg, Window};
use crate::histogram::{new_second_histogram, Percentiles};

/// How the live progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// An indicatif bar (stderr is a terminal).
    Bar,
    /// One plain line per second on stderr.
    Lines,
    /// Nothing.
    Quiet,
}

impl Progress {
    /// A bar on a terminal, lines otherwise, nothing when quiet.
    pub fn choose(quiet: bool) -> Self {
        if quiet {
            Self::Quiet
        } else if std::io::stderr().is_terminal() {
            Self::Bar
        } else {
            Self::Lines
        }
    }
}

/// Per second of the window (by offset from its start): the tasks' latencies added, and
/// their errors.
pub(super) type Seconds = Vec<Option<(Histogram<u64>, u64)>>;

/// Adds the tasks' seconds together and shows progress once a second.
pub(super) async fn collect(
    mut rx: mpsc::UnboundedReceiver<SecondMsg>,
    window: Arc<Window>,
) -> Seconds {
    let settings = &window.settings;
    let total = settings.warmup + settings.duration;
    let bar = (settings.progress == Progress::Bar).then(|| {
        let bar = indicatif::ProgressBar::new(total.as_secs().max(1));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {prefix} [{elapsed_precise}] {bar:24} {pos}/{len} s  {msg}",
            )
            .expect("a valid template"),
        );
        bar.set_prefix(settings.label.clone());
        bar
    });
    let mut seconds: Seconds = Vec::new();
    // A quarter second after each boundary, so tasks have sent the second just ended.
    let mut ticker = tokio::time::interval_at(
        (window.t0 + Duration::from_millis(1250)).into(),
        Duration::from_secs(1),
    );
    let (mut total_count, mut total_errors) = (0u64, 0u64);
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                let i = usize::try_from(msg.offset).unwrap_or(usize::MAX);
                if i >= seconds.len() {
                    seconds.resize_with(i + 1, || None);
                }
                total_count += msg.histogram.len();
                total_errors += msg.errors;
                let slot = seconds[i].get_or_insert_with(|| (new_second_histogram(), 0));
                let _ = slot.0.add(&msg.histogram);
                slot.1 += msg.errors;
            }
            _ = ticker.tick() => {
                let now = Instant::now();
                let line = if now < window.measure_start {
                    "warming up".to_owned()
                } else {
                    let last = (now - window.measure_start).as_secs().checked_sub(1);
                    let point = last
                        .and_then(|s| seconds.get(usize::try_from(s).unwrap_or(usize::MAX)))
                        .and_then(Option::as_ref);
                    match point {
                        Some((h, e)) => {
                            let p = Percentiles::of(h);
                            format!(
                                "{} req/s  p50 {:.2} ms  p99 {:.2} ms  errors {}  (total {} / {} errors)",
                                h.len(), p.p50, p.p99, e, total_count, total_errors
                            )
                        }
                        None => format!("(total {total_count} / {total_errors} errors)"),
                    }
                };
                match (&bar, settings.progress) {
                    (Some(bar), _) => {
                        bar.set_position((now - window.t0).as_secs().min(total.as_secs()));
                        bar.set_message(line);
                    }
                    (None, Progress::Lines) => {
                        eprintln!("[{:>4} s] {} {}", (now - window.t0).as_secs(), settings.label, line);
                    }
                    _ => {}
                }
            }
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    seconds
}
