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

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, LazyLock};

use cedar_policy as cedar;
use cedar_policy::{
    Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId, PolicySet,
    RestrictedExpression, ValidationMode, Validator,
};

/// The Cedar schema (`.cedarschema` syntax) that policies are validated against.
/// The module documentation explains each entity type, attribute and context field.
pub const SCHEMA: &str = r#"
namespace Xks {
  // id = requestMetadata.awsPrincipalArn
  entity Principal = {
    "arn": String,
    // 12-digit account of the ARN, "" when it has none
    "account": String,
  };

  // id = "<key store>/<external key id>"
  entity Key = {
    "key_store": String,
    "key_id": String,
  };

  type RequestContext = {
    "kmsOperation"?: String,
    "kmsKeyArn"?: String,
    "kmsRequestId"?: String,
    "kmsViaService"?: String,
    "awsSourceVpc"?: String,
    "awsSourceVpce"?: String,
    // "name=value" for every string-valued requestMetadata field
    "fields": Set<String>,
  };

  action "Encrypt", "Decrypt", "GetKeyMetadata" appliesTo {
    principal: [Principal],
    resource: [Key],
    context: RequestContext,
  };
}
"#;

/// `requestMetadata` fields that become optional context attributes of their own.
const CONTEXT_FIELDS: [&str; 6] = [
    "kmsOperation",
    "kmsKeyArn",
    "kmsRequestId",
    "kmsViaService",
    "awsSourceVpc",
    "awsSourceVpce",
];

/// The annotation that names a policy.
const ID_ANNOTATION: &str = "id";

/// Everything derived from [`SCHEMA`], built once per process.
struct Model {
    validator: Validator,
    principal_type: EntityTypeName,
    key_type: EntityTypeName,
    encrypt: EntityUid,
    decrypt: EntityUid,
    get_key_metadata: EntityUid,
}

impl Model {
    fn build() -> Self {
        let (schema, _warnings) = cedar::Schema::from_cedarschema_str(SCHEMA)
            .expect("the built-in SCHEMA is valid Cedar (checked by a unit test)");
        let name = |n: &str| {
            EntityTypeName::from_str(n).expect("a literal Cedar type name of SCHEMA parses")
        };
        let action_type = name("Xks::Action");
        let action =
            |id: &str| EntityUid::from_type_name_and_id(action_type.clone(), EntityId::new(id));
        Self {
            principal_type: name("Xks::Principal"),
            key_type: name("Xks::Key"),
            encrypt: action("Encrypt"),
            decrypt: action("Decrypt"),
            get_key_metadata: action("GetKeyMetadata"),
            validator: Validator::new(schema),
        }
    }

    fn action(&self, operation: &str) -> Option<&EntityUid> {
        match operation {
            "Encrypt" => Some(&self.encrypt),
            "Decrypt" => Some(&self.decrypt),
            "GetKeyMetadata" => Some(&self.get_key_metadata),
            _ => None,
        }
    }
}

static MODEL: LazyLock<Model> = LazyLock::new(Model::build);

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
    /// The XKS operation: `"Encrypt"`, `"Decrypt"` or `"GetKeyMetadata"`. Anything else
    /// is denied (GetHealthStatus is exempt from authorization and never asked about).
    pub operation: &'a str,
    /// The key store the request's path routed to.
    pub key_store: &'a str,
    /// The external key id from the path.
    pub key_id: &'a str,
    /// The whole `requestMetadata` object as received.
    pub metadata: &'a serde_json::Map<String, serde_json::Value>,
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
        part(Some(r.operation));
        part(Some(r.key_store));
        part(Some(r.key_id));
        for name in &self.needs.named {
            part(r.metadata.get(*name).and_then(serde_json::Value::as_str));
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

fn principal_uid(model: &Model, r: &AuthzRequest<'_>) -> EntityUid {
    EntityUid::from_type_name_and_id(model.principal_type.clone(), EntityId::new(r.principal_arn))
}

fn key_uid(model: &Model, r: &AuthzRequest<'_>) -> EntityUid {
    EntityUid::from_type_name_and_id(
        model.key_type.clone(),
        EntityId::new(format!("{}/{}", r.key_store, r.key_id)),
    )
}

/// Builds the request's two entities (principal, key). With `schema`, Cedar also checks
/// them against it (tests do; production skips the cost, the shapes being fixed here).
fn build_entities(
    model: &Model,
    r: &AuthzRequest<'_>,
    schema: Option<&cedar::Schema>,
) -> Result<Entities, String> {
    let string = |s: &str| RestrictedExpression::new_string(s.to_owned());
    let principal = principal_uid(model, r);
    let principal_entity = Entity::new_with_tags(
        principal.clone(),
        [
            ("arn".to_owned(), string(r.principal_arn)),
            ("account".to_owned(), string(arn_account(r.principal_arn))),
        ],
        [],
        [],
    )
    .map_err(|e| format!("cannot build the principal entity: {e}"))?;

    let key = key_uid(model, r);
    let key_entity = Entity::new_with_tags(
        key.clone(),
        [
            ("key_store".to_owned(), string(r.key_store)),
            ("key_id".to_owned(), string(r.key_id)),
        ],
        [],
        [],
    )
    .map_err(|e| format!("cannot build the key entity: {e}"))?;

    Entities::from_entities([principal_entity, key_entity], schema)
        .map_err(|e| format!("cannot build the entities: {e}"))
}

/// Builds the Cedar request with the context attributes in `needs`. With `schema`, as
/// [`build_entities`].
fn build_request(
    model: &Model,
    r: &AuthzRequest<'_>,
    needs: &ContextNeeds,
    schema: Option<&cedar::Schema>,
) -> Result<cedar::Request, String> {
    let action = model
        .action(r.operation)
        .ok_or_else(|| {
            format!(
                "operation `{}` is not subject to authorization",
                r.operation
            )
        })?
        .clone();
    let context = Context::from_pairs(context_pairs(r.metadata, needs))
        .map_err(|e| format!("cannot build the context: {e}"))?;
    cedar::Request::new(
        principal_uid(model, r),
        action,
        key_uid(model, r),
        context,
        schema,
    )
    .map_err(|e| format!("cannot build the request: {e}"))
}

/// The context record: the known string fields, and `fields` with every string field
/// (each only when `needs` says a policy may read it).
fn context_pairs(
    metadata: &serde_json::Map<String, serde_json::Value>,
    needs: &ContextNeeds,
) -> Vec<(String, RestrictedExpression)> {
    let mut pairs = Vec::with_capacity(CONTEXT_FIELDS.len() + 1);
    let mut fields = Vec::with_capacity(if needs.fields { metadata.len() } else { 0 });
    for (name, value) in metadata {
        let Some(value) = value.as_str() else {
            continue;
        };
        if needs.named.contains(&name.as_str()) {
            pairs.push((
                name.clone(),
                RestrictedExpression::new_string(value.to_owned()),
            ));
        }
        if needs.fields && !name.contains('=') {
            fields.push(RestrictedExpression::new_string(format!("{name}={value}")));
        }
    }
    if needs.fields {
        pairs.push(("fields".to_owned(), RestrictedExpression::new_set(fields)));
    }
    pairs
}

/// The account of `arn:partition:service:region:account:resource` when it is 12
/// digits, else `""`.
fn arn_account(arn: &str) -> &str {
    let mut parts = arn.splitn(6, ':');
    if parts.next() != Some("arn") {
        return "";
    }
    match (parts.nth(3), parts.next()) {
        (Some(account), Some(_resource))
            if account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit()) =>
        {
            account
        }
        _ => "",
    }
}

/// Rebuilds `parsed` with each policy named after its `@id`; rejects templates and empty
/// or duplicate ids.
fn rename_by_annotation(text: &str, parsed: &PolicySet) -> Result<PolicySet, AuthzError> {
    let mut problems = Vec::new();
    let lines = policy_lines(text);
    for template in parsed.templates() {
        let id = template
            .annotation(ID_ANNOTATION)
            .map_or_else(|| template.id().to_string(), str::to_owned);
        problems.push(format!(
            "policy `{id}`{}: templates (`?principal`/`?resource` slots) are not supported",
            at_line(&lines, template.id().as_ref())
        ));
    }

    let mut policies = PolicySet::new();
    let mut seen: HashMap<String, String> = HashMap::new();
    for policy in parsed.policies() {
        let positional = policy.id().to_string();
        let renamed = match policy.annotation(ID_ANNOTATION) {
            None => policy.clone(),
            Some("") => {
                problems.push(format!(
                    "policy `{positional}`{}: empty @id annotation",
                    at_line(&lines, &positional)
                ));
                continue;
            }
            Some(id) => policy.new_id(PolicyId::new(id)),
        };
        let id = renamed.id().to_string();
        if let Some(first) = seen.get(&id) {
            let (a, b) = ordered(first, &positional);
            problems.push(format!(
                "policy id `{id}` is used twice ({}{} and {}{}){}",
                a,
                at_line(&lines, a),
                b,
                at_line(&lines, b),
                if id.starts_with("policy") {
                    "; an @id may not reuse the positional id of an unannotated policy"
                } else {
                    ""
                }
            ));
            continue;
        }
        seen.insert(id.clone(), positional);
        if let Err(e) = policies.add(renamed) {
            problems.push(format!("policy `{id}`: {e}"));
        }
    }
    if problems.is_empty() {
        Ok(policies)
    } else {
        problems.sort();
        Err(AuthzError::Parse { problems })
    }
}

/// The two positional ids in statement order (for stable messages).
fn ordered<'s>(a: &'s str, b: &'s str) -> (&'s str, &'s str) {
    let n = |s: &str| {
        s.strip_prefix("policy")
            .and_then(|d| d.parse::<usize>().ok())
    };
    if n(a) <= n(b) {
        (a, b)
    } else {
        (b, a)
    }
}

/// `policy `id` (line N): message`, without Cedar's own "for policy `id`, " lead-in.
fn about_policy(lines: &HashMap<String, usize>, id: &str, message: &dyn fmt::Display) -> String {
    let message = message.to_string();
    let message = message
        .strip_prefix(&format!("for policy `{id}`, "))
        .unwrap_or(&message);
    format!("policy `{id}`{}: {message}", at_line(lines, id))
}

/// `" (line N)"` for a policy id found in `lines`, else `""`.
fn at_line(lines: &HashMap<String, usize>, id: &str) -> String {
    lines
        .get(id)
        .map_or_else(String::new, |line| format!(" (line {line})"))
}

/// Maps both the positional id (`policy<N>`) and the `@id` of each statement to the line
/// it starts on. Only used to word error messages.
fn policy_lines(text: &str) -> HashMap<String, usize> {
    let mut lines = HashMap::new();
    for (index, statement) in statements(text).into_iter().enumerate() {
        if let Ok(policy) = PolicySet::from_str(statement.text) {
            let annotated = policy
                .policies()
                .map(|p| p.annotation(ID_ANNOTATION).map(str::to_owned))
                .chain(
                    policy
                        .templates()
                        .map(|t| t.annotation(ID_ANNOTATION).map(str::to_owned)),
                )
                .next()
                .flatten();
            if let Some(id) = annotated {
                lines.insert(id, statement.line);
            }
        }
        lines.insert(format!("policy{index}"), statement.line);
    }
    lines
}

/// Reports parse errors per statement, with the line it starts on, so that a long file
/// points at the broken policy. Falls back to Cedar's messages for the whole text.
fn locate_parse_errors(text: &str, whole: &cedar::ParseErrors) -> Vec<String> {
    let mut problems = Vec::new();
    for (index, statement) in statements(text).into_iter().enumerate() {
        if let Err(errors) = PolicySet::from_str(statement.text) {
            let name = annotated_id(statement.text).unwrap_or_else(|| format!("policy{index}"));
            let mut messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
            messages.dedup();
            problems.push(format!(
                "policy `{name}` (line {}): {}",
                statement.line,
                messages.join(", ")
            ));
        }
    }
    if problems.is_empty() {
        problems = whole.iter().map(ToString::to_string).collect();
    }
    problems
}

/// Best effort: the `@id("…")` of a statement that does not parse.
fn annotated_id(statement: &str) -> Option<String> {
    let rest = statement.split_once("@id")?.1.trim_start();
    let rest = rest.strip_prefix('(')?.trim_start().strip_prefix('"')?;
    let (id, _) = rest.split_once('"')?;
    Some(id.to_owned())
}

/// One `;`-terminated statement of a policy text.
#[derive(Debug, PartialEq, Eq)]
struct Statement<'t> {
    /// 1-based line of the statement's first character that is not blank or comment.
    line: usize,
    text: &'t str,
}

/// Splits Cedar policy text into statements at each `;` outside string literals and
/// `//` comments. A trailing statement without `;` is kept (Cedar will reject it).
fn statements(text: &str) -> Vec<Statement<'_>> {
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        Code,
        Comment,
        Str { escaped: bool },
    }
    let mut out = Vec::new();
    let mut state = State::Code;
    let mut start = 0;
    let mut first_line: Option<usize> = None;
    let mut line = 1;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match state {
            State::Comment => {
                if c == '\n' {
                    state = State::Code;
                }
            }
            State::Str { escaped: true } => state = State::Str { escaped: false },
            State::Str { escaped: false } => match c {
                '\\' => state = State::Str { escaped: true },
                '"' => state = State::Code,
                _ => {}
            },
            State::Code => {
                if c == '/' && chars.peek().map(|&(_, n)| n) == Some('/') {
                    state = State::Comment;
                } else if !c.is_whitespace() {
                    first_line.get_or_insert(line);
                    if c == '"' {
                        state = State::Str { escaped: false };
                    } else if c == ';' {
                        out.push(Statement {
                            line: first_line.take().unwrap_or(line),
                            text: &text[start..=i],
                        });
                        start = i + 1;
                    }
                }
            }
        }
        if c == '\n' {
            line += 1;
        }
    }
    if let Some(line) = first_line {
        out.push(Statement {
            line,
            text: &text[start..],
        });
    }
    out
}

// Compile-time check: an `Authorizer` can be shared between request tasks.
const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    shareable::<Authorizer>();
};

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Map, Value};

    const EXAMPLE: &str = include_str!("../config/policies/example.cedar");

    const ORDERS_ROLE: &str = "arn:aws:iam::111122223333:role/OrdersApp";
    const ORDERS_KMS_KEY: &str =
        "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    const ORDERS_VPCE: &str = "vpce-0a1b2c3d4e5f67890";

    fn map(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    /// The request the example's first policy is written for.
    fn orders_metadata() -> Map<String, Value> {
        map(json!({
            "awsPrincipalArn": ORDERS_ROLE,
            "awsSourceVpc": "vpc-0123456789abcdef0",
            "awsSourceVpce": ORDERS_VPCE,
            "kmsKeyArn": ORDERS_KMS_KEY,
            "kmsOperation": "Decrypt",
            "kmsRequestId": "4112f4d6-db54-4af4-ae30-c55a22a8dfae",
            "kmsViaService": "s3.us-east-1.amazonaws.com",
        }))
    }

    fn decide(
        authz: &Authorizer,
        operation: &str,
        key: &str,
        metadata: &Map<String, Value>,
    ) -> Decision {
        let (key_store, key_id) = key.split_once('/').unwrap();
        let principal_arn = metadata
            .get("awsPrincipalArn")
            .and_then(Value::as_str)
            .unwrap_or("");
        authz.authorize(&AuthzRequest {
            principal_arn,
            operation,
            key_store,
            key_id,
            metadata,
        })
    }

    fn example() -> Authorizer {
        Authorizer::new(EXAMPLE).unwrap()
    }

    fn with(mut m: Map<String, Value>, field: &str, value: Value) -> Map<String, Value> {
        m.insert(field.to_owned(), value);
        m
    }

    fn without(mut m: Map<String, Value>, field: &str) -> Map<String, Value> {
        m.remove(field);
        m
    }

    #[test]
    fn schema_parses_without_warnings() {
        let (_, warnings) = cedar::Schema::from_cedarschema_str(SCHEMA).unwrap();
        assert_eq!(warnings.count(), 0);
        let _ = &MODEL.validator;
    }

    #[test]
    fn example_loads_with_annotated_ids() {
        let authz = example();
        assert_eq!(
            authz.policy_ids(),
            [
                "dev-break-glass-needs-source-identity",
                "dev-store-dev-account",
                "orders-key-metadata-owner-account",
                "orders-key-s3-from-vpce",
                "prod-store-owner-kms-keys-only",
            ]
        );
        assert!(authz.warnings().is_empty(), "{:?}", authz.warnings());
    }

    #[test]
    fn example_allows_the_intended_request() {
        let authz = example();
        for op in ["Encrypt", "Decrypt"] {
            let d = decide(&authz, op, "prod/orders-key", &orders_metadata());
            assert!(d.allowed, "{op}: {d}");
            assert_eq!(d.policy_ids, ["orders-key-s3-from-vpce"]);
            assert!(d.errors.is_empty());
            assert_eq!(d.to_string(), "allowed by policy `orders-key-s3-from-vpce`");
        }
    }

    #[test]
    fn example_denies_other_callers_paths_and_keys() {
        let authz = example();
        let cases = [
            (
                "wrong account",
                with(
                    orders_metadata(),
                    "awsPrincipalArn",
                    json!("arn:aws:iam::999988887777:role/OrdersApp"),
                ),
                "prod/orders-key",
            ),
            (
                "wrong role",
                with(
                    orders_metadata(),
                    "awsPrincipalArn",
                    json!("arn:aws:iam::111122223333:role/Reporting"),
                ),
                "prod/orders-key",
            ),
            (
                "wrong via service",
                with(
                    orders_metadata(),
                    "kmsViaService",
                    json!("ec2.us-east-1.amazonaws.com"),
                ),
                "prod/orders-key",
            ),
            (
                "no via service",
                without(orders_metadata(), "kmsViaService"),
                "prod/orders-key",
            ),
            (
                "wrong VPC endpoint",
                with(
                    orders_metadata(),
                    "awsSourceVpce",
                    json!("vpce-00000000000000000"),
                ),
                "prod/orders-key",
            ),
            (
                "not through a VPC endpoint",
                without(without(orders_metadata(), "awsSourceVpce"), "awsSourceVpc"),
                "prod/orders-key",
            ),
            ("other key", orders_metadata(), "prod/other-key"),
            (
                "same key id, other store",
                orders_metadata(),
                "test/orders-key",
            ),
        ];
        for (what, metadata, key) in cases {
            let d = decide(&authz, "Decrypt", key, &metadata);
            assert!(!d.allowed, "{what}: {d}");
            assert!(d.policy_ids.is_empty(), "{what}: {d}");
            assert!(d.errors.is_empty(), "{what}: {d}");
            assert_eq!(d.to_string(), "denied: no policy permits", "{what}");
        }
    }

    #[test]
    fn example_forbid_beats_permit_and_is_named() {
        let authz = example();
        // Everything the permit wants, but for a KMS key of another account.
        let metadata = with(
            orders_metadata(),
            "kmsKeyArn",
            json!("arn:aws:kms:us-east-1:999988887777:key/1234abcd-12ab-34cd-56ef-1234567890ab"),
        );
        let d = decide(&authz, "Encrypt", "prod/orders-key", &metadata);
        assert!(!d.allowed);
        assert_eq!(d.policy_ids, ["prod-store-owner-kms-keys-only"]);
        assert_eq!(
            d.to_string(),
            "denied by policy `prod-store-owner-kms-keys-only`"
        );
        // And without any kmsKeyArn at all.
        let d = decide(
            &authz,
            "Encrypt",
            "prod/orders-key",
            &without(orders_metadata(), "kmsKeyArn"),
        );
        assert_eq!(d.policy_ids, ["prod-store-owner-kms-keys-only"]);
    }

    #[test]
    fn example_get_key_metadata_and_dev_store() {
        let authz = example();
        let create_key = map(json!({
            "awsPrincipalArn": "arn:aws:iam::111122223333:user/Admin",
            "kmsOperation": "CreateKey",
            "kmsRequestId": "r-1",
        }));
        let d = decide(&authz, "GetKeyMetadata", "prod/orders-key", &create_key);
        assert_eq!(d.policy_ids, ["orders-key-metadata-owner-account"], "{d}");
        assert!(d.allowed);
        // The metadata permit is not a crypto permit.
        let d = decide(&authz, "Encrypt", "prod/orders-key", &create_key);
        assert!(!d.allowed, "{d}");

        let dev = map(json!({
            "awsPrincipalArn": "arn:aws:sts::444455556666:assumed-role/Dev/alice",
            "kmsOperation": "Encrypt",
            "kmsRequestId": "r-2",
        }));
        assert!(decide(&authz, "Encrypt", "dev/scratch", &dev).allowed);
        // Unknown metadata fields reach policies through `context.fields`.
        let d = decide(&authz, "Encrypt", "dev/break-glass", &dev);
        assert!(!d.allowed);
        assert_eq!(d.policy_ids, ["dev-break-glass-needs-source-identity"]);
        let d = decide(
            &authz,
            "Encrypt",
            "dev/break-glass",
            &with(dev.clone(), "SourceIdentity", json!("incident-response")),
        );
        assert!(d.allowed, "{d}");
        // A number is not the string: the field is invisible, the forbid holds.
        let d = decide(
            &authz,
            "Encrypt",
            "dev/break-glass",
            &with(dev, "SourceIdentity", json!(7)),
        );
        assert!(!d.allowed);
    }

    #[test]
    fn forbid_beats_permit_inline() {
        let authz = Authorizer::new(
            r#"
            @id("everyone")
            permit (principal, action, resource);
            @id("no-decrypt-k1")
            forbid (principal, action == Xks::Action::"Decrypt", resource)
            when { resource.key_id == "k1" };
            "#,
        )
        .unwrap();
        let m = map(json!({"awsPrincipalArn": "AWS Internal", "kmsOperation": "Decrypt"}));
        let d = decide(&authz, "Decrypt", "s/k1", &m);
        assert!(!d.allowed);
        assert_eq!(d.policy_ids, ["no-decrypt-k1"]);
        let d = decide(&authz, "Encrypt", "s/k1", &m);
        assert!(d.allowed);
        assert_eq!(d.policy_ids, ["everyone"]);
    }

    #[test]
    fn unannotated_policies_keep_positional_ids() {
        let authz = Authorizer::new(
            r#"
            @id("named") permit (principal, action == Xks::Action::"Encrypt", resource);
            permit (principal, action == Xks::Action::"Decrypt", resource);
            "#,
        )
        .unwrap();
        assert_eq!(authz.policy_ids(), ["named", "policy1"]);
        let m = Map::new();
        assert_eq!(decide(&authz, "Decrypt", "s/k", &m).policy_ids, ["policy1"]);
    }

    #[test]
    fn empty_policy_set_denies_everything() {
        let authz = Authorizer::new("// nothing yet\n").unwrap();
        let d = decide(&authz, "Encrypt", "s/k", &orders_metadata());
        assert!(!d.allowed);
        assert!(d.policy_ids.is_empty());
    }

    #[test]
    fn other_operations_are_denied_with_a_reason() {
        let authz = Authorizer::new("permit (principal, action, resource);").unwrap();
        for op in ["GetHealthStatus", "encrypt", ""] {
            let d = decide(&authz, op, "s/k", &orders_metadata());
            assert!(!d.allowed, "{op}");
            assert_eq!(d.errors.len(), 1, "{op}");
            assert!(d.errors[0].contains("not subject to authorization"), "{d}");
        }
    }

    fn validation_problems(text: &str) -> Vec<String> {
        match Authorizer::new(text) {
            Err(AuthzError::Validation { problems }) => problems,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    fn parse_problems(text: &str) -> Vec<String> {
        match Authorizer::new(text) {
            Err(AuthzError::Parse { problems }) => problems,
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn schema_violations_are_rejected_naming_the_policy() {
        let p = validation_problems(
            r#"
            @id("fine") permit (principal, action, resource);
            @id("typo") permit (principal, action, resource) when { context.nosuch == "x" };
            "#,
        );
        // One problem per action the policy applies to, all about `typo`.
        assert_eq!(p.len(), 3, "{p:?}");
        for problem in &p {
            assert!(
                problem.starts_with("policy `typo` (line 3): attribute `nosuch` in context"),
                "{p:?}"
            );
        }

        let p = validation_problems(
            "permit (principal, action == Xks::Action::\"CreateKey\", resource);",
        );
        assert!(p[0].starts_with("policy `policy0` (line 1): "), "{p:?}");
        assert!(p[0].contains("CreateKey"), "{p:?}");

        // An optional field read without `has`.
        let p = validation_problems(
            r#"@id("unguarded") permit (principal, action, resource) when { context.kmsViaService == "s3.amazonaws.com" };"#,
        );
        assert!(p[0].starts_with("policy `unguarded`"), "{p:?}");

        // An unknown entity type.
        let p =
            validation_problems(r#"@id("t") permit (principal is Xks::User, action, resource);"#);
        assert!(p[0].contains("Xks::User"), "{p:?}");

        let err = Authorizer::new(
            r#"@id("x") permit (principal, action, resource) when { resource.nope };"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("Cedar policies do not match the xks-proxy schema: policy `x`"),
            "{err}"
        );
    }

    #[test]
    fn malformed_text_is_rejected_naming_the_statement() {
        let p = parse_problems(
            r#"
            @id("ok") permit (principal, action, resource);

            // a comment with ; and "quotes
            @id("broken")
            permit (principal, action, resource) when { context.fields.contains( };
            "#,
        );
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("policy `broken` (line 5): "), "{p:?}");

        let p = parse_problems("permit (principal, action, resource)");
        assert!(p[0].starts_with("policy `policy0` (line 1)"), "{p:?}");
        let p = parse_problems("allow everything;");
        assert!(!p.is_empty());
        let p = parse_problems("permit (principal, action, resource) when { \"unterminated };");
        assert!(!p.is_empty());
    }

    #[test]
    fn unsupported_ids_and_templates_are_rejected() {
        let p = parse_problems(
            r#"
            @id("a") permit (principal, action, resource);
            @id("a") forbid (principal, action, resource);
            "#,
        );
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains("`a` is used twice (policy0 (line 2) and policy1 (line 3))"),
            "{p:?}"
        );

        let p = parse_problems(
            r#"
            permit (principal, action, resource);
            @id("policy0") permit (principal, action, resource);
            "#,
        );
        assert!(p[0].contains("positional id"), "{p:?}");

        let p = parse_problems(r#"@id("") permit (principal, action, resource);"#);
        assert!(p[0].contains("empty @id"), "{p:?}");

        let p = parse_problems(r#"@id("tpl") permit (principal == ?principal, action, resource);"#);
        assert!(
            p[0].starts_with("policy `tpl` (line 1): templates"),
            "{p:?}"
        );
    }

    #[test]
    fn from_file_reads_and_reports_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.cedar");
        std::fs::write(&path, EXAMPLE).unwrap();
        assert_eq!(Authorizer::from_file(&path).unwrap().policy_ids().len(), 5);
        let missing = dir.path().join("missing.cedar");
        let err = Authorizer::from_file(&missing).unwrap_err();
        assert!(matches!(err, AuthzError::Read { .. }));
        assert!(err.to_string().contains("missing.cedar"), "{err}");
    }

    #[test]
    fn non_string_metadata_is_ignored_without_panic() {
        let authz = Authorizer::new(
            r#"
            @id("vpce") permit (principal, action, resource)
            when { context has awsSourceVpce };
            @id("fields") permit (principal, action, resource)
            when { context.fields.contains("kmsOperation=Encrypt") };
            @id("account") permit (principal, action, resource)
            when { principal.account == "111122223333" };
            "#,
        )
        .unwrap();
        let weird = map(json!({
            "awsPrincipalArn": ["not", "a", "string"],
            "awsSourceVpce": 12,
            "kmsOperation": {"nested": "Encrypt"},
            "kmsKeyArn": null,
            "kmsViaService": true,
            "a=b": "c",
            "": "",
        }));
        let d = decide(&authz, "Encrypt", "s/k", &weird);
        assert!(!d.allowed, "{d}");
        assert!(d.errors.is_empty(), "{d}");
        let d = decide(&authz, "Encrypt", "s/k", &Map::new());
        assert!(!d.allowed, "{d}");
        // Principal ARNs of every shape.
        for arn in [
            "",
            "AWS Internal",
            "ec2.amazonaws.com",
            "arn:",
            "arn:aws:iam::1:root",
            "🦀",
        ] {
            let d = authz.authorize(&AuthzRequest {
                principal_arn: arn,
                operation: "Decrypt",
                key_store: "",
                key_id: "",
                metadata: &weird,
            });
            assert!(!d.allowed, "{arn}: {d}");
        }
    }

    #[test]
    fn built_request_conforms_to_the_schema() {
        let model: &Model = &MODEL;
        let schema = model.validator.schema();
        let weird = map(json!({"kmsOperation": 1, "x": "y", "a=b": "c"}));
        for metadata in [orders_metadata(), Map::new(), weird] {
            for operation in ["Encrypt", "Decrypt", "GetKeyMetadata"] {
                let r = AuthzRequest {
                    principal_arn: ORDERS_ROLE,
                    operation,
                    key_store: "prod",
                    key_id: "orders-key",
                    metadata: &metadata,
                };
                build_entities(model, &r, Some(schema)).unwrap();
                build_request(model, &r, &ContextNeeds::all(), Some(schema)).unwrap();
            }
        }
    }

    #[test]
    fn context_fields_are_name_value_pairs() {
        let m =
            map(json!({"SourceIdentity": "alice", "a=b": "c", "n": 1, "kmsOperation": "Encrypt"}));
        let context = Context::from_pairs(context_pairs(&m, &ContextNeeds::all())).unwrap();
        let fields = context.get("fields").unwrap().to_string();
        assert!(fields.contains("SourceIdentity=alice"), "{fields}");
        assert!(fields.contains("kmsOperation=Encrypt"), "{fields}");
        assert!(!fields.contains("a=b"), "{fields}");
        assert!(!fields.contains("\"n="), "{fields}");
        assert!(context.get("kmsOperation").is_some());
        assert!(context.get("SourceIdentity").is_none());
    }

    #[test]
    fn arn_accounts() {
        assert_eq!(
            arn_account("arn:aws:iam::111122223333:role/R"),
            "111122223333"
        );
        assert_eq!(
            arn_account("arn:aws:sts::111122223333:assumed-role/R/session:with:colons"),
            "111122223333"
        );
        assert_eq!(
            arn_account("arn:aws-cn:iam::111122223333:root"),
            "111122223333"
        );
        assert_eq!(arn_account("arn:aws:s3:::bucket"), "");
        assert_eq!(arn_account("arn:aws:iam::11112222333:role/R"), "");
        assert_eq!(arn_account("arn:aws:iam::111122223333"), "");
        assert_eq!(arn_account("AWS Internal"), "");
        assert_eq!(arn_account("ec2.amazonaws.com"), "");
        assert_eq!(arn_account(""), "");
    }

    #[test]
    fn statement_splitting() {
        let text = "// c;\n@id(\"a;b\") permit (principal, action, resource) when { \"\\\";\" == \"x\" };\n\n  forbid (principal, action, resource)\n;\ntrailing";
        let s = statements(text);
        assert_eq!(s.len(), 3, "{s:?}");
        assert_eq!(s[0].line, 2);
        assert!(s[0].text.ends_with("== \"x\" };"));
        assert_eq!(s[1].line, 4);
        assert_eq!(s[1].text.trim(), "forbid (principal, action, resource)\n;");
        assert_eq!(
            s[2],
            Statement {
                line: 6,
                text: "\ntrailing"
            }
        );
        assert!(statements("  // only a comment\n\n").is_empty());
        assert_eq!(annotated_id(s[0].text).as_deref(), Some("a;b"));
    }

    #[test]
    fn statement_lines_follow_cedar_numbering() {
        // `policy_lines` assumes Cedar numbers statements as `statements` splits them.
        let lines = policy_lines(EXAMPLE);
        let parsed = PolicySet::from_str(EXAMPLE).unwrap();
        for p in parsed.policies() {
            let id = p.annotation(ID_ANNOTATION).unwrap();
            assert_eq!(lines.get(id), lines.get(&p.id().to_string()), "{id}");
            assert!(lines.contains_key(id));
        }
        assert_eq!(parsed.policies().count(), statements(EXAMPLE).len());
    }

    #[test]
    fn only_attributes_named_in_the_policies_are_built() {
        // Comments do not count (the example's header names every field), and
        // `awsSourceVpc` is not `awsSourceVpce`.
        let needs = example().needs;
        assert!(needs.fields);
        assert_eq!(
            needs.named,
            ["kmsKeyArn", "kmsViaService", "awsSourceVpce"],
            "the example reads these three"
        );
        let authz = Authorizer::new(
            r#"@id("via-s3") permit (principal, action, resource)
               when { context has kmsViaService && context.kmsViaService like "s3.*" };"#,
        )
        .unwrap();
        assert_eq!(
            authz.needs,
            ContextNeeds {
                fields: false,
                named: vec!["kmsViaService"]
            }
        );
        let metadata = orders_metadata();
        let r = |metadata| AuthzRequest {
            principal_arn: ORDERS_ROLE,
            operation: "Encrypt",
            key_store: "prod",
            key_id: "orders-key",
            metadata,
        };
        let decision = authz.authorize(&r(&metadata));
        assert!(decision.allowed && decision.errors.is_empty(), "{decision}");
        let mut other = metadata.clone();
        other.insert("kmsViaService".into(), json!("ebs"));
        assert!(!authz.authorize(&r(&other)).allowed);
    }

    #[test]
    fn entity_cache_is_bounded_and_keyed_by_principal_and_key() {
        let authz = example();
        let metadata = orders_metadata();
        let r = |principal_arn, key_id| AuthzRequest {
            principal_arn,
            operation: "Decrypt",
            key_store: "prod",
            key_id,
            metadata: &metadata,
        };
        // The same key with another principal, then the first principal with another
        // key: cached entities of one pair never answer for another.
        assert!(authz.authorize(&r(ORDERS_ROLE, "orders-key")).allowed);
        assert!(
            !authz
                .authorize(&r("arn:aws:iam::999988887777:role/OrdersApp", "orders-key"))
                .allowed
        );
        assert!(!authz.authorize(&r(ORDERS_ROLE, "other-key")).allowed);
        assert!(authz.authorize(&r(ORDERS_ROLE, "orders-key")).allowed);
        assert_eq!(authz.entities.lock().len(), 3);
        for i in 0..CACHE_ENTRIES + 10 {
            let key_id = format!("key-{i}");
            let decision = authz.authorize(&AuthzRequest {
                key_id: &key_id,
                ..r(ORDERS_ROLE, "orders-key")
            });
            assert!(!decision.allowed);
        }
        assert!(authz.entities.lock().len() <= CACHE_ENTRIES);
    }

    #[test]
    fn decisions_are_cached_only_when_no_policy_reads_per_request_fields() {
        let lean = Authorizer::new(
            r#"@id("via-s3") permit (principal, action, resource)
               when { context has kmsViaService && context.kmsViaService like "s3.*" };"#,
        )
        .unwrap();
        let mut metadata = orders_metadata();
        let decide = |authz: &Authorizer, metadata: &Map<String, Value>| {
            authz.authorize(&AuthzRequest {
                principal_arn: ORDERS_ROLE,
                operation: "Encrypt",
                key_store: "prod",
                key_id: "orders-key",
                metadata,
            })
        };
        assert!(decide(&lean, &metadata).allowed);
        // Another request id hits the same entry; another service is a new entry with
        // its own answer; a field the policy does not read changes nothing.
        metadata.insert("kmsRequestId".into(), json!("other"));
        assert!(decide(&lean, &metadata).allowed);
        assert_eq!(lean.decisions.lock().len(), 1);
        metadata.insert("kmsViaService".into(), json!("ebs.us-east-1.amazonaws.com"));
        assert!(!decide(&lean, &metadata).allowed);
        metadata.remove("kmsViaService");
        assert!(!decide(&lean, &metadata).allowed);
        assert_eq!(lean.decisions.lock().len(), 3);

        // The example reads `fields` (which holds kmsRequestId): never cached.
        let example = example();
        let metadata = orders_metadata();
        assert!(decide(&example, &metadata).allowed);
        assert!(example.decisions.lock().is_empty());
    }
}
