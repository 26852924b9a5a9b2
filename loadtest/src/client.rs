//! HTTPS connections to the proxy: TCP (no Nagle), TLS with rustls on aws-lc-rs, then
//! HTTP/1.1 or HTTP/2 on top, and signed requests.
//!
//! HTTP/2 uses hyper's client. HTTP/1.1 uses a minimal client of our own
//! ([`Http1Connection`]): the generator shares the box with the proxy it measures, so
//! every microsecond it spends is taken from the proxy. hyper's client runs each
//! connection as a task of its own, reached through channels (two task wake-ups per
//! request), and writes headers and body as two buffers, which TLS turns into two
//! records. Ours writes a request as one buffer from the task that sends it and parses
//! the answer in place with `httparse`, as wrk does.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
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
    /// The connection failed or the answer was not HTTP/1.1 we can read.
    #[error("HTTP/1.1: {0}")]
    Http1(String),
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
            Self::Http(_) | Self::Http1(_) => "transport:http",
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
        if self.http2 {
            let io = TokioIo::new(tls);
            let (sender, connection) = http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(connection);
            Ok(Sender::Http2(sender))
        } else {
            Ok(Sender::Http1(Box::new(Http1Connection::new(tls))))
        }
    }
}

/// One open connection (HTTP/2: one handle of a shared connection).
#[derive(Debug)]
pub enum Sender {
    /// HTTP/1.1: one request at a time.
    Http1(Box<Http1Connection>),
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

    /// Whether the server said it closes the connection after its last answer.
    pub fn closed(&self) -> bool {
        match self {
            Self::Http1(c) => c.closed,
            Self::Http2(_) => false,
        }
    }

    /// Sends a request and reads the whole answer: (status, body).
    pub async fn send(
        &mut self,
        request: http::Request<Full<Bytes>>,
    ) -> Result<(u16, Bytes), ClientError> {
        let response = match self {
            Self::Http1(c) => return c.send(request).await,
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

/// Largest answer head or body read; anything bigger is not an XKS answer.
const MAX_ANSWER: usize = 1 << 20;
/// Headers parsed in an answer head.
const MAX_HEADERS: usize = 32;

/// One HTTP/1.1 keep-alive connection driven by the task that sends on it: a request
/// is written as one buffer, and its answer read back with a Content-Length or chunked
/// body. No pipelining: one request at a time, as KMS and wrk send them.
pub struct Http1Connection<S = tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    io: S,
    /// The request being written.
    out: Vec<u8>,
    /// What has been read and not yet consumed.
    input: bytes::BytesMut,
    /// The server answered `Connection: close`.
    closed: bool,
}

impl<S> std::fmt::Debug for Http1Connection<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http1Connection")
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Http1Connection<S> {
    fn new(io: S) -> Self {
        Self {
            io,
            out: Vec::with_capacity(2048),
            input: bytes::BytesMut::with_capacity(4096),
            closed: false,
        }
    }

    async fn send(
        &mut self,
        request: http::Request<Full<Bytes>>,
    ) -> Result<(u16, Bytes), ClientError> {
        if self.closed {
            return Err(ClientError::Http1("connection closed by the server".into()));
        }
        let (parts, body) = request.into_parts();
        let body = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(never) => match never {},
        };
        self.out.clear();
        self.out.extend_from_slice(parts.method.as_str().as_bytes());
        self.out.push(b' ');
        let target = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes();
        self.out.extend_from_slice(target);
        self.out.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in &parts.headers {
            self.out.extend_from_slice(name.as_str().as_bytes());
            self.out.extend_from_slice(b": ");
            self.out.extend_from_slice(value.as_bytes());
            self.out.extend_from_slice(b"\r\n");
        }
        self.out.extend_from_slice(b"content-length: ");
        self.out
            .extend_from_slice(body.len().to_string().as_bytes());
        self.out.extend_from_slice(b"\r\n\r\n");
        self.out.extend_from_slice(&body);
        let io = |e: std::io::Error| ClientError::Http1(e.to_string());
        self.io.write_all(&self.out).await.map_err(io)?;
        self.io.flush().await.map_err(io)?;
        self.read_answer().await
    }

    /// Reads more input; an end of stream here is an error (an answer is incomplete).
    async fn fill(&mut self) -> Result<(), ClientError> {
        if self.input.len() > MAX_ANSWER {
            return Err(ClientError::Http1("answer too large".into()));
        }
        self.input.reserve(4096);
        let n = self
            .io
            .read_buf(&mut self.input)
            .await
            .map_err(|e| ClientError::Http1(e.to_string()))?;
        if n == 0 {
            return Err(ClientError::Http1("connection closed mid-answer".into()));
        }
        Ok(())
    }

    async fn read_answer(&mut self) -> Result<(u16, Bytes), ClientError> {
        let bad = |what: &str| ClientError::Http1(what.to_owned());
        let (status, head_len, length, chunked) = loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut response = httparse::Response::new(&mut headers);
            match response.parse(&self.input) {
                Ok(httparse::Status::Complete(head_len)) => {
                    let status = response.code.unwrap_or(0);
                    let mut length = None;
                    let mut chunked = false;
                    for header in response.headers.iter() {
                        if header.name.eq_ignore_ascii_case("content-length") {
                            length = std::str::from_utf8(header.value)
                                .ok()
                                .and_then(|v| v.trim().parse::<usize>().ok());
                            if length.is_none() {
                                return Err(bad("unreadable Content-Length"));
                            }
                        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
                            chunked = header.value.eq_ignore_ascii_case(b"chunked");
                        } else if header.name.eq_ignore_ascii_case("connection") {
                            self.closed |= header.value.eq_ignore_ascii_case(b"close");
                        }
                    }
                    break (status, head_len, length, chunked);
                }
                Ok(httparse::Status::Partial) => self.fill().await?,
                Err(e) => return Err(ClientError::Http1(format!("bad answer head: {e}"))),
            }
        };
        let _ = self.input.split_to(head_len);
        if chunked {
            return self.read_chunked().await.map(|body| (status, body));
        }
        let Some(length) = length else {
            return Err(bad("answer without Content-Length or chunked body"));
        };
        if length > MAX_ANSWER {
            return Err(bad("answer too large"));
        }
        while self.input.len() < length {
            self.fill().await?;
        }
        Ok((status, self.input.split_to(length).freeze()))
    }

    async fn read_chunked(&mut self) -> Result<Bytes, ClientError> {
        let mut body = bytes::BytesMut::new();
        loop {
            let (skip, size) = loop {
                match httparse::parse_chunk_size(&self.input) {
                    Ok(httparse::Status::Complete((skip, size))) => break (skip, size),
                    Ok(httparse::Status::Partial) => self.fill().await?,
                    Err(_) => return Err(ClientError::Http1("bad chunk size".into())),
                }
            };
            let size = usize::try_from(size)
                .ok()
                .filter(|n| body.len() + n <= MAX_ANSWER)
                .ok_or_else(|| ClientError::Http1("answer too large".into()))?;
            // The chunk, then its CRLF (after the last chunk: trailers we do not
            // send for, so an empty line).
            while self.input.len() < skip + size + 2 {
                self.fill().await?;
            }
            let _ = self.input.split_to(skip);
            body.extend_from_slice(&self.input.split_to(size));
            if &self.input[..2] != b"\r\n" {
                return Err(ClientError::Http1("bad chunk end".into()));
            }
            let _ = self.input.split_to(2);
            if size == 0 {
                return Ok(body.freeze());
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection to a scripted server: it reads one request, checks it, answers
    /// `answer`, and gives back what it read.
    async fn exchange(answer: &'static [u8]) -> (Result<(u16, Bytes), ClientError>, Vec<u8>, bool) {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let mut connection = Http1Connection::new(client);
        let serving = tokio::spawn(async move {
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.ends_with(b"{}") {
                let n = server.read(&mut buf).await.unwrap();
                request.extend_from_slice(&buf[..n]);
            }
            // Dribble the answer in small pieces: parsing must wait for the rest.
            for piece in answer.chunks(7) {
                server.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            request
        });
        let request = http::Request::builder()
            .method("POST")
            .uri("/kms/xks/v1/keys/foo/encrypt")
            .header("host", "example.com")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let result = connection.send(request).await;
        (result, serving.await.unwrap(), connection.closed)
    }

    #[tokio::test]
    async fn writes_one_request_and_reads_a_content_length_answer() {
        let (result, request, closed) =
            exchange(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello").await;
        assert_eq!(result.unwrap(), (200, Bytes::from_static(b"hello")));
        assert_eq!(
            request,
            b"POST /kms/xks/v1/keys/foo/encrypt HTTP/1.1\r\nhost: example.com\r\n\
              content-length: 2\r\n\r\n{}"
        );
        assert!(!closed);
    }

    #[tokio::test]
    async fn reads_a_chunked_answer_and_notes_connection_close() {
        let (result, _, closed) = exchange(
            b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
              4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n",
        )
        .await;
        assert_eq!(result.unwrap(), (400, Bytes::from_static(b"{\"a\":1}")));
        assert!(closed);
    }

    #[tokio::test]
    async fn refuses_what_it_cannot_read() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 99999999\r\n\r\n",
            b"garbage\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabXX",
        ] {
            let (result, _, _) = exchange(answer).await;
            assert!(
                matches!(result, Err(ClientError::Http1(_))),
                "{:?}: {result:?}",
                String::from_utf8_lossy(answer)
            );
        }
    }
}
