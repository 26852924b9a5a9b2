//! The `[hsm]` section validated into a backend: PKCS#11 EKMs, software keys or the
//! simulated HSM.

use super::*;

pub(super) fn simulated(
    hsm: &HsmSection,
) -> Result<crate::hsm::simulated::SimulatedSettings, ConfigError> {
    use crate::hsm::simulated::{Latency, SimulatedSettings};
    let section = hsm.simulated.as_ref().ok_or_else(|| {
        invalid(
            "hsm.simulated",
            "the simulated backend needs [hsm.simulated] with distribution and mean_ms",
        )
    })?;
    let ms = |v: f64, field: &str| {
        if v.is_finite() && (0.0..=3_600_000.0).contains(&v) {
            Ok(Duration::from_secs_f64(v / 1000.0))
        } else {
            Err(invalid(
                format!("hsm.simulated.{field}"),
                "milliseconds between 0 and 3600000",
            ))
        }
    };
    let mean = ms(section.mean_ms, "mean_ms")?;
    let stddev = ms(section.stddev_ms, "stddev_ms")?;
    let latency = match section.distribution {
        Distribution::Fixed => Latency::Fixed(mean),
        Distribution::Normal => Latency::Normal { mean, stddev },
        Distribution::Lognormal if mean.is_zero() => {
            return Err(invalid(
                "hsm.simulated.mean_ms",
                "a lognormal distribution needs a mean above zero",
            ))
        }
        Distribution::Lognormal => Latency::LogNormal { mean, stddev },
    };
    if hsm.sessions == 0 || hsm.sessions > 4096 {
        return Err(invalid("hsm.sessions", "must be between 1 and 4096"));
    }
    if hsm.queue_depth == 0 {
        return Err(invalid("hsm.queue_depth", "must be at least 1"));
    }
    Ok(SimulatedSettings {
        parallelism: hsm.sessions,
        max_replacement_sessions: hsm.max_replacement_sessions.unwrap_or(hsm.sessions),
        queue_depth: hsm.queue_depth,
        call_timeout: Duration::from_millis(hsm.call_timeout_ms),
        latency,
        key_latency: section
            .key_latency
            .iter()
            .map(|k| (k.id.clone(), Duration::from_millis(k.latency_ms)))
            .collect(),
        keys: software_keys(hsm)?,
    })
}

/// The EKMs of a PKCS#11 configuration: each `[[hsm.ekm]]`, or `[hsm]` itself.
pub(super) fn pkcs11_fleet(
    hsm: &HsmSection,
    base: &Path,
) -> Result<Vec<Pkcs11Settings>, ConfigError> {
    if hsm.ekms.is_empty() {
        let one = EkmSection {
            module: None,
            token_label: hsm.token_label.clone(),
            token_serial: hsm.token_serial.clone(),
            pin_file: None,
            pin_env: None,
            pin: None,
            sessions: None,
        };
        return Ok(vec![pkcs11_settings(hsm, &one, "hsm", base)?]);
    }
    if hsm.ekms.len() > crate::hsm::fleet::MAX_EKMS {
        return Err(invalid(
            "hsm.ekm",
            format!("at most {} EKMs per key store", crate::hsm::fleet::MAX_EKMS),
        ));
    }
    if hsm.token_label.is_some() || hsm.token_serial.is_some() {
        return Err(invalid(
            "hsm.token_label",
            "with [[hsm.ekm]], name each token in its [[hsm.ekm]] table",
        ));
    }
    let settings = hsm
        .ekms
        .iter()
        .enumerate()
        .map(|(i, ekm)| pkcs11_settings(hsm, ekm, &format!("hsm.ekm[{i}]"), base))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, a) in settings.iter().enumerate() {
        if settings[..i]
            .iter()
            .any(|b| a.module == b.module && a.token == b.token)
        {
            return Err(invalid(
                format!("hsm.ekm[{i}]"),
                "names the same token as an earlier [[hsm.ekm]]",
            ));
        }
    }
    Ok(settings)
}

pub(super) fn pkcs11_settings(
    hsm: &HsmSection,
    ekm: &EkmSection,
    field: &str,
    base: &Path,
) -> Result<Pkcs11Settings, ConfigError> {
    let module = ekm.module.as_ref().or(hsm.module.as_ref()).ok_or_else(|| {
        invalid(
            format!("{field}.module"),
            "required: the path of the PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so",
        )
    })?;
    let token = match (&ekm.token_label, &ekm.token_serial) {
        (Some(label), None) => TokenSelector::Label(label.clone()),
        (None, Some(serial)) => TokenSelector::Serial(serial.clone()),
        _ => {
            return Err(invalid(
                format!("{field}.token_label"),
                "set exactly one of token_label and token_serial",
            ))
        }
    };
    // The EKM's own PIN if it names one, else the one of [hsm].
    let own_pin = ekm.pin_file.is_some() || ekm.pin_env.is_some() || ekm.pin.is_some();
    let (pin_field, pin_file, pin_env, pin_inline) = if own_pin {
        (
            format!("{field}.pin"),
            &ekm.pin_file,
            &ekm.pin_env,
            &ekm.pin,
        )
    } else {
        ("hsm.pin".to_owned(), &hsm.pin_file, &hsm.pin_env, &hsm.pin)
    };
    if let Some(path) = pin_file {
        warn_if_readable_by_others(&base.join(path), "");
    }
    let pin = secret(
        &pin_field,
        pin_file.as_deref().map(|p| base.join(p)),
        pin_env.as_deref(),
        pin_inline.as_deref(),
    )?;
    // An empty PIN is a missing secret (an empty file, an unfilled Kubernetes Secret),
    // never a token's PIN: refused here, before a login that HSMs count towards
    // locking the partition.
    if pin.is_empty() {
        return Err(invalid(
            pin_field,
            "is empty: the PIN file (or variable) has no content",
        ));
    }
    let sessions = ekm.sessions.unwrap_or(hsm.sessions);
    if sessions == 0 || sessions > 1024 {
        return Err(invalid(
            format!("{field}.sessions"),
            "must be between 1 and 1024",
        ));
    }
    if hsm.queue_depth == 0 {
        return Err(invalid("hsm.queue_depth", "must be at least 1"));
    }
    if hsm.max_replacement_sessions.is_some_and(|n| n > 1024) {
        return Err(invalid(
            "hsm.max_replacement_sessions",
            "must be at most 1024",
        ));
    }
    Ok(Pkcs11Settings {
        module: base.join(module),
        token,
        pin,
        sessions,
        queue_depth: hsm.queue_depth,
        iv_source: hsm.iv_source,
        session_key_copies: hsm.session_key_copies,
        key_refresh: Duration::from_secs(hsm.key_refresh_seconds),
        call_timeout: Duration::from_millis(hsm.call_timeout_ms),
        read_write_sessions: hsm.read_write_sessions,
        trace: hsm.trace,
        max_replacement_sessions: hsm.max_replacement_sessions.unwrap_or(sessions),
        faults: None,
    })
}

pub(super) fn software_keys(
    hsm: &HsmSection,
) -> Result<Vec<crate::hsm::software::SoftwareKeySpec>, ConfigError> {
    tracing::warn!(
        "the software and simulated backends keep keys in process memory: not for production"
    );
    hsm.software_keys
        .iter()
        .enumerate()
        .map(|(i, key)| {
            let field = format!("hsm.software_key[{i}]");
            if !is_valid_key_id(&key.id) {
                return Err(invalid(format!("{field}.id"), KEY_ID_RULE));
            }
            let usages = key
                .usage
                .iter()
                .map(|u| {
                    parse_usage(u).ok_or_else(|| {
                        invalid(
                            format!("{field}.usage"),
                            "use ENCRYPT, DECRYPT, SIGN, VERIFY, WRAP, UNWRAP or DERIVE",
                        )
                    })
                })
                .collect::<Result<_, _>>()?;
            Ok(crate::hsm::software::SoftwareKeySpec {
                id: key.id.clone(),
                material: None,
                usages,
                enabled: key.enabled,
            })
        })
        .collect()
}

pub(super) fn parse_usage(usage: &str) -> Option<KeyUsage> {
    Some(match usage {
        "ENCRYPT" => KeyUsage::Encrypt,
        "DECRYPT" => KeyUsage::Decrypt,
        "SIGN" => KeyUsage::Sign,
        "VERIFY" => KeyUsage::Verify,
        "WRAP" => KeyUsage::Wrap,
        "UNWRAP" => KeyUsage::Unwrap,
        "DERIVE" => KeyUsage::Derive,
        _ => return None,
    })
}
