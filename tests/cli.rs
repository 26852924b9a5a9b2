//! Operator tooling end to end: `keys`, `quickstart` serving with its test-client.env,
//! token selection and PIN sources, and key changes under a running proxy.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;
use serde_json::json;

fn stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn keys_create_list_disable_enable_destroy() {
    let setup = Setup::new();
    stdout(&setup.keys(&["create", "both.key-1"]));
    stdout(&setup.keys(&["create", "enc", "--encrypt-only"]));
    stdout(&setup.keys(&["create", "dec", "--decrypt-only"]));
    stdout(&setup.keys(&["create", "none", "--no-usage"]));
    let listing = stdout(&setup.keys(&["list"]));
    for line in [
        "both.key-1\tAES_256\tENABLED\tENCRYPT,DECRYPT",
        "enc\tAES_256\tENABLED\tENCRYPT",
        "dec\tAES_256\tENABLED\tDECRYPT",
        "none\tAES_256\tENABLED\t",
        "foo\tAES_256\tENABLED\tENCRYPT,DECRYPT",
    ] {
        assert!(
            listing.lines().any(|l| l == line),
            "{line:?} not in\n{listing}"
        );
    }
    // Labels are unique: a second key with the same id would make the id ambiguous.
    let again = setup.keys(&["create", "enc"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists already"));
    let invalid = setup.keys(&["create", "bad/id"]);
    assert!(!invalid.status.success());

    stdout(&setup.keys(&["disable", "enc"]));
    stdout(&setup.keys(&["disable", "enc"])); // idempotent
    assert!(stdout(&setup.keys(&["list"])).contains("enc\tAES_256\tDISABLED\tENCRYPT"));
    stdout(&setup.keys(&["enable", "enc"]));
    assert!(stdout(&setup.keys(&["list"])).contains("enc\tAES_256\tENABLED\tENCRYPT"));

    let unconfirmed = setup.keys(&["destroy", "none"]);
    assert!(
        !unconfirmed.status.success(),
        "destroy needs --confirm-destroy"
    );
    stdout(&setup.keys(&["destroy", "none", "--confirm-destroy"]));
    assert!(!stdout(&setup.keys(&["list"])).contains("none\t"));
    assert!(!setup.keys(&["disable", "none"]).status.success(), "gone");
}

#[tokio::test]
async fn a_key_replaced_in_the_hsm_is_looked_up_again() {
    // With the token objects themselves (a session copy would outlive the destroyed
    // key until the next refresh, by design).
    let setup = Setup::new();
    setup.edit_config("session_key_copies = true", "session_key_copies = false");
    let proxy = setup.start();
    let client = proxy.client();
    let body = encrypt_body(b"before", None, false);
    let old = client
        .post(Version::Http1, &key_path("foo", "encrypt"), &body)
        .await;
    assert_eq!(old.status, 200);
    // Replace the key behind the proxy's cached handle.
    stdout(&proxy.setup.keys(&["destroy", "foo", "--confirm-destroy"]));
    stdout(&proxy.setup.keys(&["create", "foo"]));
    let new = client
        .post(Version::Http1, &key_path("foo", "encrypt"), &body)
        .await;
    assert_eq!(
        new.status,
        200,
        "stale handle re-resolved: {:?}\n{}",
        new.body,
        proxy.logs.lock().unwrap()
    );
    let round_trip = client
        .post(
            Version::Http1,
            &key_path("foo", "decrypt"),
            &decrypt_body(&new.body, None),
        )
        .await;
    assert_eq!(unb64(&round_trip.body["plaintext"]), b"before");
    // The old ciphertext was made under destroyed material.
    let lost = client
        .post(
            Version::Http1,
            &key_path("foo", "decrypt"),
            &decrypt_body(&old.body, None),
        )
        .await;
    assert_eq!(lost.error_name(), "InvalidCiphertextException");
}

/// The token's serial number, as the module itself reports it (C_GetTokenInfo). The
/// module's environment is set in this process: its tests spawn their proxies with the
/// config's own environment, so the variable changes nothing for them.
fn token_serial(setup: &Setup) -> String {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    setup.module_environment();
    let pkcs11 = Pkcs11::new(module_path()).unwrap();
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let serial = pkcs11
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .map(|slot| pkcs11.get_token_info(slot).unwrap())
        .find(|info| info.label().trim_end() == "xks-quickstart")
        .map(|info| info.serial_number().trim().to_owned())
        .expect("no xks-quickstart token");
    pkcs11.finalize().unwrap();
    assert!(!serial.is_empty());
    serial
}

#[tokio::test]
async fn token_by_serial_and_pin_from_the_environment() {
    let setup = Setup::new();
    let pin = std::fs::read_to_string(setup.path("hsm-pin")).unwrap();
    let serial = token_serial(&setup);
    setup.edit_config(
        "token_label = \"xks-quickstart\"",
        &format!("token_serial = \"{serial}\""),
    );
    setup.edit_config("pin_file = \"hsm-pin\"", "pin_env = \"XKS_TEST_PIN\"");
    std::fs::remove_file(setup.path("hsm-pin")).unwrap();
    let proxy = Proxy::start(setup, &[("XKS_TEST_PIN", pin.trim())]);
    let health = proxy
        .client()
        .post(
            Version::Http1,
            &health_path(),
            &json!({"requestMetadata": {"kmsRequestId": "s", "kmsOperation": "KmsHealthCheck"}}),
        )
        .await;
    assert_eq!(health.body["ekmFleetDetails"][0]["id"], serial.as_str());
    let reply = proxy
        .client()
        .post(
            Version::Http1,
            &key_path("foo", "encrypt"),
            &encrypt_body(b"x", None, false),
        )
        .await;
    assert_eq!(reply.status, 200);
}

#[test]
fn startup_failures_are_explained() {
    let setup = Setup::new();
    let serve = |env: &[(&str, &str)]| {
        let mut command = Command::new(BIN);
        command.arg("serve").arg("--config").arg(setup.config());
        for (k, v) in env {
            command.env(k, v);
        }
        let out = command.output().unwrap();
        assert!(!out.status.success());
        String::from_utf8(out.stderr).unwrap()
    };
    setup.edit_config("pin_file = \"hsm-pin\"", "pin_env = \"XKS_TEST_PIN\"");
    assert!(serve(&[]).contains("hsm.pin_env: environment variable XKS_TEST_PIN is not set"));
    let stderr = serve(&[("XKS_TEST_PIN", "wrong-pin")]);
    assert!(stderr.contains("token PIN is incorrect"), "{stderr}");
    assert!(
        !stderr.contains("wrong-pin"),
        "the PIN must not be echoed: {stderr}"
    );
    setup.edit_config(
        "token_label = \"xks-quickstart\"",
        "token_label = \"no-such-token\"",
    );
    let stderr = serve(&[("XKS_TEST_PIN", "x")]);
    assert!(
        stderr.contains("no initialized token with label \"no-such-token\""),
        "{stderr}"
    );
}

/// The README's quickstart: serves at once, and its test-client.env drives curl the
/// way the public XKS test client does.
#[test]
fn quickstart_serves_and_its_test_client_env_works() {
    let dir = tempfile::tempdir().unwrap();
    // A free port (the quickstart writes it into test-client.env) whose next port, the
    // quickstart's admin listener, is free too.
    let port = loop {
        let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = api.local_addr().unwrap().port();
        if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            break port;
        }
    };
    let mut child = Command::new(BIN)
        .args([
            "quickstart",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--module",
        ])
        .arg(module_path())
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let printed: Vec<String> = lines
        .by_ref()
        .map(|l| l.unwrap())
        .take_while(|l| !l.starts_with("xks-proxy listening on"))
        .collect();
    let printed = printed.join("\n");
    assert!(printed.contains("curl --cacert"), "{printed}");

    let script = r#"set -a; . "$1/test-client.env"; set +a
        curl -sS $SECURE --aws-sigv4 "aws:amz:us-east-1:kms-xks-proxy" \
          --user "$SIGV4_ACCESS_KEY_ID:$SIGV4_SECRET_ACCESS_KEY" -H "Content-Type:application/json" \
          --data-binary '{"requestMetadata":{"kmsRequestId":"q","kmsOperation":"KmsHealthCheck"}}' \
          "https://$XKS_PROXY_HOST/$URI_PREFIX/kms/xks/v1/health""#;
    let out = Command::new("bash")
        .args(["-c", script, "bash"])
        .arg(dir.path())
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let body: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(body["ekmFleetDetails"][0]["healthStatus"], "ACTIVE");

    let console: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("kms-console.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        console["XksProxyUriPath"],
        "/example/uri/path/prefix/kms/xks/v1"
    );
    let akid = console["XksProxyAuthenticationCredential"]["AccessKeyId"]
        .as_str()
        .unwrap();
    let secret = console["XksProxyAuthenticationCredential"]["RawSecretAccessKey"]
        .as_str()
        .unwrap();
    assert!(xks_proxy::config::is_valid_access_key_id(akid));
    assert!(xks_proxy::config::is_valid_secret(secret));
    use std::os::unix::fs::PermissionsExt;
    for secret_file in [
        "hsm-pin",
        "hsm-so-pin",
        "sigv4-secret",
        "server-key.pem",
        "ca-key.pem",
        "kms-console.json",
        "test-client.env",
    ] {
        let mode = std::fs::metadata(dir.path().join(secret_file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{secret_file} is readable by others");
    }
}

/// The PKCS#11 module (and the libraries under it) allocate through the binary's
/// allocator, never glibc's: the executable defines and exports mimalloc's `malloc`
/// family, and the dynamic linker binds the module's references to it. One
/// allocation function left to glibc would let a block from one allocator be freed by
/// the other, so every binding of every allocation function is checked.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn the_pkcs11_module_allocates_through_the_binarys_allocator() {
    let setup = Setup::new();
    let trace = setup.dir.path().join("ld-bindings");
    let out = Command::new(BIN)
        .args(["keys", "list", "--config"])
        .arg(setup.config())
        .env("LD_DEBUG", "bindings")
        .env("LD_DEBUG_OUTPUT", &trace)
        .output()
        .unwrap();
    let listing = stdout(&out);
    assert!(
        listing.contains("foo\t"),
        "the token was not read:\n{listing}"
    );
    // The dynamic linker writes its trace to <LD_DEBUG_OUTPUT>.<pid>.
    let mut lines = String::new();
    for entry in std::fs::read_dir(setup.dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("ld-bindings.") {
            lines.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
    let allocation = [
        "malloc",
        "free",
        "calloc",
        "realloc",
        "reallocarray",
        "posix_memalign",
        "aligned_alloc",
        "memalign",
        "valloc",
        "pvalloc",
        "malloc_usable_size",
        "cfree",
    ];
    let module_name = module_path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let binary = std::path::Path::new(BIN)
        .file_name()
        .unwrap()
        .to_string_lossy();
    let mut module_binds = Vec::new();
    for line in lines.lines().filter(|l| l.contains("binding file")) {
        // `binding file A [0] to B [0]: normal symbol `malloc' [GLIBC_2.2.5]`
        let Some((_, symbol)) = line.split_once("symbol `") else {
            continue;
        };
        let symbol = symbol.split('\'').next().unwrap();
        if !allocation.contains(&symbol) {
            continue;
        }
        let (from, to) = line
            .split_once("binding file ")
            .and_then(|(_, rest)| rest.split_once(" to "))
            .unwrap();
        assert!(
            to.contains(&*binary),
            "{symbol} of {from} is bound to {to}, not to the binary:\n{line}"
        );
        if from.contains(&*module_name) {
            module_binds.push(symbol.to_owned());
        }
    }
    for symbol in ["malloc", "free"] {
        assert!(
            module_binds.iter().any(|s| s == symbol),
            "the module's {symbol} was never bound: {module_binds:?}"
        );
    }
}

/// The CPUs each thread of process `pid` may run on, with the thread's name, from the
/// kernel's `Cpus_allowed_list` (e.g. `0-3,6`).
fn threads_cpus(pid: u32) -> Vec<(String, Vec<usize>)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let name = std::fs::read_to_string(task.join("comm")).unwrap();
        let status = std::fs::read_to_string(task.join("status")).unwrap();
        let list = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim();
        let mut cpus = Vec::new();
        for part in list.split(',') {
            match part.split_once('-') {
                Some((a, b)) => cpus.extend(a.parse::<usize>().unwrap()..=b.parse().unwrap()),
                None => cpus.push(part.parse().unwrap()),
            }
        }
        threads.push((name.trim().to_owned(), cpus));
    }
    threads
}

#[tokio::test]
async fn pin_threads_holds_each_worker_and_session_thread_on_one_cpu() {
    let setup = Setup::new();
    setup.edit_config("pin_threads = false", "pin_threads = true");
    let proxy = setup.start();
    // The CPUs the proxy was given: those of this test, whose mask it inherits.
    let all = threads_cpus(std::process::id())
        .into_iter()
        .map(|(_, cpus)| cpus)
        .next()
        .unwrap();
    let threads = settled_threads(proxy.pid(), |threads| {
        let pinned = |name: &str, count: usize| {
            let of: Vec<_> = threads.iter().filter(|(n, _)| n == name).collect();
            of.len() == count && of.iter().all(|(_, cpus)| cpus.len() == 1)
        };
        pinned("xks-worker", all.len()) && pinned("pkcs11-session-", 2)
    });
    let of = |name: &str| -> Vec<Vec<usize>> {
        threads
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, cpus)| cpus.clone())
            .collect()
    };
    // One worker per CPU the process may use, each held on its own.
    let mut workers: Vec<usize> = of("xks-worker")
        .into_iter()
        .map(|cpus| {
            assert_eq!(cpus.len(), 1, "a worker may run on {cpus:?}: {threads:?}");
            cpus[0]
        })
        .collect();
    workers.sort_unstable();
    assert_eq!(workers, all, "{threads:?}");
    // The quickstart's two session threads, each on one CPU, spread over them.
    let sessions = of("pkcs11-session-");
    assert_eq!(sessions.len(), 2, "{threads:?}");
    assert!(sessions.iter().all(|cpus| cpus.len() == 1), "{threads:?}");
    if all.len() > 1 {
        assert_ne!(sessions[0], sessions[1], "{threads:?}");
    }
    // The log writer is not pinned.
    assert_eq!(of("xks-log"), vec![all.clone()], "{threads:?}");
    // And it serves.
    let reply = proxy
        .client()
        .post(
            Version::Http1,
            &key_path("foo", "encrypt"),
            &encrypt_body(b"pinned", None, false),
        )
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert!(proxy.logged("pinning one tokio worker to each CPU"));

    // Off by default: the workers keep every CPU.
    let proxy = Setup::new().start();
    let threads = settled_threads(proxy.pid(), |threads| {
        threads.iter().any(|(name, _)| name == "xks-worker")
    });
    let workers: Vec<_> = threads
        .iter()
        .filter(|(name, _)| name == "xks-worker")
        .collect();
    assert!(!workers.is_empty(), "{threads:?}");
    assert!(workers.iter().all(|(_, cpus)| *cpus == all), "{threads:?}");
}

/// The threads of process `pid` (see [`threads_cpus`]) once `settled` holds of them, or
/// after 10 s. A new thread takes its name, and a pinned one its CPU, only when the
/// kernel first runs it, and a proxy can answer before that on a busy machine.
fn settled_threads(
    pid: u32,
    settled: impl Fn(&[(String, Vec<usize>)]) -> bool,
) -> Vec<(String, Vec<usize>)> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let threads = threads_cpus(pid);
        if settled(&threads) || std::time::Instant::now() > deadline {
            return threads;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// `check-config` reads what `serve` reads without opening the HSM: a good quickstart
/// configuration passes and lists its files; a certificate that does not parse, a
/// missing module or an empty PIN file fails with the reason.
#[test]
fn check_config_reads_the_files_without_the_hsm() {
    let setup = Setup::new();
    let check = || {
        Command::new(BIN)
            .arg("check-config")
            .arg(setup.config())
            .output()
            .unwrap()
    };
    let said = stdout(&check());
    assert!(said.contains(": valid\n"), "{said}");
    assert!(said.contains("\nlisten 127.0.0.1:0\n"), "{said}");
    for file in ["hsm-pin", "sigv4-secret", "server.pem", "server-key.pem"] {
        let line = format!("reads {}", setup.path(file).display());
        assert!(said.lines().any(|l| l == line), "{line:?} not in {said}");
    }

    let fails_with = |needle: &str| {
        let out = check();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "passed: {needle}");
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    };
    let pem = std::fs::read(setup.path("server.pem")).unwrap();
    std::fs::write(setup.path("server.pem"), "not a certificate\n").unwrap();
    fails_with("server.pem");
    std::fs::write(setup.path("server.pem"), pem).unwrap();
    std::fs::write(setup.path("hsm-pin"), "").unwrap();
    fails_with("is empty");
    std::fs::write(setup.path("hsm-pin"), "1234").unwrap();
    let text = std::fs::read_to_string(setup.config()).unwrap();
    let module = text
        .lines()
        .find_map(|l| l.strip_prefix("module = "))
        .unwrap()
        .to_owned();
    setup.edit_config(&module, "\"/nonexistent/libpkcs11.so\"");
    fails_with("hsm.module: /nonexistent/libpkcs11.so is not a file");
}
