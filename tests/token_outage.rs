//! A token that disappears under a running proxy while its PKCS#11 module keeps running
//! (SoftHSM2's token directory moved aside and back): never KeyNotFound during the
//! outage, health and readiness say so, and service resumes without a restart. A key
//! really destroyed on a healthy token is still KeyNotFound. A PIN the token refuses
//! suspends logins until the PIN file changes.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use serde_json::json;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// The token's own directory under the quickstart's `tokens/`.
fn token_dir(setup: &Setup) -> PathBuf {
    std::fs::read_dir(setup.path("tokens"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir())
        .unwrap()
}

/// How the proxy under test is configured.
#[derive(Debug, Clone, Copy)]
struct Variant {
    /// `hsm.session_key_copies`.
    copies: bool,
    /// `hsm.key_refresh_seconds`: long, the session copies could go on encrypting
    /// through the whole outage.
    key_refresh_seconds: u64,
    /// Whether `hsm.health_check_key` stays; without it the monitor only probes.
    health_check_key: bool,
}

/// Copies re-read every second, the health-check key checked every second.
const QUICK: Variant = Variant {
    copies: true,
    key_refresh_seconds: 1,
    health_check_key: true,
};

/// A quickstart proxy as `variant` says, that checks its EKM every second.
fn start(variant: Variant) -> Proxy {
    let setup = Setup::new();
    let Variant {
        copies,
        key_refresh_seconds,
        health_check_key,
    } = variant;
    setup.edit_config(
        "session_key_copies = true",
        &format!(
            "session_key_copies = {copies}\nhealth_check_interval_seconds = 1\nkey_refresh_seconds = {key_refresh_seconds}"
        ),
    );
    if !health_check_key {
        setup.edit_config("health_check_key = \"xks-health-check\"", "");
    }
    setup.start()
}

/// One Encrypt with `foo`.
async fn encrypt(client: &Client) -> Reply {
    let body = encrypt_body(b"outage", None, false);
    client
        .post(Version::Http1, &key_path("foo", "encrypt"), &body)
        .await
}

async fn health(client: &Client) -> String {
    let body =
        json!({"requestMetadata": {"kmsRequestId": "t", "kmsOperation": "CreateCustomKeyStore"}});
    let reply = client.post(Version::Http1, &health_path(), &body).await;
    reply.body["ekmFleetDetails"][0]["healthStatus"]
        .as_str()
        .unwrap_or("<none>")
        .to_owned()
}

/// Encrypts every 50 ms until `until`, collecting each answer's status and error name.
async fn encrypt_until(client: &Client, until: Instant, seen: &mut Vec<(u16, String)>) {
    while Instant::now() < until {
        let reply = encrypt(client).await;
        seen.push((reply.status, reply.error_name().to_owned()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `check` every 100 ms until it holds, for at most `within`.
async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn token_goes_away_and_returns(variant: Variant) {
    let proxy = start(variant);
    let client = proxy.client();
    let mut seen = Vec::new();
    encrypt_until(&client, Instant::now() + Duration::from_secs(1), &mut seen).await;
    assert!(seen.iter().all(|(s, _)| *s == 200), "{seen:?}");

    // The token's directory goes away for 10 s; the module keeps running.
    let dir = token_dir(&proxy.setup);
    let away = proxy.setup.path("token-away");
    std::fs::rename(&dir, &away).unwrap();
    let back_at = Instant::now() + Duration::from_secs(10);
    let mut during = Vec::new();
    let mut unavailable_seen = false;
    let mut unready_seen = false;
    while Instant::now() < back_at {
        encrypt_until(
            &client,
            Instant::now() + Duration::from_millis(500),
            &mut during,
        )
        .await;
        unavailable_seen |= health(&client).await == "UNAVAILABLE";
        unready_seen |= proxy.admin_get("/readyz").await.0 == 503;
    }
    std::fs::rename(&away, &dir).unwrap();

    // Never "key not found" (KMS takes it as permanent for the key); once the proxy
    // noticed, the retryable InternalException, answered fast.
    assert!(
        during.iter().all(|(status, name)| *status == 200
            || (*status == 500 && name == "InternalException")),
        "{variant:?}: {during:?}"
    );
    let failed = during.iter().filter(|(s, _)| *s == 500).count();
    assert!(
        failed * 2 > during.len(),
        "{variant:?}: the outage went unnoticed: {during:?}"
    );
    assert!(
        unavailable_seen,
        "{variant:?}: health never said UNAVAILABLE"
    );
    assert!(unready_seen, "{variant:?}: /readyz never said 503");

    // Back without a restart, within seconds.
    let returned = Instant::now();
    eventually(Duration::from_secs(15), "Encrypt served again", || async {
        encrypt(&client).await.status == 200
    })
    .await;
    eprintln!(
        "{variant:?}: {failed} of {} answers failed during the outage; served {:?} after the token returned",
        during.len(),
        returned.elapsed()
    );
    let mut after = Vec::new();
    encrypt_until(&client, Instant::now() + Duration::from_secs(1), &mut after).await;
    assert!(after.iter().all(|(s, _)| *s == 200), "{after:?}");
    eventually(Duration::from_secs(10), "health ACTIVE again", || async {
        health(&client).await == "ACTIVE"
    })
    .await;
    assert_eq!(proxy.admin_get("/readyz").await.0, 200);
}

/// Three proxies at once: session copies that could encrypt through the outage (the
/// health check must read the token, not the cache), token objects used directly, and
/// copies without a health-check key (the monitor's probe must look at the token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_goes_away_is_an_ekm_fault_and_service_resumes_when_it_returns() {
    tokio::join!(
        token_goes_away_and_returns(Variant {
            key_refresh_seconds: 60,
            ..QUICK
        }),
        token_goes_away_and_returns(Variant {
            copies: false,
            ..QUICK
        }),
        token_goes_away_and_returns(Variant {
            key_refresh_seconds: 60,
            health_check_key: false,
            ..QUICK
        }),
    );
}

/// A key destroyed on a token that still holds its other keys is gone: KeyNotFound,
/// and the EKM stays healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_destroyed_on_a_healthy_token_is_key_not_found() {
    let proxy = start(QUICK);
    let client = proxy.client();
    let path = key_path("foo", "encrypt");
    let body = encrypt_body(b"x", None, false);
    assert_eq!(client.post(Version::Http1, &path, &body).await.status, 200);
    let out = proxy.setup.keys(&["destroy", "foo", "--confirm-destroy"]);
    assert!(out.status.success(), "{out:?}");
    eventually(Duration::from_secs(10), "KeyNotFound", || async {
        let reply = client.post(Version::Http1, &path, &body).await;
        assert!(matches!(reply.status, 200 | 404), "{:?}", reply.body);
        reply.error_name() == "KeyNotFoundException"
    })
    .await;
    assert_eq!(health(&client).await, "ACTIVE");
    assert_eq!(proxy.admin_get("/readyz").await.0, 200);
}

/// Changes the token's user PIN from `old` to `new` in this process.
fn change_pin(setup: &Setup, old: &str, new: &str) {
    std::env::set_var("SOFTHSM2_CONF", setup.path("softhsm2.conf"));
    let pkcs11 = Pkcs11::new(MODULE).unwrap();
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = pkcs11
        .get_slots_with_initialized_token()
        .unwrap()
        .into_iter()
        .find(|slot| pkcs11.get_token_info(*slot).unwrap().label().trim_end() == "xks-quickstart")
        .unwrap();
    let session = pkcs11.open_rw_session(slot).unwrap();
    session
        .login(UserType::User, Some(&AuthPin::new(old.into())))
        .unwrap();
    session
        .set_pin(&AuthPin::new(old.into()), &AuthPin::new(new.into()))
        .unwrap();
    drop(session);
    pkcs11.finalize().unwrap();
}

/// A PIN the token refuses is tried once: logins stop (health UNAVAILABLE with the
/// reason, a metric, one ERROR line) until the PIN file changes, and then resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_pin_suspends_logins_until_the_pin_changes() {
    let proxy = start(QUICK);
    let client = proxy.client();
    let pin_file = proxy.setup.path("hsm-pin");
    let old = std::fs::read_to_string(&pin_file)
        .unwrap()
        .trim()
        .to_owned();
    let new = format!("{old}-2");
    change_pin(&proxy.setup, &old, &new);

    // The proxy logs in again after the token comes back from an outage. While the
    // token is away no session opens, so no login is tried.
    let dir = token_dir(&proxy.setup);
    let away = proxy.setup.path("token-away");
    std::fs::rename(&dir, &away).unwrap();
    eventually(Duration::from_secs(10), "UNAVAILABLE", || async {
        health(&client).await == "UNAVAILABLE"
    })
    .await;
    // Each login attempt logs "C_Login" at debug level (the tests run with debug).
    let logins = |logs: &str| logs.matches("C_Login").count();
    let before = logins(&proxy.logs());
    std::fs::rename(&away, &dir).unwrap();
    eventually(
        Duration::from_secs(15),
        "a login with the old PIN",
        || async { logins(&proxy.logs()) > before },
    )
    .await;

    // Several health checks (one a second) and requests later: still the one login.
    for _ in 0..8 {
        let reply = encrypt(&client).await;
        assert_eq!(reply.status, 500, "{:?}", reply.body);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let logs = proxy.logs();
    assert_eq!(logins(&logs) - before, 1, "logins with a refused PIN");
    assert_eq!(
        logs.matches("login suspended: no more login attempts")
            .count(),
        1
    );
    assert_eq!(health(&client).await, "UNAVAILABLE");
    assert!(logs.contains("token PIN is incorrect"), "no reason logged");
    assert_eq!(proxy.admin_get("/readyz").await.0, 503);
    let metrics = proxy.scrape().await;
    assert_eq!(metrics.value("xks_ekm_login_suspended", &[]), 1.0);

    // The operator corrects the PIN file; the proxy notices the change and logs in.
    std::fs::write(&pin_file, format!("{new}\n")).unwrap();
    eventually(
        Duration::from_secs(20),
        "served with the new PIN",
        || async { encrypt(&client).await.status == 200 },
    )
    .await;
    eventually(Duration::from_secs(10), "health ACTIVE", || async {
        health(&client).await == "ACTIVE"
    })
    .await;
    assert_eq!(
        proxy.scrape().await.value("xks_ekm_login_suspended", &[]),
        0.0
    );
    assert!(proxy.logs().contains("the PIN changed: logins resume"));
}
