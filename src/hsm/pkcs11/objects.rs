//! Objects on the token: the attributes GetKeyMetadata reads, the data objects that
//! mark keys disabled, and key versions.

use std::num::NonZeroUsize;

use cryptoki::error::Error as CkError;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use crate::hsm::{KeyMetadata, KeySpec, KeyUsage};

/// The attributes GetKeyMetadata and the usage checks need.
pub(super) const KEY_ATTRIBUTES: [AttributeType; 9] = [
    AttributeType::KeyType,
    AttributeType::ValueLen,
    AttributeType::Encrypt,
    AttributeType::Decrypt,
    AttributeType::Sign,
    AttributeType::Verify,
    AttributeType::Wrap,
    AttributeType::Unwrap,
    AttributeType::Derive,
];

/// CKA_APPLICATION of the data objects that mark keys disabled.
pub const DISABLED_MARKER_APPLICATION: &str = "xks-proxy/disabled";

/// Builds [`KeyMetadata`] from a key's attributes and whether a disabled marker exists.
///
/// PKCS#11 has no "disabled" attribute. Its validity dates (CKA_START_DATE/END_DATE)
/// would be the natural choice, but SoftHSM2 cannot read them back from private keys
/// once set (it stores them unencrypted and then tries to decrypt them). So a key is
/// DISABLED while the token holds a data object (CKO_DATA) whose CKA_APPLICATION is
/// [`DISABLED_MARKER_APPLICATION`] and whose CKA_LABEL is the external key id:
/// `xks-proxy keys disable` creates it, `enable` destroys it, and any PKCS#11 tool can.
pub(super) fn metadata_from_attributes(attributes: &[Attribute], disabled: bool) -> KeyMetadata {
    let mut key_type = None;
    let mut value_len = None;
    let mut usages = Vec::new();
    for attribute in attributes {
        match attribute {
            Attribute::KeyType(t) => key_type = Some(*t),
            Attribute::ValueLen(len) => value_len = Some(u64::from(*len)),
            Attribute::Encrypt(true) => usages.push(KeyUsage::Encrypt),
            Attribute::Decrypt(true) => usages.push(KeyUsage::Decrypt),
            Attribute::Sign(true) => usages.push(KeyUsage::Sign),
            Attribute::Verify(true) => usages.push(KeyUsage::Verify),
            Attribute::Wrap(true) => usages.push(KeyUsage::Wrap),
            Attribute::Unwrap(true) => usages.push(KeyUsage::Unwrap),
            Attribute::Derive(true) => usages.push(KeyUsage::Derive),
            _ => {}
        }
    }
    let key_spec = match (key_type, value_len) {
        (Some(KeyType::AES), Some(len)) => KeySpec::Aes(len.saturating_mul(8)),
        (Some(t), _) => KeySpec::Other(format!("{t}").to_uppercase().replace(' ', "_")),
        (None, _) => KeySpec::Unknown,
    };
    KeyMetadata {
        key_spec,
        usages,
        enabled: !disabled,
    }
}

pub(super) fn marker_template(key_id: &str) -> [Attribute; 3] {
    [
        Attribute::Class(ObjectClass::DATA),
        Attribute::Application(DISABLED_MARKER_APPLICATION.as_bytes().to_vec()),
        Attribute::Label(key_id.as_bytes().to_vec()),
    ]
}

/// The secret keys labelled `label`.
pub(super) fn find_secret_keys(
    session: &Session,
    label: &str,
) -> Result<Vec<ObjectHandle>, CkError> {
    session.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Label(label.as_bytes().to_vec()),
    ])
}

/// Whether the token shows no token objects at all: not one key, not one marker. The
/// search stops at the first object.
pub(super) fn token_is_empty(session: &Session) -> Result<bool, CkError> {
    let mut objects =
        session.iter_objects_with_cache_size(&[Attribute::Token(true)], NonZeroUsize::MIN)?;
    Ok(objects.next().transpose()?.is_none())
}

/// Whether the key's disabled marker exists (see [`metadata_from_attributes`]).
pub(super) fn is_disabled(session: &Session, key_id: &str) -> Result<bool, CkError> {
    session
        .find_objects(&marker_template(key_id))
        .map(|found| !found.is_empty())
}

/// The external key's current version: the highest N such that every version label
/// 2..=N exists (1 when none does).
pub fn current_version(session: &Session, key_id: &str) -> Result<u32, CkError> {
    let mut version = 1;
    loop {
        let label = crate::hsm::version_label(key_id, version + 1);
        let found = find_secret_keys(session, &label)?;
        if found.is_empty() {
            return Ok(version);
        }
        version += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hsm::{HsmError, Operation};

    #[test]
    fn metadata_reports_usages_spec_and_status() {
        let attrs = vec![
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Encrypt(true),
            Attribute::Decrypt(false),
            Attribute::Wrap(true),
        ];
        let m = metadata_from_attributes(&attrs, false);
        assert_eq!(m.key_spec, KeySpec::Aes(256));
        assert_eq!(m.usages, vec![KeyUsage::Encrypt, KeyUsage::Wrap]);
        assert!(m.enabled);
        let m = metadata_from_attributes(&attrs, true);
        assert!(!m.enabled);
        assert_eq!(m.check(Operation::Encrypt), Err(HsmError::KeyDisabled));
    }

    #[test]
    fn aes_128_is_not_aes_256() {
        let attrs = [
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(16.into()),
            Attribute::Encrypt(true),
        ];
        let m = metadata_from_attributes(&attrs, false);
        assert_eq!(m.key_spec, KeySpec::Aes(128));
        assert_eq!(m.key_spec.name(), "AES_128");
        assert_eq!(m.check(Operation::Encrypt), Err(HsmError::NotAes256));
    }
}
