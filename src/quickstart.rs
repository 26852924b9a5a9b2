//! `xks-proxy quickstart`: everything a local proxy needs, in one folder.
//!
//! Creates (or reuses, when run again) under DIR: a soft token (SoftHSM2 by default,
//! kryoptic or another module with `--module`; see [`SoftToken`]), initialized through
//! PKCS#11 itself (`C_InitToken`, `C_InitPIN`), with the keys the public XKS test client
//! expects, a SigV4 credential, a local CA and
//! a server certificate for `localhost` and `127.0.0.1`, `config.toml` (an ordinary
//! configuration for `serve`), `kms-console.json` (the spec's XKS proxy configuration
//! file for the KMS console) and `test-client.env` (the test client's variables).
//!
//! Secrets (PINs, the SigV4 secret, private keys) are written with mode 0600.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use cryptoki::context::Pkcs11;
use cryptoki::error::Error as CkError;
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use crate::hsm::pkcs11::{create_key, initialize, open_token, NewKeyUsage, TokenSelector};
use crate::hsm::HsmError;

/// The token label the quickstart uses.
pub const TOKEN_LABEL: &str = "xks-quickstart";
/// The URI path prefix of the quickstart key store (no leading slash, as the test
/// client wants it).
pub const URI_PREFIX: &str = "example/uri/path/prefix";
/// The region of the quickstart key store.
pub const REGION: &str = "us-east-1";

/// The keys the quickstart creates: id, encrypt, decrypt (the test client's names).
pub const KEYS: [(&str, bool, bool); 4] = [
    ("foo", true, true),
    ("encrypt_only_key", true, false),
    ("decrypt_only_key", false, true),
    ("impotent_key", false, false),
];

/// The key only the health monitor uses (the spec forbids deep health checks on keys
/// KMS uses, so it is in no key store).
pub const HEALTH_CHECK_KEY: &str = "xks-health-check";

/// The admin listener next to `listen`: port 0 stays 0 (tests), otherwise the next port.
pub fn admin_listen(listen: SocketAddr) -> SocketAddr {
    let port = match listen.port() {
        0 => 0,
        p => p.wrapping_add(1),
    };
    SocketAddr::new(listen.ip(), port)
}

/// Where SoftHSM2's module usually lives.
pub const SOFTHSM2_MODULE_PATHS: [&str; 4] = [
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];

/// Why the quickstart failed.
#[derive(Debug, thiserror::Error)]
pub enum QuickstartError {
    /// File system.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// SoftHSM2 is not installed.
    #[error("SoftHSM2 not found (looked in {0}); install it: apt-get install softhsm2")]
    NoSoftHsm(String),
    /// A PKCS#11 step failed.
    #[error("{step}: {detail}")]
    Hsm {
        /// What we were doing.
        step: &'static str,
        /// Why it failed.
        detail: String,
    },
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Certificate(#[from] rcgen::Error),
    /// Random generation failed.
    #[error("random generator failed")]
    Random,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> QuickstartError + '_ {
    move |source| QuickstartError::Io {
        path: path.to_owned(),
        source,
    }
}

fn hsm(step: &'static str) -> impl Fn(HsmError) -> QuickstartError {
    move |e| QuickstartError::Hsm {
        step,
        detail: e.to_string(),
    }
}

fn ck(step: &'static str) -> impl Fn(CkError) -> QuickstartError {
    move |e| QuickstartError::Hsm {
        step,
        detail: format!("{e:?}"),
    }
}

/// What the quickstart produced.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The folder.
    pub dir: PathBuf,
    /// `DIR/config.toml`.
    pub config: PathBuf,
    /// `DIR/ca.pem`.
    pub ca_certificate: PathBuf,
    /// The SigV4 access key id.
    pub access_key_id: String,
    /// The listen address written to the config.
    pub listen: SocketAddr,
    /// The module's environment (its configuration file: SOFTHSM2_CONF, KRYOPTIC_CONF),
    /// set before the module loads; none for a module the quickstart does not know.
    pub environment: Option<(&'static str, PathBuf)>,
}

/// The soft tokens the quickstart knows how to give a token store in DIR. Everything
/// module-specific about the quickstart is here; config/VENDORS.md says how they differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SoftToken {
    /// SoftHSM2: `SOFTHSM2_CONF` names a file naming the token directory; it always
    /// offers one free slot to `C_InitToken`.
    SoftHsm2,
    /// kryoptic: `KRYOPTIC_CONF` names a TOML file whose `[[slots]]` each have their own
    /// sqlite database; an uninitialized slot takes `C_InitToken`.
    Kryoptic,
    /// Any other module: used as it is, its environment set by the operator; the
    /// quickstart initializes a token on a free slot if the module allows it.
    Other,
}

/// The kryoptic slots the quickstart configures: the first gets the quickstart token,
/// the second stays free for a second token (a cluster's second EKM, as SoftHSM2's
/// ever-free slot).
const KRYOPTIC_SLOTS: [u32; 2] = [1, 2];

impl SoftToken {
    /// Which soft token a module is, by its file name (`libsofthsm2.so`,
    /// `libkryoptic_pkcs11.so`).
    pub fn of(module: &Path) -> Self {
        let name = module
            .file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        if name.contains("softhsm") {
            Self::SoftHsm2
        } else if name.contains("kryoptic") {
            Self::Kryoptic
        } else {
            Self::Other
        }
    }

    /// The module's name in the config's comments and the quickstart's output.
    pub fn name(self) -> &'static str {
        match self {
            Self::SoftHsm2 => "SoftHSM2",
            Self::Kryoptic => "kryoptic",
            Self::Other => "PKCS#11",
        }
    }

    /// Writes the module's configuration file in DIR (token store under DIR/tokens) and
    /// returns the variable that must name it when the module loads.
    fn configure(self, dir: &Path) -> Result<Option<(&'static str, PathBuf)>, QuickstartError> {
        let tokens = dir.join("tokens");
        match self {
            Self::SoftHsm2 => {
                let conf = dir.join("softhsm2.conf");
                write_file(
                    &conf,
                    format!(
                        "# SoftHSM2 configuration written by xks-proxy quickstart\n\
                         directories.tokendir = {}\n\
                         objectstore.backend = file\n\
                         log.level = ERROR\n\
                         slots.removable = false\n",
                        tokens.display()
                    )
                    .as_bytes(),
                    false,
                )?;
                Ok(Some(("SOFTHSM2_CONF", conf)))
            }
            Self::Kryoptic => {
                let conf = dir.join("kryoptic.conf");
                let mut text = String::from(
                    "# kryoptic configuration written by xks-proxy quickstart (kryoptic.conf(5))\n",
                );
                for slot in KRYOPTIC_SLOTS {
                    // TOML basic strings: the path's backslashes and quotes escaped.
                    let db = tokens.join(format!("slot{slot}.sql"));
                    let db = db.display().to_string();
                    let db = db.replace('\\', "\\\\").replace('"', "\\\"");
                    let _ = write!(
                        text,
                        "\n[[slots]]\nslot = {slot}\ndbtype = \"sqlite\"\ndbargs = \"{db}\"\n"
                    );
                }
                write_file(&conf, text.as_bytes(), false)?;
                Ok(Some(("KRYOPTIC_CONF", conf)))
            }
            Self::Other => Ok(None),
        }
    }
}

/// Finds the SoftHSM2 module.
pub fn find_softhsm2() -> Result<PathBuf, QuickstartError> {
    SOFTHSM2_MODULE_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| QuickstartError::NoSoftHsm(SOFTHSM2_MODULE_PATHS.join(", ")))
}

/// Prepares DIR. Must run before any other thread uses the environment: it sets the
/// module's variable ([`SoftToken`]: SOFTHSM2_CONF, KRYOPTIC_CONF) for this process so
/// the module finds DIR's token store.
pub fn prepare(
    dir: &Path,
    listen: SocketAddr,
    module: Option<&Path>,
) -> Result<Prepared, QuickstartError> {
    std::fs::create_dir_all(dir.join("tokens")).map_err(io(dir))?;
    let dir = dir.canonicalize().map_err(io(dir))?;
    let module = match module {
        Some(m) => m.to_owned(),
        None => find_softhsm2()?,
    };

    let token = SoftToken::of(&module);
    let environment = token.configure(&dir)?;
    if let Some((name, value)) = &environment {
        // Edition 2021: set_var is safe to call; it is sound here because `prepare` runs
        // before the runtime or any session thread exists (see the function's contract).
        std::env::set_var(name, value);
    }

    let pin = reuse_or_create_secret(&dir.join("hsm-pin"), || random_hex(16))?;
    let so_pin = reuse_or_create_secret(&dir.join("hsm-so-pin"), || random_hex(16))?;
    init_token(&module, &pin, &so_pin)?;
    create_keys(&module, &pin)?;

    let access_key_id =
        reuse_or_create_secret(&dir.join("sigv4-access-key-id"), random_access_key_id)?;
    let secret = reuse_or_create_secret(&dir.join("sigv4-secret"), random_secret)?;

    let ca_certificate = dir.join("ca.pem");
    certificates(&dir)?;

    let config = dir.join("config.toml");
    write_file(
        &config,
        config_toml(
            &dir,
            &module,
            token,
            environment.as_ref(),
            listen,
            &access_key_id,
        )
        .as_bytes(),
        false,
    )?;
    write_file(
        &dir.join("kms-console.json"),
        kms_console_json(URI_PREFIX, &access_key_id, &secret).as_bytes(),
        true,
    )?;
    write_file(
        &dir.join("test-client.env"),
        test_client_env(listen, &access_key_id, &secret, &ca_certificate).as_bytes(),
        true,
    )?;
    Ok(Prepared {
        dir: dir.clone(),
        config,
        ca_certificate,
        access_key_id: access_key_id.to_string(),
        listen,
        environment,
    })
}

/// Initializes the quickstart token on a free slot unless it exists.
fn init_token(module: &Path, pin: &str, so_pin: &str) -> Result<(), QuickstartError> {
    let pkcs11 = Pkcs11::new(module).map_err(ck("loading the PKCS#11 module"))?;
    initialize(&pkcs11).map_err(ck("C_Initialize"))?;
    let slots = pkcs11.get_all_slots().map_err(ck("C_GetSlotList"))?;
    let mut free = None;
    for slot in slots {
        let Ok(info) = pkcs11.get_token_info(slot) else {
            continue;
        };
        if info.token_initialized() && info.label().trim_end() == TOKEN_LABEL {
            return Ok(());
        }
        if !info.token_initialized() && free.is_none() {
            free = Some(slot);
        }
    }
    let slot = free.ok_or(QuickstartError::Hsm {
        step: "initializing the token",
        detail: "no slot with an uninitialized token (the module offers none to C_InitToken)"
            .into(),
    })?;
    let so_pin = AuthPin::new(so_pin.into());
    pkcs11
        .init_token(slot, &so_pin, TOKEN_LABEL)
        .map_err(ck("C_InitToken"))?;
    // The slot id changes once the token is initialized: look it up again by label.
    let slot = pkcs11
        .get_slots_with_token()
        .map_err(ck("C_GetSlotList"))?
        .into_iter()
        .find(|s| {
            pkcs11
                .get_token_info(*s)
                .is_ok_and(|i| i.label().trim_end() == TOKEN_LABEL)
        })
        .ok_or(QuickstartError::Hsm {
            step: "initializing the token",
            detail: "token vanished after C_InitToken".into(),
        })?;
    let session = pkcs11.open_rw_session(slot).map_err(ck("C_OpenSession"))?;
    session
        .login(UserType::So, Some(&so_pin))
        .map_err(ck("C_Login as SO"))?;
    session
        .init_pin(&AuthPin::new(pin.into()))
        .map_err(ck("C_InitPIN"))?;
    session.logout().map_err(ck("C_Logout"))?;
    Ok(())
}

fn create_keys(module: &Path, pin: &str) -> Result<(), QuickstartError> {
    let (_pkcs11, _slot, session) =
        open_token(module, &TokenSelector::Label(TOKEN_LABEL.into()), pin)
            .map_err(hsm("opening the quickstart token"))?;
    let health = (HEALTH_CHECK_KEY, true, true);
    for (id, encrypt, decrypt) in KEYS.into_iter().chain([health]) {
        match create_key(&session, id, NewKeyUsage { encrypt, decrypt }) {
            Ok(()) | Err(HsmError::AmbiguousKey) => {} // exists already
            Err(e) => return Err(hsm("creating a key")(e)),
        }
    }
    Ok(())
}

/// The server certificate's lifetime: a year, like a public CA's, so that the
/// expiry metric (`xks_tls_certificate_days_to_expiry`) and its alert see a real date.
pub const SERVER_CERTIFICATE_DAYS: i64 = 365;
/// The local CA outlives the certificates it signs.
const CA_CERTIFICATE_DAYS: i64 = 10 * 365;
/// Rerunning the quickstart renews a certificate that expires sooner than this.
const RENEW_WITHIN_DAYS: u64 = 30;

/// Makes a local CA and a server certificate for `localhost`, or keeps the ones there
/// unless the server certificate expires within [`RENEW_WITHIN_DAYS`]: rerunning the
/// quickstart is how they are renewed (a running proxy reloads the new files).
fn certificates(dir: &Path) -> Result<(), QuickstartError> {
    let files = ["ca.pem", "ca-key.pem", "server.pem", "server-key.pem"].map(|f| dir.join(f));
    if files.iter().all(|f| f.exists()) {
        let renew_by =
            SystemTime::now() + std::time::Duration::from_secs(RENEW_WITHIN_DAYS * 86_400);
        match crate::server::tls::certificate_not_after(&files[2]) {
            Ok(not_after) if not_after > renew_by => return Ok(()),
            _ => tracing::info!("renewing the quickstart's certificates (expired or expiring)"),
        }
    }
    let valid_for = |params: &mut rcgen::CertificateParams, days: i64| {
        let now = time::OffsetDateTime::now_utc();
        // An hour back: a client whose clock runs a little behind accepts it at once.
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(days);
    };
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    valid_for(&mut ca, CA_CERTIFICATE_DAYS);
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "xks-proxy quickstart CA");
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    let server_key = rcgen::KeyPair::generate()?;
    let mut server = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])?;
    server
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    server.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    valid_for(&mut server, SERVER_CERTIFICATE_DAYS);
    let server_cert = server.signed_by(&server_key, &ca_cert, &ca_key)?;
    write_file(&files[0], ca_cert.pem().as_bytes(), false)?;
    write_file(&files[1], ca_key.serialize_pem().as_bytes(), true)?;
    write_file(&files[2], server_cert.pem().as_bytes(), false)?;
    write_file(&files[3], server_key.serialize_pem().as_bytes(), true)?;
    Ok(())
}

fn config_toml(
    dir: &Path,
    module: &Path,
    token: SoftToken,
    environment: Option<&(&'static str, PathBuf)>,
    listen: SocketAddr,
    access_key_id: &str,
) -> String {
    let environment = match environment {
        Some((name, value)) => format!("\n[hsm.environment]\n{name} = \"{}\"\n", value.display()),
        None => String::new(),
    };
    // SoftHSM2's numbers (perf/steps.md); other modules start from the same and are tuned
    // with `xks-proxy hsm probe` / docs/capacity.md.
    let sessions = match token {
        SoftToken::SoftHsm2 => {
            "# SoftHSM2 pins sessions to one lock; two sessions is its sweet spot."
        }
        _ => "# Two sessions to start with; docs/capacity.md says how to size them.",
    };
    let copies = match token {
        SoftToken::SoftHsm2 => {
            "# SoftHSM2 re-reads a token key's file on every use; a session copy avoids that."
        }
        _ => "# A session copy of each key (C_CopyObject); config/VENDORS.md.",
    };
    let keys = KEYS
        .iter()
        .map(|(id, _, _)| format!("{id:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"# Written by `xks-proxy quickstart`: a local proxy on a {token_name} token.
# Serve it with: xks-proxy serve --config {config}

[server]
listen = "{listen}"
tls_certificate = "server.pem"
tls_private_key = "server-key.pem"
# Every request is answered within this (KMS waits 250 ms; see docs/operations.md,
# The latency budget).
request_deadline_ms = 100
# true: one tokio worker held on each CPU, the session threads spread over them. p99
# comes closer to the mean when a load generator shares the box (perf/steps.md,
# "SoftHSM2 without its locks (no), and the busy threads held on CPUs (yes)"); the
# perf/ scripts turn it on.
pin_threads = false

# Prometheus metrics (/metrics) and probes (/livez, /readyz), plain HTTP, local only.
[admin]
listen = "{admin}"

[proxy]
fleet_size = 1

[hsm]
backend = "pkcs11"
module = "{module}"
token_label = "{TOKEN_LABEL}"
pin_file = "hsm-pin"
{sessions}
sessions = 2
{copies}
session_key_copies = true
# The health monitor's encrypt+decrypt key (in no key store).
health_check_key = "{HEALTH_CHECK_KEY}"
{environment}
[[key_store]]
name = "quickstart"
uri_prefix = "{URI_PREFIX}"
region = "{REGION}"
keys = [{keys}]

[[key_store.credential]]
access_key_id = "{access_key_id}"
secret_access_key_file = "sigv4-secret"
"#,
        config = dir.join("config.toml").display(),
        admin = admin_listen(listen),
        module = module.display(),
        token_name = token.name(),
    )
}

/// The variables aws-samples/aws-kms-xksproxy-test-client reads.
fn test_client_env(listen: SocketAddr, access_key_id: &str, secret: &str, ca: &Path) -> String {
    let host = if listen.ip().is_unspecified() || listen.ip().is_loopback() {
        format!("localhost:{}", listen.port())
    } else {
        listen.to_string()
    };
    let mut env = String::from("# Source with: set -a; . ./test-client.env; set +a\n");
    let [key, encrypt_only, decrypt_only, impotent] = KEYS.map(|k| k.0);
    for (name, value) in [
        ("XKS_PROXY_HOST", host.as_str()),
        ("URI_PREFIX", URI_PREFIX),
        ("SIGV4_ACCESS_KEY_ID", access_key_id),
        ("SIGV4_SECRET_ACCESS_KEY", secret),
        ("KEY_ID", key),
        ("ENCRYPT_ONLY_KEY_ID", encrypt_only),
        ("DECRYPT_ONLY_KEY_ID", decrypt_only),
        ("IMPOTENT_KEY_ID", impotent),
        ("CACERT", &ca.display().to_string()),
        ("SECURE", &format!("--cacert {}", ca.display())),
    ] {
        let _ = writeln!(env, "{name}=\"{value}\"");
    }
    env
}

/// A ready-to-paste curl command for GetHealthStatus.
pub fn curl_example(prepared: &Prepared, port: u16) -> String {
    format!(
        "curl --cacert {ca} --aws-sigv4 \"aws:amz:{REGION}:kms-xks-proxy\" \\\n  \
         --user \"{akid}:$(cat {secret})\" -H 'Content-Type: application/json' \\\n  \
         -d '{{\"requestMetadata\":{{\"kmsRequestId\":\"1\",\"kmsOperation\":\"KmsHealthCheck\"}}}}' \\\n  \
         https://localhost:{port}/{URI_PREFIX}/kms/xks/v1/health",
        ca = prepared.ca_certificate.display(),
        akid = prepared.access_key_id,
        secret = prepared.dir.join("sigv4-secret").display(),
    )
}

fn reuse_or_create_secret(
    path: &Path,
    create: impl FnOnce() -> Result<Zeroizing<String>, QuickstartError>,
) -> Result<Zeroizing<String>, QuickstartError> {
    if path.exists() {
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io(path))?);
        return Ok(Zeroizing::new(text.trim_end().to_owned()));
    }
    let value = create()?;
    write_file(path, value.as_bytes(), true)?;
    Ok(value)
}

fn random_bytes<const N: usize>() -> Result<Zeroizing<[u8; N]>, QuickstartError> {
    let mut bytes = Zeroizing::new([0u8; N]);
    aws_lc_rs::rand::fill(bytes.as_mut()).map_err(|_| QuickstartError::Random)?;
    Ok(bytes)
}

fn random_hex(len: usize) -> Result<Zeroizing<String>, QuickstartError> {
    let bytes = random_bytes::<32>()?;
    Ok(Zeroizing::new(hex::encode(&bytes[..len / 2])))
}

/// A SigV4 secret: 32 random bytes in Base64 (44 characters, within the spec's 43–64).
pub fn random_secret() -> Result<Zeroizing<String>, QuickstartError> {
    let bytes = random_bytes::<32>()?;
    Ok(Zeroizing::new(STANDARD.encode(bytes.as_ref())))
}

/// The spec's "XKS proxy configuration file" that the KMS console imports.
/// `uri_prefix` is the key store's prefix without the leading slash (may be empty).
pub fn kms_console_json(uri_prefix: &str, access_key_id: &str, secret: &str) -> String {
    let path = if uri_prefix.trim_matches('/').is_empty() {
        "/kms/xks/v1".to_owned()
    } else {
        format!("/{}/kms/xks/v1", uri_prefix.trim_matches('/'))
    };
    let console = serde_json::json!({
        "XksProxyUriPath": path,
        "XksProxyAuthenticationCredential": {
            "AccessKeyId": access_key_id,
            "RawSecretAccessKey": secret,
        }
    });
    serde_json::to_string_pretty(&console).expect("a JSON value serializes")
}

/// 26 characters of the spec's access key id alphabet (A–Z, 2–7): 130 random bits.
pub fn random_access_key_id() -> Result<Zeroizing<String>, QuickstartError> {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let bytes = random_bytes::<26>()?;
    Ok(Zeroizing::new(
        bytes
            .iter()
            .map(|b| char::from(ALPHABET[usize::from(b % 32)]))
            .collect(),
    ))
}

fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<(), QuickstartError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if secret {
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io(path))?;
    file.write_all(contents).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn days_left(path: &Path) -> f64 {
        let not_after = crate::server::tls::certificate_not_after(path).unwrap();
        not_after
            .duration_since(SystemTime::now())
            .unwrap()
            .as_secs_f64()
            / 86_400.0
    }

    #[test]
    fn the_certificate_lives_a_year_and_a_rerun_renews_it_only_when_it_expires_soon() {
        let dir = tempfile::tempdir().unwrap();
        certificates(dir.path()).unwrap();
        let server = dir.path().join("server.pem");
        let days = days_left(&server);
        assert!((364.9..=365.1).contains(&days), "{days} days");
        // A rerun keeps a certificate with time left.
        let first = std::fs::read(&server).unwrap();
        certificates(dir.path()).unwrap();
        assert_eq!(std::fs::read(&server).unwrap(), first);
        // One that expires in ten days is renewed for a year.
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(10);
        std::fs::write(&server, params.self_signed(&key).unwrap().pem()).unwrap();
        assert!(days_left(&server) < 11.0);
        certificates(dir.path()).unwrap();
        let days = days_left(&server);
        assert!((364.9..=365.1).contains(&days), "{days} days");
    }

    #[test]
    fn each_soft_token_gets_its_own_configuration_and_variable() {
        assert_eq!(
            SoftToken::of(Path::new("/usr/lib/softhsm/libsofthsm2.so")),
            SoftToken::SoftHsm2
        );
        assert_eq!(
            SoftToken::of(Path::new("/c/kryoptic/1.5.4/libkryoptic_pkcs11.so")),
            SoftToken::Kryoptic
        );
        assert_eq!(
            SoftToken::of(Path::new("/opt/vendor/libCryptoki2_64.so")),
            SoftToken::Other
        );
        let dir = tempfile::tempdir().unwrap();
        let (name, conf) = SoftToken::Kryoptic.configure(dir.path()).unwrap().unwrap();
        assert_eq!(name, "KRYOPTIC_CONF");
        let text = std::fs::read_to_string(&conf).unwrap();
        let parsed: toml::Value = toml::from_str(&text).unwrap();
        let slots = parsed["slots"].as_array().unwrap();
        assert_eq!(slots.len(), 2, "one slot for the token, one free: {text}");
        for (slot, number) in slots.iter().zip(KRYOPTIC_SLOTS) {
            assert_eq!(slot["slot"].as_integer(), Some(i64::from(number)));
            assert_eq!(slot["dbtype"].as_str(), Some("sqlite"));
            let db = dir.path().join(format!("tokens/slot{number}.sql"));
            assert_eq!(slot["dbargs"].as_str(), db.to_str());
        }
        let (name, conf) = SoftToken::SoftHsm2.configure(dir.path()).unwrap().unwrap();
        assert_eq!(name, "SOFTHSM2_CONF");
        let text = std::fs::read_to_string(conf).unwrap();
        let tokendir = format!(
            "directories.tokendir = {}",
            dir.path().join("tokens").display()
        );
        assert!(text.lines().any(|l| l == tokendir), "{text}");
        assert!(SoftToken::Other.configure(dir.path()).unwrap().is_none());
    }

    #[test]
    fn access_key_ids_follow_the_spec() {
        for _ in 0..20 {
            let id = random_access_key_id().unwrap();
            assert!(
                crate::config::is_valid_access_key_id(&id),
                "{}",
                id.as_str()
            );
        }
    }

    #[test]
    fn test_client_env_has_the_clients_variables() {
        let env = test_client_env(
            "127.0.0.1:8443".parse().unwrap(),
            "AKID",
            "SECRET",
            Path::new("/q/ca.pem"),
        );
        for line in [
            "XKS_PROXY_HOST=\"localhost:8443\"",
            "URI_PREFIX=\"example/uri/path/prefix\"",
            "KEY_ID=\"foo\"",
            "IMPOTENT_KEY_ID=\"impotent_key\"",
            "SECURE=\"--cacert /q/ca.pem\"",
        ] {
            assert!(env.lines().any(|l| l == line), "{line} missing from\n{env}");
        }
    }
}
