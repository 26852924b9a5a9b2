//! A software "HSM": AES-256-GCM with aws-lc-rs, keys in process memory.
//!
//! It exists so benchmarks can measure the proxy without an HSM's cost, and so tests of
//! the HTTP layer can run without a token. It is not for production: key material lives
//! in ordinary memory and, unless given in the configuration, is random per process.

use foldhash::{HashMap, HashMapExt};
use std::fmt;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use zeroize::Zeroizing;

use super::{
    EkmInfo, HsmError, KeyMetadata, KeySpec, KeyUsage, Operation, Plaintext, Sealed, IV_LEN,
    TAG_LEN,
};

/// One in-memory key.
struct SoftwareKey {
    key: LessSafeKey,
    metadata: KeyMetadata,
}

/// Keys by external key id.
pub struct SoftwareBackend {
    keys: HashMap<String, SoftwareKey>,
    info: EkmInfo,
}

impl fmt::Debug for SoftwareBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SoftwareBackend")
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// How to make one software key.
#[derive(Debug, Clone, PartialEq)]
pub struct SoftwareKeySpec {
    /// External key id.
    pub id: String,
    /// 32 bytes of key material; random when `None`.
    pub material: Option<Zeroizing<Vec<u8>>>,
    /// Allowed usages.
    pub usages: Vec<KeyUsage>,
    /// Enabled or not.
    pub enabled: bool,
}

impl SoftwareBackend {
    /// Builds the keys.
    pub fn new(specs: Vec<SoftwareKeySpec>) -> Result<Self, HsmError> {
        let mut keys = HashMap::with_capacity(specs.len());
        for spec in specs {
            let material = match spec.material {
                Some(m) => m,
                None => {
                    let mut m = Zeroizing::new(vec![0u8; 32]);
                    aws_lc_rs::rand::fill(&mut m)
                        .map_err(|_| HsmError::Unavailable("random generator failed".into()))?;
                    m
                }
            };
            let unbound = UnboundKey::new(&AES_256_GCM, &material)
                .map_err(|_| HsmError::Inconsistent("software key must be 32 bytes"))?;
            keys.insert(
                spec.id,
                SoftwareKey {
                    key: LessSafeKey::new(unbound),
                    metadata: KeyMetadata {
                        key_spec: KeySpec::Aes(256),
                        usages: spec.usages,
                        enabled: spec.enabled,
                    },
                },
            );
        }
        Ok(Self {
            keys,
            info: EkmInfo {
                id: "software-1".into(),
                model: format!("xks-proxy software backend {}", env!("CARGO_PKG_VERSION")),
                vendor: "xks-proxy (software, not an HSM)".into(),
            },
        })
    }

    fn key(&self, key_id: &str, operation: Operation) -> Result<&LessSafeKey, HsmError> {
        let key = self.keys.get(key_id).ok_or(HsmError::KeyNotFound)?;
        key.metadata.check(operation)?;
        Ok(&key.key)
    }

    /// AES-GCM encryption with a random 12-byte IV.
    pub fn encrypt(&self, key_id: &str, plaintext: &[u8], aad: &[u8]) -> Result<Sealed, HsmError> {
        let key = self.key(key_id, Operation::Encrypt)?;
        let mut iv = [0u8; IV_LEN];
        aws_lc_rs::rand::fill(&mut iv)
            .map_err(|_| HsmError::Unavailable("random generator failed".into()))?;
        let mut ciphertext = plaintext.to_vec();
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(iv),
                Aad::from(aad),
                &mut ciphertext,
            )
            .map_err(|_| HsmError::Inconsistent("AES-GCM seal failed"))?;
        let tag: [u8; TAG_LEN] = tag
            .as_ref()
            .try_into()
            .map_err(|_| HsmError::Inconsistent("tag is not 16 bytes"))?;
        Ok(Sealed {
            iv: iv.to_vec(),
            ciphertext,
            tag,
        })
    }

    /// AES-GCM decryption; any authentication failure is [`HsmError::InvalidCiphertext`].
    pub fn decrypt(
        &self,
        key_id: &str,
        sealed: &Sealed,
        aad: &[u8],
    ) -> Result<Plaintext, HsmError> {
        let key = self.key(key_id, Operation::Decrypt)?;
        // aws-lc-rs only takes 96-bit nonces; a 16-byte IV cannot be ours.
        let nonce = Nonce::try_assume_unique_for_key(&sealed.iv)
            .map_err(|_| HsmError::InvalidCiphertext)?;
        let mut buffer = Zeroizing::new(Vec::with_capacity(sealed.ciphertext.len() + TAG_LEN));
        buffer.extend_from_slice(&sealed.ciphertext);
        buffer.extend_from_slice(&sealed.tag);
        let plaintext_len = key
            .open_in_place(nonce, Aad::from(aad), &mut buffer)
            .map_err(|_| HsmError::InvalidCiphertext)?
            .len();
        buffer.truncate(plaintext_len);
        Ok(buffer)
    }

    /// The key's metadata.
    pub fn key_metadata(&self, key_id: &str) -> Result<KeyMetadata, HsmError> {
        self.keys
            .get(key_id)
            .map(|k| k.metadata.clone())
            .ok_or(HsmError::KeyNotFound)
    }

    /// Facts for GetHealthStatus.
    pub fn ekm_info(&self) -> &EkmInfo {
        &self.info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend() -> SoftwareBackend {
        let spec = |id: &str, usages: Vec<KeyUsage>, enabled| SoftwareKeySpec {
            id: id.into(),
            material: None,
            usages,
            enabled,
        };
        SoftwareBackend::new(vec![
            spec("both", vec![KeyUsage::Encrypt, KeyUsage::Decrypt], true),
            spec("enc", vec![KeyUsage::Encrypt], true),
            spec("off", vec![KeyUsage::Encrypt, KeyUsage::Decrypt], false),
        ])
        .unwrap()
    }

    #[test]
    fn round_trip_and_tamper() {
        let b = backend();
        let sealed = b.encrypt("both", b"hello", b"aad").unwrap();
        assert_eq!(sealed.iv.len(), 12);
        assert_eq!(sealed.ciphertext.len(), 5);
        assert_eq!(
            b.decrypt("both", &sealed, b"aad").unwrap().as_slice(),
            b"hello"
        );
        assert_eq!(
            b.decrypt("both", &sealed, b"aae"),
            Err(HsmError::InvalidCiphertext)
        );
        let mut bad = sealed.clone();
        bad.tag[0] ^= 1;
        assert_eq!(
            b.decrypt("both", &bad, b"aad"),
            Err(HsmError::InvalidCiphertext)
        );
        let mut long_iv = sealed;
        long_iv.iv = vec![0; 16];
        assert_eq!(
            b.decrypt("both", &long_iv, b"aad"),
            Err(HsmError::InvalidCiphertext)
        );
    }

    #[test]
    fn usage_and_state_are_enforced() {
        let b = backend();
        let sealed = b.encrypt("enc", b"x", b"").unwrap();
        assert_eq!(
            b.decrypt("enc", &sealed, b""),
            Err(HsmError::UsageNotPermitted(Operation::Decrypt))
        );
        assert_eq!(
            b.encrypt("off", b"x", b"").unwrap_err(),
            HsmError::KeyDisabled
        );
        assert_eq!(
            b.encrypt("none", b"x", b"").unwrap_err(),
            HsmError::KeyNotFound
        );
    }
}
