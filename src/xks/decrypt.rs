//! Decrypt (spec: Decrypt).

use std::borrow::Cow;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::aad::{aws_sample_aad, hsm_aad, parse_version_metadata, MAX_METADATA_LEN};
use super::error::XksError;
use super::request::{
    base64, check_algorithm, check_size, optional_base64, required_base64, RequestMetadata,
    MAX_AAD_BYTES, MAX_PLAINTEXT_BYTES,
};
use super::KeyRef;
use crate::hsm::{version_label, Backend, HsmError, Sealed, TAG_LEN};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DecryptRequest<'a> {
    #[serde(borrow)]
    pub(crate) request_metadata: Option<RequestMetadata<'a>>,
    #[serde(borrow, default, deserialize_with = "super::request::borrowed")]
    ciphertext: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "super::request::borrowed")]
    ciphertext_metadata: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "super::request::borrowed")]
    encryption_algorithm: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "super::request::borrowed")]
    additional_authenticated_data: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "super::request::borrowed")]
    initialization_vector: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "super::request::borrowed")]
    authentication_tag: Option<Cow<'a, str>>,
}

#[derive(Debug, Serialize)]
struct DecryptResponse {
    plaintext: String,
}

/// Handles a Decrypt request for `key` (its metadata already checked).
pub(crate) async fn decrypt(
    backend: &Backend,
    key: KeyRef<'_>,
    request: DecryptRequest<'_>,
    deadline: Instant,
) -> Result<Vec<u8>, XksError> {
    check_algorithm(request.encryption_algorithm.as_ref())?;
    let key_id = key.id()?;
    let ciphertext = required_base64(request.ciphertext.as_ref(), "ciphertext")?;
    // Encrypt makes a ciphertext as long as its plaintext.
    check_size("ciphertext", &ciphertext, MAX_PLAINTEXT_BYTES)?;
    let iv = required_base64(
        request.initialization_vector.as_ref(),
        "initializationVector",
    )?;
    let tag = required_base64(request.authentication_tag.as_ref(), "authenticationTag")?;
    let aad = optional_base64(
        request.additional_authenticated_data.as_ref(),
        "additionalAuthenticatedData",
    )?;
    check_size("additionalAuthenticatedData", &aad, MAX_AAD_BYTES)?;
    let ciphertext_metadata =
        optional_base64(request.ciphertext_metadata.as_ref(), "ciphertextMetadata")?;

    // Lengths the spec fixes: a wrong one can never authenticate, so it is reported as
    // an invalid ciphertext without a trip to the HSM.
    if iv.len() != 12 && iv.len() != 16 {
        return Err(XksError::invalid_ciphertext(
            "initializationVector must be 12 or 16 bytes",
        ));
    }
    let tag: [u8; TAG_LEN] = tag
        .try_into()
        .map_err(|_| XksError::invalid_ciphertext("authenticationTag must be 16 bytes"))?;
    if ciphertext_metadata.len() > MAX_METADATA_LEN {
        return Err(XksError::invalid_ciphertext(
            "ciphertextMetadata must not exceed 20 bytes",
        ));
    }
    let sealed = Sealed {
        iv,
        ciphertext,
        tag,
    };
    let spec_aad = hsm_aad(&aad, &ciphertext_metadata)?;
    // A key store migrated from the AWS sample proxy: its ciphertexts carry the
    // sample's configured metadata and its own AAD construction.
    let sample_aad = || {
        let present = request.additional_authenticated_data.is_some();
        aws_sample_aad(present.then_some(aad.as_slice()), &ciphertext_metadata)
    };
    let plaintext = match key.aws_sample_metadata {
        Some(sample) if sample == ciphertext_metadata.as_slice() && !sample.is_empty() => {
            backend
                .decrypt(key_id, sealed, sample_aad()?, deadline)
                .await?
        }
        // The sample ran without metadata, as our own ciphertexts have none: try ours,
        // then the sample's (GCM authenticates exactly one of them).
        Some(sample) if sample == ciphertext_metadata.as_slice() => {
            match backend
                .decrypt(key_id, sealed.clone(), spec_aad, deadline)
                .await
            {
                Err(HsmError::InvalidCiphertext) => {
                    backend
                        .decrypt(key_id, sealed, sample_aad()?, deadline)
                        .await?
                }
                other => other?,
            }
        }
        // Ours: the metadata names the key version (empty: version 1). Metadata we never
        // wrote goes to version 1, where it fails to authenticate.
        _ => {
            let version = parse_version_metadata(&ciphertext_metadata).unwrap_or(1);
            let label = version_label(key_id, version);
            match backend.decrypt(&label, sealed, spec_aad, deadline).await {
                Err(HsmError::KeyNotFound) if version > 1 => {
                    return Err(XksError::invalid_ciphertext(
                        "ciphertextMetadata names a key version that does not exist",
                    ))
                }
                other => other?,
            }
        }
    };
    let response = DecryptResponse {
        plaintext: base64(&plaintext),
    };
    Ok(serde_json::to_vec(&response).expect("serializing a string cannot fail"))
}
