//! `[[key_store]]` validated: prefix, region, keys, credentials and quotas.

use super::*;

pub(super) const KEY_ID_RULE: &str =
    "an external key id is 1 to 128 characters of A-Z, a-z, 0-9, '-', '.' and '_'";

pub(super) fn key_store(
    store: KeyStoreSection,
    i: usize,
    base: &Path,
) -> Result<KeyStoreConfig, ConfigError> {
    let field = format!("key_store[{i}]");
    let uri_prefix = normalize_prefix(&store.uri_prefix)
        .map_err(|e| invalid(format!("{field}.uri_prefix"), e.to_string()))?;
    if store.region.is_empty()
        || !store
            .region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(invalid(
            format!("{field}.region"),
            "an AWS region such as us-east-1 (lowercase letters, digits and '-')",
        ));
    }
    if store.keys.is_empty() {
        return Err(invalid(
            format!("{field}.keys"),
            "list the external key ids this key store may use",
        ));
    }
    for key in &store.keys {
        if !is_valid_key_id(key) {
            return Err(invalid(
                format!("{field}.keys"),
                format!("{key:?}: {KEY_ID_RULE}"),
            ));
        }
    }
    if store.credentials.is_empty() {
        return Err(invalid(
            format!("{field}.credential"),
            "at least one [[key_store.credential]] is required",
        ));
    }
    let mut credentials = Vec::with_capacity(store.credentials.len());
    let mut credentials_created = Vec::with_capacity(store.credentials.len());
    for (j, credential) in store.credentials.into_iter().enumerate() {
        let cfield = format!("{field}.credential[{j}]");
        if !is_valid_access_key_id(&credential.access_key_id) {
            return Err(invalid(
                format!("{cfield}.access_key_id"),
                "must be 20 to 30 characters of A-Z and 2-7 (spec: Appendix A); `xks-proxy quickstart` generates one",
            ));
        }
        if credentials
            .iter()
            .any(|c: &crate::auth::Credential| c.access_key_id() == credential.access_key_id)
        {
            return Err(invalid(
                format!("{cfield}.access_key_id"),
                "the same access key id appears twice in this key store",
            ));
        }
        let secret = secret(
            &format!("{cfield}.secret_access_key"),
            credential
                .secret_access_key_file
                .as_deref()
                .map(|p| base.join(p)),
            credential.secret_access_key_env.as_deref(),
            credential.secret_access_key.as_deref(),
        )?;
        if !is_valid_secret(&secret) {
            return Err(invalid(
                format!("{cfield}.secret_access_key"),
                "must be 43 to 64 characters of A-Z, a-z, 0-9, '+', '/' and '=' (spec: XKS proxy configuration file)",
            ));
        }
        let created = match &credential.created {
            Some(date) => parse_date(date)
                .ok_or_else(|| invalid(format!("{cfield}.created"), "a date as YYYY-MM-DD"))?,
            None => credential
                .secret_access_key_file
                .as_deref()
                .and_then(|p| std::fs::metadata(base.join(p)).ok())
                .and_then(|m| m.modified().ok())
                .unwrap_or_else(SystemTime::now),
        };
        if let Some(path) = &credential.secret_access_key_file {
            warn_if_readable_by_others(&base.join(path), "");
        }
        credentials_created.push((credential.access_key_id.clone(), created));
        credentials.push(crate::auth::Credential::new(
            credential.access_key_id,
            secret,
        ));
    }
    let quota = match (store.max_requests_per_second, store.burst) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(invalid(
                format!("{field}.burst"),
                "only meaningful with max_requests_per_second",
            ))
        }
        (Some(rate), burst) => {
            let burst = burst.unwrap_or(rate);
            if !(rate.is_finite() && rate > 0.0) {
                return Err(invalid(
                    format!("{field}.max_requests_per_second"),
                    "must be a number above zero",
                ));
            }
            if !(burst.is_finite() && burst >= 1.0) {
                return Err(invalid(format!("{field}.burst"), "must be at least 1"));
            }
            Some((rate, burst))
        }
    };
    let aws_sample_metadata = match &store.aws_sample_ciphertext_metadata {
        None => None,
        Some(encoded) => {
            use base64::Engine;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .ok()
                .filter(|b| b.len() <= crate::xks::aad::MAX_METADATA_LEN)
                .ok_or_else(|| {
                    invalid(
                        format!("{field}.aws_sample_ciphertext_metadata"),
                        "Base64 of at most 20 bytes",
                    )
                })?;
            Some(bytes)
        }
    };
    Ok(KeyStoreConfig {
        name: store.name,
        uri_prefix,
        region: store.region,
        keys: store.keys,
        credentials,
        credentials_created,
        quota,
        aws_sample_metadata,
    })
}

/// `YYYY-MM-DD` as midnight UTC.
pub(super) fn parse_date(date: &str) -> Option<SystemTime> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let day = time::Date::parse(date, &format).ok()?;
    let seconds = day.midnight().assume_utc().unix_timestamp();
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).ok()?))
}
