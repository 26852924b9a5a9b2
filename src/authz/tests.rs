//! Policies, decisions and their caches, and the errors a policy file can have.

use super::*;
use serde_json::{json, Map, Value};

const EXAMPLE: &str = include_str!("../../config/policies/example.cedar");

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

/// The metadata's string fields, as `RequestMetadata::fields` gives them (it skips
/// other values while parsing: `xks::request`'s tests).
fn strings(metadata: &Map<String, Value>) -> Vec<(&str, &str)> {
    metadata
        .iter()
        .filter_map(|(name, value)| Some((name.as_str(), value.as_str()?)))
        .collect()
}

fn op(name: &str) -> ApiOperation {
    ApiOperation::ALL
        .into_iter()
        .find(|o| o.as_str() == name)
        .unwrap()
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
        operation: op(operation),
        key_store,
        key_id,
        metadata: &strings(metadata),
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
    let d = decide(&authz, "GetHealthStatus", "s/k", &orders_metadata());
    assert!(!d.allowed);
    assert_eq!(d.errors.len(), 1);
    assert!(d.errors[0].contains("not subject to authorization"), "{d}");
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
            operation: ApiOperation::Decrypt,
            key_store: "",
            key_id: "",
            metadata: &strings(&weird),
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
        for operation in [
            ApiOperation::Encrypt,
            ApiOperation::Decrypt,
            ApiOperation::GetKeyMetadata,
        ] {
            let r = AuthzRequest {
                principal_arn: ORDERS_ROLE,
                operation,
                key_store: "prod",
                key_id: "orders-key",
                metadata: &strings(&metadata),
            };
            build_entities(model, &r, Some(schema)).unwrap();
            build_request(model, &r, &ContextNeeds::all(), Some(schema)).unwrap();
        }
    }
}

#[test]
fn context_fields_are_name_value_pairs() {
    let m = map(json!({"SourceIdentity": "alice", "a=b": "c", "n": 1, "kmsOperation": "Encrypt"}));
    let context = Context::from_pairs(context_pairs(&strings(&m), &ContextNeeds::all())).unwrap();
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
        operation: ApiOperation::Encrypt,
        key_store: "prod",
        key_id: "orders-key",
        metadata,
    };
    let fields = strings(&metadata);
    let decision = authz.authorize(&r(&fields));
    assert!(decision.allowed && decision.errors.is_empty(), "{decision}");
    let mut other = metadata.clone();
    other.insert("kmsViaService".into(), json!("ebs"));
    let other_fields = strings(&other);
    assert!(!authz.authorize(&r(&other_fields)).allowed);
}

#[test]
fn entity_cache_is_bounded_and_keyed_by_principal_and_key() {
    let authz = example();
    let metadata = orders_metadata();
    let fields = strings(&metadata);
    let r = |principal_arn, key_id| AuthzRequest {
        principal_arn,
        operation: ApiOperation::Decrypt,
        key_store: "prod",
        key_id,
        metadata: &fields,
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
            operation: ApiOperation::Encrypt,
            key_store: "prod",
            key_id: "orders-key",
            metadata: &strings(metadata),
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
