//! Filter metrics, defined once per VM and shown in Envoy's `/stats` and
//! `/stats/prometheus` (dots become underscores: `sessionguard_requests_write`).

use crate::classify::Class;

use super::abi::{self, MetricKind};

/// A counter that silently does nothing if the host refused to define it:
/// metrics must never be the reason a request fails.
#[derive(Clone, Copy, Default)]
pub struct Counter(Option<u32>);

impl Counter {
    fn define(name: &str) -> Self {
        Self(abi::define_metric(MetricKind::Counter, name).ok())
    }

    pub fn add(self, n: u64) {
        if let (Some(id), Ok(n)) = (self.0, i64::try_from(n)) {
            if n > 0 {
                let _ = abi::increment_metric(id, n);
            }
        }
    }

    pub fn inc(self) {
        self.add(1);
    }
}

#[derive(Clone, Copy, Default)]
pub struct Gauge(Option<u32>);

impl Gauge {
    fn define(name: &str) -> Self {
        Self(abi::define_metric(MetricKind::Gauge, name).ok())
    }

    pub fn set(self, value: u64) {
        if let Some(id) = self.0 {
            let _ = abi::record_metric(id, value);
        }
    }
}

/// Every metric the filter exports; see the README for meanings.
#[derive(Clone, Default)]
pub struct Metrics {
    pub requests: [Counter; Class::ALL.len()],
}

impl Metrics {
    pub fn define() -> Self {
        Self {
            requests: Class::ALL.map(|c| Counter::define(&format!("sessionguard.requests.{}", c.name()))),
        }
    }
}
