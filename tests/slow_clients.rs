//! What a client may hold without authenticating, on a real proxy (SoftHSM2): slow
//! bodies, connections that never authenticate, kept-alive KMS connections, HTTP/2
//! control-frame floods, per-address limits, and readiness when every slot is taken.

#![allow(clippy::unwrap_used)]

mod common;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Opens a TLS connection offering `alpn`.
async fn tls(proxy: &Proxy, alpn: &[u8]) -> std::io::Result<TlsStream<TcpStream>> {
    let config = tls_client_config(&proxy.setup.path("ca.pem"), &[alpn]);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(proxy.addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await
}

/// Reads until the server closes the connection (EOF or an error) or `limit` passes;
/// returns what was read and whether it closed.
async fn read_until_closed(stream: &mut TlsStream<TcpStream>, limit: Duration) -> (String, bool) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return (String::from_utf8_lossy(&seen).into_owned(), true),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&seen).into_owned(), false),
        }
    }
}

/// A request body that sends one byte every `every`, and never ends.
struct Dribble {
    every: Duration,
    next: Pin<Box<tokio::time::Sleep>>,
}

impl Dribble {
    fn new(every: Duration) -> Self {
        Self {
            every,
            next: Box::pin(tokio::time::sleep(Duration::ZERO)),
        }
    }
}

impl Body for Dribble {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.next.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                let at = tokio::time::Instant::now() + self.every;
                self.next.as_mut().reset(at);
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"{")))))
            }
        }
    }
}

/// Connections the proxy closed for `reason`, by its metrics.
fn closed_for(metrics: &Metrics, reason: &str) -> f64 {
    metrics.value("xks_connections_closed_total", &[("reason", reason)])
}

/// The configuration's `[server]` section gains `lines`.
fn with_server_lines(setup: &Setup, lines: &str) {
    setup.edit_config(
        "request_deadline_ms = 100",
        &format!("request_deadline_ms = 100\n{lines}"),
    );
}

/// Slow bodies on HTTP/1.1 and HTTP/2 that fill every connection slot are cut off by
/// the body deadline: each gets a ValidationException and its connection closes (its
/// stream reset and GOAWAY on HTTP/2), and a normal client waiting in the backlog is
/// served.
#[tokio::test]
async fn slow_bodies_are_cut_off_and_a_normal_client_is_served() {
    let setup = Setup::new();
    with_server_lines(&setup, "max_connections = 24\nbody_read_timeout_ms = 1000");
    let proxy = setup.start();
    let client = proxy.client();
    let path = key_path("foo", "encrypt");

    // 16 HTTP/1.1 connections: headers, then one body byte every 300 ms.
    let mut slow_h1 = Vec::new();
    for _ in 0..16 {
        let mut stream = tls(&proxy, b"http/1.1").await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
             content-length: 200\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        slow_h1.push(tokio::spawn(async move {
            let started = Instant::now();
            let (mut reader, mut writer) = tokio::io::split(stream);
            let dribble = tokio::spawn(async move {
                while writer.write_all(b"{").await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            });
            let mut seen = Vec::new();
            let mut buf = [0u8; 1024];
            let closed = loop {
                match tokio::time::timeout(Duration::from_secs(15), reader.read(&mut buf)).await {
                    Ok(Ok(0) | Err(_)) => break true,
                    Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
                    Err(_) => break false,
                }
            };
            dribble.abort();
            (
                String::from_utf8_lossy(&seen).into_owned(),
                closed,
                started.elapsed(),
            )
        }));
    }
    // 8 HTTP/2 connections, each with two dribbling streams.
    let mut slow_h2 = Vec::new();
    for _ in 0..8 {
        let stream = tls(&proxy, b"h2").await.unwrap();
        let (sender, conn) = hyper::client::conn::http2::handshake::<_, _, Dribble>(
            TokioExecutor::new(),
            TokioIo::new(stream),
        )
        .await
        .unwrap();
        let conn = tokio::spawn(conn);
        let mut streams = Vec::new();
        for _ in 0..2 {
            let mut sender = sender.clone();
            let request = http::Request::builder()
                .method("POST")
                .uri(proxy.url(&path))
                .header("content-type", "application/json")
                .body(Dribble::new(Duration::from_millis(300)))
                .unwrap();
            streams.push(tokio::spawn(async move {
                let response = sender.send_request(request).await.unwrap();
                let status = response.status().as_u16();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                (status, String::from_utf8_lossy(&body).into_owned())
            }));
        }
        slow_h2.push((conn, streams, Instant::now()));
    }

    // Every slot is taken; a normal client waits in the backlog until the deadline
    // frees slots, then is served.
    for i in 0..6 {
        let version = if i % 2 == 0 {
            Version::Http1
        } else {
            Version::Http2
        };
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            client.post(version, &path, &encrypt_body(b"kms", None, false)),
        )
        .await
        .expect("a normal client must be served while slow bodies hold connections");
        assert_eq!(reply.status, 200, "{:?}", reply.body);
    }

    for task in slow_h1 {
        let (text, closed, after) = task.await.unwrap();
        assert!(closed, "a slow HTTP/1.1 body kept its connection: {text}");
        assert!(text.starts_with("HTTP/1.1 400"), "{text}");
        assert!(text.contains("ValidationException"), "{text}");
        assert!(text.contains("not received within 1000 ms"), "{text}");
        assert!(
            text.to_ascii_lowercase().contains("connection: close"),
            "{text}"
        );
        assert!(
            after >= Duration::from_millis(900),
            "closed after {after:?}"
        );
    }
    for (conn, streams, opened) in slow_h2 {
        for stream in streams {
            let (status, body) = stream.await.unwrap();
            assert_eq!(status, 400, "{body}");
            assert!(body.contains("not received within 1000 ms"), "{body}");
        }
        // The connection was told to go away and ended.
        tokio::time::timeout(Duration::from_secs(10), conn)
            .await
            .expect("the HTTP/2 connection with slow streams stayed open")
            .unwrap()
            .ok();
        assert!(opened.elapsed() >= Duration::from_millis(900));
    }
    let metrics = proxy.scrape().await;
    assert!(
        closed_for(&metrics, "body_timeout") >= 32.0,
        "{}",
        metrics.text
    );
}

/// Readiness is off while every connection slot is taken: new clients would wait in
/// the backlog.
#[tokio::test]
async fn readiness_is_off_while_every_connection_slot_is_taken() {
    let setup = Setup::new();
    with_server_lines(&setup, "max_connections = 3");
    let proxy = setup.start();
    let admin = proxy.admin.unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tls(&proxy, b"http/1.1").await.unwrap());
    }
    // The proxy counts a connection once its task runs: poll briefly.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (status, body) = loop {
        let (status, body) = admin_request(admin, "GET", "/readyz").await;
        if status == 503 || Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("server.max_connections"), "{body}");
    held.pop();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = admin_request(admin, "GET", "/readyz").await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "still unready: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends a signed Encrypt on an open HTTP/1.1 connection.
async fn encrypt_on_h1(
    client: &Client,
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
) -> Result<u16, hyper::Error> {
    let path = key_path("foo", "encrypt");
    let body = serde_json::to_vec(&encrypt_body(b"k", None, false)).unwrap();
    let mut signing = client.signing.clone();
    signing.time = SystemTime::now();
    let mut request = client.signed("POST", &path, &body, &signing);
    *request.uri_mut() = path.parse().unwrap();
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    response.into_body().collect().await?;
    Ok(status)
}

/// A connection that never authenticates is closed after
/// `unauthenticated_timeout_seconds` whatever it does (idle HTTP/2, probes on
/// HTTP/1.1), while connections that authenticated stay open and idle past both that
/// and the header-read timeout (hyper's header timer used to close kept-alive
/// connections after it).
#[tokio::test]
async fn unauthenticated_connections_are_closed_and_kms_connections_kept_alive() {
    let setup = Setup::new();
    with_server_lines(
        &setup,
        "unauthenticated_timeout_seconds = 2\nheader_read_timeout_seconds = 1",
    );
    let proxy = setup.start();
    let client = proxy.client();

    // An HTTP/2 connection that never sends a request.
    let idle_h2 = tls(&proxy, b"h2").await.unwrap();
    let (_idle_sender, idle_conn) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(idle_h2),
    )
    .await
    .unwrap();
    let idle_opened = Instant::now();
    let idle_conn = tokio::spawn(idle_conn);

    // An HTTP/1.1 connection that sends a probe every 300 ms.
    let mut probing = tls(&proxy, b"http/1.1").await.unwrap();
    let probing_opened = Instant::now();
    let prober = tokio::spawn(async move {
        let mut answers = 0;
        let mut buf = [0u8; 1024];
        loop {
            if probing
                .write_all(b"GET /livez HTTP/1.1\r\nhost: localhost\r\n\r\n")
                .await
                .is_err()
            {
                return (answers, probing_opened.elapsed());
            }
            match tokio::time::timeout(Duration::from_secs(10), probing.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => answers += 1,
                _ => return (answers, probing_opened.elapsed()),
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });

    // KMS-like connections: one request, then idle for 4 s, then another.
    let h1 = tls(&proxy, b"http/1.1").await.unwrap();
    let (mut h1_sender, h1_conn) = hyper::client::conn::http1::handshake(TokioIo::new(h1))
        .await
        .unwrap();
    tokio::spawn(h1_conn);
    assert_eq!(encrypt_on_h1(&client, &mut h1_sender).await.unwrap(), 200);
    let mut h2_sender = client.h2_connection().await;
    let path = key_path("foo", "encrypt");
    let body = encrypt_body(b"k", None, false);
    assert_eq!(
        client.post_on(&mut h2_sender, &path, &body).await.status,
        200
    );

    tokio::time::timeout(Duration::from_secs(10), idle_conn)
        .await
        .expect("an HTTP/2 connection without requests stayed open")
        .unwrap()
        .ok();
    let idle_for = idle_opened.elapsed();
    assert!(idle_for >= Duration::from_millis(1500), "{idle_for:?}");
    let (answers, probing_for) = prober.await.unwrap();
    assert!(answers >= 3, "{answers} probes answered");
    assert!(
        probing_for >= Duration::from_millis(1500) && probing_for < Duration::from_secs(8),
        "a probing connection lived {probing_for:?}"
    );

    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        encrypt_on_h1(&client, &mut h1_sender)
            .await
            .expect("the kept-alive HTTP/1.1 connection was closed"),
        200
    );
    assert_eq!(
        client.post_on(&mut h2_sender, &path, &body).await.status,
        200
    );
    let metrics = proxy.scrape().await;
    assert!(
        closed_for(&metrics, "unauthenticated") >= 2.0,
        "{}",
        metrics.text
    );
}

/// A flood of HTTP/2 PING frames ends its connection; other clients are served.
#[tokio::test]
async fn an_http2_ping_flood_ends_the_connection() {
    let proxy = Setup::new().start();
    let mut stream = tls(&proxy, b"h2").await.unwrap();
    let mut frames = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // An empty SETTINGS frame, then PINGs (type 6, 8-byte payload) on stream 0.
    frames.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let mut ping = vec![0, 0, 8, 6, 0, 0, 0, 0, 0];
    ping.extend_from_slice(&[1; 8]);
    let batch: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 1000)
        .collect();
    stream.write_all(&frames).await.unwrap();
    let (mut reader, mut writer) = tokio::io::split(stream);
    let flood = tokio::spawn(async move {
        for _ in 0..200 {
            if writer.write_all(&batch).await.is_err() {
                return;
            }
        }
        // All sent: keep the connection open to see whether the server ends it.
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let mut answered = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(15), reader.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break true,
            Ok(Ok(n)) => answered += n,
            Err(_) => break false,
        }
    };
    flood.abort();
    assert!(closed, "the connection survived 200,000 PINGs");
    // Far fewer than 200,000 PING ACKs (17 bytes each) were sent back.
    assert!(answered < 17 * 20_000, "{answered} bytes answered");
    let metrics = proxy.scrape().await;
    assert_eq!(closed_for(&metrics, "control_frame_flood"), 1.0);
    let reply = proxy
        .client()
        .post(
            Version::Http2,
            &key_path("foo", "encrypt"),
            &encrypt_body(b"x", None, false),
        )
        .await;
    assert_eq!(reply.status, 200);
}

/// `max_connections_per_client` closes an address's connections beyond the limit
/// before TLS, and counts them.
#[tokio::test]
async fn connections_per_client_address_are_bounded() {
    let setup = Setup::new();
    with_server_lines(&setup, "max_connections_per_client = 2");
    let proxy = setup.start();
    let first = tls(&proxy, b"http/1.1").await.unwrap();
    let _second = tls(&proxy, b"http/1.1").await.unwrap();
    assert!(
        tls(&proxy, b"http/1.1").await.is_err(),
        "a third connection from the same address got through"
    );
    drop(first);
    // The slot is given back when the server notices the close.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut third = loop {
        if let Ok(stream) = tls(&proxy, b"http/1.1").await {
            break stream;
        }
        assert!(
            Instant::now() < deadline,
            "the freed place was not given back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    third
        .write_all(b"GET /livez HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let (text, _) = read_until_closed(&mut third, Duration::from_secs(5)).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let metrics = proxy.scrape().await;
    assert!(closed_for(&metrics, "per_client_limit") >= 1.0);
}
