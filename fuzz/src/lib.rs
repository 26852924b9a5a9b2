//! Bodies of the xks-proxy fuzz targets.
//!
//! Each `fuzz_targets/<name>.rs` is a one-line `fuzz_target!` around the function of the
//! same name here, and `tests/corpus.rs` replays every seed of `corpus/<name>/` through
//! it on stable Rust. Every function takes arbitrary bytes, must never panic, and
//! asserts only properties the proxy guarantees (spec or documented invariants); an
//! assertion failure is a finding just like a panic inside the library.
//!
//! Input layouts (documented in README.md as well):
//!
//! - [`router`]: byte 0 picks the method, the rest is the path (lossy UTF-8).
//! - [`request`]: byte 0 picks the operation (bits 0–1) and the key id (bits 2–3), the
//!   rest is the request body.
//! - [`sigv4`]: byte 0 is a set of flags, the rest is `\n`-separated fields; see
//!   [`sigv4`].

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde_json::Value;
use xks_proxy::auth::{AuthError, Credential, RequestParts, Verifier};
use xks_proxy::health::HealthMonitor;
use xks_proxy::hsm::software::{SoftwareBackend, SoftwareKeySpec};
use xks_proxy::hsm::{Backend, Ekm, KeyUsage};
use xks_proxy::metrics::Metrics;
use xks_proxy::router::{
    is_valid_key_id, normalize_prefix, Router, API_ROOT, MAX_KEY_ID_LEN, MAX_URI_PATH_LEN,
};
use xks_proxy::xks::{ApiOperation, ErrorName, Handler, HealthInfo, KeySet, XksError};
use zeroize::Zeroizing;

// ---------------------------------------------------------------------------------------
// Shared checks
// ---------------------------------------------------------------------------------------

/// What `XksError::new` guarantees of every error the client sees: printable ASCII,
/// fewer than 512 characters (spec: Error codes), and a JSON body with both fields.
fn check_error(error: &XksError) {
    let message = error.message();
    assert!(
        message.len() < 512,
        "errorMessage is {} bytes long",
        message.len()
    );
    assert!(
        message.bytes().all(|b| (0x20..=0x7e).contains(&b)),
        "errorMessage is not printable ASCII: {message:?}"
    );
    assert!(
        ErrorName::ALL.contains(&error.name()),
        "unknown error name {:?}",
        error.name()
    );
    assert_eq!(error.status(), error.name().status());
    let json: Value = serde_json::from_slice(&error.to_json()).expect("error body is JSON");
    let object = json.as_object().expect("error body is a JSON object");
    assert_eq!(object.len(), 2, "error body has extra fields: {json}");
    assert_eq!(
        object.get("errorName").and_then(Value::as_str),
        Some(error.name().as_str())
    );
    assert_eq!(
        object.get("errorMessage").and_then(Value::as_str),
        Some(message)
    );
}

fn base64_field<'v>(object: &'v Value, field: &str) -> Option<&'v str> {
    object.get(field).and_then(Value::as_str)
}

fn decode(value: &str) -> Vec<u8> {
    STANDARD
        .decode(value)
        .unwrap_or_else(|e| panic!("response field {value:?} is not standard Base64: {e}"))
}

// ---------------------------------------------------------------------------------------
// router
// ---------------------------------------------------------------------------------------

/// The key stores' prefixes of the routing target, in key store order (normalized).
pub const ROUTER_PREFIXES: [&str; 3] = ["", "/a/b", "/example/uri/path/prefix"];

/// Methods the router target chooses from with its first byte.
pub const METHODS: [Method; 6] = [
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::OPTIONS,
    Method::HEAD,
];

fn shared_router() -> &'static Router {
    static ROUTER: OnceLock<Router> = OnceLock::new();
    ROUTER.get_or_init(|| Router::new(ROUTER_PREFIXES).expect("the fuzz prefixes are valid"))
}

/// Fuzzes [`Router::route`], [`normalize_prefix`] and [`is_valid_key_id`].
///
/// Byte 0 picks the method (`METHODS[b % 6]`); the rest, as lossy UTF-8, is the path and
/// also the prefix and key id candidate.
pub fn router(data: &[u8]) {
    let _ = router_verdict(data);
}

/// [`router`], returning what the router answered (`None`: input too short).
pub fn router_verdict(data: &[u8]) -> Option<Result<ApiOperation, ErrorName>> {
    let (&selector, rest) = data.split_first()?;
    let method = &METHODS[usize::from(selector) % METHODS.len()];
    let path = String::from_utf8_lossy(rest);
    let router = shared_router();

    let verdict = match router.route(method, &path) {
        Ok(found) => {
            assert_eq!(method, Method::POST, "routed a {method} request");
            let prefix = ROUTER_PREFIXES[found.key_store];
            // A routed path is exactly one of the spec's API paths under its prefix.
            let rebuilt = match found.operation {
                ApiOperation::GetHealthStatus => {
                    assert_eq!(found.key_id, "");
                    format!("{prefix}{API_ROOT}/health")
                }
                operation => {
                    assert!(is_valid_key_id(found.key_id), "{:?}", found.key_id);
                    let op = match operation {
                        ApiOperation::GetKeyMetadata => "metadata",
                        ApiOperation::Encrypt => "encrypt",
                        _ => "decrypt",
                    };
                    format!("{prefix}{API_ROOT}/keys/{}/{op}", found.key_id)
                }
            };
            assert_eq!(rebuilt, path);
            Ok(found.operation)
        }
        Err(error) => {
            check_error(&error);
            match error.name() {
                ErrorName::MethodNotAllowed => {
                    assert_ne!(method, Method::POST);
                    // 405 only on a path that POST would route.
                    assert!(router.route(&Method::POST, &path).is_ok(), "{path:?}");
                }
                ErrorName::InvalidUriPath => {
                    // 404 does not depend on the method.
                    assert!(router.route(&Method::POST, &path).is_err(), "{path:?}");
                }
                other => panic!("router answered {other:?} for {path:?}"),
            }
            Err(error.name())
        }
    };

    if let Ok(normalized) = normalize_prefix(&path) {
        assert!(
            normalized.is_empty() || (normalized.starts_with('/') && !normalized.ends_with('/')),
            "{normalized:?}"
        );
        assert!(!normalized.contains("//"), "{normalized:?}");
        assert!(normalized.len() + API_ROOT.len() <= MAX_URI_PATH_LEN);
        assert_eq!(normalize_prefix(&normalized).as_ref(), Ok(&normalized));
        // A router built from the prefix routes that prefix's health path to it.
        let own = Router::new([&*path]).expect("a normalizable prefix is accepted");
        let health = format!("{normalized}{API_ROOT}/health");
        let found = own.route(&Method::POST, &health).expect("own health path");
        assert_eq!(
            (found.key_store, found.operation),
            (0, ApiOperation::GetHealthStatus)
        );
    }

    if is_valid_key_id(&path) {
        assert!(!path.is_empty() && path.len() <= MAX_KEY_ID_LEN);
        assert!(path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')));
        // Every valid id routes under every prefix.
        let encrypt = format!("/a/b{API_ROOT}/keys/{path}/encrypt");
        let found = router
            .route(&Method::POST, &encrypt)
            .expect("valid key id routes");
        assert_eq!(
            (found.key_store, found.operation, found.key_id),
            (1, ApiOperation::Encrypt, &*path)
        );
    }
    Some(verdict)
}

// ---------------------------------------------------------------------------------------
// request
// ---------------------------------------------------------------------------------------

/// Material of the software key `foo` (ENCRYPT and DECRYPT), fixed so that seeds can
/// carry ciphertexts that really decrypt.
pub const FOO_KEY: [u8; 32] = [0x42; 32];
/// Material of the software key `enc` (ENCRYPT only).
pub const ENC_KEY: [u8; 32] = [0x24; 32];
/// Key ids the request target chooses from with bits 2–3 of its first byte: the two
/// keys of the key store, one unknown id and the empty id (GetHealthStatus's).
pub const KEY_IDS: [&str; 4] = ["foo", "enc", "unknown-key", ""];

/// The request target's first byte for `operation` on `KEY_IDS[key]`.
pub fn request_selector(operation: ApiOperation, key: usize) -> u8 {
    let op = ApiOperation::ALL
        .iter()
        .position(|o| *o == operation)
        .expect("operation is in ALL");
    (op | ((key % KEY_IDS.len()) << 2)) as u8
}

struct RequestHarness {
    runtime: tokio::runtime::Runtime,
    handler: Handler,
    keys: KeySet,
}

fn request_harness() -> &'static RequestHarness {
    static HARNESS: OnceLock<RequestHarness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let spec = |id: &str, material: [u8; 32], usages: Vec<KeyUsage>| SoftwareKeySpec {
            id: id.into(),
            material: Some(Zeroizing::new(material.to_vec())),
            usages,
            enabled: true,
        };
        let software = SoftwareBackend::new(vec![
            spec("foo", FOO_KEY, vec![KeyUsage::Encrypt, KeyUsage::Decrypt]),
            spec("enc", ENC_KEY, vec![KeyUsage::Encrypt]),
        ])
        .expect("software backend");
        let backend = Arc::new(Backend::from(Ekm::Software(software)));
        let monitor = Arc::new(HealthMonitor::new(
            backend.clone(),
            None,
            Duration::from_secs(10),
            Duration::from_millis(100),
            Metrics::new(Duration::from_millis(100)),
        ));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("tokio runtime");
        // One check so GetHealthStatus reports a real status rather than "never checked".
        runtime.block_on(monitor.check());
        let health = HealthInfo {
            fleet_size: 1,
            vendor: "xks-proxy fuzz".into(),
            model: "fuzz 0".into(),
            ekm_vendor: None,
        };
        RequestHarness {
            runtime,
            handler: Handler::new(backend, health, monitor),
            keys: KeySet::new(["foo".into(), "enc".into()]),
        }
    })
}

impl RequestHarness {
    fn handle(
        &self,
        operation: ApiOperation,
        key_id: &str,
        body: &[u8],
    ) -> Result<Value, XksError> {
        let deadline = Instant::now() + Duration::from_secs(1);
        let outcome = self.runtime.block_on(
            self.handler
                // No secondary authorization: the target covers request validation and the
                // operations themselves.
                .handle(operation, &self.keys, key_id, body, deadline, None),
        );
        match outcome.result {
            Ok(body) => {
                let json: Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
                    panic!(
                        "{operation:?} answered a body that is not JSON ({e}): {:?}",
                        String::from_utf8_lossy(&body)
                    )
                });
                assert!(json.is_object(), "{operation:?} answered {json}");
                Ok(json)
            }
            Err(error) => {
                check_error(&error);
                Err(error)
            }
        }
    }
}

/// Fuzzes the four XKS APIs through [`Handler::handle`] over the software backend.
///
/// Byte 0: bits 0–1 pick `ApiOperation::ALL[_]`, bits 2–3 pick `KEY_IDS[_]`; the rest is
/// the request body.
pub fn request(data: &[u8]) {
    let _ = request_verdict(data);
}

/// [`request`], returning the error name the handler answered, if any (`None`: input
/// too short).
pub fn request_verdict(data: &[u8]) -> Option<Result<(), ErrorName>> {
    let (&selector, body) = data.split_first()?;
    let operation = ApiOperation::ALL[usize::from(selector & 3)];
    let key_id = KEY_IDS[usize::from(selector >> 2) & 3];
    let harness = request_harness();
    let response = match harness.handle(operation, key_id, body) {
        Ok(response) => response,
        Err(error) => return Some(Err(error.name())),
    };

    if operation != ApiOperation::GetHealthStatus {
        assert!(
            harness.keys.contains(key_id),
            "{operation:?} succeeded for {key_id:?}, which is not in the key store"
        );
    }
    // The request parsed, so it is JSON.
    let request: Value = serde_json::from_slice(body).expect("an accepted body is JSON");
    match operation {
        ApiOperation::GetHealthStatus => {
            assert!(response["xksProxyFleetSize"].as_u64().unwrap_or(0) > 0);
            let fleet = response["ekmFleetDetails"].as_array().expect("fleet");
            assert!(!fleet.is_empty());
            for ekm in fleet {
                assert!(matches!(
                    ekm["healthStatus"].as_str(),
                    Some("ACTIVE" | "DEGRADED" | "UNAVAILABLE")
                ));
            }
        }
        ApiOperation::GetKeyMetadata => {
            assert_eq!(response["keySpec"], "AES_256");
            let usages = response["keyUsage"].as_array().expect("keyUsage");
            assert!(usages.len() <= 10);
            assert!(usages.iter().any(|u| u == "ENCRYPT"));
            assert_eq!(usages.iter().any(|u| u == "DECRYPT"), key_id == "foo");
            assert!(matches!(
                response["keyStatus"].as_str(),
                Some("ENABLED" | "DISABLED")
            ));
        }
        ApiOperation::Encrypt => check_encrypt(harness, key_id, &request, &response),
        ApiOperation::Decrypt => {
            let plaintext = decode(base64_field(&response, "plaintext").expect("plaintext"));
            let ciphertext = decode(base64_field(&request, "ciphertext").expect("ciphertext"));
            assert_eq!(plaintext.len(), ciphertext.len());
        }
    }
    Some(Ok(()))
}

/// An accepted Encrypt answers what the spec requires, and its output decrypts to the
/// plaintext under the same AAD.
fn check_encrypt(harness: &RequestHarness, key_id: &str, request: &Value, response: &Value) {
    let plaintext = decode(base64_field(request, "plaintext").expect("plaintext"));
    let ciphertext = base64_field(response, "ciphertext").expect("ciphertext");
    let iv = base64_field(response, "initializationVector").expect("initializationVector");
    let tag = base64_field(response, "authenticationTag").expect("authenticationTag");
    assert_eq!(decode(ciphertext).len(), plaintext.len());
    // The spec's sizes are the limits.
    assert!(plaintext.len() <= xks_proxy::xks::request::MAX_PLAINTEXT_BYTES);
    let aad = base64_field(request, "additionalAuthenticatedData").map_or(0, |a| decode(a).len());
    assert!(aad <= xks_proxy::xks::request::MAX_AAD_BYTES);
    assert!(matches!(decode(iv).len(), 12 | 16));
    assert_eq!(decode(tag).len(), 16);
    let wants_cdiv = request
        .get("ciphertextDataIntegrityValueAlgorithm")
        .is_some_and(|v| !v.is_null());
    match base64_field(response, "ciphertextDataIntegrityValue") {
        Some(cdiv) => {
            assert!(wants_cdiv);
            assert_eq!(decode(cdiv).len(), 32);
        }
        None => assert!(!wants_cdiv, "no CDIV although one was requested"),
    }
    assert!(response.get("ciphertextMetadata").is_none());

    let mut decrypt = serde_json::json!({
        "requestMetadata": {
            "awsPrincipalArn": "arn:aws:iam::123456789012:user/Alice",
            "kmsKeyArn": "arn:aws:kms:us-east-2:123456789012:/key/1234abcd",
            "kmsOperation": "Decrypt",
            "kmsRequestId": "fuzz-round-trip",
        },
        "encryptionAlgorithm": "AES_GCM",
        "ciphertext": ciphertext,
        "initializationVector": iv,
        "authenticationTag": tag,
    });
    if let Some(aad) = base64_field(request, "additionalAuthenticatedData") {
        decrypt["additionalAuthenticatedData"] = aad.into();
    }
    let body = serde_json::to_vec(&decrypt).expect("JSON");
    match harness.handle(ApiOperation::Decrypt, key_id, &body) {
        Ok(decrypted) => {
            let decrypted = decode(base64_field(&decrypted, "plaintext").expect("plaintext"));
            assert!(decrypted == plaintext, "round trip changed the plaintext");
        }
        // `enc` may encrypt but not decrypt.
        Err(e) if key_id == "enc" => assert_eq!(e.name(), ErrorName::InvalidKeyUsage),
        Err(e) => panic!("fresh ciphertext does not decrypt: {e}"),
    }
}

// ---------------------------------------------------------------------------------------
// sigv4
// ---------------------------------------------------------------------------------------

/// The verifier's region.
pub const REGION: &str = "us-east-1";
/// The verifier's one access key id.
pub const ACCESS_KEY_ID: &str = "AKIAIOSFODNN7EXAMPLEAB";
/// Its secret.
pub const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY12";
/// The verifier's clock before the flags' offset: 2026-01-01T00:00:00Z.
pub const NOW_UNIX: u64 = 1_767_225_600;
/// Clock offsets (seconds) chosen by flag bits 4–5: on time, both edges of the 5-minute
/// window, and just outside it.
pub const CLOCK_OFFSETS: [i64; 4] = [0, 300, -300, 301];
/// Methods chosen by flag bits 0–1.
pub const SIGV4_METHODS: [&str; 4] = ["POST", "GET", "PUT", "post"];
/// Flag bit 2: pass the host field as the request's authority (HTTP/2 `:authority`).
pub const FLAG_AUTHORITY: u8 = 1 << 2;
/// Flag bit 3: leave the `host` header out (an HTTP/2 request).
pub const FLAG_NO_HOST_HEADER: u8 = 1 << 3;

fn verifier() -> &'static Verifier {
    static VERIFIER: OnceLock<Verifier> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        Verifier::new(
            REGION,
            vec![Credential::new(
                ACCESS_KEY_ID,
                Zeroizing::new(SECRET.into()),
            )],
        )
    })
}

fn header(headers: &mut HeaderMap, name: &'static str, value: Option<&[u8]>) {
    if let Some(value) = value.and_then(|v| HeaderValue::from_bytes(v).ok()) {
        headers.append(name, value);
    }
}

/// Fuzzes [`Verifier::verify`].
///
/// Byte 0 is flags: bits 0–1 method (`SIGV4_METHODS`), bit 2 [`FLAG_AUTHORITY`], bit 3
/// [`FLAG_NO_HOST_HEADER`], bits 4–5 clock offset (`CLOCK_OFFSETS`). The rest is split
/// on `\n` into at most seven fields: `authorization`, `x-amz-date`,
/// `x-amz-content-sha256`, `host` (header values; a missing field means no header, a
/// value `HeaderValue` rejects is left out), the path with an optional `?query`
/// (default `/kms/xks/v1/health`), one extra header `name:value` (appended, so it may
/// repeat one above), and the body (everything after the sixth `\n`).
pub fn sigv4(data: &[u8]) {
    let _ = sigv4_verdict(data);
}

/// [`sigv4`], returning the verifier's answer (`None`: input too short).
pub fn sigv4_verdict(data: &[u8]) -> Option<Result<(), AuthError>> {
    let (&flags, rest) = data.split_first()?;
    let mut fields = rest.splitn(7, |&b| b == b'\n');
    let authorization = fields.next();
    let amz_date = fields.next();
    let content_sha256 = fields.next();
    let host = fields.next();
    let target = fields.next().map(String::from_utf8_lossy);
    let extra = fields.next();
    let body = fields.next().unwrap_or_default();

    let mut headers = HeaderMap::new();
    header(&mut headers, "authorization", authorization);
    header(&mut headers, "x-amz-date", amz_date);
    header(&mut headers, "x-amz-content-sha256", content_sha256);
    if flags & FLAG_NO_HOST_HEADER == 0 {
        header(&mut headers, "host", host);
    }
    if let Some(extra) = extra {
        if let Some(colon) = extra.iter().position(|&b| b == b':') {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(extra[..colon].trim_ascii()),
                HeaderValue::from_bytes(extra[colon + 1..].trim_ascii()),
            ) {
                headers.append(name, value);
            }
        }
    }
    let authority =
        (flags & FLAG_AUTHORITY != 0).then(|| String::from_utf8_lossy(host.unwrap_or_default()));
    let target = target.unwrap_or(std::borrow::Cow::Borrowed("/kms/xks/v1/health"));
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (&target[..], None),
    };
    let parts = RequestParts {
        method: SIGV4_METHODS[usize::from(flags & 3)],
        path,
        query,
        authority: authority.as_deref(),
        headers: &headers,
        body,
    };
    let offset = CLOCK_OFFSETS[usize::from(flags >> 4) & 3];
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(NOW_UNIX.saturating_add_signed(offset));

    let verifier = verifier();
    let result = verifier.verify(&parts, now);
    // The signing key cache must not change the answer.
    assert_eq!(verifier.verify(&parts, now), result);
    let verdict = result.clone().map(|_| ());
    match result {
        Ok(access_key_id) => {
            assert_eq!(access_key_id, ACCESS_KEY_ID);
            // The body is signed.
            let mut other_body = body.to_vec();
            other_body.push(b'x');
            let tampered = RequestParts {
                body: &other_body,
                ..parts
            };
            assert_eq!(
                verifier.verify(&tampered, now),
                Err(AuthError::SignatureMismatch)
            );
            // 11 minutes later the same request is outside the 5-minute window.
            assert_eq!(
                verifier.verify(&parts, now + Duration::from_secs(660)),
                Err(AuthError::RequestTimeSkewed)
            );
        }
        Err(error) => {
            let error = XksError::from(error);
            assert_eq!(error.name(), ErrorName::AuthenticationFailed);
            assert_eq!(error.status(), 401);
            check_error(&error);
        }
    }
    Some(verdict)
}
