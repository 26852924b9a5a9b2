//! Kubernetes updates a mounted Secret by swapping a `..data` symlink (see
//! `tests/common/kubelet.rs`). The proxy's certificate and its SigV4 secret are
//! mounted that way here, both Secrets are updated as the kubelet does it, and the
//! running proxy must serve the new certificate and accept only the new secret,
//! without a signal or a restart (docs/deployment.md, Rotating certificates and
//! credentials).

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rustls::pki_types::{CertificateDer, ServerName};

/// The DER of the first certificate in a PEM file.
fn leaf(pem: &[u8]) -> Vec<u8> {
    rustls_pemfile::certs(&mut &pem[..])
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

/// The certificate the proxy serves to a new connection (the client trusts `ca`).
async fn served_certificate(proxy: &Proxy, ca: &Path) -> Vec<u8> {
    let config = tls_client_config(ca, &[b"http/1.1"]);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let served: &CertificateDer<'_> = &tls.get_ref().1.peer_certificates().unwrap()[0];
    served.to_vec()
}

/// A new CA and a server certificate for localhost signed by it: (CA PEM, cert PEM,
/// key PEM).
fn renewed_certificate() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "renewed CA");
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

#[tokio::test]
async fn a_kubelet_secret_swap_reloads_the_certificate_and_the_credential() {
    let setup = Setup::new();
    let dir = setup.dir.path().to_owned();
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    let old_cert = read("server.pem");
    let old_secret = setup.secret.clone();
    // The two Secrets at their mount points, as in deploy/kubernetes.
    let mut tls = KubeletVolume::new(
        &dir.join("etc/tls"),
        &[("tls.crt", &old_cert), ("tls.key", &read("server-key.pem"))],
    );
    let mut sigv4 = KubeletVolume::new(
        &dir.join("etc/sigv4"),
        &[("secret-access-key", old_secret.as_bytes())],
    );
    setup.edit_config(
        "tls_certificate = \"server.pem\"\ntls_private_key = \"server-key.pem\"\n",
        "tls_certificate = \"etc/tls/tls.crt\"\ntls_private_key = \"etc/tls/tls.key\"\nreload_poll_seconds = 1\n",
    );
    setup.edit_config(
        "secret_access_key_file = \"sigv4-secret\"",
        "secret_access_key_file = \"etc/sigv4/secret-access-key\"",
    );
    let proxy = setup.start();
    let body = encrypt_body(b"swap", None, false);
    let path = key_path("foo", "encrypt");
    let old_client = proxy.client();
    assert_eq!(
        old_client.post(Version::Http1, &path, &body).await.status,
        200
    );
    let old_ca = dir.join("ca.pem");
    assert_eq!(served_certificate(&proxy, &old_ca).await, leaf(&old_cert));

    // Both Secrets change, each by the kubelet's swap.
    let (new_ca, new_cert, new_key) = renewed_certificate();
    let new_secret = "n".repeat(20) + &"W".repeat(23);
    tls.update(&[
        ("tls.crt", new_cert.as_bytes()),
        ("tls.key", new_key.as_bytes()),
    ]);
    sigv4.update(&[("secret-access-key", new_secret.as_bytes())]);
    // The file names still resolve, to the new contents.
    assert_eq!(
        std::fs::read(tls.dir.join("tls.crt")).unwrap(),
        new_cert.as_bytes()
    );

    // Trust both CAs from here on (the Client reads ca.pem when it is made).
    std::fs::write(&old_ca, [read("ca.pem"), new_ca.into_bytes()].concat()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while served_certificate(&proxy, &old_ca).await != leaf(new_cert.as_bytes()) {
        assert!(
            Instant::now() < deadline,
            "the swapped certificate is not served:\n{}",
            proxy.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(proxy.logged("configuration reloaded"), "{}", proxy.logs());

    let mut new_client = proxy.client();
    new_client.signing.secret = new_secret;
    let mut stale_client = proxy.client();
    stale_client.signing.secret = old_secret;
    assert_eq!(
        new_client.post(Version::Http1, &path, &body).await.status,
        200
    );
    let refused = stale_client.post(Version::Http2, &path, &body).await;
    assert_eq!(refused.status, 401, "{:?}", refused.body);
    assert_eq!(refused.error_name(), "AuthenticationFailedException");
}
