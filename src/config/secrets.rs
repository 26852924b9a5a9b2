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
