//! AES-GCM on a session: IVs drawn from the HSM in batches, the encrypt and decrypt
//! calls, and separating what an HSM returns into IV, ciphertext and tag.

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use zeroize::Zeroizing;

use super::{errors::*, settings::*, worker::*};
use crate::hsm::faults::{FaultInjector, VendorIv};
use crate::hsm::{HsmError, Operation, Plaintext, Sealed, IV_LEN, TAG_LEN};

/// IVs per C_GenerateRandom with [`IvSource::HsmRandom`]. In SoftHSM2 the call, not the
/// bytes, is the cost: 9.7k instructions for 768 bytes against 8.1k for 12, and those
/// 8.1k were a tenth of what it spent per Encrypt (perf/steps.md, "The references, refined; IVs from the HSM in batches; what did not help").
pub const IV_BATCH: usize = 64;

/// IVs drawn from the HSM's RNG in batches, each handed out once. A session's own:
/// no locking, and nothing shared between sessions.
pub(super) struct IvBatch {
    pub(super) bytes: Vec<u8>,
    /// Bytes handed out so far; `bytes.len()` when empty.
    pub(super) taken: usize,
}

impl IvBatch {
    pub(super) fn new() -> Self {
        Self {
            bytes: vec![0; IV_LEN * IV_BATCH],
            taken: IV_LEN * IV_BATCH,
        }
    }

    /// The next IV, or `None` when the batch is used up. Its bytes are zeroed in the
    /// batch as they leave, so an IV can never be handed out twice.
    pub(super) fn take(&mut self) -> Option<Result<[u8; IV_LEN], HsmError>> {
        let slot = self.bytes.get_mut(self.taken..self.taken + IV_LEN)?;
        let mut iv = [0u8; IV_LEN];
        iv.copy_from_slice(slot);
        slot.fill(0);
        self.taken += IV_LEN;
        if iv.iter().all(|b| *b == 0) {
            // 96 zero bits from an RNG: it is broken (or this code is).
            return Some(Err(HsmError::Inconsistent(
                "the HSM's RNG returned an all-zero IV",
            )));
        }
        Some(Ok(iv))
    }

    /// The buffer to refill, marked full again by [`IvBatch::filled`].
    pub(super) fn take_buffer(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.bytes)
    }

    pub(super) fn filled(&mut self, bytes: Vec<u8>) {
        self.bytes = bytes;
        self.taken = 0;
    }

    pub(super) fn put_back_unfilled(&mut self, bytes: Vec<u8>) {
        self.taken = bytes.len();
        self.bytes = bytes;
    }
}

impl Worker {
    /// The next IV from the HSM's RNG, drawing a new batch when this one is used up.
    pub(super) fn hsm_random_iv(&mut self) -> Result<[u8; IV_LEN], HsmError> {
        if let Some(iv) = self.ivs.take() {
            return iv;
        }
        let mut bytes = self.ivs.take_buffer();
        match self.call(
            |s| s.generate_random_slice(&mut bytes),
            Function::GenerateRandom,
        ) {
            Ok(()) => self.ivs.filled(bytes),
            Err(e) => {
                self.ivs.put_back_unfilled(bytes);
                return Err(e);
            }
        }
        self.ivs.take().unwrap_or(Err(HsmError::Inconsistent(
            "an IV batch was empty when filled",
        )))
    }

    /// Runs a cryptographic call on a key, recovering once from a stale handle, a lost
    /// session or a lost module. `map` turns call errors into client-meaningful
    /// [`HsmError`]s.
    pub(super) fn with_key<T>(
        &mut self,
        key_id: &str,
        operation: Operation,
        function: Function,
        mut f: impl FnMut(&Session, ObjectHandle) -> Result<T, CkError>,
        map: impl Fn(CkError) -> HsmError,
    ) -> Result<T, HsmError> {
        let mut retried = false;
        loop {
            let key = self.key(key_id)?;
            key.metadata.check(operation)?;
            if key.generation != self.shared.module.generation() {
                retried = true;
                continue;
            }
            match self.attempt(function, &mut |s| f(s, key.handle)) {
                Ok(value) => return Ok(value),
                Err(Failure::Hsm(e)) => return Err(e),
                Err(Failure::Call(e, generation)) => {
                    if retried || !self.recover(&e, generation, Some(key_id))? {
                        return Err(map(e));
                    }
                }
            }
            retried = true;
        }
    }

    pub(super) fn seal(
        &mut self,
        key_id: &str,
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<Sealed, HsmError> {
        let iv_source = self.shared.iv_source;
        let iv: Vec<u8> = match iv_source {
            IvSource::HsmRandom => self.hsm_random_iv()?.to_vec(),
            IvSource::ProxyRandom => {
                let mut iv = vec![0u8; IV_LEN];
                aws_lc_rs::rand::fill(&mut iv)
                    .map_err(|_| HsmError::Inconsistent("the proxy's DRBG failed"))?;
                iv
            }
            IvSource::HsmGenerated => vec![0u8; IV_LEN],
            IvSource::HsmAppended => Vec::new(),
        };
        let faults = self.shared.faults.clone();
        let (output, iv) = self.with_key(
            key_id,
            Operation::Encrypt,
            Function::Encrypt,
            |session, handle| {
                // Every attempt starts from the IV we chose (or the empty buffer).
                let mut iv = iv.clone();
                let output =
                    gcm_encrypt(session, handle, &mut iv, aad, plaintext, faults.as_deref())?;
                Ok((output, iv))
            },
            |e| map_crypto_error(e, Operation::Encrypt),
        )?;
        split_gcm_output(iv_source, plaintext.len(), output, iv)
    }

    pub(super) fn open(
        &mut self,
        key_id: &str,
        sealed: &Sealed,
        aad: &[u8],
    ) -> Result<Plaintext, HsmError> {
        let mut input = Vec::with_capacity(sealed.ciphertext.len() + TAG_LEN);
        input.extend_from_slice(&sealed.ciphertext);
        input.extend_from_slice(&sealed.tag);
        let plaintext = self.with_key(
            key_id,
            Operation::Decrypt,
            Function::Decrypt,
            |session, handle| {
                let mut iv = sealed.iv.clone();
                let params = GcmParams::new(&mut iv, aad, (TAG_LEN as u64 * 8).into())?;
                match session.decrypt(&Mechanism::AesGcm(params), handle, &input) {
                    // SoftHSM2 reports a GCM tag mismatch as CKR_GENERAL_ERROR. If the
                    // session still answers, the HSM is fine and the input was at fault.
                    // Only C_Decrypt's: kryoptic's C_DecryptInit says the same of a
                    // stale key handle (errors::classify).
                    Err(CkError::Pkcs11(
                        RvError::GeneralError | RvError::FunctionFailed,
                        f @ Function::Decrypt,
                    )) if session.get_session_info().is_ok() => {
                        Err(CkError::Pkcs11(RvError::EncryptedDataInvalid, f))
                    }
                    other => other.map(Zeroizing::new),
                }
            },
            |e| map_crypto_error(e, Operation::Decrypt),
        )?;
        if plaintext.len() != sealed.ciphertext.len() {
            return Err(HsmError::Inconsistent(
                "AES-GCM plaintext has the wrong length",
            ));
        }
        Ok(plaintext)
    }
}

/// Separates what C_Encrypt returned into IV, ciphertext and tag, as the spec wants
/// them, for each way an HSM may hand back the IV. `iv` is the IV buffer after the call.
pub(crate) fn split_gcm_output(
    iv_source: IvSource,
    plaintext_len: usize,
    mut output: Vec<u8>,
    iv: Vec<u8>,
) -> Result<Sealed, HsmError> {
    let (iv, expected) = match iv_source {
        IvSource::HsmRandom | IvSource::ProxyRandom | IvSource::HsmGenerated => {
            (iv, plaintext_len + TAG_LEN)
        }
        IvSource::HsmAppended => {
            let expected = plaintext_len + TAG_LEN + APPENDED_IV_LEN;
            if output.len() != expected {
                return Err(HsmError::Inconsistent(
                    "AES-GCM output is not ciphertext, tag and a 16-byte IV",
                ));
            }
            let iv = output.split_off(plaintext_len + TAG_LEN);
            (iv, plaintext_len + TAG_LEN)
        }
    };
    if iv.len() != IV_LEN && iv.len() != APPENDED_IV_LEN {
        return Err(HsmError::Inconsistent("GCM IV is neither 12 nor 16 bytes"));
    }
    if iv.iter().all(|b| *b == 0) {
        // A zero IV means the HSM did not fill it in (or the RNG returned zeros):
        // refuse to hand out a ciphertext whose IV may repeat.
        return Err(HsmError::Inconsistent("HSM returned an all-zero GCM IV"));
    }
    if output.len() != expected {
        return Err(HsmError::Inconsistent(
            "AES-GCM output has the wrong length",
        ));
    }
    // The module appends the tag to the ciphertext; the spec wants them apart.
    let tag: [u8; TAG_LEN] = output[plaintext_len..]
        .try_into()
        .expect("length checked just above");
    output.truncate(plaintext_len);
    Ok(Sealed {
        iv,
        ciphertext: output,
        tag,
    })
}

/// One C_Encrypt with AES-GCM and a 128-bit tag, `iv` passed as the IV buffer (the
/// module may write into it), or what a module the fault injector stands in for would
/// do instead (one that lacks CKM_AES_GCM, or picks its own IV: [`VendorIv`]). The
/// proxy and `xks-proxy hsm probe` both encrypt through here, so the probe tests the
/// very call the proxy makes.
pub(super) fn gcm_encrypt(
    session: &Session,
    handle: ObjectHandle,
    iv: &mut [u8],
    aad: &[u8],
    plaintext: &[u8],
    faults: Option<&FaultInjector>,
) -> Result<Vec<u8>, CkError> {
    if faults.is_some_and(|f| f.lacks(MechanismType::AES_GCM)) {
        return Err(CkError::Pkcs11(
            RvError::MechanismInvalid,
            Function::EncryptInit,
        ));
    }
    match faults.and_then(FaultInjector::vendor_iv) {
        Some(vendor) => emulate_vendor_iv(vendor, session, handle, iv, aad, plaintext),
        None => {
            let params = GcmParams::new(iv, aad, (TAG_LEN as u64 * 8).into())?;
            session.encrypt(&Mechanism::AesGcm(params), handle, plaintext)
        }
    }
}

/// What an HSM that picks its own GCM IV does, done with SoftHSM2 underneath (see
/// [`VendorIv`]). Refuses an IV buffer such an HSM would refuse, so the proxy's side
/// of each convention is checked too.
pub(super) fn emulate_vendor_iv(
    vendor: VendorIv,
    session: &Session,
    handle: ObjectHandle,
    iv: &mut [u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, CkError> {
    let refuse = || CkError::Pkcs11(RvError::MechanismParamInvalid, Function::EncryptInit);
    let tag_bits = (TAG_LEN as u64 * 8).into();
    match vendor {
        VendorIv::FillsZeroedBuffer => {
            if iv.len() != IV_LEN || iv.iter().any(|b| *b != 0) {
                return Err(refuse());
            }
            session.generate_random_slice(iv)?;
            let params = GcmParams::new(iv, aad, tag_bits)?;
            session.encrypt(&Mechanism::AesGcm(params), handle, plaintext)
        }
        VendorIv::AppendsAfterTag => {
            if !iv.is_empty() {
                return Err(refuse());
            }
            let mut own = [0u8; APPENDED_IV_LEN];
            session.generate_random_slice(&mut own)?;
            let mut chosen = own;
            let params = GcmParams::new(&mut chosen, aad, tag_bits)?;
            let mut output = session.encrypt(&Mechanism::AesGcm(params), handle, plaintext)?;
            output.extend_from_slice(&own);
            Ok(output)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch filled with these bytes: IV `i` is twelve bytes of `i + 1`.
    fn numbered_batch() -> IvBatch {
        let mut batch = IvBatch::new();
        let mut bytes = batch.take_buffer();
        for (i, iv) in bytes.chunks_mut(IV_LEN).enumerate() {
            iv.fill(i as u8 + 1);
        }
        batch.filled(bytes);
        batch
    }

    #[test]
    fn a_new_iv_batch_is_empty() {
        assert!(IvBatch::new().take().is_none());
    }

    #[test]
    fn an_iv_batch_hands_out_each_iv_once_in_order_then_runs_dry() {
        let mut batch = numbered_batch();
        for i in 0..IV_BATCH {
            let iv = batch.take().unwrap().unwrap();
            assert_eq!(iv, [i as u8 + 1; IV_LEN]);
        }
        assert!(batch.take().is_none());
        // What left the batch is gone from it.
        assert!(batch.bytes.iter().all(|b| *b == 0));
    }

    #[test]
    fn an_all_zero_iv_is_refused_and_the_next_one_served() {
        let mut batch = numbered_batch();
        batch.bytes[..IV_LEN].fill(0);
        assert!(matches!(batch.take(), Some(Err(HsmError::Inconsistent(_)))));
        assert_eq!(batch.take().unwrap().unwrap(), [2; IV_LEN]);
    }

    #[test]
    fn a_failed_refill_leaves_the_batch_empty() {
        let mut batch = numbered_batch();
        batch.take().unwrap().unwrap();
        let mut bytes = batch.take_buffer();
        bytes[..5].fill(7); // partly written before the call failed
        batch.put_back_unfilled(bytes);
        assert!(batch.take().is_none());
        assert_eq!(batch.bytes.len(), IV_LEN * IV_BATCH);
    }
}
