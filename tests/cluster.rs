//! Several EKMs behind one key store: two SoftHSM2 tokens holding the same key
//! material (imported for this test only) stand in for an HSM cluster.
//!
//! In process, with a fault injector on each token: requests spread over both, fail
//! over when one is down (the proxy stays available), health reports each EKM, and a
//! returning EKM is back in service within seconds. Then the real binary, configured
//! with `[[hsm.ekm]]`, reports both EKMs in GetHealthStatus and serves the shared key.
//!
//! Its own test binary: the tests set SOFTHSM2_CONF and share one module in process.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::RvError;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use xks_proxy::health::HealthMonitor;
use xks_proxy::hsm::faults::FaultInjector;
use xks_proxy::hsm::fleet::Fleet;
use xks_proxy::hsm::pkcs11::{IvSource, Pkcs11Backend, Pkcs11Settings, TokenSelector};
use xks_proxy::hsm::{Backend, Ekm, EkmHealth, HsmError, PoolThreads};
use xks_proxy::metrics::Metrics;

const SECOND: &str = "xks-second";
const SECOND_PIN: &str = "second-pin";
const SHARED: &str = "shared";
const AAD: &[u8] = b"cluster-test";

/// The quickstart token plus a second token; both hold [`SHARED`] with the same
/// material, and each a health-check key.
fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let setup = Setup::new();
        setup.module_environment();
        let pkcs11 = Pkcs11::new(module_path()).unwrap();
        pkcs11
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .unwrap();
        // The second token, in the free slot (SoftHSM2 always has one; the quickstart
        // configures kryoptic with two slots).
        let free = pkcs11
            .get_all_slots()
            .unwrap()
            .into_iter()
            .find(|s| !pkcs11.get_token_info(*s).unwrap().token_initialized())
            .unwrap();
        let so_pin = AuthPin::new("second-so-pin".into());
        pkcs11.init_token(free, &so_pin, SECOND).unwrap();
        let second = find_token(&pkcs11, SECOND);
        let session = pkcs11.open_rw_session(second).unwrap();
        session.login(UserType::So, Some(&so_pin)).unwrap();
        session.init_pin(&AuthPin::new(SECOND_PIN.into())).unwrap();
        session.logout().unwrap();
        drop(session);

        // The shared key on both, a health-check key on the second.
        let material: [u8; 32] = rand::random();
        let first_pin = std::fs::read_to_string(setup.path("hsm-pin")).unwrap();
        for (label, pin, keys) in [
            ("xks-quickstart", first_pin.trim(), vec![SHARED]),
            (SECOND, SECOND_PIN, vec![SHARED, "xks-health-check"]),
        ] {
            let session = pkcs11.open_rw_session(find_token(&pkcs11, label)).unwrap();
            session
                .login(UserType::User, Some(&AuthPin::new(pin.into())))
                .unwrap();
            for key in keys {
                session
                    .create_object(&[
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::AES),
                        Attribute::Value(material.to_vec()),
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Label(key.as_bytes().to_vec()),
                        Attribute::Encrypt(true),
                        Attribute::Decrypt(true),
                    ])
                    .unwrap();
            }
        }
        // The module stays initialized: the backends below share it in this process.
        setup
    })
}

fn find_token(pkcs11: &Pkcs11, label: &str) -> cryptoki::slot::Slot {
    pkcs11
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| pkcs11.get_token_info(*s).unwrap().label().trim_end() == label)
        .unwrap()
}

fn ekm(label: &str, pin: &str, faults: &Arc<FaultInjector>) -> Ekm {
    ekm_timing_out(label, pin, faults, Duration::from_secs(5))
}

/// One session, and one replacement for a session stuck in a call.
fn ekm_timing_out(
    label: &str,
    pin: &str,
    faults: &Arc<FaultInjector>,
    call_timeout: Duration,
) -> Ekm {
    let settings = Pkcs11Settings {
        module: module_path(),
        token: TokenSelector::Label(label.into()),
        pin: pin.to_owned().into(),
        sessions: 1,
        queue_depth: 64,
        iv_source: IvSource::HsmRandom,
        session_key_copies: true,
        key_refresh: Duration::from_secs(60),
        call_timeout,
        read_write_sessions: false,
        trace: false,
        max_replacement_sessions: 1,
        faults: Some(Arc::clone(faults)),
    };
    Ekm::Pkcs11(
        Pkcs11Backend::connect(&settings, Metrics::new(Duration::from_millis(100))).unwrap(),
    )
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

async fn round_trip(backend: &Backend, plaintext: &[u8]) -> Result<(), HsmError> {
    let sealed = backend
        .encrypt(SHARED, plaintext.to_vec().into(), AAD.to_vec(), deadline())
        .await?;
    let opened = backend
        .decrypt(SHARED, sealed, AAD.to_vec(), deadline())
        .await?;
    assert_eq!(opened.as_slice(), plaintext);
    Ok(())
}

/// `n` round trips, 16 at a time; returns how many failed.
async fn burst(backend: &Arc<Backend>, n: usize) -> usize {
    let mut tasks = tokio::task::JoinSet::new();
    let mut failed = 0;
    for i in 0..n {
        let backend = Arc::clone(backend);
        tasks.spawn(async move { round_trip(&backend, format!("request {i}").as_bytes()).await });
        if tasks.len() >= 16 {
            failed += usize::from(tasks.join_next().await.unwrap().unwrap().is_err());
        }
    }
    while let Some(result) = tasks.join_next().await {
        let result = result.unwrap();
        if let Err(e) = &result {
            eprintln!("failed: {e}");
        }
        failed += usize::from(result.is_err());
    }
    failed
}

fn served(fleet: &Backend) -> Vec<u64> {
    match fleet {
        Backend::Fleet(f) => f.members().iter().map(|m| m.served()).collect(),
        _ => unreachable!(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_spread_fail_over_and_return_to_a_recovered_ekm() {
    let setup = setup();
    let first_pin = std::fs::read_to_string(setup.path("hsm-pin")).unwrap();
    let (faults_a, faults_b) = (
        Arc::new(FaultInjector::new()),
        Arc::new(FaultInjector::new()),
    );
    let a = ekm("xks-quickstart", first_pin.trim(), &faults_a);
    let b = ekm(SECOND, SECOND_PIN, &faults_b);
    assert_ne!(a.ekm_info().id, b.ekm_info().id);

    // The two tokens hold the same key: what one seals, the other opens.
    let sealed = a
        .encrypt(SHARED, b"x".to_vec().into(), AAD.to_vec(), deadline())
        .await
        .unwrap();
    let opened = b.decrypt(SHARED, sealed, AAD.to_vec(), deadline()).await;
    assert_eq!(opened.unwrap().as_slice(), b"x");

    let fleet = Arc::new(Backend::Fleet(Fleet::new(vec![a, b]).unwrap()));
    let monitor = HealthMonitor::new(
        Arc::clone(&fleet),
        Some("xks-health-check".into()),
        Duration::from_secs(1),
        Duration::from_secs(2),
        Metrics::new(Duration::from_millis(100)),
    );
    monitor.check().await;
    assert_eq!(monitor.statuses(), [EkmHealth::Active, EkmHealth::Active]);

    // Concurrent requests go to the EKM with the most free capacity: both serve.
    assert_eq!(burst(&fleet, 300).await, 0);
    let before = served(&fleet);
    assert!(before.iter().all(|n| *n > 0), "{before:?}");

    // The second EKM goes down: every request is still served, by the first.
    faults_b.fail(RvError::DeviceRemoved, None, None);
    assert_eq!(burst(&fleet, 200).await, 0);
    monitor.check().await;
    assert_eq!(
        monitor.statuses(),
        [EkmHealth::Active, EkmHealth::Unavailable]
    );
    assert_eq!(monitor.current(), EkmHealth::Active);
    let during = served(&fleet);
    assert_eq!(during[1], before[1], "the failed EKM answered requests");
    assert!(during[0] >= before[0] + 200);

    // It returns: within seconds the health check sees it and it serves again.
    faults_b.clear();
    let give_up = Instant::now() + Duration::from_secs(10);
    while monitor.check().await != EkmHealth::Active
        || monitor.statuses() != [EkmHealth::Active, EkmHealth::Active]
    {
        assert!(Instant::now() < give_up, "{:?}", monitor.statuses());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(burst(&fleet, 300).await, 0);
    assert!(
        served(&fleet)[1] > during[1],
        "the recovered EKM gets no requests"
    );

    // Both down: requests fail at once, health says so, nothing hangs.
    faults_a.fail(RvError::DeviceRemoved, None, None);
    faults_b.fail(RvError::DeviceRemoved, None, None);
    for _ in 0..10 {
        let started = Instant::now();
        assert!(round_trip(&fleet, b"x").await.is_err());
        assert!(started.elapsed() < Duration::from_secs(1), "a request hung");
    }
    monitor.check().await;
    assert_eq!(monitor.current(), EkmHealth::Unavailable);
    assert!(!monitor.ready());
    faults_a.clear();
    faults_b.clear();
    let give_up = Instant::now() + Duration::from_secs(10);
    while round_trip(&fleet, b"back").await.is_err() {
        assert!(Instant::now() < give_up, "the fleet did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_reports_each_ekm_of_a_configured_fleet() {
    let setup = setup();
    // A copy of the folder, so the proxy's config edits stay its own.
    let proxy_setup = Setup {
        dir: tempfile::tempdir().unwrap(),
        access_key_id: setup.access_key_id.clone(),
        secret: setup.secret.clone(),
    };
    for entry in std::fs::read_dir(setup.dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(
                &path,
                proxy_setup.path(path.file_name().unwrap().to_str().unwrap()),
            )
            .unwrap();
        }
    }
    std::fs::write(proxy_setup.path("second-pin"), SECOND_PIN).unwrap();
    proxy_setup.edit_config("token_label = \"xks-quickstart\"\n", "");
    proxy_setup.edit_config(
        "[hsm.environment]",
        &format!(
            "[[hsm.ekm]]\ntoken_label = \"xks-quickstart\"\n\n\
             [[hsm.ekm]]\ntoken_label = \"{SECOND}\"\npin_file = \"second-pin\"\n\n\
             [hsm.environment]"
        ),
    );
    proxy_setup.edit_config("keys = [", &format!("keys = [\"{SHARED}\", "));
    let proxy = proxy_setup.start();
    let client = proxy.client();

    let give_up = Instant::now() + Duration::from_secs(20);
    let details = loop {
        let reply = client
            .post(
                Version::Http1,
                &health_path(),
                &serde_json::json!({ "requestMetadata": metadata() }),
            )
            .await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        let details = reply.body["ekmFleetDetails"].as_array().unwrap().clone();
        if details.iter().all(|d| d["healthStatus"] == "ACTIVE") {
            break details;
        }
        assert!(Instant::now() < give_up, "{details:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(details.len(), 2, "{details:?}");
    assert_ne!(details[0]["id"], details[1]["id"]);

    for i in 0..20 {
        let plaintext = format!("through the fleet {i}");
        let encrypted = client
            .post(
                Version::Http1,
                &key_path(SHARED, "encrypt"),
                &encrypt_body(plaintext.as_bytes(), Some(AAD), true),
            )
            .await;
        assert_eq!(encrypted.status, 200, "{:?}", encrypted.body);
        let decrypted = client
            .post(
                Version::Http1,
                &key_path(SHARED, "decrypt"),
                &decrypt_body(&encrypted.body, Some(AAD)),
            )
            .await;
        assert_eq!(decrypted.status, 200, "{:?}", decrypted.body);
        assert_eq!(unb64(&decrypted.body["plaintext"]), plaintext.as_bytes());
    }
}

/// Lets every hung call go when the test ends, passed or failed.
struct ReleaseOnDrop(Arc<FaultInjector>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0.release();
    }
}

fn pool_threads(fleet: &Backend, i: usize) -> PoolThreads {
    fleet.ekms().nth(i).unwrap().pool_threads().unwrap()
}

/// Calls that never return, on one EKM and then on both: the fleet serves on while
/// one EKM's session is stuck (it opens a replacement and reports DEGRADED); with
/// every thread of both stuck up to the bound, requests fail at once, no thread
/// opens, and health says UNAVAILABLE; once the calls return, both are back to size.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hung_calls_on_one_ekm_and_then_on_all_are_contained() {
    const CALL_TIMEOUT: Duration = Duration::from_millis(1500);
    let setup = setup();
    let first_pin = std::fs::read_to_string(setup.path("hsm-pin")).unwrap();
    let (faults_a, faults_b) = (
        Arc::new(FaultInjector::new()),
        Arc::new(FaultInjector::new()),
    );
    let _release = (
        ReleaseOnDrop(Arc::clone(&faults_a)),
        ReleaseOnDrop(Arc::clone(&faults_b)),
    );
    let a = ekm_timing_out("xks-quickstart", first_pin.trim(), &faults_a, CALL_TIMEOUT);
    let b = ekm_timing_out(SECOND, SECOND_PIN, &faults_b, CALL_TIMEOUT);
    let fleet = Arc::new(Backend::Fleet(Fleet::new(vec![a, b]).unwrap()));
    let monitor = HealthMonitor::new(
        Arc::clone(&fleet),
        Some("xks-health-check".into()),
        Duration::from_secs(1),
        Duration::from_secs(10),
        Metrics::new(Duration::from_millis(100)),
    );
    monitor.check().await;
    assert_eq!(monitor.statuses(), [EkmHealth::Active, EkmHealth::Active]);
    let threads = |sessions, threads, stuck| PoolThreads {
        sessions,
        threads,
        stuck,
    };

    // The first EKM's call hangs: the request moves on to the second and is served.
    faults_a.hang(None, 1);
    let give_up = Instant::now() + Duration::from_secs(30);
    while pool_threads(&fleet, 0) != threads(1, 2, 1) {
        assert!(Instant::now() < give_up, "{:?}", pool_threads(&fleet, 0));
        round_trip(&fleet, b"one hangs").await.unwrap();
    }
    monitor.check().await;
    assert_eq!(monitor.statuses(), [EkmHealth::Degraded, EkmHealth::Active]);
    // (Requests prefer the ACTIVE EKM; tests/hung.rs shows a replacement serving.)
    assert_eq!(burst(&fleet, 100).await, 0);

    // Every call on both hangs, until each has its session and its replacement stuck.
    faults_a.hang(None, 100);
    faults_b.hang(None, 100);
    let give_up = Instant::now() + Duration::from_secs(60);
    while pool_threads(&fleet, 0).serving() + pool_threads(&fleet, 1).serving() > 0 {
        assert!(Instant::now() < give_up, "{:?}", served(&fleet));
        let _ = round_trip(&fleet, b"all hang").await;
        monitor.check().await;
    }
    for i in 0..2 {
        assert_eq!(pool_threads(&fleet, i), threads(1, 2, 2));
    }
    let hanging = faults_a.hanging() + faults_b.hanging();
    for _ in 0..10 {
        let started = Instant::now();
        assert!(round_trip(&fleet, b"x").await.is_err());
        assert!(started.elapsed() < CALL_TIMEOUT, "a request waited");
    }
    assert_eq!(faults_a.hanging() + faults_b.hanging(), hanging);
    monitor.check().await;
    assert_eq!(
        monitor.statuses(),
        [EkmHealth::Unavailable, EkmHealth::Unavailable]
    );
    assert!(!monitor.ready());

    // The calls return: both pools shrink back to one thread and serve again.
    faults_a.release();
    faults_b.release();
    let give_up = Instant::now() + Duration::from_secs(20);
    while (0..2).any(|i| pool_threads(&fleet, i) != threads(1, 1, 0)) {
        assert!(Instant::now() < give_up, "{:?}", pool_threads(&fleet, 0));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let give_up = Instant::now() + Duration::from_secs(20);
    while round_trip(&fleet, b"back").await.is_err() {
        assert!(Instant::now() < give_up, "the fleet did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
