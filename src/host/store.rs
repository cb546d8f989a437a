//! Envoy's shared data as the core's [`SharedStore`].

use crate::shared::{SetError, SharedStore};

use super::abi;

/// Shared data of this plugin's `vm_id`, seen from the current worker.
pub struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        // A host error reads as "absent": every user treats absence as a valid state.
        match abi::shared_get(key) {
            Ok(Some((value, cas))) if !value.is_empty() => Some((value, cas)),
            _ => None,
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        match abi::shared_set(key, value, cas.unwrap_or(0)) {
            Ok(()) => Ok(()),
            Err(abi::HostStatus(abi::CAS_MISMATCH)) => Err(SetError::CasMismatch),
            Err(_) => Err(SetError::Host),
        }
    }
}
