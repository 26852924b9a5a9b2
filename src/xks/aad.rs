//! The two byte encodings the spec defines over request fields.
//!
//! - [`hsm_aad`]: the AAD handed to the HSM (spec: Encrypt, ciphertextMetadata):
//!   `u16be(len(aad)) || aad || u8(len(metadata)) || metadata`. The lengths make the
//!   encoding injective, so metadata can never be passed off as AAD or the reverse.
//! - [`cdiv`]: the Ciphertext Data Integrity Value (spec: Appendix C):
//!   `SHA-256(aad || metadata || iv || ciphertext || tag)`, without lengths.
//! - [`aws_sample_aad`]: the HSM AAD of the AWS sample proxy
//!   (aws-samples/aws-kms-xks-proxy), which differs from the spec's formula; only for
//!   decrypting what that proxy encrypted.

use aws_lc_rs::digest;

use super::error::XksError;

/// Largest AAD the 2-byte length prefix can describe.
pub const MAX_AAD_LEN: usize = u16::MAX as usize;
/// The spec's limit on `ciphertextMetadata`.
pub const MAX_METADATA_LEN: usize = 20;

/// Builds the HSM AAD from the request's raw AAD and the ciphertext metadata.
pub fn hsm_aad(aad: &[u8], metadata: &[u8]) -> Result<Vec<u8>, XksError> {
    let aad_len = u16::try_from(aad.len()).map_err(|_| {
        XksError::unsupported("additionalAuthenticatedData longer than 65535 bytes")
    })?;
    if metadata.len() > MAX_METADATA_LEN {
        return Err(XksError::validation(
            "ciphertextMetadata must not exceed 20 bytes",
        ));
    }
    let mut out = Vec::with_capacity(2 + aad.len() + 1 + metadata.len());
    out.extend_from_slice(&aad_len.to_be_bytes());
    out.extend_from_slice(aad);
    out.push(metadata.len() as u8);
    out.extend_from_slice(metadata);
    Ok(out)
}

/// The HSM AAD the AWS sample proxy builds: `u16be(len(aad))`, then `SHA-256(aad)` when
/// the request carried an `additionalAuthenticatedData` field (`aad` is `Some`, even
/// if empty), then `u8(len(metadata)) || metadata`. Its length prefix counts the AAD
/// while the digest replaces it, so this is not the spec's encoding of anything.
pub fn aws_sample_aad(aad: Option<&[u8]>, metadata: &[u8]) -> Result<Vec<u8>, XksError> {
    let aad_len = u16::try_from(aad.map_or(0, <[u8]>::len)).map_err(|_| {
        XksError::unsupported("additionalAuthenticatedData longer than 65535 bytes")
    })?;
    let metadata_len = u8::try_from(metadata.len())
        .ok()
        .filter(|&n| usize::from(n) <= MAX_METADATA_LEN)
        .ok_or_else(|| XksError::validation("ciphertextMetadata must not exceed 20 bytes"))?;
    let mut out = Vec::with_capacity(2 + 32 + 1 + metadata.len());
    out.extend_from_slice(&aad_len.to_be_bytes());
    if let Some(aad) = aad {
        out.extend_from_slice(digest::digest(&digest::SHA256, aad).as_ref());
    }
    out.push(metadata_len);
    out.extend_from_slice(metadata);
    Ok(out)
}

/// First byte of the ciphertextMetadata this proxy writes for a rotated key: format 1
/// is this byte followed by the key version as a big-endian u32 (5 bytes; the spec
/// allows 20). Not printable, so it cannot be mistaken for the AWS sample's configured
/// text metadata.
pub const VERSION_FORMAT: u8 = 0x01;

/// The ciphertextMetadata naming key `version`: empty for version 1 (what every
/// ciphertext made before rotation carries), `VERSION_FORMAT ‖ u32be(version)` after.
pub fn version_metadata(version: u32) -> Vec<u8> {
    if version <= 1 {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(5);
    out.push(VERSION_FORMAT);
    out.extend_from_slice(&version.to_be_bytes());
    out
}

/// The key version a ciphertextMetadata names: 1 when empty, N for our format, `None`
/// for anything else (metadata this proxy never wrote).
pub fn parse_version_metadata(metadata: &[u8]) -> Option<u32> {
    match metadata {
        [] => Some(1),
        [VERSION_FORMAT, version @ ..] => {
            let version = u32::from_be_bytes(version.try_into().ok()?);
            (version >= 2).then_some(version)
        }
        _ => None,
    }
}

/// Computes the CDIV over the decoded fields, in the spec's order.
pub fn cdiv(aad: &[u8], metadata: &[u8], iv: &[u8], ciphertext: &[u8], tag: &[u8]) -> [u8; 32] {
    let mut context = digest::Context::new(&digest::SHA256);
    for part in [aad, metadata, iv, ciphertext, tag] {
        context.update(part);
    }
    context
        .finish()
        .as_ref()
        .try_into()
        .expect("SHA-256 digests are 32 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use proptest::prelude::*;

    #[test]
    fn version_metadata_round_trips_and_rejects_what_we_never_wrote() {
        assert_eq!(version_metadata(1), b"");
        assert_eq!(version_metadata(2), [1, 0, 0, 0, 2]);
        for version in [1, 2, 3, 70_000, u32::MAX] {
            assert_eq!(
                parse_version_metadata(&version_metadata(version)),
                Some(version)
            );
        }
        for other in [
            &b"v0.0.1"[..],
            &[1, 0, 0, 0, 1],
            &[1, 0, 0, 2],
            &[1, 0, 0, 0, 0, 2],
            &[2, 0, 0, 0, 2],
        ] {
            assert_eq!(parse_version_metadata(other), None, "{other:?}");
        }
    }

    #[test]
    fn aws_sample_aad_layout() {
        let with = aws_sample_aad(Some(b"abc"), b"v0.0.1").unwrap();
        assert_eq!(&with[..2], &[0, 3]);
        assert_eq!(
            &with[2..34],
            digest::digest(&digest::SHA256, b"abc").as_ref()
        );
        assert_eq!(&with[34..], b"\x06v0.0.1");
        // An empty but present AAD is still digested; an absent one is not.
        assert_eq!(aws_sample_aad(Some(b""), b"").unwrap().len(), 2 + 32 + 1);
        assert_eq!(aws_sample_aad(None, b"").unwrap(), [0, 0, 0]);
    }

    /// The worked example of the spec's Appendix C.
    #[test]
    fn cdiv_matches_the_spec_example() {
        let aad = STANDARD
            .decode("cHJvamVjdD1uaWxlLGRlcGFydG1lbnQ9bWFya2V0aW5n")
            .unwrap();
        let metadata = STANDARD.decode("a2V5X3ZlcnNpb249MQ==").unwrap();
        let iv = STANDARD.decode("HMrlRw85cAJUd5Ax").unwrap();
        let ciphertext = STANDARD.decode("ghxkK1txeDNn3q8Y").unwrap();
        let tag = STANDARD.decode("vBxN2ncH1oEkR8WVXpmyYQ==").unwrap();
        let value = cdiv(&aad, &metadata, &iv, &ciphertext, &tag);
        assert_eq!(
            hex::encode(value),
            "a8703f2260bd8791ec2d15ea0b23e65a0631eedcf2a13a65cc82db3f47cf5ec7"
        );
        assert_eq!(
            STANDARD.encode(value),
            "qHA/ImC9h5HsLRXqCyPmWgYx7tzyoTplzILbP0fPXsc="
        );
    }

    #[test]
    fn hsm_aad_layout() {
        assert_eq!(hsm_aad(b"", b"").unwrap(), vec![0, 0, 0]);
        assert_eq!(
            hsm_aad(b"ab", b"m").unwrap(),
            vec![0, 2, b'a', b'b', 1, b'm']
        );
        let long = vec![7u8; 300];
        let out = hsm_aad(&long, b"").unwrap();
        assert_eq!(&out[..2], &[1, 44]);
        assert_eq!(out.len(), 2 + 300 + 1);
    }

    #[test]
    fn hsm_aad_limits() {
        assert!(hsm_aad(&vec![0; MAX_AAD_LEN], b"").is_ok());
        assert_eq!(
            hsm_aad(&vec![0; MAX_AAD_LEN + 1], b"")
                .unwrap_err()
                .status(),
            501
        );
        assert_eq!(hsm_aad(b"", &[0; 21]).unwrap_err().status(), 400);
    }

    /// Splits an HSM AAD back into its parts; `None` if it is not a valid encoding.
    fn parse(encoded: &[u8]) -> Option<(&[u8], &[u8])> {
        let aad_len = usize::from(u16::from_be_bytes([*encoded.first()?, *encoded.get(1)?]));
        let aad = encoded.get(2..2 + aad_len)?;
        let meta_len = usize::from(*encoded.get(2 + aad_len)?);
        let meta = encoded.get(3 + aad_len..)?;
        (meta.len() == meta_len).then_some((aad, meta))
    }

    proptest! {
        /// The encoding is injective: parsing it gives back exactly the inputs, so two
        /// different (aad, metadata) pairs can never produce the same HSM AAD.
        #[test]
        fn hsm_aad_round_trips(aad in proptest::collection::vec(any::<u8>(), 0..600),
                               meta in proptest::collection::vec(any::<u8>(), 0..=20)) {
            let encoded = hsm_aad(&aad, &meta).unwrap();
            prop_assert_eq!(parse(&encoded), Some((aad.as_slice(), meta.as_slice())));
        }

        #[test]
        fn moving_bytes_between_aad_and_metadata_changes_the_encoding(
            aad in proptest::collection::vec(any::<u8>(), 1..40),
            meta in proptest::collection::vec(any::<u8>(), 0..19)) {
            let mut moved_meta = vec![*aad.last().unwrap()];
            moved_meta.extend_from_slice(&meta);
            let a = hsm_aad(&aad, &meta).unwrap();
            let b = hsm_aad(&aad[..aad.len() - 1], &moved_meta).unwrap();
            prop_assert_ne!(a, b);
        }
    }
}
