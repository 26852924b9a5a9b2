//! Request bodies and paths of the four APIs.

use serde_json::{json, Value};

use super::*;

pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn unb64(value: &Value) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(value.as_str().unwrap())
        .unwrap()
}

pub fn metadata() -> Value {
    json!({
        "awsPrincipalArn": "arn:aws:iam::123456789012:user/Alice",
        "kmsKeyArn": "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "kmsOperation": "Encrypt",
        "kmsRequestId": "4112f4d6-db54-4af4-ae30-c55a22a8dfae",
        "kmsViaService": "ebs"
    })
}

pub fn key_path(key: &str, op: &str) -> String {
    format!("{PREFIX}/keys/{key}/{op}")
}

pub fn health_path() -> String {
    format!("{PREFIX}/health")
}

pub fn encrypt_body(plaintext: &[u8], aad: Option<&[u8]>, cdiv: bool) -> Value {
    let mut body = json!({
        "requestMetadata": metadata(),
        "plaintext": b64(plaintext),
        "encryptionAlgorithm": "AES_GCM",
    });
    if let Some(aad) = aad {
        body["additionalAuthenticatedData"] = json!(b64(aad));
    }
    if cdiv {
        body["ciphertextDataIntegrityValueAlgorithm"] = json!("SHA_256");
    }
    body
}

/// A Decrypt body from an Encrypt reply.
pub fn decrypt_body(encrypted: &Value, aad: Option<&[u8]>) -> Value {
    let mut metadata = metadata();
    metadata["kmsOperation"] = json!("Decrypt");
    let mut body = json!({
        "requestMetadata": metadata,
        "ciphertext": encrypted["ciphertext"],
        "initializationVector": encrypted["initializationVector"],
        "authenticationTag": encrypted["authenticationTag"],
        "encryptionAlgorithm": "AES_GCM",
    });
    if let Some(aad) = aad {
        body["additionalAuthenticatedData"] = json!(b64(aad));
    }
    if let Some(meta) = encrypted.get("ciphertextMetadata") {
        body["ciphertextMetadata"] = meta.clone();
    }
    body
}
