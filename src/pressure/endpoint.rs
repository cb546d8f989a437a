//! One polled endpoint's state machine: samples, failures, restarts, transitions.

use crate::ceiling;
use crate::ceiling::Estimator;
use crate::prom::PromError;

use super::replica::Replica;
use std::fmt;

/// Why a poll produced no sample.
#[derive(Debug, Clone, PartialEq)]
pub enum FailureReason {
    /// No response within `timeout_ms`.
    Timeout,
    /// The call could not be made or broke (unknown cluster, reset, zero headers).
    CallFailed,
    /// The store answered with another status than 200.
    HttpStatus(u16),
    /// The body did not give the gauges.
    Metrics(PromError),
}

impl FailureReason {
    /// Short, fixed name for metrics and tags.
    pub fn name(&self) -> &'static str {
        match self {
            FailureReason::Timeout => "timeout",
            FailureReason::CallFailed => "call_failed",
            FailureReason::HttpStatus(_) => "http_status",
            FailureReason::Metrics(_) => "metrics",
        }
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureReason::Timeout => f.write_str("the metrics call timed out"),
            FailureReason::CallFailed => f.write_str("the metrics call failed"),
            FailureReason::HttpStatus(s) => write!(f, "the metrics endpoint answered HTTP {s}"),
            FailureReason::Metrics(e) => e.fmt(f),
        }
    }
}

/// The state of one endpoint, without the failure reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusKind {
    /// No poll result yet.
    Pending,
    /// The last poll succeeded and its sample is young: drives shedding.
    Fresh,
    /// The last poll failed but the last good sample is still young: still drives.
    Failing,
    /// The last poll failed and no young sample is left: does not drive.
    Failed,
    /// The last poll succeeded long ago and nothing came since: does not drive.
    Stale,
}

impl StatusKind {
    pub fn name(self) -> &'static str {
        match self {
            StatusKind::Pending => "pending",
            StatusKind::Fresh => "fresh",
            StatusKind::Failing => "failing",
            StatusKind::Failed => "failed",
            StatusKind::Stale => "stale",
        }
    }

    /// Whether an endpoint in this state takes part in the decision.
    pub fn drives(self) -> bool {
        matches!(self, StatusKind::Fresh | StatusKind::Failing)
    }
}

impl fmt::Display for StatusKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The state of one endpoint, with the reason of the last failure.
#[derive(Debug, Clone, PartialEq)]
pub enum EndpointStatus {
    Pending,
    Fresh,
    Failing(FailureReason),
    Failed(FailureReason),
    Stale,
}

impl EndpointStatus {
    pub fn kind(&self) -> StatusKind {
        match self {
            EndpointStatus::Pending => StatusKind::Pending,
            EndpointStatus::Fresh => StatusKind::Fresh,
            EndpointStatus::Failing(_) => StatusKind::Failing,
            EndpointStatus::Failed(_) => StatusKind::Failed,
            EndpointStatus::Stale => StatusKind::Stale,
        }
    }
}

/// A change of an endpoint's state, reported once by [`PressureTracker::take_transitions`].
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub endpoint: usize,
    pub from: StatusKind,
    pub to: StatusKind,
    /// The last failure, when `to` is `Failing` or `Failed`.
    pub reason: Option<FailureReason>,
    /// Age of the last good sample, if any.
    pub sample_age_ms: Option<u64>,
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "memory metrics endpoint #{}: {} -> {}",
            self.endpoint, self.from, self.to
        )?;
        if let Some(reason) = &self.reason {
            write!(f, ": {reason}")?;
        }
        match (self.to, self.sample_age_ms) {
            (StatusKind::Failing, Some(age)) => {
                write!(f, " (still using the last good sample, {age} ms old)")
            }
            (StatusKind::Failed | StatusKind::Stale, Some(age)) => write!(
                f,
                " (last good sample {age} ms old; no longer used for shedding)"
            ),
            (StatusKind::Failed, None) => f.write_str(" (no sample yet; not used for shedding)"),
            _ => Ok(()),
        }
    }
}

/// Counters and last values of one endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointStats {
    pub status: EndpointStatus,
    /// Good samples.
    pub samples: u64,
    /// Failed polls.
    pub scrape_failures: u64,
    pub consecutive_failures: u32,
    /// Times its last good sample expired (it stopped driving because of age).
    pub stale_transitions: u64,
    pub last_sample_ms: Option<u64>,
    /// Smoothed ratios of the last good sample (demand is the ceiling in fallback).
    pub demand_ratio: f64,
    pub ceiling_ratio: f64,
}

/// What one good sample said (raw ratios are before smoothing).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub ceiling_bytes: f64,
    /// `None` when the demand gauges are not configured or not in the body.
    pub demand_bytes: Option<f64>,
    pub ceiling_ratio: f64,
    pub demand_ratio: Option<f64>,
    /// The ratio this endpoint now contributes to the decision (smoothed, ceiling rule
    /// applied).
    pub decision_ratio: f64,
    /// The in-flight ceiling this sample gives.
    pub max_in_flight: u32,
    /// This endpoint's estimate of the store's memory per request in flight (bytes).
    pub bytes_per_request: f64,
    /// The share of the filter's requests assumed to reach this endpoint (1 with one
    /// endpoint or without its goroutine count; see `replica.rs`).
    pub share: f64,
}

/// Why [`PressureTracker::on_sample`] took no sample.
#[derive(Debug, Clone, PartialEq)]
pub enum SampleError {
    /// The host passed an index outside the configured endpoints.
    UnknownEndpoint(usize),
    /// The body did not give the gauges (recorded as a failed poll).
    Metrics(PromError),
}

impl fmt::Display for SampleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SampleError::UnknownEndpoint(i) => write!(f, "no memory metrics endpoint #{i}"),
            SampleError::Metrics(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for SampleError {}

#[derive(Debug, Clone)]
pub(super) struct Endpoint {
    pub(super) last_ok_ms: Option<u64>,
    /// Set when the latest poll result is a failure.
    pub(super) failure: Option<FailureReason>,
    pub(super) demand: f64,
    pub(super) ceiling: f64,
    pub(super) fallback: bool,
    pub(super) kind: StatusKind,
    pub(super) reported: StatusKind,
    pub(super) samples: u64,
    pub(super) failures: u64,
    pub(super) consecutive_failures: u32,
    pub(super) expirations: u64,
    /// Learns this store's memory per request in flight: per request of the
    /// filter's, or per request of this replica's own (`by_replica`).
    pub(super) estimator: Estimator,
    pub(super) by_replica: bool,
    /// Its part of the filter's requests, when several endpoints are polled.
    pub(super) replica: Replica,
    /// The in-flight ceiling computed at the last good sample.
    pub(super) max_in_flight: Option<u32>,
    /// The demand (bytes) of the last good sample, and whether the one before was
    /// lower by a poll-worth of growth (see [`PressureTracker::next_poll_in_ms`]).
    pub(super) last_demand: f64,
    pub(super) rising: bool,
    pub(super) last_in_flight: u32,
}

impl Endpoint {
    pub(super) fn new(bytes_per_request: Option<u64>) -> Self {
        Endpoint {
            last_ok_ms: None,
            failure: None,
            demand: 0.0,
            ceiling: 0.0,
            fallback: false,
            kind: StatusKind::Pending,
            reported: StatusKind::Pending,
            samples: 0,
            failures: 0,
            consecutive_failures: 0,
            expirations: 0,
            estimator: Estimator::new(bytes_per_request),
            by_replica: false,
            replica: Replica::new(),
            max_in_flight: None,
            last_demand: 0.0,
            rising: false,
            last_in_flight: 0,
        }
    }

    /// This endpoint's in-flight ceiling now: the one from its last sample while that
    /// sample drives; otherwise (no young sample) the larger of that one and the
    /// headroom at rest, so that an old number never sheds forever; with no sample
    /// ever, the whole line at the estimated cost.
    pub(super) fn in_flight_ceiling(&self, line: f64) -> u32 {
        let b = self.estimator.per_request();
        let at_rest = match self.estimator.rest_memory() {
            Some(rest) => ceiling::ceiling(0, rest, line, b),
            None => ceiling::blind_ceiling(line, b),
        };
        match self.max_in_flight {
            Some(c) if self.kind.drives() => c,
            Some(c) => c.max(at_rest),
            None => at_rest,
        }
    }

    pub(super) fn age(&self, now_ms: u64) -> Option<u64> {
        self.last_ok_ms.map(|t| now_ms.saturating_sub(t))
    }

    pub(super) fn derive(&self, now_ms: u64, max_age_ms: u64) -> StatusKind {
        let young = self.age(now_ms).is_some_and(|age| age <= max_age_ms);
        match (&self.failure, self.last_ok_ms) {
            (None, None) => StatusKind::Pending,
            (None, Some(_)) if young => StatusKind::Fresh,
            (None, Some(_)) => StatusKind::Stale,
            (Some(_), _) if young => StatusKind::Failing,
            (Some(_), _) => StatusKind::Failed,
        }
    }

    pub(super) fn status(&self) -> EndpointStatus {
        match (self.kind, &self.failure) {
            (StatusKind::Pending, _) => EndpointStatus::Pending,
            (StatusKind::Fresh, _) => EndpointStatus::Fresh,
            (StatusKind::Stale, _) => EndpointStatus::Stale,
            (StatusKind::Failing, Some(r)) => EndpointStatus::Failing(r.clone()),
            (StatusKind::Failed, Some(r)) => EndpointStatus::Failed(r.clone()),
            (StatusKind::Failing | StatusKind::Failed, None) => {
                EndpointStatus::Failed(FailureReason::CallFailed)
            }
        }
    }

    /// The ratio this endpoint contributes: demand, unless the ceiling has reached
    /// `critical` while demand is itself above `soft` (retained memory after a surge
    /// must not keep shedding).
    pub(super) fn decision(&self, soft: f64, critical: f64) -> f64 {
        if self.ceiling >= critical && self.demand >= soft {
            self.demand.max(self.ceiling)
        } else {
            self.demand
        }
    }
}
