//! Secrets (the PIN, SigV4 secrets) from a file, an environment variable or inline,
//! and the rules a SigV4 credential follows.

use super::*;

/// Warns when a file that holds secrets can be read by group or others. `text` is the
/// file's content when known: a configuration file without inline secrets is fine.
pub(super) fn warn_if_readable_by_others(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    let holds_secrets = text.is_empty()
        || text.lines().any(|l| {
            let l = l.trim_start();
            l.starts_with("pin ")
                || l.starts_with("pin=")
                || l.starts_with("secret_access_key ")
                || l.starts_with("secret_access_key=")
        });
    if !holds_secrets {
        return;
    }
    if let Ok(metadata) = std::fs::metadata(path) {
        let mode = metadata.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                file = %path.display(),
                mode = format!("{:o}", mode & 0o777),
                "a file holding secrets is readable by group or others; chmod 600 it"
            );
        }
    }
}

/// spec Appendix A: 20–30 characters, `A`–`Z` and `2`–`7` only.
pub fn is_valid_access_key_id(id: &str) -> bool {
    (20..=30).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
}

/// spec (XKS proxy configuration file): 43–64 characters of `A-Za-z0-9+/=`.
pub fn is_valid_secret(secret: &str) -> bool {
    (43..=64).contains(&secret.len())
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
}

/// Reads a secret from exactly one of a file, an environment variable or inline.
pub(super) fn secret(
    field: &str,
    file: Option<PathBuf>,
    env: Option<&str>,
    inline: Option<&str>,
) -> Result<Zeroizing<String>, ConfigError> {
    match (file, env, inline) {
        (Some(path), None, None) => {
            let text = Zeroizing::new(std::fs::read_to_string(&path).map_err(|e| {
                invalid(
                    format!("{field}_file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?);
            Ok(Zeroizing::new(
                text.trim_end_matches(['\r', '\n']).to_owned(),
            ))
        }
        (None, Some(var), None) => std::env::var(var).map(Zeroizing::new).map_err(|_| {
            invalid(
                format!("{field}_env"),
                format!("environment variable {var} is not set"),
            )
        }),
        (None, None, Some(value)) => {
            tracing::warn!(field, "secret given inline in the configuration; prefer a file or an environment variable");
            Ok(Zeroizing::new(value.to_owned()))
        }
        _ => Err(invalid(
            field,
            format!("set exactly one of {field}_file, {field}_env and {field}"),
        )),
    }
}

/// What a file path may start with to name a file among the service's systemd
/// credentials (`LoadCredential=`): systemd copies them at start into a directory of
/// its own, readable only by the service, and passes its path in the environment
/// variable `CREDENTIALS_DIRECTORY`, so the configuration cannot name it literally.
pub(super) const CREDENTIALS_DIRECTORY: &str = "${CREDENTIALS_DIRECTORY}";

/// Replaces a leading [`CREDENTIALS_DIRECTORY`] in `path` by `dir` (the variable's
/// value). The name anywhere else in a path is an error, and so is a path that names
/// it while the variable is not set (started outside systemd, or without credentials).
pub(super) fn expand_credentials_directory(
    field: &str,
    path: &mut PathBuf,
    dir: Option<&Path>,
) -> Result<(), ConfigError> {
    let Some(text) = path.to_str() else {
        return Ok(());
    };
    let Some(rest) = text.strip_prefix(CREDENTIALS_DIRECTORY) else {
        if text.contains(CREDENTIALS_DIRECTORY) {
            return Err(invalid(
                field,
                format!("{CREDENTIALS_DIRECTORY} may only start a path"),
            ));
        }
        return Ok(());
    };
    let Some(dir) = dir else {
        return Err(invalid(
            field,
            format!(
                "names {CREDENTIALS_DIRECTORY}, but the environment variable CREDENTIALS_DIRECTORY is not set \
                 (systemd sets it for a unit with LoadCredential=)"
            ),
        ));
    };
    if !(rest.is_empty() || rest.starts_with('/')) {
        return Err(invalid(
            field,
            format!("write {CREDENTIALS_DIRECTORY}/NAME"),
        ));
    }
    *path = dir.join(rest.trim_start_matches('/'));
    Ok(())
}

impl FileConfig {
    /// Expands [`CREDENTIALS_DIRECTORY`] in every file path of the configuration.
    pub(super) fn expand_credentials_directory(
        &mut self,
        dir: Option<&Path>,
    ) -> Result<(), ConfigError> {
        let expand = expand_credentials_directory;
        expand(
            "server.tls_certificate",
            &mut self.server.tls_certificate,
            dir,
        )?;
        expand(
            "server.tls_private_key",
            &mut self.server.tls_private_key,
            dir,
        )?;
        if let Some(mtls) = &mut self.mtls {
            expand("mtls.ca_bundle", &mut mtls.ca_bundle, dir)?;
        }
        if let Some(authorization) = &mut self.authorization {
            expand(
                "authorization.policy_file",
                &mut authorization.policy_file,
                dir,
            )?;
        }
        if let Some(module) = &mut self.hsm.module {
            expand("hsm.module", module, dir)?;
        }
        if let Some(pin_file) = &mut self.hsm.pin_file {
            expand("hsm.pin_file", pin_file, dir)?;
        }
        for (i, ekm) in self.hsm.ekms.iter_mut().enumerate() {
            if let Some(module) = &mut ekm.module {
                expand(&format!("hsm.ekm[{i}].module"), module, dir)?;
            }
            if let Some(pin_file) = &mut ekm.pin_file {
                expand(&format!("hsm.ekm[{i}].pin_file"), pin_file, dir)?;
            }
        }
        for (i, store) in self.key_stores.iter_mut().enumerate() {
            for (j, credential) in store.credentials.iter_mut().enumerate() {
                if let Some(file) = &mut credential.secret_access_key_file {
                    expand(
                        &format!("key_store[{i}].credential[{j}].secret_access_key_file"),
                        file,
                        dir,
                    )?;
                }
            }
        }
        Ok(())
    }
}
