//! A vendor library whose calls never return, on a real SoftHSM2 token: the fault
//! injector holds PKCS#11 calls until the test releases them. The pool counts the
//! threads stuck in them, opens replacements up to its bound so the EKM keeps its
//! capacity, answers at once when nothing is left, and shrinks back to its size when
//! the calls return.
//!
//! Its own test binary: it installs a log subscriber to read the pool's lines.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cryptoki::context::Function;
use xks_proxy::health::HealthMonitor;
use xks_proxy::hsm::faults::FaultInjector;
use xks_proxy::hsm::pkcs11::{IvSource, Pkcs11Backend, Pkcs11Settings, TokenSelector};
use xks_proxy::hsm::{Backend, Ekm, EkmHealth, HsmError, PoolThreads};
use xks_proxy::metrics::Metrics;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const CALL_TIMEOUT: Duration = Duration::from_millis(1500);

/// Log lines the proxy's code writes in this process.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn setup() -> &'static (common::Setup, Logs) {
    static SETUP: OnceLock<(common::Setup, Logs)> = OnceLock::new();
    SETUP.get_or_init(|| {
        let setup = common::Setup::new();
        std::env::set_var("SOFTHSM2_CONF", setup.path("softhsm2.conf"));
        let logs = Logs::default();
        let writer = logs.clone();
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        (setup, logs)
    })
}

/// Lets every hung call go when the test ends, passed or failed, so no session thread
/// stays behind in the module.
struct ReleaseOnDrop(Arc<FaultInjector>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0.release();
    }
}

fn threads(backend: &Backend) -> PoolThreads {
    backend.ekms().next().unwrap().pool_threads().unwrap()
}

/// Waits (up to 20 s) until `done` holds.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let give_up = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < give_up, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn encrypt(backend: &Backend) -> Result<(), HsmError> {
    backend
        .encrypt(
            "foo",
            b"hung".to_vec().into(),
            b"aad".to_vec(),
            Instant::now() + Duration::from_secs(10),
        )
        .await
        .map(drop)
}

/// Encrypts until one succeeds (an EKM whose call timed out is out of service for a
/// backoff first).
async fn served_again(backend: &Backend) {
    let give_up = Instant::now() + Duration::from_secs(20);
    while let Err(e) = encrypt(backend).await {
        assert!(Instant::now() < give_up, "not served again: {e}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hung_calls_are_replaced_up_to_the_bound_and_the_pool_returns_to_its_size() {
    let (setup, logs) = setup();
    let pin = std::fs::read_to_string(setup.path("hsm-pin")).unwrap();
    let faults = Arc::new(FaultInjector::new());
    let _release = ReleaseOnDrop(Arc::clone(&faults));
    let metrics = Metrics::new(Duration::from_millis(100));
    let settings = Pkcs11Settings {
        module: MODULE.into(),
        token: TokenSelector::Label("xks-quickstart".into()),
        pin: pin.trim().to_owned().into(),
        sessions: 2,
        queue_depth: 16,
        iv_source: IvSource::HsmRandom,
        session_key_copies: true,
        key_refresh: Duration::from_secs(60),
        call_timeout: CALL_TIMEOUT,
        read_write_sessions: false,
        trace: false,
        max_replacement_sessions: 1,
        faults: Some(Arc::clone(&faults)),
    };
    let backend = Pkcs11Backend::connect(&settings, Arc::clone(&metrics)).unwrap();
    let ekm_id = backend.ekm_info().id.clone();
    let backend: Arc<Backend> = Arc::new(Ekm::Pkcs11(backend).into());
    let monitor = HealthMonitor::new(
        Arc::clone(&backend),
        Some("xks-health-check".into()),
        Duration::from_secs(1),
        Duration::from_secs(10),
        Arc::clone(&metrics),
    );
    encrypt(&backend).await.unwrap();
    assert_eq!(monitor.check().await, EkmHealth::Active);
    let stuck_metric = |n: usize| format!("xks_hsm_sessions_stuck{{ekm=\"{ekm_id}\"}} {n}\n");
    assert!(metrics.encode().contains(&stuck_metric(0)));

    // One call hangs: the request answers 503 at its call timeout, the thread is
    // counted stuck, and a replacement opens.
    faults.hang(Some(Function::Encrypt), 1);
    assert_eq!(encrypt(&backend).await, Err(HsmError::Timeout));
    until("one stuck thread, replaced", || {
        threads(&backend)
            == PoolThreads {
                sessions: 2,
                threads: 3,
                stuck: 1,
            }
    })
    .await;
    assert_eq!(faults.hanging(), 1);
    assert!(metrics.encode().contains(&stuck_metric(1)));
    let log = logs.text();
    let line = log
        .lines()
        .find(|l| l.contains("an HSM call has not returned"))
        .unwrap_or_else(|| panic!("no stuck line:\n{log}"));
    assert!(
        line.contains("Encrypt") && line.contains("elapsed_ms"),
        "{line}"
    );

    // The pool still serves two calls at once: with one thread stuck, three are busy.
    served_again(&backend).await;
    faults.set_function_latency(Function::Encrypt, Some(Duration::from_millis(500)));
    let busy = metrics.pool_busy.clone();
    let calls: Vec<_> = (0..2)
        .map(|_| {
            let backend = Arc::clone(&backend);
            tokio::spawn(async move { encrypt(&backend).await })
        })
        .collect();
    let mut most = 0;
    let give_up = Instant::now() + Duration::from_secs(20);
    while most < 3 && Instant::now() < give_up {
        most = most.max(busy.get());
        tokio::time::sleep(Duration::from_millis(1)).await;
        if calls.iter().all(|c| c.is_finished()) {
            break;
        }
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(most, 3, "two calls never ran at once beside the stuck one");
    faults.set_function_latency(Function::Encrypt, None);
    assert_eq!(monitor.check().await, EkmHealth::Degraded);

    // Every thread hangs, up to the bound (2 sessions + 1 replacement): no thread
    // serves, requests are answered at once without reaching the module, and no
    // further thread opens.
    faults.hang(Some(Function::Encrypt), 2);
    let give_up = Instant::now() + Duration::from_secs(30);
    while threads(&backend).serving() > 0 {
        assert!(Instant::now() < give_up, "{:?}", threads(&backend));
        let _ = encrypt(&backend).await;
    }
    assert_eq!(
        threads(&backend),
        PoolThreads {
            sessions: 2,
            threads: 3,
            stuck: 3,
        }
    );
    assert_eq!(faults.hanging(), 3);
    for _ in 0..20 {
        let started = Instant::now();
        assert_eq!(encrypt(&backend).await, Err(HsmError::Timeout));
        assert!(started.elapsed() < CALL_TIMEOUT, "not answered at once");
    }
    assert_eq!(faults.hanging(), 3);
    assert_eq!(threads(&backend).threads, 3);
    assert!(metrics.encode().contains(&stuck_metric(3)));
    assert!(logs
        .text()
        .contains("no replacement (hsm.max_replacement_sessions reached)"));
    assert_eq!(monitor.check().await, EkmHealth::Unavailable);
    assert!(!monitor.ready());

    // The calls return: the threads rejoin or retire, and the pool is back to its size.
    faults.release();
    until("back to two threads", || {
        threads(&backend)
            == PoolThreads {
                sessions: 2,
                threads: 2,
                stuck: 0,
            }
    })
    .await;
    assert!(metrics.encode().contains(&stuck_metric(0)));
    assert!(logs.text().contains("a stuck HSM call returned"));
    served_again(&backend).await;
    assert_eq!(monitor.check().await, EkmHealth::Active);
}
