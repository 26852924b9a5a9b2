//! Key administration for `xks-proxy keys`: create, rotate, destroy, list, enable and
//! disable keys on the token.

use cryptoki::context::Function;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use cryptoki::session::Session;

use super::{errors::*, objects::*};
use crate::hsm::{HsmError, KeyMetadata, KeyUsage};

/// Rotates an external key: creates version N+1 with the current version's usages,
/// which makes it current. Returns the new version.
pub fn rotate_key(session: &Session, key_id: &str) -> Result<u32, HsmError> {
    let current = current_version(session, key_id).map_err(unexpected(Function::FindObjects))?;
    let label = crate::hsm::version_label(key_id, current);
    let handle = match find_secret_keys(session, &label)
        .map_err(unexpected(Function::FindObjects))?
        .as_slice()
    {
        [handle] => *handle,
        [] => return Err(HsmError::KeyNotFound),
        _ => return Err(HsmError::AmbiguousKey),
    };
    let metadata = metadata_from_attributes(
        &session
            .get_attributes(handle, &KEY_ATTRIBUTES)
            .map_err(unexpected(Function::GetAttributeValue))?,
        false,
    );
    let usage = NewKeyUsage {
        encrypt: metadata.usages.contains(&KeyUsage::Encrypt),
        decrypt: metadata.usages.contains(&KeyUsage::Decrypt),
    };
    let next = current + 1;
    create_key(session, &crate::hsm::version_label(key_id, next), usage)?;
    Ok(next)
}

/// Usages a key created by `xks-proxy keys create` gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewKeyUsage {
    /// CKA_ENCRYPT.
    pub encrypt: bool,
    /// CKA_DECRYPT.
    pub decrypt: bool,
}

/// Creates an AES-256 key labelled with the external key id: a token object, private,
/// sensitive and never extractable. Fails if a key with that label exists.
pub fn create_key(session: &Session, key_id: &str, usage: NewKeyUsage) -> Result<(), HsmError> {
    let existing = find_secret_keys(session, key_id).map_err(unexpected(Function::FindObjects))?;
    if !existing.is_empty() {
        return Err(HsmError::AmbiguousKey);
    }
    let template = [
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Modifiable(true),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Label(key_id.as_bytes().to_vec()),
        Attribute::Id(key_id.as_bytes().to_vec()),
        Attribute::Encrypt(usage.encrypt),
        Attribute::Decrypt(usage.decrypt),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
    ];
    session
        .generate_key(&Mechanism::AesKeyGen, &template)
        .map_err(unexpected(Function::GenerateKey))?;
    Ok(())
}

/// Destroys the key labelled `key_id` and its disabled marker.
pub fn destroy_key(session: &Session, key_id: &str) -> Result<(), HsmError> {
    let keys = find_secret_keys(session, key_id).map_err(unexpected(Function::FindObjects))?;
    match keys.as_slice() {
        [key] => session
            .destroy_object(*key)
            .map_err(unexpected(Function::DestroyObject))?,
        [] => return Err(HsmError::KeyNotFound),
        _ => return Err(HsmError::AmbiguousKey),
    }
    for marker in session
        .find_objects(&marker_template(key_id))
        .map_err(unexpected(Function::FindObjects))?
    {
        session
            .destroy_object(marker)
            .map_err(unexpected(Function::DestroyObject))?;
    }
    Ok(())
}

/// Lists secret keys on the token by label with their metadata.
pub fn list_keys(session: &Session) -> Result<Vec<(String, KeyMetadata)>, HsmError> {
    let handles = session
        .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])
        .map_err(unexpected(Function::FindObjects))?;
    let mut keys = Vec::with_capacity(handles.len());
    for handle in handles {
        let label = session
            .get_attributes(handle, &[AttributeType::Label])
            .map_err(unexpected(Function::GetAttributeValue))?
            .into_iter()
            .find_map(|a| match a {
                Attribute::Label(l) => Some(String::from_utf8_lossy(&l).into_owned()),
                _ => None,
            })
            .unwrap_or_default();
        let attributes = session
            .get_attributes(handle, &KEY_ATTRIBUTES)
            .map_err(unexpected(Function::GetAttributeValue))?;
        let disabled = is_disabled(session, &label).map_err(unexpected(Function::FindObjects))?;
        keys.push((label, metadata_from_attributes(&attributes, disabled)));
    }
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(keys)
}

/// Enables or disables a key by destroying or creating its disabled marker (see
/// `metadata_from_attributes`). Idempotent.
pub fn set_key_enabled(session: &Session, key_id: &str, enabled: bool) -> Result<(), HsmError> {
    let keys = find_secret_keys(session, key_id).map_err(unexpected(Function::FindObjects))?;
    if keys.is_empty() {
        return Err(HsmError::KeyNotFound);
    }
    let markers = session
        .find_objects(&marker_template(key_id))
        .map_err(unexpected(Function::FindObjects))?;
    if enabled {
        for marker in markers {
            session
                .destroy_object(marker)
                .map_err(unexpected(Function::DestroyObject))?;
        }
    } else if markers.is_empty() {
        let mut template = marker_template(key_id).to_vec();
        template.extend([
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Value(b"DISABLED".to_vec()),
        ]);
        session
            .create_object(&template)
            .map_err(unexpected(Function::CreateObject))?;
    }
    Ok(())
}

/// One `xks-proxy keys` action on an external key id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyAction {
    /// Create an AES-256 key with these usages.
    Create {
        /// External key id.
        id: String,
        /// Usages.
        usage: NewKeyUsage,
    },
    /// List the token's secret keys.
    List,
    /// Mark the key disabled (every version).
    Disable(String),
    /// Remove the disabled marker.
    Enable(String),
    /// Create the next version.
    Rotate(String),
    /// Destroy the key (every version).
    Destroy(String),
}

/// Why a key action could not be done, in words for the operator.
#[derive(Debug, thiserror::Error)]
pub enum KeyAdminError {
    /// The configuration's backend has no token.
    #[error("`keys` manages keys on a PKCS#11 token; this configuration uses the {0} backend")]
    NoToken(&'static str),
    /// Not an external key id the API could name.
    #[error("an external key id is 1 to 128 characters of A-Z, a-z, 0-9, '-', '.' and '_'")]
    InvalidId,
    /// Create found the label taken.
    #[error("a key labelled {0:?} exists already")]
    Exists(String),
    /// Rotate found no key.
    #[error("no key labelled {0:?}")]
    NotFound(String),
    /// The token refused or failed.
    #[error(transparent)]
    Hsm(#[from] HsmError),
}

/// What a key action reports: lines for standard output, and a note for standard error.
#[derive(Debug, Default)]
pub struct KeyReport {
    /// Which EKM was acted on, when the configuration has several.
    pub note: Option<String>,
    /// The result, a line each.
    pub lines: Vec<String>,
}

/// Does `action` on the first EKM of `backend`. HSM clusters replicate keys among their
/// members; on tokens that do not, run the command against each token's configuration.
pub fn administer(
    backend: &crate::hsm::BackendConfig,
    action: KeyAction,
) -> Result<KeyReport, KeyAdminError> {
    let ekms = match backend {
        crate::hsm::BackendConfig::Pkcs11(ekms) => ekms,
        crate::hsm::BackendConfig::Software(_) => return Err(KeyAdminError::NoToken("software")),
        crate::hsm::BackendConfig::Simulated(_) => return Err(KeyAdminError::NoToken("simulated")),
    };
    let settings = &ekms[0];
    let mut report = KeyReport {
        note: (ekms.len() > 1).then(|| {
            format!(
                "acting on the first of {} EKMs ({}); an HSM cluster replicates the change to the others",
                ekms.len(),
                settings.token
            )
        }),
        lines: Vec::new(),
    };
    let (_pkcs11, _slot, session) =
        super::open_token(&settings.module, &settings.token, &settings.pin)?;
    let line = match action {
        KeyAction::Create { id, usage } => {
            if !crate::router::is_valid_key_id(&id) {
                return Err(KeyAdminError::InvalidId);
            }
            match create_key(&session, &id, usage) {
                Err(HsmError::AmbiguousKey) => return Err(KeyAdminError::Exists(id)),
                other => other?,
            }
            format!(
                "created {id} (AES-256, encrypt={}, decrypt={})",
                usage.encrypt, usage.decrypt
            )
        }
        KeyAction::List => {
            report.lines = list_keys(&session)?
                .into_iter()
                .map(|(label, metadata)| {
                    let usages: Vec<_> = metadata.usages.iter().map(|u| u.as_str()).collect();
                    let state = if metadata.enabled {
                        "ENABLED"
                    } else {
                        "DISABLED"
                    };
                    format!(
                        "{label}\t{}\t{state}\t{}",
                        metadata.key_spec.name(),
                        usages.join(",")
                    )
                })
                .collect();
            return Ok(report);
        }
        KeyAction::Disable(id) => {
            set_key_enabled(&session, &id, false)?;
            format!("disabled {id}")
        }
        KeyAction::Enable(id) => {
            set_key_enabled(&session, &id, true)?;
            format!("enabled {id}")
        }
        KeyAction::Rotate(id) => {
            let version = match rotate_key(&session, &id) {
                Err(HsmError::KeyNotFound) => return Err(KeyAdminError::NotFound(id)),
                other => other?,
            };
            format!(
                "rotated {id}: version {version} ({}) is current",
                crate::hsm::version_label(&id, version)
            )
        }
        KeyAction::Destroy(id) => {
            destroy_key(&session, &id)?;
            format!("destroyed {id}")
        }
    };
    report.lines.push(line);
    Ok(report)
}
