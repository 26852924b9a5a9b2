//! The key cache ([`KeyCache`]): handles and attributes by external key id, re-read when
//! due, and session copies of keys retired only when no call can still use them; and
//! the session's key lookups that fill it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cryptoki::context::Function;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use foldhash::{HashMap, HashMapExt};
use parking_lot::{Mutex, MutexGuard, RwLock};

use super::{objects::*, worker::*};
use crate::hsm::{HsmError, KeyMetadata};

/// A key handle with the attributes read with it.
#[derive(Debug, Clone)]
pub(super) struct CachedKey {
    pub(super) handle: ObjectHandle,
    /// The token object `handle` was copied from (`handle` itself without a copy).
    pub(super) source: ObjectHandle,
    /// Set when `handle` is this proxy's session copy of the token key (destroyed when
    /// replaced): the serial of the session that made it. A session object dies with
    /// the session that created it, so the copy is forgotten when that session goes.
    pub(super) owner: Option<u64>,
    pub(super) metadata: KeyMetadata,
    pub(super) read_at: Instant,
    /// The module generation the handle belongs to (see [`Module`]).
    pub(super) generation: u64,
}

/// Whether a cached key entry is due to be re-read from the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Age {
    Fresh,
    /// Past `key_refresh`: re-read it, or use it while another session does.
    Stale,
}

/// The key cache of one EKM, shared by its session threads (PKCS#11 handles belong to
/// the application, not to a session): handles and attributes by external key id,
/// key versions, session copies waiting to be destroyed, and the lock that makes key
/// lookups one at a time.
pub(super) struct KeyCache {
    /// How long an entry is used without re-reading the token.
    refresh: Duration,
    entries: RwLock<HashMap<String, CachedKey>>,
    /// Current version per external key, and when it was read.
    versions: RwLock<HashMap<String, (u32, Instant)>>,
    /// Replaced session copies of keys (handle, module generation, when replaced),
    /// destroyed once no call can still use them.
    retired: Mutex<Vec<(ObjectHandle, u64, Instant)>>,
    /// Held while a key is looked up in the token.
    lookup: Mutex<()>,
    /// Set once the token has shown this process a key: a token that shows no objects
    /// after that is not the token it was (see [`Shared::check_not_emptied`]).
    seen: AtomicBool,
}

impl KeyCache {
    pub(super) fn new(refresh: Duration) -> Self {
        Self {
            refresh,
            entries: RwLock::new(HashMap::new()),
            versions: RwLock::new(HashMap::new()),
            retired: Mutex::new(Vec::new()),
            lookup: Mutex::new(()),
            seen: AtomicBool::new(false),
        }
    }

    /// The entry of module generation `generation`, and whether it is due to be
    /// re-read. An entry more than twice the refresh time old is not used at all.
    pub(super) fn entry(&self, key_id: &str, generation: u64) -> Option<(CachedKey, Age)> {
        let entries = self.entries.read();
        let key = entries
            .get(key_id)
            .filter(|key| key.generation == generation)?;
        let age = key.read_at.elapsed();
        if age < self.refresh {
            Some((key.clone(), Age::Fresh))
        } else if age < self.refresh.saturating_mul(2) {
            Some((key.clone(), Age::Stale))
        } else {
            None
        }
    }

    /// Caches `key`; returns the entry it replaces.
    pub(super) fn insert(&self, key_id: &str, key: CachedKey) -> Option<CachedKey> {
        self.entries.write().insert(key_id.to_owned(), key)
    }

    /// Removes the entry unless `keep` says it still holds; returns what was removed.
    pub(super) fn remove_unless(
        &self,
        key_id: &str,
        keep: impl FnOnce(&CachedKey) -> bool,
    ) -> Option<CachedKey> {
        let mut entries = self.entries.write();
        if entries.get(key_id).is_some_and(keep) {
            None
        } else {
            entries.remove(key_id)
        }
    }

    /// Forgets the key copies made in session `serial`, which is going or gone and has
    /// taken them with it. They are not destroyed: their handles are dead.
    pub(super) fn forget_copies_of(&self, serial: u64) {
        self.entries
            .write()
            .retain(|_, key| key.owner != Some(serial));
    }

    /// Makes every entry and version too old to use: the next use reads the token (and
    /// retires its session copy as any replaced entry's).
    pub(super) fn expire(&self) {
        self.versions.write().clear();
        let long_ago = Instant::now()
            .checked_sub(self.refresh.saturating_mul(2))
            .unwrap_or_else(Instant::now);
        for key in self.entries.write().values_mut() {
            key.read_at = key.read_at.min(long_ago);
        }
    }

    /// The key's current version, while fresh.
    pub(super) fn version(&self, key_id: &str) -> Option<u32> {
        let versions = self.versions.read();
        let (version, read_at) = versions.get(key_id)?;
        (read_at.elapsed() < self.refresh).then_some(*version)
    }

    pub(super) fn set_version(&self, key_id: &str, version: u32) {
        self.versions
            .write()
            .insert(key_id.to_owned(), (version, Instant::now()));
    }

    /// Retires a replaced session copy; returns the copies of module generation
    /// `generation` now past [`RETIRE_GRACE`], for the caller to destroy. Older
    /// generations' handles may be someone else's now: they are dropped, never
    /// destroyed.
    pub(super) fn retire(&self, old: &CachedKey, generation: u64) -> Vec<ObjectHandle> {
        let mut retired = self.retired.lock();
        retired.push((old.handle, old.generation, Instant::now()));
        let (due, keep): (Vec<_>, Vec<_>) = retired
            .drain(..)
            .partition(|(_, _, at)| at.elapsed() >= RETIRE_GRACE);
        *retired = keep;
        due.into_iter()
            .filter(|(_, g, _)| *g == generation)
            .map(|(handle, _, _)| handle)
            .collect()
    }

    /// Waits for the lookup lock.
    pub(super) fn lookup(&self) -> MutexGuard<'_, ()> {
        self.lookup.lock()
    }

    /// The lookup lock, if no other session holds it.
    pub(super) fn try_lookup(&self) -> Option<MutexGuard<'_, ()>> {
        self.lookup.try_lock()
    }

    /// Notes that the token has shown a key.
    pub(super) fn note_seen(&self) {
        self.seen.store(true, Ordering::Relaxed);
    }

    /// Whether the token has ever shown this process a key.
    pub(super) fn seen(&self) -> bool {
        self.seen.load(Ordering::Relaxed)
    }
}

/// How long a replaced session copy of a key lives on: longer than any call using it
/// can take (calls that outlive their timeout are abandoned by their requests).
pub(super) const RETIRE_GRACE: Duration = Duration::from_secs(30);

impl Worker {
    pub(super) fn forget(&mut self, key_id: &str) {
        let old = self.shared.keys.remove_unless(key_id, |_| false);
        self.discard(old);
    }

    /// Retires a replaced session copy of a key. Another session may be using it right
    /// now (SoftHSM2 then fails the call with CKR_KEY_TYPE_INCONSISTENT, not an invalid
    /// handle), so it is destroyed only after [`RETIRE_GRACE`], longer than any call.
    pub(super) fn discard(&mut self, old: Option<CachedKey>) {
        let Some(old) = old.filter(|k| k.owner.is_some()) else {
            return;
        };
        let module = Arc::clone(&self.shared.module);
        let generation = module.generation();
        let due = self.shared.keys.retire(&old, generation);
        if due.is_empty() {
            return;
        }
        let Ok(guard) = module.enter(None) else {
            return;
        };
        let Some(open) = self.session.as_ref().filter(|o| o.generation == generation) else {
            return;
        };
        for handle in due {
            if let Err(e) = open.session.destroy_object(handle) {
                tracing::debug!(error = %e, "could not destroy a session copy of a key");
            }
        }
        drop(guard);
    }

    /// The key's handle and attributes, from the cache when fresh.
    pub(super) fn key(&mut self, key_id: &str) -> Result<CachedKey, HsmError> {
        let stale = match self.cached_entry(key_id) {
            Some((key, Age::Fresh)) => return Ok(key),
            Some((key, Age::Stale)) => Some(key),
            None => None,
        };
        // One lookup at a time per token: the sessions that missed together wait for
        // the first one's result instead of each copying the key. (SoftHSM2 also lets a
        // search for token objects see a copy being made, whose CKA_TOKEN is still the
        // original's, as a second key with the label.)
        let shared = Arc::clone(&self.shared);
        let _lookup = match stale {
            // While one session re-reads a key that is due for it (a millisecond and
            // more on SoftHSM2), the others go on with the entry they have instead of
            // queueing behind the lookup. The replaced copy outlives them
            // (RETIRE_GRACE).
            Some(key) => match shared.keys.try_lookup() {
                Some(guard) => guard,
                None => return Ok(key),
            },
            None => shared.keys.lookup(),
        };
        if let Some(key) = self.cached(key_id) {
            return Ok(key);
        }
        let found = self.find_key(key_id);
        if found.is_err() {
            self.forget(key_id);
        }
        let key = found?;
        let old = self.shared.keys.insert(key_id, key.clone());
        self.discard(old);
        Ok(key)
    }

    pub(super) fn cached(&self, key_id: &str) -> Option<CachedKey> {
        match self.cached_entry(key_id) {
            Some((key, Age::Fresh)) => Some(key),
            _ => None,
        }
    }

    /// The cached entry of the module's current generation, and whether it is due to be
    /// re-read. An entry more than twice `key_refresh` old is not used at all.
    pub(super) fn cached_entry(&self, key_id: &str) -> Option<(CachedKey, Age)> {
        self.shared
            .keys
            .entry(key_id, self.shared.module.generation())
    }

    /// The key's token object and its metadata as the token holds them now.
    ///
    /// A missing key is an EKM fault until proven otherwise: KMS takes KeyNotFound as
    /// permanent for the key. If the token held keys before and now shows no objects
    /// at all, the lookup fails as a lost token ([`Shared::check_not_emptied`]); a key
    /// gone from a token that still holds others is gone: KeyNotFound.
    pub(super) fn read_token_key(
        &mut self,
        key_id: &str,
    ) -> Result<(ObjectHandle, KeyMetadata), HsmError> {
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Token(true),
            Attribute::Label(key_id.as_bytes().to_vec()),
        ];
        let shared = Arc::clone(&self.shared);
        let handles = self.call(
            |s| {
                let handles = s.find_objects(&template)?;
                if handles.is_empty() {
                    shared.check_not_emptied(s, Some(key_id))?;
                }
                Ok(handles)
            },
            Function::FindObjects,
        )?;
        let handle = match handles.as_slice() {
            [handle] => *handle,
            [] => return Err(HsmError::KeyNotFound),
            _ => return Err(HsmError::AmbiguousKey),
        };
        self.shared.keys.note_seen();
        let attributes = self.call(
            |s| s.get_attributes(handle, &KEY_ATTRIBUTES),
            Function::GetAttributeValue,
        )?;
        // Disabling applies to the external key, every version of it.
        let disabled = self.call(
            |s| is_disabled(s, crate::hsm::base_key_id(key_id)),
            Function::FindObjects,
        )?;
        Ok((handle, metadata_from_attributes(&attributes, disabled)))
    }

    /// The key's metadata read fresh from the token (GetKeyMetadata must reflect the key
    /// as it is now), without a new session copy: GetKeyMetadata may come often, and
    /// each copy is an object the module keeps until [`RETIRE_GRACE`] is over (on
    /// SoftHSM2, every search then walks them all). The cached entry stays while it
    /// still matches the token; a key replaced or changed is re-read at its next use.
    pub(super) fn fresh_metadata(&mut self, key_id: &str) -> Result<KeyMetadata, HsmError> {
        // Under the lookup lock, like [`Self::key`]: a search while another session
        // copies the key can see the copy as a second key with the label.
        let shared = Arc::clone(&self.shared);
        let _lookup = shared.keys.lookup();
        let generation = self.shared.module.generation();
        let (source, metadata) = match self.read_token_key(key_id) {
            Ok(read) => read,
            Err(e) => {
                if e == HsmError::KeyNotFound {
                    self.forget(key_id);
                }
                return Err(e);
            }
        };
        let stale = self.shared.keys.remove_unless(key_id, |k| {
            k.source == source && k.generation == generation && k.metadata == metadata
        });
        self.discard(stale);
        Ok(metadata)
    }

    pub(super) fn find_key(&mut self, key_id: &str) -> Result<CachedKey, HsmError> {
        let generation = self.shared.module.generation();
        let (handle, metadata) = self.read_token_key(key_id)?;
        let source = handle;
        // A session copy spares modules that re-check token objects on every use
        // (SoftHSM2 stats and locks the object's file in each C_EncryptInit). The copy
        // carries the same attributes; a module that refuses to copy keeps the original.
        let (handle, owner) = if self.shared.session_key_copies {
            match self.call(
                |s| s.copy_object(handle, &[Attribute::Token(false)]),
                Function::CopyObject,
            ) {
                // The call succeeded in the session this worker holds now.
                Ok(copy) => (copy, self.session.as_ref().map(|open| open.serial)),
                Err(e) => {
                    tracing::warn!(key_id, error = %e, "cannot copy the key into the session; using the token object");
                    (handle, None)
                }
            }
        } else {
            (handle, None)
        };
        if self.shared.module.generation() != generation {
            // The module was re-initialized between our calls: the handles are dead.
            return Err(HsmError::Unavailable(
                "PKCS#11 module re-initialized during key lookup".into(),
            ));
        }
        Ok(CachedKey {
            handle,
            source,
            owner,
            metadata,
            read_at: Instant::now(),
            generation,
        })
    }
}
