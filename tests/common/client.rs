//! An HTTPS client that trusts the quickstart CA and signs with the `aws-sigv4` crate.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use super::*;

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
        Self::to(
            proxy.addr.port(),
            &proxy.setup.path("ca.pem"),
            &proxy.setup.access_key_id,
            &proxy.setup.secret,
        )
    }

    /// A client of a proxy this test did not start (tests/container.rs): `localhost:port`
    /// (connecting to 127.0.0.1), its CA and a credential.
    pub fn to(port: u16, ca: &Path, access_key_id: &str, secret: &str) -> Self {
        let connector = |alpn: &[u8]| {
            tokio_rustls::TlsConnector::from(Arc::new(tls_client_config(ca, &[alpn])))
        };
        Self {
            port,
            http1: connector(b"http/1.1"),
            http2: connector(b"h2"),
            signing: Signing {
                access_key_id: access_key_id.into(),
                secret: secret.into(),
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
        let signer = sigv4::Signer {
            access_key_id: &signing.access_key_id,
            secret: &signing.secret,
            region: &signing.region,
            service: &signing.service,
            time: signing.time,
        };
        let url = request.uri().to_string();
        let headers = [
            ("host", host.as_str()),
            ("content-type", "application/json"),
        ];
        sigv4::sign_into(&signer, method, &url, &headers, body, &mut request);
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

    /// Encrypts `plaintext` with `aad` under key `foo` (with a CDIV when `cdiv`), decrypts
    /// the result and asserts both succeed and the plaintext comes back; returns the
    /// Encrypt reply.
    pub async fn round_trip(
        &self,
        version: Version,
        plaintext: &[u8],
        aad: Option<&[u8]>,
        cdiv: bool,
    ) -> Reply {
        let sealed = self
            .post(
                version,
                &key_path("foo", "encrypt"),
                &encrypt_body(plaintext, aad, cdiv),
            )
            .await;
        assert_eq!(sealed.status, 200, "{version:?} {:?}", sealed.body);
        let opened = self
            .post(
                version,
                &key_path("foo", "decrypt"),
                &decrypt_body(&sealed.body, aad),
            )
            .await;
        assert_eq!(opened.status, 200, "{version:?} {:?}", opened.body);
        assert_eq!(unb64(&opened.body["plaintext"]), plaintext);
        sealed
    }

    /// Sends a prepared request over a new connection.
    pub async fn send(&self, version: Version, mut request: http::Request<Full<Bytes>>) -> Reply {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .unwrap();
        // As KMS's client and ours do: without it a request's body waits for the
        // proxy's delayed ACK (~40 ms), counted against the request's deadline.
        tcp.set_nodelay(true).unwrap();
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

impl Client {
    /// Opens one HTTP/2 connection for many concurrent requests.
    pub async fn h2_connection(&self) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .unwrap();
        // As KMS's client and ours do: without it a request's body waits for the
        // proxy's delayed ACK (~40 ms), counted against the request's deadline.
        tcp.set_nodelay(true).unwrap();
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
