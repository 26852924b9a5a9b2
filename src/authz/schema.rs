//! The Cedar model: the schema (entity types, actions, context), its parsed form
//! built once, and the annotation that names a policy.

use super::*;

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
pub(super) const CONTEXT_FIELDS: [&str; 6] = [
    "kmsOperation",
    "kmsKeyArn",
    "kmsRequestId",
    "kmsViaService",
    "awsSourceVpc",
    "awsSourceVpce",
];

/// The annotation that names a policy.
pub(super) const ID_ANNOTATION: &str = "id";

/// Everything derived from [`SCHEMA`], built once per process.
pub(super) struct Model {
    pub(super) validator: Validator,
    pub(super) principal_type: EntityTypeName,
    pub(super) key_type: EntityTypeName,
    pub(super) encrypt: EntityUid,
    pub(super) decrypt: EntityUid,
    pub(super) get_key_metadata: EntityUid,
}

impl Model {
    pub(super) fn build() -> Self {
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

    pub(super) fn action(&self, operation: ApiOperation) -> Option<&EntityUid> {
        match operation {
            ApiOperation::Encrypt => Some(&self.encrypt),
            ApiOperation::Decrypt => Some(&self.decrypt),
            ApiOperation::GetKeyMetadata => Some(&self.get_key_metadata),
            ApiOperation::GetHealthStatus => None,
        }
    }
}

pub(super) static MODEL: LazyLock<Model> = LazyLock::new(Model::build);
