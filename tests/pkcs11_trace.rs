//! `hsm.trace`: the real proxy on a SoftHSM2 token logs each PKCS#11 call with its
//! function, CKR_ value and duration, and never a PIN, plaintext, AAD or secret; with
//! the setting off it logs no call at all.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::json;

const PLAINTEXT: &[u8] = b"MARKER-PLAINTEXT-trace-41c7";
const AAD: &[u8] = b"MARKER-AAD-trace-9e02";

/// Encrypt, Decrypt, GetKeyMetadata, and a decrypt the token refuses (wrong AAD).
async fn requests(proxy: &Proxy) {
    let client = proxy.client();
    let encrypted = client
        .post(
            Version::Http1,
            &key_path("foo", "encrypt"),
            &encrypt_body(PLAINTEXT, Some(AAD), false),
        )
        .await;
    assert_eq!(encrypted.status, 200);
    let decrypted = client
        .post(
            Version::Http1,
            &key_path("foo", "decrypt"),
            &decrypt_body(&encrypted.body, Some(AAD)),
        )
        .await;
    assert_eq!(unb64(&decrypted.body["plaintext"]), PLAINTEXT);
    let metadata = client
        .post(
            Version::Http1,
            &key_path("foo", "metadata"),
            &json!({"requestMetadata": metadata()}),
        )
        .await;
    assert_eq!(metadata.status, 200);
    let wrong = client
        .post(
            Version::Http1,
            &key_path("foo", "decrypt"),
            &decrypt_body(&encrypted.body, Some(b"MARKER-AAD-trace-wrong")),
        )
        .await;
    assert_eq!(wrong.error_name(), "InvalidCiphertextException");
}

fn call_lines(logs: &str) -> Vec<&str> {
    logs.lines()
        .filter(|l| l.contains("PKCS#11 call"))
        .collect()
}

#[tokio::test]
async fn each_call_is_logged_with_its_return_value_and_never_a_secret() {
    let setup = Setup::new();
    setup.edit_config("[hsm]\n", "[hsm]\ntrace = true\n");
    let pin = std::fs::read_to_string(setup.path("hsm-pin"))
        .unwrap()
        .trim()
        .to_owned();
    let secret = setup.secret.clone();
    let proxy = Proxy::start(setup, &[]);
    requests(&proxy).await;
    assert!(proxy.logged("function=C_Decrypt rv=CKR_ENCRYPTED_DATA_INVALID"));

    let logs = proxy.logs();
    let lines = call_lines(&logs);
    for (function, rv) in [
        ("C_Initialize", "CKR_OK"),
        ("C_OpenSession", "CKR_OK"),
        ("C_Login", "CKR_OK"),
        ("C_Encrypt", "CKR_OK"),
        ("C_Decrypt", "CKR_OK"),
        ("C_GetAttributeValue", "CKR_OK"),
        ("C_Decrypt", "CKR_ENCRYPTED_DATA_INVALID"),
    ] {
        let needle = format!("function={function} rv={rv} ");
        assert!(
            lines.iter().any(|l| l.contains(&needle)),
            "no line with {needle:?} in:\n{}",
            lines.join("\n")
        );
    }
    assert!(lines
        .iter()
        .all(|l| l.contains("duration_us=") && l.contains("pkcs11_trace")));
    for marker in [
        "MARKER-PLAINTEXT",
        "MARKER-AAD",
        &b64(PLAINTEXT),
        &b64(AAD),
        &pin,
        &secret,
    ] {
        assert!(!logs.contains(marker), "{marker:?} logged:\n{logs}");
    }
}

#[tokio::test]
async fn without_the_setting_no_call_is_logged() {
    let proxy = Setup::new().start();
    requests(&proxy).await;
    // The wrong AAD's request line shows that the lines of these requests are in.
    assert!(proxy.logged("InvalidCiphertextException"));
    let logs = proxy.logs();
    assert!(call_lines(&logs).is_empty(), "{logs}");
    assert!(!logs.contains("pkcs11_trace"), "{logs}");
}
