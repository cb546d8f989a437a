//! Per-VM root context: configuration, periodic work, metrics export, memory polling.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use crate::config::Config;
use crate::limiter::read_in_flight;
use crate::pressure::{self, FailureReason, PressureTracker};

use super::abi::{self, Buffer, Headers, Level};
use super::http::{wake, Http};
use super::metrics::Metrics;
use super::store::HostStore;
use super::worker::Worker;

/// Largest plugin configuration accepted; anything bigger is a mistake.
const MAX_CONFIG_BYTES: usize = 1 << 20;
/// Largest metrics body read from the store.
const MAX_METRICS_BYTES: usize = 4 << 20;
/// Tick period: bounds how late a paused waiter is released and how stale
/// per-VM caches of shared state (limit, rejection probability, pressure) get.
const TICK_MS: u32 = 100;
/// Leadership lease: several ticks, so one late tick does not hand it over.
const LEASE_MS: u64 = 1000;

pub struct Root {
    id: u32,
    worker: Option<Rc<RefCell<Worker>>>,
    tracker: Option<PressureTracker>,
    /// Metrics calls in flight: token -> (endpoint index, global in-flight count
    /// when the call was sent).
    polls: HashMap<u32, (usize, u32)>,
    next_poll_ms: u64,
}

impl Root {
    pub fn new(id: u32) -> Self {
        Self {
            id,
            worker: None,
            tracker: None,
            polls: HashMap::new(),
            next_poll_ms: 0,
        }
    }

    fn poll_memory(&mut self, w: &Worker, now_ms: u64) {
        let cfg = &w.vm.config.memory;
        if now_ms < self.next_poll_ms || !self.polls.is_empty() {
            return;
        }
        let Some(tracker) = self.tracker.as_mut() else {
            return;
        };
        self.next_poll_ms = now_ms + tracker.next_poll_in_ms(now_ms);
        let in_flight = global_in_flight();
        let timeout = u32::try_from(cfg.timeout_ms).unwrap_or(u32::MAX);
        for (i, ep) in cfg.endpoints.iter().enumerate() {
            let headers = vec![
                (":method", "GET"),
                (":path", ep.path.as_str()),
                (":authority", ep.authority.as_str()),
                ("accept", "text/plain"),
            ];
            match abi::http_call(&ep.cluster, headers, timeout) {
                Ok(token) => {
                    self.polls.insert(token, (i, in_flight));
                }
                Err(status) => {
                    tracker.on_failure(i, FailureReason::CallFailed, now_ms);
                    abi::log(
                        Level::Warn,
                        &format!(
                            "memory: cannot call cluster `{}` (host status {}); is it defined in Envoy's config?",
                            ep.cluster, status.0
                        ),
                    );
                }
            }
        }
    }

    /// Publishes the tracker's view for every worker and logs state changes once.
    fn publish_pressure(&mut self, w: &mut Worker, now_ms: u64) {
        let Some(tracker) = self.tracker.as_mut() else {
            return;
        };
        let snap = tracker.snapshot(now_ms);
        let cfg = &w.vm.config;
        let _ = pressure::publish(
            &HostStore,
            &snap,
            cfg.memory.max_sample_age_ms,
            cfg.cas_attempts,
        );
        for t in tracker.take_transitions(now_ms) {
            abi::log(Level::Warn, &format!("memory: {t}"));
        }
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let Some((endpoint, sent_in_flight)) = self.polls.remove(&token) else {
            return;
        };
        let Some(worker) = self.worker.clone() else {
            return;
        };
        let mut w = worker.borrow_mut();
        let now_ms = abi::now_ns() / 1_000_000;
        let Some(tracker) = self.tracker.as_mut() else {
            return;
        };
        let status = abi::header(Headers::CallResponse, ":status")
            .ok()
            .flatten()
            .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<u16>().ok());
        match (headers, status) {
            // Zero headers: the call failed (reset, no upstream).
            (0, _) | (_, None) => tracker.on_failure(endpoint, FailureReason::CallFailed, now_ms),
            (_, Some(200)) => {
                let body = abi::buffer(Buffer::CallResponseBody, body_size.min(MAX_METRICS_BYTES))
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                // The store measured its memory between the two readings; the smaller
                // keeps the ceiling on the safe side while the count rises.
                let in_flight = sent_in_flight.min(global_in_flight());
                // A bad body is recorded by the tracker as a failed poll.
                let _ = tracker.on_sample(endpoint, &body, in_flight, now_ms);
            }
            // Envoy answers a call that timed out with its own 504.
            (_, Some(504)) => tracker.on_failure(endpoint, FailureReason::Timeout, now_ms),
            (_, Some(code)) => {
                tracker.on_failure(endpoint, FailureReason::HttpStatus(code), now_ms)
            }
        }
        self.publish_pressure(&mut w, now_ms);
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = match abi::buffer(Buffer::PluginConfiguration, MAX_CONFIG_BYTES) {
            Ok(bytes) => bytes.unwrap_or_default(),
            Err(status) => {
                abi::log(
                    Level::Error,
                    &format!(
                        "cannot read plugin configuration (host status {})",
                        status.0
                    ),
                );
                return false;
            }
        };
        let config = match Config::parse(&bytes) {
            Ok(config) => Rc::new(config),
            Err(err) => {
                abi::log(Level::Error, &err.to_string());
                return false;
            }
        };
        self.tracker = config
            .memory
            .is_on()
            .then(|| PressureTracker::new(&config.memory));
        match &self.worker {
            Some(worker) => worker.borrow_mut().reconfigure(config),
            None => {
                self.worker = Some(Rc::new(RefCell::new(Worker::new(
                    config,
                    Metrics::define(),
                ))));
            }
        }
        if abi::set_tick_period_ms(TICK_MS).is_err() {
            abi::log(
                Level::Error,
                "cannot set the tick period; periodic work is off",
            );
            return false;
        }
        abi::log(Level::Info, "configuration accepted");
        true
    }

    fn on_tick(&mut self) {
        let Some(worker) = self.worker.clone() else {
            return;
        };
        let mut w = worker.borrow_mut();
        let now_ns = abi::now_ns();
        w.clock.tick(now_ns);
        let now_ms = now_ns / 1_000_000;
        let store = HostStore;
        let vm_id = w.vm_id;
        let leader = w.election.tick(&store, vm_id, now_ms, LEASE_MS);
        w.vm.limiter.tick(&store, now_ms, leader);
        w.vm.admission.tick(&store, now_ms);

        let expired = w.vm.flights.expire(now_ms);
        wake(&mut w, &expired, false, self.id);

        if w.vm.config.memory.is_on() {
            if leader {
                self.poll_memory(&w, now_ms);
                self.publish_pressure(&mut w, now_ms);
            }
            let max_age = w.vm.config.memory.max_sample_age_ms;
            let loaded = pressure::load(&store, now_ms, max_age).ok();
            w.adopt_pressure(loaded);
        } else {
            // Memory shedding off (or just turned off): no curve, no ceiling.
            w.adopt_pressure(None);
        }
        if leader {
            w.scan_occupancy(&store, now_ms);
        }
        w.check_seed(&store);
        w.export_metrics(now_ms, self.tracker.as_ref());
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Envoy configures a plugin before it sends traffic; should that ever not hold,
        // the request still gets a working (default) filter rather than a VM abort.
        let worker = self.worker.clone().unwrap_or_else(|| {
            Rc::new(RefCell::new(Worker::new(
                Rc::new(Config::default()),
                Metrics::define(),
            )))
        });
        Some(Box::new(Http::new(context_id, worker)))
    }
}

/// Requests in flight to the store across all workers, as the limiter's shared table
/// shows them now (one shared-data read); 0 when nothing is counted yet.
fn global_in_flight() -> u32 {
    read_in_flight(&HostStore).map_or(0, |n| n.total())
}
