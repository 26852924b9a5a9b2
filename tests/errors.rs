//! Every error row that applies, bad input of every kind, authentication, body limits
//! and log hygiene — against the real binary and SoftHSM2.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use serde_json::{json, Value};

fn assert_error(reply: &Reply, status: u16, name: &str) {
    assert_eq!(reply.status, status, "{:?}", reply.body);
    assert_eq!(reply.error_name(), name, "{:?}", reply.body);
    let message = reply.body["errorMessage"].as_str().unwrap_or("");
    assert!(message.len() < 512 && message.bytes().all(|b| (0x20..=0x7e).contains(&b)));
    assert_eq!(reply.content_type.as_deref(), Some("application/json"));
}

#[tokio::test]
async fn routing_errors() {
    let proxy = Setup::new().start();
    let client = proxy.client();
    let body = encrypt_body(b"x", None, false);
    for path in [
        "/kms/xks/v1/health".to_owned(),
        "/wrong/prefix/kms/xks/v1/keys/foo/encrypt".to_owned(),
        format!("{PREFIX}/keys/foo/sign"),
        format!("{PREFIX}/keys/bad%20id/encrypt"),
        format!("{PREFIX}/keys/{}/encrypt", "k".repeat(129)),
        format!("{PREFIX}/keys/foo/encrypt/extra"),
        "/".to_owned(),
    ] {
        let reply = client.post(Version::Http1, &path, &body).await;
        assert_error(&reply, 404, "InvalidUriPathException");
    }
    for method in ["GET", "PUT", "DELETE"] {
        for path in [key_path("foo", "encrypt"), health_path()] {
            let request = client.signed(method, &path, b"", &client.signing);
            let reply = client.send(Version::Http1, request).await;
            assert_eq!(reply.status, 405, "{method} {path}");
            assert!(reply.body["errorName"].is_string());
        }
    }
}

#[tokio::test]
async fn load_balancer_probes_answer_without_authentication() {
    let proxy = Setup::new().start();
    let client = proxy.client();
    for path in ["/livez", "/readyz"] {
        let request = http::Request::get(format!("https://localhost{path}"))
            .header("host", "localhost")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let reply = client.send(Version::Http1, request).await;
        assert_eq!(reply.status, 200, "{path}");
    }
}

#[tokio::test]
async fn authentication_failures_are_401() {
    let proxy = Setup::new().start();
    let client = proxy.client();
    let path = key_path("foo", "encrypt");
    let body = serde_json::to_vec(&encrypt_body(b"x", None, false)).unwrap();
    let base = Signing {
        time: SystemTime::now(),
        ..client.signing.clone()
    };
    let cases = [
        (
            "wrong secret",
            Signing {
                secret: "A".repeat(44),
                ..base.clone()
            },
        ),
        (
            "unknown access key",
            Signing {
                access_key_id: "ABCDEFGHIJKLMNOPQRSTUVWXYZ".into(),
                ..base.clone()
            },
        ),
        (
            "wrong region",
            Signing {
                region: "eu-west-1".into(),
                ..base.clone()
            },
        ),
        (
            "wrong service",
            Signing {
                service: "kms".into(),
                ..base.clone()
            },
        ),
        (
            "six minutes old",
            Signing {
                time: SystemTime::now() - Duration::from_secs(360),
                ..base.clone()
            },
        ),
        (
            "six minutes ahead",
            Signing {
                time: SystemTime::now() + Duration::from_secs(360),
                ..base.clone()
            },
        ),
    ];
    for (name, signing) in cases {
        let reply = client
            .send(
                Version::Http1,
                client.signed("POST", &path, &body, &signing),
            )
            .await;
        assert_error(&reply, 401, "AuthenticationFailedException");
        let _ = name;
    }
    // Inside the window both ways.
    for offset in [-240i64, 240] {
        let time = if offset < 0 {
            SystemTime::now() - Duration::from_secs(240)
        } else {
            SystemTime::now() + Duration::from_secs(240)
        };
        let signing = Signing {
            time,
            ..base.clone()
        };
        let reply = client
            .send(
                Version::Http1,
                client.signed("POST", &path, &body, &signing),
            )
            .await;
        assert_eq!(reply.status, 200, "offset {offset}: {:?}", reply.body);
    }
    // Signed, then the body changed in flight.
    let mut request = client.signed("POST", &path, &body, &base);
    let mut tampered = body.clone();
    tampered[10] ^= 1;
    *request.body_mut() = Full::new(Bytes::from(tampered));
    let reply = client.send(Version::Http1, request).await;
    assert_error(&reply, 401, "AuthenticationFailedException");
    // No signature at all.
    let request = http::Request::post(format!("https://localhost{path}"))
        .header("host", "localhost")
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    assert_error(
        &client.send(Version::Http1, request).await,
        401,
        "AuthenticationFailedException",
    );
}

#[tokio::test]
/// A secret given through the environment signs requests, and each access key id
/// checks signatures with its own secret only. (Two credentials at once through a
/// rotation: security.rs, credentials_rotate_without_restart.)
async fn a_secret_from_the_environment_signs_and_ids_pick_their_own_secret() {
    let setup = Setup::new();
    let second_id = "SECONDCREDENTIAL234567ABCD";
    let second_secret = "c2Vjb25kIHNlY3JldCB0aGF0IGlzIGxvbmcgZW5vdWdoIQ==";
    let text = std::fs::read_to_string(setup.config()).unwrap();
    std::fs::write(
        setup.config(),
        format!(
            "{text}\n[[key_store.credential]]\naccess_key_id = \"{second_id}\"\nsecret_access_key_env = \"SECOND_SECRET\"\n"
        ),
    )
    .unwrap();
    let proxy = Proxy::start(setup, &[("SECOND_SECRET", second_secret)]);
    let mut client = proxy.client();
    let body = encrypt_body(b"x", None, false);
    assert_eq!(
        client
            .post(Version::Http1, &key_path("foo", "encrypt"), &body)
            .await
            .status,
        200
    );
    client.signing.access_key_id = second_id.into();
    client.signing.secret = second_secret.into();
    assert_eq!(
        client
            .post(Version::Http2, &key_path("foo", "encrypt"), &body)
            .await
            .status,
        200
    );
    client.signing.secret = proxy.setup.secret.clone();
    assert_eq!(
        client
            .post(Version::Http1, &key_path("foo", "encrypt"), &body)
            .await
            .status,
        401,
        "ids pick their own secret"
    );
}

async fn raw(client: &Client, path: &str, body: &[u8]) -> Reply {
    let request = client.signed(
        "POST",
        path,
        body,
        &Signing {
            time: SystemTime::now(),
            ..client.signing.clone()
        },
    );
    client.send(Version::Http1, request).await
}

#[tokio::test]
async fn malformed_requests_are_validation_errors() {
    let proxy = Setup::new().start();
    let client = proxy.client();
    let encrypt = key_path("foo", "encrypt");
    let decrypt = key_path("foo", "decrypt");
    let with = |base: Value, field: &str, value: Value| {
        let mut body = base;
        if value.is_null() {
            body.as_object_mut().unwrap().remove(field);
        } else {
            body[field] = value;
        }
        body
    };
    let enc = encrypt_body(b"payload", Some(b"aad"), false);
    let sealed = client.post(Version::Http1, &encrypt, &enc).await.body;
    let dec = decrypt_body(&sealed, Some(b"aad"));
    let mut no_request_id = enc.clone();
    no_request_id["requestMetadata"]
        .as_object_mut()
        .unwrap()
        .remove("kmsRequestId");
    let mut no_principal = enc.clone();
    no_principal["requestMetadata"]
        .as_object_mut()
        .unwrap()
        .remove("awsPrincipalArn");
    let mut no_key_arn = dec.clone();
    no_key_arn["requestMetadata"]
        .as_object_mut()
        .unwrap()
        .remove("kmsKeyArn");
    let cases: Vec<(&str, &str, Value)> = vec![
        (
            "no plaintext",
            &encrypt,
            with(enc.clone(), "plaintext", Value::Null),
        ),
        (
            "bad base64 plaintext",
            &encrypt,
            with(enc.clone(), "plaintext", json!("not*base64")),
        ),
        (
            "plaintext not a string",
            &encrypt,
            with(enc.clone(), "plaintext", json!(5)),
        ),
        (
            "bad base64 aad",
            &encrypt,
            with(enc.clone(), "additionalAuthenticatedData", json!("@@")),
        ),
        (
            "wrong algorithm",
            &encrypt,
            with(enc.clone(), "encryptionAlgorithm", json!("AES_CBC")),
        ),
        (
            "no algorithm",
            &encrypt,
            with(enc.clone(), "encryptionAlgorithm", Value::Null),
        ),
        (
            "wrong cdiv algorithm",
            &encrypt,
            with(
                enc.clone(),
                "ciphertextDataIntegrityValueAlgorithm",
                json!("MD5"),
            ),
        ),
        (
            "no metadata",
            &encrypt,
            with(enc.clone(), "requestMetadata", Value::Null),
        ),
        ("no kmsRequestId", &encrypt, no_request_id),
        ("no awsPrincipalArn", &encrypt, no_principal),
        ("no kmsKeyArn", &decrypt, no_key_arn),
        (
            "no ciphertext",
            &decrypt,
            with(dec.clone(), "ciphertext", Value::Null),
        ),
        (
            "no iv",
            &decrypt,
            with(dec.clone(), "initializationVector", Value::Null),
        ),
        (
            "no tag",
            &decrypt,
            with(dec.clone(), "authenticationTag", Value::Null),
        ),
        (
            "bad base64 tag",
            &decrypt,
            with(dec.clone(), "authenticationTag", json!("%%%%")),
        ),
        (
            "metadata not a string",
            &decrypt,
            with(dec.clone(), "ciphertextMetadata", json!([1])),
        ),
    ];
    for (name, path, body) in cases {
        let reply = client.post(Version::Http1, path, &body).await;
        assert_eq!(reply.status, 400, "{name}: {:?}", reply.body);
        assert_eq!(reply.error_name(), "ValidationException", "{name}");
    }
    for (name, body) in [
        ("empty", &b""[..]),
        ("not json", b"hello"),
        ("truncated", b"{\"requestMetadata\":"),
        ("array", b"[]"),
        ("invalid utf-8", b"{\"plaintext\":\"\xff\xfe\"}"),
    ] {
        let reply = raw(&client, &encrypt, body).await;
        assert_error(&reply, 400, "ValidationException");
        let _ = name;
    }
    // Lengths the spec fixes are reported as invalid ciphertext.
    for (name, field, value) in [
        ("short tag", "authenticationTag", b64(&[0; 15])),
        ("long tag", "authenticationTag", b64(&[0; 17])),
        ("8-byte iv", "initializationVector", b64(&[0; 8])),
        ("21-byte metadata", "ciphertextMetadata", b64(&[0; 21])),
    ] {
        let reply = client
            .post(
                Version::Http1,
                &decrypt,
                &with(dec.clone(), field, json!(value)),
            )
            .await;
        assert_error(&reply, 400, "InvalidCiphertextException");
        let _ = name;
    }
}

#[tokio::test]
async fn health_check_requires_its_metadata() {
    let proxy = Setup::new().start();
    let client = proxy.client();
    for body in [
        &b"{}"[..],
        br#"{"requestMetadata":{}}"#,
        br#"{"requestMetadata":{"kmsOperation":"KmsHealthCheck"}}"#,
        b"not json",
        b"",
    ] {
        let reply = raw(&client, &health_path(), body).await;
        assert_error(&reply, 400, "ValidationException");
    }
    let body = br#"{"requestMetadata":{"kmsRequestId":"x","kmsOperation":"SomeFutureOperation"}}"#;
    let reply = raw(&client, &health_path(), body).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
}

#[tokio::test]
async fn oversized_bodies_get_a_json_error_and_the_proxy_keeps_serving() {
    let proxy = Setup::new().start();
    let client = proxy.client();
    // 70 KB of AAD: over the 64 KiB body limit.
    let big = encrypt_body(b"x", Some(&vec![1u8; 70_000]), false);
    for version in [Version::Http1, Version::Http2] {
        let reply = client
            .post(version, &key_path("foo", "encrypt"), &big)
            .await;
        assert_error(&reply, 501, "UnsupportedOperationException");
    }
    // Chunked (no Content-Length): cut off at the limit while streaming.
    let body = serde_json::to_string(&big).unwrap();
    let (status, reply) = curl(
        &proxy,
        &key_path("foo", "encrypt"),
        &body,
        &["-H", "Transfer-Encoding: chunked"],
    );
    assert_eq!(
        (status, reply["errorName"].as_str()),
        (501, Some("UnsupportedOperationException"))
    );
    // Within the body limit but over the spec's 8192-byte AAD: refused by size.
    let reply = client
        .post(
            Version::Http1,
            &key_path("foo", "encrypt"),
            &encrypt_body(b"x", Some(&vec![2u8; 40_000]), false),
        )
        .await;
    assert_error(&reply, 501, "UnsupportedOperationException");
    let reply = client
        .post(
            Version::Http1,
            &key_path("foo", "encrypt"),
            &encrypt_body(b"ok", None, false),
        )
        .await;
    assert_eq!(reply.status, 200);
}

/// The spec's sizes (plaintext and ciphertext 4300 bytes, AAD 8192) are served, and
/// one byte more is refused with UnsupportedOperationException; a field given twice is
/// named in a ValidationException.
#[tokio::test]
async fn spec_sizes_are_the_limits_and_repeated_fields_are_named() {
    let proxy = Setup::new().start();
    let client = proxy.client();
    let encrypt = key_path("foo", "encrypt");
    let decrypt = key_path("foo", "decrypt");
    let largest = encrypt_body(&[7u8; 4300], Some(&[8u8; 8192]), false);
    let sealed = client.post(Version::Http1, &encrypt, &largest).await;
    assert_eq!(sealed.status, 200, "{:?}", sealed.body);
    let opened = client
        .post(
            Version::Http2,
            &decrypt,
            &decrypt_body(&sealed.body, Some(&[8u8; 8192])),
        )
        .await;
    assert_eq!(opened.status, 200, "{:?}", opened.body);
    assert_eq!(unb64(&opened.body["plaintext"]), vec![7u8; 4300]);

    for (body, field) in [
        (
            encrypt_body(&[7u8; 4301], None, false),
            "plaintext exceeds 4300",
        ),
        (
            encrypt_body(b"x", Some(&[8u8; 8193]), false),
            "additionalAuthenticatedData exceeds 8192",
        ),
    ] {
        let reply = client.post(Version::Http1, &encrypt, &body).await;
        assert_error(&reply, 501, "UnsupportedOperationException");
        let message = reply.body["errorMessage"].as_str().unwrap();
        assert!(message.starts_with(field), "{message}");
    }
    let mut too_long = decrypt_body(&sealed.body, Some(&[8u8; 8192]));
    too_long["ciphertext"] = json!(b64(&[0u8; 4301]));
    let reply = client.post(Version::Http1, &decrypt, &too_long).await;
    assert_error(&reply, 501, "UnsupportedOperationException");
    let mut aad_too_long = decrypt_body(&sealed.body, Some(&[8u8; 8193]));
    aad_too_long["ciphertext"] = sealed.body["ciphertext"].clone();
    let reply = client.post(Version::Http1, &decrypt, &aad_too_long).await;
    assert_error(&reply, 501, "UnsupportedOperationException");

    // The same field twice: named, and neither value echoed.
    let text = serde_json::to_string(&encrypt_body(b"x", None, false)).unwrap();
    let twice = text.replacen('{', r#"{"plaintext":"c2VjcmV0LXZhbHVl","#, 1);
    let reply = raw(&client, &encrypt, twice.as_bytes()).await;
    assert_error(&reply, 400, "ValidationException");
    let message = reply.body["errorMessage"].as_str().unwrap();
    assert!(message.contains("plaintext more than once"), "{message}");
    assert!(!message.contains("c2VjcmV0"), "{message}");
}

#[tokio::test]
async fn sigterm_stops_with_exit_code_zero() {
    let proxy = Setup::new().start();
    let reply = proxy
        .client()
        .post(
            Version::Http1,
            &health_path(),
            &json!({"requestMetadata": {"kmsRequestId": "x", "kmsOperation": "KmsHealthCheck"}}),
        )
        .await;
    assert_eq!(reply.status, 200);
    assert!(proxy.terminate().success());
}

/// Routing errors are answered after the body is read: a 404 that overtakes the upload
/// makes HTTP/2 reset the stream and curl then loses the response.
#[tokio::test]
async fn early_errors_reach_curl_over_http2_with_a_body() {
    let proxy = Setup::new().start();
    let body =
        serde_json::to_string(&encrypt_body(&[7u8; 4000], Some(&[9u8; 8000]), false)).unwrap();
    for _ in 0..10 {
        for version in ["--http2", "--http1.1"] {
            let path = "/example/uri/path/prefix/invalid/kms/xks/v1/keys/foo/encrypt";
            let (status, reply) = curl(&proxy, path, &body, &[version]);
            assert_eq!(
                (status, reply["errorName"].as_str()),
                (404, Some("InvalidUriPathException")),
                "{version}"
            );
        }
    }
}
