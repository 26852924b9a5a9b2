//! The systemd notify protocol, as a `Type=notify` unit with `WatchdogSec=` and
//! `LoadCredential=` runs the proxy (deploy/systemd/xks-proxy.service): a Unix datagram
//! socket plays the service manager, the real binary is started with NOTIFY_SOCKET,
//! WATCHDOG_USEC and WATCHDOG_PID (its own pid, as systemd sets it) pointing at it, and
//! its secrets come from a CREDENTIALS_DIRECTORY.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// The service manager's end of NOTIFY_SOCKET.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
    /// Every line received, in order.
    lines: Vec<String>,
}

impl NotifySocket {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Self {
            socket,
            path,
            _dir: dir,
            lines: Vec::new(),
        }
    }

    /// Receives until `line` has arrived `count` times in all; panics after a minute
    /// (a generous bound: the proxy sends within seconds).
    fn wait_for(&mut self, line: &str, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut buf = [0u8; 4096];
        while self.count(line) < count {
            assert!(
                Instant::now() < deadline,
                "no {line:?} ×{count}; received {:?}",
                self.lines
            );
            match self.socket.recv(&mut buf) {
                Ok(n) => {
                    let message = String::from_utf8(buf[..n].to_vec()).unwrap();
                    self.lines.extend(message.lines().map(str::to_owned));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn count(&self, line: &str) -> usize {
        self.lines.iter().filter(|l| *l == line).count()
    }
}

/// Starts `xks-proxy serve` as systemd would: its pid in WATCHDOG_PID (`exec` keeps
/// the shell's), a one-second watchdog, and `credentials` as CREDENTIALS_DIRECTORY.
fn start_under_systemd(setup: Setup, notify: &Path, credentials: Option<&Path>) -> Proxy {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(r#"WATCHDOG_PID=$$ exec "$0" serve --config "$1""#)
        .arg(BIN)
        .arg(setup.config())
        .env("NOTIFY_SOCKET", notify)
        .env("WATCHDOG_USEC", "1000000");
    if let Some(credentials) = credentials {
        command.env("CREDENTIALS_DIRECTORY", credentials);
    }
    Proxy::start_command(setup, command, LogGate::default())
}

/// GetHealthStatus's HTTP status and the EKM's `healthStatus`.
async fn health_status(proxy: &Proxy) -> (u16, String) {
    let body = serde_json::json!({ "requestMetadata": { "kmsRequestId": "r", "kmsOperation": "KmsHealthCheck" } });
    let reply = proxy
        .client()
        .post(Version::Http1, &health_path(), &body)
        .await;
    let ekm = reply.body["ekmFleetDetails"][0]["healthStatus"].as_str();
    (reply.status, ekm.unwrap_or_default().to_owned())
}

/// READY=1 once the health check passed, and then the proxy answers; WATCHDOG=1 at
/// half the interval; STOPPING=1 on SIGTERM. The secrets (HSM PIN, SigV4 secret, TLS
/// key) are read only from the credentials folder, named as `${CREDENTIALS_DIRECTORY}/…`.
#[tokio::test]
async fn ready_watchdog_and_stopping_reach_the_service_manager() {
    let setup = Setup::new();
    let credentials = tempfile::tempdir().unwrap();
    for file in ["hsm-pin", "sigv4-secret", "server-key.pem"] {
        std::fs::rename(setup.path(file), credentials.path().join(file)).unwrap();
        setup.edit_config(
            &format!("\"{file}\""),
            &format!("\"${{CREDENTIALS_DIRECTORY}}/{file}\""),
        );
    }
    let mut notify = NotifySocket::new();
    let proxy = start_under_systemd(setup, &notify.path, Some(credentials.path()));

    notify.wait_for("READY=1", 1);
    // Ready means serving: the very next request is answered, and the probe agrees.
    assert_eq!(
        health_status(&proxy).await,
        (200, "ACTIVE".to_owned()),
        "{}",
        proxy.logs()
    );
    assert_eq!(proxy.admin_get("/readyz").await.0, 200);
    assert!(notify.lines.iter().any(|l| l.starts_with("STATUS=")));

    // 1 s watchdog: pings every half second.
    notify.wait_for("WATCHDOG=1", 3);

    proxy.signal_term();
    notify.wait_for("STOPPING=1", 1);
    assert!(proxy.wait().success());
    assert_eq!(notify.count("READY=1"), 1, "{:?}", notify.lines);
}

/// No READY=1 while no EKM passes the health check (the health key is missing), though
/// the proxy is up and its watchdog pings; once the key exists, READY=1 follows.
#[tokio::test]
async fn ready_waits_for_an_ekm_that_serves() {
    let setup = Setup::new();
    setup.edit_config("health_check_key = \"", "health_check_key = \"later-");
    let text = std::fs::read_to_string(setup.config()).unwrap();
    let health_key = text
        .lines()
        .find_map(|l| l.strip_prefix("health_check_key = "))
        .unwrap()
        .trim_matches('"')
        .to_owned();
    let mut notify = NotifySocket::new();
    let proxy = start_under_systemd(setup, &notify.path, None);

    // Three pings span a second and more: the monitor has re-checked (every second
    // while not ACTIVE) and still not found the key.
    notify.wait_for("WATCHDOG=1", 3);
    assert_eq!(notify.count("READY=1"), 0, "{:?}", notify.lines);
    assert_eq!(proxy.admin_get("/readyz").await.0, 503);
    assert_eq!(health_status(&proxy).await, (200, "UNAVAILABLE".to_owned()));

    let out = proxy.setup.keys(&["create", &health_key]);
    assert!(out.status.success(), "{out:?}");
    notify.wait_for("READY=1", 1);
    assert_eq!(proxy.admin_get("/readyz").await.0, 200, "{}", proxy.logs());
    assert!(proxy.terminate().success());
}
