//! Migrating from the AWS sample proxy (aws-samples/aws-kms-xks-proxy): its ciphertexts
//! still decrypt on our proxy with the key store's compatibility mode, while new
//! encryptions use the spec's AAD.
//!
//! The key material is imported into the SoftHSM2 token for this test only, so the
//! test can seal ciphertexts itself, with aws-lc-rs and the sample's AAD construction
//! written out here independently of the proxy's code. Its own test binary: it sets
//! SOFTHSM2_CONF for the process to reach the token.

#![allow(clippy::unwrap_used)]

mod common;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use aws_lc_rs::digest::{digest, SHA256};
use common::*;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use serde_json::{json, Value};

const MATERIAL: [u8; 32] = [0x5a; 32];
/// The sample's documented example value of `ciphertext_metadata_b64` ("v0.0.1").
const SAMPLE_METADATA: &[u8] = b"v0.0.1";

/// Imports [`MATERIAL`] into the setup's token as the AES key `label`. One test at a
/// time: the module reads SOFTHSM2_CONF when initialized, once per process.
fn import_key(setup: &Setup, label: &str) {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    std::env::set_var("SOFTHSM2_CONF", setup.path("softhsm2.conf"));
    let pkcs11 = Pkcs11::new("/usr/lib/softhsm/libsofthsm2.so").unwrap();
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = pkcs11
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|slot| pkcs11.get_token_info(*slot).unwrap().label().trim_end() == "xks-quickstart")
        .unwrap();
    let session = pkcs11.open_rw_session(slot).unwrap();
    let pin = std::fs::read_to_string(setup.path("hsm-pin")).unwrap();
    session
        .login(UserType::User, Some(&AuthPin::new(pin.trim().into())))
        .unwrap();
    session
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Value(MATERIAL.to_vec()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(label.as_bytes().to_vec()),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
        ])
        .unwrap();
    session.close().unwrap();
    pkcs11.finalize().unwrap();
}

fn seal(hsm_aad: &[u8], plaintext: &[u8]) -> ([u8; 12], Vec<u8>, Vec<u8>) {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &MATERIAL).unwrap());
    let iv: [u8; 12] = rand::random();
    let mut ciphertext = plaintext.to_vec();
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(iv),
            Aad::from(hsm_aad),
            &mut ciphertext,
        )
        .unwrap();
    (iv, ciphertext, tag.as_ref().to_vec())
}

/// The sample proxy's HSM AAD: u16be(len(aad)) ‖ SHA-256(aad) when the AAD field is
/// present ‖ u8(len(metadata)) ‖ metadata.
fn sample_aad(aad: Option<&[u8]>, metadata: &[u8]) -> Vec<u8> {
    let mut out = (aad.map_or(0, <[u8]>::len) as u16).to_be_bytes().to_vec();
    if let Some(aad) = aad {
        out.extend_from_slice(digest(&SHA256, aad).as_ref());
    }
    out.push(metadata.len() as u8);
    out.extend_from_slice(metadata);
    out
}

/// A Decrypt body for a ciphertext sealed in this test.
fn decrypt_request(
    sealed: &([u8; 12], Vec<u8>, Vec<u8>),
    aad: Option<&[u8]>,
    metadata: &[u8],
) -> Value {
    let mut body = json!({
        "requestMetadata": common::metadata(),
        "ciphertext": b64(&sealed.1),
        "initializationVector": b64(&sealed.0),
        "authenticationTag": b64(&sealed.2),
        "encryptionAlgorithm": "AES_GCM",
    });
    if let Some(aad) = aad {
        body["additionalAuthenticatedData"] = json!(b64(aad));
    }
    if !metadata.is_empty() {
        body["ciphertextMetadata"] = json!(b64(metadata));
    }
    body
}

/// A proxy whose key store holds the imported key `legacy`, with the sample's
/// metadata `compat` (None: compatibility off).
fn proxy_with(compat: Option<&[u8]>) -> Proxy {
    let setup = Setup::new();
    import_key(&setup, "legacy");
    setup.edit_config("keys = [", "keys = [\"legacy\", ");
    if let Some(compat) = compat {
        setup.edit_config(
            "\n[[key_store.credential]]",
            &format!(
                "aws_sample_ciphertext_metadata = \"{}\"\n\n[[key_store.credential]]",
                b64(compat)
            ),
        );
    }
    setup.start()
}

#[tokio::test]
async fn sample_ciphertexts_decrypt_and_new_ones_use_the_spec_format() {
    let proxy = proxy_with(Some(SAMPLE_METADATA));
    let client = proxy.client();
    let decrypt = key_path("legacy", "decrypt");
    let aad = b"project=nile";

    for aad in [Some(&aad[..]), Some(&b""[..]), None] {
        let sealed = seal(&sample_aad(aad, SAMPLE_METADATA), b"sample secret");
        let reply = client
            .post(
                Version::Http1,
                &decrypt,
                &decrypt_request(&sealed, aad, SAMPLE_METADATA),
            )
            .await;
        assert_eq!(reply.status, 200, "aad {aad:?}: {:?}", reply.body);
        assert_eq!(unb64(&reply.body["plaintext"]), b"sample secret");
    }

    // Tampering fails: other AAD, other metadata, AAD field dropped.
    let sealed = seal(&sample_aad(Some(aad), SAMPLE_METADATA), b"sample secret");
    for body in [
        decrypt_request(&sealed, Some(b"project=amazon"), SAMPLE_METADATA),
        decrypt_request(&sealed, Some(aad), b"v0.0.2"),
        decrypt_request(&sealed, None, SAMPLE_METADATA),
    ] {
        let reply = client.post(Version::Http1, &decrypt, &body).await;
        assert_eq!(reply.status, 400, "{:?}", reply.body);
        assert_eq!(reply.error_name(), "InvalidCiphertextException");
    }

    // New encryptions use the spec's AAD (checked with the key material here) and
    // decrypt on the proxy.
    let encrypted = client
        .post(
            Version::Http1,
            &key_path("legacy", "encrypt"),
            &encrypt_body(b"new secret", Some(aad), false),
        )
        .await;
    assert_eq!(encrypted.status, 200, "{:?}", encrypted.body);
    assert!(encrypted.body.get("ciphertextMetadata").is_none());
    let mut spec_aad = (aad.len() as u16).to_be_bytes().to_vec();
    spec_aad.extend_from_slice(aad);
    spec_aad.push(0);
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &MATERIAL).unwrap());
    let mut in_out = unb64(&encrypted.body["ciphertext"]);
    in_out.extend_from_slice(&unb64(&encrypted.body["authenticationTag"]));
    let iv: [u8; 12] = unb64(&encrypted.body["initializationVector"])
        .try_into()
        .unwrap();
    let plaintext = key
        .open_in_place(
            Nonce::assume_unique_for_key(iv),
            Aad::from(&spec_aad[..]),
            &mut in_out,
        )
        .unwrap();
    assert_eq!(plaintext, b"new secret");
    let decrypted = client
        .post(
            Version::Http1,
            &decrypt,
            &decrypt_body(&encrypted.body, Some(aad)),
        )
        .await;
    assert_eq!(decrypted.status, 200, "{:?}", decrypted.body);
    assert_eq!(unb64(&decrypted.body["plaintext"]), b"new secret");
}

#[tokio::test]
async fn sample_without_metadata_and_compatibility_off() {
    // The sample ran without ciphertext metadata: its ciphertexts and ours both carry
    // none, and both decrypt.
    let proxy = proxy_with(Some(b""));
    let client = proxy.client();
    let decrypt = key_path("legacy", "decrypt");
    let sealed = seal(&sample_aad(Some(b"ctx"), b""), b"old");
    let reply = client
        .post(
            Version::Http1,
            &decrypt,
            &decrypt_request(&sealed, Some(b"ctx"), b""),
        )
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(unb64(&reply.body["plaintext"]), b"old");
    let ours = client
        .post(
            Version::Http1,
            &key_path("legacy", "encrypt"),
            &encrypt_body(b"new", Some(b"ctx"), false),
        )
        .await;
    let reply = client
        .post(
            Version::Http1,
            &decrypt,
            &decrypt_body(&ours.body, Some(b"ctx")),
        )
        .await;
    assert_eq!(unb64(&reply.body["plaintext"]), b"new");
    drop(proxy);

    // Without the compatibility setting the sample's ciphertexts are refused.
    let proxy = proxy_with(None);
    let client = proxy.client();
    let sealed = seal(&sample_aad(Some(b"ctx"), SAMPLE_METADATA), b"old");
    let reply = client
        .post(
            Version::Http1,
            &decrypt,
            &decrypt_request(&sealed, Some(b"ctx"), SAMPLE_METADATA),
        )
        .await;
    assert_eq!(reply.status, 400, "{:?}", reply.body);
    assert_eq!(reply.error_name(), "InvalidCiphertextException");
}
