//! The proxy's hot path, piece by piece, so its own overhead can be told apart from the
//! HSM's. Inputs are the spec's examples: its `requestMetadata`, a 32-byte plaintext
//! and a 100-byte AAD (see `benches/common/mod.rs`).
//!
//! | group | what one iteration is |
//! | --- | --- |
//! | `sigv4` | `Verifier::verify` of a signed Encrypt request (signed in setup by the independent `aws-sigv4` crate); `cached`: the signing key is in the cache; `cached_varied`: the same, over 1024 requests signed at different seconds (every signature different, as KMS sends them); `uncached`: four requests signed on four days, verified in turn, so every call misses the three-date cache and derives the key (four HMACs) |
//! | `router` | `Router::route` with eight key stores: a hit, a 404 (unknown prefix) and a 405 (GET) |
//! | `parse_validate` | `Handler::handle` for a key outside the key store: JSON parsing, `requestMetadata` and algorithm checks, then KeyNotFound — the request parsing `src/xks/` does before Base64 decoding and any HSM call (parsing is only reachable through the handler) |
//! | `aad` | the spec's HSM AAD encoding (100-byte AAD) and the CDIV over it |
//! | `handler` | a whole `Handler::handle` with the software backend: parse, validate, Base64, AAD, AES-GCM, CDIV (Encrypt with CDIV also decrypts to prove the CDIV) and the JSON response |
//! | `service` | a whole request through `server::service::serve_request` (routing, body read, SigV4, handler, metrics, log line) over an in-memory HTTP/1.1 connection — hyper client and server included, no TLS; `control` is the same connection with a trivial service |
//! | `floor` | aws-lc-rs AES-256-GCM seal of 32 bytes, and the software backend's encrypt (random IV + seal), for scale |
//!
//! Run: `cargo bench --bench hot_path` (add `-- --quick` for a short run, or a filter
//! such as `-- sigv4`). Deterministic instruction counts of the same paths:
//! `perf/callgrind.sh`.

#![allow(missing_docs)]

mod common;

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use criterion::{criterion_group, criterion_main, Criterion};
use http::Method;
use xks_proxy::auth::{Credential, RequestParts, Verifier};
use xks_proxy::router::Router;
use xks_proxy::xks::aad::{cdiv, hsm_aad};
use xks_proxy::xks::{ApiOperation, ErrorName};
use zeroize::Zeroizing;

use common::{
    aad, api_path, decrypt_body, encrypt_body, health_body, metadata_body, sign_request,
    HandlerFixture, Server, ServiceFixture, SignedRequest, ACCESS_KEY_ID, KEY_ID, KEY_MATERIAL,
    PLAINTEXT, REGION, SECRET, UNKNOWN_KEY_ID,
};

/// 2026-01-01T00:00:00Z: the signing and verifying time of the SigV4 benches.
const T0_UNIX: u64 = 1_767_225_600;

fn new_verifier() -> Verifier {
    Verifier::new(
        REGION,
        vec![Credential::new(
            ACCESS_KEY_ID,
            Zeroizing::new(SECRET.to_owned()),
        )],
    )
}

fn request_parts<'a>(
    path: &'a str,
    headers: &'a http::HeaderMap,
    body: &'a [u8],
) -> RequestParts<'a> {
    RequestParts {
        method: "POST",
        path,
        query: None,
        authority: None,
        headers,
        body,
    }
}

fn bench_sigv4(c: &mut Criterion) {
    let path = api_path(ApiOperation::Encrypt);
    let body = encrypt_body(true);
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(T0_UNIX);
    let headers = sign_request(&path, &body, t0);
    let verifier = new_verifier();
    let parts = request_parts(&path, &headers, &body);
    assert_eq!(verifier.verify(&parts, t0), Ok(ACCESS_KEY_ID));

    // One more date than the verifier caches (three), verified round-robin: each date
    // was evicted by the time it comes round again, so every verify derives its key.
    let days: Vec<(SystemTime, http::HeaderMap)> = (0..4u64)
        .map(|day| {
            let time = t0 + Duration::from_secs(86_400 * day);
            (time, sign_request(&path, &body, time))
        })
        .collect();
    let uncached = new_verifier();
    for (time, headers) in &days {
        assert!(uncached
            .verify(&request_parts(&path, headers, &body), *time)
            .is_ok());
    }

    // As KMS sends them: every request signed at another second, so no two
    // signatures are alike and the branch predictor cannot learn their digits (the
    // same request over and over lets it).
    let varied: Vec<(SystemTime, http::HeaderMap)> = (0..1024u64)
        .map(|second| {
            let time = t0 + Duration::from_secs(second);
            (time, sign_request(&path, &body, time))
        })
        .collect();
    for (time, headers) in &varied {
        assert_eq!(
            verifier.verify(&request_parts(&path, headers, &body), *time),
            Ok(ACCESS_KEY_ID)
        );
    }

    let mut group = c.benchmark_group("sigv4");
    group.bench_function("verify_cached", |b| {
        b.iter(|| verifier.verify(black_box(&parts), black_box(t0)).is_ok());
    });
    let mut next = 0;
    group.bench_function("verify_cached_varied", |b| {
        b.iter(|| {
            let (time, headers) = &varied[next % varied.len()];
            next += 1;
            verifier
                .verify(black_box(&request_parts(&path, headers, &body)), *time)
                .is_ok()
        });
    });
    let mut next = 0;
    group.bench_function("verify_uncached", |b| {
        b.iter(|| {
            let (time, headers) = &days[next % days.len()];
            next += 1;
            uncached
                .verify(black_box(&request_parts(&path, headers, &body)), *time)
                .is_ok()
        });
    });
    group.finish();
}

/// Eight key stores, as a proxy serving several tenants might have.
const ROUTER_PREFIXES: [&str; 8] = [
    "",
    "/tenant-a",
    "/tenant-b/xks",
    "/example/uri/path/prefix",
    "/eu/prod/orders",
    "/eu/prod/payments",
    "/us/staging/orders",
    "/us/prod/analytics",
];

fn bench_router(c: &mut Criterion) {
    let router = Router::new(ROUTER_PREFIXES).expect("valid prefixes");
    let hit = api_path(ApiOperation::Encrypt);
    let unknown = "/example/uri/path/other/kms/xks/v1/keys/foo/encrypt";
    assert_eq!(
        router.route(&Method::POST, &hit).map(|m| m.key_store),
        Ok(3)
    );
    assert_eq!(
        router.route(&Method::POST, unknown).map_err(|e| e.name()),
        Err(ErrorName::InvalidUriPath)
    );
    assert_eq!(
        router.route(&Method::GET, &hit).map_err(|e| e.name()),
        Err(ErrorName::MethodNotAllowed)
    );

    let mut group = c.benchmark_group("router");
    group.bench_function("hit", |b| {
        b.iter(|| {
            router
                .route(black_box(&Method::POST), black_box(&hit))
                .is_ok()
        });
    });
    group.bench_function("not_found_404", |b| {
        b.iter(|| {
            router
                .route(black_box(&Method::POST), black_box(unknown))
                .is_ok()
        });
    });
    group.bench_function("method_not_allowed_405", |b| {
        b.iter(|| {
            router
                .route(black_box(&Method::GET), black_box(&hit))
                .is_ok()
        });
    });
    group.finish();
}

fn bench_parse_validate(c: &mut Criterion) {
    let fixture = HandlerFixture::new();
    let encrypt = encrypt_body(true);
    let sealed = fixture.handle_ok(ApiOperation::Encrypt, KEY_ID, &encrypt);
    let decrypt = decrypt_body(&sealed);
    let metadata = metadata_body();
    let cases = [
        ("encrypt", ApiOperation::Encrypt, &encrypt),
        ("decrypt", ApiOperation::Decrypt, &decrypt),
        ("get_key_metadata", ApiOperation::GetKeyMetadata, &metadata),
    ];

    let mut group = c.benchmark_group("parse_validate");
    for (name, operation, body) in cases {
        let outcome = fixture.handle(operation, UNKNOWN_KEY_ID, body);
        assert_eq!(
            outcome.result.map_err(|e| e.name()),
            Err(ErrorName::KeyNotFound),
            "{name}"
        );
        group.bench_function(format!("{name}_until_key_lookup"), |b| {
            b.iter(|| fixture.handle(operation, UNKNOWN_KEY_ID, black_box(body)));
        });
    }
    group.finish();
}

fn bench_aad(c: &mut Criterion) {
    let aad = aad();
    let metadata = [7u8; 20];
    let iv = [1u8; 12];
    let ciphertext = [2u8; 32];
    let tag = [3u8; 16];
    let mut group = c.benchmark_group("aad");
    group.bench_function("hsm_aad_100B", |b| {
        b.iter(|| hsm_aad(black_box(&aad), black_box(&[])));
    });
    group.bench_function("hsm_aad_100B_metadata_20B", |b| {
        b.iter(|| hsm_aad(black_box(&aad), black_box(&metadata)));
    });
    group.bench_function("cdiv_100B_aad_32B_ciphertext", |b| {
        b.iter(|| {
            cdiv(
                black_box(&aad),
                black_box(&[]),
                black_box(&iv),
                black_box(&ciphertext),
                black_box(&tag),
            )
        });
    });
    group.finish();
}

fn bench_handler(c: &mut Criterion) {
    let fixture = HandlerFixture::new();
    let encrypt_cdiv = encrypt_body(true);
    let encrypt = encrypt_body(false);
    let sealed = fixture.handle_ok(ApiOperation::Encrypt, KEY_ID, &encrypt_cdiv);
    let decrypt = decrypt_body(&sealed);
    let metadata = metadata_body();
    let health = health_body();
    let cases = [
        ("encrypt_cdiv", ApiOperation::Encrypt, KEY_ID, &encrypt_cdiv),
        ("encrypt", ApiOperation::Encrypt, KEY_ID, &encrypt),
        ("decrypt", ApiOperation::Decrypt, KEY_ID, &decrypt),
        (
            "get_key_metadata",
            ApiOperation::GetKeyMetadata,
            KEY_ID,
            &metadata,
        ),
        (
            "get_health_status",
            ApiOperation::GetHealthStatus,
            "",
            &health,
        ),
    ];

    let mut group = c.benchmark_group("handler");
    for (name, operation, key_id, body) in cases {
        let _ = fixture.handle_ok(operation, key_id, body);
        group.bench_function(name, |b| {
            b.iter(|| fixture.handle(operation, key_id, black_box(body)));
        });
    }
    group.finish();
}

fn bench_service(c: &mut Criterion) {
    let mut proxy = ServiceFixture::new(Server::Proxy);
    let encrypt = SignedRequest::new(&api_path(ApiOperation::Encrypt), encrypt_body(true));
    let sealed = proxy.send_ok(&encrypt);
    let decrypt = SignedRequest::new(&api_path(ApiOperation::Decrypt), decrypt_body(&sealed));
    let _ = proxy.send_ok(&decrypt);
    let mut control = ServiceFixture::new(Server::Control);
    let _ = control.send_ok(&encrypt);

    let mut group = c.benchmark_group("service");
    group.bench_function("encrypt_cdiv", |b| b.iter(|| proxy.send(&encrypt)));
    group.bench_function("decrypt", |b| b.iter(|| proxy.send(&decrypt)));
    group.bench_function("control_http1_only", |b| b.iter(|| control.send(&encrypt)));
    group.finish();
}

fn bench_floor(c: &mut Criterion) {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &KEY_MATERIAL).expect("32-byte key"));
    let aad = hsm_aad(&aad(), &[]).expect("AAD fits");
    let fixture = HandlerFixture::new();
    let xks_proxy::hsm::Backend::Single(xks_proxy::hsm::Ekm::Software(software)) =
        &*fixture.backend
    else {
        unreachable!("the fixture's backend is the software one")
    };

    let mut group = c.benchmark_group("floor");
    group.bench_function("aes_256_gcm_seal_32B", |b| {
        b.iter(|| {
            let mut in_out = PLAINTEXT;
            let tag = key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key([0u8; 12]),
                    Aad::from(black_box(&aad[..])),
                    black_box(&mut in_out[..]),
                )
                .expect("seal");
            (in_out, tag)
        });
    });
    group.bench_function("software_backend_encrypt_32B", |b| {
        b.iter(|| {
            software
                .encrypt(KEY_ID, black_box(&PLAINTEXT), black_box(&aad))
                .expect("encrypt")
        });
    });
    group.finish();
}

criterion_group!(
    benches,
    bench_sigv4,
    bench_router,
    bench_parse_validate,
    bench_aad,
    bench_handler,
    bench_service,
    bench_floor
);
criterion_main!(benches);
