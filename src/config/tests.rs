//! The configuration's validation, field by field.

use super::*;

const GOOD: &str = r#"
[server]
listen = "127.0.0.1:0"
tls_certificate = "cert.pem"
tls_private_key = "key.pem"

[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "t"
pin = "1234"

[[key_store]]
name = "a"
uri_prefix = "x/y"
region = "us-east-1"
keys = ["foo"]
[[key_store.credential]]
access_key_id = "ABCDEFGHIJKLMNOPQRST"
secret_access_key = "0123456789012345678901234567890123456789abc"
"#;

fn load(text: &str) -> Result<Config, ConfigError> {
    let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: "test.toml".into(),
        message: e.to_string(),
    })?;
    Config::from_file(file, Path::new("/etc/xks"))
}

#[test]
fn good_config_loads_with_defaults_and_resolved_paths() {
    let c = load(GOOD).unwrap();
    assert_eq!(c.tls.certificate, Path::new("/etc/xks/cert.pem"));
    assert_eq!(c.max_body_bytes, 65536);
    assert_eq!(c.key_stores[0].uri_prefix, "/x/y");
    assert!(c.tls.http2);
    let BackendConfig::Pkcs11(p) = &c.backend else {
        panic!("pkcs11 expected")
    };
    let [p] = p.as_slice() else {
        panic!("one EKM expected")
    };
    assert_eq!(p.sessions, 2);
    assert_eq!(p.token, TokenSelector::Label("t".into()));
    assert_eq!(p.pin.as_str(), "1234");
}

#[test]
fn errors_name_the_field() {
    let cases = [
        (
            GOOD.replace("ABCDEFGHIJKLMNOPQRST", "abc"),
            "key_store[0].credential[0].access_key_id",
        ),
        (
            GOOD.replace("0123456789012345678901234567890123456789abc", "short"),
            "key_store[0].credential[0].secret_access_key",
        ),
        (GOOD.replace("us-east-1", "US EAST"), "key_store[0].region"),
        (GOOD.replace("x/y", "x.y"), "key_store[0].uri_prefix"),
        (GOOD.replace("[\"foo\"]", "[\"f/o\"]"), "key_store[0].keys"),
        (GOOD.replace("token_label = \"t\"", ""), "hsm.token_label"),
        (
            GOOD.replace("pin = \"1234\"", "pin = \"1\"\npin_env = \"X\""),
            "hsm.pin",
        ),
    ];
    for (text, field) in cases {
        let message = load(&text).unwrap_err().to_string();
        assert!(message.starts_with(field), "{message} should name {field}");
    }
}

#[test]
fn budget_health_and_quota_settings_are_validated() {
    let c = load(GOOD).unwrap();
    assert_eq!(c.limits.request_deadline, Duration::from_millis(100));
    assert_eq!(c.limits.idle_timeout, Duration::from_secs(300));
    assert_eq!(c.key_stores[0].quota, None);
    let with = |server: &str, hsm: &str, store: &str| {
        GOOD.replace("[server]\n", &format!("[server]\n{server}\n"))
            .replace("[hsm]\n", &format!("[hsm]\n{hsm}\n"))
            .replace(
                "keys = [\"foo\"]\n",
                &format!("keys = [\"foo\"]\n{store}\n"),
            )
    };
    let c = load(&with("", "", "max_requests_per_second = 50.0")).unwrap();
    assert_eq!(c.key_stores[0].quota, Some((50.0, 50.0)));
    let cases = [
        (
            with("request_deadline_ms = 0", "", ""),
            "server.request_deadline_ms",
        ),
        (
            with("max_connections = 0", "", ""),
            "server.max_connections",
        ),
        (
            with("idle_timeout_seconds = 0", "", ""),
            "server.idle_timeout_seconds",
        ),
        (with("", "call_timeout_ms = 0", ""), "hsm.call_timeout_ms"),
        (
            with("", "health_check_key = \"foo\"", ""),
            "hsm.health_check_key",
        ),
        (
            with("", "health_check_interval_seconds = 90", ""),
            "hsm.health_check_interval_seconds",
        ),
        (with("", "", "burst = 5.0"), "key_store[0].burst"),
        (
            with("", "", "max_requests_per_second = -1.0"),
            "key_store[0].max_requests_per_second",
        ),
        (
            with("", "", "max_requests_per_second = 10.0\nburst = 0.5"),
            "key_store[0].burst",
        ),
        (with("", "backend = \"simulated\"", ""), "hsm.simulated"),
    ];
    for (text, field) in cases {
        let message = load(&text).unwrap_err().to_string();
        assert!(message.starts_with(field), "{message} should name {field}");
    }
}

#[test]
fn unknown_fields_are_rejected() {
    let text = GOOD.replace("[hsm]", "[hsm]\nsesions = 4");
    let message = load(&text).unwrap_err().to_string();
    assert!(message.contains("sesions"), "{message}");
}

#[test]
fn secrets_come_from_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pin"), "5678\n").unwrap();
    let text = GOOD.replace("pin = \"1234\"", "pin_file = \"pin\"");
    let file: FileConfig = toml::from_str(&text).unwrap();
    let c = Config::from_file(file, dir.path()).unwrap();
    let BackendConfig::Pkcs11(p) = &c.backend else {
        panic!("pkcs11 expected")
    };
    let [p] = p.as_slice() else {
        panic!("one EKM expected")
    };
    assert_eq!(p.pin.as_str(), "5678");
}

#[test]
fn an_empty_pin_is_refused_before_any_login() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pin"), "\n").unwrap();
    let text = GOOD.replace("pin = \"1234\"", "pin_file = \"pin\"");
    let file: FileConfig = toml::from_str(&text).unwrap();
    let message = Config::from_file(file, dir.path()).unwrap_err().to_string();
    assert!(
        message.contains("hsm.pin") && message.contains("empty"),
        "{message}"
    );
}

#[test]
fn several_ekms_inherit_what_they_do_not_set() {
    let with_ekms = |ekms: &str| {
        GOOD.replace("token_label = \"t\"\n", "")
            .replace("pin = \"1234\"\n", &format!("pin = \"1234\"\n{ekms}"))
    };
    let fleet = with_ekms(
        "sessions = 3\n\
         [[hsm.ekm]]\ntoken_label = \"a\"\n\
         [[hsm.ekm]]\ntoken_serial = \"42\"\npin = \"9999\"\nsessions = 7\n\
         module = \"/opt/other.so\"\n",
    );
    let c = load(&fleet).unwrap();
    let BackendConfig::Pkcs11(ekms) = &c.backend else {
        panic!("pkcs11 expected")
    };
    let [a, b] = ekms.as_slice() else {
        panic!("two EKMs expected")
    };
    assert_eq!(a.token, TokenSelector::Label("a".into()));
    assert_eq!(a.module, Path::new("/usr/lib/softhsm/libsofthsm2.so"));
    assert_eq!((a.pin.as_str(), a.sessions), ("1234", 3));
    assert_eq!(b.token, TokenSelector::Serial("42".into()));
    assert_eq!(b.module, Path::new("/opt/other.so"));
    assert_eq!((b.pin.as_str(), b.sessions), ("9999", 7));

    for (text, field) in [
        // The same token twice.
        (
            with_ekms("[[hsm.ekm]]\ntoken_label = \"a\"\n[[hsm.ekm]]\ntoken_label = \"a\"\n"),
            "hsm.ekm[1]",
        ),
        // A token in [hsm] as well as [[hsm.ekm]].
        (
            GOOD.replace(
                "pin = \"1234\"\n",
                "pin = \"1234\"\n[[hsm.ekm]]\ntoken_label = \"a\"\n",
            ),
            "hsm.token_label",
        ),
        // Neither label nor serial.
        (
            with_ekms("[[hsm.ekm]]\nsessions = 2\n"),
            "hsm.ekm[0].token_label",
        ),
        // More than the spec's ten.
        (
            with_ekms(
                &(0..11)
                    .map(|i| format!("[[hsm.ekm]]\ntoken_label = \"t{i}\"\n"))
                    .collect::<String>(),
            ),
            "hsm.ekm",
        ),
    ] {
        match load(&text) {
            Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field, "{text}"),
            other => panic!("{field}: expected invalid, got {other:?}"),
        }
    }
}

/// The examples in config/ follow the schema (their secrets come from elsewhere,
/// so only the schema is checked here).
#[test]
fn example_configs_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut seen = 0;
    let entries = std::fs::read_dir(&dir)
        .unwrap()
        .chain(std::fs::read_dir(dir.join("vendors")).unwrap());
    for entry in entries {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            toml::from_str::<FileConfig>(&text)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(seen >= 7, "{seen} examples");
}

#[test]
fn credential_rules() {
    assert!(is_valid_access_key_id("ABCDEFGHIJKLMNOPQRST234567"));
    assert!(!is_valid_access_key_id("ABCDEFGHIJKLMNOPQRS1"));
    assert!(!is_valid_access_key_id(&"A".repeat(31)));
    assert!(is_valid_secret(&"a+/=".repeat(11)));
    assert!(!is_valid_secret(&"a".repeat(42)));
    assert!(!is_valid_secret(&"a".repeat(65)));
}

#[test]
fn a_reload_needs_a_restart_for_what_it_cannot_apply_but_not_for_a_new_pin() {
    let running = load(GOOD).unwrap().restart_only();
    let new_pin = load(&GOOD.replace("pin = \"1234\"", "pin = \"5678\"")).unwrap();
    assert_eq!(new_pin.restart_only(), running);
    let more_sessions = load(&GOOD.replace("pin = \"1234\"", "pin = \"1234\"\nsessions = 5"));
    assert_ne!(more_sessions.unwrap().restart_only(), running);
    let other_deadline = load(&GOOD.replace("[server]", "[server]\nrequest_deadline_ms = 90"));
    assert_ne!(other_deadline.unwrap().restart_only(), running);
}

fn parse(text: &str) -> FileConfig {
    toml::from_str(text).unwrap()
}

#[test]
fn credentials_directory_starts_file_paths() {
    let text = GOOD
        .replace(
            "tls_private_key = \"key.pem\"",
            "tls_private_key = \"${CREDENTIALS_DIRECTORY}/tls-key\"",
        )
        .replace(
            "pin = \"1234\"",
            "pin_file = \"${CREDENTIALS_DIRECTORY}/pin\"",
        );
    let mut file = parse(&text);
    file.expand_credentials_directory(Some(Path::new("/run/credentials/xks-proxy.service")))
        .unwrap();
    assert_eq!(
        file.server.tls_private_key,
        Path::new("/run/credentials/xks-proxy.service/tls-key")
    );
    assert_eq!(
        file.hsm.pin_file.as_deref(),
        Some(Path::new("/run/credentials/xks-proxy.service/pin"))
    );
    // Untouched: paths that do not name it.
    assert_eq!(file.server.tls_certificate, Path::new("cert.pem"));
}

#[test]
fn credentials_directory_secrets_are_read_from_it() {
    let credentials = tempfile::tempdir().unwrap();
    std::fs::write(credentials.path().join("pin"), "5678\n").unwrap();
    std::fs::write(
        credentials.path().join("sigv4"),
        "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG\n",
    )
    .unwrap();
    let text = GOOD
        .replace(
            "pin = \"1234\"",
            "pin_file = \"${CREDENTIALS_DIRECTORY}/pin\"",
        )
        .replace(
            "secret_access_key = \"0123456789012345678901234567890123456789abc\"",
            "secret_access_key_file = \"${CREDENTIALS_DIRECTORY}/sigv4\"",
        );
    let mut file = parse(&text);
    file.expand_credentials_directory(Some(credentials.path()))
        .unwrap();
    let c = Config::from_file(file, Path::new("/etc/xks")).unwrap();
    let BackendConfig::Pkcs11(p) = &c.backend else {
        panic!("pkcs11 expected")
    };
    assert_eq!(p[0].pin.as_str(), "5678");
    // Watched, so a changed credential file is taken up by a reload.
    assert!(c.watched_files.contains(&credentials.path().join("pin")));
    assert!(c.watched_files.contains(&credentials.path().join("sigv4")));
}

#[test]
fn credentials_directory_errors_name_the_field() {
    let cases = [
        (
            // Not set: started outside systemd, or the unit has no LoadCredential=.
            GOOD.replace(
                "pin = \"1234\"",
                "pin_file = \"${CREDENTIALS_DIRECTORY}/pin\"",
            ),
            None,
            "hsm.pin_file",
            "not set",
        ),
        (
            GOOD.replace("key.pem", "/etc/${CREDENTIALS_DIRECTORY}/key"),
            Some(Path::new("/run/c")),
            "server.tls_private_key",
            "may only start a path",
        ),
        (
            GOOD.replace(
                "secret_access_key = \"0123456789012345678901234567890123456789abc\"",
                "secret_access_key_file = \"${CREDENTIALS_DIRECTORY}sigv4\"",
            ),
            Some(Path::new("/run/c")),
            "key_store[0].credential[0].secret_access_key_file",
            "${CREDENTIALS_DIRECTORY}/NAME",
        ),
    ];
    for (text, dir, field, problem) in cases {
        let error = parse(&text)
            .expand_credentials_directory(dir)
            .unwrap_err()
            .to_string();
        assert!(error.contains(field), "{error}");
        assert!(error.contains(problem), "{error}");
    }
}

/// The configuration the Debian package installs validates once systemd has put the
/// credentials it names in place (the ones the unit's LoadCredential= loads).
#[test]
fn the_packaged_systemd_config_takes_its_secrets_from_credentials() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/systemd.toml");
    let mut file = parse(&std::fs::read_to_string(path).unwrap());
    let credentials = tempfile::tempdir().unwrap();
    std::fs::write(credentials.path().join("secrets_hsm-pin"), "1234\n").unwrap();
    std::fs::write(
        credentials.path().join("secrets_sigv4-secret"),
        "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG\n",
    )
    .unwrap();
    file.expand_credentials_directory(Some(credentials.path()))
        .unwrap();
    let c = Config::from_file(file, Path::new("/etc/xks-proxy")).unwrap();
    assert_eq!(
        c.tls.private_key,
        credentials.path().join("secrets_server-key.pem")
    );
    assert_eq!(c.listen.port(), 8443, "the load balancer forwards 443 here");
}
