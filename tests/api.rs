//! The four XKS APIs end to end: the real binary on a real SoftHSM2 token, over TLS,
//! with requests signed by the aws-sigv4 crate (HTTP/1.1 and HTTP/2) and by curl.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn encrypt_decrypt_round_trip_over_http1_and_http2() {
    let proxy = Setup::new().start();
    let client = proxy.client();
    for version in [Version::Http1, Version::Http2] {
        let aad = b"project=nile,department=marketing";
        let reply = client
            .post(
                version,
                &key_path("foo", "encrypt"),
                &encrypt_body(b"Hello World!", Some(aad), false),
            )
            .await;
        assert_eq!(reply.status, 200, "{version:?} {:?}", reply.body);
        assert_eq!(reply.content_type.as_deref(), Some("application/json"));
        assert_eq!(
            unb64(&reply.body["ciphertext"]).len(),
            12,
            "same length as plaintext"
        );
        assert_eq!(unb64(&reply.body["initializationVector"]).len(), 12);
        assert_eq!(unb64(&reply.body["authenticationTag"]).len(), 16);
        assert!(reply.body.get("ciphertextDataIntegrityValue").is_none());

        let decrypted = client
            .post(
                version,
                &key_path("foo", "decrypt"),
                &decrypt_body(&reply.body, Some(aad)),
            )
            .await;
        assert_eq!(decrypted.status, 200, "{:?}", decrypted.body);
        assert_eq!(unb64(&decrypted.body["plaintext"]), b"Hello World!");
    }
}

#[tokio::test]
async fn fresh_iv_per_encryption() {
    let proxy = Setup::new().start();
    let client = proxy.client();
    let body = encrypt_body(b"same", None, false);
    let a = client
        .post(Version::Http1, &key_path("foo", "encrypt"), &body)
        .await;
    let b = client
        .post(Version::Http1, &key_path("foo", "encrypt"), &body)
        .await;
    assert_ne!(
        a.body["initializationVector"],
        b.body["initializationVector"]
    );
    assert_ne!(a.body["ciphertext"], b.body["ciphertext"]);
}

#[tokio::test]
async fn cdiv_is_sha256_over_the_fields_and_the_result_decrypts() {
    let proxy = Setup::new().start();
    let client = proxy.client();
    for aad in [Some(&b"some aad"[..]), None] {
        let reply = client
            .post(
                Version::Http1,
                &key_path("foo", "encrypt"),
                &encrypt_body(b"data key", aad, true),
            )
            .await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        // Independent computation (spec Appendix C): aad || metadata || iv || ct || tag.
        let mut hashed = aad.unwrap_or_default().to_vec();
        for field in ["initializationVector", "ciphertext", "authenticationTag"] {
            hashed.extend(unb64(&reply.body[field]));
        }
        let expected = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &hashed);
        assert_eq!(
            unb64(&reply.body["ciphertextDataIntegrityValue"]),
            expected.as_ref()
        );
        let decrypted = client
            .post(
                Version::Http1,
                &key_path("foo", "decrypt"),
                &decrypt_body(&reply.body, aad),
            )
            .await;
        assert_eq!(unb64(&decrypted.body["plaintext"]), b"data key");
    }
    // An encrypt-only key cannot prove by decrypting that its output decrypts, so it
    // gives no CDIV (as the public XKS test client expects); without CDIV it encrypts.
    let reply = client
        .post(
            Version::Http1,
            &key_path("encrypt_only_key", "encrypt"),
            &encrypt_body(b"x", None, true),
        )
        .await;
    assert_eq!(
        (reply.status, reply.error_name()),
        (400, "InvalidKeyUsageException")
    );
    let reply = client
        .post(
            Version::Http1,
            &key_path("encrypt_only_key", "encrypt"),
            &encrypt_body(b"x", None, false),
        )
        .await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn any_corruption_is_invalid_ciphertext() {
    let proxy = Setup::new().start();
    let client = proxy.client();
    let aad = b"bound aad";
    let sealed = client
        .post(
            Version::Http1,
            &key_path("foo", "encrypt"),
            &encrypt_body(b"secret data", Some(aad), false),
        )
        .await
        .body;
    let flip = |field: &str| {
        let mut bytes = unb64(&sealed[field]);
        bytes[0] ^= 0x01;
        let mut body = decrypt_body(&sealed, Some(aad));
        body[field] = json!(b64(&bytes));
        body
    };
    let mut cases = vec![
        ("ciphertext", flip("ciphertext")),
        ("iv", flip("initializationVector")),
        ("tag", flip("authenticationTag")),
        ("aad changed", decrypt_body(&sealed, Some(b"bound aae"))),
        ("aad missing", decrypt_body(&sealed, None)),
    ];
    let mut with_metadata = decrypt_body(&sealed, Some(aad));
    with_metadata["ciphertextMetadata"] = json!(b64(b"v1"));
    cases.push(("metadata added", with_metadata));
    // The metadata-as-AAD confusion the spec's length prefixes prevent.
    let plain = client
        .post(
            Version::Http1,
            &key_path("foo", "encrypt"),
            &encrypt_body(b"x", None, false),
        )
        .await
        .body;
    let mut moved = decrypt_body(&plain, Some(b""));
    moved["ciphertextMetadata"] = json!("");
    assert_eq!(
        client
            .post(Version::Http1, &key_path("foo", "decrypt"), &moved)
            .await
            .status,
        200,
        "empty AAD and empty metadata are the same as absent"
    );
    let mut long_iv = decrypt_body(&sealed, Some(aad));
    long_iv["initializationVector"] = json!(b64(&[7u8; 16]));
    cases.push(("16-byte iv", long_iv));
    for (name, body) in cases {
        let reply = client
            .post(Version::Http1, &key_path("foo", "decrypt"), &body)
            .await;
        assert_eq!(reply.status, 400, "{name}: {:?}", reply.body);
        assert_eq!(reply.error_name(), "InvalidCiphertextException", "{name}");
    }
}

#[tokio::test]
async fn key_metadata_reflects_hsm_attributes_and_usage_is_enforced() {
    let proxy = Setup::new().start();
    let client = proxy.client();
    let body = json!({"requestMetadata": {
        "awsPrincipalArn": "arn:aws:iam::123456789012:user/Alice",
        "kmsOperation": "CreateKey",
        "kmsRequestId": "r-1"
    }});
    for (key, usage) in [
        ("foo", json!(["ENCRYPT", "DECRYPT"])),
        ("encrypt_only_key", json!(["ENCRYPT"])),
        ("decrypt_only_key", json!(["DECRYPT"])),
        ("impotent_key", json!([])),
    ] {
        let reply = client
            .post(Version::Http1, &key_path(key, "metadata"), &body)
            .await;
        assert_eq!(reply.status, 200, "{key}: {:?}", reply.body);
        assert_eq!(
            reply.body,
            json!({"keySpec": "AES_256", "keyUsage": usage, "keyStatus": "ENABLED"}),
            "{key}"
        );
    }
    let sealed = client
        .post(
            Version::Http1,
            &key_path("foo", "encrypt"),
            &encrypt_body(b"x", None, false),
        )
        .await
        .body;
    for (key, op, body) in [
        (
            "decrypt_only_key",
            "encrypt",
            encrypt_body(b"x", None, false),
        ),
        ("impotent_key", "encrypt", encrypt_body(b"x", None, false)),
        ("encrypt_only_key", "decrypt", decrypt_body(&sealed, None)),
        ("impotent_key", "decrypt", decrypt_body(&sealed, None)),
    ] {
        let reply = client.post(Version::Http1, &key_path(key, op), &body).await;
        assert_eq!(reply.status, 400, "{key} {op}");
        assert_eq!(reply.error_name(), "InvalidKeyUsageException", "{key} {op}");
    }
    // Ciphertext made with one key does not decrypt under another with DECRYPT usage.
    let reply = client
        .post(
            Version::Http1,
            &key_path("decrypt_only_key", "decrypt"),
            &decrypt_body(&sealed, None),
        )
        .await;
    assert_eq!(reply.error_name(), "InvalidCiphertextException");
}

#[tokio::test]
async fn disabled_keys_report_disabled_and_refuse_operations() {
    let setup = Setup::new();
    let out = setup.keys(&["disable", "foo"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let proxy = setup.start();
    let client = proxy.client();
    let body = json!({"requestMetadata": {
        "awsPrincipalArn": "arn:aws:iam::123456789012:user/Alice",
        "kmsOperation": "DescribeKey",
        "kmsRequestId": "r-2"
    }});
    let reply = client
        .post(Version::Http1, &key_path("foo", "metadata"), &body)
        .await;
    assert_eq!(reply.body["keyStatus"], "DISABLED");
    let reply = client
        .post(
            Version::Http1,
            &key_path("foo", "encrypt"),
            &encrypt_body(b"x", None, false),
        )
        .await;
    assert_eq!(
        (reply.status, reply.error_name()),
        (400, "InvalidStateException")
    );

    // Re-enabled in the HSM while serving: GetKeyMetadata reads the key fresh.
    let out = proxy.setup.keys(&["enable", "foo"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply = client
        .post(Version::Http1, &key_path("foo", "metadata"), &body)
        .await;
    assert_eq!(reply.body["keyStatus"], "ENABLED");
    let reply = client
        .post(
            Version::Http1,
            &key_path("foo", "encrypt"),
            &encrypt_body(b"x", None, false),
        )
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
}

#[tokio::test]
async fn unknown_keys_are_key_not_found() {
    let setup = Setup::new();
    // In the key store's list but not on the token.
    setup.edit_config("\"impotent_key\"]", "\"impotent_key\", \"not_on_token\"]");
    let proxy = setup.start();
    let client = proxy.client();
    for key in ["not_on_token", "not_in_key_store"] {
        for (op, body) in [
            ("encrypt", encrypt_body(b"x", None, false)),
            ("metadata", json!({"requestMetadata": metadata()})),
        ] {
            let reply = client.post(Version::Http1, &key_path(key, op), &body).await;
            assert_eq!(reply.status, 404, "{key} {op}: {:?}", reply.body);
            assert_eq!(reply.error_name(), "KeyNotFoundException");
        }
    }
}

#[tokio::test]
async fn health_status_has_the_spec_schema_over_curl_http1_and_http2() {
    let proxy = Setup::new().start();
    let body = r#"{"requestMetadata":{"kmsRequestId":"h-1","kmsOperation":"KmsHealthCheck"}}"#;
    for version in ["--http1.1", "--http2"] {
        let (status, reply) = curl(&proxy, &health_path(), body, &[version]);
        assert_eq!(status, 200, "{version}: {reply:?}");
        assert_eq!(reply["xksProxyFleetSize"], 1);
        assert_eq!(reply["xksProxyVendor"], "xks-proxy");
        assert!(reply["xksProxyModel"]
            .as_str()
            .unwrap()
            .starts_with("xks-proxy "));
        assert_eq!(reply["ekmVendor"], module().manufacturer());
        let fleet = reply["ekmFleetDetails"].as_array().unwrap();
        assert_eq!(fleet.len(), 1);
        assert_eq!(fleet[0]["healthStatus"], "ACTIVE");
        let model = fleet[0]["model"].as_str().unwrap();
        assert!(model.contains(module().model_word()), "{model}");
        assert!(!fleet[0]["id"].as_str().unwrap().is_empty());
    }
}

#[tokio::test]
async fn curl_drives_every_api() {
    let proxy = Setup::new().start();
    let encrypt =
        serde_json::to_string(&encrypt_body(b"Hello World!", Some(b"ctx"), true)).unwrap();
    let (status, sealed) = curl(&proxy, &key_path("foo", "encrypt"), &encrypt, &[]);
    assert_eq!(status, 200, "{sealed:?}");
    let decrypt = serde_json::to_string(&decrypt_body(&sealed, Some(b"ctx"))).unwrap();
    let (status, plain) = curl(&proxy, &key_path("foo", "decrypt"), &decrypt, &["--http2"]);
    assert_eq!(status, 200, "{plain:?}");
    assert_eq!(unb64(&plain["plaintext"]), b"Hello World!");
    let metadata = json!({"requestMetadata": metadata()}).to_string();
    let (status, reply) = curl(&proxy, &key_path("foo", "metadata"), &metadata, &[]);
    assert_eq!((status, reply["keySpec"].as_str()), (200, Some("AES_256")));
}

#[tokio::test]
async fn spec_maximum_sizes_are_served() {
    let proxy = Setup::new().start();
    let client = proxy.client();
    let plaintext = vec![0xa5; 4300];
    let aad = vec![0x5a; 8192];
    let mut body = encrypt_body(&plaintext, Some(&aad), true);
    body["requestMetadata"]["awsPrincipalArn"] = json!(format!(
        "arn:aws:iam::123456789012:role/{}",
        "r".repeat(2000)
    ));
    body["requestMetadata"]["kmsKeyArn"] = json!(format!(
        "arn:aws:kms:us-east-1:123456789012:key/{}",
        "k".repeat(2000)
    ));
    let sealed = client
        .post(Version::Http2, &key_path("foo", "encrypt"), &body)
        .await;
    assert_eq!(sealed.status, 200, "{:?}", sealed.body);
    let reply = client
        .post(
            Version::Http2,
            &key_path("foo", "decrypt"),
            &decrypt_body(&sealed.body, Some(&aad)),
        )
        .await;
    assert_eq!(unb64(&reply.body["plaintext"]), plaintext);
}

#[tokio::test]
async fn unknown_kms_operations_and_extra_metadata_fields_are_accepted() {
    let proxy = Setup::new().start();
    let client = proxy.client();
    let mut body = encrypt_body(b"x", None, false);
    body["requestMetadata"]["kmsOperation"] = json!("BulkEncrypt");
    body["requestMetadata"]["sourceIdentity"] = json!("someone");
    body["requestMetadata"]["kmsRecipientAttestationPCR0"] = json!("abc");
    body["someFutureField"] = json!({"nested": true});
    let reply = client
        .post(Version::Http1, &key_path("foo", "encrypt"), &body)
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
}
