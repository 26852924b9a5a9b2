//! GetHealthStatus (spec: GetHealthStatus).
//!
//! Never subject to request validation errors (the spec's table excludes
//! ValidationException for this API): a body we cannot read is logged and the health
//! answered anyway, since KMS uses this call to check the endpoint and credentials.

use serde::Serialize;

use super::request::{parse_json, Audit, MetadataOnly};
use super::HealthInfo;
use crate::hsm::Backend;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct HealthResponse<'a> {
    xks_proxy_fleet_size: u32,
    xks_proxy_vendor: &'a str,
    xks_proxy_model: &'a str,
    ekm_vendor: &'a str,
    ekm_fleet_details: Vec<EkmDetails<'a>>,
}

#[derive(Debug, Serialize)]
struct EkmDetails<'a> {
    id: &'a str,
    model: &'a str,
    #[serde(rename = "healthStatus")]
    health_status: &'static str,
}

/// Handles a GetHealthStatus request body.
pub(crate) async fn get_health_status(
    backend: &Backend,
    info: &HealthInfo,
    body: &[u8],
    audit: &mut Audit,
) -> Vec<u8> {
    match parse_json::<MetadataOnly<'_>>(body) {
        Ok(MetadataOnly {
            request_metadata: Some(metadata),
        }) => *audit = metadata.audit(),
        Ok(_) => tracing::warn!("GetHealthStatus without requestMetadata"),
        Err(e) => tracing::warn!(error = %e, "GetHealthStatus body not understood"),
    }
    let health = backend.probe().await;
    let ekm = backend.ekm_info();
    let response = HealthResponse {
        xks_proxy_fleet_size: info.fleet_size,
        xks_proxy_vendor: &info.vendor,
        xks_proxy_model: &info.model,
        ekm_vendor: info.ekm_vendor.as_deref().unwrap_or(&ekm.vendor),
        ekm_fleet_details: vec![EkmDetails {
            id: &ekm.id,
            model: &ekm.model,
            health_status: health.as_str(),
        }],
    };
    serde_json::to_vec(&response).expect("serializing strings cannot fail")
}
