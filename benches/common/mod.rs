//! Fixtures shared by the criterion benchmarks (`hot_path.rs`) and the instruction
//! counter (`instructions.rs`), so both measure exactly the same inputs:
//!
//! - the spec's example request bodies (its `requestMetadata`), with a 32-byte
//!   plaintext and a 100-byte AAD;
//! - requests signed by the independent `aws-sigv4` crate, as KMS would sign them;
//! - [`HandlerFixture`]: an [`xks_proxy::xks::Handler`] over the software backend;
//! - [`ServiceFixture`]: the whole HTTP service ([`xks_proxy::server::service`]) built
//!   from a configuration with [`xks_proxy::server::app`], driven in-process over an
//!   in-memory HTTP/1.1 connection (no TLS, no socket), or the same connection with a
//!   trivial service as the control.
//!
//! `benches/common/mod.rs` is not a bench target of its own (cargo only discovers
//! `benches/*.rs` and `benches/*/main.rs`); each bench includes it with `mod common;`.

// Each bench uses a different part of the fixtures.
#![allow(dead_code)]

#[path = "../../tests/common/sigv4.rs"]
mod sigv4;

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use xks_proxy::config::{Config, FileConfig};
use xks_proxy::health::HealthMonitor;
use xks_proxy::hsm::software::{SoftwareBackend, SoftwareKeySpec};
use xks_proxy::hsm::{Backend, Ekm, KeyUsage};
use xks_proxy::metrics::Metrics;
use xks_proxy::server::guard::ConnectionClock;
use xks_proxy::server::service::serve_request;
use xks_proxy::xks::{ApiOperation, Handler, HealthInfo, KeySet, Outcome};
use zeroize::Zeroizing;

/// The key store's region (the SigV4 credential scope's).
pub(crate) const REGION: &str = "us-east-1";
/// A spec-conformant access key id (20–30 characters of A–Z and 2–7).
pub(crate) const ACCESS_KEY_ID: &str = "XKSPROXYBENCHMARKACCESSKEY";
/// A spec-conformant secret (43–64 characters of Base64); not a real one.
pub(crate) const SECRET: &str = "eGtzLXByb3h5IGJlbmNobWFyayBzZWNyZXQsIG5vdCBhIHJlYWwgb25lISE=";
/// The host KMS signs.
pub(crate) const HOST: &str = "xks.example.com";
/// The key store's URI path prefix (the spec's example).
pub(crate) const URI_PREFIX: &str = "/example/uri/path/prefix";
/// The external key every request names (encrypt and decrypt allowed).
pub(crate) const KEY_ID: &str = "foo";
/// A key id outside the key store: the request is parsed and validated, then answered
/// KeyNotFound before any Base64 decoding or HSM call.
pub(crate) const UNKNOWN_KEY_ID: &str = "not-in-this-key-store";
/// Material of the handler fixture's key, fixed so runs are repeatable.
pub(crate) const KEY_MATERIAL: [u8; 32] = [0x42; 32];
/// The software key the health monitor uses (in no key store).
const HEALTH_KEY_ID: &str = "xks-health-check";

/// The plaintext of every Encrypt: 32 bytes, the size of the data keys KMS wraps.
pub(crate) const PLAINTEXT: [u8; 32] = *b"0123456789abcdef0123456789abcdef";

/// 100 bytes of AAD (the spec's example AAD, repeated).
pub(crate) fn aad() -> Vec<u8> {
    b"project=nile,department=marketing,"
        .iter()
        .copied()
        .cycle()
        .take(100)
        .collect()
}

/// The spec's example `requestMetadata` for `kms_operation`.
pub(crate) fn request_metadata(kms_operation: &str) -> Value {
    json!({
        "awsPrincipalArn": "arn:aws:iam::123456789012:user/Alice",
        "kmsKeyArn": "arn:aws:kms:us-east-2:123456789012:/key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "kmsOperation": kms_operation,
        "kmsRequestId": "4112f4d6-db54-4af4-ae30-c55a22a8dfae",
        "kmsViaService": "ebs",
    })
}

/// An Encrypt body like the spec's example; `cdiv` asks for the CDIV (KMS does).
pub(crate) fn encrypt_body(cdiv: bool) -> Vec<u8> {
    let mut body = json!({
        "requestMetadata": request_metadata("Encrypt"),
        "additionalAuthenticatedData": STANDARD.encode(aad()),
        "plaintext": STANDARD.encode(PLAINTEXT),
        "encryptionAlgorithm": "AES_GCM",
    });
    if cdiv {
        body["ciphertextDataIntegrityValueAlgorithm"] = "SHA_256".into();
    }
    serde_json::to_vec(&body).expect("JSON")
}

/// The Decrypt body for what an Encrypt (of [`encrypt_body`]) answered.
pub(crate) fn decrypt_body(encrypt_response: &[u8]) -> Vec<u8> {
    let response: Value = serde_json::from_slice(encrypt_response).expect("Encrypt answers JSON");
    let field = |name: &str| {
        response[name]
            .as_str()
            .unwrap_or_else(|| panic!("Encrypt response has no {name}: {response}"))
            .to_owned()
    };
    serde_json::to_vec(&json!({
        "requestMetadata": request_metadata("Decrypt"),
        "additionalAuthenticatedData": STANDARD.encode(aad()),
        "encryptionAlgorithm": "AES_GCM",
        "ciphertext": field("ciphertext"),
        "initializationVector": field("initializationVector"),
        "authenticationTag": field("authenticationTag"),
    }))
    .expect("JSON")
}

/// The spec's GetKeyMetadata example body.
pub(crate) fn metadata_body() -> Vec<u8> {
    serde_json::to_vec(&json!({
        "requestMetadata": {
            "awsPrincipalArn": "arn:aws:iam::123456789012:user/Alice",
            "kmsOperation": "CreateKey",
            "kmsRequestId": "4112f4d6-db54-4af4-ae30-c55a22a8dfae",
        }
    }))
    .expect("JSON")
}

/// The spec's GetHealthStatus example body.
pub(crate) fn health_body() -> Vec<u8> {
    serde_json::to_vec(&json!({
        "requestMetadata": {
            "kmsRequestId": "4112f4d6-db54-4af4-ae30-c55a22a8dfae",
            "kmsOperation": "CreateCustomKeyStore",
        }
    }))
    .expect("JSON")
}

/// The API path of `operation` on [`KEY_ID`] under [`URI_PREFIX`].
pub(crate) fn api_path(operation: ApiOperation) -> String {
    match operation {
        ApiOperation::GetHealthStatus => format!("{URI_PREFIX}/kms/xks/v1/health"),
        ApiOperation::GetKeyMetadata => format!("{URI_PREFIX}/kms/xks/v1/keys/{KEY_ID}/metadata"),
        ApiOperation::Encrypt => format!("{URI_PREFIX}/kms/xks/v1/keys/{KEY_ID}/encrypt"),
        ApiOperation::Decrypt => format!("{URI_PREFIX}/kms/xks/v1/keys/{KEY_ID}/decrypt"),
    }
}

/// Signs `POST https://HOST{path}` with the independent `aws-sigv4` crate at `time`,
/// signing `host`, `content-type` and `x-amz-date`; returns the request's headers.
pub(crate) fn sign_request(path: &str, body: &[u8], time: SystemTime) -> HeaderMap {
    let url = format!("https://{HOST}{path}");
    let headers = [("host", HOST), ("content-type", "application/json")];
    let mut request = Request::builder().method("POST").uri(url.as_str());
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let mut request = request.body(()).expect("request");
    let signer = sigv4::Signer {
        access_key_id: ACCESS_KEY_ID,
        secret: SECRET,
        region: REGION,
        service: xks_proxy::auth::sigv4::SERVICE,
        time,
    };
    sigv4::sign_into(&signer, "POST", &url, &headers, body, &mut request);
    request.headers().clone()
}

/// A single-threaded tokio runtime with timers (hyper's header-read timeout uses one).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("tokio runtime")
}

/// A [`Handler`] over the software backend, with one key store holding [`KEY_ID`].
pub(crate) struct HandlerFixture {
    /// Drives the handler's futures (the software backend never waits).
    pub(crate) runtime: tokio::runtime::Runtime,
    /// The handler under test.
    pub(crate) handler: Handler,
    /// The key store's keys.
    pub(crate) keys: KeySet,
    /// The software backend itself, to measure the "HSM" cost alone.
    pub(crate) backend: Arc<Backend>,
}

impl HandlerFixture {
    /// The fixture, with one health check done so GetHealthStatus answers ACTIVE.
    pub(crate) fn new() -> Self {
        let spec = |id: &str| SoftwareKeySpec {
            id: id.into(),
            material: Some(Zeroizing::new(KEY_MATERIAL.to_vec())),
            usages: vec![KeyUsage::Encrypt, KeyUsage::Decrypt],
            enabled: true,
        };
        let software =
            SoftwareBackend::new(vec![spec(KEY_ID), spec(HEALTH_KEY_ID)]).expect("software keys");
        let backend = Arc::new(Backend::from(Ekm::Software(software)));
        let monitor = Arc::new(HealthMonitor::new(
            Arc::clone(&backend),
            Some(HEALTH_KEY_ID.into()),
            Duration::from_secs(10),
            Duration::from_millis(100),
            Metrics::new(Duration::from_millis(100)),
        ));
        let runtime = runtime();
        runtime.block_on(monitor.check());
        let health = HealthInfo {
            fleet_size: 1,
            vendor: "xks-proxy bench".into(),
            model: "bench 0".into(),
            ekm_vendor: None,
        };
        Self {
            runtime,
            handler: Handler::new(Arc::clone(&backend), health, monitor),
            keys: KeySet::new([KEY_ID.to_owned()]),
            backend,
        }
    }

    /// Handles one request (no secondary authorization), deadline one second away.
    pub(crate) fn handle<'a>(
        &self,
        operation: ApiOperation,
        key_id: &str,
        body: &'a [u8],
    ) -> Outcome<'a> {
        let deadline = Instant::now() + Duration::from_secs(1);
        self.runtime.block_on(
            self.handler
                .handle(operation, &self.keys, key_id, body, deadline, None),
        )
    }

    /// Like [`Self::handle`], asserting success; returns the response body.
    pub(crate) fn handle_ok(&self, operation: ApiOperation, key_id: &str, body: &[u8]) -> Vec<u8> {
        match self.handle(operation, key_id, body).result {
            Ok(body) => body,
            Err(error) => panic!("{operation:?} failed: {error}"),
        }
    }
}

/// Which service answers on the in-memory connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Server {
    /// xks-proxy's [`serve_request`]: routing, body limit, SigV4, handler, metrics, log.
    Proxy,
    /// The control: reads the body and answers a fixed 200 JSON body of an Encrypt
    /// response's size, so (Proxy − Control) is xks-proxy's own cost without hyper's
    /// HTTP/1.1 framing on both ends.
    Control,
}

/// A request signed once, sent as often as wanted (replay protection is off).
#[derive(Debug, Clone)]
pub(crate) struct SignedRequest {
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl SignedRequest {
    /// `POST {path}` with `body`, signed now.
    pub(crate) fn new(path: &str, body: Vec<u8>) -> Self {
        Self {
            uri: path.parse().expect("a valid path"),
            headers: sign_request(path, &body, SystemTime::now()),
            body: Bytes::from(body),
        }
    }
}

/// The whole HTTP service, in-process: a configuration (software backend, one key
/// store at [`URI_PREFIX`] with [`KEY_ID`]) turned into an [`xks_proxy::server::App`]
/// by [`xks_proxy::server::app`], served by hyper's HTTP/1.1 server as the proxy's
/// listener configures it (timer, header-read timeout, keep-alive), on one end of an
/// in-memory duplex stream, with hyper's HTTP/1.1 client on the other end. What is
/// left out compared with `xks-proxy serve`: TCP, TLS, the connection limit and the
/// per-connection idle tracking.
pub(crate) struct ServiceFixture {
    runtime: tokio::runtime::Runtime,
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    /// Holds the configuration's certificate and secret files.
    _dir: tempfile::TempDir,
}

/// The Encrypt response size the control answers with.
const CONTROL_BODY: &[u8] = br#"{"ciphertext":"rEQ2XwTQYmMKnmxvz9pe3qFg7jZ3ndrUYMzWtBvUz/8=","initializationVector":"b6oBixWfXDpq7HKs","authenticationTag":"sDtH6ONfhd17y2CLHlhqUg==","ciphertextDataIntegrityValue":"3oUSeVhRslqVKfBd3qKcjKaCqE2WYDzZmAs09Pwxlx4="}"#;

impl ServiceFixture {
    /// Builds the configuration, the app and the connection.
    pub(crate) fn new(server: Server) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let write = |name: &str, contents: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, contents).expect("write fixture file");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .expect("chmod fixture file");
        };
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
            .expect("self-signed certificate");
        write("server.pem", &certified.cert.pem());
        write("server-key.pem", &certified.key_pair.serialize_pem());
        write("sigv4-secret", SECRET);
        let toml = format!(
            r#"[server]
listen = "127.0.0.1:0"
tls_certificate = "server.pem"
tls_private_key = "server-key.pem"

[hsm]
backend = "software"
health_check_key = "{HEALTH_KEY_ID}"

[[hsm.software_key]]
id = "{KEY_ID}"
[[hsm.software_key]]
id = "{HEALTH_KEY_ID}"

[[key_store]]
name = "bench"
uri_prefix = "{URI_PREFIX}"
region = "{REGION}"
keys = ["{KEY_ID}"]

[[key_store.credential]]
access_key_id = "{ACCESS_KEY_ID}"
secret_access_key_file = "sigv4-secret"
"#
        );
        let file: FileConfig = toml::from_str(&toml).expect("the fixture's TOML parses");
        let config = Config::from_file(file, dir.path()).expect("the fixture's config is valid");
        let header_read_timeout = config.limits.header_read_timeout;
        let metrics = Metrics::new(config.limits.request_deadline);
        let backend = Backend::build(&config.backend, &metrics).expect("software backend");
        let app = Arc::new(xks_proxy::server::app(config, backend, metrics).expect("app"));
        let runtime = runtime();
        runtime.block_on(app.handler.monitor().check());

        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        runtime.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .keep_alive(true);
            let io = TokioIo::new(server_io);
            let served = match server {
                Server::Proxy => {
                    let clock = Arc::new(ConnectionClock::new());
                    let service = service_fn(move |request| {
                        let app = Arc::clone(&app);
                        let clock = Arc::clone(&clock);
                        async move {
                            Ok::<_, Infallible>(serve_request(app, &clock, request).await)
                        }
                    });
                    builder.serve_connection(io, service).await
                }
                Server::Control => {
                    let service = service_fn(|request: Request<hyper::body::Incoming>| async {
                        let _ = request.into_body().collect().await;
                        let mut response =
                            Response::new(Full::new(Bytes::from_static(CONTROL_BODY)));
                        response.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("application/json"),
                        );
                        Ok::<_, Infallible>(response)
                    });
                    builder.serve_connection(io, service).await
                }
            };
            if let Err(error) = served {
                eprintln!("in-memory connection failed: {error}");
            }
        });
        let (sender, connection) = runtime
            .block_on(hyper::client::conn::http1::handshake(TokioIo::new(
                client_io,
            )))
            .expect("HTTP/1.1 handshake");
        runtime.spawn(async move {
            let _ = connection.await;
        });
        Self {
            runtime,
            sender,
            _dir: dir,
        }
    }

    /// Sends one request and reads the whole response.
    pub(crate) fn send(&mut self, request: &SignedRequest) -> (StatusCode, Bytes) {
        let mut http_request = Request::new(Full::new(request.body.clone()));
        *http_request.method_mut() = Method::POST;
        *http_request.uri_mut() = request.uri.clone();
        *http_request.headers_mut() = request.headers.clone();
        let Self {
            runtime, sender, ..
        } = self;
        runtime.block_on(async {
            sender.ready().await.expect("connection is open");
            let response = sender
                .send_request(http_request)
                .await
                .expect("the service answers");
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .expect("response body")
                .to_bytes();
            (status, body)
        })
    }

    /// Like [`Self::send`], asserting 200; returns the body.
    pub(crate) fn send_ok(&mut self, request: &SignedRequest) -> Bytes {
        let (status, body) = self.send(request);
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        body
    }
}
