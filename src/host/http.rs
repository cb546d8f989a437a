//! Per-request context: classify, carry out the core's verdict
//! ([`crate::guard::Guard`]), and account for every ending.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use crate::classify::{classify, Class, Op};
use crate::gradient::Lane;
use crate::guard::{Flight, KeyRequest, Outstanding, Verdict};
use crate::header_pairs;
use crate::limiter::Permit;
use crate::negcache::{Lookup, WriteTicket};
use crate::outcome::{Completion, Ending};
use crate::reply::{self, Reply};

use super::abi::{self, Headers};
use super::store::HostStore;
use super::worker::{Paused, Woken, Worker};

/// What the upstream's response headers told this filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upstream {
    /// No response headers (yet).
    Silent,
    Status(u32),
    /// Response headers arrived, their status was not needed (a routine read, see
    /// `on_http_response_headers`).
    Unread,
}

/// What a request did, kept until its end.
pub struct Http {
    id: u32,
    worker: Rc<RefCell<Worker>>,
    op: Op,
    fp: Option<u64>,
    lookup: Option<Lookup>,
    /// A write or delete began invalidating its key; it must end it.
    write: Option<WriteTicket>,
    permit: Option<Permit>,
    /// When a timed request started (see `crate::clock`); 0 = not timed.
    started_ns: u64,
    /// The time at the last callback, so that `on_log` reads the clock again only
    /// when the stream ended without response headers.
    seen_ms: u64,
    rtt_ms: Option<f64>,
    upstream: Upstream,
    /// How many requests this one stands for in admission control (a timed routine
    /// read stands for the untimed ones, whose status is not read).
    weight: u32,
    /// Answered at the proxy (shed, cached 404, a leader's 404): the store was not asked.
    local: bool,
    /// The first GET of a missing key with others paused behind it.
    leader: bool,
    /// The response was handled (write ended, cache filled, waiters answered).
    responded: bool,
    /// Waiters to wake once this leader's own exchange is over, and how.
    wake_later: Option<Vec<u32>>,
    woke_cached: bool,
}

impl Http {
    pub fn new(id: u32, worker: Rc<RefCell<Worker>>) -> Self {
        Self {
            id,
            worker,
            op: Op::Other,
            fp: None,
            lookup: None,
            write: None,
            permit: None,
            started_ns: 0,
            seen_ms: 0,
            rtt_ms: None,
            upstream: Upstream::Silent,
            weight: 1,
            local: false,
            leader: false,
            responded: false,
            wake_later: None,
            woke_cached: false,
        }
    }

    fn send(&mut self, reply: &Reply, details: &str) {
        // If the host refuses, the request continues upstream: fail open.
        if send_reply(reply, details) {
            self.local = true;
        }
    }

    /// Settles the response ([`crate::guard::Guard::settle`]) once, and keeps the
    /// waiters to wake for `on_log`.
    fn on_response(&mut self, w: &mut Worker, status: Option<u32>, now_ms: u64) {
        // A local answer (shed, cached, a leader's 404) settled nothing upstream.
        if std::mem::replace(&mut self.responded, true) || self.local {
            return;
        }
        let Some(fp) = self.fp else { return };
        let req = KeyRequest {
            op: self.op,
            fp,
            id: self.id,
        };
        let outstanding = Outstanding {
            write: self.write.take(),
            lookup: self.lookup,
            leader: self.leader,
        };
        let guard = &mut w.vm.guard();
        if let Some(wake) = guard.settle(
            &HostStore,
            req,
            outstanding,
            status,
            is_store_problem,
            now_ms,
        ) {
            self.woke_cached = wake.found_missing;
            self.wake_later = Some(wake.ids);
        }
    }
}

/// A 404 from the store for a key is its `not_found` problem (application/json);
/// anything else (a proxy's own 404) is not cached.
fn is_store_problem() -> bool {
    matches!(
        abi::header(Headers::Response, "content-type"),
        Ok(Some(v)) if v == b"application/json"
    )
}

/// Sends `reply` as the current context's local reply; false if the host refused.
fn send_reply(reply: &Reply, details: &str) -> bool {
    let headers: Vec<(&str, &[u8])> = reply
        .headers
        .iter()
        .map(|(k, v)| (*k, v.as_bytes()))
        .collect();
    abi::send_local_response(reply.status, details, &headers, &reply.body).is_ok()
}

/// Answers (`found_missing`) or releases paused waiters, then returns the host's
/// attention to the context `back_to`.
pub fn wake(w: &mut Worker, ids: &[u32], found_missing: bool, back_to: u32) {
    if ids.is_empty() {
        return; // nothing switched context: no hostcall (every tick, every leader's end)
    }
    for id in ids {
        let Some(waiter) = w.waiters.remove(id) else {
            continue;
        };
        if abi::set_effective_context(*id).is_err() {
            continue;
        }
        let answered = found_missing && {
            send_reply(
                &reply::cached_not_found(&waiter.path),
                "sessionguard_coalesced",
            )
        };
        let woken = if answered {
            w.vm.tally.coalesced += 1;
            Woken::Answered
        } else {
            let _ = abi::resume_request();
            Woken::Resumed {
                at_ns: w.clock.read(abi::now_ns()),
            }
        };
        w.woken.insert(*id, woken);
    }
    let _ = abi::set_effective_context(back_to);
}

/// This request's entry of a per-VM map; almost always empty, and then no key is hashed.
fn take<V>(map: &mut HashMap<u32, V>, id: u32) -> Option<V> {
    if map.is_empty() {
        return None;
    }
    map.remove(&id)
}

/// The host clock for a timed request (recorded as the VM's last reading), that
/// last reading for the others.
fn clock_ns(w: &mut Worker, timed: bool) -> u64 {
    if timed {
        w.clock.read(abi::now_ns())
    } else {
        w.clock.last_ns()
    }
}

/// A header's value as text; absent or not UTF-8 reads as empty (classified as
/// "not a key operation", which passes untouched).
fn text(value: Option<&[u8]>) -> &str {
    std::str::from_utf8(value.unwrap_or_default()).unwrap_or("")
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        // One read of the whole map: cheaper than two of single headers (one
        // hostcall and one allocation in the VM, not two of each).
        let map = abi::header_pairs(Headers::Request)
            .ok()
            .flatten()
            .unwrap_or_default();
        let [method, raw_path] = header_pairs::find(&map, [":method", ":path"]);
        let path = text(raw_path);
        let worker = self.worker.clone();
        let mut w = worker.borrow_mut();
        let config = w.vm.config.clone();
        let request = classify(text(method), path, &config.base_uri);
        self.op = request.op;
        if self.op == Op::Other {
            // Health checks, metrics scrapes and requests the store rejects itself cost
            // it nothing: they pass untouched, so a readiness probe through this Envoy
            // is never shed exactly when the pod is busiest.
            if let Some(n) = w.vm.tally.requests.get_mut(Class::Other.index()) {
                *n += 1;
            }
            return Action::Continue;
        }
        // Only some requests are timed (`crate::clock`); the others use the VM's
        // last clock reading, under 10 ms old under load.
        let timed = w.clock.should_time();
        let now_ns = clock_ns(&mut w, timed);
        let now_ms = now_ns / 1_000_000;
        self.seen_ms = now_ms;
        let Some(key) = request.key.as_deref() else {
            return Action::Continue;
        };
        let fp = w.vm.cache.fingerprint(key);
        self.fp = Some(fp);
        let req = KeyRequest {
            op: self.op,
            fp,
            id: self.id,
        };
        match w.vm.guard().decide(&HostStore, req, now_ms) {
            Verdict::CachedMissing => {
                self.send(
                    &reply::cached_not_found(path),
                    "sessionguard_negative_cache",
                );
                if self.local {
                    return Action::Pause;
                }
            }
            Verdict::Shed {
                reason,
                retry_after_secs,
                ..
            } => {
                self.send(
                    &reply::overloaded(reason, path, retry_after_secs),
                    "sessionguard_shed",
                );
                if self.local {
                    return Action::Pause;
                }
            }
            Verdict::Forward(fwd) => {
                self.permit = fwd.permit;
                self.lookup = fwd.lookup;
                self.write = fwd.write;
                match fwd.flight {
                    Flight::Leader => self.leader = true,
                    Flight::Wait => {
                        w.waiters.insert(
                            self.id,
                            Paused {
                                fp,
                                path: path.to_string(),
                            },
                        );
                        return Action::Pause;
                    }
                    Flight::None => {}
                }
            }
        }
        if timed {
            self.started_ns = now_ns;
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        if self.op == Op::Other {
            return Action::Continue;
        }
        let worker = self.worker.clone();
        let mut w = worker.borrow_mut();
        match take(&mut w.woken, self.id) {
            // This request was paused behind a leader and has been woken.
            Some(Woken::Answered) => self.local = true,
            Some(Woken::Resumed { at_ns }) => self.started_ns = at_ns,
            None => {}
        }
        if self.local {
            return Action::Continue;
        }
        // Timed requests (started_ns set) read the clock for their RTT.
        let now_ns = clock_ns(&mut w, self.started_ns > 0);
        let now_ms = now_ns / 1_000_000;
        self.seen_ms = now_ms;
        // A routine read (a key known to exist, its mark fresh, nobody waiting on it)
        // needs its status only when timed: for the RTT and, standing for the
        // untimed ones, for admission control. A 404 to an untimed one (the key
        // deleted behind the filter's back) is seen by the next timed read or once
        // the mark needs refreshing; until then that key is forwarded, not cached.
        let routine = self.op == Op::Read
            && !self.leader
            && self
                .lookup
                .is_some_and(|l| w.vm.cache.exists_is_fresh(&l, now_ms));
        if routine && self.started_ns == 0 {
            self.upstream = Upstream::Unread;
            self.responded = true;
            return Action::Continue;
        }
        if routine {
            self.weight = w.clock.stride();
        }
        let status = abi::header(Headers::Response, ":status")
            .ok()
            .flatten()
            .and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok());
        // An unparseable status is no status: the ending is then a reset.
        self.upstream = status.map_or(Upstream::Silent, Upstream::Status);
        if self.started_ns > 0 && now_ns >= self.started_ns {
            self.rtt_ms = Some((now_ns - self.started_ns) as f64 / 1e6);
        }
        self.on_response(&mut w, status, now_ms);
        Action::Continue
    }

    fn on_log(&mut self) {
        if self.op == Op::Other {
            return;
        }
        let worker = self.worker.clone();
        let mut w = worker.borrow_mut();
        if let Some(woken) = take(&mut w.woken, self.id) {
            self.local = woken == Woken::Answered;
        }
        if let Some(waiter) = take(&mut w.waiters, self.id) {
            // The client left while paused behind a leader.
            w.vm.flights.cancel(waiter.fp, self.id);
            self.local = true;
        }
        let ending = if self.local {
            Ending::LocalReply
        } else {
            match self.upstream {
                Upstream::Status(status) => Ending::Response(status),
                Upstream::Unread => Ending::Unread,
                Upstream::Silent => Ending::DownstreamReset,
            }
        };
        // A local reply needs no clock, and a response's time is close enough for the
        // bookkeeping below; a stream that never got one may have lasted long.
        let now_ms = if ending == Ending::DownstreamReset {
            abi::now_ns() / 1_000_000
        } else {
            self.seen_ms
        };
        // A stream that never got response headers still ends its write and frees its waiters.
        self.on_response(&mut w, None, now_ms);
        if let Some(ids) = self.wake_later.take() {
            // Woken from here, not from the response-headers callback: replying to
            // other streams inside it stalls this stream's own response in Envoy.
            wake(&mut w, &ids, self.woke_cached, self.id);
        }
        if self.leader && self.upstream == Upstream::Silent {
            if let Some(fp) = self.fp {
                let ids = w.vm.flights.leader_gone(fp, self.id);
                wake(&mut w, &ids, false, self.id);
            }
        }
        if !self.local && self.permit.is_some() {
            w.vm.admission.record_weighted(ending, self.weight);
        }
        if let Some(permit) = self.permit.take() {
            let done = Completion {
                rtt_ms: self.rtt_ms,
                ending,
                lane: Lane::of(self.op),
            };
            w.vm.limiter.release(&HostStore, permit, done, now_ms);
        }
    }
}

impl Drop for Http {
    /// Backstop: `on_log` runs for every stream Envoy knows about, but a permit must
    /// never outlive its request whatever the host does.
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            if let Ok(mut w) = self.worker.try_borrow_mut() {
                let done = Completion {
                    rtt_ms: None,
                    ending: Ending::DownstreamReset,
                    lane: Lane::of(self.op),
                };
                w.vm.limiter
                    .release(&HostStore, permit, done, abi::now_ns() / 1_000_000);
            }
        }
    }
}
