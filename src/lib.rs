//! sessionguard: an Envoy proxy-wasm filter that keeps a Kask-style session store
//! alive under overload.
//!
//! Everything but `host` is plain Rust with no proxy-wasm types, tested natively
//! and as wasm; `host` is the only code that talks to Envoy.

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
pub mod pressure;
pub mod prom;
pub mod recent;
pub mod reply;
pub mod rng;
pub mod shared;
pub mod singleflight;
mod wire;

#[cfg(all(target_arch = "wasm32", target_os = "wasi"))]
mod host;
