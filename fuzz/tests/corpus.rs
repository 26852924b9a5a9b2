//! Replays every seed of `corpus/<target>/` through the target's body on stable Rust, so
//! CI checks the seeds (and any crash input promoted to a seed) without libFuzzer. Seeds
//! named below must also keep reaching the outcome they were written for, so the corpus
//! cannot silently stop covering the paths it was made for.

use std::fs;
use std::path::{Path, PathBuf};

use xks_proxy::auth::AuthError;
use xks_proxy::xks::{ApiOperation, ErrorName};

fn seeds(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    files
}

/// Runs every seed through `body`; checks the verdicts `expected` names (by file name).
fn replay<T: PartialEq + std::fmt::Debug>(
    target: &str,
    body: fn(&[u8]) -> Option<T>,
    expected: &[(&str, T)],
) {
    let files = seeds(target);
    for path in &files {
        let data = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // Printed only when the test fails: names the input that panicked.
        eprintln!("replaying {}", path.display());
        let verdict = body(&data);
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some((_, want)) = expected.iter().find(|(seed, _)| *seed == name) {
            assert_eq!(verdict.as_ref(), Some(want), "{}", path.display());
        }
    }
    for (seed, _) in expected {
        assert!(
            files.iter().any(|path| path.ends_with(seed)),
            "seed {target}/{seed} is missing"
        );
    }
}

#[test]
fn router_corpus() {
    use ApiOperation::{Decrypt, Encrypt, GetHealthStatus, GetKeyMetadata};
    replay(
        "router",
        xks_proxy_fuzz::router_verdict,
        &[
            ("post-health-root", Ok(GetHealthStatus)),
            ("post-encrypt-ab", Ok(Encrypt)),
            ("post-decrypt-long-prefix", Ok(Decrypt)),
            ("post-metadata-uuid", Ok(GetKeyMetadata)),
            ("post-key-id-128", Ok(Encrypt)),
            ("get-metadata-405", Err(ErrorName::MethodNotAllowed)),
            ("head-health-405", Err(ErrorName::MethodNotAllowed)),
            ("post-empty-segment", Err(ErrorName::InvalidUriPath)),
            ("post-key-id-129", Err(ErrorName::InvalidUriPath)),
            ("post-percent-key", Err(ErrorName::InvalidUriPath)),
            ("post-trailing-slash", Err(ErrorName::InvalidUriPath)),
            ("post-non-utf8", Err(ErrorName::InvalidUriPath)),
        ],
    );
}

#[test]
fn request_corpus() {
    replay(
        "request",
        xks_proxy_fuzz::request_verdict,
        &[
            ("health-spec", Ok(())),
            ("health-empty-metadata", Err(ErrorName::Validation)),
            ("metadata-foo-spec", Ok(())),
            ("metadata-unknown-key", Err(ErrorName::KeyNotFound)),
            ("encrypt-foo-spec-cdiv", Ok(())),
            (
                "encrypt-enc-cdiv-needs-decrypt",
                Err(ErrorName::InvalidKeyUsage),
            ),
            ("encrypt-enc-curl", Ok(())),
            ("encrypt-foo-empty-unknown-fields", Ok(())),
            ("encrypt-bad-base64", Err(ErrorName::Validation)),
            ("encrypt-wrong-type", Err(ErrorName::Validation)),
            ("decrypt-foo-valid", Ok(())),
            (
                "decrypt-foo-spec-not-ours",
                Err(ErrorName::InvalidCiphertext),
            ),
            ("decrypt-foo-iv16", Err(ErrorName::InvalidCiphertext)),
            ("decrypt-enc-not-allowed", Err(ErrorName::InvalidKeyUsage)),
            ("decrypt-not-json", Err(ErrorName::Validation)),
            // Found by fuzzing: invalid UTF-8 in an unknown (ignored) field.
            (
                "encrypt-invalid-utf8-unknown-field",
                Err(ErrorName::Validation),
            ),
        ],
    );
}

#[test]
fn sigv4_corpus() {
    replay(
        "sigv4",
        xks_proxy_fuzz::sigv4_verdict,
        &[
            ("valid-health", Ok(())),
            ("valid-encrypt-content-sha256", Ok(())),
            ("valid-http2-authority", Ok(())),
            ("valid-query", Ok(())),
            ("valid-skew-300s", Ok(())),
            ("skew-301s", Err(AuthError::RequestTimeSkewed)),
            ("get-method", Err(AuthError::SignatureMismatch)),
            ("lookalike-signature", Err(AuthError::SignatureMismatch)),
            ("spec-example-header", Err(AuthError::WrongRegion)),
            (
                "duplicate-authorization",
                Err(AuthError::MalformedAuthorization("more than one header")),
            ),
            ("missing-date", Err(AuthError::MissingDate)),
            ("malformed-date", Err(AuthError::MalformedDate)),
            (
                "unsorted-signed-headers",
                Err(AuthError::MalformedAuthorization(
                    "SignedHeaders must be sorted and unique",
                )),
            ),
            ("wrong-service", Err(AuthError::WrongService)),
            (
                "non-utf8-authorization",
                Err(AuthError::MalformedAuthorization("not text")),
            ),
        ],
    );
}

/// The seeds stay small, as libFuzzer seeds should.
#[test]
fn seeds_are_small() {
    for target in ["router", "request", "sigv4"] {
        for path in seeds(target) {
            let len = fs::metadata(&path).expect("metadata").len();
            assert!(len < 4096, "{} is {len} bytes", path.display());
        }
    }
}
