//! Access control as a regulated customer expects it: mTLS, reloads without a restart
//! (credential and certificate rotation), Cedar authorization, replay protection and an
//! audit trail that never holds secrets. Real SoftHSM2, real certificates (rcgen), real
//! clients (rustls, curl).

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

const KMS_SUBJECT: &str = "cks.kms.us-east-1.amazonaws.com";

/// A CA that issues client certificates.
struct TestCa {
    key: rcgen::KeyPair,
    cert: rcgen::Certificate,
}

impl TestCa {
    fn new(name: &str) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key).unwrap();
        Self { key, cert }
    }

    /// Issues a certificate for `name` (CN and DNS SAN) and writes `<file>.pem` and
    /// `<file>-key.pem` into `dir`.
    fn issue(
        &self,
        dir: &Path,
        file: &str,
        name: &str,
        purpose: rcgen::ExtendedKeyUsagePurpose,
        expired: bool,
    ) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![purpose];
        if expired {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        }
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{file}-key.pem")), key.serialize_pem()).unwrap();
    }
}

/// A self-signed client certificate for `name`.
fn self_signed(dir: &Path, file: &str, name: &str) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{file}-key.pem")), key.serialize_pem()).unwrap();
}

fn pem_identity(
    dir: &Path,
    file: &str,
) -> (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    let certs = rustls_pemfile::certs(
        &mut std::fs::read(dir.join(format!("{file}.pem")))
            .unwrap()
            .as_slice(),
    )
    .collect::<Result<Vec<_>, _>>()
    .unwrap();
    let key = rustls_pemfile::private_key(
        &mut std::fs::read(dir.join(format!("{file}-key.pem")))
            .unwrap()
            .as_slice(),
    )
    .unwrap()
    .unwrap();
    (certs, key)
}

/// One signed Encrypt over a new TLS connection that trusts `ca` and presents
/// `identity`; the status, or why the connection failed.
async fn attempt(proxy: &Proxy, ca: &Path, identity: Option<&str>) -> Result<u16, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut std::fs::read(ca).unwrap().as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match identity {
        Some(file) => {
            let (certs, key) = pem_identity(proxy.setup.dir.path(), file);
            builder.with_client_auth_cert(certs, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let client = proxy.client();
    let body = serde_json::to_vec(&encrypt_body(b"m", None, false)).unwrap();
    let mut request = client.signed("POST", &key_path("foo", "encrypt"), &body, &client.signing);
    *request.uri_mut() = key_path("foo", "encrypt").parse().unwrap();
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status().as_u16();
    let _ = response.into_body().collect().await;
    Ok(status)
}

/// mTLS: only a certificate from the configured CA, within its validity, naming an
/// allowed subject, gets through the handshake.
#[tokio::test]
async fn mtls_admits_only_allowed_client_certificates() {
    let setup = Setup::new();
    let dir = setup.dir.path().to_owned();
    let ca = TestCa::new("test client CA");
    std::fs::write(dir.join("client-ca.pem"), ca.cert.pem()).unwrap();
    let client_auth = rcgen::ExtendedKeyUsagePurpose::ClientAuth;
    ca.issue(&dir, "kms", KMS_SUBJECT, client_auth.clone(), false);
    ca.issue(
        &dir,
        "other",
        "someone.example.com",
        client_auth.clone(),
        false,
    );
    ca.issue(&dir, "expired", KMS_SUBJECT, client_auth, true);
    self_signed(&dir, "self", KMS_SUBJECT);
    let text = std::fs::read_to_string(setup.config()).unwrap();
    std::fs::write(
        setup.config(),
        format!("{text}\n[mtls]\nca_bundle = \"client-ca.pem\"\nallowed_subjects = [\"{KMS_SUBJECT}\"]\n"),
    )
    .unwrap();
    let proxy = setup.start();
    let server_ca = dir.join("ca.pem");

    assert_eq!(attempt(&proxy, &server_ca, Some("kms")).await, Ok(200));
    for refused in [None, Some("other"), Some("expired"), Some("self")] {
        let result = attempt(&proxy, &server_ca, refused).await;
        assert!(result.is_err(), "{refused:?} got through: {result:?}");
    }
    assert!(proxy.logged("client certificate subject is not allowed"));

    // curl, a second independent client.
    let curl = |extra: &[&str]| {
        Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(&server_ca)
            .args(extra)
            .arg(proxy.url("/livez"))
            .output()
            .unwrap()
    };
    let with_cert = curl(&[
        "--cert",
        dir.join("kms.pem").to_str().unwrap(),
        "--key",
        dir.join("kms-key.pem").to_str().unwrap(),
    ]);
    assert_eq!(String::from_utf8_lossy(&with_cert.stdout), "200");
    let without = curl(&[]);
    assert!(
        !without.status.success(),
        "curl without a client certificate was served"
    );
}

/// Counts the "configuration reloaded" lines in the logs.
fn reloads(proxy: &Proxy) -> usize {
    proxy.logs().matches("configuration reloaded").count()
}

async fn wait_for_reloads(proxy: &Proxy, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while reloads(proxy) < count {
        assert!(
            Instant::now() < deadline,
            "no reload #{count}:\n{}",
            proxy.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sighup(proxy: &Proxy) {
    let status = Command::new("kill")
        .args(["-HUP", &proxy.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Credential rotation as the spec describes it, without a restart and without
/// dropping an open connection: add the new credential (SIGHUP), both work; remove
/// the old one (a file change is noticed by itself), only the new one works. A broken
/// configuration is refused and the running one stays.
#[tokio::test]
async fn credentials_rotate_without_restart() {
    let setup = Setup::new();
    let dir = setup.dir.path().to_owned();
    let proxy = setup.start();
    let old = proxy.client();
    let mut open = old.h2_connection().await;
    let body = encrypt_body(b"rotate", None, false);
    let path = key_path("foo", "encrypt");
    assert_eq!(old.post_on(&mut open, &path, &body).await.status, 200);

    // `credentials new` writes the secret file and prints the lines to add.
    let out = Command::new(BIN)
        .args([
            "credentials",
            "new",
            "--uri-prefix",
            "example/uri/path/prefix",
            "--secret-file",
        ])
        .arg(dir.join("sigv4-secret-2"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    let lines: String = printed
        .lines()
        .take_while(|l| !l.is_empty())
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    let new_id = lines
        .lines()
        .find_map(|l| l.strip_prefix("access_key_id = \""))
        .unwrap()
        .trim_end_matches('"')
        .to_owned();
    let console: Value = serde_json::from_str(&printed[printed.find('{').unwrap()..]).unwrap();
    assert_eq!(
        console["XksProxyUriPath"],
        "/example/uri/path/prefix/kms/xks/v1"
    );
    let new_secret = std::fs::read_to_string(dir.join("sigv4-secret-2"))
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(
        console["XksProxyAuthenticationCredential"]["RawSecretAccessKey"],
        new_secret.as_str()
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("sigv4-secret-2"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let config = std::fs::read_to_string(proxy.setup.config()).unwrap();
    std::fs::write(proxy.setup.config(), format!("{config}\n{lines}")).unwrap();
    sighup(&proxy);
    wait_for_reloads(&proxy, 1).await;
    let mut new = proxy.client();
    new.signing.access_key_id = new_id.clone();
    new.signing.secret = new_secret;
    assert_eq!(new.post(Version::Http1, &path, &body).await.status, 200);
    assert_eq!(old.post(Version::Http1, &path, &body).await.status, 200);
    assert_eq!(new.post_on(&mut open, &path, &body).await.status, 200);

    // The new credential's age is in the metrics.
    let metrics = proxy.scrape().await;
    let age = metrics.value("xks_credential_age_days", &[("access_key_id", &new_id)]);
    assert!((0.0..1.0).contains(&age), "age {age}");
    assert!(metrics.value("xks_tls_certificate_days_to_expiry", &[]) > 300.0);

    // Remove the old credential; the change is noticed without a signal.
    let config = std::fs::read_to_string(proxy.setup.config()).unwrap();
    let old_block = format!(
        "[[key_store.credential]]\naccess_key_id = \"{}\"\nsecret_access_key_file = \"sigv4-secret\"\n",
        proxy.setup.access_key_id
    );
    assert!(config.contains(&old_block), "{config}");
    std::fs::write(proxy.setup.config(), config.replace(&old_block, "")).unwrap();
    wait_for_reloads(&proxy, 2).await;
    let refused = old.post(Version::Http1, &path, &body).await;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.error_name(), "AuthenticationFailedException");
    assert_eq!(new.post(Version::Http2, &path, &body).await.status, 200);
    // The connection opened before both reloads still serves.
    assert_eq!(new.post_on(&mut open, &path, &body).await.status, 200);

    // A broken configuration is refused; the running one stays.
    let good = std::fs::read_to_string(proxy.setup.config()).unwrap();
    std::fs::write(proxy.setup.config(), good.replace("region = ", "regio = ")).unwrap();
    sighup(&proxy);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !proxy.logs().contains("configuration reload failed") {
        assert!(Instant::now() < deadline, "no failed reload logged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(new.post(Version::Http1, &path, &body).await.status, 200);
    let metrics = proxy.scrape().await;
    assert!(metrics.value("xks_config_reloads_total", &[("result", "error")]) >= 1.0);
    assert_eq!(
        metrics.value("xks_config_reloads_total", &[("result", "ok")]),
        2.0
    );
}

/// A renewed server certificate and a changed key list apply to new connections after
/// a reload.
#[tokio::test]
async fn certificate_and_key_membership_reload() {
    let setup = Setup::new();
    let dir = setup.dir.path().to_owned();
    let proxy = setup.start();
    let old_ca = dir.join("ca.pem");
    assert_eq!(attempt(&proxy, &old_ca, None).await, Ok(200));

    // A new CA and server certificate, written in place.
    let ca = TestCa::new("renewed CA");
    ca.issue(
        &dir,
        "server",
        "localhost",
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        false,
    );
    std::fs::write(dir.join("ca-2.pem"), ca.cert.pem()).unwrap();
    // And foo leaves the key store.
    proxy.setup.edit_config("keys = [\"foo\", ", "keys = [");
    sighup(&proxy);
    wait_for_reloads(&proxy, 1).await;
    assert!(
        attempt(&proxy, &old_ca, None).await.is_err(),
        "the old certificate is still served"
    );
    assert_eq!(attempt(&proxy, &dir.join("ca-2.pem"), None).await, Ok(404));
}

fn write_policies(dir: &Path, text: &str) {
    std::fs::write(dir.join("policies.cedar"), text).unwrap();
}

const POLICIES: &str = r#"
@id("alice-foo")
permit (
  principal == Xks::Principal::"arn:aws:iam::123456789012:user/Alice",
  action in [Xks::Action::"Encrypt", Xks::Action::"Decrypt"],
  resource == Xks::Key::"quickstart/foo"
);

@id("no-decrypt-via-ebs")
forbid (principal, action == Xks::Action::"Decrypt", resource)
when { context has kmsViaService && context.kmsViaService == "ebs" };
"#;

/// Cedar policies decide Encrypt/Decrypt/GetKeyMetadata (never GetHealthStatus); a
/// denial is 403 AccessDeniedException and the log names the deciding policy.
#[tokio::test]
async fn cedar_policies_authorize_requests() {
    let setup = Setup::new();
    write_policies(setup.dir.path(), POLICIES);
    let text = std::fs::read_to_string(setup.config()).unwrap();
    std::fs::write(
        setup.config(),
        format!("{text}\n[authorization]\npolicy_file = \"policies.cedar\"\n"),
    )
    .unwrap();
    let proxy = setup.start();
    let client = proxy.client();

    let encrypted = client
        .post(
            Version::Http1,
            &key_path("foo", "encrypt"),
            &encrypt_body(b"p", None, false),
        )
        .await;
    assert_eq!(encrypted.status, 200, "{:?}", encrypted.body);

    // Decrypt via EBS is forbidden by policy.
    let denied = client
        .post(
            Version::Http1,
            &key_path("foo", "decrypt"),
            &decrypt_body(&encrypted.body, None),
        )
        .await;
    assert_eq!(denied.status, 403);
    assert_eq!(denied.error_name(), "AccessDeniedException");
    assert!(proxy.logged("no-decrypt-via-ebs"), "{}", proxy.logs());
    // Via S3 it is permitted.
    let mut body = decrypt_body(&encrypted.body, None);
    body["requestMetadata"]["kmsViaService"] = json!("s3");
    let decrypted = client
        .post(Version::Http2, &key_path("foo", "decrypt"), &body)
        .await;
    assert_eq!(unb64(&decrypted.body["plaintext"]), b"p");

    // Another principal: no policy permits.
    let mut body = encrypt_body(b"p", None, false);
    body["requestMetadata"]["awsPrincipalArn"] = json!("arn:aws:iam::999999999999:user/Mallory");
    let denied = client
        .post(Version::Http1, &key_path("foo", "encrypt"), &body)
        .await;
    assert_eq!(denied.status, 403);
    assert!(proxy.logged("denied: no policy permits"));
    // GetKeyMetadata has no permit.
    let metadata = client
        .post(
            Version::Http1,
            &key_path("foo", "metadata"),
            &json!({"requestMetadata": metadata()}),
        )
        .await;
    assert_eq!(metadata.status, 403);
    // GetHealthStatus is never subject to authorization.
    let health = client
        .post(
            Version::Http1,
            &health_path(),
            &json!({"requestMetadata": {"kmsRequestId": "r", "kmsOperation": "KmsHealthCheck"}}),
        )
        .await;
    assert_eq!(health.status, 200);

    // Policies reload when their file changes: now Mallory may encrypt.
    write_policies(
        proxy.setup.dir.path(),
        &format!(
            "{POLICIES}\n@id(\"mallory\")\npermit (principal == Xks::Principal::\"arn:aws:iam::999999999999:user/Mallory\", action == Xks::Action::\"Encrypt\", resource);\n"
        ),
    );
    wait_for_reloads(&proxy, 1).await;
    assert_eq!(
        client
            .post(Version::Http1, &key_path("foo", "encrypt"), &body)
            .await
            .status,
        200
    );
}

/// A policy that does not match the schema stops the start, naming the policy.
#[test]
fn invalid_policies_are_refused_at_start() {
    let setup = Setup::new();
    write_policies(
        setup.dir.path(),
        "@id(\"typo\")\npermit (principal, action, resource) when { context.kmsViaServce == \"s3\" };\n",
    );
    let text = std::fs::read_to_string(setup.config()).unwrap();
    std::fs::write(
        setup.config(),
        format!("{text}\n[authorization]\npolicy_file = \"policies.cedar\"\n"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(setup.config())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("typo"), "{stderr}");
}

/// With replay protection on, a signature is accepted once; off (the default), KMS's
/// retries with the same signature are served.
#[tokio::test]
async fn replayed_signatures_are_refused_when_asked() {
    for protection in [false, true] {
        let setup = Setup::new();
        if protection {
            setup.edit_config(
                "request_deadline_ms = 100",
                "request_deadline_ms = 100\nsigv4_replay_protection = true",
            );
        }
        let proxy = setup.start();
        let client = proxy.client();
        let body = serde_json::to_vec(&encrypt_body(b"r", None, false)).unwrap();
        let mut signing = client.signing.clone();
        signing.time = std::time::SystemTime::now();
        let first = client
            .send(
                Version::Http1,
                client.signed("POST", &key_path("foo", "encrypt"), &body, &signing),
            )
            .await;
        let again = client
            .send(
                Version::Http2,
                client.signed("POST", &key_path("foo", "encrypt"), &body, &signing),
            )
            .await;
        assert_eq!(first.status, 200);
        if protection {
            assert_eq!(again.status, 401);
            assert_eq!(again.error_name(), "AuthenticationFailedException");
            assert!(again.body["errorMessage"]
                .as_str()
                .unwrap()
                .contains("used before"));
        } else {
            assert_eq!(again.status, 200);
        }
    }
}

/// With replay protection on, a request refused by admission (here the key store's
/// quota, 429) has not used its signature: KMS's retry of it is served.
#[tokio::test]
async fn a_throttled_request_can_be_retried_with_its_signature() {
    let setup = Setup::new();
    setup.edit_config(
        "request_deadline_ms = 100",
        "request_deadline_ms = 100\nsigv4_replay_protection = true",
    );
    setup.edit_config(
        "\n[[key_store.credential]]",
        "max_requests_per_second = 1\nburst = 1\n\n[[key_store.credential]]",
    );
    let proxy = setup.start();
    let client = proxy.client();
    let path = key_path("foo", "encrypt");
    let body = serde_json::to_vec(&encrypt_body(b"r", None, false)).unwrap();
    let send = |signing: &Signing| {
        client.send(Version::Http1, client.signed("POST", &path, &body, signing))
    };
    let mut first = client.signing.clone();
    first.time = std::time::SystemTime::now();
    assert_eq!(send(&first).await.status, 200);
    // A second request (its own signature) finds the burst spent.
    let mut second = first.clone();
    second.time += Duration::from_secs(1);
    let throttled = send(&second).await;
    assert_eq!(throttled.status, 429, "{:?}", throttled.body);
    // KMS retries it as it was signed once the quota allows.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let retried = send(&second).await;
    assert_eq!(retried.status, 200, "{:?}", retried.body);
    // Served once, it is used: a replay is refused.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let replayed = send(&second).await;
    assert_eq!(replayed.status, 401, "{:?}", replayed.body);
}

/// One JSON audit line per request with the request's facts, and never plaintext,
/// AAD, ciphertext, the PIN or the SigV4 secret in any log line.
#[tokio::test]
async fn audit_log_has_facts_and_no_secrets() {
    // The text format (the default) and JSON: each line is written by its own code.
    for format in ["text", "json"] {
        audit_log_in(format).await;
    }
}

async fn audit_log_in(format: &str) {
    let setup = Setup::new();
    let pin = std::fs::read_to_string(setup.path("hsm-pin"))
        .unwrap()
        .trim()
        .to_owned();
    let secret = setup.secret.clone();
    let proxy = Proxy::start(setup, &[("XKS_LOG_FORMAT", format)]);
    let client = proxy.client();
    let plaintext = b"MARKER-PLAINTEXT-5b1e9c";
    let aad = b"MARKER-AAD-77d2a0";
    let encrypted = client
        .post(
            Version::Http1,
            &key_path("foo", "encrypt"),
            &encrypt_body(plaintext, Some(aad), true),
        )
        .await;
    assert_eq!(encrypted.status, 200);
    let decrypted = client
        .post(
            Version::Http2,
            &key_path("foo", "decrypt"),
            &decrypt_body(&encrypted.body, Some(aad)),
        )
        .await;
    assert_eq!(unb64(&decrypted.body["plaintext"]), plaintext);
    // A failing decrypt (wrong AAD), a failing encrypt (unknown key), and a body the
    // parser refuses with the plaintext where a string should be.
    let wrong = client
        .post(
            Version::Http1,
            &key_path("foo", "decrypt"),
            &decrypt_body(&encrypted.body, Some(b"MARKER-AAD-wrong")),
        )
        .await;
    assert_eq!(wrong.error_name(), "InvalidCiphertextException");
    client
        .post(
            Version::Http1,
            &key_path("nope", "encrypt"),
            &encrypt_body(plaintext, Some(aad), false),
        )
        .await;
    let mut wrong_type = encrypt_body(plaintext, Some(aad), false);
    wrong_type["plaintext"] = json!([b64(plaintext)]);
    let refused = client
        .post(Version::Http1, &key_path("foo", "encrypt"), &wrong_type)
        .await;
    assert_eq!(refused.error_name(), "ValidationException");
    client
        .post(
            Version::Http1,
            &key_path("foo", "metadata"),
            &json!({"requestMetadata": metadata()}),
        )
        .await;
    client
        .post(
            Version::Http1,
            &health_path(),
            &json!({"requestMetadata": {"kmsRequestId": "h-1", "kmsOperation": "KmsHealthCheck"}}),
        )
        .await;
    // A bad signature.
    let mut bad = proxy.client();
    bad.signing.secret = "x".repeat(44);
    assert_eq!(
        bad.post(
            Version::Http1,
            &key_path("foo", "encrypt"),
            &encrypt_body(plaintext, None, false)
        )
        .await
        .status,
        401
    );
    tokio::time::sleep(Duration::from_millis(100)).await;

    let logs = proxy.logs();
    let ciphertext = encrypted.body["ciphertext"].as_str().unwrap();
    let tag = encrypted.body["authenticationTag"].as_str().unwrap();
    for (what, needle) in [
        ("plaintext", String::from_utf8_lossy(plaintext).into_owned()),
        ("plaintext (Base64)", b64(plaintext)),
        ("AAD", String::from_utf8_lossy(aad).into_owned()),
        ("AAD (Base64)", b64(aad)),
        ("ciphertext", ciphertext.to_owned()),
        ("tag", tag.to_owned()),
        ("PIN", pin),
        ("SigV4 secret", secret),
    ] {
        assert!(
            !logs.contains(&needle),
            "{format}: the {what} is in the logs"
        );
    }
    assert!(
        logs.contains("4112f4d6-db54-4af4-ae30-c55a22a8dfae"),
        "{format}: kmsRequestId is logged"
    );
    if format != "json" {
        return;
    }
    let audit: Vec<Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "xks request")
        .collect();
    assert_eq!(audit.len(), 8, "one audit line per request:\n{logs}");
    let first = &audit[0];
    for field in [
        "timestamp",
        "kms_request_id",
        "key_store",
        "operation",
        "kms_operation",
        "principal",
        "key_id",
        "outcome",
        "latency_us",
        "auth_us",
        "queue_us",
        "hsm_us",
    ] {
        assert!(!first[field].is_null(), "{field} missing from {first}");
    }
    assert_eq!(
        first["kms_request_id"],
        "4112f4d6-db54-4af4-ae30-c55a22a8dfae"
    );
    assert_eq!(first["outcome"], "ok");
    assert!(audit
        .iter()
        .any(|a| a["outcome"] == "InvalidCiphertextException"));
}

/// A secret file readable by others draws a warning.
#[tokio::test]
async fn loose_secret_permissions_are_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let setup = Setup::new();
    std::fs::set_permissions(
        setup.path("sigv4-secret"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let proxy = setup.start();
    assert!(proxy.logged("readable by group or others"));
}
