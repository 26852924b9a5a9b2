//! A quickstart folder: token, keys, credentials, certificates and config.

use std::path::PathBuf;
use std::process::Command;

use super::*;

/// A quickstart folder (token, keys, credentials, certificates, config).
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub access_key_id: String,
    pub secret: String,
}

impl Setup {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(BIN)
            .args([
                "quickstart",
                "--setup-only",
                "--listen",
                "127.0.0.1:0",
                "--module",
            ])
            .arg(module_path())
            .arg("--dir")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "quickstart on {:?} failed (is softhsm2 installed? run scripts/setup.sh):\n{}",
            module(),
            String::from_utf8_lossy(&out.stderr)
        );
        let read = |f: &str| {
            std::fs::read_to_string(dir.path().join(f))
                .unwrap()
                .trim()
                .to_owned()
        };
        Self {
            access_key_id: read("sigv4-access-key-id"),
            secret: read("sigv4-secret"),
            dir,
        }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    pub fn config(&self) -> PathBuf {
        self.path("config.toml")
    }

    /// Edits config.toml with a text replacement (asserting it matched).
    pub fn edit_config(&self, from: &str, to: &str) {
        let text = std::fs::read_to_string(self.config()).unwrap();
        assert!(text.contains(from), "{from:?} not in config");
        std::fs::write(self.config(), text.replacen(from, to, 1)).unwrap();
    }

    /// Runs `xks-proxy keys ...` against this folder's token.
    pub fn keys(&self, args: &[&str]) -> std::process::Output {
        let mut command = Command::new(BIN);
        command
            .arg("keys")
            .arg(args[0])
            .arg("--config")
            .arg(self.config());
        command.args(&args[1..]).output().unwrap()
    }

    pub fn start(self) -> Proxy {
        Proxy::start(self, &[])
    }

    /// Replaces config.toml with one for the simulated HSM (keys `foo`, `hang` in the
    /// key store; `health` for the health monitor), keeping this folder's certificates
    /// and credential. The extras are TOML lines added to `[server]`, `[hsm]` (which
    /// must include `[hsm.simulated]`) and `[[key_store]]`.
    pub fn simulated(&self, server: &str, hsm: &str, store: &str) {
        let config = format!(
            r#"[server]
listen = "127.0.0.1:0"
tls_certificate = "server.pem"
tls_private_key = "server-key.pem"
{server}

[admin]
listen = "127.0.0.1:0"

[hsm]
backend = "simulated"
{hsm}

[[hsm.software_key]]
id = "foo"
[[hsm.software_key]]
id = "hang"
[[hsm.software_key]]
id = "health"

[[key_store]]
name = "simulated"
uri_prefix = "example/uri/path/prefix"
region = "{REGION}"
keys = ["foo", "hang"]
{store}

[[key_store.credential]]
access_key_id = "{}"
secret_access_key_file = "sigv4-secret"
"#,
            self.access_key_id
        );
        std::fs::write(self.config(), config).unwrap();
    }
}
