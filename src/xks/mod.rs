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

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

pub use crate::operation::ApiOperation;
pub use error::{ErrorName, XksError};
pub use request::Audit;
use request::{parse_json, MetadataOnly, RequestMetadata, Required};

use crate::authz::{Authorizer, AuthzRequest};
use crate::health::HealthMonitor;
use crate::hsm::Backend;

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
        // What every operation shares comes first, in the order whose error the client
        // should see first: the body parsed once, `requestMetadata` present (from here
        // on the log line names the request), the policies' decision, the fields the
        // operation requires. Then the operation's own checks and work.
        let mut audit = Audit::default();
        let result = async {
            let (metadata, request) = parse_request(operation, body)?;
            audit = metadata.audit();
            if let (Some((authorizer, key_store)), false) =
                (authz, operation == ApiOperation::GetHealthStatus)
            {
                authorize(
                    authorizer, key_store, operation, key_id, &metadata, &mut audit,
                )?;
            }
            metadata.require(required(operation))?;
            let backend = &*self.backend;
            // The key store's membership is checked by each operation after its own
            // fields, so the client learns of a malformed request first.
            let key = KeyRef {
                id: key_id,
                known: keys.contains(key_id),
                aws_sample_metadata: keys.aws_sample_metadata.as_deref(),
            };
            match request {
                Request::GetHealthStatus => {
                    health_status::get_health_status(&self.monitor, &self.health)
                }
                Request::GetKeyMetadata => {
                    key_metadata::get_key_metadata(backend, key, deadline).await
                }
                Request::Encrypt(r) => encrypt::encrypt(backend, key, r, deadline).await,
                Request::Decrypt(r) => decrypt::decrypt(backend, key, r, deadline).await,
            }
        }
        .await;
        Outcome { result, audit }
    }
}

/// A request body's own fields, by operation.
enum Request<'a> {
    GetHealthStatus,
    GetKeyMetadata,
    Encrypt(encrypt::EncryptRequest<'a>),
    Decrypt(decrypt::DecryptRequest<'a>),
}

/// Parses `body` once for `operation`: its `requestMetadata`, which every operation
/// requires, and the operation's own fields.
fn parse_request(
    operation: ApiOperation,
    body: &[u8],
) -> Result<(RequestMetadata<'_>, Request<'_>), XksError> {
    let (metadata, request) = match operation {
        ApiOperation::GetHealthStatus | ApiOperation::GetKeyMetadata => {
            let parsed: MetadataOnly<'_> = parse_json(body)?;
            let request = if operation == ApiOperation::GetHealthStatus {
                Request::GetHealthStatus
            } else {
                Request::GetKeyMetadata
            };
            (parsed.request_metadata, request)
        }
        ApiOperation::Encrypt => {
            let mut parsed: encrypt::EncryptRequest<'_> = parse_json(body)?;
            (parsed.request_metadata.take(), Request::Encrypt(parsed))
        }
        ApiOperation::Decrypt => {
            let mut parsed: decrypt::DecryptRequest<'_> = parse_json(body)?;
            (parsed.request_metadata.take(), Request::Decrypt(parsed))
        }
    };
    let metadata = metadata.ok_or_else(|| XksError::validation("requestMetadata is required"))?;
    Ok((metadata, request))
}

/// The `requestMetadata` fields an operation requires besides the two every one does
/// (spec: each API's request payload).
fn required(operation: ApiOperation) -> Required {
    match operation {
        ApiOperation::GetHealthStatus => Required {
            principal: false,
            key_arn: false,
        },
        ApiOperation::GetKeyMetadata => Required {
            principal: true,
            key_arn: false,
        },
        ApiOperation::Encrypt | ApiOperation::Decrypt => Required {
            principal: true,
            key_arn: true,
        },
    }
}

/// Secondary authorization (spec: Authorization): the policies decide on the request's
/// metadata. A denial is 403 AccessDeniedException whose log line names the deciding
/// policies.
fn authorize(
    authorizer: &Authorizer,
    key_store: &str,
    operation: ApiOperation,
    key_id: &str,
    metadata: &RequestMetadata<'_>,
    audit: &mut Audit<'_>,
) -> Result<(), XksError> {
    let fields = metadata.fields();
    let decision = authorizer.authorize(&AuthzRequest {
        principal_arn: metadata.aws_principal_arn.as_deref().unwrap_or(""),
        operation,
        key_store,
        key_id,
        metadata: &fields,
    });
    if decision.allowed {
        return Ok(());
    }
    audit.authorization = Some(decision.to_string());
    Err(XksError::new(
        ErrorName::AccessDenied,
        "the request is not authorized by the proxy's policies",
    ))
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
