//! HTTPS connections to the proxy: TCP (no Nagle), TLS with rustls on aws-lc-rs, then
//! hyper's HTTP/1.1 or HTTP/2 client on top, and signed requests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use xks_proxy::auth::{SignRequest, Signer};

use crate::target::Target;
use crate::Error;

/// Why a request got no HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// TCP connect failed.
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// The TLS handshake failed.
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    /// HTTP failed (handshake, request or body).
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    /// No answer within the timeout.
    #[error("timed out")]
    Timeout,
}

impl ClientError {
    /// A short name for error counts (`transport:connect` ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect(_) => "transport:connect",
            Self::Tls(_) => "transport:tls",
            Self::Http(_) => "transport:http",
            Self::Timeout => "transport:timeout",
        }
    }
}

/// Opens connections to one target.
#[derive(Clone)]
pub struct Connector {
    tls: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
    addr: SocketAddr,
    http2: bool,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("addr", &self.addr)
            .field("http2", &self.http2)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// Resolves the target and prepares TLS (trusting `--ca-file`, or the public CAs).
    pub async fn new(target: &Target, http2: bool) -> Result<Self, Error> {
        let mut roots = rustls::RootCertStore::empty();
        match &target.ca_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
                for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                    roots.add(cert.map_err(|e| format!("{}: {e}", path.display()))?)?;
                }
                if roots.is_empty() {
                    return Err(format!("{}: no certificate", path.display()).into());
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![if http2 {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        let addr = tokio::net::lookup_host((target.host.as_str(), target.port))
            .await
            .map_err(|e| format!("cannot resolve {}: {e}", target.host))?
            .next()
            .ok_or_else(|| format!("{} has no address", target.host))?;
        Ok(Self {
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name: ServerName::try_from(target.host.clone())
                .map_err(|e| format!("{}: {e}", target.host))?,
            addr,
            http2,
        })
    }

    /// Whether connections speak HTTP/2.
    pub fn http2(&self) -> bool {
        self.http2
    }

    /// Opens a connection (TCP + TLS + HTTP handshake).
    pub async fn connect(&self) -> Result<Sender, ClientError> {
        let tcp = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(ClientError::Connect)?;
        // Requests are small and latency-bound: never wait to coalesce them.
        tcp.set_nodelay(true).map_err(ClientError::Connect)?;
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(ClientError::Tls)?;
        let io = TokioIo::new(tls);
        if self.http2 {
            let (sender, connection) = http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(connection);
            Ok(Sender::Http2(sender))
        } else {
            let (sender, connection) = http1::handshake(io).await?;
            tokio::spawn(connection);
            Ok(Sender::Http1(sender))
        }
    }
}

/// One open connection (HTTP/2: one handle of a shared connection).
#[derive(Debug)]
pub enum Sender {
    /// HTTP/1.1: one request at a time.
    Http1(http1::SendRequest<Full<Bytes>>),
    /// HTTP/2: clones multiplex streams over one connection.
    Http2(http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    /// Another handle on the same connection: HTTP/2 only (HTTP/1.1 cannot multiplex).
    pub fn share(&self) -> Option<Self> {
        match self {
            Self::Http2(s) => Some(Self::Http2(s.clone())),
            Self::Http1(_) => None,
        }
    }

    /// Sends a request and reads the whole answer: (status, body).
    pub async fn send(
        &mut self,
        request: http::Request<Full<Bytes>>,
    ) -> Result<(u16, Bytes), ClientError> {
        let response = match self {
            Self::Http1(s) => {
                s.ready().await?;
                s.send_request(request).await?
            }
            Self::Http2(s) => {
                s.ready().await?;
                s.send_request(request).await?
            }
        };
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

/// Builds signed requests for one target; one per task (each has its own signer).
#[derive(Debug, Clone)]
pub struct RequestBuilder {
    signer: Signer,
    authority: String,
    host_value: HeaderValue,
    json: HeaderValue,
    http2: bool,
}

impl RequestBuilder {
    /// A builder signing with the target's credential.
    pub fn new(target: &Target, http2: bool, options: xks_proxy::auth::SignOptions) -> Self {
        Self {
            signer: Signer::new(
                target.access_key_id.clone(),
                target.secret.clone(),
                target.region.clone(),
                options,
            ),
            authority: target.authority.clone(),
            host_value: HeaderValue::from_str(&target.authority)
                .expect("an authority is a valid header value"),
            json: HeaderValue::from_static("application/json"),
            http2,
        }
    }

    /// The request URI for `path`: absolute for HTTP/2 (hyper sends :authority from it),
    /// the path alone for HTTP/1.1 (with a Host header).
    pub fn uri(&self, path: &str) -> http::Uri {
        if self.http2 {
            format!("https://{}{path}", self.authority)
        } else {
            path.to_owned()
        }
        .parse()
        .expect("paths are made of valid URI characters")
    }

    /// A POST of `body` to `uri` (from [`Self::uri`]) whose path is `path`, signed at `time`.
    pub fn post(
        &self,
        uri: &http::Uri,
        path: &str,
        body: Bytes,
        time: SystemTime,
    ) -> http::Request<Full<Bytes>> {
        let signed = self.signer.sign(
            &SignRequest {
                method: "POST",
                path,
                host: &self.authority,
                body: &body,
            },
            time,
        );
        let mut request = http::Request::new(Full::new(body));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = uri.clone();
        let headers = request.headers_mut();
        if !self.http2 {
            // HTTP/2 carries the authority in :authority, as KMS's requests do.
            headers.insert(HOST, self.host_value.clone());
        }
        headers.insert(CONTENT_TYPE, self.json.clone());
        headers.insert(
            "x-amz-date",
            HeaderValue::from_str(signed.amz_date()).expect("digits are a valid header value"),
        );
        if let Some(hash) = signed.content_sha256() {
            headers.insert(
                "x-amz-content-sha256",
                HeaderValue::from_str(hash).expect("hex is a valid header value"),
            );
        }
        headers.insert(
            AUTHORIZATION,
            HeaderValue::try_from(signed.into_authorization())
                .expect("an Authorization value is ASCII"),
        );
        request
    }
}
