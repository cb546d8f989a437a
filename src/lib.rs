//! sessionguard: an Envoy proxy-wasm filter that keeps a Kask-style session store
//! alive under overload.
//!
//! Everything but `host` is plain Rust with no proxy-wasm types, tested natively
//! and as wasm; `host` is the only code that talks to Envoy.
//!
//! Where each mechanism lives (a folder's `mod.rs` has its design notes, its other
//! files one part each, `tests.rs` its tests):
//!
//! - `guard/`: the decision pipeline for one request over all mechanisms below.
//! - `limiter/`: the concurrency limit across workers (`table`: the shared in-flight
//!   table; `sync`: its CAS loop and tick; `bounds`: caps and critical reserve;
//!   `config`: the `concurrency` section); `gradient/`: the adaptive limit's controller.
//! - `admission/`: client-side throttling from the store's success rate.
//! - `pressure/`: the store's memory pressure (`config`, `curve`, `endpoint`: one polled
//!   endpoint, `tracker`: the poller, `snapshot`: what every worker reads); `ceiling.rs`:
//!   its in-flight ceiling; `prom/` reads the store's `/metrics`.
//! - `negcache/`: cached 404s (`recent`: reuse of this worker's reads; `race`,
//!   `hit_rate`: simulations), over `keytable/` (shared slots: `layout`, `slot`, `bucket`,
//!   `occupancy`); `singleflight.rs`: coalesced GETs of one missing key.
//! - `classify.rs` (what a request is), `reply.rs` (local replies), `outcome.rs`
//!   (how a request ended), `clock.rs` (which requests are timed).
//! - Shared plumbing: `config/` (assembly; `check`: the leaf of errors and range
//!   checks), `shared.rs` (the CAS store), `election.rs` (one leader for ticks),
//!   `fingerprint.rs` (keyed key hash), `wire.rs` (byte codec), `rng.rs`,
//!   `header_pairs.rs` (the ABI's header map).
//!
//! Dependencies point one way: tests/module_graph.rs fails on an import cycle.

pub mod admission;
pub mod ceiling;
pub mod classify;
pub mod clock;
pub mod config;
pub mod election;
pub mod fingerprint;
pub mod gradient;
pub mod guard;
pub mod header_pairs;
pub mod keytable;
pub mod limiter;
pub mod negcache;
pub mod outcome;
pub mod pressure;
pub mod prom;
pub mod reply;
pub mod rng;
pub mod shared;
pub mod singleflight;
pub mod wire;

#[cfg(all(target_arch = "wasm32", target_os = "wasi"))]
mod host;
