//! Where a table of a given configuration lives: shard keys, bucket ranges, the shard
//! header (layout in the module docs of [`super`]).

use super::slot::SlotState;
use super::{
    KeyTableConfig, BUCKET_HEADER_BYTES, KEY_PREFIX, MAGIC, MAX_CAPACITY, MAX_SHARD_SLOTS,
    MAX_WAYS, SHARD_HEADER_BYTES, SLOT_BYTES, VERSION,
};

/// Where a table of a given configuration lives and how big it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Configured capacity (part of the key names).
    pub capacity: u32,
    /// Configured slots per shard (part of the key names).
    pub shard_slots: u32,
    pub shards: u32,
    /// Buckets per shard.
    pub buckets: u32,
    /// Slots per bucket.
    pub ways: u32,
}

impl Layout {
    /// The layout for a configuration. Inputs are clamped to the validated ranges
    /// (1..=4096 slots per shard, up to 16M slots), so any input gives a usable layout.
    pub fn new(capacity: u32, shard_slots: u32) -> Self {
        let shard_slots = shard_slots.clamp(1, MAX_SHARD_SLOTS);
        let capacity = capacity.clamp(shard_slots, MAX_CAPACITY);
        let ways = shard_slots.min(MAX_WAYS);
        Self {
            capacity,
            shard_slots,
            shards: (capacity / shard_slots).max(1),
            buckets: shard_slots / ways,
            ways,
        }
    }

    pub fn from_config(config: &KeyTableConfig) -> Self {
        Self::new(config.capacity, config.shard_slots)
    }

    /// Slots actually allocated.
    pub fn slots(&self) -> u64 {
        u64::from(self.shards) * u64::from(self.buckets) * u64::from(self.ways)
    }

    pub fn bucket_bytes(&self) -> usize {
        BUCKET_HEADER_BYTES + self.ways as usize * SLOT_BYTES
    }

    /// Bytes of one shard value.
    pub fn shard_bytes(&self) -> usize {
        SHARD_HEADER_BYTES + self.buckets as usize * self.bucket_bytes()
    }

    /// Bytes of all shard values together (not counting the host's per-key overhead).
    pub fn total_bytes(&self) -> u64 {
        u64::from(self.shards) * self.shard_bytes() as u64
    }

    /// Shared-data key of shard `index`.
    pub fn shard_key(&self, index: u32) -> ShardKey {
        self.shard_key_prefix().with_index(index)
    }

    /// The part of every shard key before the index.
    pub(super) fn shard_key_prefix(&self) -> ShardKey {
        let mut key = ShardKey {
            bytes: [0; SHARD_KEY_MAX],
            len: 0,
        };
        key.push(KEY_PREFIX.as_bytes());
        for n in [self.capacity, self.shard_slots] {
            key.push(b".");
            key.push_decimal(n);
        }
        key.push(b".");
        key
    }

    /// Shard (from the high 32 bits) and bucket (from the low 32 bits) of a fingerprint.
    pub fn locate(&self, fp: u64) -> (u32, u32) {
        let shard = ((fp >> 32) * u64::from(self.shards)) >> 32;
        let bucket = ((fp & 0xffff_ffff) * u64::from(self.buckets)) >> 32;
        (shard as u32, bucket as u32)
    }

    pub(super) fn bucket_range(&self, bucket: u32) -> std::ops::Range<usize> {
        let start = SHARD_HEADER_BYTES + bucket as usize * self.bucket_bytes();
        start..start + self.bucket_bytes()
    }

    pub(super) fn header(&self) -> [u8; SHARD_HEADER_BYTES] {
        let b = (self.buckets as u16).to_le_bytes();
        [
            MAGIC[0],
            MAGIC[1],
            MAGIC[2],
            MAGIC[3],
            VERSION,
            self.ways as u8,
            b[0],
            b[1],
        ]
    }

    /// Whether `bytes` is a well-formed shard of this layout.
    pub fn is_valid_shard(&self, bytes: &[u8]) -> bool {
        let Some(buckets) = bytes.strip_prefix(&self.header()) else {
            return false;
        };
        if buckets.len() != self.shard_bytes() - SHARD_HEADER_BYTES {
            return false;
        }
        // Every access checks a whole shard, which is nearly always valid: no early exit,
        // no branch per slot.
        let (mut reserved, mut state) = (0, 0);
        for bucket in buckets.chunks_exact(self.bucket_bytes()) {
            let slots = bucket.get(BUCKET_HEADER_BYTES..).unwrap_or_default();
            for slot in slots.chunks_exact(SLOT_BYTES) {
                // The two bytes of the meta that `decode_meta` checks.
                if let [.., r, s] = slot {
                    reserved |= r;
                    state = state.max(*s);
                }
            }
        }
        reserved == 0 && state <= SlotState::Exists as u8
    }
}

/// The longest shard key: the prefix and three dot-separated `u32`s.
const SHARD_KEY_MAX: usize = KEY_PREFIX.len() + 3 * (1 + 10);

/// A shard's shared-data key, built on the stack: every table access needs one, and
/// `format!` with its allocation was a visible part of a request's cost.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ShardKey {
    bytes: [u8; SHARD_KEY_MAX],
    len: usize,
}

impl ShardKey {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.bytes.get(..self.len).unwrap_or_default()).unwrap_or_default()
    }

    pub(super) fn with_index(mut self, index: u32) -> Self {
        self.push_decimal(index);
        self
    }

    pub(super) fn push(&mut self, bytes: &[u8]) {
        if let Some(dst) = self.bytes.get_mut(self.len..self.len + bytes.len()) {
            dst.copy_from_slice(bytes);
            self.len += bytes.len();
        }
    }

    pub(super) fn push_decimal(&mut self, mut n: u32) {
        let width = n.checked_ilog10().map_or(1, |log| log as usize + 1);
        let Some(dst) = self.bytes.get_mut(self.len..self.len + width) else {
            return;
        };
        for digit in dst.iter_mut().rev() {
            *digit = b'0' + (n % 10) as u8;
            n /= 10;
        }
        self.len += width;
    }
}

impl std::ops::Deref for ShardKey {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for ShardKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}
