//! What `plan` watches while a step runs: the proxy's CPU time (from `/proc/PID/stat`,
//! when the proxy runs on this machine) and its session pool (from its Prometheus
//! `/metrics`, when it has one): `xks_hsm_sessions`, `xks_hsm_sessions_busy`,
//! `xks_hsm_queue_depth`, `xks_shed_total`. Both are optional: any XKS proxy can be
//! planned for, only the attribution of the bottleneck needs them.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Clock ticks per second of `/proc/PID/stat`'s CPU times (`USER_HZ`, 100 on every
/// Linux architecture that Rust targets).
const USER_HZ: f64 = 100.0;
/// How often `/metrics` is read during a step.
const METRICS_EVERY: Duration = Duration::from_millis(250);

/// CPU seconds (user + system) the process has used, from `/proc/PID/stat`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: fields count from after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the state (field 3).
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// The pool figures of one `/metrics` reading.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PoolReading {
    /// Sessions in the pool.
    pub sessions: f64,
    /// Of those, busy.
    pub busy: f64,
    /// Requests waiting for a session.
    pub queue: f64,
    /// Requests shed so far.
    pub shed: f64,
}

/// Sums of the series named `name` (any labels) in a Prometheus text exposition.
fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        if let Some(value) = rest
            .rsplit(' ')
            .next()
            .and_then(|v| v.trim().parse::<f64>().ok())
        {
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}

/// Reads the pool figures from a `/metrics` text; `None` when it has none.
pub fn pool_reading(text: &str) -> Option<PoolReading> {
    Some(PoolReading {
        sessions: metric(text, "xks_hsm_sessions")?,
        busy: metric(text, "xks_hsm_sessions_busy")?,
        queue: metric(text, "xks_hsm_queue_depth").unwrap_or(0.0),
        shed: metric(text, "xks_shed_total").unwrap_or(0.0),
    })
}

/// GETs `url` (plain `http://host:port/path`) and returns the body.
pub fn http_get(url: &str) -> Option<String> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = std::net::ToSocketAddrs::to_socket_addrs(authority)
        .ok()?
        .next()?;
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(tcp, "GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n").ok()?;
    let mut text = String::new();
    tcp.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.to_owned())
        .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_owned()))
}

/// What was seen of the proxy during one step.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Observed {
    /// Proxy CPU, percent of the machine's cores.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_cpu_pct: Option<f64>,
    /// Pool sessions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sessions: Option<f64>,
    /// Average busy sessions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub busy_avg: Option<f64>,
    /// Largest queue of requests waiting for a session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_max: Option<f64>,
    /// Requests shed during the step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shed: Option<f64>,
}

/// Watches the proxy during a step, on a thread of its own.
#[derive(Debug)]
pub struct Watch {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<PoolReading>>>,
    pid: Option<u32>,
    cpu0: Option<f64>,
    t0: Instant,
}

impl Watch {
    /// Starts watching the process `pid` and the `/metrics` at `metrics_url`.
    pub fn start(pid: Option<u32>, metrics_url: Option<&str>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = metrics_url.map(|url| {
            let (url, stop) = (url.to_owned(), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut readings = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if let Some(r) = http_get(&url).as_deref().and_then(pool_reading) {
                        readings.push(r);
                    }
                    std::thread::sleep(METRICS_EVERY);
                }
                readings
            })
        });
        Self {
            stop,
            thread,
            pid,
            cpu0: pid.and_then(cpu_seconds),
            t0: Instant::now(),
        }
    }

    /// Stops watching; what was seen.
    pub fn finish(mut self) -> Observed {
        let wall = self.t0.elapsed().as_secs_f64();
        self.stop.store(true, Ordering::Relaxed);
        let readings = self
            .thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let proxy_cpu_pct = match (self.pid.and_then(cpu_seconds), self.cpu0) {
            (Some(end), Some(start)) if wall > 0.0 => Some(100.0 * (end - start) / wall / cores),
            _ => None,
        };
        let mut observed = Observed {
            proxy_cpu_pct,
            ..Observed::default()
        };
        if let (Some(first), Some(last)) = (readings.first(), readings.last()) {
            let n = readings.len() as f64;
            observed.sessions = Some(last.sessions);
            observed.busy_avg = Some(readings.iter().map(|r| r.busy).sum::<f64>() / n);
            observed.queue_max = Some(readings.iter().map(|r| r.queue).fold(0.0, f64::max));
            observed.shed = Some(last.shed - first.shed);
        }
        observed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_figures_come_from_the_exposition() {
        let text = "# HELP xks_hsm_sessions x\nxks_hsm_sessions{ekm=\"a\"} 4\nxks_hsm_sessions{ekm=\"b\"} 4\n\
                    xks_hsm_sessions_busy{ekm=\"a\"} 3\nxks_hsm_sessions_busy{ekm=\"b\"} 1\n\
                    xks_hsm_queue_depth 2\nxks_shed_total{reason=\"queue\"} 7\n";
        assert_eq!(
            pool_reading(text),
            Some(PoolReading {
                sessions: 8.0,
                busy: 4.0,
                queue: 2.0,
                shed: 7.0
            })
        );
        assert_eq!(pool_reading("other_metric 1\n"), None);
    }

    #[test]
    fn this_process_has_used_cpu() {
        let pid = std::process::id();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(cpu_seconds(pid).is_some_and(|s| s >= 0.0));
        assert_eq!(cpu_seconds(u32::MAX), None);
    }
}
