//! `xks-proxy hsm probe` on a real token (a quickstart's, on the module
//! `XKS_TEST_PKCS11` selects: SoftHSM2 or kryoptic), and on the vendor
//! conventions the fault injector emulates on top of it: the IV convention detected and
//! the `iv_source` recommended for each, a module without AES-GCM or AES key
//! generation refused, a wrong PIN refused, and the command's exit status and JSON.
//!
//! The library's `probe` takes the injector in its settings, as the backend does; the
//! command line has no way to attach one (see `xks_proxy::hsm::pkcs11::probe`). Its
//! own test binary: each probe initializes and finalizes the module, so they run one
//! at a time.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use cryptoki::mechanism::MechanismType;
use xks_proxy::hsm::faults::{FaultInjector, VendorIv};
use xks_proxy::hsm::pkcs11::probe::{probe, IvConvention, ProbeReport, ProbeSettings};
use xks_proxy::hsm::pkcs11::{IvSource, TokenSelector};

/// The one token of this binary, and the lock that runs its probes one at a time.
fn setup() -> &'static (common::Setup, Mutex<()>) {
    static SETUP: OnceLock<(common::Setup, Mutex<()>)> = OnceLock::new();
    SETUP.get_or_init(|| {
        let setup = common::Setup::new();
        setup.module_environment();
        (setup, Mutex::new(()))
    })
}

fn settings(faults: Option<Arc<FaultInjector>>) -> ProbeSettings {
    let (setup, _) = setup();
    let pin = std::fs::read_to_string(setup.path("hsm-pin")).unwrap();
    let mut settings = ProbeSettings::new(common::module_path());
    settings.token = Some(TokenSelector::Label("xks-quickstart".into()));
    settings.pin = Some(pin.trim().to_owned().into());
    settings.sessions = vec![1, 2];
    settings.sample_duration = Duration::from_millis(50);
    settings.faults = faults;
    settings
}

fn run(settings: &ProbeSettings) -> ProbeReport {
    let _one = setup().1.lock().unwrap_or_else(|e| e.into_inner());
    probe(settings).unwrap()
}

fn with_faults(configure: impl FnOnce(&FaultInjector)) -> ProbeReport {
    let faults = Arc::new(FaultInjector::new());
    configure(&faults);
    run(&settings(Some(faults)))
}

#[test]
fn the_soft_token_takes_the_callers_iv_and_can_serve_xks() {
    let mut settings = settings(None);
    settings.key_label = Some("foo".into());
    let report = run(&settings);
    assert!(report.serves_xks, "{:?}", report.problems);
    let iv = report.iv.as_ref().unwrap();
    assert_eq!(iv.convention, IvConvention::CallerIv);
    assert_eq!(iv.iv_source, Some(IvSource::HsmRandom));
    assert!(iv.caller_iv.works);
    assert!(!iv.zeroed_buffer.works, "{}", iv.zeroed_buffer.detail);
    assert!(!iv.appended.works, "{}", iv.appended.detail);
    let token = report.token.as_ref().unwrap();
    assert_eq!(token.label, "xks-quickstart");
    assert!(token.flags.login_required && token.flags.rng);
    for name in ["CKM_AES_GCM", "CKM_AES_KEY_GEN"] {
        let m = report.mechanisms.iter().find(|m| m.name == name).unwrap();
        assert!(m.supported && m.max_key_size == Some(32), "{m:?}");
    }
    assert!(report.mechanisms[0].encrypt && report.mechanisms[0].decrypt);
    assert!(report.mechanisms[1].generate);
    // The temporary key and the quickstart's key "foo": every attribute readable.
    assert_eq!(report.key_attributes.len(), 2);
    for a in &report.key_attributes {
        assert_eq!(a.readable.len(), 9, "{a:?}");
        assert!(a.unreadable.is_empty() && a.error.is_none(), "{a:?}");
    }
    let copies = report.session_key_copies.as_ref().unwrap();
    assert!(copies.works);
    assert_eq!(copies.token_key.as_deref(), Some("foo"));
    assert!(copies.token_object_us.is_some() && copies.session_copy_us.is_some());
    assert_eq!(report.sample.len(), 2);
    for step in &report.sample {
        assert_eq!(step.errors, 0, "{step:?}");
        assert!(step.ops_per_second > 0.0);
    }
    if softhsm2(&report) {
        let profile = report.vendor_profile.as_ref().unwrap();
        assert_eq!(profile.file, "config/softhsm2.toml");
        assert!(!profile.iv_source_differs);
        let without_login = report.session.without_login.as_deref().unwrap();
        assert!(
            without_login.starts_with("CKR_USER_NOT_LOGGED_IN"),
            "{without_login}"
        );
    }
    let recommended = report.recommended.as_ref().unwrap();
    assert_eq!(recommended.iv_source, IvSource::HsmRandom);
    assert!(!recommended.read_write_sessions);
    assert!(recommended.sessions == 1 || recommended.sessions == 2);
    assert!(report.pin_checks.is_none());
}

#[test]
fn an_hsm_that_fills_a_zeroed_buffer_gets_hsm_generated() {
    let report = with_faults(|f| f.set_vendor_iv(Some(VendorIv::FillsZeroedBuffer)));
    assert!(report.serves_xks, "{:?}", report.problems);
    let iv = report.iv.as_ref().unwrap();
    assert_eq!(iv.convention, IvConvention::FillsZeroedBuffer);
    assert_eq!(iv.iv_source, Some(IvSource::HsmGenerated));
    assert!(!iv.caller_iv.works, "{}", iv.caller_iv.detail);
    assert!(iv.caller_iv.detail.contains("CKR_MECHANISM_PARAM_INVALID"));
    assert!(!iv.appended.works);
    assert_eq!(
        report.recommended.as_ref().unwrap().iv_source,
        IvSource::HsmGenerated
    );
    // The sample encrypted the way the module wants, without an error.
    assert!(
        report.sample.iter().all(|s| s.errors == 0),
        "{:?}",
        report.sample
    );
    // SoftHSM2's profile expects the caller's IV: the probe says this one differs.
    if softhsm2(&report) {
        assert!(report.vendor_profile.as_ref().unwrap().iv_source_differs);
    }
}

#[test]
fn an_hsm_that_appends_its_iv_gets_hsm_appended() {
    let report = with_faults(|f| f.set_vendor_iv(Some(VendorIv::AppendsAfterTag)));
    assert!(report.serves_xks, "{:?}", report.problems);
    let iv = report.iv.as_ref().unwrap();
    assert_eq!(iv.convention, IvConvention::AppendsAfterTag);
    assert_eq!(iv.iv_source, Some(IvSource::HsmAppended));
    assert!(!iv.caller_iv.works && !iv.zeroed_buffer.works);
    assert!(
        iv.appended.detail.contains("16-byte IV"),
        "{}",
        iv.appended.detail
    );
    assert_eq!(
        report.recommended.as_ref().unwrap().iv_source,
        IvSource::HsmAppended
    );
    // The copy is timed in the module's convention too.
    let copies = report.session_key_copies.as_ref().unwrap();
    assert!(
        copies.works && copies.session_copy_us.is_some(),
        "{copies:?}"
    );
    assert!(
        report.sample.iter().all(|s| s.errors == 0),
        "{:?}",
        report.sample
    );
}

#[test]
fn a_module_without_aes_gcm_cannot_serve_xks() {
    let report = with_faults(|f| f.remove_mechanism(MechanismType::AES_GCM));
    assert!(!report.serves_xks);
    assert!(report.recommended.is_none());
    assert!(
        report.problems.iter().any(|p| p.contains("no CKM_AES_GCM")),
        "{:?}",
        report.problems
    );
    assert!(report
        .problems
        .iter()
        .any(|p| p.contains("no usable GCM IV convention")));
    let gcm = report
        .mechanisms
        .iter()
        .find(|m| m.name == "CKM_AES_GCM")
        .unwrap();
    assert!(!gcm.supported);
    assert_eq!(
        report.iv.as_ref().unwrap().convention,
        IvConvention::Refused
    );
    assert!(report.text().contains("CANNOT serve XKS"));
}

#[test]
fn a_module_without_aes_key_generation_cannot_serve_xks() {
    let report = with_faults(|f| f.remove_mechanism(MechanismType::AES_KEY_GEN));
    assert!(!report.serves_xks);
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("cannot generate an AES-256 key")),
        "{:?}",
        report.problems
    );
    assert!(report
        .problems
        .iter()
        .any(|p| p.contains("no CKM_AES_KEY_GEN")));
}

#[test]
fn a_wrong_pin_is_reported_and_fails_the_probe() {
    let mut settings = settings(None);
    settings.pin = Some("not-the-pin".to_owned().into());
    let report = run(&settings);
    assert!(!report.serves_xks);
    assert!(
        report.session.login.starts_with("CKR_PIN_INCORRECT"),
        "{}",
        report.session.login
    );
    assert!(
        report.problems[0].starts_with("login failed"),
        "{:?}",
        report.problems
    );
    // Nothing after the login ran.
    assert!(report.iv.is_none() && report.sample.is_empty());
}

#[test]
fn wrong_pins_are_tried_only_when_asked_and_then_reported() {
    let mut settings = settings(None);
    settings.try_wrong_pin = true;
    settings.sessions = Vec::new();
    let report = run(&settings);
    assert!(report.serves_xks, "{:?}", report.problems);
    let checks = report.pin_checks.as_ref().unwrap();
    assert!(
        checks.wrong_pin.starts_with("CKR_PIN_INCORRECT"),
        "{}",
        checks.wrong_pin
    );
    // SoftHSM2 flags the failed login; kryoptic does not (docs/hsm-onboarding.md).
    if softhsm2(&report) {
        assert!(checks.flags_after.unwrap().user_pin_count_low);
    }
    assert!(report.sample.is_empty());
}

#[test]
fn the_command_prints_json_and_exits_by_the_verdict() {
    let (setup, _) = setup();
    let _one = setup_lock();
    let out = Command::new(common::BIN)
        .args([
            "hsm",
            "probe",
            "--json",
            "--sessions",
            "1",
            "--sample-seconds",
            "0.05",
        ])
        .arg("--config")
        .arg(setup.config())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["schema"], "xks-proxy/hsm-probe/1");
    assert_eq!(json["serves_xks"], true);
    assert_eq!(json["iv"]["convention"], "caller_iv");
    assert_eq!(json["recommended"]["iv_source"], "hsm_random");
    assert_eq!(json["token"]["label"], "xks-quickstart");

    // A PIN the token refuses: exit status 1, the reason on stderr, the report on stdout.
    let wrong = setup.dir.path().join("wrong-pin");
    std::fs::write(&wrong, "not-the-pin\n").unwrap();
    let out = Command::new(common::BIN)
        .args(["hsm", "probe", "--sessions", "0", "--config"])
        .arg(setup.config())
        .arg("--pin-file")
        .arg(&wrong)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot serve XKS") && stderr.contains("CKR_PIN_INCORRECT"),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Verdict: this module CANNOT serve XKS"));
}

/// The module is SoftHSM2 (the assertions on its particulars: its vendor profile, its
/// answer without a login, the PIN flag after a wrong PIN); kryoptic differs in each.
fn softhsm2(report: &ProbeReport) -> bool {
    report.token.as_ref().unwrap().manufacturer == "SoftHSM project"
}

fn setup_lock() -> std::sync::MutexGuard<'static, ()> {
    setup().1.lock().unwrap_or_else(|e| e.into_inner())
}
