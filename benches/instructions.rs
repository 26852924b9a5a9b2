//! A deterministic workload for instruction counting (`perf/callgrind.sh`): regressions
//! show up as changed instruction counts, free of timing noise.
//!
//! `instructions <scenario> <iterations>` builds the scenario's fixture, runs it
//! `WARMUP` times (caches, lazily registered metrics and log call sites, allocator
//! pools), then `<iterations>` times inside the function `measured`, and exits. It
//! measures nothing itself: `perf/callgrind.sh` runs it under `valgrind
//! --tool=callgrind` counting only inside `measured`, with N and with 2N iterations;
//! the difference is N iterations of the hot path alone, any constant cost cancelled
//! out. A run with 0 iterations, counted whole, is the control (setup and warm-up).
//!
//! Every iteration's success is checked (a count of failures, reported at the end with
//! a non-zero exit), so a scenario that starts failing cannot pass as "faster".
//!
//! Without a scenario (as `cargo bench` runs it) it runs every scenario briefly as a
//! smoke test. Inputs are those of `benches/hot_path.rs` (`benches/common/mod.rs`).

#![allow(missing_docs)]

mod common;

use std::hint::black_box;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use http::{HeaderMap, Method, StatusCode};
use xks_proxy::auth::{Credential, RequestParts, Verifier};
use xks_proxy::logging::{text_subscriber, LogWriter};
use xks_proxy::router::Router;
use xks_proxy::xks::aad::hsm_aad;
use xks_proxy::xks::ApiOperation;
use zeroize::Zeroizing;

use common::{
    aad, api_path, decrypt_body, encrypt_body, sign_request, HandlerFixture, Server,
    ServiceFixture, SignedRequest, ACCESS_KEY_ID, KEY_ID, KEY_MATERIAL, PLAINTEXT, REGION, SECRET,
};

/// Iterations before the measured ones.
const WARMUP: u64 = 200;

/// The scenarios and what one iteration is.
const SCENARIOS: [(&str, &str); 12] = [
    (
        "service-encrypt",
        "one Encrypt (with CDIV) through the HTTP service: hyper HTTP/1.1 client and server in memory, routing, SigV4, handler, metrics, log call (no subscriber)",
    ),
    (
        "service-encrypt-logged",
        "service-encrypt with the proxy's log subscriber installed: the audit line formatted and handed to the log writer",
    ),
    (
        "service-decrypt",
        "one Decrypt through the HTTP service, as service-encrypt",
    ),
    (
        "service-control",
        "the same HTTP/1.1 exchange with a trivial service: hyper's share of service-*",
    ),
    (
        "handler-encrypt",
        "Handler::handle of an Encrypt with CDIV, software backend (encrypt + verifying decrypt)",
    ),
    (
        "handler-decrypt",
        "Handler::handle of a Decrypt, software backend",
    ),
    (
        "sigv4-cached",
        "Verifier::verify of a signed Encrypt request, signing key cached",
    ),
    (
        "sigv4-uncached",
        "Verifier::verify with a cache miss (four dates round-robin, three cached): key derivation included",
    ),
    ("route-hit", "Router::route of an Encrypt path, eight key stores"),
    ("route-404", "Router::route of an unknown prefix (InvalidUriPath)"),
    ("route-405", "Router::route of a GET on an API path (MethodNotAllowed)"),
    (
        "aes-gcm-seal",
        "aws-lc-rs AES-256-GCM seal of 32 bytes with the 103-byte HSM AAD: the floor",
    ),
];

/// One iteration of a scenario; `true` when it succeeded.
type Step = Box<dyn FnMut() -> bool>;

fn verifier() -> Verifier {
    Verifier::new(
        REGION,
        vec![Credential::new(
            ACCESS_KEY_ID,
            Zeroizing::new(SECRET.to_owned()),
        )],
    )
}

fn parts<'a>(path: &'a str, headers: &'a HeaderMap, body: &'a [u8]) -> RequestParts<'a> {
    RequestParts {
        method: "POST",
        path,
        query: None,
        authority: None,
        headers,
        body,
    }
}

/// Installs the subscriber `xks-proxy serve` logs through (text, INFO, no colour),
/// writing to a sink from the log writer's own thread as the proxy writes to stderr.
fn install_log_subscriber() {
    let writer = LogWriter::start(std::io::sink()).expect("log writer thread");
    let filter = tracing_subscriber::EnvFilter::new("info");
    tracing::subscriber::set_global_default(text_subscriber(filter, writer))
        .expect("no other subscriber is installed");
}

/// Builds a scenario's fixture and returns its step.
fn scenario(name: &str) -> Option<Step> {
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600);
    let encrypt_path = api_path(ApiOperation::Encrypt);
    let step: Step = match name {
        "service-encrypt" | "service-encrypt-logged" | "service-decrypt" | "service-control" => {
            if name == "service-encrypt-logged" {
                install_log_subscriber();
            }
            let server = if name == "service-control" {
                Server::Control
            } else {
                Server::Proxy
            };
            let mut service = ServiceFixture::new(server);
            let mut request = SignedRequest::new(&encrypt_path, encrypt_body(true));
            if name == "service-decrypt" {
                // The ciphertext comes from this proxy (its software key is random).
                let sealed = service.send_ok(&request);
                request =
                    SignedRequest::new(&api_path(ApiOperation::Decrypt), decrypt_body(&sealed));
            }
            Box::new(move || service.send(black_box(&request)).0 == StatusCode::OK)
        }
        "handler-encrypt" | "handler-decrypt" => {
            let fixture = HandlerFixture::new();
            let mut operation = ApiOperation::Encrypt;
            let mut body = encrypt_body(true);
            if name == "handler-decrypt" {
                let sealed = fixture.handle_ok(operation, KEY_ID, &body);
                (operation, body) = (ApiOperation::Decrypt, decrypt_body(&sealed));
            }
            Box::new(move || {
                fixture
                    .handle(operation, KEY_ID, black_box(&body))
                    .result
                    .is_ok()
            })
        }
        "sigv4-cached" => {
            let body = encrypt_body(true);
            let headers = sign_request(&encrypt_path, &body, t0);
            let verifier = verifier();
            Box::new(move || {
                verifier
                    .verify(black_box(&parts(&encrypt_path, &headers, &body)), t0)
                    .is_ok()
            })
        }
        "sigv4-uncached" => {
            let body = encrypt_body(true);
            let days: Vec<(SystemTime, HeaderMap)> = (0..4u64)
                .map(|day| {
                    let time = t0 + Duration::from_secs(86_400 * day);
                    (time, sign_request(&encrypt_path, &body, time))
                })
                .collect();
            let verifier = verifier();
            let mut next = 0;
            Box::new(move || {
                let (time, headers) = &days[next % days.len()];
                next += 1;
                verifier
                    .verify(black_box(&parts(&encrypt_path, headers, &body)), *time)
                    .is_ok()
            })
        }
        "route-hit" | "route-404" | "route-405" => {
            let router = Router::new([
                "",
                "/tenant-a",
                "/tenant-b/xks",
                "/example/uri/path/prefix",
                "/eu/prod/orders",
                "/eu/prod/payments",
                "/us/staging/orders",
                "/us/prod/analytics",
            ])
            .expect("valid prefixes");
            let (method, path, expect_ok) = match name {
                "route-hit" => (Method::POST, encrypt_path, true),
                "route-404" => (
                    Method::POST,
                    "/example/uri/path/other/kms/xks/v1/keys/foo/encrypt".to_owned(),
                    false,
                ),
                _ => (Method::GET, encrypt_path, false),
            };
            Box::new(move || {
                router.route(black_box(&method), black_box(&path)).is_ok() == expect_ok
            })
        }
        "aes-gcm-seal" => {
            let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &KEY_MATERIAL).expect("key"));
            let aad = hsm_aad(&aad(), &[]).expect("AAD fits");
            Box::new(move || {
                let mut in_out = PLAINTEXT;
                let sealed = key.seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key([0u8; 12]),
                    Aad::from(black_box(&aad[..])),
                    black_box(&mut in_out[..]),
                );
                black_box(in_out);
                black_box(sealed).is_ok()
            })
        }
        _ => return None,
    };
    Some(step)
}

/// Runs `name`: `WARMUP` steps, then `iterations` steps in [`measured`]; returns the
/// failures.
fn run(name: &str, iterations: u64) -> Option<u64> {
    let mut step = scenario(name)?;
    let mut failures = 0u64;
    for _ in 0..WARMUP {
        failures += u64::from(!step());
    }
    Some(failures + measured(&mut step, iterations))
}

/// The measured loop. `perf/callgrind.sh` counts instructions only inside this function
/// (`--toggle-collect`), so setup and warm-up never enter the count; never inlined, so
/// the symbol exists.
#[inline(never)]
fn measured(step: &mut Step, iterations: u64) -> u64 {
    let mut failures = 0u64;
    for _ in 0..iterations {
        failures += u64::from(!step());
    }
    failures
}

fn usage() {
    eprintln!("usage: instructions <scenario> <iterations>\nscenarios:");
    for (name, what) in SCENARIOS {
        eprintln!("  {name:<16} {what}");
    }
}

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; options are not ours.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    match args.as_slice() {
        [] => {
            // Smoke test: every scenario works.
            for (name, _) in SCENARIOS {
                match run(name, 10) {
                    Some(0) => println!("instructions: {name} ok"),
                    _ => {
                        eprintln!("instructions: {name} failed");
                        return ExitCode::FAILURE;
                    }
                }
            }
            ExitCode::SUCCESS
        }
        [name, iterations] => {
            let Ok(iterations) = iterations.parse::<u64>() else {
                usage();
                return ExitCode::from(2);
            };
            match run(name, iterations) {
                Some(0) => ExitCode::SUCCESS,
                Some(failures) => {
                    eprintln!(
                        "{name}: {failures} of {} iterations failed",
                        WARMUP + iterations
                    );
                    ExitCode::FAILURE
                }
                None => {
                    eprintln!("unknown scenario {name:?}");
                    usage();
                    ExitCode::from(2)
                }
            }
        }
        _ => {
            usage();
            ExitCode::from(2)
        }
    }
}
