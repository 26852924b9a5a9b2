//! SigV4 signing of XKS requests, the way AWS KMS signs them (spec: Appendix A).
//!
//! The proxy never signs; the load generator (`loadtest/`) and tools do. A request is
//! signed over `host` (HTTP/2: the `:authority`) and `x-amz-date`, and optionally
//! `x-amz-content-sha256`; the service is `kms-xks-proxy` and the query string is empty
//! (no XKS API has query parameters).
//!
//! Signing is allocation-light because the load generator signs every request with a
//! fresh date: the canonical request and the string to sign are streamed into SHA-256
//! and HMAC contexts instead of being built as strings, the derived signing key is
//! cached per date (like the verifier's cache), and the only allocation is the
//! Authorization header value handed back to the caller.

use std::fmt;
use std::time::SystemTime;

use aws_lc_rs::{digest, hmac};
use parking_lot::RwLock;
use zeroize::Zeroizing;

use super::sigv4::{derive_signing_key, SERVICE};

/// The only algorithm SigV4 defines.
const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// Signing keys kept: today's, and yesterday's for requests in flight at midnight.
const CACHED_DATES: usize = 2;

/// Which headers to sign besides `host` and `x-amz-date`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SignOptions {
    /// Also send and sign `x-amz-content-sha256` (the hex SHA-256 of the body). KMS does
    /// not; the verifier accepts requests either way.
    pub content_sha256_header: bool,
}

/// What a signature covers. Borrowed, so nothing is copied.
#[derive(Debug, Clone, Copy)]
pub struct SignRequest<'a> {
    /// The method, e.g. `POST`.
    pub method: &'a str,
    /// The path as sent (no query string).
    pub path: &'a str,
    /// The `host` header's value, or the HTTP/2 `:authority` (`server:port`).
    pub host: &'a str,
    /// The body.
    pub body: &'a [u8],
}

/// The headers a signed request must carry.
#[derive(Clone, PartialEq, Eq)]
pub struct Signed {
    amz_date: [u8; 16],
    content_sha256: Option<[u8; 64]>,
    authorization: String,
}

impl Signed {
    /// The `x-amz-date` value (`YYYYMMDD'T'HHMMSS'Z'`).
    pub fn amz_date(&self) -> &str {
        std::str::from_utf8(&self.amz_date).expect("the date is ASCII digits")
    }

    /// The `x-amz-content-sha256` value, when [`SignOptions::content_sha256_header`].
    pub fn content_sha256(&self) -> Option<&str> {
        self.content_sha256
            .as_ref()
            .map(|h| std::str::from_utf8(h).expect("hex is ASCII"))
    }

    /// The `Authorization` value.
    pub fn authorization(&self) -> &str {
        &self.authorization
    }

    /// The `Authorization` value, owned (an `http::HeaderValue` can take it without a
    /// copy).
    pub fn into_authorization(self) -> String {
        self.authorization
    }
}

impl fmt::Debug for Signed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signed")
            .field("amz_date", &self.amz_date())
            .field("authorization", &self.authorization)
            .finish()
    }
}

/// Signs XKS requests with one credential for one region.
///
/// Cloning gives a signer with its own (empty) signing-key cache, so every task of a
/// load generator can have one without sharing a lock.
pub struct Signer {
    access_key_id: String,
    secret: Zeroizing<String>,
    region: String,
    options: SignOptions,
    /// (date `YYYYMMDD`, signing key). aws-lc-rs cleanses the key's memory on drop.
    signing_keys: RwLock<Vec<([u8; 8], hmac::Key)>>,
}

impl Clone for Signer {
    fn clone(&self) -> Self {
        Self::new(
            self.access_key_id.clone(),
            self.secret.clone(),
            self.region.clone(),
            self.options,
        )
    }
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("access_key_id", &self.access_key_id)
            .field("secret", &"<redacted>")
            .field("region", &self.region)
            .field("options", &self.options)
            .finish()
    }
}

impl Signer {
    /// A signer for `region` with this credential.
    pub fn new(
        access_key_id: impl Into<String>,
        secret_access_key: Zeroizing<String>,
        region: impl Into<String>,
        options: SignOptions,
    ) -> Self {
        Self {
            access_key_id: access_key_id.into(),
            secret: secret_access_key,
            region: region.into(),
            options,
            signing_keys: RwLock::new(Vec::with_capacity(CACHED_DATES)),
        }
    }

    /// The access key id.
    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }

    /// The region of the credential scope.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// Signs `request` as sent at `time`.
    pub fn sign(&self, request: &SignRequest<'_>, time: SystemTime) -> Signed {
        let amz_date = format_amz_date(time);
        let date: [u8; 8] = amz_date[..8].try_into().expect("16 bytes hold 8");
        let amz_date_str = std::str::from_utf8(&amz_date).expect("ASCII digits");

        let mut body_hash = [0u8; 64];
        hex_into(
            digest::digest(&digest::SHA256, request.body).as_ref(),
            &mut body_hash,
        );
        let signed_headers = if self.options.content_sha256_header {
            "host;x-amz-content-sha256;x-amz-date"
        } else {
            "host;x-amz-date"
        };

        // Task 1: the canonical request, streamed into its hash.
        let mut canonical = digest::Context::new(&digest::SHA256);
        canonical.update(request.method.as_bytes());
        canonical.update(b"\n");
        canonical_uri(request.path, &mut canonical);
        // An empty canonical query string (spec: Task 1).
        canonical.update(b"\n\nhost:");
        canonical.update(request.host.trim().as_bytes());
        canonical.update(b"\n");
        if self.options.content_sha256_header {
            canonical.update(b"x-amz-content-sha256:");
            canonical.update(&body_hash);
            canonical.update(b"\n");
        }
        canonical.update(b"x-amz-date:");
        canonical.update(&amz_date);
        canonical.update(b"\n\n");
        canonical.update(signed_headers.as_bytes());
        canonical.update(b"\n");
        canonical.update(&body_hash);
        let mut canonical_hash = [0u8; 64];
        hex_into(canonical.finish().as_ref(), &mut canonical_hash);

        // Tasks 2 and 3: the string to sign, streamed into the HMAC.
        let signature = self.with_signing_key(date, |key| {
            let mut context = hmac::Context::with_key(key);
            context.update(ALGORITHM.as_bytes());
            context.update(b"\n");
            context.update(&amz_date);
            context.update(b"\n");
            context.update(&date);
            context.update(b"/");
            context.update(self.region.as_bytes());
            context.update(b"/");
            context.update(SERVICE.as_bytes());
            context.update(b"/aws4_request\n");
            context.update(&canonical_hash);
            context.sign()
        });
        let mut signature_hex = [0u8; 64];
        hex_into(signature.as_ref(), &mut signature_hex);

        let date_str = &amz_date_str[..8];
        let parts = [
            ALGORITHM,
            " Credential=",
            &self.access_key_id,
            "/",
            date_str,
            "/",
            &self.region,
            "/",
            SERVICE,
            "/aws4_request, SignedHeaders=",
            signed_headers,
            ", Signature=",
            std::str::from_utf8(&signature_hex).expect("hex is ASCII"),
        ];
        let mut authorization = String::with_capacity(parts.iter().map(|p| p.len()).sum());
        for part in parts {
            authorization.push_str(part);
        }
        Signed {
            amz_date,
            content_sha256: self.options.content_sha256_header.then_some(body_hash),
            authorization,
        }
    }

    /// Runs `f` with the signing key for `date`, deriving and caching it on a miss.
    fn with_signing_key<T>(&self, date: [u8; 8], f: impl FnOnce(&hmac::Key) -> T) -> T {
        {
            let cache = self.signing_keys.read();
            if let Some((_, key)) = cache.iter().find(|(d, _)| *d == date) {
                return f(key);
            }
        }
        let date_str = std::str::from_utf8(&date).expect("ASCII digits");
        let key = derive_signing_key(&self.secret, date_str, &self.region);
        let result = f(&key);
        let mut cache = self.signing_keys.write();
        if !cache.iter().any(|(d, _)| *d == date) {
            if cache.len() >= CACHED_DATES {
                cache.remove(0);
            }
            cache.push((date, key));
        }
        result
    }
}

/// `YYYYMMDD'T'HHMMSS'Z'` in UTC, without allocating.
fn format_amz_date(time: SystemTime) -> [u8; 16] {
    let t = time::OffsetDateTime::from(time);
    let mut out = *b"00000000T000000Z";
    let mut put = |at: usize, width: usize, mut value: u32| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, 4, u32::try_from(t.year()).unwrap_or(0));
    put(4, 2, u32::from(u8::from(t.month())));
    put(6, 2, u32::from(t.day()));
    put(9, 2, u32::from(t.hour()));
    put(11, 2, u32::from(t.minute()));
    put(13, 2, u32::from(t.second()));
    out
}

/// Lowercase hex of 32 bytes.
fn hex_into(bytes: &[u8], out: &mut [u8; 64]) {
    hex::encode_to_slice(bytes, out).expect("64 hex digits hold 32 bytes");
}

/// SigV4's canonical URI for services other than S3: each path segment is
/// percent-encoded again (RFC 3986 unreserved characters are left alone), so XKS paths
/// (which contain only unreserved characters and `/`) are unchanged.
fn canonical_uri(path: &str, out: &mut digest::Context) {
    if path.is_empty() {
        out.update(b"/");
        return;
    }
    let bytes = path.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let keep = b == b'/' || b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~');
        if !keep {
            out.update(&bytes[start..i]);
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            out.update(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
            start = i + 1;
        }
    }
    out.update(&bytes[start..]);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use aws_credential_types::Credentials;
    use aws_sigv4::http_request::{
        sign, PayloadChecksumKind, SignableBody, SignableRequest, SigningSettings,
    };
    use aws_sigv4::sign::v4;

    use super::*;
    use crate::auth::{AuthError, Credential, RequestParts, Verifier};

    const AKID: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    const SECRET: &str = "FYtE5EFA5FT0mCc3DrGUe2sti527BitkQ0Zr9MO9fvE=";
    const HOST: &str = "xks.example.com:8443";

    fn signer(options: SignOptions) -> Signer {
        Signer::new(AKID, Zeroizing::new(SECRET.into()), "us-east-1", options)
    }

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    /// The Authorization header (and headers) the independent aws-sigv4 crate makes.
    fn reference(path: &str, body: &[u8], time: SystemTime, sha256: bool) -> http::HeaderMap {
        let identity = Credentials::new(AKID, SECRET, None, None, "test").into();
        let mut settings = SigningSettings::default();
        if sha256 {
            settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        }
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region("us-east-1")
            .name(SERVICE)
            .time(time)
            .settings(settings)
            .build()
            .unwrap()
            .into();
        let url = format!("https://{HOST}{path}");
        let signable = SignableRequest::new(
            "POST",
            url.as_str(),
            [("host", HOST)].into_iter(),
            SignableBody::Bytes(body),
        )
        .unwrap();
        let mut request = http::Request::builder()
            .method("POST")
            .uri(url.as_str())
            .header("host", HOST)
            .body(())
            .unwrap();
        let (instructions, _) = sign(signable, &params).unwrap().into_parts();
        instructions.apply_to_request_http1x(&mut request);
        request.headers().clone()
    }

    fn ours(path: &str, body: &[u8], time: SystemTime, options: SignOptions) -> Signed {
        signer(options).sign(
            &SignRequest {
                method: "POST",
                path,
                host: HOST,
                body,
            },
            time,
        )
    }

    fn headers_of(signed: &Signed, with_host: bool) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        if with_host {
            headers.insert("host", HOST.parse().unwrap());
        }
        headers.insert("x-amz-date", signed.amz_date().parse().unwrap());
        if let Some(hash) = signed.content_sha256() {
            headers.insert("x-amz-content-sha256", hash.parse().unwrap());
        }
        headers.insert("authorization", signed.authorization().parse().unwrap());
        headers
    }

    fn verify(
        headers: &http::HeaderMap,
        path: &str,
        body: &[u8],
        now: SystemTime,
    ) -> Result<String, AuthError> {
        let verifier = Verifier::new(
            "us-east-1",
            vec![Credential::new(AKID, Zeroizing::new(SECRET.into()))],
        );
        verifier
            .verify(
                &RequestParts {
                    method: "POST",
                    path,
                    query: None,
                    authority: Some(HOST),
                    headers,
                    body,
                },
                now,
            )
            .map(str::to_owned)
    }

    const CASES: [(&str, &[u8]); 4] = [
        (
            "/example/uri/path/prefix/kms/xks/v1/keys/foo/encrypt",
            br#"{"requestMetadata":{"kmsRequestId":"4112f4d6-db54-4af4-ae30-c55a22a8dfae"}}"#,
        ),
        ("/kms/xks/v1/health", b"{}"),
        ("/p/kms/xks/v1/keys/Key-1.a_b~/decrypt", b""),
        // Not an XKS path, but the canonical URI rules must still match aws-sigv4's.
        ("/a%20b/c%2Bd/e+f:g", b"x"),
    ];

    #[test]
    fn matches_aws_sigv4_and_the_verifier_accepts_it() {
        for sha256 in [false, true] {
            let options = SignOptions {
                content_sha256_header: sha256,
            };
            for (i, (path, body)) in CASES.into_iter().enumerate() {
                // Several dates and times of day, including midnight.
                let time = t0() + Duration::from_secs(86_399 * i as u64 + 7);
                let expected = reference(path, body, time, sha256);
                let signed = ours(path, body, time, options);
                assert_eq!(
                    signed.authorization(),
                    expected["authorization"].to_str().unwrap(),
                    "{path}"
                );
                assert_eq!(signed.amz_date(), expected["x-amz-date"].to_str().unwrap());
                assert_eq!(
                    signed.content_sha256(),
                    expected
                        .get("x-amz-content-sha256")
                        .map(|v| v.to_str().unwrap())
                );
                if !path.contains('%') {
                    assert_eq!(
                        verify(&headers_of(&signed, true), path, body, time).unwrap(),
                        AKID
                    );
                }
            }
        }
    }

    #[test]
    fn http2_requests_sign_the_authority() {
        let (path, body) = CASES[0];
        let signed = ours(path, body, t0(), SignOptions::default());
        // No Host header: the verifier uses the :authority (spec: Task 1).
        assert_eq!(
            verify(&headers_of(&signed, false), path, body, t0()).unwrap(),
            AKID
        );
    }

    #[test]
    fn the_verifier_refuses_what_was_not_signed() {
        let (path, body) = CASES[0];
        let signed = ours(path, body, t0(), SignOptions::default());
        let headers = headers_of(&signed, true);
        assert_eq!(
            verify(&headers, path, b"{}", t0()),
            Err(AuthError::SignatureMismatch)
        );
        assert_eq!(
            verify(&headers, "/kms/xks/v1/keys/bar/encrypt", body, t0()),
            Err(AuthError::SignatureMismatch)
        );
        assert_eq!(
            verify(&headers, path, body, t0() + Duration::from_secs(301)),
            Err(AuthError::RequestTimeSkewed)
        );
    }

    #[test]
    fn cached_keys_give_the_same_signatures_across_dates() {
        let s = signer(SignOptions::default());
        let (path, body) = CASES[0];
        let request = SignRequest {
            method: "POST",
            path,
            host: HOST,
            body,
        };
        for day in 0..5u64 {
            for second in [0u64, 1, 86_399] {
                let time = t0() + Duration::from_secs(86_400 * day + second);
                let cached = s.sign(&request, time);
                let fresh = signer(SignOptions::default()).sign(&request, time);
                assert_eq!(cached, fresh);
                assert_eq!(
                    cached.authorization(),
                    reference(path, body, time, false)["authorization"]
                        .to_str()
                        .unwrap()
                );
            }
        }
        assert!(s.signing_keys.read().len() <= CACHED_DATES);
        // A clone signs the same way with its own cache.
        let clone = s.clone();
        assert_eq!(clone.sign(&request, t0()), s.sign(&request, t0()));
    }

    #[test]
    fn dates_are_formatted_like_sigv4() {
        assert_eq!(&format_amz_date(t0()), b"20231114T221320Z");
        assert_eq!(
            &format_amz_date(SystemTime::UNIX_EPOCH),
            b"19700101T000000Z"
        );
    }

    #[test]
    fn debug_output_hides_the_secret() {
        let text = format!("{:?}", signer(SignOptions::default()));
        assert!(!text.contains(SECRET), "{text}");
    }
}
