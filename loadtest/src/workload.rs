//! What to send: the operation mix, request bodies pre-rendered once with a slot for a
//! fresh `kmsRequestId`, and the pool of ciphertexts Decrypt requests use.
//!
//! A body is rendered at start-up with a 36-byte placeholder where the kmsRequestId
//! goes; per request it is copied once and a fresh UUID is written over the slot, so a
//! request costs one small copy rather than a JSON serialization.

use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use rand::RngExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use xks_proxy::xks::ApiOperation;

/// The four XKS APIs, in the order of [`Mix`]'s weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Op {
    /// Encrypt.
    Encrypt,
    /// Decrypt.
    Decrypt,
    /// GetKeyMetadata.
    Metadata,
    /// GetHealthStatus.
    Health,
}

impl Op {
    /// Every operation, in index order.
    pub const ALL: [Self; 4] = [Self::Encrypt, Self::Decrypt, Self::Metadata, Self::Health];

    /// Index into per-operation arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The proxy library's name for it.
    pub fn api(self) -> ApiOperation {
        match self {
            Self::Encrypt => ApiOperation::Encrypt,
            Self::Decrypt => ApiOperation::Decrypt,
            Self::Metadata => ApiOperation::GetKeyMetadata,
            Self::Health => ApiOperation::GetHealthStatus,
        }
    }

    /// The spec's API name (`Encrypt`, `GetKeyMetadata`, ...), used in reports.
    pub fn name(self) -> &'static str {
        self.api().as_str()
    }

    /// The last path segment.
    fn path_segment(self) -> &'static str {
        match self {
            Self::Encrypt => "encrypt",
            Self::Decrypt => "decrypt",
            Self::Metadata => "metadata",
            Self::Health => "health",
        }
    }

    /// The `kmsOperation` KMS would send (spec examples).
    fn kms_operation(self) -> &'static str {
        match self {
            Self::Encrypt => "GenerateDataKey",
            Self::Decrypt => "Decrypt",
            Self::Metadata => "DescribeKey",
            Self::Health => "KmsHealthCheck",
        }
    }
}

/// A weighted operation mix, e.g. `encrypt=8,decrypt=1,metadata=1,health=0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Mix {
    /// Weights in [`Op::ALL`] order.
    pub weights: [u32; 4],
}

impl Mix {
    /// Whether `op` is ever sent.
    pub fn uses(&self, op: Op) -> bool {
        self.weights[op.index()] > 0
    }

    /// Picks an operation with probability proportional to its weight.
    pub fn pick(&self, rng: &mut impl rand::Rng) -> Op {
        let total: u32 = self.weights.iter().sum();
        let mut r = rng.random_range(0..total);
        for op in Op::ALL {
            let w = self.weights[op.index()];
            if r < w {
                return op;
            }
            r -= w;
        }
        Op::Encrypt
    }
}

impl FromStr for Mix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut weights = [0u32; 4];
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected NAME=WEIGHT"))?;
            let op = match name.trim().to_ascii_lowercase().as_str() {
                "encrypt" => Op::Encrypt,
                "decrypt" => Op::Decrypt,
                "metadata" | "getkeymetadata" => Op::Metadata,
                "health" | "gethealthstatus" => Op::Health,
                other => {
                    return Err(format!(
                        "unknown operation {other:?} (encrypt, decrypt, metadata, health)"
                    ))
                }
            };
            weights[op.index()] = weight
                .trim()
                .parse()
                .map_err(|_| format!("{part:?}: the weight must be a whole number"))?;
        }
        if weights.iter().sum::<u32>() == 0 {
            return Err("the mix needs at least one operation with a weight above 0".into());
        }
        Ok(Self { weights })
    }
}

impl From<Mix> for String {
    fn from(mix: Mix) -> Self {
        mix.to_string()
    }
}

impl TryFrom<String> for Mix {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl std::fmt::Display for Mix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = ["encrypt", "decrypt", "metadata", "health"];
        let parts: Vec<String> = names
            .iter()
            .zip(self.weights)
            .map(|(n, w)| format!("{n}={w}"))
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// The kmsRequestId placeholder: as long as a hyphenated UUID.
const ID_SLOT: &str = "00000000-0000-0000-0000-000000000000";

/// A JSON body with a slot for a fresh kmsRequestId.
#[derive(Debug, Clone)]
pub struct Template {
    bytes: Vec<u8>,
    id_at: usize,
}

impl Template {
    fn new(body: &serde_json::Value) -> Self {
        let bytes = serde_json::to_vec(body).expect("a JSON value serializes");
        let id_at = bytes
            .windows(ID_SLOT.len())
            .position(|w| w == ID_SLOT.as_bytes())
            .expect("the body holds the kmsRequestId slot");
        Self { bytes, id_at }
    }

    /// A copy of the body with a fresh random UUID as its kmsRequestId.
    pub fn render(&self, rng: &mut impl rand::Rng) -> Bytes {
        let mut body = self.bytes.clone();
        let id = uuid::Builder::from_random_bytes(rng.random()).into_uuid();
        id.hyphenated()
            .encode_lower(&mut body[self.id_at..self.id_at + ID_SLOT.len()]);
        Bytes::from(body)
    }

    /// The body as rendered at start-up (placeholder id).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Settings of the request bodies.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct BodySettings {
    /// Plaintext bytes per Encrypt.
    pub plaintext_bytes: usize,
    /// AAD bytes per Encrypt and Decrypt (0: none).
    pub aad_bytes: usize,
    /// Ask for a CDIV on every Encrypt.
    pub cdiv: bool,
}

fn request_metadata(op: Op, region: &str) -> serde_json::Value {
    if op == Op::Health {
        return json!({"kmsOperation": op.kms_operation(), "kmsRequestId": ID_SLOT});
    }
    json!({
        "awsPrincipalArn": "arn:aws:iam::123456789012:user/Alice",
        "kmsKeyArn": format!(
            "arn:aws:kms:{region}:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
        ),
        "kmsOperation": op.kms_operation(),
        "kmsRequestId": ID_SLOT,
    })
}

/// The path of `op` on `key` under `api_root`.
pub fn path(api_root: &str, op: Op, key: &str) -> String {
    match op {
        Op::Health => format!("{api_root}/health"),
        _ => format!("{api_root}/keys/{key}/{}", op.path_segment()),
    }
}

/// An Encrypt body for `plaintext`.
pub fn encrypt_body(region: &str, plaintext: &[u8], aad: &[u8], cdiv: bool) -> Template {
    let mut body = json!({
        "requestMetadata": request_metadata(Op::Encrypt, region),
        "plaintext": STANDARD.encode(plaintext),
        "encryptionAlgorithm": "AES_GCM",
    });
    if !aad.is_empty() {
        body["additionalAuthenticatedData"] = json!(STANDARD.encode(aad));
    }
    if cdiv {
        body["ciphertextDataIntegrityValueAlgorithm"] = json!("SHA_256");
    }
    Template::new(&body)
}

/// A Decrypt body for an Encrypt answer.
pub fn decrypt_body(region: &str, sealed: &Sealed, aad: &[u8]) -> Template {
    let mut body = json!({
        "requestMetadata": request_metadata(Op::Decrypt, region),
        "ciphertext": sealed.ciphertext,
        "initializationVector": sealed.initialization_vector,
        "authenticationTag": sealed.authentication_tag,
        "encryptionAlgorithm": "AES_GCM",
    });
    if !aad.is_empty() {
        body["additionalAuthenticatedData"] = json!(STANDARD.encode(aad));
    }
    if let Some(metadata) = &sealed.ciphertext_metadata {
        body["ciphertextMetadata"] = json!(metadata);
    }
    Template::new(&body)
}

/// A GetKeyMetadata or GetHealthStatus body.
pub fn metadata_only_body(op: Op, region: &str) -> Template {
    Template::new(&json!({ "requestMetadata": request_metadata(op, region) }))
}

/// An Encrypt answer (spec: Encrypt, response payload), Base64 fields as received.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sealed {
    /// Base64 ciphertext.
    pub ciphertext: String,
    /// Base64 IV.
    pub initialization_vector: String,
    /// Base64 tag.
    pub authentication_tag: String,
    /// Base64 ciphertext metadata, if the proxy wrote any.
    #[serde(default)]
    pub ciphertext_metadata: Option<String>,
    /// Base64 CDIV, if asked for.
    #[serde(default)]
    pub ciphertext_data_integrity_value: Option<String>,
}

/// Why a CDIV did not check out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CdivError {
    /// Asked for, not returned.
    #[error("the response has no ciphertextDataIntegrityValue")]
    Missing,
    /// A field is not Base64.
    #[error("a response field is not valid Base64")]
    NotBase64,
    /// The value differs from SHA-256(aad || metadata || iv || ciphertext || tag).
    #[error("ciphertextDataIntegrityValue does not match the ciphertext")]
    Mismatch,
}

impl Sealed {
    /// Checks the CDIV the proxy returned against the spec's definition (Appendix C),
    /// computed with the proxy library's own encoder.
    pub fn check_cdiv(&self, aad: &[u8]) -> Result<(), CdivError> {
        let value = self
            .ciphertext_data_integrity_value
            .as_deref()
            .ok_or(CdivError::Missing)?;
        let decode = |v: &str| STANDARD.decode(v).map_err(|_| CdivError::NotBase64);
        let metadata = match &self.ciphertext_metadata {
            Some(m) => decode(m)?,
            None => Vec::new(),
        };
        let expected = xks_proxy::xks::aad::cdiv(
            aad,
            &metadata,
            &decode(&self.initialization_vector)?,
            &decode(&self.ciphertext)?,
            &decode(&self.authentication_tag)?,
        );
        if decode(value)? == expected {
            Ok(())
        } else {
            Err(CdivError::Mismatch)
        }
    }
}

/// A Decrypt answer.
#[derive(Debug, Deserialize)]
pub struct DecryptReply<'a> {
    /// Base64 plaintext.
    #[serde(borrow)]
    pub plaintext: std::borrow::Cow<'a, str>,
}

/// An error answer (spec: Error codes); only the name is read.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorReply<'a> {
    /// The spec's errorName.
    #[serde(borrow, default)]
    pub error_name: Option<std::borrow::Cow<'a, str>>,
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn mixes_parse_and_pick_by_weight() {
        let mix: Mix = "encrypt=8, decrypt=1,metadata=1,health=0".parse().unwrap();
        assert_eq!(mix.weights, [8, 1, 1, 0]);
        assert_eq!(mix.to_string(), "encrypt=8,decrypt=1,metadata=1,health=0");
        assert!("encrypt=0".parse::<Mix>().is_err());
        assert!("sign=1".parse::<Mix>().is_err());
        assert!("encrypt".parse::<Mix>().is_err());
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let mut counts = [0u32; 4];
        for _ in 0..10_000 {
            counts[mix.pick(&mut rng).index()] += 1;
        }
        assert_eq!(counts[Op::Health.index()], 0);
        assert!(
            counts[0] > 7_000 && counts[1] > 500 && counts[2] > 500,
            "{counts:?}"
        );
    }

    #[test]
    fn each_render_has_a_fresh_request_id() {
        let template = encrypt_body("us-east-1", b"hello", b"aad", true);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        let a: serde_json::Value = serde_json::from_slice(&template.render(&mut rng)).unwrap();
        let b: serde_json::Value = serde_json::from_slice(&template.render(&mut rng)).unwrap();
        let id = |v: &serde_json::Value| v["requestMetadata"]["kmsRequestId"].clone();
        assert_ne!(id(&a), id(&b));
        assert_eq!(id(&a).as_str().unwrap().len(), 36);
        assert_eq!(a["plaintext"], "aGVsbG8=");
        assert_eq!(a["ciphertextDataIntegrityValueAlgorithm"], "SHA_256");
        assert_eq!(a["requestMetadata"]["kmsOperation"], "GenerateDataKey");
    }

    #[test]
    fn cdiv_checks_use_the_spec_definition() {
        // spec Appendix C's worked example.
        let sealed = Sealed {
            ciphertext: "ghxkK1txeDNn3q8Y".into(),
            initialization_vector: "HMrlRw85cAJUd5Ax".into(),
            authentication_tag: "vBxN2ncH1oEkR8WVXpmyYQ==".into(),
            ciphertext_metadata: Some("a2V5X3ZlcnNpb249MQ==".into()),
            ciphertext_data_integrity_value: Some(
                "qHA/ImC9h5HsLRXqCyPmWgYx7tzyoTplzILbP0fPXsc=".into(),
            ),
        };
        let aad = b"project=nile,department=marketing";
        assert_eq!(sealed.check_cdiv(aad), Ok(()));
        assert_eq!(sealed.check_cdiv(b"other"), Err(CdivError::Mismatch));
        let mut missing = sealed;
        missing.ciphertext_data_integrity_value = None;
        assert_eq!(missing.check_cdiv(aad), Err(CdivError::Missing));
    }

    #[test]
    fn paths() {
        assert_eq!(
            path("/p/kms/xks/v1", Op::Encrypt, "foo"),
            "/p/kms/xks/v1/keys/foo/encrypt"
        );
        assert_eq!(path("/kms/xks/v1", Op::Health, "foo"), "/kms/xks/v1/health");
    }
}
