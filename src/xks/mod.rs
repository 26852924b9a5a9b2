//! The XKS API: request parsing and validation, the four operations, and the error
//! model. Knows nothing of HTTP: it takes an operation, a key id and a body, and returns
//! a JSON body or an [`XksError`].

pub mod aad;
mod decrypt;
mod encrypt;
pub mod error;
mod health_status;
mod key_metadata;
pub mod request;

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

pub use error::{ErrorName, XksError};
pub use request::Audit;

use crate::authz::{Authorizer, AuthzRequest};
use crate::health::HealthMonitor;
use crate::hsm::Backend;

/// The four XKS APIs (spec: API operations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApiOperation {
    /// `POST .../health`
    GetHealthStatus,
    /// `POST .../keys/{id}/metadata`
    GetKeyMetadata,
    /// `POST .../keys/{id}/encrypt`
    Encrypt,
    /// `POST .../keys/{id}/decrypt`
    Decrypt,
}

impl ApiOperation {
    /// Every operation, for metrics.
    pub const ALL: [Self; 4] = [
        Self::GetHealthStatus,
        Self::GetKeyMetadata,
        Self::Encrypt,
        Self::Decrypt,
    ];

    /// The spec's name of the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GetHealthStatus => "GetHealthStatus",
            Self::GetKeyMetadata => "GetKeyMetadata",
            Self::Encrypt => "Encrypt",
            Self::Decrypt => "Decrypt",
        }
    }
}

/// What GetHealthStatus reports about this proxy.
#[derive(Debug, Clone)]
pub struct HealthInfo {
    /// spec: xksProxyFleetSize, an integer greater than zero.
    pub fleet_size: u32,
    /// spec: xksProxyVendor.
    pub vendor: String,
    /// spec: xksProxyModel (product and version).
    pub model: String,
    /// spec: ekmVendor; when `None`, the token's manufacturer.
    pub ekm_vendor: Option<String>,
}

/// The external key ids a key store may use. Keys outside the set are "not found" for
/// that key store even if the HSM holds them, so tenants on one token stay apart.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    ids: HashSet<String>,
    aws_sample_metadata: Option<Vec<u8>>,
}

impl KeySet {
    /// A set of ids.
    pub fn new(ids: impl IntoIterator<Item = String>) -> Self {
        Self {
            ids: ids.into_iter().collect(),
            aws_sample_metadata: None,
        }
    }

    /// Decrypt also accepts ciphertexts made by the AWS sample proxy
    /// (aws-samples/aws-kms-xks-proxy) configured with `ciphertext_metadata`: they
    /// carry that value as their ciphertextMetadata and were sealed under the sample's
    /// AAD construction ([`aad::aws_sample_aad`]). Empty: the sample ran without one.
    #[must_use]
    pub fn with_aws_sample_compat(mut self, ciphertext_metadata: Option<Vec<u8>>) -> Self {
        self.aws_sample_metadata = ciphertext_metadata;
        self
    }

    /// Whether `id` belongs to the set.
    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }
}

/// The answer to one request: the response body or error, and what to log about it.
#[derive(Debug)]
pub struct Outcome<'a> {
    /// A JSON body for 200, or the error.
    pub result: Result<Vec<u8>, XksError>,
    /// Request facts for the log line, borrowed from the request body.
    pub audit: Audit<'a>,
}

/// Executes XKS operations against a backend.
#[derive(Debug, Clone)]
pub struct Handler {
    backend: Arc<Backend>,
    health: HealthInfo,
    monitor: Arc<HealthMonitor>,
}

impl Handler {
    /// A handler over `backend`; GetHealthStatus answers what `monitor` last saw.
    pub fn new(backend: Arc<Backend>, health: HealthInfo, monitor: Arc<HealthMonitor>) -> Self {
        Self {
            backend,
            health,
            monitor,
        }
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    /// The health monitor.
    pub fn monitor(&self) -> &Arc<HealthMonitor> {
        &self.monitor
    }

    /// Handles one authenticated request, which must be answered by `deadline`.
    /// `key_id` is empty for GetHealthStatus. With `authz` (the policies and the key
    /// store's name), every operation but GetHealthStatus must be permitted first.
    pub async fn handle<'a>(
        &self,
        operation: ApiOperation,
        keys: &KeySet,
        key_id: &str,
        body: &'a [u8],
        deadline: Instant,
        authz: Option<(&Authorizer, &str)>,
    ) -> Outcome<'a> {
        let mut audit = Audit::default();
        if let (Some((authorizer, key_store)), false) =
            (authz, operation == ApiOperation::GetHealthStatus)
        {
            if let Some(denied) = authorize(authorizer, key_store, operation, key_id, body) {
                return denied;
            }
        }
        let backend = &*self.backend;
        // The key store's membership is checked by each operation after the request
        // is validated, so the log line of a KeyNotFound still names its kmsRequestId.
        let key = KeyRef {
            id: key_id,
            known: keys.contains(key_id),
            aws_sample_metadata: keys.aws_sample_metadata.as_deref(),
        };
        let result = match operation {
            ApiOperation::GetHealthStatus => {
                health_status::get_health_status(&self.monitor, &self.health, body, &mut audit)
            }
            ApiOperation::GetKeyMetadata => {
                key_metadata::get_key_metadata(backend, key, body, &mut audit, deadline).await
            }
            ApiOperation::Encrypt => {
                encrypt::encrypt(backend, key, body, &mut audit, deadline).await
            }
            ApiOperation::Decrypt => {
                decrypt::decrypt(backend, key, body, &mut audit, deadline).await
            }
        };
        Outcome { result, audit }
    }
}

/// Secondary authorization (spec: Authorization). A body that is not a JSON object
/// with a `requestMetadata` object answers ValidationException here; otherwise the
/// policies decide, and a denial (returned as the
/// request's outcome) is 403 AccessDeniedException whose log line names the deciding
/// policies.
fn authorize(
    authorizer: &Authorizer,
    key_store: &str,
    operation: ApiOperation,
    key_id: &str,
    body: &[u8],
) -> Option<Outcome<'static>> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Envelope {
        request_metadata: Option<serde_json::Map<String, serde_json::Value>>,
    }
    // Fail closed: a body the policies cannot see is refused here rather than trusting
    // the operation to refuse it too.
    let metadata = match request::parse_json::<Envelope>(body) {
        Ok(Envelope {
            request_metadata: Some(metadata),
        }) => metadata,
        Ok(Envelope {
            request_metadata: None,
        }) => {
            return Some(Outcome {
                result: Err(XksError::validation("requestMetadata is required")),
                audit: Audit::default(),
            })
        }
        Err(error) => {
            return Some(Outcome {
                result: Err(error),
                audit: Audit::default(),
            })
        }
    };
    let text = |name: &str| metadata.get(name).and_then(|v| v.as_str());
    let decision = authorizer.authorize(&AuthzRequest {
        principal_arn: text("awsPrincipalArn").unwrap_or(""),
        operation: operation.as_str(),
        key_store,
        key_id,
        metadata: &metadata,
    });
    if decision.allowed {
        return None;
    }
    let own = |name: &str| text(name).map(|v| Cow::Owned(v.to_owned()));
    Some(Outcome {
        result: Err(XksError::new(
            ErrorName::AccessDenied,
            "the request is not authorized by the proxy's policies",
        )),
        audit: Audit {
            kms_request_id: own("kmsRequestId"),
            kms_operation: own("kmsOperation"),
            aws_principal_arn: own("awsPrincipalArn"),
            kms_key_arn: own("kmsKeyArn"),
            kms_via_service: own("kmsViaService"),
            authorization: Some(decision.to_string()),
        },
    })
}

/// The external key a request names, and whether its key store may use it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyRef<'a> {
    id: &'a str,
    known: bool,
    /// The key store's AWS-sample compatibility metadata, if enabled.
    aws_sample_metadata: Option<&'a [u8]>,
}

impl<'a> KeyRef<'a> {
    /// The id, if the key store may use it.
    pub(crate) fn id(self) -> Result<&'a str, XksError> {
        if self.known {
            Ok(self.id)
        } else {
            Err(XksError::new(
                ErrorName::KeyNotFound,
                "external key is not in this key store",
            ))
        }
    }
}
