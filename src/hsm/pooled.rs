//! The operations of an EKM that runs on the session [`Pool`], written once.
//!
//! A pooled EKM (PKCS#11, the simulated HSM) says what one session does for each
//! operation ([`SessionOps`]); the pool's async facade below moves the arguments onto
//! a session thread under the request's deadline, with the [`Call`] that labels it.

use std::time::Instant;

use super::pool::{Call, Pool};
use super::{HsmError, KeyMetadata, Plaintext, Sealed};

/// What one session does for each operation, on its own thread.
pub(crate) trait SessionOps: Send + 'static {
    /// AES-GCM encryption of `plaintext` with `aad` under the key.
    fn encrypt(&mut self, key_id: &str, plaintext: &[u8], aad: &[u8]) -> Result<Sealed, HsmError>;
    /// AES-GCM decryption and authentication.
    fn decrypt(&mut self, key_id: &str, sealed: &Sealed, aad: &[u8])
        -> Result<Plaintext, HsmError>;
    /// The key's attributes, read fresh.
    fn key_metadata(&mut self, key_id: &str) -> Result<KeyMetadata, HsmError>;
    /// A deep check with `key_id` (see [`super::health_round_trip`]), or without a key a
    /// round trip that shows the EKM answers.
    fn health_check(&mut self, key_id: Option<&str>) -> Result<(), HsmError>;
}

impl<S: SessionOps> Pool<S> {
    /// Encrypts on a session before `deadline`.
    pub(crate) async fn encrypt(
        &self,
        key_id: &str,
        plaintext: Plaintext,
        aad: Vec<u8>,
        deadline: Instant,
    ) -> Result<Sealed, HsmError> {
        let key_id = key_id.to_owned();
        self.run(Call::Encrypt, deadline, move |s| {
            s.encrypt(&key_id, &plaintext, &aad)
        })
        .await
    }

    /// Decrypts on a session before `deadline`.
    pub(crate) async fn decrypt(
        &self,
        key_id: &str,
        sealed: Sealed,
        aad: Vec<u8>,
        deadline: Instant,
    ) -> Result<Plaintext, HsmError> {
        let key_id = key_id.to_owned();
        self.run(Call::Decrypt, deadline, move |s| {
            s.decrypt(&key_id, &sealed, &aad)
        })
        .await
    }

    /// Reads the key's metadata on a session before `deadline`.
    pub(crate) async fn key_metadata(
        &self,
        key_id: &str,
        deadline: Instant,
    ) -> Result<KeyMetadata, HsmError> {
        let key_id = key_id.to_owned();
        self.run(Call::GetKeyMetadata, deadline, move |s| {
            s.key_metadata(&key_id)
        })
        .await
    }

    /// Runs a health check on a session before `deadline`.
    pub(crate) async fn health_check(
        &self,
        key_id: Option<&str>,
        deadline: Instant,
    ) -> Result<(), HsmError> {
        let key_id = key_id.map(str::to_owned);
        self.run(Call::HealthCheck, deadline, move |s| {
            s.health_check(key_id.as_deref())
        })
        .await
    }
}
