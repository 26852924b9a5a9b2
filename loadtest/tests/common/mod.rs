//! Test helpers: a real proxy served in-process by the xks-proxy library (software
//! backend, or a quickstart's SoftHSM2 configuration) on ephemeral ports, and the
//! `xks-loadtest` binary run against it.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xks_proxy::config::Config;
use xks_proxy::metrics::Metrics;
use xks_proxy::server::{self, Server};

pub const BIN: &str = env!("CARGO_BIN_EXE_xks-loadtest");
pub const PREFIX: &str = "example/uri/path/prefix";
pub const ACCESS_KEY_ID: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAA";

/// A proxy running on its own thread and runtime until it is dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Proxy {
    /// Stops the proxy and waits until its runtime, backend and PKCS#11 sessions are
    /// gone. Left running, they were torn down on their own thread while the test
    /// process exited, and SoftHSM2's C_CloseSession then ran into its own exit-time
    /// destructors (a crash in about one run in four).
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Proxy {
    /// Serves `config` (a file whose relative paths are under its folder).
    pub fn serve(config: &Path) -> Self {
        let config_value = Config::load(config).unwrap();
        let metrics = Metrics::new(config_value.limits.request_deadline);
        let backend = xks_proxy::hsm::Backend::build(&config_value.backend, &metrics).unwrap();
        let listen = config_value.listen;
        let admin = config_value.admin_listen;
        let app = server::app(config_value, backend, metrics).unwrap();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (shutdown, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let server = Server::bind(listen, admin, app, None).await.unwrap();
                server.app().handler.monitor().check().await;
                addr_tx
                    .send((
                        server.local_addr().unwrap(),
                        server.admin_addr().unwrap().unwrap(),
                    ))
                    .unwrap();
                server
                    .run(async move {
                        let _ = shutdown_rx.await;
                    })
                    .await;
            });
        });
        let (addr, admin) = addr_rx.recv().unwrap();
        Self {
            addr,
            admin,
            dir: config.parent().unwrap().to_owned(),
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// A proxy on the software backend, with a fresh CA, certificate and credential
    /// in `dir`.
    pub fn software(dir: &Path) -> Self {
        Self::with_hsm(dir, r#"backend = "software""#)
    }

    /// A proxy on the simulated HSM whose every call takes `service_ms`.
    pub fn simulated(dir: &Path, service_ms: u32) -> Self {
        Self::with_hsm(
            dir,
            &format!(
                r#"backend = "simulated"
[hsm.simulated]
distribution = "fixed"
mean_ms = {service_ms}"#
            ),
        )
    }

    /// A proxy whose `[hsm]` section (up to its software keys) is `hsm`.
    fn with_hsm(dir: &Path, hsm: &str) -> Self {
        Self::with_sections(dir, "", hsm)
    }

    /// A proxy with `server` added to its `[server]` section and `hsm` as its `[hsm]`
    /// section (up to its software keys `foo` and `bar`).
    pub fn with_sections(dir: &Path, server: &str, hsm: &str) -> Self {
        certificates(dir);
        std::fs::write(dir.join("sigv4-secret"), SECRET).unwrap();
        std::fs::write(
            dir.join("config.toml"),
            format!(
                r#"[server]
listen = "127.0.0.1:0"
tls_certificate = "server.pem"
tls_private_key = "server-key.pem"
{server}

[admin]
listen = "127.0.0.1:0"

[hsm]
{hsm}

[[hsm.software_key]]
id = "foo"
usage = ["ENCRYPT", "DECRYPT"]

[[hsm.software_key]]
id = "bar"
usage = ["ENCRYPT", "DECRYPT"]

[[key_store]]
name = "test"
uri_prefix = "{PREFIX}"
region = "us-east-1"
keys = ["foo", "bar"]

[[key_store.credential]]
access_key_id = "{ACCESS_KEY_ID}"
secret_access_key_file = "sigv4-secret"
"#
            ),
        )
        .unwrap();
        Self::serve(&dir.join("config.toml"))
    }

    /// The target flags of `xks-loadtest run` for this proxy.
    pub fn target_args(&self) -> Vec<String> {
        vec![
            "--endpoint".into(),
            format!("https://localhost:{}", self.addr.port()),
            "--uri-prefix".into(),
            PREFIX.into(),
            "--access-key-id".into(),
            ACCESS_KEY_ID.into(),
            "--secret-file".into(),
            self.dir.join("sigv4-secret").display().to_string(),
            "--key-id".into(),
            "foo".into(),
            "--ca-file".into(),
            self.dir.join("ca.pem").display().to_string(),
        ]
    }

    /// The sum of `xks_requests_total` over all label sets, from the admin listener.
    pub fn requests_total(&self) -> u64 {
        let text = admin_get(self.admin, "/metrics");
        text.lines()
            .filter(|l| l.starts_with("xks_requests_total{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
            .sum()
    }
}

const SECRET: &str = "FYtE5EFA5FT0mCc3DrGUe2sti527BitkQ0Zr9MO9fvE=";

/// A plain-HTTP/1.0 GET; the body.
fn admin_get(addr: SocketAddr, path: &str) -> String {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut text = String::new();
        tcp.read_to_string(&mut text).await.unwrap();
        text.split_once("\r\n\r\n").unwrap().1.to_owned()
    })
}

/// A CA and a server certificate for localhost, as the quickstart makes them.
fn certificates(dir: &Path) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "xks-loadtest test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
    let server_cert = server.signed_by(&server_key, &ca_cert, &ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), server_cert.pem()).unwrap();
    std::fs::write(dir.join("server-key.pem"), server_key.serialize_pem()).unwrap();
}

/// Runs `xks-loadtest ARGS`.
pub fn loadtest<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

/// Runs `xks-loadtest ARGS` and asserts it succeeded; returns stdout.
pub fn loadtest_ok<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let out = loadtest(args);
    assert!(
        out.status.success(),
        "xks-loadtest failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
