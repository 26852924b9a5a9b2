//! The container images from outside: the four XKS APIs and a bad signature against a
//! proxy running in a container (deploy/container/Containerfile), over its published
//! port, signed by the aws-sigv4 crate.
//!
//! scripts/check-container.sh builds the images, starts a container and runs this test
//! with `XKS_CONTAINER_ENV` naming the `test-client.env` the container's quickstart wrote
//! into its mounted folder (the proxy's host:port, the credential and the CA), and
//! `XKS_CONTAINER_ADMIN` the published admin listener (host:port). Without
//! `XKS_CONTAINER_ENV` (a plain `cargo test`) each test prints why and does nothing.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::json;

/// The running container's proxy, as its `test-client.env` describes it.
struct Target {
    client: Client,
    admin: Option<SocketAddr>,
}

/// Reads `XKS_CONTAINER_ENV`; None (after saying why) when it is not set.
fn target(test: &str) -> Option<Target> {
    let Some(env_file) = std::env::var_os("XKS_CONTAINER_ENV") else {
        // Straight to stderr, past the test harness's capture, so that a plain
        // `cargo test` shows that this ran nothing.
        let _ = writeln!(
            std::io::stderr(),
            "SKIP {test}: XKS_CONTAINER_ENV is not set (scripts/check-container.sh sets it \
             to a running container's test-client.env)"
        );
        return None;
    };
    let env_file = PathBuf::from(env_file);
    let vars = parse_env(&std::fs::read_to_string(&env_file).unwrap());
    let host = &vars["XKS_PROXY_HOST"];
    let port: u16 = host
        .strip_prefix("localhost:")
        .unwrap_or_else(|| panic!("XKS_PROXY_HOST {host:?} is not localhost:PORT"))
        .parse()
        .unwrap();
    let ca = host_path(&env_file, Path::new(&vars["CACERT"]));
    let client = Client::to(
        port,
        &ca,
        &vars["SIGV4_ACCESS_KEY_ID"],
        &vars["SIGV4_SECRET_ACCESS_KEY"],
    );
    let admin = std::env::var("XKS_CONTAINER_ADMIN")
        .ok()
        .map(|a| a.parse().unwrap());
    Some(Target { client, admin })
}

/// `NAME="value"` lines, as the quickstart writes them.
fn parse_env(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
        .collect()
}

/// The env file names the CA where the container sees it (/xks/ca.pem); on the host it
/// is beside the env file, in the mounted folder.
fn host_path(env_file: &Path, in_container: &Path) -> PathBuf {
    if in_container.exists() {
        return in_container.to_owned();
    }
    env_file
        .parent()
        .unwrap()
        .join(in_container.file_name().unwrap())
}

#[tokio::test]
async fn health_status_reports_the_containers_token() {
    let Some(target) = target("health_status_reports_the_containers_token") else {
        return;
    };
    let body =
        json!({"requestMetadata": {"kmsRequestId": "c-1", "kmsOperation": "KmsHealthCheck"}});
    for version in [Version::Http1, Version::Http2] {
        let reply = target.client.post(version, &health_path(), &body).await;
        assert_eq!(reply.status, 200, "{version:?} {:?}", reply.body);
        assert_eq!(reply.body["xksProxyVendor"], "xks-proxy");
        assert_eq!(reply.body["ekmVendor"], "SoftHSM project");
        let fleet = reply.body["ekmFleetDetails"].as_array().unwrap();
        assert_eq!(fleet.len(), 1, "{:?}", reply.body);
        // DEGRADED is a check that passed but took more than half the request deadline,
        // which a busy box (a build beside the container) can cause: serving either way.
        let status = fleet[0]["healthStatus"].as_str().unwrap();
        assert!(["ACTIVE", "DEGRADED"].contains(&status), "{:?}", reply.body);
    }
    if let Some(admin) = target.admin {
        let (status, body) = admin_request(admin, "GET", "/readyz").await;
        assert_eq!(status, 200, "{body}");
        let (status, metrics) = admin_request(admin, "GET", "/metrics").await;
        assert_eq!(status, 200);
        assert!(metrics.contains("xks_"), "{metrics}");
    }
}

#[tokio::test]
async fn encrypt_decrypt_round_trip() {
    let Some(target) = target("encrypt_decrypt_round_trip") else {
        return;
    };
    let client = &target.client;
    let aad = b"container=yes";
    for version in [Version::Http1, Version::Http2] {
        let sealed = client
            .round_trip(version, b"from outside the container", Some(aad), true)
            .await;
        assert_eq!(unb64(&sealed.body["initializationVector"]).len(), 12);
        assert!(sealed.body.get("ciphertextDataIntegrityValue").is_some());
        // The wrong AAD does not open it.
        let refused = client
            .post(
                version,
                &key_path("foo", "decrypt"),
                &decrypt_body(&sealed.body, Some(b"container=no")),
            )
            .await;
        assert_eq!(refused.status, 400);
        assert_eq!(refused.error_name(), "InvalidCiphertextException");
    }
}

#[tokio::test]
async fn key_metadata_of_the_quickstart_keys() {
    let Some(target) = target("key_metadata_of_the_quickstart_keys") else {
        return;
    };
    let body = json!({"requestMetadata": {
        "awsPrincipalArn": "arn:aws:iam::123456789012:user/Alice",
        "kmsOperation": "DescribeKey",
        "kmsRequestId": "c-2"
    }});
    for (key, usage) in [
        ("foo", json!(["ENCRYPT", "DECRYPT"])),
        ("encrypt_only_key", json!(["ENCRYPT"])),
    ] {
        let reply = target
            .client
            .post(Version::Http1, &key_path(key, "metadata"), &body)
            .await;
        assert_eq!(reply.status, 200, "{key}: {:?}", reply.body);
        assert_eq!(
            reply.body,
            json!({"keySpec": "AES_256", "keyUsage": usage, "keyStatus": "ENABLED"}),
            "{key}"
        );
    }
    let missing = target
        .client
        .post(Version::Http1, &key_path("no-such-key", "metadata"), &body)
        .await;
    assert_eq!(missing.error_name(), "KeyNotFoundException");
}

#[tokio::test]
async fn a_bad_signature_is_refused() {
    let Some(mut target) = target("a_bad_signature_is_refused") else {
        return;
    };
    // The right access key id, a secret of the right form that is not its secret.
    let secret = &target.client.signing.secret;
    let first = if secret.starts_with('x') { 'y' } else { 'x' };
    target.client.signing.secret = format!("{first}{}", &secret[1..]);
    let reply = target
        .client
        .post(
            Version::Http1,
            &key_path("foo", "encrypt"),
            &encrypt_body(b"x", None, false),
        )
        .await;
    assert_eq!(reply.status, 401, "{:?}", reply.body);
    assert_eq!(reply.error_name(), "AuthenticationFailedException");
}
