//! What every XKS request shares: `requestMetadata`, Base64 fields, and the audit facts
//! we log for each request.

use std::borrow::Cow;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::Deserialize;

use super::error::XksError;

/// `requestMetadata` (spec: each API's request payload; Appendix B).
///
/// Fields are optional at the type level so a missing one is reported by name instead
/// of as a generic JSON error. Unknown fields are accepted (spec: KMS may add fields);
/// unknown `kmsOperation` values are accepted (spec: MUST NOT reject). Unknown fields
/// with string values are kept in [`Self::others`], for authorization policies that
/// read them; others are skipped.
#[derive(Debug, Default)]
pub struct RequestMetadata<'a> {
    /// The AWS principal that called KMS.
    pub aws_principal_arn: Option<Cow<'a, str>>,
    /// The KMS key.
    pub kms_key_arn: Option<Cow<'a, str>>,
    /// The KMS API that caused this call.
    pub kms_operation: Option<Cow<'a, str>>,
    /// CloudTrail request id; opaque (spec: MUST NOT validate its structure).
    pub kms_request_id: Option<Cow<'a, str>>,
    /// The AWS service that called KMS on the customer's behalf.
    pub kms_via_service: Option<Cow<'a, str>>,
    /// The VPC of a VPC-endpoint request.
    pub aws_source_vpc: Option<Cow<'a, str>>,
    /// The VPC endpoint of a VPC-endpoint request.
    pub aws_source_vpce: Option<Cow<'a, str>>,
    /// Fields of other names with string values, as received.
    pub others: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

impl<'de: 'a, 'a> Deserialize<'de> for RequestMetadata<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(MetadataVisitor(std::marker::PhantomData))
    }
}

struct MetadataVisitor<'a>(std::marker::PhantomData<&'a ()>);

impl<'de: 'a, 'a> serde::de::Visitor<'de> for MetadataVisitor<'a> {
    type Value = RequestMetadata<'a>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the requestMetadata object")
    }

    fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
        let mut metadata = RequestMetadata::default();
        while let Some(Borrowed(name)) = map.next_key::<Borrowed<'a>>()? {
            let slot = match name.as_ref() {
                "awsPrincipalArn" => &mut metadata.aws_principal_arn,
                "kmsKeyArn" => &mut metadata.kms_key_arn,
                "kmsOperation" => &mut metadata.kms_operation,
                "kmsRequestId" => &mut metadata.kms_request_id,
                "kmsViaService" => &mut metadata.kms_via_service,
                "awsSourceVpc" => &mut metadata.aws_source_vpc,
                "awsSourceVpce" => &mut metadata.aws_source_vpce,
                _ => {
                    if let StringOrSkipped(Some(value)) = map.next_value()? {
                        metadata.others.push((name, value));
                    }
                    continue;
                }
            };
            if slot.is_some() {
                // Same words as a derived struct's, which parse_json names safely.
                return Err(serde::de::Error::custom(format_args!(
                    "duplicate field `{name}`"
                )));
            }
            // A null is absent, as with a plain `Option`; another type is refused.
            *slot = map.next_value::<Option<Borrowed<'a>>>()?.map(|b| b.0);
        }
        Ok(metadata)
    }
}

/// A string borrowed from the body when it has no escapes.
#[derive(Deserialize)]
struct Borrowed<'a>(#[serde(borrow)] Cow<'a, str>);

/// A value kept when it is a string and skipped otherwise.
struct StringOrSkipped<'a>(Option<Cow<'a, str>>);

impl<'de: 'a, 'a> Deserialize<'de> for StringOrSkipped<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visitor<'a> {
            type Value = StringOrSkipped<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(StringOrSkipped(Some(Cow::Borrowed(v))))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(StringOrSkipped(Some(Cow::Owned(v.to_owned()))))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(StringOrSkipped(Some(Cow::Owned(v))))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(StringOrSkipped(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(StringOrSkipped(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(StringOrSkipped(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(StringOrSkipped(None))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(StringOrSkipped(None))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(StringOrSkipped(None))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(StringOrSkipped(None))
            }
        }
        deserializer.deserialize_any(Visitor(std::marker::PhantomData))
    }
}

/// Which metadata fields an operation requires.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Required {
    pub(crate) principal: bool,
    pub(crate) key_arn: bool,
}

impl<'a> RequestMetadata<'a> {
    /// Checks the fields the operation requires are present (spec: "This field is
    /// REQUIRED"); their content is not validated.
    pub(crate) fn require(&self, required: Required) -> Result<(), XksError> {
        let missing = |name: &'static str| {
            XksError::validation(match name {
                "awsPrincipalArn" => "requestMetadata.awsPrincipalArn is required",
                "kmsKeyArn" => "requestMetadata.kmsKeyArn is required",
                "kmsOperation" => "requestMetadata.kmsOperation is required",
                _ => "requestMetadata.kmsRequestId is required",
            })
        };
        if self.kms_request_id.is_none() {
            return Err(missing("kmsRequestId"));
        }
        if self.kms_operation.is_none() {
            return Err(missing("kmsOperation"));
        }
        if required.principal && self.aws_principal_arn.is_none() {
            return Err(missing("awsPrincipalArn"));
        }
        if required.key_arn && self.kms_key_arn.is_none() {
            return Err(missing("kmsKeyArn"));
        }
        Ok(())
    }

    /// Every field with a string value, by its JSON name: what authorization policies
    /// read.
    pub fn fields(&self) -> Vec<(&str, &str)> {
        let known = [
            ("awsPrincipalArn", &self.aws_principal_arn),
            ("kmsKeyArn", &self.kms_key_arn),
            ("kmsOperation", &self.kms_operation),
            ("kmsRequestId", &self.kms_request_id),
            ("kmsViaService", &self.kms_via_service),
            ("awsSourceVpc", &self.aws_source_vpc),
            ("awsSourceVpce", &self.aws_source_vpce),
        ];
        known
            .into_iter()
            .filter_map(|(name, value)| Some((name, value.as_deref()?)))
            .chain(self.others.iter().map(|(n, v)| (n.as_ref(), v.as_ref())))
            .collect()
    }

    /// The facts about this request that go into the log line, borrowed from the
    /// request body like the metadata itself.
    pub fn audit(&self) -> Audit<'a> {
        Audit {
            kms_request_id: self.kms_request_id.clone(),
            kms_operation: self.kms_operation.clone(),
            aws_principal_arn: self.aws_principal_arn.clone(),
            kms_key_arn: self.kms_key_arn.clone(),
            kms_via_service: self.kms_via_service.clone(),
            authorization: None,
        }
    }
}

/// Request facts for the per-request log line (spec: Logging — request metadata SHOULD
/// be logged, kmsRequestId in particular). Never plaintext, AAD or ciphertext. The
/// metadata is borrowed from the request body, which outlives the log line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Audit<'a> {
    /// requestMetadata.kmsRequestId.
    pub kms_request_id: Option<Cow<'a, str>>,
    /// requestMetadata.kmsOperation.
    pub kms_operation: Option<Cow<'a, str>>,
    /// requestMetadata.awsPrincipalArn.
    pub aws_principal_arn: Option<Cow<'a, str>>,
    /// requestMetadata.kmsKeyArn.
    pub kms_key_arn: Option<Cow<'a, str>>,
    /// requestMetadata.kmsViaService.
    pub kms_via_service: Option<Cow<'a, str>>,
    /// The secondary authorization's decision and the policies that made it.
    pub authorization: Option<String>,
}

/// Deserializes an optional string field, borrowing it from the body when it has no
/// escapes. serde borrows a `Cow<str>` only when the field's type is `Cow` itself: in
/// an `Option`, even with `#[serde(borrow)]`, every value was copied into a `String`
/// of its own (nine allocations per Encrypt).
pub(crate) fn borrowed<'de: 'a, 'a, D>(deserializer: D) -> Result<Option<Cow<'a, str>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    struct Borrowed<'a>(#[serde(borrow)] Cow<'a, str>);
    Ok(Option::<Borrowed<'a>>::deserialize(deserializer)?.map(|b| b.0))
}

/// Parses a JSON body without echoing any of its content in the error (a serde message
/// can quote values, and values may be secret).
///
/// The whole body must be UTF-8 (RFC 8259 §8.1): serde_json checks the strings it
/// decodes but skips over ignored fields byte by byte, so without this check a body
/// with invalid UTF-8 in an unknown field would pass as JSON (found by the `request`
/// fuzz target).
pub(crate) fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, XksError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        XksError::validation(format!(
            "request body is not UTF-8 (byte {})",
            e.valid_up_to()
        ))
    })?;
    serde_json::from_str(text).map_err(|e| {
        use serde_json::error::Category;
        let what = match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => "request body is not valid JSON",
            Category::Data => match duplicate_field(&e) {
                // One of our own field names, never a value: safe to say.
                Some(field) => {
                    return XksError::validation(format!(
                        "request body has the field {field} more than once (line {}, column {})",
                        e.line(),
                        e.column()
                    ))
                }
                None => "request body has a field of the wrong type",
            },
        };
        XksError::validation(format!("{what} (line {}, column {})", e.line(), e.column()))
    })
}

/// The field a "duplicate field" error names. serde reports a repeated field of a
/// struct as a data error like a value of the wrong type; its message is
/// `` duplicate field `name` `` with `name` one of the struct's own fields.
fn duplicate_field(error: &serde_json::Error) -> Option<String> {
    let message = error.to_string();
    let rest = message.strip_prefix("duplicate field `")?;
    let name = &rest[..rest.find('`')?];
    name.bytes()
        .all(|b| b.is_ascii_alphanumeric())
        .then(|| name.to_owned())
}

/// The largest plaintext Encrypt takes, and ciphertext Decrypt takes: the spec's
/// "MUST support up to 4300 bytes" (Encrypt: plaintext; Decrypt: ciphertext). KMS
/// itself never sends more than 4096.
pub const MAX_PLAINTEXT_BYTES: usize = 4300;
/// The largest AAD: the spec's "MUST be able to handle AAD values up to 8192 bytes".
pub const MAX_AAD_BYTES: usize = 8192;

/// Refuses a decoded field larger than `max` bytes (spec: Error codes,
/// UnsupportedOperationException — "a parameter value exceeded the maximum size that is
/// currently supported").
pub(crate) fn check_size(field: &'static str, bytes: &[u8], max: usize) -> Result<(), XksError> {
    if bytes.len() > max {
        return Err(XksError::new(
            super::ErrorName::UnsupportedOperation,
            format!("{field} exceeds {max} bytes"),
        ));
    }
    Ok(())
}

/// Decodes a required standard-Base64 field.
pub(crate) fn required_base64(
    value: Option<&Cow<'_, str>>,
    field: &'static str,
) -> Result<Vec<u8>, XksError> {
    match value {
        Some(v) => decode_base64(v, field),
        None => Err(XksError::validation(format!("{field} is required"))),
    }
}

/// Decodes an optional standard-Base64 field; absent means empty.
pub(crate) fn optional_base64(
    value: Option<&Cow<'_, str>>,
    field: &'static str,
) -> Result<Vec<u8>, XksError> {
    value.map_or(Ok(Vec::new()), |v| decode_base64(v, field))
}

fn decode_base64(value: &str, field: &'static str) -> Result<Vec<u8>, XksError> {
    STANDARD
        .decode(value)
        .map_err(|_| XksError::validation(format!("{field} is not valid Base64")))
}

/// Checks `encryptionAlgorithm` (spec: v1 supports exactly `AES_GCM`).
pub(crate) fn check_algorithm(value: Option<&Cow<'_, str>>) -> Result<(), XksError> {
    match value.map(|v| v.as_ref()) {
        Some("AES_GCM") => Ok(()),
        Some(_) => Err(XksError::validation("encryptionAlgorithm must be AES_GCM")),
        None => Err(XksError::validation("encryptionAlgorithm is required")),
    }
}

/// Standard Base64 encoding for responses.
pub(crate) fn base64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// A request body that carries only `requestMetadata` (GetKeyMetadata, GetHealthStatus).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct MetadataOnly<'a> {
    #[serde(borrow)]
    pub(crate) request_metadata: Option<RequestMetadata<'a>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xks::ErrorName;

    #[derive(Debug, Deserialize)]
    struct Known {
        #[allow(dead_code)]
        plaintext: Option<String>,
    }

    #[test]
    fn invalid_utf8_is_refused_even_in_ignored_fields() {
        let mut body = br#"{"plaintext": "AA==", "unknown": "x"#.to_vec();
        body.extend_from_slice(&[0xff, 0xfe]);
        body.extend_from_slice(br#""}"#);
        // serde_json alone skips the ignored field's bytes without checking them.
        assert!(serde_json::from_slice::<Known>(&body).is_ok());
        let error = parse_json::<Known>(&body).expect_err("not UTF-8");
        assert_eq!(error.name(), ErrorName::Validation);
        assert_eq!(error.message(), "request body is not UTF-8 (byte 35)");
        assert!(parse_json::<Known>(br#"{"plaintext": "AA==", "unknown": "\u00e9"}"#).is_ok());
    }

    #[test]
    fn a_repeated_field_is_named_and_its_values_are_not() {
        let error = parse_json::<Known>(br#"{"plaintext": "c2VjcmV0", "plaintext": "AA=="}"#)
            .expect_err("a field twice");
        assert_eq!(error.name(), ErrorName::Validation);
        assert_eq!(
            error.message(),
            "request body has the field plaintext more than once (line 1, column 37)"
        );
        // A wrong type still says so, without the value.
        let error = parse_json::<Known>(br#"{"plaintext": 12345}"#).expect_err("a number");
        assert!(error
            .message()
            .starts_with("request body has a field of the wrong type"));
        assert!(!error.message().contains("12345"));
    }

    #[test]
    fn sizes_up_to_the_maximum_pass() {
        assert!(check_size("plaintext", &[0; MAX_PLAINTEXT_BYTES], MAX_PLAINTEXT_BYTES).is_ok());
        let error = check_size(
            "plaintext",
            &[0; MAX_PLAINTEXT_BYTES + 1],
            MAX_PLAINTEXT_BYTES,
        )
        .expect_err("one byte over");
        assert_eq!(error.name(), ErrorName::UnsupportedOperation);
        assert_eq!(error.message(), "plaintext exceeds 4300 bytes");
    }

    #[test]
    fn optional_strings_are_borrowed_unless_escaped() {
        let body = br#"{"requestMetadata": {"kmsRequestId": "id-1", "kmsOperation": "Enc\u0072ypt",
            "awsPrincipalArn": null}}"#;
        let parsed: MetadataOnly<'_> = parse_json(body).expect("valid");
        let metadata = parsed.request_metadata.expect("present");
        assert!(matches!(
            metadata.kms_request_id,
            Some(Cow::Borrowed("id-1"))
        ));
        // An escape has to be decoded into a string of its own.
        assert!(matches!(metadata.kms_operation.as_deref(), Some("Encrypt")));
        assert!(matches!(metadata.kms_operation, Some(Cow::Owned(_))));
        // Null and missing are both absent, as with a plain `Option`.
        assert!(metadata.aws_principal_arn.is_none());
        assert!(metadata.kms_key_arn.is_none());
        // A value of the wrong type is still refused.
        let error = parse_json::<MetadataOnly<'_>>(br#"{"requestMetadata": {"kmsRequestId": 7}}"#)
            .expect_err("a number is not a string");
        assert_eq!(error.name(), ErrorName::Validation);
    }

    #[test]
    fn unknown_string_fields_are_kept_and_other_values_skipped() {
        let body = br#"{"requestMetadata": {"kmsRequestId": "id-1", "SourceIdentity": "alice",
            "n": 1, "nested": {"a": ["b", {"c": null}]}, "list": [1, "x"], "flag": true,
            "nothing": null, "escaped": "\u0061b"}}"#;
        let parsed: MetadataOnly<'_> = parse_json(body).expect("valid");
        let metadata = parsed.request_metadata.expect("present");
        assert_eq!(
            metadata.fields(),
            [
                ("kmsRequestId", "id-1"),
                ("SourceIdentity", "alice"),
                ("escaped", "ab")
            ]
        );
        // A known field keeps its type check and its duplicate check.
        let error =
            parse_json::<MetadataOnly<'_>>(br#"{"requestMetadata": {"awsPrincipalArn": ["x"]}}"#)
                .expect_err("an array is not a string");
        assert!(error
            .message()
            .starts_with("request body has a field of the wrong type"));
        let error = parse_json::<MetadataOnly<'_>>(
            br#"{"requestMetadata": {"kmsKeyArn": "a", "kmsKeyArn": "b"}}"#,
        )
        .expect_err("a field twice");
        assert!(error
            .message()
            .starts_with("request body has the field kmsKeyArn more than once"));
    }
}
