//! CPU use while a cell runs, from `/proc` (Linux): the machine's busy share, the
//! generator's and the started proxy's cores, CPU per operation.

use super::*;

/// CPU counters: (machine busy ticks, machine all ticks) from `/proc/stat`.
pub(super) fn machine_ticks() -> Option<(u64, u64)> {
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
pub(super) fn process_ticks(pid: Option<u32>) -> Option<u64> {
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
pub(super) const USER_HZ: f64 = 100.0;

/// CPU counters at one moment.
pub(super) struct CpuMark {
    at: Instant,
    machine: Option<(u64, u64)>,
    generator: Option<u64>,
    proxy: Option<u64>,
}

impl CpuMark {
    pub(super) fn now(proxy_pid: Option<u32>) -> Self {
        Self {
            at: Instant::now(),
            machine: machine_ticks(),
            generator: process_ticks(None),
            proxy: proxy_pid.and_then(|p| process_ticks(Some(p))),
        }
    }

    /// CPU use since `self`; `measured_by_proxy` says whose CPU is per operation.
    pub(super) fn since(
        &self,
        now: &Self,
        throughput_rps: f64,
        measured_by_proxy: bool,
    ) -> Option<Cpu> {
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
