//! An optional replay cache for SigV4 signatures, with bounded memory.
//!
//! A signature stays acceptable while its X-Amz-Date is within 5 minutes of the clock,
//! so a captured request could be replayed for up to 10 minutes. With the cache on, a
//! signature is accepted once: the cache remembers each accepted signature for
//! [`WINDOW`]. Memory is bounded by `capacity` entries of 8 bytes of signature (an
//! HMAC output is uniformly random, so 64 bits cannot collide in practice) and a
//! timestamp; when full, the oldest entry is forgotten early, so a replay older than
//! the last `capacity` requests could pass. 1,000,000 entries (~40 MB) cover ten
//! minutes at KMS's default 1800 TPS per key store.
//!
//! Off by default: KMS may legitimately resend a request, and a replay of an Encrypt or
//! Decrypt gives an attacker nothing the original did not.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How long a signature is remembered: its whole validity (±5 minutes).
pub const WINDOW: Duration = Duration::from_secs(600);

/// Signatures seen within [`WINDOW`].
#[derive(Debug)]
pub struct ReplayCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    seen: HashSet<u64>,
    order: VecDeque<(Instant, u64)>,
}

impl ReplayCache {
    /// A cache of at most `capacity` signatures.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// True the first time `signature` is offered within the window.
    pub fn first_use(&self, signature: &[u8; 32], now: Instant) -> bool {
        let id = id(signature);
        let mut inner = self.inner.lock();
        while let Some(&(at, old)) = inner.order.front() {
            if now.saturating_duration_since(at) < WINDOW && inner.order.len() < self.capacity {
                break;
            }
            inner.order.pop_front();
            inner.seen.remove(&old);
        }
        if !inner.seen.insert(id) {
            return false;
        }
        inner.order.push_back((now, id));
        true
    }

    /// Forgets `signature`: offered again, it is a first use. Its old place in the
    /// expiry order stays, and a later use is forgotten with it when it expires: safe,
    /// because by then [`WINDOW`] has passed since the signature was first seen, and
    /// with it the signature's own validity (its date ± 5 minutes).
    pub fn forget(&self, signature: &[u8; 32]) {
        self.inner.lock().seen.remove(&id(signature));
    }

    /// Signatures remembered now.
    pub fn len(&self) -> usize {
        self.inner.lock().order.len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The first 64 bits of a signature: uniformly random, so they identify it.
fn id(signature: &[u8; 32]) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&signature[..8]);
    u64::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(n: u8) -> [u8; 32] {
        [n; 32]
    }

    #[test]
    fn a_signature_is_accepted_once_within_the_window() {
        let cache = ReplayCache::new(10);
        let t0 = Instant::now();
        assert!(cache.first_use(&sig(1), t0));
        assert!(!cache.first_use(&sig(1), t0 + Duration::from_secs(1)));
        assert!(cache.first_use(&sig(2), t0));
        // After the window, the signature itself would be expired anyway.
        assert!(cache.first_use(&sig(1), t0 + WINDOW + Duration::from_secs(1)));
    }

    #[test]
    fn a_forgotten_signature_is_a_first_use_again_and_then_remembered() {
        let cache = ReplayCache::new(10);
        let t0 = Instant::now();
        assert!(cache.first_use(&sig(1), t0));
        cache.forget(&sig(1));
        assert!(cache.first_use(&sig(1), t0 + Duration::from_secs(1)));
        assert!(!cache.first_use(&sig(1), t0 + Duration::from_secs(2)));
    }

    #[test]
    fn memory_is_bounded() {
        let cache = ReplayCache::new(3);
        let t0 = Instant::now();
        for n in 0..10 {
            assert!(cache.first_use(&sig(n), t0));
            assert!(cache.len() <= 3);
        }
        // The newest are remembered.
        assert!(!cache.first_use(&sig(9), t0));
    }
}
