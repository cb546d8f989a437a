//! Backend memory pressure: from the store's own memory to a shed probability.
//!
//! # What is measured, and why not resident memory alone
//!
//! The store is a Go service. Under a surge each in-flight request costs it about
//! 35 KB (heap objects plus a goroutine stack), so its memory follows the number of
//! requests it holds, and it is OOM-killed when that number gets too high. When the
//! surge ends the goroutines exit and the heap objects die at once, so
//! `go_memstats_heap_inuse_bytes + go_memstats_stack_inuse_bytes` falls within a GC
//! cycle. `process_resident_memory_bytes` does not: the Go runtime keeps the freed
//! spans mapped and returns them to the kernel lazily (the background scavenger, and
//! a forced GC only every two minutes), so resident memory stays near its peak for
//! minutes. A shedder driven by RSS alone therefore keeps rejecting traffic for
//! minutes after the danger has passed, on a pod whose memory is free for the
//! taking: Go reuses those retained pages before it asks the kernel for more.
//!
//! So each poll reads two signals:
//! - the **demand** — resident memory minus what the runtime holds resident but free:
//!   `RSS − (go_memstats_heap_idle_bytes − go_memstats_heap_released_bytes)`
//!   ([`MemoryConfig::retained_gauges`]). While a surge builds, nothing is retained and
//!   free, so demand equals RSS and the thresholds mean what an operator expects: a
//!   share of the pod limit as the kernel counts it. When the surge ends, the freed
//!   spans become idle-but-not-released and demand falls at once, while RSS stays up.
//!   Heap and stack *in use* (the fallback, [`MemoryConfig::demand_gauges`]) would also
//!   fall at once, but they see only part of what each request costs resident
//!   (allocator and runtime overhead, buffers), so thresholds on them act too late:
//!   measured in `docs/memory.md`, a surge outran shedding set on in-use memory.
//!   It decides between `soft` and `hard`, and beyond.
//! - the **ceiling** — [`MemoryConfig::gauge`] (default resident memory): what the
//!   kernel charges to the pod's cgroup. It only acts at `critical`: once it reaches
//!   `critical` while demand is itself above `soft`, the ratio used is
//!   `max(demand, ceiling)`. This catches memory the demand does not see when the pod
//!   is truly about to be killed, and cannot keep shedding on retained memory once
//!   demand has fallen after a surge.
//!
//! Without the retained gauges (an empty `retained_gauges`, or a body without them),
//! the sum of `demand_gauges` is the demand; if those are not all in a complete body
//! either (not a Go service), the ceiling decides alone (the snapshot says so). Empty
//! `retained_gauges` and `demand_gauges` select that mode explicitly.
//!
//! # The curve
//!
//! The in-flight ceiling ([`crate::ceiling`]) is the memory guard: it keeps the
//! store's demand under `critical` x `memory_limit_bytes` by refusing requests
//! (critical ones too, inside the limiter's reserve for them) once the requests in
//! flight would fill the headroom. The curve steers sheddable traffic on the memory
//! itself, for what the ceiling does not explain. With `r` the ratio of the worst
//! fresh endpoint to `memory_limit_bytes`:
//! - `r <= soft`: nothing is shed;
//! - `soft < r < hard`: sheddable traffic is shed with probability `x²`, where
//!   `x = (r − soft)/(hard − soft)`: gentle at first (a quarter at mid-band), so a
//!   small excess costs little traffic, and all of it at `hard`;
//! - `r >= hard`: all sheddable traffic is shed. Critical traffic is never shed by
//!   the curve: the ceiling decides for it (at least a few requests at a time,
//!   so the store always makes progress).
//!
//! Severity (for `Retry-After`) is `(r − soft)/(critical − soft)`, clamped to [0, 1].
//!
//! # Smoothing
//!
//! A rising sample is taken as is, so pressure is acted on within one poll. A
//! falling one is blended, `s·previous + (1 − s)·sample` with `s` = 0.5
//! ([`FALL_SMOOTHING`]): one lucky poll does not switch shedding off, yet after a surge
//! the ratio halves its distance to the real value every poll, so shedding stops
//! within one or two polls (from a ratio of 0.9 to a demand of 0.3: 0.6 at the
//! first poll, below `soft`).
//!
//! # Staleness and failures
//!
//! Each endpoint has a state ([`EndpointStatus`]); only `Fresh` and `Failing` ones
//! drive shedding, and never on a sample older than `max_sample_age_ms`:
//! - a good sample makes the endpoint `Fresh`;
//! - a failed poll (timeout, call failure, non-200, unreadable body) makes it
//!   `Failing` while its last good sample is still younger than `max_sample_age_ms`,
//!   then `Failed`. Holding the last sample a few seconds is deliberate: a store too
//!   overloaded to answer its `/metrics` in time is the one that most needs
//!   protection;
//! - a sample that grows old without any newer result (the poller stopped) makes it
//!   `Stale`.
//!
//! [`PressureTracker::take_transitions`] reports each change of state once, for the
//! log; [`PressureStats`] and [`EndpointStats`] carry the counters.
//!
//! # Sharing across workers
//!
//! One elected worker polls and feeds a [`PressureTracker`]; on every tick it
//! publishes [`PressureTracker::snapshot`] under [`SNAPSHOT_KEY`] ([`publish`]). Every
//! worker reads it back on its tick ([`load`]), keeps the [`PressureSnapshot`], and
//! calls [`PressureSnapshot::decide`] per request: pure arithmetic, no hostcall. The
//! snapshot also carries the in-flight ceiling ([`PressureSnapshot::max_in_flight`]:
//! the tightest endpoint's, see [`crate::ceiling`]; with several endpoints each is
//! scaled by its replica's share of the requests, see `replica.rs`), which every
//! worker hands to its limiter; the limiter checks it on every request against the exact global count.
//! A snapshot older than `max_sample_age_ms` (the poller died) is ignored; the worker
//! then keeps the last ceiling it saw. The layout is fixed ([`SNAPSHOT_LEN`] bytes,
//! checksummed); see [`PressureSnapshot::encode`].
//!
//! # Polling
//!
//! The poller records the filter's global in-flight count with each sample (for the
//! ceiling) and asks [`PressureTracker::next_poll_in_ms`] when to poll next: fast while
//! memory is high, rising or the ceiling half full, ten times slower when idle.

mod config;
mod curve;
mod endpoint;
mod replica;
mod snapshot;
mod tracker;

pub use config::{
    MemoryConfig, MetricsEndpoint, FALL_SMOOTHING, MAX_DEMAND_GAUGES, MAX_ENDPOINTS,
    START_TIME_GAUGE,
};
pub use curve::Curve;
pub use endpoint::{
    EndpointStats, EndpointStatus, FailureReason, Reading, SampleError, StatusKind, Transition,
};
pub use replica::{GOROUTINES_GAUGE, SHARE_FALL_WEIGHT, SHARE_MIN_IN_FLIGHT};
pub use snapshot::{load, publish, PressureSnapshot, SnapshotError, SNAPSHOT_KEY, SNAPSHOT_LEN};
pub use tracker::{PressureStats, PressureTracker, ShedCounters};

#[cfg(test)]
mod tests;

#[cfg(all(test, not(target_arch = "wasm32")))]
mod proptests;
