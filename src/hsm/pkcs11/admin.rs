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
/// [`metadata_from_attributes`]). Idempotent.
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
