//! Cross-worker state behind a compare-and-swap store.
//!
//! Envoy gives every worker its own wasm VM; the only state they share is the
//! host's shared-data map, which offers `get -> (bytes, cas)` and
//! `set(bytes, cas)` and nothing else (no atomic increment, no delete). The core
//! talks to that map through [`SharedStore`], so the same code runs on Envoy
//! and on [`MemStore`] in native tests, where CAS conflicts can be injected.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

/// Why a write to the shared store did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetError {
    /// Someone wrote the key after we read it; re-read and retry.
    CasMismatch,
    /// The host refused for another reason; retrying will not help.
    Host,
}

/// The host's shared-data map, as the ABI really behaves:
/// - `get` returns the value and a CAS token, or `None` when the key was never written
///   (an empty value is reported as absent: Envoy cannot delete keys, only empty them);
/// - `set` with `Some(cas)` fails with [`SetError::CasMismatch`] if the key changed since;
///   with `None` it overwrites unconditionally. Writing a key that does not exist yet
///   succeeds whatever the CAS, so two workers can both "create" it.
pub trait SharedStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError>;
}

/// Result of [`update`] when it could not commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateError {
    /// Every attempt lost the race; the caller decides what that means (see each user).
    Contended,
    /// The host refused the write.
    Host,
}

/// Read-modify-write with a bounded CAS loop.
///
/// `f` sees the current value (`None` if the key is absent) and returns the new value
/// and a result, or `None` to leave the store untouched (the result is then `Ok(None)`).
/// A missing key is written with its CAS token unset: the host accepts any CAS for an
/// absent key, which is exactly the create race the callers must tolerate.
pub fn update<S, T, F>(
    store: &S,
    key: &str,
    max_attempts: u32,
    mut f: F,
) -> Result<Option<T>, UpdateError>
where
    S: SharedStore + ?Sized,
    F: FnMut(Option<&[u8]>) -> Option<(Vec<u8>, T)>,
{
    for _ in 0..max_attempts.max(1) {
        let current = store.get(key);
        let (value, cas) = match &current {
            Some((bytes, cas)) => (Some(bytes.as_slice()), Some(*cas)),
            None => (None, None),
        };
        let Some((new_value, out)) = f(value) else {
            return Ok(None);
        };
        match store.set(key, &new_value, cas) {
            Ok(()) => return Ok(Some(out)),
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Host) => return Err(UpdateError::Host),
        }
    }
    Err(UpdateError::Contended)
}

/// In-memory [`SharedStore`] with the host's semantics, for tests and simulations.
///
/// `interfere` lets a test act as "another worker": it is called before every `set`
/// and may write to the store, which makes the pending `set` see a CAS mismatch.
#[derive(Default)]
pub struct MemStore {
    map: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    next_cas: Cell<u32>,
    #[allow(clippy::type_complexity)]
    interfere: RefCell<Option<Box<dyn FnMut(&str) -> bool>>>,
    sets: Cell<u64>,
    gets: Cell<u64>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Before each `set`, `hook(key)` runs; if it returns true the `set` fails with a
    /// CAS mismatch as if another worker had written the key in between.
    pub fn set_interference(&self, hook: impl FnMut(&str) -> bool + 'static) {
        *self.interfere.borrow_mut() = Some(Box::new(hook));
    }

    pub fn clear_interference(&self) {
        *self.interfere.borrow_mut() = None;
    }

    /// Number of successful writes so far.
    pub fn writes(&self) -> u64 {
        self.sets.get()
    }

    /// Number of reads so far (present or not).
    pub fn reads(&self) -> u64 {
        self.gets.get()
    }

    fn bump_cas(&self) -> u32 {
        // Like the host's global counter; 0 means "no CAS" so it is skipped on wrap.
        let next = self.next_cas.get().wrapping_add(1).max(1);
        self.next_cas.set(next);
        next
    }
}

impl SharedStore for MemStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.gets.set(self.gets.get() + 1);
        self.map
            .borrow()
            .get(key)
            .filter(|(v, _)| !v.is_empty())
            .cloned()
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        let interfered = match self.interfere.borrow_mut().as_mut() {
            Some(hook) => hook(key),
            None => false,
        };
        if interfered {
            let cas = self.bump_cas();
            if let Some(entry) = self.map.borrow_mut().get_mut(key) {
                entry.1 = cas;
            }
            return Err(SetError::CasMismatch);
        }
        let cas_new = self.bump_cas();
        let mut map = self.map.borrow_mut();
        if let (Some((_, current)), Some(expected)) = (map.get(key), cas) {
            if *current != expected {
                return Err(SetError::CasMismatch);
            }
        }
        // The value is copied as the host copies it; the key is allocated only once.
        match map.get_mut(key) {
            Some(entry) => *entry = (value.to_vec(), cas_new),
            None => {
                map.insert(key.to_string(), (value.to_vec(), cas_new));
            }
        }
        self.sets.set(self.sets.get() + 1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn add_one(store: &MemStore, attempts: u32) -> Result<Option<u64>, UpdateError> {
        update(store, "n", attempts, |cur| {
            let n = cur
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
                .unwrap_or(0)
                + 1;
            Some((n.to_le_bytes().to_vec(), n))
        })
    }

    #[test]
    fn stale_cas_is_rejected_and_fresh_cas_accepted() {
        let s = MemStore::new();
        s.set("k", b"a", None).unwrap();
        let (_, cas) = s.get("k").unwrap();
        s.set("k", b"b", Some(cas)).unwrap();
        assert_eq!(s.set("k", b"c", Some(cas)), Err(SetError::CasMismatch));
        assert_eq!(s.get("k").unwrap().0, b"b");
    }

    #[test]
    fn absent_key_accepts_any_cas_like_the_host() {
        let s = MemStore::new();
        assert_eq!(s.set("k", b"x", Some(12345)), Ok(()));
    }

    #[test]
    fn empty_value_reads_as_absent() {
        let s = MemStore::new();
        s.set("k", b"x", None).unwrap();
        s.set("k", b"", None).unwrap();
        assert!(s.get("k").is_none());
    }

    #[test]
    fn update_retries_through_interference_then_commits() {
        let s = MemStore::new();
        let mut remaining = 3;
        s.set_interference(move |_| {
            remaining -= 1;
            remaining >= 0
        });
        assert_eq!(add_one(&s, 5), Ok(Some(1)));
        assert_eq!(s.writes(), 1);
    }

    #[test]
    fn update_gives_up_after_the_bound() {
        let s = MemStore::new();
        s.set_interference(|_| true);
        assert_eq!(add_one(&s, 4), Err(UpdateError::Contended));
        s.clear_interference();
        assert_eq!(add_one(&s, 4), Ok(Some(1)));
    }

    #[test]
    fn update_can_decline_to_write() {
        let s = MemStore::new();
        let r: Result<Option<()>, _> = update(&s, "k", 3, |_| None);
        assert_eq!(r, Ok(None));
        assert_eq!(s.writes(), 0);
    }
}
