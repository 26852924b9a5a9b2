//! Recovery without restart, on a real SoftHSM2 token: PKCS#11 errors of each class
//! injected at the call boundary (the module underneath stays real), injected latency,
//! a real outage (the module finalized under the proxy and the token taken away, then
//! restored), the GCM IV conventions of HSMs that choose their own IV, and a PIN the
//! token refuses while several sessions log in.
//!
//! Its own test binary: the module is process-wide state, and these tests finalize it.
//! They run one at a time on one quickstart token.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use cryptoki::context::{Function, Pkcs11};
use cryptoki::error::RvError;
use xks_proxy::health::HealthMonitor;
use xks_proxy::hsm::faults::{FaultInjector, VendorIv};
use xks_proxy::hsm::pkcs11::{IvSource, Pkcs11Backend, Pkcs11Settings, TokenSelector, IV_BATCH};
use xks_proxy::hsm::{Backend, Ekm, EkmHealth, HsmError, Sealed};
use xks_proxy::metrics::Metrics;

const AAD: &[u8] = b"recovery-test";
/// Far longer than any answer the tests expect: a request that waits for it hung.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The one token of this binary, and the lock that runs its tests one at a time.
fn setup() -> &'static (common::Setup, tokio::sync::Mutex<()>) {
    static SETUP: OnceLock<(common::Setup, tokio::sync::Mutex<()>)> = OnceLock::new();
    SETUP.get_or_init(|| {
        let setup = common::Setup::new();
        setup.module_environment();
        (setup, tokio::sync::Mutex::new(()))
    })
}

fn settings(iv_source: IvSource, sessions: usize, faults: &Arc<FaultInjector>) -> Pkcs11Settings {
    let (setup, _) = setup();
    let pin = std::fs::read_to_string(setup.path("hsm-pin")).unwrap();
    Pkcs11Settings {
        module: common::module_path(),
        token: TokenSelector::Label("xks-quickstart".into()),
        pin: pin.trim().to_owned().into(),
        sessions,
        queue_depth: 16,
        iv_source,
        session_key_copies: true,
        key_refresh: Duration::from_secs(60),
        call_timeout: CALL_TIMEOUT,
        read_write_sessions: false,
        trace: false,
        max_replacement_sessions: sessions,
        faults: Some(Arc::clone(faults)),
    }
}

fn connect(iv_source: IvSource) -> (Arc<Backend>, Arc<FaultInjector>) {
    connect_sessions(iv_source, 2)
}

fn connect_sessions(iv_source: IvSource, sessions: usize) -> (Arc<Backend>, Arc<FaultInjector>) {
    let faults = Arc::new(FaultInjector::new());
    let backend = Pkcs11Backend::connect(
        &settings(iv_source, sessions, &faults),
        Metrics::new(Duration::from_millis(100)),
    )
    .unwrap();
    (Arc::new(Ekm::Pkcs11(backend).into()), faults)
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

async fn encrypt(backend: &Backend, plaintext: &[u8]) -> Result<Sealed, HsmError> {
    backend
        .encrypt("foo", plaintext.to_vec().into(), AAD.to_vec(), deadline())
        .await
}

/// Encrypts and decrypts, asserting the round trip.
async fn round_trip(backend: &Backend) -> Result<Sealed, HsmError> {
    let sealed = encrypt(backend, b"attack at dawn").await?;
    let plaintext = backend
        .decrypt("foo", sealed.clone(), AAD.to_vec(), deadline())
        .await?;
    assert_eq!(plaintext.as_slice(), b"attack at dawn");
    Ok(sealed)
}

fn generation(backend: &Backend) -> u64 {
    match backend {
        Backend::Single(Ekm::Pkcs11(b)) => b.module_generation(),
        _ => unreachable!(),
    }
}

/// Retries `round_trip` until it succeeds; returns how long that took.
async fn until_served(backend: &Backend, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        match round_trip(backend).await {
            Ok(_) => return started.elapsed(),
            Err(e) => assert!(
                started.elapsed() < within,
                "not served again within {within:?}: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_error_class_is_handled_as_its_class_requires() {
    let _one = setup().1.lock().await;
    let (backend, faults) = connect(IvSource::HsmRandom);
    round_trip(&backend).await.unwrap();

    // A stale key handle: the key is looked up again and the request succeeds.
    faults.fail(RvError::KeyHandleInvalid, Some(Function::Encrypt), Some(1));
    round_trip(&backend).await.unwrap();

    // A lost session: another one is opened and logged in; the request succeeds.
    faults.fail(
        RvError::SessionHandleInvalid,
        Some(Function::Encrypt),
        Some(1),
    );
    round_trip(&backend).await.unwrap();
    faults.fail(RvError::UserNotLoggedIn, Some(Function::Decrypt), Some(1));
    round_trip(&backend).await.unwrap();

    // A lost device: the module is finalized and initialized again (a new
    // generation), the token found again, and the request succeeds.
    for rv in [
        RvError::DeviceRemoved,
        RvError::DeviceError,
        RvError::TokenNotPresent,
        RvError::CryptokiNotInitialized,
    ] {
        let before = generation(&backend);
        faults.fail(rv, Some(Function::Encrypt), Some(1));
        round_trip(&backend)
            .await
            .unwrap_or_else(|e| panic!("{rv:?}: {e}"));
        assert_eq!(generation(&backend), before + 1, "{rv:?}");
    }

    // The request's own fault: answered as it is, nothing retried or rebuilt.
    let before = (generation(&backend), faults.injected());
    faults.fail(
        RvError::EncryptedDataInvalid,
        Some(Function::Decrypt),
        Some(1),
    );
    let sealed = encrypt(&backend, b"x").await.unwrap();
    let refused = backend
        .decrypt("foo", sealed, AAD.to_vec(), deadline())
        .await;
    assert_eq!(refused, Err(HsmError::InvalidCiphertext));
    assert_eq!(
        (generation(&backend), faults.injected()),
        (before.0, before.1 + 1)
    );

    // Errors that persist after one recovery are answered, not retried forever.
    faults.fail(RvError::SessionHandleInvalid, Some(Function::Encrypt), None);
    assert!(matches!(
        encrypt(&backend, b"x").await,
        Err(HsmError::Pkcs11 { .. })
    ));
    faults.clear();
    round_trip(&backend).await.unwrap();
}

/// The session copy of a key lives in the session that made it. With one session, the
/// session closed after CKR_USER_NOT_LOGGED_IN is the one that holds the copy: the
/// retry in the new session must not use the dead copy's handle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_session_takes_its_key_copies_with_it() {
    let _one = setup().1.lock().await;
    let (backend, faults) = connect_sessions(IvSource::HsmRandom, 1);
    let sealed = round_trip(&backend).await.unwrap();
    for function in [Function::Decrypt, Function::Encrypt] {
        faults.fail(RvError::UserNotLoggedIn, Some(function), Some(1));
        let injected = faults.injected();
        round_trip(&backend)
            .await
            .unwrap_or_else(|e| panic!("after {function:?} lost its login: {e}"));
        assert_eq!(faults.injected(), injected + 1, "{function:?}");
    }
    // What was sealed under the first copy still opens under the new one.
    let plaintext = backend
        .decrypt("foo", sealed, AAD.to_vec(), deadline())
        .await
        .unwrap();
    assert_eq!(plaintext.as_slice(), b"attack at dawn");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_that_stays_down_fails_fast_and_health_says_so_until_it_returns() {
    let _one = setup().1.lock().await;
    let (backend, faults) = connect(IvSource::HsmRandom);
    let monitor = HealthMonitor::new(
        Arc::clone(&backend),
        Some("xks-health-check".into()),
        Duration::from_secs(1),
        Duration::from_secs(2),
        Metrics::new(Duration::from_millis(100)),
    );
    assert_eq!(monitor.check().await, EkmHealth::Active);

    // Every PKCS#11 call fails as if the appliance were unplugged, C_Initialize too.
    faults.fail(RvError::DeviceRemoved, None, None);
    for _ in 0..20 {
        let started = Instant::now();
        let result = round_trip(&backend).await;
        assert!(
            matches!(
                result,
                Err(HsmError::Unavailable(_) | HsmError::Pkcs11 { .. })
            ),
            "{result:?}"
        );
        assert!(started.elapsed() < CALL_TIMEOUT / 10, "a request hung");
    }
    assert_eq!(monitor.check().await, EkmHealth::Unavailable);
    match &*backend {
        Backend::Single(Ekm::Pkcs11(b)) => assert!(!b.in_service()),
        _ => unreachable!(),
    }

    // The device comes back: service resumes by itself (the backoff is at most 4 s).
    faults.clear();
    until_served(&backend, Duration::from_secs(10)).await;
    assert_eq!(monitor.check().await, EkmHealth::Active);
}

/// GetKeyMetadata reads the token afresh but makes no session copy of the key: each
/// copy lives until its retire grace is over, and a steady stream of GetKeyMetadata
/// used to pile thousands of them into SoftHSM2, slowing every search with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_metadata_reads_the_token_without_copying_the_key() {
    let _one = setup().1.lock().await;
    let (backend, faults) = connect(IvSource::HsmRandom);
    round_trip(&backend).await.unwrap();
    // Count the calls that copy a key and those that search the token.
    faults.set_function_latency(Function::CopyObject, Some(Duration::from_micros(1)));
    let copies = faults.delayed();
    for _ in 0..20 {
        let metadata = backend.key_metadata("foo", deadline()).await.unwrap();
        assert!(metadata.enabled && metadata.is_aes_256(), "{metadata:?}");
    }
    assert_eq!(faults.delayed(), copies, "GetKeyMetadata copied the key");
    faults.clear();
    faults.set_function_latency(Function::FindObjects, Some(Duration::from_micros(1)));
    let searches = faults.delayed();
    backend.key_metadata("foo", deadline()).await.unwrap();
    assert!(
        faults.delayed() > searches,
        "GetKeyMetadata did not read the token"
    );
    // The cached copy still serves: no new search for Encrypt or Decrypt.
    let searches = faults.delayed();
    round_trip(&backend).await.unwrap();
    assert_eq!(faults.delayed(), searches, "the cached key was dropped");
    faults.clear();
    assert_eq!(
        backend.key_metadata("no-such-key", deadline()).await,
        Err(HsmError::KeyNotFound)
    );
}

/// A cached key due to be re-read is re-read by one session; the others go on with the
/// entry they have instead of queueing behind the lookup (on SoftHSM2 a lookup and
/// copy take a millisecond and more, every `key_refresh`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_session_rereads_a_key_while_the_others_serve() {
    let _one = setup().1.lock().await;
    let faults = Arc::new(FaultInjector::new());
    let mut settings = settings(IvSource::HsmRandom, 2, &faults);
    settings.key_refresh = Duration::from_millis(500);
    let backend = Arc::new(Backend::from(Ekm::Pkcs11(
        Pkcs11Backend::connect(&settings, Metrics::new(Duration::from_millis(100))).unwrap(),
    )));
    round_trip(&backend).await.unwrap();
    // Past key_refresh (but within twice it): the next use re-reads the key, slowly.
    tokio::time::sleep(Duration::from_millis(600)).await;
    faults.set_function_latency(Function::FindObjects, Some(Duration::from_millis(1500)));
    let rereading = {
        let backend = Arc::clone(&backend);
        tokio::spawn(async move { encrypt(&backend, b"first").await })
    };
    while faults.delayed() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The other session serves from the entry it has.
    round_trip(&backend).await.unwrap();
    assert!(
        !rereading.is_finished(),
        "the second request waited for the first one's key lookup"
    );
    rereading.await.unwrap().unwrap();
    faults.clear();
    // Once re-read, the key is fresh again: no more lookups.
    let delayed = faults.delayed();
    round_trip(&backend).await.unwrap();
    assert_eq!(faults.delayed(), delayed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_hsm_answers_503_in_the_call_timeout_and_recovers() {
    let _one = setup().1.lock().await;
    let faults = Arc::new(FaultInjector::new());
    let mut settings = settings(IvSource::HsmRandom, 2, &faults);
    settings.call_timeout = Duration::from_millis(100);
    let backend = Backend::from(Ekm::Pkcs11(
        Pkcs11Backend::connect(&settings, Metrics::new(Duration::from_millis(100))).unwrap(),
    ));
    round_trip(&backend).await.unwrap();
    faults.set_latency(Some(Duration::from_millis(400)));
    let started = Instant::now();
    assert_eq!(encrypt(&backend, b"x").await, Err(HsmError::Timeout));
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "waited for the HSM"
    );
    faults.set_latency(None);
    until_served(&backend, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_outage_module_finalized_and_token_gone_then_restored() {
    let _one = setup().1.lock().await;
    let (backend, _faults) = connect(IvSource::HsmRandom);
    round_trip(&backend).await.unwrap();

    // The appliance restarts without its token: the token's store goes away and
    // the module is finalized under the proxy (same library, same process state).
    let (setup, _) = setup();
    let token_dir = setup.token_store();
    let away = setup.path("token-away");
    std::fs::rename(&token_dir, &away).unwrap();
    Pkcs11::new(common::module_path())
        .unwrap()
        .finalize()
        .unwrap();

    for _ in 0..20 {
        let started = Instant::now();
        let result = round_trip(&backend).await;
        assert!(
            matches!(result, Err(HsmError::Unavailable(_))),
            "{result:?}"
        );
        assert!(started.elapsed() < CALL_TIMEOUT / 10, "a request hung");
    }
    match &*backend {
        Backend::Single(Ekm::Pkcs11(b)) => assert!(!b.in_service()),
        _ => unreachable!(),
    }

    // The token returns: the proxy finds it at its next attempt, no restart.
    std::fs::rename(&away, &token_dir).unwrap();
    until_served(&backend, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_iv_convention_yields_iv_ciphertext_and_tag_apart() {
    let _one = setup().1.lock().await;
    for (iv_source, vendor, iv_len) in [
        (IvSource::HsmRandom, None, 12),
        (IvSource::ProxyRandom, None, 12),
        (
            IvSource::HsmGenerated,
            Some(VendorIv::FillsZeroedBuffer),
            12,
        ),
        (IvSource::HsmAppended, Some(VendorIv::AppendsAfterTag), 16),
    ] {
        let (backend, faults) = connect(iv_source);
        faults.set_vendor_iv(vendor);
        let plaintext = b"thirty-two bytes of plaintext!!!";
        let sealed = encrypt(&backend, plaintext).await.unwrap();
        assert_eq!(sealed.iv.len(), iv_len, "{iv_source:?}");
        assert_eq!(sealed.ciphertext.len(), plaintext.len(), "{iv_source:?}");
        assert_ne!(sealed.ciphertext, plaintext, "{iv_source:?}");
        // Decrypt sends the IV back in CK_GCM_PARAMS, 12 or 16 bytes alike.
        let opened = backend
            .decrypt("foo", sealed.clone(), AAD.to_vec(), deadline())
            .await
            .unwrap();
        assert_eq!(opened.as_slice(), plaintext, "{iv_source:?}");
        // The separation is right, not merely consistent: a flipped tag bit fails.
        let mut tampered = sealed.clone();
        tampered.tag[0] ^= 1;
        assert_eq!(
            backend
                .decrypt("foo", tampered, AAD.to_vec(), deadline())
                .await,
            Err(HsmError::InvalidCiphertext),
            "{iv_source:?}"
        );
        // Two encryptions never share an IV.
        let again = encrypt(&backend, plaintext).await.unwrap();
        assert_ne!(again.iv, sealed.iv, "{iv_source:?}");
    }

    // A proxy that passes a caller IV to an HSM that picks its own is refused by it
    // (the emulation checks the proxy's side of each convention).
    for (iv_source, vendor) in [
        (IvSource::HsmRandom, VendorIv::FillsZeroedBuffer),
        (IvSource::HsmGenerated, VendorIv::AppendsAfterTag),
    ] {
        let (backend, faults) = connect(iv_source);
        faults.set_vendor_iv(Some(vendor));
        assert!(encrypt(&backend, b"x").await.is_err(), "{iv_source:?}");
    }
}

/// With `hsm_random`, a session draws IV_BATCH IVs per C_GenerateRandom. Proven by
/// failing that call: once a batch is drawn, the next IV_BATCH - 1 encryptions do not
/// reach it; the one after does, gets a fast error, and the next refill serves again.
/// Every IV is distinct, across batches and across sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsm_random_ivs_come_in_batches_each_used_once() {
    let _one = setup().1.lock().await;
    let (backend, faults) = connect_sessions(IvSource::HsmRandom, 1);
    let mut seen = HashSet::new();
    // Draws a batch and takes its first IV.
    seen.insert(round_trip(&backend).await.unwrap().iv);

    faults.fail(RvError::RandomNoRng, Some(Function::GenerateRandom), None);
    for _ in 1..IV_BATCH {
        let sealed = round_trip(&backend).await.unwrap();
        assert_eq!(sealed.iv.len(), 12);
        assert!(seen.insert(sealed.iv), "an IV came out twice");
    }
    let started = Instant::now();
    let refused = encrypt(&backend, b"attack at dawn").await;
    match refused {
        Err(HsmError::Pkcs11 { function, .. }) => assert!(function.contains("GenerateRandom")),
        other => panic!("the refill failed, yet: {other:?}"),
    }
    assert!(started.elapsed() < CALL_TIMEOUT);
    assert!(faults.injected() >= 1);

    faults.clear();
    for _ in 0..2 * IV_BATCH {
        assert!(seen.insert(round_trip(&backend).await.unwrap().iv));
    }

    // Two sessions, each with its own batches, never hand out the same IV either.
    let (backend, _faults) = connect_sessions(IvSource::HsmRandom, 2);
    // Eight clients at once (the queue holds 16), 3 * IV_BATCH encryptions in all.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let backend = Arc::clone(&backend);
        tasks.spawn(async move {
            let mut ivs = Vec::new();
            for _ in 0..3 * IV_BATCH / 8 {
                ivs.push(encrypt(&backend, b"attack at dawn").await.unwrap().iv);
            }
            ivs
        });
    }
    while let Some(ivs) = tasks.join_next().await {
        for iv in ivs.unwrap() {
            assert!(seen.insert(iv), "an IV came out twice");
        }
    }
}

/// The module re-initialized under a backend whose PIN the token now refuses
/// (`refusal`: as the injector answers it, else as SoftHSM2 does): every session logs
/// in again at once, yet the token sees one login attempt, and requests and health
/// checks after it none. (Luna and nShield lock a partition after a few failures.)
/// Returns the backend with its logins suspended, its injector and the reason.
async fn refused_login_is_tried_once(
    pin: &str,
    refusal: Option<RvError>,
) -> (Arc<Backend>, Arc<FaultInjector>, String) {
    let (backend, faults) = connect_sessions(IvSource::HsmRandom, 4);
    round_trip(&backend).await.unwrap();
    pkcs11(&backend).update_pin(pin);
    if let Some(rv) = refusal {
        faults.fail(rv, Some(Function::Login), None);
    }
    // A slow login keeps the sessions' logins overlapping; each delay is one attempt.
    faults.set_function_latency(Function::Login, Some(Duration::from_millis(200)));
    faults.fail(RvError::DeviceRemoved, None, Some(1));
    let attempts = faults.delayed();
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let backend = Arc::clone(&backend);
        requests.spawn(async move { round_trip(&backend).await.is_err() });
    }
    while let Some(failed) = requests.join_next().await {
        assert!(failed.unwrap(), "served with a refused PIN");
    }
    for _ in 0..3 {
        assert!(round_trip(&backend).await.is_err());
        let ekm = backend.ekms().next().unwrap();
        assert!(ekm.health_check(Some("foo"), deadline()).await.is_err());
    }
    assert_eq!(faults.delayed() - attempts, 1, "logins with a refused PIN");
    let reason = pkcs11(&backend)
        .login_suspended()
        .expect("logins suspended")
        .to_owned();
    (backend, faults, reason)
}

fn pkcs11(backend: &Backend) -> &Pkcs11Backend {
    match backend {
        Backend::Single(Ekm::Pkcs11(b)) => b,
        _ => unreachable!(),
    }
}

fn right_pin() -> String {
    settings(IvSource::HsmRandom, 1, &Arc::new(FaultInjector::new()))
        .pin
        .as_str()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incorrect_pin_is_tried_once_however_many_sessions_log_in() {
    let _one = setup().1.lock().await;
    let (backend, faults, reason) = refused_login_is_tried_once("not-the-pin", None).await;
    assert!(reason.contains("incorrect"), "{reason}");
    // A reload with the same PIN changes nothing; the right PIN resumes service.
    faults.clear();
    pkcs11(&backend).update_pin("not-the-pin");
    assert!(pkcs11(&backend).login_suspended().is_some());
    assert!(round_trip(&backend).await.is_err());
    pkcs11(&backend).update_pin(&right_pin());
    assert!(pkcs11(&backend).login_suspended().is_none());
    until_served(&backend, Duration::from_secs(10)).await;
}

/// SoftHSM2 never locks a PIN; the injector answers CKR_PIN_LOCKED as Luna would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_pin_is_tried_once_and_again_after_a_reload() {
    let _one = setup().1.lock().await;
    let (backend, faults, reason) =
        refused_login_is_tried_once(&right_pin(), Some(RvError::PinLocked)).await;
    assert!(reason.contains("locked"), "{reason}");
    // The partition is unlocked with its PIN unchanged: a reload (same PIN) is one
    // more attempt, and it succeeds.
    faults.clear();
    assert!(round_trip(&backend).await.is_err());
    pkcs11(&backend).update_pin(&right_pin());
    assert!(pkcs11(&backend).login_suspended().is_none());
    until_served(&backend, Duration::from_secs(10)).await;
}
