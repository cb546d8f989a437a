//! The elected poller's side: polls every endpoint and builds the snapshot.

use super::config::{
    MemoryConfig, FALL_SMOOTHING, IDLE_POLL_FACTOR, IDLE_POLL_MAX_MS, MAX_ENDPOINTS, RISING_SHARE,
    START_TIME_GAUGE,
};
use super::curve::Curve;
use super::endpoint::{
    Endpoint, EndpointStats, FailureReason, Reading, SampleError, StatusKind, Transition,
};
use super::replica::{global_ceiling, unaccounted, GOROUTINES_GAUGE};
use super::snapshot::{clamp_u16, PressureSnapshot, FLAG_ACTIVE, FLAG_CEILING, FLAG_FALLBACK};
use crate::ceiling::Estimator;
use crate::classify::Criticality;
use crate::prom::{find_many, PromError, Selector};
use crate::wire::f64_to_u32;

/// Per-endpoint memory state on the polling worker; see the module docs.
#[derive(Debug, Clone)]
pub struct PressureTracker {
    pub(super) curve: Curve,
    /// Bytes; infinite when unset, so that every ratio is 0.
    pub(super) limit: f64,
    pub(super) max_age_ms: u64,
    /// `selectors[0]` is the ceiling, then `demands` demand gauges, then `retained`
    /// retained gauges (0 or 2), then the store's start time and goroutine count.
    pub(super) selectors: Vec<Selector>,
    pub(super) demands: usize,
    pub(super) retained: usize,
    /// Memory (bytes) the in-flight ceiling keeps the store under: `critical` x limit.
    pub(super) line: f64,
    /// Poll intervals while memory is high or rising, and otherwise.
    pub(super) fast_poll_ms: u64,
    pub(super) idle_poll_ms: u64,
    pub(super) scratch: Vec<Result<f64, PromError>>,
    /// The operator's `bytes_per_request`, for estimators started over.
    pub(super) fixed_cost: Option<u64>,
    pub(super) endpoints: Vec<Endpoint>,
    pub(super) last: PressureSnapshot,
}

impl PressureTracker {
    /// A tracker for a validated configuration. A gauge that does not parse as a
    /// selector (only possible without validation) is looked up verbatim and so
    /// reports "not found" on every poll instead of panicking.
    pub fn new(cfg: &MemoryConfig) -> PressureTracker {
        let parse =
            |text: &String| Selector::parse(text).unwrap_or_else(|_| Selector::name_only(text));
        let mut selectors = Vec::with_capacity(1 + cfg.demand_gauges.len());
        selectors.push(parse(&cfg.gauge));
        selectors.extend(cfg.demand_gauges.iter().map(parse));
        selectors.extend(cfg.retained_gauges.iter().map(parse));
        selectors.push(Selector::name_only(START_TIME_GAUGE));
        selectors.push(Selector::name_only(GOROUTINES_GAUGE));
        let n = cfg.endpoints.len().min(MAX_ENDPOINTS);
        let limit = if cfg.memory_limit_bytes == 0 {
            f64::INFINITY
        } else {
            cfg.memory_limit_bytes as f64
        };
        let fast_poll_ms = cfg.poll_interval_ms.max(1);
        PressureTracker {
            curve: Curve::from_config(cfg),
            limit,
            line: limit * cfg.critical.clamp(0.0, 1.0),
            fast_poll_ms,
            idle_poll_ms: (fast_poll_ms * IDLE_POLL_FACTOR)
                .min(IDLE_POLL_MAX_MS)
                .min(cfg.max_sample_age_ms / 2)
                .max(fast_poll_ms),
            max_age_ms: cfg.max_sample_age_ms,
            scratch: Vec::with_capacity(selectors.len()),
            fixed_cost: cfg.bytes_per_request,
            demands: cfg.demand_gauges.len(),
            retained: cfg.retained_gauges.len(),
            selectors,
            endpoints: vec![Endpoint::new(cfg.bytes_per_request); n],
            last: PressureSnapshot::idle(0, n),
        }
    }

    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }

    /// Feeds the body of a 200 response from endpoint `endpoint`, with the filter's
    /// global in-flight count at the time (the smaller of its values when the poll was
    /// sent and when it was answered; see [`crate::ceiling`]).
    ///
    /// On a body that does not give the gauges, the poll is recorded as failed
    /// ([`FailureReason::Metrics`]) and the error returned for the log. Demand gauges
    /// missing from a complete body switch the endpoint to the ceiling alone; missing
    /// from a truncated body, the poll fails (the missing part cannot be trusted).
    pub fn on_sample(
        &mut self,
        endpoint: usize,
        body: &[u8],
        in_flight: u32,
        now_ms: u64,
    ) -> Result<Reading, SampleError> {
        if endpoint >= self.endpoints.len() {
            return Err(SampleError::UnknownEndpoint(endpoint));
        }
        find_many(body, &self.selectors, &mut self.scratch);
        let values = match self.read_values() {
            Ok(values) => values,
            Err(e) => {
                self.on_failure(endpoint, FailureReason::Metrics(e.clone()), now_ms);
                return Err(SampleError::Metrics(e));
            }
        };
        let Values {
            ceiling: ceiling_bytes,
            demand: demand_bytes,
            start_time,
            goroutines,
        } = values;
        let ceiling_ratio = ratio(ceiling_bytes, self.limit);
        let demand_ratio = demand_bytes.map(|d| ratio(d, self.limit));
        let fallback = demand_ratio.is_none();

        let max_age = self.max_age_ms;
        let s = FALL_SMOOTHING;
        let (soft, critical) = (self.curve.soft, self.curve.critical);
        let (line, limit) = (self.line, self.limit);
        let (replicas, fixed_cost) = (self.endpoints.len(), self.fixed_cost);
        // With one endpoint, every request reaches it: the replica path is for several.
        let goroutines = goroutines.filter(|_| replicas > 1);
        let others_held = self.held_by_others(endpoint, now_ms);
        let Some(ep) = self.endpoints.get_mut(endpoint) else {
            return Err(SampleError::UnknownEndpoint(endpoint));
        };
        // Smooth only a continuous series; after a gap (or a change of mode) start over.
        let continuous = ep.derive(now_ms, max_age).drives() && ep.fallback == fallback;
        let fall = |prev: f64, x: f64| {
            if continuous && x < prev {
                s * prev + (1.0 - s) * x
            } else {
                x
            }
        };
        ep.demand = fall(ep.demand, demand_ratio.unwrap_or(ceiling_ratio));
        ep.ceiling = fall(ep.ceiling, ceiling_ratio);
        ep.fallback = fallback;
        ep.last_ok_ms = Some(now_ms);
        ep.failure = None;
        ep.samples = ep.samples.saturating_add(1);
        ep.consecutive_failures = 0;
        ep.kind = ep.derive(now_ms, max_age);
        // The ceiling decides on what the store will need: its demand (resident
        // memory less what it can reuse), raw, not smoothed.
        let memory = demand_bytes.unwrap_or(ceiling_bytes);
        if ep.estimator.restarted_by(start_time) {
            ep.replica.reset();
        }
        let held = goroutines.and_then(|g| ep.replica.observe(g));
        if held.is_some() != ep.by_replica {
            // The estimate's unit changes (requests of this replica, or of the filter):
            // start it over.
            ep.by_replica = held.is_some();
            ep.estimator = Estimator::new(fixed_cost);
        }
        let (max_in_flight, share) = match held {
            // Learned against the replica's own count; the global ceiling from its share.
            Some(held) => {
                ep.estimator.observe(held, memory, start_time);
                let own = ep.estimator.ceiling(held, memory, line);
                let pending = held.saturating_add(unaccounted(in_flight, [others_held, held]));
                let share = ep.replica.learn_share(pending, in_flight, replicas);
                (global_ceiling(in_flight, own, pending, share), share)
            }
            // One endpoint, or no count: learned against the filter's count, as if every
            // request may land here.
            None => {
                ep.replica.reset();
                ep.estimator.observe(in_flight, memory, start_time);
                (ep.estimator.ceiling(in_flight, memory, line), 1.0)
            }
        };
        ep.max_in_flight = Some(max_in_flight);
        ep.rising = continuous && memory - ep.last_demand > RISING_SHARE * limit;
        ep.last_demand = memory;
        ep.last_in_flight = in_flight;
        Ok(Reading {
            ceiling_bytes,
            demand_bytes,
            ceiling_ratio,
            demand_ratio,
            decision_ratio: ep.decision(soft, critical),
            max_in_flight,
            bytes_per_request: ep.estimator.per_request(),
            share,
        })
    }

    /// The requests held by the other endpoints that show their count and still
    /// drive (a count from an old sample says nothing about now).
    fn held_by_others(&self, endpoint: usize, now_ms: u64) -> u32 {
        let max_age = self.max_age_ms;
        self.endpoints
            .iter()
            .enumerate()
            .filter(|&(j, ep)| j != endpoint && ep.derive(now_ms, max_age).drives())
            .filter_map(|(_, ep)| ep.replica.held())
            .fold(0, u32::saturating_add)
    }

    /// The gauges of one body from `scratch`, or why the poll must count as failed.
    /// Demand is the ceiling minus retained-but-free memory when the retained pair is
    /// in the body, else the sum of the demand gauges, else `None`. The start time and
    /// the goroutine count are optional.
    pub(super) fn read_values(&self) -> Result<Values, PromError> {
        let mut results = self.scratch.iter().zip(&self.selectors);
        let Some((ceiling, sel)) = results.next() else {
            return Err(PromError::NotFound {
                metric: String::new(),
            });
        };
        let ceiling = usable(ceiling, sel)?;
        let demand_part: Vec<_> = results.by_ref().take(self.demands).collect();
        let retained_part: Vec<_> = results.by_ref().take(self.retained).collect();
        let mut optional = || {
            results
                .next()
                .and_then(|(result, sel)| usable(result, sel).ok())
        };
        let start_time = optional();
        let goroutines = optional();
        let values = |demand| Values {
            ceiling,
            demand,
            start_time,
            goroutines,
        };
        if let [(held, held_sel), (released, released_sel)] = retained_part[..] {
            if let (Ok(held), Ok(released)) =
                (usable(held, held_sel), usable(released, released_sel))
            {
                let retained = (held - released).max(0.0);
                return Ok(values(Some((ceiling - retained).max(0.0))));
            }
        }
        let mut demand = 0.0;
        let mut any = false;
        for (result, sel) in demand_part {
            match result {
                Err(PromError::NotFound { .. }) => return Ok(values(None)),
                other => {
                    demand += usable(other, sel)?;
                    any = true;
                }
            }
        }
        Ok(values(any.then_some(demand)))
    }

    /// When to poll next, from now: every `poll_interval_ms` while some endpoint is
    /// busy (its demand above `soft` x limit or rising by more than a hundredth of
    /// the limit since its previous sample, or its in-flight count at half its
    /// ceiling), or when one has no young sample; ten times slower otherwise (at
    /// most 1 s and half of `max_sample_age_ms`). The ceiling stops a step surge
    /// between polls whatever the interval; faster polls re-anchor it sooner.
    pub fn next_poll_in_ms(&self, now_ms: u64) -> u64 {
        let soft = self.curve.soft * self.limit;
        let busy = self.endpoints.iter().any(|ep| {
            let young = ep
                .age(now_ms)
                .is_some_and(|age| age <= self.idle_poll_ms.saturating_mul(2));
            let near_ceiling = ep
                .max_in_flight
                .is_some_and(|c| ep.last_in_flight.saturating_mul(2) >= c);
            !young || ep.failure.is_some() || ep.rising || ep.last_demand > soft || near_ceiling
        });
        if busy {
            self.fast_poll_ms
        } else {
            self.idle_poll_ms
        }
    }

    /// Records a failed poll of `endpoint` (ignored for an unknown index).
    pub fn on_failure(&mut self, endpoint: usize, reason: FailureReason, now_ms: u64) {
        let max_age = self.max_age_ms;
        let Some(ep) = self.endpoints.get_mut(endpoint) else {
            return;
        };
        // A sample that had expired before this failure counts as an expiry.
        let before = ep.derive(now_ms, max_age);
        if ep.kind.drives() && !before.drives() {
            ep.expirations = ep.expirations.saturating_add(1);
        }
        ep.failure = Some(reason);
        ep.failures = ep.failures.saturating_add(1);
        ep.consecutive_failures = ep.consecutive_failures.saturating_add(1);
        ep.kind = ep.derive(now_ms, max_age);
    }

    /// Moves endpoints whose sample has grown too old out of the decision.
    pub(super) fn refresh(&mut self, now_ms: u64) {
        let max_age = self.max_age_ms;
        for ep in &mut self.endpoints {
            let kind = ep.derive(now_ms, max_age);
            if kind != ep.kind {
                if ep.kind.drives() && !kind.drives() {
                    ep.expirations = ep.expirations.saturating_add(1);
                }
                ep.kind = kind;
            }
        }
    }

    /// The decision now, from the worst endpoint still driving; publish it.
    pub fn snapshot(&mut self, now_ms: u64) -> PressureSnapshot {
        self.refresh(now_ms);
        let (soft, critical) = (self.curve.soft, self.curve.critical);
        let mut worst: Option<(usize, f64)> = None;
        let mut driving = 0usize;
        let mut max_ceiling = 0.0f64;
        for (i, ep) in self.endpoints.iter().enumerate() {
            if !ep.kind.drives() {
                continue;
            }
            driving += 1;
            max_ceiling = max_ceiling.max(ep.ceiling);
            let r = ep.decision(soft, critical);
            if worst.is_none_or(|(_, w)| r > w) {
                worst = Some((i, r));
            }
        }
        let worst = worst.and_then(|(i, r)| Some((i, r, self.endpoints.get(i)?)));
        let snap = match worst {
            None => PressureSnapshot::idle(now_ms, self.endpoints.len()),
            Some((i, r, ep)) => {
                let mut flags = FLAG_ACTIVE;
                if ep.ceiling >= critical && ep.demand >= soft && ep.ceiling > ep.demand {
                    flags |= FLAG_CEILING;
                }
                if ep.fallback {
                    flags |= FLAG_FALLBACK;
                }
                PressureSnapshot {
                    flags,
                    driving: clamp_u16(driving),
                    endpoints: clamp_u16(self.endpoints.len()),
                    worst: clamp_u16(i),
                    ratio: r,
                    ceiling_ratio: max_ceiling,
                    p_sheddable: self.curve.sheddable(r),
                    severity: self.curve.severity(r),
                    sample_ms: ep.last_ok_ms.unwrap_or(0),
                    computed_ms: now_ms,
                    max_in_flight: 0,
                    bytes_per_request: 0,
                }
            }
        };
        let snap = self.with_ceiling(snap);
        self.last = snap;
        snap
    }

    /// `snap` with the in-flight ceiling: the smallest of the endpoints' ceilings.
    /// The filter cannot tell which replica a request will reach (Envoy's load
    /// balancer picks it after the filter has admitted the request), and counts its
    /// in-flight requests in one number: so every replica's ceiling is a bound on
    /// that number and all must hold. A replica that shows its own count bounds it
    /// at its share of the requests (`replica.rs`); one that does not, as if every
    /// request may land on it (docs/memory.md).
    pub(super) fn with_ceiling(&self, mut snap: PressureSnapshot) -> PressureSnapshot {
        let tightest = self
            .endpoints
            .iter()
            .map(|ep| (ep.in_flight_ceiling(self.line), ep.estimator.per_request()))
            .min_by_key(|&(c, _)| c);
        if let Some((c, b)) = tightest {
            snap.max_in_flight = c;
            snap.bytes_per_request = f64_to_u32(b);
        }
        snap
    }

    /// The in-flight ceiling and estimates of each endpoint, for logs and tests.
    pub fn ceilings(&self) -> impl Iterator<Item = (u32, f64)> + '_ {
        self.endpoints
            .iter()
            .map(|ep| (ep.in_flight_ceiling(self.line), ep.estimator.per_request()))
    }

    /// Each endpoint whose state changed since the last call, once, for the log.
    pub fn take_transitions(&mut self, now_ms: u64) -> Vec<Transition> {
        self.refresh(now_ms);
        let mut out = Vec::new();
        for (i, ep) in self.endpoints.iter_mut().enumerate() {
            if ep.kind != ep.reported {
                out.push(Transition {
                    endpoint: i,
                    from: ep.reported,
                    to: ep.kind,
                    reason: match ep.kind {
                        StatusKind::Failing | StatusKind::Failed => ep.failure.clone(),
                        _ => None,
                    },
                    sample_age_ms: ep.age(now_ms),
                });
                ep.reported = ep.kind;
            }
        }
        out
    }

    /// State and counters of one endpoint (as of the last call that gave a time).
    pub fn endpoint_stats(&self, endpoint: usize) -> Option<EndpointStats> {
        let ep = self.endpoints.get(endpoint)?;
        Some(EndpointStats {
            status: ep.status(),
            samples: ep.samples,
            scrape_failures: ep.failures,
            consecutive_failures: ep.consecutive_failures,
            stale_transitions: ep.expirations,
            last_sample_ms: ep.last_ok_ms,
            demand_ratio: ep.demand,
            ceiling_ratio: ep.ceiling,
        })
    }

    /// Totals for metrics; ratios are those of the last [`snapshot`](Self::snapshot).
    /// Counters are monotonic for the life of this tracker: export their increments.
    pub fn stats(&self, now_ms: u64) -> PressureStats {
        let sum = |f: fn(&Endpoint) -> u64| {
            self.endpoints
                .iter()
                .fold(0u64, |acc, ep| acc.saturating_add(f(ep)))
        };
        PressureStats {
            ratio: self.last.ratio,
            ceiling_ratio: self.last.ceiling_ratio,
            sample_age_ms: self.last.sample_age_ms(now_ms),
            endpoints: self.endpoints.len(),
            driving_endpoints: usize::from(self.last.driving),
            samples: sum(|ep| ep.samples),
            scrape_failures: sum(|ep| ep.failures),
            stale_transitions: sum(|ep| ep.expirations),
        }
    }
}

/// The gauges one body gave (see [`PressureTracker::read_values`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Values {
    pub(super) ceiling: f64,
    pub(super) demand: Option<f64>,
    pub(super) start_time: Option<f64>,
    pub(super) goroutines: Option<f64>,
}

/// `bytes / limit`, 0 for an unset limit.
pub(super) fn ratio(bytes: f64, limit: f64) -> f64 {
    let r = bytes / limit;
    if r.is_finite() {
        r.max(0.0)
    } else {
        0.0
    }
}

/// A value that can be a memory size: finite and not negative.
pub(super) fn usable(result: &Result<f64, PromError>, sel: &Selector) -> Result<f64, PromError> {
    match result {
        Ok(value) if value.is_finite() && *value >= 0.0 => Ok(*value),
        Ok(value) => Err(PromError::InvalidValue {
            metric: sel.as_str().to_string(),
            value: *value,
        }),
        Err(e) => Err(e.clone()),
    }
}

/// Memory figures for metrics (see [`PressureTracker::stats`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PressureStats {
    /// The decision ratio (0 when nothing drives).
    pub ratio: f64,
    /// The highest smoothed ceiling (RSS) ratio among driving endpoints.
    pub ceiling_ratio: f64,
    /// Age of the sample behind the decision.
    pub sample_age_ms: Option<u64>,
    pub endpoints: usize,
    pub driving_endpoints: usize,
    pub samples: u64,
    pub scrape_failures: u64,
    pub stale_transitions: u64,
}

/// Shed-by-memory decisions counted by a worker (the host keeps one for enforced
/// decisions and one for shadow-mode "would have shed").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShedCounters {
    pub sheddable: u64,
    pub critical: u64,
}

impl ShedCounters {
    pub fn record(&mut self, criticality: Criticality) {
        match criticality {
            Criticality::Sheddable => self.sheddable = self.sheddable.saturating_add(1),
            Criticality::Critical => self.critical = self.critical.saturating_add(1),
        }
    }

    pub fn total(&self) -> u64 {
        self.sheddable.saturating_add(self.critical)
    }
}
