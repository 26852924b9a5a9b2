//! Secondary authorization of XKS requests by their `requestMetadata`, with
//! [Cedar](https://www.cedarpolicy.com/) policies (spec: Authorization, Logging,
//! Appendix B, and the `requestMetadata` of each API).
//!
//! AWS KMS has already authorized the caller when a request reaches the proxy; this
//! module is the optional second layer the spec allows, e.g. "this external key is
//! usable only by these AWS callers". [`Authorizer::new`] parses Cedar policies and
//! validates them strictly against [`SCHEMA`]; [`Authorizer::authorize`] decides one
//! request. GetHealthStatus MUST NOT be subject to authorization, so the caller never
//! asks about it (and an operation other than the three below is denied).
//!
//! # The Cedar model
//!
//! Everything lives in the namespace `Xks`:
//!
//! - **principal** `Xks::Principal::"<awsPrincipalArn>"` — the id is the ARN exactly as
//!   received (for a role session KMS sends the role's ARN, as `aws:PrincipalArn`
//!   does; a service principal such as `ec2.amazonaws.com` or `AWS Internal` also
//!   appears as is). Attributes:
//!   - `arn: String` — the same ARN, for `like` patterns;
//!   - `account: String` — the 12-digit account of an `arn:…:…:…:<account>:…` ARN,
//!     `""` when the ARN has no account (service principals, `AWS Internal`).
//! - **actions** `Xks::Action::"Encrypt"`, `Xks::Action::"Decrypt"`,
//!   `Xks::Action::"GetKeyMetadata"` — the XKS API, not the KMS API (that one is
//!   `context.kmsOperation`). There are no action groups: write
//!   `action in [Xks::Action::"Encrypt", Xks::Action::"Decrypt"]`.
//! - **resource** `Xks::Key::"<key store>/<external key id>"`. Attributes `key_store`
//!   and `key_id` (both `String`). A key store name containing `/` makes the id
//!   ambiguous; the attributes never are.
//! - **context** (record `Xks::RequestContext`):
//!   - `kmsOperation`, `kmsKeyArn`, `kmsRequestId`, `kmsViaService`, `awsSourceVpc`,
//!     `awsSourceVpce` — OPTIONAL `String`s, present exactly when `requestMetadata`
//!     has that field *as a string*. Strict validation makes a policy test
//!     `context has kmsViaService` before reading `context.kmsViaService`, so a
//!     missing field (KMS sends `awsSourceVpce` only for requests through a VPC
//!     endpoint; GetKeyMetadata has no `kmsKeyArn`) can never be mistaken for a value.
//!   - `fields: Set<String>` — `"name=value"` for **every** string-valued top-level
//!     field of `requestMetadata`, the six above and `awsPrincipalArn` included.
//!
//! ## Why `fields`
//!
//! Appendix B says KMS may add fields (`SourceIdentity`, Nitro Enclave attestation
//! values, tags of the principal and of the key). Strict validation needs every
//! record attribute declared in the schema, and Cedar has no open records, so a
//! `context.metadata` record holding "whatever arrived" could not be validated. The
//! alternatives were: declare only the known fields and make new ones invisible until
//! the proxy is upgraded; validate permissively and lose the typo checks that
//! strict validation gives (`context.kmsViaservice` would silently never match); or
//! entity tags, which would have to hang the request's fields on the principal or
//! the key, where they do not belong. `fields` keeps strict validation and still
//! reaches any field: `context.fields.contains("SourceIdentity=alice")`. It supports
//! exact matches only (no `like` on set members); fields with a pattern-worthy
//! meaning get a typed attribute of their own when the schema learns them.
//! A field whose *name* contains `=` is left out of `fields`, so the first `=` of an
//! entry always ends the name and `"a=b=c"` cannot be forged from another field.
//! Values that are not strings (numbers, objects, …) appear nowhere.
//!
//! ## Decisions
//!
//! Cedar's semantics: denied unless some `permit` is satisfied, and any satisfied
//! `forbid` overrides every `permit`. [`Decision::policy_ids`] lists the policies that
//! decided — the satisfied permits for an allow, the satisfied forbids for a deny, and
//! nothing for the default deny ("no policy permits"). The spec asks the proxy to log
//! "the specific statement responsible for the denial"; [`Decision`]'s `Display`
//! renders that. A policy whose evaluation fails at run time is skipped (Cedar's rule)
//! and reported in [`Decision::errors`]; strict validation at load time rules out
//! nearly all such failures.
//!
//! ## Policy ids
//!
//! A policy annotated `@id("orders-key-s3")` gets that id; an unannotated one keeps
//! Cedar's positional id `policy<N>` (N counts statements from 0). Ids must be unique.
//! Templates (`?principal`/`?resource` slots) are rejected: nothing would link them.
//!
//! ## Cost
//!
//! The schema is parsed once per process. A request builds two entities (principal,
//! key) and the context straight from the parsed JSON with `RestrictedExpression`s —
//! no JSON round trip — and skips re-validating them against the schema (a unit test
//! checks that what is built always conforms). See `benches/authz.rs`.
//!
//! `config/policies/example.cedar` shows the model in use, including "key X only for
//! account A's role R via S3 from VPC endpoint E".
//!
//! Parts: `schema` (the model), `policies` (loading a file and wording its errors),
//! `request` (building a Cedar request from `requestMetadata`); this file holds the
//! [`Authorizer`] and its caches.

mod policies;
mod request;
mod schema;
#[cfg(test)]
mod tests;

use policies::*;
use request::*;
pub use schema::SCHEMA;
use schema::*;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, LazyLock};

pub use crate::operation::ApiOperation;
use cedar_policy as cedar;
use cedar_policy::{
    Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId, PolicySet,
    RestrictedExpression, ValidationMode, Validator,
};

/// Why a policy set could not be loaded. Every message names the policy (its `@id`,
/// or `policy<N>` and its line) and the problem.
#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    /// The policy file could not be read.
    #[error("cannot read Cedar policy file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid Cedar, or uses what this module does not support
    /// (templates, duplicate or empty ids).
    #[error("invalid Cedar policies: {}", problems.join("; "))]
    Parse {
        /// One message per problem.
        problems: Vec<String>,
    },
    /// The policies parse but do not type-check against [`SCHEMA`] (unknown entity
    /// type, action or attribute, optional attribute read without `has`, …).
    #[error("Cedar policies do not match the xks-proxy schema: {}", problems.join("; "))]
    Validation {
        /// One message per problem.
        problems: Vec<String>,
    },
}

/// What [`Authorizer::authorize`] is asked about: one XKS request.
#[derive(Debug, Clone, Copy)]
pub struct AuthzRequest<'a> {
    /// `requestMetadata.awsPrincipalArn`.
    pub principal_arn: &'a str,
    /// The XKS operation. GetHealthStatus is exempt from authorization and never asked
    /// about; asked, it is denied.
    pub operation: ApiOperation,
    /// The key store the request's path routed to.
    pub key_store: &'a str,
    /// The external key id from the path.
    pub key_id: &'a str,
    /// Every field of `requestMetadata` with a string value, by its JSON name (see
    /// `xks::request::RequestMetadata::fields`).
    pub metadata: &'a [(&'a str, &'a str)],
}

/// The outcome of [`Authorizer::authorize`]. `Display` renders it for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct Decision {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// The policies that determined the decision, sorted: the satisfied permits when
    /// allowed, the satisfied forbids when denied by a forbid, empty when denied because
    /// no policy permits.
    pub policy_ids: Vec<String>,
    /// Policies that failed to evaluate (and were therefore ignored, as Cedar does), or
    /// why the request could not be evaluated at all (then it is denied).
    pub errors: Vec<String>,
}

impl Decision {
    fn deny_because(error: String) -> Self {
        Self {
            allowed: false,
            policy_ids: Vec::new(),
            errors: vec![error],
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids = self
            .policy_ids
            .iter()
            .map(|id| format!("`{id}`"))
            .collect::<Vec<_>>()
            .join(", ");
        match (self.allowed, self.policy_ids.is_empty()) {
            (true, _) => write!(f, "allowed by policy {ids}")?,
            (false, false) => write!(f, "denied by policy {ids}")?,
            (false, true) => f.write_str("denied: no policy permits")?,
        }
        if !self.errors.is_empty() {
            write!(f, " (errors: {})", self.errors.join("; "))?;
        }
        Ok(())
    }
}

/// A validated Cedar policy set, ready to decide requests. Cheap to share (`Send +
/// Sync`); reload by building a new one.
pub struct Authorizer {
    policies: PolicySet,
    model: &'static Model,
    engine: cedar::Authorizer,
    warnings: Vec<String>,
    needs: ContextNeeds,
    /// The two entities of recent (principal, key) pairs: KMS traffic repeats a few
    /// callers and keys, and building and closing the entity set is a quarter of a
    /// decision's cost. Bounded; emptied when full.
    entities: parking_lot::Mutex<HashMap<(String, String), Arc<Entities>>>,
    /// Recent decisions, when the policies allow caching them (see
    /// `Authorizer::decision_key`). Bounded; emptied when full; a reload builds a new
    /// `Authorizer` and so starts empty.
    decisions: parking_lot::Mutex<HashMap<String, Decision>>,
}

/// At most this many entity sets, and this many decisions, are cached.
const CACHE_ENTRIES: usize = 4096;

/// The context attributes the loaded policies can read. Cedar names attributes only
/// literally (`context.x`, `context has x`, `context["x"]`; it cannot compute a
/// name), so an attribute whose name appears nowhere in the policy text is never read
/// and need not be built: the `fields` set alone is a third of a decision's cost.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ContextNeeds {
    fields: bool,
    named: Vec<&'static str>,
}

impl ContextNeeds {
    /// `json` is policies in Cedar's JSON form, where an attribute is always a whole
    /// JSON string (`"awsSourceVpc"` does not match `"awsSourceVpce"`).
    fn of(json: &str) -> Self {
        let quoted = |name: &str| json.contains(&format!("\"{name}\""));
        Self {
            fields: quoted("fields"),
            named: CONTEXT_FIELDS
                .into_iter()
                .filter(|name| quoted(name))
                .collect(),
        }
    }

    /// Scans the policies' JSON form: their logic without comments, where every
    /// attribute read is a string literal.
    fn of_policies(policies: &PolicySet) -> Self {
        let text: String = policies
            .policies()
            .map(|policy| match policy.to_json() {
                Ok(json) => json.to_string(),
                // Cannot happen for a parsed static policy; fall back to everything.
                Err(_) => format!("{:?}{:?}", "fields", CONTEXT_FIELDS),
            })
            .collect();
        Self::of(&text)
    }

    #[cfg(test)]
    fn all() -> Self {
        Self {
            fields: true,
            named: CONTEXT_FIELDS.to_vec(),
        }
    }
}

impl fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authorizer")
            .field("policies", &self.policy_ids())
            .field("warnings", &self.warnings)
            .finish_non_exhaustive()
    }
}

impl Authorizer {
    /// Parses `policies_text` (Cedar policy syntax), names each policy after its `@id`
    /// annotation, and validates the set strictly against [`SCHEMA`]. An empty text is
    /// a valid set that denies everything.
    ///
    /// # Errors
    ///
    /// [`AuthzError::Parse`] for text that is not Cedar, templates, and empty or
    /// duplicate ids; [`AuthzError::Validation`] for policies that do not type-check
    /// against [`SCHEMA`]. Each message names the policy and its line.
    pub fn new(policies_text: &str) -> Result<Self, AuthzError> {
        let model: &'static Model = &MODEL;
        let parsed = PolicySet::from_str(policies_text).map_err(|e| AuthzError::Parse {
            problems: locate_parse_errors(policies_text, &e),
        })?;
        let policies = rename_by_annotation(policies_text, &parsed)?;

        let result = model.validator.validate(&policies, ValidationMode::Strict);
        let lines = policy_lines(policies_text);
        if !result.validation_passed() {
            let mut problems: Vec<String> = result
                .validation_errors()
                .map(|e| {
                    let hint = match e {
                        cedar::ValidationError::UnsafeOptionalAttributeAccess(_) => {
                            " (guard the read with `has`: `context has <field> && context.<field> == …`)"
                        }
                        _ => "",
                    };
                    let problem = about_policy(&lines, e.policy_id().as_ref(), e);
                    format!("{problem}{hint}")
                })
                .collect();
            problems.sort();
            problems.dedup();
            return Err(AuthzError::Validation { problems });
        }
        let warnings = result
            .validation_warnings()
            .map(|w| about_policy(&lines, w.policy_id().as_ref(), w))
            .collect();
        let needs = ContextNeeds::of_policies(&policies);
        Ok(Self {
            policies,
            model,
            engine: cedar::Authorizer::new(),
            warnings,
            needs,
            entities: parking_lot::Mutex::new(HashMap::new()),
            decisions: parking_lot::Mutex::new(HashMap::new()),
        })
    }

    /// Reads a `.cedar` file and loads it as [`Authorizer::new`] does.
    ///
    /// # Errors
    ///
    /// [`AuthzError::Read`] when the file cannot be read, else as [`Authorizer::new`].
    pub fn from_file(path: &Path) -> Result<Self, AuthzError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthzError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::new(&text)
    }

    /// The ids of the loaded policies, sorted.
    #[must_use]
    pub fn policy_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .policies
            .policies()
            .map(|p| p.id().to_string())
            .collect();
        ids.sort();
        ids
    }

    /// Validator warnings about the loaded policies (e.g. a policy that can never
    /// apply); worth logging at load time, but not fatal.
    #[must_use]
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Decides one request. Never panics; a request that cannot be evaluated (an
    /// operation other than the three authorized ones) is denied with the reason in
    /// [`Decision::errors`].
    pub fn authorize(&self, request: &AuthzRequest<'_>) -> Decision {
        let Some(key) = self.decision_key(request) else {
            return self.evaluate(request);
        };
        if let Some(decision) = self.decisions.lock().get(&key) {
            return decision.clone();
        }
        let decision = self.evaluate(request);
        let mut cache = self.decisions.lock();
        if cache.len() >= CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(key, decision.clone());
        decision
    }

    /// What a decision depends on, when the policies read nothing that changes with
    /// every request: the principal, operation, key and the context attributes the
    /// policies name. Cedar evaluation is deterministic (no clock, no randomness), so
    /// equal keys get equal decisions. `None` when the policies read `fields` (it holds
    /// `kmsRequestId`, different on every request) or `kmsRequestId` itself.
    fn decision_key(&self, r: &AuthzRequest<'_>) -> Option<String> {
        if self.needs.fields || self.needs.named.contains(&"kmsRequestId") {
            return None;
        }
        let mut key = String::with_capacity(256);
        // Length-prefixed parts: no value can imitate a boundary.
        let mut part = |value: Option<&str>| match value {
            Some(value) => {
                key.push_str(&value.len().to_string());
                key.push(':');
                key.push_str(value);
            }
            None => key.push('-'),
        };
        part(Some(r.principal_arn));
        part(Some(r.operation.as_str()));
        part(Some(r.key_store));
        part(Some(r.key_id));
        for name in &self.needs.named {
            part(field(r.metadata, name));
        }
        Some(key)
    }

    fn evaluate(&self, request: &AuthzRequest<'_>) -> Decision {
        let built = self.entities_for(request).and_then(|entities| {
            Ok((
                build_request(self.model, request, &self.needs, None)?,
                entities,
            ))
        });
        let (request, entities) = match built {
            Ok(parts) => parts,
            Err(error) => return Decision::deny_because(error),
        };
        let response = self
            .engine
            .is_authorized(&request, &self.policies, &entities);
        let diagnostics = response.diagnostics();
        let mut policy_ids: Vec<String> = diagnostics.reason().map(ToString::to_string).collect();
        policy_ids.sort_unstable();
        Decision {
            allowed: response.decision() == cedar::Decision::Allow,
            policy_ids,
            errors: diagnostics.errors().map(ToString::to_string).collect(),
        }
    }
}

impl Authorizer {
    /// The request's two entities, from the cache when the pair was seen recently.
    fn entities_for(&self, r: &AuthzRequest<'_>) -> Result<Arc<Entities>, String> {
        let key = (
            r.principal_arn.to_owned(),
            format!("{}/{}", r.key_store, r.key_id),
        );
        if let Some(entities) = self.entities.lock().get(&key) {
            return Ok(Arc::clone(entities));
        }
        let entities = Arc::new(build_entities(self.model, r, None)?);
        let mut cache = self.entities.lock();
        if cache.len() >= CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(key, Arc::clone(&entities));
        Ok(entities)
    }
}

const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    shareable::<Authorizer>();
};
