//! The proxies `bench` starts: `xks-proxy serve` on the quickstart's config, and on a
//! software-backend config written beside it.

use super::*;

/// A proxy `bench` started; stopped when dropped.
pub(super) struct Started {
    pub(super) child: Child,
    drain: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(drain) = self.drain.take() {
            let _ = drain.join();
        }
    }
}

/// How long a started proxy may take to listen (SoftHSM2 opens its token first).
pub(super) const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Starts `bin serve --config CONFIG`, its log (without the per-request audit lines,
/// hundreds of MB a run) in `log`, and waits until it serves.
pub(super) fn start_proxy(bin: &Path, config: &Path, log: &Path) -> Result<Started, Error> {
    let mut child = Command::new(bin)
        .arg("serve")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let stderr = child.stderr.take().ok_or("the proxy's stderr")?;
    let mut file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let drain = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains(" xks request ") || line.contains("\"xks request\"") {
                continue;
            }
            if line.contains("serving the XKS API") {
                let _ = ready_tx.send(());
            }
            let _ = writeln!(file, "{line}");
        }
    });
    let mut started = Started {
        child,
        drain: Some(drain),
    };
    match ready_rx.recv_timeout(START_TIMEOUT) {
        Ok(()) => Ok(started),
        Err(_) => {
            let status = started.child.try_wait().ok().flatten();
            Err(format!(
                "{} serve --config {} did not start ({}); see {}",
                bin.display(),
                config.display(),
                status.map_or("still running".into(), |s| s.to_string()),
                log.display()
            )
            .into())
        }
    }
}

/// `bin --version`, trimmed.
pub(super) fn version_of(bin: &Path) -> Option<String> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned()).filter(|v| !v.is_empty())
}

/// A free local port (bound, read, released).
pub(super) fn free_port() -> Result<u16, Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `server.listen`'s port in a proxy config.
pub(super) fn listen_port(config: &Path) -> Result<u16, Error> {
    let text = std::fs::read_to_string(config).map_err(|e| format!("{}: {e}", config.display()))?;
    let value: toml::Value =
        toml::from_str(&text).map_err(|e| format!("{}: {e}", config.display()))?;
    value["server"]
        .get("listen")
        .and_then(|l| l.as_str())
        .and_then(|l| l.parse::<std::net::SocketAddr>().ok())
        .map(|a| a.port())
        .ok_or_else(|| format!("{}: no server.listen address", config.display()).into())
}

/// Whether a proxy config's [hsm] works on session copies of its keys (then the raw
/// part does too, so both measure the same kind of key object).
pub(super) fn session_key_copies(config: &Path) -> bool {
    std::fs::read_to_string(config)
        .ok()
        .and_then(|t| toml::from_str::<toml::Value>(&t).ok())
        .and_then(|v| v.get("hsm")?.get("session_key_copies")?.as_bool())
        .unwrap_or(false)
}

/// The quickstart's credential and certificate in front of the software backend, on
/// `port` (as perf/lib.sh's write_software_config).
pub(super) fn software_config(quickstart: &Path, port: u16) -> Result<String, Error> {
    let env = crate::target::read_env_file(&quickstart.join("test-client.env"))?;
    let access_key_id = env
        .get("SIGV4_ACCESS_KEY_ID")
        .ok_or("the quickstart's test-client.env has no SIGV4_ACCESS_KEY_ID")?;
    let prefix = env.get("URI_PREFIX").cloned().unwrap_or_default();
    let key = env.get("KEY_ID").cloned().unwrap_or_else(|| "foo".into());
    let q = quickstart.display();
    Ok(format!(
        r#"# Written by `xks-loadtest bench`: the quickstart's credential in front of the
# software backend (benchmarks only: random keys in ordinary memory).
[server]
listen = "127.0.0.1:{port}"
tls_certificate = "{q}/server.pem"
tls_private_key = "{q}/server-key.pem"

[hsm]
backend = "software"
[[hsm.software_key]]
id = "{key}"
usage = ["ENCRYPT", "DECRYPT"]

[[key_store]]
name = "bench"
uri_prefix = "{prefix}"
region = "us-east-1"
keys = ["{key}"]
[[key_store.credential]]
access_key_id = "{access_key_id}"
secret_access_key_file = "{q}/sigv4-secret"
"#
    ))
}

/// Where a proxy part's target comes from.
pub(super) struct ProxySource {
    pub(super) env: PathBuf,
    pub(super) endpoint: Option<String>,
    pub(super) started: Option<(PathBuf, PathBuf)>,
}
