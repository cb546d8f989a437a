//! Every worker's side: the shared snapshot, its bytes, publishing and loading.

use crate::ceiling::{MAX_CEILING, MIN_CEILING};
use crate::classify::Criticality;
use crate::shared::{update, SharedStore, UpdateError};
use std::fmt;

use crate::wire::{f64_at, fnv1a, u16_at, u32_at, u64_at};

/// Shared-data key of the published snapshot (fixed: shared-data keys never die).
pub const SNAPSHOT_KEY: &str = "sessionguard.memory.v1";
/// Encoded size of a [`PressureSnapshot`].
pub const SNAPSHOT_LEN: usize = 96;
pub(super) const MAGIC: [u8; 4] = *b"SGMP";
pub(super) const VERSION: u8 = 2;
/// Bytes covered by the checksum.
pub(super) const SUMMED: usize = 88;
pub(super) const FLAG_ACTIVE: u8 = 1;
pub(super) const FLAG_CEILING: u8 = 2;
pub(super) const FLAG_FALLBACK: u8 = 4;
pub(super) const KNOWN_FLAGS: u8 = FLAG_ACTIVE | FLAG_CEILING | FLAG_FALLBACK;
pub(super) const NO_ENDPOINT: u16 = u16::MAX;

/// The memory decision shared by all workers. Cheap to copy; see [`Self::encode`]
/// for the layout.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PressureSnapshot {
    pub(super) flags: u8,
    pub(super) driving: u16,
    pub(super) endpoints: u16,
    pub(super) worst: u16,
    pub(super) ratio: f64,
    pub(super) ceiling_ratio: f64,
    pub(super) p_sheddable: f64,
    pub(super) severity: f64,
    pub(super) sample_ms: u64,
    pub(super) computed_ms: u64,
    /// The in-flight ceiling, 0 = none.
    pub(super) max_in_flight: u32,
    /// The estimate behind it (bytes per request in flight, for the gauge).
    pub(super) bytes_per_request: u32,
}

impl Default for PressureSnapshot {
    fn default() -> Self {
        PressureSnapshot::idle(0, 0)
    }
}

/// Why a shared snapshot is not used (the caller then uses an idle one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotError {
    /// Nothing published yet.
    Missing,
    Length(usize),
    Magic,
    Version(u8),
    Checksum,
    /// A field out of its range (with a valid checksum: a bug, not noise).
    Invalid(&'static str),
    /// The poller has not published for longer than `max_sample_age_ms`.
    Expired {
        age_ms: u64,
    },
    /// Computed later than now by more than `max_sample_age_ms` (the clock stepped back).
    FromTheFuture {
        ahead_ms: u64,
    },
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("memory pressure snapshot ")?;
        match self {
            SnapshotError::Missing => f.write_str("not published yet"),
            SnapshotError::Length(n) => {
                write!(f, "has {n} bytes, expected {SNAPSHOT_LEN}")
            }
            SnapshotError::Magic => f.write_str("has a wrong magic number"),
            SnapshotError::Version(v) => write!(f, "has unknown version {v}"),
            SnapshotError::Checksum => f.write_str("fails its checksum"),
            SnapshotError::Invalid(what) => write!(f, "is invalid: {what}"),
            SnapshotError::Expired { age_ms } => write!(
                f,
                "is {age_ms} ms old: the memory poller is not publishing; memory shedding is off"
            ),
            SnapshotError::FromTheFuture { ahead_ms } => {
                write!(
                    f,
                    "is {ahead_ms} ms in the future (clock stepped back); ignored"
                )
            }
        }
    }
}

impl std::error::Error for SnapshotError {}

impl PressureSnapshot {
    /// No pressure: nothing shed, limit untouched.
    pub fn idle(computed_ms: u64, endpoints: usize) -> PressureSnapshot {
        PressureSnapshot {
            flags: 0,
            driving: 0,
            endpoints: clamp_u16(endpoints),
            worst: NO_ENDPOINT,
            ratio: 0.0,
            ceiling_ratio: 0.0,
            p_sheddable: 0.0,
            severity: 0.0,
            sample_ms: 0,
            computed_ms,
            max_in_flight: 0,
            bytes_per_request: 0,
        }
    }

    /// The in-flight ceiling every worker applies (`Limiter::set_memory_ceiling`);
    /// `None` in a snapshot that carries none (memory shedding off, or an unset limit).
    pub fn max_in_flight(&self) -> Option<u32> {
        (self.max_in_flight != 0).then_some(self.max_in_flight)
    }

    /// The estimate of the store's memory per request in flight behind the ceiling.
    pub fn bytes_per_request(&self) -> u32 {
        self.bytes_per_request
    }

    /// Shed this request? `uniform_random` is uniform in [0, 1). `Some(severity)`
    /// (in [0, 1], for `Retry-After`) means shed, with reason "memory".
    pub fn decide(&self, criticality: Criticality, uniform_random: f64) -> Option<f64> {
        let p = self.shed_probability(criticality);
        // NaN compares false: a broken random source never sheds.
        (p > 0.0 && uniform_random < p).then_some(self.severity)
    }

    pub fn shed_probability(&self, criticality: Criticality) -> f64 {
        match criticality {
            Criticality::Sheddable => self.p_sheddable,
            // Critical traffic is refused only by the in-flight ceiling.
            Criticality::Critical => 0.0,
        }
    }

    /// The decision ratio (demand, or the ceiling at `critical`) of the worst endpoint.
    pub fn ratio(&self) -> f64 {
        self.ratio
    }

    /// The highest ceiling (RSS) ratio among driving endpoints.
    pub fn ceiling_ratio(&self) -> f64 {
        self.ceiling_ratio
    }

    pub fn severity(&self) -> f64 {
        self.severity
    }

    /// Some endpoint drives the decision.
    pub fn is_active(&self) -> bool {
        self.flags & FLAG_ACTIVE != 0
    }

    /// The ceiling (RSS at `critical`) is what drives the decision.
    pub fn ceiling_in_force(&self) -> bool {
        self.flags & FLAG_CEILING != 0
    }

    /// The worst endpoint lacks the demand gauges: its ceiling decides alone.
    pub fn demand_fallback(&self) -> bool {
        self.flags & FLAG_FALLBACK != 0
    }

    pub fn driving_endpoints(&self) -> usize {
        usize::from(self.driving)
    }

    pub fn endpoints(&self) -> usize {
        usize::from(self.endpoints)
    }

    pub fn worst_endpoint(&self) -> Option<usize> {
        (self.worst != NO_ENDPOINT).then_some(usize::from(self.worst))
    }

    /// When the sample behind the decision was received.
    pub fn sample_ms(&self) -> Option<u64> {
        self.is_active().then_some(self.sample_ms)
    }

    pub fn sample_age_ms(&self, now_ms: u64) -> Option<u64> {
        self.sample_ms().map(|t| now_ms.saturating_sub(t))
    }

    /// When the poller computed it.
    pub fn computed_ms(&self) -> u64 {
        self.computed_ms
    }

    /// Little-endian, [`SNAPSHOT_LEN`] = 96 bytes:
    ///
    /// | offset | size | field |
    /// |---|---|---|
    /// | 0  | 4 | magic `SGMP` |
    /// | 4  | 1 | version (2) |
    /// | 5  | 1 | flags: 1 active, 2 ceiling in force, 4 demand fallback |
    /// | 6  | 2 | driving endpoints (u16) |
    /// | 8  | 2 | configured endpoints (u16) |
    /// | 10 | 2 | worst endpoint index (u16, 0xFFFF = none) |
    /// | 12 | 4 | reserved (0) |
    /// | 16 | 8 | decision ratio (f64) |
    /// | 24 | 8 | ceiling ratio (f64) |
    /// | 32 | 8 | shed probability, sheddable (f64) |
    /// | 40 | 16 | reserved (0) |
    /// | 56 | 8 | severity (f64) |
    /// | 64 | 8 | sample time, ms (u64) |
    /// | 72 | 8 | computed time, ms (u64) |
    /// | 80 | 4 | in-flight ceiling (u32, 0 = none) |
    /// | 84 | 4 | bytes per request in flight behind it (u32) |
    /// | 88 | 4 | FNV-1a 32 of bytes 0..88 |
    /// | 92 | 4 | reserved (0) |
    pub fn encode(&self) -> [u8; SNAPSHOT_LEN] {
        let mut b = [0u8; SNAPSHOT_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = VERSION;
        b[5] = self.flags;
        b[6..8].copy_from_slice(&self.driving.to_le_bytes());
        b[8..10].copy_from_slice(&self.endpoints.to_le_bytes());
        b[10..12].copy_from_slice(&self.worst.to_le_bytes());
        b[16..24].copy_from_slice(&self.ratio.to_le_bytes());
        b[24..32].copy_from_slice(&self.ceiling_ratio.to_le_bytes());
        b[32..40].copy_from_slice(&self.p_sheddable.to_le_bytes());
        b[56..64].copy_from_slice(&self.severity.to_le_bytes());
        b[64..72].copy_from_slice(&self.sample_ms.to_le_bytes());
        b[72..80].copy_from_slice(&self.computed_ms.to_le_bytes());
        b[80..84].copy_from_slice(&self.max_in_flight.to_le_bytes());
        b[84..88].copy_from_slice(&self.bytes_per_request.to_le_bytes());
        let sum = fnv1a(&b[..SUMMED]);
        b[SUMMED..SUMMED + 4].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Reads an encoded snapshot; any garbage is an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<PressureSnapshot, SnapshotError> {
        if bytes.is_empty() {
            return Err(SnapshotError::Missing);
        }
        let b: &[u8; SNAPSHOT_LEN] = bytes
            .try_into()
            .map_err(|_| SnapshotError::Length(bytes.len()))?;
        if b[0..4] != MAGIC {
            return Err(SnapshotError::Magic);
        }
        if b[4] != VERSION {
            return Err(SnapshotError::Version(b[4]));
        }
        if u32_at(b, SUMMED).unwrap_or_default() != fnv1a(&b[..SUMMED]) {
            return Err(SnapshotError::Checksum);
        }
        let snap = PressureSnapshot {
            flags: b[5],
            driving: u16_at(b, 6).unwrap_or_default(),
            endpoints: u16_at(b, 8).unwrap_or_default(),
            worst: u16_at(b, 10).unwrap_or_default(),
            ratio: f64_at(b, 16).unwrap_or_default(),
            ceiling_ratio: f64_at(b, 24).unwrap_or_default(),
            p_sheddable: f64_at(b, 32).unwrap_or_default(),
            severity: f64_at(b, 56).unwrap_or_default(),
            sample_ms: u64_at(b, 64).unwrap_or_default(),
            computed_ms: u64_at(b, 72).unwrap_or_default(),
            max_in_flight: u32_at(b, 80).unwrap_or_default(),
            bytes_per_request: u32_at(b, 84).unwrap_or_default(),
        };
        snap.check()?;
        Ok(snap)
    }

    pub(super) fn check(&self) -> Result<(), SnapshotError> {
        let prob = |v: f64| (0.0..=1.0).contains(&v);
        let ratio = |v: f64| v.is_finite() && v >= 0.0;
        if self.flags & !KNOWN_FLAGS != 0 {
            return Err(SnapshotError::Invalid("unknown flags"));
        }
        if !ratio(self.ratio) || !ratio(self.ceiling_ratio) {
            return Err(SnapshotError::Invalid("ratio out of range"));
        }
        if !prob(self.p_sheddable) || !prob(self.severity) {
            return Err(SnapshotError::Invalid("probability out of [0, 1]"));
        }
        if self.max_in_flight != 0 && !(MIN_CEILING..=MAX_CEILING).contains(&self.max_in_flight) {
            return Err(SnapshotError::Invalid("in-flight ceiling out of range"));
        }
        if self.driving > self.endpoints {
            return Err(SnapshotError::Invalid(
                "more driving endpoints than endpoints",
            ));
        }
        if !self.is_active() && self.p_sheddable > 0.0 {
            return Err(SnapshotError::Invalid("inactive snapshot that sheds"));
        }
        Ok(())
    }

    /// `self` if it was computed within `max_age_ms` of `now_ms`.
    pub fn check_current(
        self,
        now_ms: u64,
        max_age_ms: u64,
    ) -> Result<PressureSnapshot, SnapshotError> {
        if self.computed_ms > now_ms {
            let ahead_ms = self.computed_ms - now_ms;
            if ahead_ms > max_age_ms {
                return Err(SnapshotError::FromTheFuture { ahead_ms });
            }
            return Ok(self);
        }
        let age_ms = now_ms - self.computed_ms;
        if age_ms > max_age_ms {
            return Err(SnapshotError::Expired { age_ms });
        }
        Ok(self)
    }
}

/// A count for a snapshot's u16 field, saturated.
pub(super) fn clamp_u16(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

/// Publishes `snap` under [`SNAPSHOT_KEY`], unless the stored one is newer (another
/// poller got there first) by no more than `max_age_ms`. A newer one beyond that
/// (clock stepped back) or an unreadable one is overwritten. `Ok(true)` if written.
pub fn publish<S: SharedStore + ?Sized>(
    store: &S,
    snap: &PressureSnapshot,
    max_age_ms: u64,
    max_attempts: u32,
) -> Result<bool, UpdateError> {
    let written = update(store, SNAPSHOT_KEY, max_attempts, |current| {
        if let Some(existing) = current.and_then(|b| PressureSnapshot::decode(b).ok()) {
            let ahead = existing.computed_ms.saturating_sub(snap.computed_ms);
            if ahead > 0 && ahead <= max_age_ms {
                return None;
            }
        }
        Some((snap.encode().to_vec(), ()))
    })?;
    Ok(written.is_some())
}

/// Reads the published snapshot. On `Err` the caller uses
/// [`PressureSnapshot::default`] (no pressure) and may log the error once.
pub fn load<S: SharedStore + ?Sized>(
    store: &S,
    now_ms: u64,
    max_age_ms: u64,
) -> Result<PressureSnapshot, SnapshotError> {
    let (bytes, _cas) = store.get(SNAPSHOT_KEY).ok_or(SnapshotError::Missing)?;
    PressureSnapshot::decode(&bytes)?.check_current(now_ms, max_age_ms)
}
