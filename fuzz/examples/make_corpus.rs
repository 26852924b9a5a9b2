//! Writes the seed corpora under `corpus/<target>/`:
//! `cargo run --manifest-path fuzz/Cargo.toml --example make_corpus`.
//!
//! Seeds are the spec's examples and edge cases, in each target's input layout (see
//! `src/lib.rs`). The valid Decrypt seed carries a real ciphertext under the fuzz key
//! `foo`, and the valid SigV4 seeds carry real signatures, so the fuzzer starts from
//! inputs that reach the end of each path. Rerunning rewrites the same files (except the
//! random IV of the Decrypt seed).

use std::fs;
use std::path::{Path, PathBuf};

use aws_lc_rs::{digest, hmac};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use xks_proxy::hsm::software::{SoftwareBackend, SoftwareKeySpec};
use xks_proxy::hsm::KeyUsage;
use xks_proxy::xks::aad::hsm_aad;
use xks_proxy::xks::ApiOperation;
use xks_proxy_fuzz::{
    request_selector, ACCESS_KEY_ID, FLAG_AUTHORITY, FLAG_NO_HOST_HEADER, FOO_KEY, REGION, SECRET,
};
use zeroize::Zeroizing;

fn write(target: &str, name: &str, data: &[u8]) {
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    fs::create_dir_all(&dir).expect("corpus directory");
    assert!(data.len() < 4096, "{target}/{name} is too large");
    fs::write(dir.join(name), data).expect("write seed");
}

// ---------------------------------------------------------------------------------------
// router: byte 0 '0'..'5' is GET, POST, PUT, DELETE, OPTIONS, HEAD (b % 6).
// ---------------------------------------------------------------------------------------

fn router() {
    let post = |path: &str| format!("1{path}").into_bytes();
    let long_id = |n: usize| format!("/a/b/kms/xks/v1/keys/{}/encrypt", "k".repeat(n));
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("post-health-root", post("/kms/xks/v1/health")),
        ("post-encrypt-ab", post("/a/b/kms/xks/v1/keys/foo/encrypt")),
        (
            "post-decrypt-long-prefix",
            post("/example/uri/path/prefix/kms/xks/v1/keys/Key-1.a_b/decrypt"),
        ),
        (
            "post-metadata-uuid",
            post("/kms/xks/v1/keys/b42c7fbf-de61-441c-ae24-123456789012/metadata"),
        ),
        (
            "get-metadata-405",
            b"0/a/b/kms/xks/v1/keys/foo/metadata".to_vec(),
        ),
        ("head-health-405", b"5/kms/xks/v1/health".to_vec()),
        ("post-empty-segment", post("/a/b//kms/xks/v1/health")),
        ("post-unknown-prefix", post("/a/kms/xks/v1/health")),
        ("post-key-id-128", post(&long_id(128))),
        ("post-key-id-129", post(&long_id(129))),
        ("post-dot-dot-key", post("/kms/xks/v1/keys/../encrypt")),
        ("post-percent-key", post("/kms/xks/v1/keys/f%20o/encrypt")),
        ("post-trailing-slash", post("/kms/xks/v1/keys/foo/encrypt/")),
        ("prefix-tenant", post("tenant/a/")),
        (
            "post-non-utf8",
            [b"1/a/b/kms/xks/v1/keys/\xff\xfe/encrypt".as_slice()].concat(),
        ),
    ];
    for (name, data) in seeds {
        write("router", name, &data);
    }
}

// ---------------------------------------------------------------------------------------
// request: byte 0 is request_selector(operation, key index into KEY_IDS).
// ---------------------------------------------------------------------------------------

const FOO: usize = 0;
const ENC: usize = 1;
const UNKNOWN: usize = 2;
const NO_KEY: usize = 3;

const PRINCIPAL: &str = "arn:aws:iam::123456789012:user/Alice";
const KEY_ARN: &str =
    "arn:aws:kms:us-east-2:123456789012:/key/1234abcd-12ab-34cd-56ef-1234567890ab";
/// "project=nile,department=marketing" (spec: Encrypt example).
const SPEC_AAD: &str = "cHJvamVjdD1uaWxlLGRlcGFydG1lbnQ9bWFya2V0aW5n";

fn metadata(operation: &str) -> serde_json::Value {
    serde_json::json!({
        "awsPrincipalArn": PRINCIPAL,
        "kmsKeyArn": KEY_ARN,
        "kmsOperation": operation,
        "kmsRequestId": "4112f4d6-db54-4af4-ae30-c55a22a8dfae",
        "kmsViaService": "ebs",
    })
}

fn request_seed(operation: ApiOperation, key: usize, body: &[u8]) -> Vec<u8> {
    let mut data = vec![0x40 | request_selector(operation, key)];
    data.extend_from_slice(body);
    data
}

fn json_seed(operation: ApiOperation, key: usize, body: &serde_json::Value) -> Vec<u8> {
    request_seed(
        operation,
        key,
        &serde_json::to_vec_pretty(body).expect("JSON"),
    )
}

/// A Decrypt body whose ciphertext really authenticates under `foo`.
fn valid_decrypt() -> serde_json::Value {
    let backend = SoftwareBackend::new(vec![SoftwareKeySpec {
        id: "foo".into(),
        material: Some(Zeroizing::new(FOO_KEY.to_vec())),
        usages: vec![KeyUsage::Encrypt, KeyUsage::Decrypt],
        enabled: true,
    }])
    .expect("software backend");
    let aad = STANDARD.decode(SPEC_AAD).expect("Base64");
    let ciphertext_metadata = b"key_version=1";
    let sealed = backend
        .encrypt(
            "foo",
            b"Hello World!",
            &hsm_aad(&aad, ciphertext_metadata).expect("AAD"),
        )
        .expect("encrypt");
    serde_json::json!({
        "requestMetadata": metadata("Decrypt"),
        "additionalAuthenticatedData": SPEC_AAD,
        "encryptionAlgorithm": "AES_GCM",
        "ciphertext": STANDARD.encode(&sealed.ciphertext),
        "ciphertextMetadata": STANDARD.encode(ciphertext_metadata),
        "initializationVector": STANDARD.encode(&sealed.iv),
        "authenticationTag": STANDARD.encode(sealed.tag),
    })
}

fn request() {
    use serde_json::json;
    use ApiOperation::{Decrypt, Encrypt, GetHealthStatus, GetKeyMetadata};

    let health = json!({"requestMetadata": {
        "kmsRequestId": "4112f4d6-db54-4af4-ae30-c55a22a8dfae",
        "kmsOperation": "CreateCustomKeyStore",
    }});
    let key_metadata = json!({"requestMetadata": {
        "awsPrincipalArn": PRINCIPAL,
        "kmsOperation": "CreateKey",
        "kmsRequestId": "4112f4d6-db54-4af4-ae30-c55a22a8dfae",
    }});
    let encrypt_spec = json!({
        "requestMetadata": metadata("Encrypt"),
        "additionalAuthenticatedData": SPEC_AAD,
        "plaintext": "SGVsbG8gV29ybGQh",
        "encryptionAlgorithm": "AES_GCM",
        "ciphertextDataIntegrityValueAlgorithm": "SHA_256",
    });
    let encrypt_curl = json!({
        "requestMetadata": metadata("GenerateDataKey"),
        "plaintext": "SGVsbG8gV29ybGQh",
        "encryptionAlgorithm": "AES_GCM",
    });
    let encrypt_empty = json!({
        "requestMetadata": metadata("Encrypt"),
        "plaintext": "",
        "encryptionAlgorithm": "AES_GCM",
        "additionalAuthenticatedData": null,
        "futureField": {"nested": [1, 2, {"x": null}]},
    });
    let decrypt_spec = json!({
        "requestMetadata": metadata("Decrypt"),
        "additionalAuthenticatedData": SPEC_AAD,
        "encryptionAlgorithm": "AES_GCM",
        "ciphertext": "ghxkK1txeDNn3q8Y",
        "ciphertextMetadata": "a2V5X3ZlcnNpb249MQ==",
        "initializationVector": "HMrlRw85cAJUd5Ax",
        "authenticationTag": "vBxN2ncH1oEkR8WVXpmyYQ==",
    });
    let mut decrypt_iv16 = decrypt_spec.clone();
    decrypt_iv16["initializationVector"] = "AAECAwQFBgcICQoLDA0ODw==".into();
    let mut encrypt_bad_base64 = encrypt_curl.clone();
    encrypt_bad_base64["plaintext"] = "SGVsbG8gV29ybGQh=".into();
    let mut encrypt_wrong_type = encrypt_curl.clone();
    encrypt_wrong_type["plaintext"] = json!(42);

    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("health-spec", json_seed(GetHealthStatus, NO_KEY, &health)),
        (
            "health-empty-metadata",
            json_seed(GetHealthStatus, NO_KEY, &json!({"requestMetadata": {}})),
        ),
        (
            "metadata-foo-spec",
            json_seed(GetKeyMetadata, FOO, &key_metadata),
        ),
        (
            "metadata-unknown-key",
            json_seed(GetKeyMetadata, UNKNOWN, &key_metadata),
        ),
        (
            "encrypt-foo-spec-cdiv",
            json_seed(Encrypt, FOO, &encrypt_spec),
        ),
        (
            "encrypt-enc-cdiv-needs-decrypt",
            json_seed(Encrypt, ENC, &encrypt_spec),
        ),
        ("encrypt-enc-curl", json_seed(Encrypt, ENC, &encrypt_curl)),
        (
            "encrypt-foo-empty-unknown-fields",
            json_seed(Encrypt, FOO, &encrypt_empty),
        ),
        (
            "encrypt-bad-base64",
            json_seed(Encrypt, FOO, &encrypt_bad_base64),
        ),
        (
            "encrypt-wrong-type",
            json_seed(Encrypt, FOO, &encrypt_wrong_type),
        ),
        (
            "decrypt-foo-valid",
            json_seed(Decrypt, FOO, &valid_decrypt()),
        ),
        (
            "decrypt-foo-spec-not-ours",
            json_seed(Decrypt, FOO, &decrypt_spec),
        ),
        ("decrypt-foo-iv16", json_seed(Decrypt, FOO, &decrypt_iv16)),
        (
            "decrypt-enc-not-allowed",
            json_seed(Decrypt, ENC, &valid_decrypt()),
        ),
        (
            "decrypt-not-json",
            request_seed(
                Decrypt,
                FOO,
                b"{\"requestMetadata\": {\"kmsRequestId\": \"\\ud83d",
            ),
        ),
    ];
    for (name, data) in seeds {
        write("request", name, &data);
    }
}

// ---------------------------------------------------------------------------------------
// sigv4: flags byte, then authorization \n x-amz-date \n x-amz-content-sha256 \n host \n
// path?query \n extra-header \n body.
// ---------------------------------------------------------------------------------------

const DATE: &str = "20260101";
const AMZ_DATE: &str = "20260101T000000Z";
const HOST: &str = "xks.example.com";
const HEALTH_PATH: &str = "/kms/xks/v1/health";
const ENCRYPT_PATH: &str = "/example/uri/path/prefix/kms/xks/v1/keys/foo/encrypt";
const HEALTH_BODY: &str =
    r#"{"requestMetadata":{"kmsOperation":"KmsHealthCheck","kmsRequestId":"1124f4d6"}}"#;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(data: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, data).as_ref())
}

/// SigV4 as in the spec's Appendix A, for paths and queries that need no encoding.
/// `headers` are the signed headers, sorted by name.
fn authorization(path: &str, query: &str, headers: &[(&str, &str)], body: &[u8]) -> String {
    let signed: Vec<&str> = headers.iter().map(|(name, _)| *name).collect();
    let signed = signed.join(";");
    let mut canonical = format!("POST\n{path}\n{query}\n");
    for (name, value) in headers {
        canonical.push_str(&format!("{name}:{value}\n"));
    }
    canonical.push_str(&format!("\n{signed}\n{}", sha256_hex(body)));
    let scope = format!("{DATE}/{REGION}/kms-xks-proxy/aws4_request");
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{AMZ_DATE}\n{scope}\n{}",
        sha256_hex(canonical.as_bytes())
    );
    let mut key = format!("AWS4{SECRET}").into_bytes();
    for part in [DATE, REGION, "kms-xks-proxy", "aws4_request"] {
        key = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), part.as_bytes())
            .as_ref()
            .to_vec();
    }
    let signature = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, &key),
        string_to_sign.as_bytes(),
    );
    format!(
        "AWS4-HMAC-SHA256 Credential={ACCESS_KEY_ID}/{scope}, SignedHeaders={signed}, Signature={}",
        hex(signature.as_ref())
    )
}

#[allow(clippy::too_many_arguments)]
fn sigv4_seed(
    flags: u8,
    authorization: &str,
    amz_date: &[u8],
    content_sha256: &str,
    host: &str,
    target: &str,
    extra: &str,
    body: &[u8],
) -> Vec<u8> {
    let mut data = vec![0x40 | flags];
    for field in [
        authorization.as_bytes(),
        amz_date,
        content_sha256.as_bytes(),
        host.as_bytes(),
        target.as_bytes(),
        extra.as_bytes(),
    ] {
        data.extend_from_slice(field);
        data.push(b'\n');
    }
    data.extend_from_slice(body);
    data
}

fn sigv4() {
    let body = HEALTH_BODY.as_bytes();
    let date = AMZ_DATE.as_bytes();
    let basic = authorization(
        HEALTH_PATH,
        "",
        &[("host", HOST), ("x-amz-date", AMZ_DATE)],
        body,
    );
    let encrypt_body = br#"{"requestMetadata":{"kmsRequestId":"r","kmsOperation":"Encrypt"},"plaintext":"SGVsbG8gV29ybGQh","encryptionAlgorithm":"AES_GCM"}"#;
    let body_hash = sha256_hex(encrypt_body);
    let with_hash = authorization(
        ENCRYPT_PATH,
        "",
        &[
            ("host", HOST),
            ("x-amz-content-sha256", &body_hash),
            ("x-amz-date", AMZ_DATE),
        ],
        encrypt_body,
    );
    let with_query = authorization(
        HEALTH_PATH,
        "a=1&b=x%20y",
        &[("host", HOST), ("x-amz-date", AMZ_DATE)],
        body,
    );
    let lookalike = format!(
        "AWS4-HMAC-SHA256 Credential={ACCESS_KEY_ID}/{DATE}/{REGION}/kms-xks-proxy/aws4_request, SignedHeaders=host;x-amz-date, Signature={}",
        "0123456789abcdef".repeat(4)
    );
    let spec_example = "AWS4-HMAC-SHA256 Credential=MUBSXM6K3KMXHN6RRCXI7TWQH4NU76HYFKRSESPMTSTIBADXQQXQ/20211009/us-west-2/kms-xks-proxy/aws4_request, SignedHeaders=host;x-amz-date, Signature=1164eaa8e79eacaa9c0df54aa42f3b300380d14bedfc08e3b319648d4abfff66";
    let plus_300s = 1 << 4;
    let plus_301s = 3 << 4;
    let http2 = FLAG_AUTHORITY | FLAG_NO_HOST_HEADER;

    let seeds: Vec<(&str, Vec<u8>)> = vec![
        (
            "valid-health",
            sigv4_seed(0, &basic, date, "", HOST, HEALTH_PATH, "", body),
        ),
        (
            "valid-encrypt-content-sha256",
            sigv4_seed(
                0,
                &with_hash,
                date,
                &body_hash,
                HOST,
                ENCRYPT_PATH,
                "content-type: application/json",
                encrypt_body,
            ),
        ),
        (
            "valid-http2-authority",
            sigv4_seed(http2, &basic, date, "", HOST, HEALTH_PATH, "", body),
        ),
        (
            "valid-query",
            sigv4_seed(
                0,
                &with_query,
                date,
                "",
                HOST,
                &format!("{HEALTH_PATH}?b=x+y&a=1"),
                "",
                body,
            ),
        ),
        (
            "valid-skew-300s",
            sigv4_seed(plus_300s, &basic, date, "", HOST, HEALTH_PATH, "", body),
        ),
        (
            "skew-301s",
            sigv4_seed(plus_301s, &basic, date, "", HOST, HEALTH_PATH, "", body),
        ),
        (
            "get-method",
            sigv4_seed(1, &basic, date, "", HOST, HEALTH_PATH, "", body),
        ),
        (
            "lookalike-signature",
            sigv4_seed(0, &lookalike, date, "", HOST, HEALTH_PATH, "", body),
        ),
        (
            "spec-example-header",
            sigv4_seed(0, spec_example, date, "", HOST, HEALTH_PATH, "", body),
        ),
        (
            "duplicate-authorization",
            sigv4_seed(
                0,
                &basic,
                date,
                "",
                HOST,
                HEALTH_PATH,
                &format!("authorization: {basic}"),
                body,
            ),
        ),
        (
            "missing-date",
            sigv4_seed(0, &basic, b"\x7f", "", HOST, HEALTH_PATH, "", body),
        ),
        (
            "malformed-date",
            sigv4_seed(0, &basic, b"2026-01-01T00:00:00Z", "", HOST, HEALTH_PATH, "", body),
        ),
        (
            "unsorted-signed-headers",
            sigv4_seed(
                0,
                &basic.replace("host;x-amz-date", "x-amz-date;host"),
                date,
                "",
                HOST,
                HEALTH_PATH,
                "",
                body,
            ),
        ),
        (
            "wrong-service",
            sigv4_seed(
                0,
                &basic.replace("/kms-xks-proxy/", "/kms/"),
                date,
                "",
                HOST,
                HEALTH_PATH,
                "",
                body,
            ),
        ),
        (
            "non-utf8-authorization",
            [
                b"@AWS4-HMAC-SHA256 Credential=\xc3\xa9\xff/20260101/us-east-1/kms-xks-proxy/aws4_request\n"
                    .as_slice(),
                date,
                b"\n\nxks.example.com\n/kms/xks/v1/health\n\n",
            ]
            .concat(),
        ),
    ];
    for (name, data) in seeds {
        write("sigv4", name, &data);
    }
}

fn main() {
    router();
    request();
    sigv4();
}
