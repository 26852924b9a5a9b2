//! TLS policy (spec: API content type): TLS 1.2 or 1.3 only (rustls implements nothing
//! older), only the spec's cipher suites, and ALPN falling back to HTTP/1.1.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::sync::Arc;

use common::*;
use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider};
use rustls::crypto::CryptoProvider;
use rustls::SupportedCipherSuite;

/// Handshakes with a client limited to `suites` and `versions`; returns whether it
/// succeeded.
async fn handshake(
    proxy: &Proxy,
    suites: Vec<SupportedCipherSuite>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> bool {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(
        &mut std::fs::read(proxy.setup.path("ca.pem"))
            .unwrap()
            .as_slice(),
    ) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = CryptoProvider {
        cipher_suites: suites,
        ..default_provider()
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.is_ok()
}

#[tokio::test]
async fn only_tls_1_2_and_1_3_with_the_spec_cipher_suites() {
    let proxy = Setup::new().start();
    let tls12 = &[&rustls::version::TLS12];
    let tls13 = &[&rustls::version::TLS13];
    assert!(handshake(&proxy, vec![cipher_suite::TLS13_AES_256_GCM_SHA384], tls13).await);
    assert!(
        handshake(
            &proxy,
            vec![cipher_suite::TLS13_CHACHA20_POLY1305_SHA256],
            tls13
        )
        .await
    );
    assert!(
        handshake(
            &proxy,
            vec![cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384],
            tls12
        )
        .await
    );
    // Suites outside the spec's list are refused.
    assert!(!handshake(&proxy, vec![cipher_suite::TLS13_AES_128_GCM_SHA256], tls13).await);
    assert!(
        !handshake(
            &proxy,
            vec![cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256],
            tls12
        )
        .await
    );
    assert!(
        !handshake(
            &proxy,
            vec![cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256],
            tls12
        )
        .await
    );
}

#[test]
fn http_1_1_is_the_alpn_fallback() {
    let proxy = Setup::new().start();
    let run = |args: &[&str]| {
        Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_version}",
                "--cacert",
            ])
            .arg(proxy.setup.path("ca.pem"))
            .args(args)
            .arg(proxy.url("/livez"))
            .output()
            .unwrap()
    };
    // A client without ALPN h2 gets HTTP/1.1.
    let h1 = run(&["--http1.1"]);
    assert_eq!(String::from_utf8_lossy(&h1.stdout), "1.1");
    let h2 = run(&["--http2"]);
    assert_eq!(String::from_utf8_lossy(&h2.stdout), "2");
}
