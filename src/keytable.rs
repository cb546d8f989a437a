//! Fixed-size table of recently seen keys, in shared data.

use serde::Deserialize;

use crate::config::{check_range, field, ConfigError};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyTableConfig {
    /// Total number of slots (entries) across all shards.
    pub capacity: u32,
    /// Slots per shared-data key; a shard is read and written as one value.
    pub shard_slots: u32,
    /// How long a key seen to exist (200/201) stays critical for priorities.
    pub known_ttl_ms: u64,
}

impl Default for KeyTableConfig {
    fn default() -> Self {
        Self {
            capacity: 65_536,
            shard_slots: 64,
            known_ttl_ms: 600_000,
        }
    }
}

impl KeyTableConfig {
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        check_range(&field(section, "shard_slots"), self.shard_slots, 1, 4096)?;
        check_range(
            &field(section, "capacity"),
            self.capacity,
            self.shard_slots,
            16_777_216,
        )?;
        check_range(&field(section, "known_ttl_ms"), self.known_ttl_ms, 1, 86_400_000)
    }
}
