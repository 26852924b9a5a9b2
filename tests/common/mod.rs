//! Test helpers shared by the integration tests: a real `xks-proxy` process on a real
//! SoftHSM2 token (made by `xks-proxy quickstart --setup-only` in a temporary folder),
//! an HTTPS client whose requests are signed by the independent `aws-sigv4` crate, and
//! curl with `--aws-sigv4`.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};

pub const BIN: &str = env!("CARGO_BIN_EXE_xks-proxy");
pub const PREFIX: &str = "/example/uri/path/prefix/kms/xks/v1";
pub const REGION: &str = "us-east-1";

/// A quickstart folder (token, keys, credentials, certificates, config).
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub access_key_id: String,
    pub secret: String,
}

impl Setup {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(BIN)
            .args([
                "quickstart",
                "--setup-only",
                "--listen",
                "127.0.0.1:0",
                "--dir",
            ])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "quickstart failed (is softhsm2 installed? run scripts/setup.sh):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let read = |f: &str| {
            std::fs::read_to_string(dir.path().join(f))
                .unwrap()
                .trim()
                .to_owned()
        };
        Self {
            access_key_id: read("sigv4-access-key-id"),
            secret: read("sigv4-secret"),
            dir,
        }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    pub fn config(&self) -> PathBuf {
        self.path("config.toml")
    }

    /// Edits config.toml with a text replacement (asserting it matched).
    pub fn edit_config(&self, from: &str, to: &str) {
        let text = std::fs::read_to_string(self.config()).unwrap();
        assert!(text.contains(from), "{from:?} not in config");
        std::fs::write(self.config(), text.replacen(from, to, 1)).unwrap();
    }

    /// Runs `xks-proxy keys ...` against this folder's token.
    pub fn keys(&self, args: &[&str]) -> std::process::Output {
        let mut command = Command::new(BIN);
        command
            .arg("keys")
            .arg(args[0])
            .arg("--config")
            .arg(self.config());
        command.args(&args[1..]).output().unwrap()
    }

    pub fn start(self) -> Proxy {
        Proxy::start(self, &[])
    }

    /// Replaces config.toml with one for the simulated HSM (keys `foo`, `hang` in the
    /// key store; `health` for the health monitor), keeping this folder's certificates
    /// and credential. The extras are TOML lines added to `[server]`, `[hsm]` (which
    /// must include `[hsm.simulated]`) and `[[key_store]]`.
    pub fn simulated(&self, server: &str, hsm: &str, store: &str) {
        let config = format!(
            r#"[server]
listen = "127.0.0.1:0"
tls_certificate = "server.pem"
tls_private_key = "server-key.pem"
{server}

[admin]
listen = "127.0.0.1:0"

[hsm]
backend = "simulated"
{hsm}

[[hsm.software_key]]
id = "foo"
[[hsm.software_key]]
id = "hang"
[[hsm.software_key]]
id = "health"

[[key_store]]
name = "simulated"
uri_prefix = "example/uri/path/prefix"
region = "{REGION}"
keys = ["foo", "hang"]
{store}

[[key_store.credential]]
access_key_id = "{}"
secret_access_key_file = "sigv4-secret"
"#,
            self.access_key_id
        );
        std::fs::write(self.config(), config).unwrap();
    }
}

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
        command
            .arg("serve")
            .arg("--config")
            .arg(setup.config())
            .env("RUST_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
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

/// How to sign a request.
#[derive(Clone)]
pub struct Signing {
    pub access_key_id: String,
    pub secret: String,
    pub region: String,
    pub service: String,
    pub time: SystemTime,
}

/// Which HTTP version to speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http1,
    Http2,
}

/// An HTTPS client that trusts the quickstart CA and signs with aws-sigv4.
pub struct Client {
    port: u16,
    /// ALPN offers only `http/1.1`.
    http1: tokio_rustls::TlsConnector,
    /// ALPN offers only `h2`.
    http2: tokio_rustls::TlsConnector,
    pub signing: Signing,
}

/// A response: status and parsed JSON body (Null if the body is not JSON).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub content_type: Option<String>,
}

impl Reply {
    pub fn error_name(&self) -> &str {
        self.body["errorName"].as_str().unwrap_or("<none>")
    }
}

pub fn tls_client_config(ca: &Path, alpn: &[&[u8]]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut std::fs::read(ca).unwrap().as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

impl Client {
    pub fn new(proxy: &Proxy) -> Self {
        let ca = proxy.setup.path("ca.pem");
        let connector = |alpn: &[u8]| {
            tokio_rustls::TlsConnector::from(Arc::new(tls_client_config(&ca, &[alpn])))
        };
        Self {
            port: proxy.addr.port(),
            http1: connector(b"http/1.1"),
            http2: connector(b"h2"),
            signing: Signing {
                access_key_id: proxy.setup.access_key_id.clone(),
                secret: proxy.setup.secret.clone(),
                region: REGION.into(),
                service: "kms-xks-proxy".into(),
                time: SystemTime::now(),
            },
        }
    }

    /// Builds a request signed with `self.signing` (time: now unless overridden).
    pub fn signed(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
        signing: &Signing,
    ) -> http::Request<Full<Bytes>> {
        let host = format!("localhost:{}", self.port);
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("https://{host}{path}"))
            .header("host", &host)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::copy_from_slice(body)))
            .unwrap();
        let identity =
            Credentials::new(&signing.access_key_id, &signing.secret, None, None, "test").into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&signing.region)
            .name(&signing.service)
            .time(signing.time)
            .settings(SigningSettings::default())
            .build()
            .unwrap()
            .into();
        let headers: Vec<(String, String)> = request
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap().to_owned()))
            .collect();
        let signable = SignableRequest::new(
            method,
            request.uri().to_string(),
            headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            SignableBody::Bytes(body),
        )
        .unwrap();
        let (instructions, _) = sign(signable, &params).unwrap().into_parts();
        instructions.apply_to_request_http1x(&mut request);
        request
    }

    /// Signs (now) and sends a POST with a JSON body.
    pub async fn post(&self, version: Version, path: &str, body: &Value) -> Reply {
        let body = serde_json::to_vec(body).unwrap();
        let mut signing = self.signing.clone();
        signing.time = SystemTime::now();
        let request = self.signed("POST", path, &body, &signing);
        self.send(version, request).await
    }

    /// Sends a prepared request over a new connection.
    pub async fn send(&self, version: Version, mut request: http::Request<Full<Bytes>>) -> Reply {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let connector = match version {
            Version::Http1 => &self.http1,
            Version::Http2 => &self.http2,
        };
        let tls = connector.connect(name, tcp).await.unwrap();
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let io = TokioIo::new(tls);
        let response = match version {
            Version::Http1 => {
                let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
                tokio::spawn(conn);
                *request.uri_mut() = request
                    .uri()
                    .path_and_query()
                    .unwrap()
                    .as_str()
                    .parse()
                    .unwrap();
                sender.send_request(request).await.unwrap()
            }
            Version::Http2 => {
                assert_eq!(
                    alpn.as_deref(),
                    Some(&b"h2"[..]),
                    "server must negotiate h2"
                );
                let (mut sender, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .unwrap();
                tokio::spawn(conn);
                // HTTP/2 carries the authority in :authority; drop the Host header so the
                // server must use it (as KMS's HTTP/2 requests do).
                request.headers_mut().remove("host");
                sender.send_request(request).await.unwrap()
            }
        };
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            content_type,
        }
    }
}

pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn unb64(value: &Value) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(value.as_str().unwrap())
        .unwrap()
}

pub fn metadata() -> Value {
    json!({
        "awsPrincipalArn": "arn:aws:iam::123456789012:user/Alice",
        "kmsKeyArn": "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "kmsOperation": "Encrypt",
        "kmsRequestId": "4112f4d6-db54-4af4-ae30-c55a22a8dfae",
        "kmsViaService": "ebs"
    })
}

pub fn key_path(key: &str, op: &str) -> String {
    format!("{PREFIX}/keys/{key}/{op}")
}

pub fn health_path() -> String {
    format!("{PREFIX}/health")
}

pub fn encrypt_body(plaintext: &[u8], aad: Option<&[u8]>, cdiv: bool) -> Value {
    let mut body = json!({
        "requestMetadata": metadata(),
        "plaintext": b64(plaintext),
        "encryptionAlgorithm": "AES_GCM",
    });
    if let Some(aad) = aad {
        body["additionalAuthenticatedData"] = json!(b64(aad));
    }
    if cdiv {
        body["ciphertextDataIntegrityValueAlgorithm"] = json!("SHA_256");
    }
    body
}

/// A Decrypt body from an Encrypt reply.
pub fn decrypt_body(encrypted: &Value, aad: Option<&[u8]>) -> Value {
    let mut metadata = metadata();
    metadata["kmsOperation"] = json!("Decrypt");
    let mut body = json!({
        "requestMetadata": metadata,
        "ciphertext": encrypted["ciphertext"],
        "initializationVector": encrypted["initializationVector"],
        "authenticationTag": encrypted["authenticationTag"],
        "encryptionAlgorithm": "AES_GCM",
    });
    if let Some(aad) = aad {
        body["additionalAuthenticatedData"] = json!(b64(aad));
    }
    if let Some(meta) = encrypted.get("ciphertextMetadata") {
        body["ciphertextMetadata"] = meta.clone();
    }
    body
}

/// curl with `--aws-sigv4`, as in the spec's Appendix D. Returns (status, body).
pub fn curl(proxy: &Proxy, path: &str, body: &str, extra: &[&str]) -> (u16, Value) {
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-X", "POST"])
        .arg("--cacert")
        .arg(proxy.setup.path("ca.pem"))
        .args(["--aws-sigv4", &format!("aws:amz:{REGION}:kms-xks-proxy")])
        .args([
            "--user",
            &format!("{}:{}", proxy.setup.access_key_id, proxy.setup.secret),
        ])
        .args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
        ])
        .args(["-w", "\n%{http_code}"])
        .args(extra)
        .arg(proxy.url(path))
        .output()
        .expect("curl must be installed (scripts/setup.sh installs it)");
    assert!(
        output.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let (body, status) = text.rsplit_once('\n').unwrap();
    (
        status.parse().unwrap(),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

/// A plain-HTTP request: (status, body).
pub async fn admin_request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

/// A parsed scrape.
pub struct Metrics {
    pub scrape: prometheus_parse::Scrape,
    pub text: String,
}

impl Metrics {
    /// The value of the sample `name` whose labels include `labels` (0 when absent:
    /// counters of things that never happened are not exposed).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                other => panic!("{name}: not a single value: {other:?}"),
            })
            .sum()
    }

    /// A histogram's count and its cumulative count at bucket `le`.
    pub fn histogram(&self, name: &str, labels: &[(&str, &str)], le: f64) -> (u64, u64) {
        let mut total = 0;
        let mut below = 0;
        for sample in self.scrape.samples.iter().filter(|s| s.metric == name) {
            if !labels.iter().all(|(k, v)| sample.labels.get(k) == Some(*v)) {
                continue;
            }
            if let prometheus_parse::Value::Histogram(buckets) = &sample.value {
                for bucket in buckets {
                    if bucket.less_than.is_infinite() {
                        total += bucket.count as u64;
                    }
                    if (bucket.less_than - le).abs() < 1e-9 {
                        below += bucket.count as u64;
                    }
                }
            }
        }
        (total, below)
    }
}

impl Client {
    /// Opens one HTTP/2 connection for many concurrent requests.
    pub async fn h2_connection(&self) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = self.http2.connect(name, tcp).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        sender
    }

    /// Signs (now) and sends a POST on an open HTTP/2 connection.
    pub async fn post_on(
        &self,
        sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
        path: &str,
        body: &Value,
    ) -> Reply {
        let body = serde_json::to_vec(body).unwrap();
        let mut signing = self.signing.clone();
        signing.time = SystemTime::now();
        let mut request = self.signed("POST", path, &body, &signing);
        request.headers_mut().remove("host");
        sender.ready().await.unwrap();
        let response = sender.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            content_type: None,
        }
    }
}
