//! Key rotation under one external key id on a real SoftHSM2 token: `xks-proxy keys
//! rotate` while the proxy runs, ciphertextMetadata naming the version, and every
//! older ciphertext still decrypting.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const AAD: &[u8] = b"bucket=orders";

async fn encrypt(client: &Client, plaintext: &[u8]) -> Value {
    let reply = client
        .post(
            Version::Http1,
            &key_path("foo", "encrypt"),
            &encrypt_body(plaintext, Some(AAD), true),
        )
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    reply.body
}

async fn decrypt(client: &Client, encrypted: &Value) -> Reply {
    client
        .post(
            Version::Http1,
            &key_path("foo", "decrypt"),
            &decrypt_body(encrypted, Some(AAD)),
        )
        .await
}

/// Rotates `foo` and waits until the running proxy encrypts under `version`.
async fn rotate_to(proxy: &Proxy, client: &Client, version: u32) -> Value {
    let out = proxy.setup.keys(&["rotate", "foo"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("version {version} (foo#v{version}) is current")),
        "{said}"
    );
    let mut want = vec![1u8];
    want.extend_from_slice(&version.to_be_bytes());
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        let encrypted = encrypt(client, format!("v{version}").as_bytes()).await;
        if encrypted.get("ciphertextMetadata").map(unb64) == Some(want.clone()) {
            return encrypted;
        }
        assert!(
            Instant::now() < give_up,
            "the proxy never picked up {version}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn rotation_keeps_every_version_decryptable() {
    let setup = Setup::new();
    setup.edit_config("[hsm]\n", "[hsm]\nkey_refresh_seconds = 1\n");
    let proxy = setup.start();
    let client = proxy.client();

    // Before any rotation: no metadata, as before versioning existed.
    let v1 = encrypt(&client, b"v1").await;
    assert!(v1.get("ciphertextMetadata").is_none(), "{v1}");

    let v2 = rotate_to(&proxy, &client, 2).await;
    let v3 = rotate_to(&proxy, &client, 3).await;
    for (encrypted, plaintext) in [(&v1, &b"v1"[..]), (&v2, b"v2"), (&v3, b"v3")] {
        let reply = decrypt(&client, encrypted).await;
        assert_eq!(reply.status, 200, "{encrypted}: {:?}", reply.body);
        assert_eq!(unb64(&reply.body["plaintext"]), plaintext);
    }
    // The CDIV covers the metadata (spec Appendix C) and the proxy proved it decrypts.
    assert!(v3.get("ciphertextDataIntegrityValue").is_some());

    // The metadata is bound by the AAD: naming another version, dropping it, or naming
    // one that does not exist fails as an invalid ciphertext.
    let mut other_version = v3.clone();
    other_version["ciphertextMetadata"] = v2["ciphertextMetadata"].clone();
    let mut dropped = v3.clone();
    dropped
        .as_object_mut()
        .unwrap()
        .remove("ciphertextMetadata");
    let mut missing = v3.clone();
    missing["ciphertextMetadata"] = json!(b64(&[1, 0, 0, 0, 9]));
    let mut claimed = v1.clone();
    claimed["ciphertextMetadata"] = v2["ciphertextMetadata"].clone();
    for tampered in [other_version, dropped, missing, claimed] {
        let reply = decrypt(&client, &tampered).await;
        assert_eq!(reply.status, 400, "{tampered}: {:?}", reply.body);
        assert_eq!(reply.error_name(), "InvalidCiphertextException");
    }

    // GetKeyMetadata reports the current version, and disabling the external key
    // covers every version.
    let metadata = json!({ "requestMetadata": metadata() });
    let reply = client
        .post(Version::Http1, &key_path("foo", "metadata"), &metadata)
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.body["keyStatus"], "ENABLED");
    assert_eq!(reply.body["keyUsage"], json!(["ENCRYPT", "DECRYPT"]));
    let listed = proxy.setup.keys(&["list"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains("foo#v2") && listed.contains("foo#v3"),
        "{listed}"
    );

    let out = proxy.setup.keys(&["disable", "foo"]);
    assert!(out.status.success());
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        let reply = decrypt(&client, &v3).await;
        if reply.status == 400 {
            assert_eq!(reply.error_name(), "InvalidStateException");
            break;
        }
        assert!(Instant::now() < give_up, "disabling foo never reached v3");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reply = client
        .post(Version::Http1, &key_path("foo", "metadata"), &metadata)
        .await;
    assert_eq!(reply.body["keyStatus"], "DISABLED", "{:?}", reply.body);
}

#[tokio::test]
async fn rotating_an_unknown_key_fails() {
    let setup = Setup::new();
    let out = setup.keys(&["rotate", "no-such-key"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no key labelled \"no-such-key\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A reload (SIGHUP) refreshes the key cache at once: with keys trusted for five
/// minutes, `keys rotate` and then `keys disable` each take effect right after SIGHUP.
#[tokio::test]
async fn a_reload_refreshes_the_key_cache_at_once() {
    let setup = Setup::new();
    setup.edit_config("[hsm]\n", "[hsm]\nkey_refresh_seconds = 300\n");
    let proxy = setup.start();
    let client = proxy.client();
    let v1 = encrypt(&client, b"before").await;
    assert!(v1.get("ciphertextMetadata").is_none(), "{v1}");
    let out = proxy.setup.keys(&["rotate", "foo"]);
    assert!(out.status.success(), "{out:?}");
    // Without a reload the cache still serves version 1.
    let still = encrypt(&client, b"cached").await;
    assert!(still.get("ciphertextMetadata").is_none(), "{still}");
    let hup = || {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &proxy.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    hup();
    let give_up = Instant::now() + Duration::from_secs(5);
    loop {
        let encrypted = encrypt(&client, b"after").await;
        if encrypted.get("ciphertextMetadata").map(unb64) == Some(vec![1, 0, 0, 0, 2]) {
            break;
        }
        assert!(
            Instant::now() < give_up,
            "SIGHUP did not refresh the version"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = proxy.setup.keys(&["disable", "foo"]);
    assert!(out.status.success(), "{out:?}");
    hup();
    let give_up = Instant::now() + Duration::from_secs(5);
    loop {
        let reply = client
            .post(
                Version::Http1,
                &key_path("foo", "encrypt"),
                &encrypt_body(b"x", None, false),
            )
            .await;
        if reply.error_name() == "InvalidStateException" {
            break;
        }
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        assert!(Instant::now() < give_up, "SIGHUP did not refresh the key");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
