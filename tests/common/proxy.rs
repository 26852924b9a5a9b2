//! The real `xks-proxy` process: started on port 0, its logs captured (or held back).

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;

/// A running proxy; killed when dropped.
pub struct Proxy {
    pub setup: Setup,
    pub addr: SocketAddr,
    /// The plain-HTTP admin listener, when the config has one.
    pub admin: Option<SocketAddr>,
    child: Child,
    /// Everything the process wrote to stderr (its logs).
    pub logs: Arc<Mutex<String>>,
}

impl Proxy {
    pub fn start(setup: Setup, env: &[(&str, &str)]) -> Self {
        Self::start_gated(setup, env, LogGate::default())
    }

    /// Starts the proxy with its stderr read only while `gate` is open: closed, the
    /// proxy's log reader has stopped reading.
    pub fn start_gated(setup: Setup, env: &[(&str, &str)], gate: LogGate) -> Self {
        let mut command = Command::new(BIN);
        command.arg("serve").arg("--config").arg(setup.config());
        for (k, v) in env {
            command.env(k, v);
        }
        Self::start_command(setup, command, gate)
    }

    /// Starts the proxy with `command`, which runs `xks-proxy serve` on the setup's
    /// configuration (e.g. through `sh -c '... exec'`, keeping the process id).
    pub fn start_command(setup: Setup, mut command: Command, gate: LogGate) -> Self {
        if !command.get_envs().any(|(name, _)| name == "RUST_LOG") {
            command.env("RUST_LOG", "debug");
        }
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().unwrap();
        let logs = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&logs);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                gate.wait_open();
                let Ok(n) = stderr.read(&mut buf) else { break };
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("xks-proxy listening on ")
            .unwrap_or_else(|| {
                std::thread::sleep(Duration::from_millis(200));
                panic!("proxy did not start: {line:?}\n{}", logs.lock().unwrap())
            })
            .parse()
            .unwrap();
        let text = std::fs::read_to_string(setup.config()).unwrap();
        let admin = text.contains("\n[admin]").then(|| {
            line.clear();
            stdout.read_line(&mut line).unwrap();
            line.trim()
                .strip_prefix("xks-proxy admin listening on ")
                .unwrap_or_else(|| panic!("no admin address: {line:?}"))
                .parse()
                .unwrap()
        });
        // Keep reading stdout so the process never writes into a closed pipe.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        Self {
            setup,
            addr,
            admin,
            child,
            logs,
        }
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// Whether `needle` shows up in the logs within 10 s. The proxy writes its logs
    /// from a thread that gathers lines for up to 2 ms (xks_proxy::logging), so a line
    /// may arrive just after the answer it belongs to.
    pub fn logged(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.logs().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    pub fn client(&self) -> Client {
        Client::new(self)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the process in KiB (Linux).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Sends SIGTERM without waiting.
    pub fn signal_term(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit.
    pub fn wait(mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }

    /// A plain-HTTP GET on the admin listener: (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        admin_request(self.admin.expect("config has [admin]"), "GET", path).await
    }

    /// Scrapes and parses `/metrics`.
    pub async fn scrape(&self) -> Metrics {
        let (status, text) = self.admin_get("/metrics").await;
        assert_eq!(status, 200, "{text}");
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
        Metrics { scrape, text }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a proxy's stderr is being read (see [`Proxy::start_gated`]); open by default.
#[derive(Clone)]
pub struct LogGate(Arc<(Mutex<bool>, std::sync::Condvar)>);

impl Default for LogGate {
    fn default() -> Self {
        Self(Arc::new((Mutex::new(true), std::sync::Condvar::new())))
    }
}

impl LogGate {
    /// Stops or resumes reading the proxy's stderr.
    pub fn set_open(&self, open: bool) {
        *self.0 .0.lock().unwrap() = open;
        self.0 .1.notify_all();
    }

    fn wait_open(&self) {
        let mut open = self.0 .0.lock().unwrap();
        while !*open {
            open = self.0 .1.wait(open).unwrap();
        }
    }
}
