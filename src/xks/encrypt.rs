//! Encrypt (spec: Encrypt; Appendix C for the CDIV).

use std::borrow::Cow;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::aad::{cdiv, hsm_aad, version_metadata};
use super::error::{ErrorName, XksError};
use super::request::{
    base64, check_algorithm, check_size, optional_base64, required_base64, RequestMetadata,
    MAX_AAD_BYTES, MAX_PLAINTEXT_BYTES,
};
use super::KeyRef;
use crate::hsm::{version_label, Backend, HsmError};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct EncryptRequest<'a> {
    #[serde(borrow)]
    pub(crate) request_metadata: Option<RequestMetadata<'a>>,
    #[serde(borrow, default, deserialize_with = "super::request::borrowed")]
    plaintext: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "super::request::borrowed")]
    encryption_algorithm: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "super::request::borrowed")]
    additional_authenticated_data: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "super::request::borrowed")]
    ciphertext_data_integrity_value_algorithm: Option<Cow<'a, str>>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct EncryptResponse {
    ciphertext: String,
    initialization_vector: String,
    authentication_tag: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    ciphertext_metadata: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ciphertext_data_integrity_value: Option<String>,
}

/// Handles an Encrypt request for `key` (its metadata already checked).
pub(crate) async fn encrypt(
    backend: &Backend,
    key: KeyRef<'_>,
    request: EncryptRequest<'_>,
    deadline: Instant,
) -> Result<Vec<u8>, XksError> {
    check_algorithm(request.encryption_algorithm.as_ref())?;
    let key_id = key.id()?;
    let want_cdiv = match request.ciphertext_data_integrity_value_algorithm.as_deref() {
        None => false,
        Some("SHA_256") => true,
        Some(_) => {
            return Err(XksError::validation(
                "ciphertextDataIntegrityValueAlgorithm must be SHA_256",
            ))
        }
    };
    let plaintext = Zeroizing::new(required_base64(request.plaintext.as_ref(), "plaintext")?);
    check_size("plaintext", &plaintext, MAX_PLAINTEXT_BYTES)?;
    let aad = optional_base64(
        request.additional_authenticated_data.as_ref(),
        "additionalAuthenticatedData",
    )?;
    check_size("additionalAuthenticatedData", &aad, MAX_AAD_BYTES)?;
    // The current key version; a rotated key's version travels in ciphertextMetadata,
    // which the AAD binds, so Decrypt finds the right key and tampering fails.
    let version = backend.current_version(key_id, deadline).await?;
    let label = version_label(key_id, version);
    let key_id: &str = &label;
    let metadata = version_metadata(version);
    let metadata_bytes: &[u8] = &metadata;
    let hsm_aad = hsm_aad(&aad, metadata_bytes)?;

    // Keep copies of the plaintext and the HSM AAD only when the CDIV self-check will
    // need them.
    let self_check = want_cdiv.then(|| (plaintext.clone(), hsm_aad.clone()));
    let sealed = backend
        .encrypt(key_id, plaintext, hsm_aad, deadline)
        .await?;

    let integrity_value =
        if let Some((expected, hsm_aad)) = self_check {
            // spec Appendix C: compute the CDIV first, then prove the output decrypts, so a
            // corruption after this point cannot be covered by a matching CDIV.
            let value = cdiv(
                &aad,
                metadata_bytes,
                &sealed.iv,
                &sealed.ciphertext,
                &sealed.tag,
            );
            match backend
                .decrypt(key_id, sealed.clone(), hsm_aad, deadline)
                .await
            {
                Ok(decrypted) if decrypted.as_slice() == expected.as_slice() => {}
                Ok(_) => return Err(XksError::internal("encrypt self-check failed")),
                // A CDIV promises that the ciphertext decrypts; an encrypt-only key cannot
                // prove that, so it cannot give one (the public XKS test client expects
                // InvalidKeyUsageException here).
                Err(HsmError::UsageNotPermitted(_)) => return Err(XksError::new(
                    ErrorName::InvalidKeyUsage,
                    "ciphertextDataIntegrityValueAlgorithm needs a key that also allows DECRYPT",
                )),
                Err(e) => {
                    tracing::error!(error = %e, "decrypt of fresh ciphertext failed");
                    return Err(XksError::internal("encrypt self-check failed"));
                }
            }
            Some(base64(&value))
        } else {
            None
        };

    let response = EncryptResponse {
        ciphertext: base64(&sealed.ciphertext),
        initialization_vector: base64(&sealed.iv),
        authentication_tag: base64(&sealed.tag),
        ciphertext_metadata: (!metadata.is_empty()).then(|| base64(&metadata)),
        ciphertext_data_integrity_value: integrity_value,
    };
    Ok(serde_json::to_vec(&response).expect("serializing strings cannot fail"))
}
