//! GetKeyMetadata (spec: GetKeyMetadata).

use std::borrow::Cow;
use std::time::Instant;

use serde::Serialize;

use super::error::XksError;
use super::KeyRef;
use crate::hsm::{version_label, Backend};

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct KeyMetadataResponse<'a> {
    key_spec: Cow<'a, str>,
    key_usage: Vec<&'static str>,
    key_status: &'static str,
}

/// Handles a GetKeyMetadata request for `key` (its metadata already checked).
pub(crate) async fn get_key_metadata(
    backend: &Backend,
    key: KeyRef<'_>,
    deadline: Instant,
) -> Result<Vec<u8>, XksError> {
    let key_id = key.id()?;
    // The current version's metadata: that is the key Encrypt uses now.
    let version = backend.current_version(key_id, deadline).await?;
    let key = backend
        .key_metadata(&version_label(key_id, version), deadline)
        .await?;
    let response = KeyMetadataResponse {
        key_spec: key.key_spec.name(),
        // spec: at most ten values; a PKCS#11 key has at most seven usages we report.
        key_usage: key.usages.iter().map(|u| u.as_str()).take(10).collect(),
        key_status: if key.enabled { "ENABLED" } else { "DISABLED" },
    };
    Ok(serde_json::to_vec(&response).expect("serializing strings cannot fail"))
}
