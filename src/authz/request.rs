//! A Cedar request built from `requestMetadata`: principal and key entities, the
//! action, and the context attributes the policies read.

use super::*;

pub(super) fn principal_uid(model: &Model, r: &AuthzRequest<'_>) -> EntityUid {
    EntityUid::from_type_name_and_id(model.principal_type.clone(), EntityId::new(r.principal_arn))
}

pub(super) fn key_uid(model: &Model, r: &AuthzRequest<'_>) -> EntityUid {
    EntityUid::from_type_name_and_id(
        model.key_type.clone(),
        EntityId::new(format!("{}/{}", r.key_store, r.key_id)),
    )
}

/// Builds the request's two entities (principal, key). With `schema`, Cedar also checks
/// them against it (tests do; production skips the cost, the shapes being fixed here).
pub(super) fn build_entities(
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
pub(super) fn build_request(
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
                r.operation.as_str()
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
pub(super) fn context_pairs(
    metadata: &[(&str, &str)],
    needs: &ContextNeeds,
) -> Vec<(String, RestrictedExpression)> {
    let mut pairs = Vec::with_capacity(CONTEXT_FIELDS.len() + 1);
    let mut fields = Vec::with_capacity(if needs.fields { metadata.len() } else { 0 });
    for &(name, value) in metadata {
        if needs.named.contains(&name) {
            pairs.push((
                name.to_owned(),
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

/// The value of the string field `name`, if the metadata has one.
pub(super) fn field<'a>(metadata: &[(&str, &'a str)], name: &str) -> Option<&'a str> {
    metadata
        .iter()
        .find_map(|&(n, value)| (n == name).then_some(value))
}

/// The account of `arn:partition:service:region:account:resource` when it is 12
/// digits, else `""`.
pub(super) fn arn_account(arn: &str) -> &str {
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
