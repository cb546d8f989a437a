//! Filter metrics, defined once per VM and shown in Envoy's `/stats` and
//! `/stats/prometheus` (dots become underscores: `sessionguard_requests_write`).
//!
//! The core keeps cumulative counts per VM; each tick exports what grew since the
//! last tick, so the request path makes no metric hostcalls. Gauges describe the
//! whole Envoy (they come from shared data), so every VM writes the same values.

use crate::classify::Class;
use crate::reply::ShedReason;

use super::abi::{self, MetricKind};

/// A counter fed with cumulative totals; it forwards the growth.
#[derive(Clone, Default)]
pub struct Counter {
    id: Option<u32>,
    exported: u64,
}

impl Counter {
    fn define(name: &str) -> Self {
        Self {
            // Metrics must never be why a request fails: a refused definition is a no-op.
            id: abi::define_metric(MetricKind::Counter, name).ok(),
            exported: 0,
        }
    }

    /// Exports `total - previously exported`; totals that went backwards (a reset
    /// core) restart the baseline instead of producing a negative increment.
    pub fn export(&mut self, total: u64) {
        if total < self.exported {
            self.exported = total;
            return;
        }
        let delta = total - self.exported;
        if let (Some(id), Ok(delta)) = (self.id, i64::try_from(delta)) {
            if delta > 0 && abi::increment_metric(id, delta).is_ok() {
                self.exported = total;
            }
        }
    }
}

/// A gauge; a value equal to the one this VM wrote last is not written again (every
/// VM writes the same value read from shared data, so the stat still follows it
/// within a tick, and the tick makes fewer hostcalls).
#[derive(Clone, Default)]
pub struct Gauge {
    id: Option<u32>,
    written: Option<u64>,
}

impl Gauge {
    fn define(name: &str) -> Self {
        Self {
            id: abi::define_metric(MetricKind::Gauge, name).ok(),
            written: None,
        }
    }

    pub fn set(&mut self, value: u64) {
        if self.written == Some(value) {
            return;
        }
        if let Some(id) = self.id {
            if abi::record_metric(id, value).is_ok() {
                self.written = Some(value);
            }
        }
    }

    /// Floats are exported scaled to integers (e.g. ms as µs); NaN and negatives as 0.
    pub fn set_scaled(&mut self, value: f64, scale: f64) {
        let v = value * scale;
        self.set(if v.is_finite() && v > 0.0 {
            v as u64
        } else {
            0
        });
    }
}

fn counters<const N: usize>(names: [&str; N], prefix: &str) -> [Counter; N] {
    names.map(|n| Counter::define(&format!("{prefix}.{n}")))
}

/// Every metric the filter exports; the README lists them with their meaning.
#[derive(Clone)]
pub struct Metrics {
    pub requests: [Counter; Class::ALL.len()],
    /// `sessionguard.shed.<reason>.<critical|sheddable>`
    pub shed: [[Counter; 2]; ShedReason::ALL.len()],
    /// `sessionguard.shadow.<reason>`: what shadow mode would have shed.
    pub would_shed: [Counter; ShedReason::ALL.len()],
    pub cache_hits: Counter,
    pub cache_would_hit: Counter,
    pub cache_misses: Counter,
    pub cache_inserts: Counter,
    pub cache_invalidations: Counter,
    pub cache_evictions: Counter,
    pub cache_coalesced: Counter,
    pub cache_stale_fills: Counter,
    pub cas_giveups: Counter,
    pub memory_scrape_failures: Counter,
    pub in_flight: Gauge,
    pub limit: Gauge,
    pub critical_reserve: Gauge,
    pub min_rtt_us: Gauge,
    pub sample_rtt_us: Gauge,
    pub rejection_permille: Gauge,
    pub memory_ratio_permille: Gauge,
    pub memory_sample_age_ms: Gauge,
    pub memory_ceiling: Gauge,
    pub memory_bytes_per_request: Gauge,
    pub cache_occupancy: Gauge,
}

impl Metrics {
    pub fn define() -> Self {
        let p = "sessionguard";
        Self {
            requests: counters(Class::ALL.map(Class::name), &format!("{p}.requests")),
            shed: ShedReason::ALL
                .map(|r| counters(["critical", "sheddable"], &format!("{p}.shed.{}", r.name()))),
            would_shed: counters(
                ShedReason::ALL.map(ShedReason::name),
                &format!("{p}.shadow"),
            ),
            cache_hits: Counter::define(&format!("{p}.negcache.hits")),
            cache_would_hit: Counter::define(&format!("{p}.negcache.shadow_hits")),
            cache_misses: Counter::define(&format!("{p}.negcache.misses")),
            cache_inserts: Counter::define(&format!("{p}.negcache.inserts")),
            cache_invalidations: Counter::define(&format!("{p}.negcache.invalidations")),
            cache_evictions: Counter::define(&format!("{p}.negcache.evictions")),
            cache_coalesced: Counter::define(&format!("{p}.negcache.coalesced")),
            cache_stale_fills: Counter::define(&format!("{p}.negcache.stale_fills")),
            cas_giveups: Counter::define(&format!("{p}.cas_giveups")),
            memory_scrape_failures: Counter::define(&format!("{p}.memory.scrape_failures")),
            in_flight: Gauge::define(&format!("{p}.in_flight")),
            limit: Gauge::define(&format!("{p}.limit")),
            critical_reserve: Gauge::define(&format!("{p}.critical_reserve")),
            min_rtt_us: Gauge::define(&format!("{p}.min_rtt_us")),
            sample_rtt_us: Gauge::define(&format!("{p}.sample_rtt_us")),
            rejection_permille: Gauge::define(&format!("{p}.admission.rejection_permille")),
            memory_ratio_permille: Gauge::define(&format!("{p}.memory.ratio_permille")),
            memory_sample_age_ms: Gauge::define(&format!("{p}.memory.sample_age_ms")),
            memory_ceiling: Gauge::define(&format!("{p}.memory.ceiling")),
            memory_bytes_per_request: Gauge::define(&format!("{p}.memory.bytes_per_request")),
            cache_occupancy: Gauge::define(&format!("{p}.negcache.occupancy")),
        }
    }
}
