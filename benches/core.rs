//! Microbenchmarks of the pure core (no proxy-wasm): what one request costs the filter
//! natively, before the ABI and V8 add theirs. `make bench` runs them after the Envoy
//! benchmarks; `cargo bench -p sessionguard --bench core` runs them alone.
//!
//! The shared store is [`MemStore`]: like Envoy's shared data, `get` copies the value
//! out (a 1,096-byte shard for the key table) and `set` copies it in, so the copies the
//! host makes are in the numbers; the hostcall itself (V8 <-> Envoy) is not.
//!
//! Target (docs/perf.md): the whole pure-core decision for one request < 1 µs.
// A test may fail loudly (the filter crate denies these outside tests).
#![allow(clippy::expect_used, clippy::unreachable)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};

use sessionguard::classify::{classify, Criticality};
use sessionguard::config::Config;
use sessionguard::gradient::Lane;
use sessionguard::guard::{negative_cache, KeyRequest, Verdict, Vm};
use sessionguard::limiter::{Acquire, LimitMode, Limiter};
use sessionguard::negcache::Mark;
use sessionguard::outcome::{Completion, Ending};
use sessionguard::pressure::PressureTracker;
use sessionguard::prom::find_gauge;
use sessionguard::reply::{self, ShedReason};
use sessionguard::shared::MemStore;

const BASE: &str = "/sessions/v1/";
/// A MediaWiki session key as it travels: colons percent-encoded.
const PATH: &str = "/sessions/v1/enwiki%3AMWSession%3Aq2vk4bs7nd3m6ftn3uxla6r8cj5ph2wy";
const MISSING_PATH: &str = "/sessions/v1/enwiki%3AMWSession%3Azz0000000000000000000000000000zz";
const NOW_MS: u64 = 1_750_000_000_000;

/// The filter's configuration with every request mechanism on and nothing shed:
/// a fixed limit far above what one benchmark holds in flight.
fn config() -> Config {
    let mut c = Config::default();
    c.concurrency.mode = LimitMode::Fixed;
    c.concurrency.limit = 100_000;
    c.concurrency.max_limit = 100_000;
    c.negative_cache.ttl_ms = 3_600_000;
    c
}

fn key_of(path: &str) -> Vec<u8> {
    classify("GET", path, BASE).key.expect("a key path")
}

fn bench_classify(c: &mut Criterion) {
    let mut g = c.benchmark_group("classify");
    g.bench_function("get_encoded_session_key", |b| {
        b.iter(|| classify(black_box("GET"), black_box(PATH), black_box(BASE)))
    });
    g.bench_function("post_plain_key", |b| {
        b.iter(|| {
            classify(
                black_box("POST"),
                black_box("/sessions/v1/global:session:centralauth:0123456789abcdef"),
                black_box(BASE),
            )
        })
    });
    g.bench_function("other_path", |b| {
        b.iter(|| classify(black_box("GET"), black_box("/healthz"), black_box(BASE)))
    });
    g.finish();
}

/// One critical request through the limiter: acquire, then release with a 200.
fn admit_and_release(lim: &mut Limiter, store: &MemStore) {
    let permit = match lim.try_acquire(store, Criticality::Critical, NOW_MS) {
        Acquire::Admitted(p) | Acquire::ShadowShed(p) => p,
        Acquire::Shed { .. } => unreachable!("limit is high"),
    };
    let done = Completion {
        rtt_ms: Some(0.3),
        ending: Ending::Response(200),
        lane: Lane::Read,
    };
    lim.release(store, permit, done, NOW_MS);
}

fn bench_limiter(c: &mut Criterion) {
    let cfg = config();
    let mut g = c.benchmark_group("limiter");
    // Steady state: the acquire takes back the slot the previous release left unwritten.
    g.bench_function("try_acquire+release/admitted", |b| {
        let store = MemStore::new();
        let mut lim = Limiter::new(&cfg.concurrency, cfg.cas_attempts, 0xfeed);
        b.iter(|| admit_and_release(&mut lim, &store))
    });
    // A limit below 16 keeps nothing unwritten: each acquire and release is a read
    // and a CAS write of the in-flight table.
    g.bench_function("try_acquire+release/admitted_cas_each", |b| {
        let mut small = cfg.concurrency.clone();
        small.mode = sessionguard::limiter::LimitMode::Fixed;
        small.limit = 8;
        small.min_limit = 1;
        let store = MemStore::new();
        let mut lim = Limiter::new(&small, cfg.cas_attempts, 0xfeed);
        b.iter(|| admit_and_release(&mut lim, &store))
    });
    g.bench_function("try_acquire/shed", |b| {
        // limit 1 with sheddable_share 0: every sheddable request is shed after one read.
        let mut shed_cfg = cfg.concurrency.clone();
        shed_cfg.limit = 1;
        shed_cfg.min_limit = 1;
        shed_cfg.sheddable_share = 0.0;
        let store = MemStore::new();
        let mut lim = Limiter::new(&shed_cfg, cfg.cas_attempts, 0xfeed);
        b.iter(
            || match lim.try_acquire(&store, Criticality::Sheddable, NOW_MS) {
                Acquire::Shed { severity, .. } => severity,
                _ => unreachable!("sheddable share is 0"),
            },
        )
    });
    // With other workers present: the table holds 8 slots, as with `--concurrency 8`.
    g.bench_function("try_acquire+release/admitted_8_vms", |b| {
        let store = MemStore::new();
        let mut others: Vec<Limiter> = (1..8u64)
            .map(|id| Limiter::new(&cfg.concurrency, cfg.cas_attempts, id))
            .collect();
        let _held: Vec<_> = others
            .iter_mut()
            .map(|l| l.try_acquire(&store, Criticality::Critical, NOW_MS))
            .collect();
        let mut lim = Limiter::new(&cfg.concurrency, cfg.cas_attempts, 0xfeed);
        b.iter(|| admit_and_release(&mut lim, &store))
    });
    g.finish();
}

fn bench_negcache(c: &mut Criterion) {
    let cfg = config();
    let mut g = c.benchmark_group("negcache");
    let key = key_of(PATH);
    let missing = key_of(MISSING_PATH);

    g.bench_function("fingerprint", |b| {
        let cache = negative_cache(&cfg, 42, 7);
        b.iter(|| cache.fingerprint(black_box(&key)))
    });
    g.bench_function("lookup/hit_missing", |b| {
        let store = MemStore::new();
        let mut cache = negative_cache(&cfg, 42, 7);
        let fp = cache.fingerprint(&missing);
        let seen = cache.lookup(&store, fp, NOW_MS);
        cache.insert_missing(&store, fp, seen.generation, NOW_MS);
        assert_eq!(cache.lookup(&store, fp, NOW_MS).mark, Mark::Missing);
        b.iter(|| cache.lookup(&store, black_box(fp), NOW_MS))
    });
    g.bench_function("lookup/absent_shard", |b| {
        let store = MemStore::new();
        let mut cache = negative_cache(&cfg, 42, 7);
        let fp = cache.fingerprint(&key);
        b.iter(|| cache.lookup(&store, black_box(fp), NOW_MS))
    });
    g.bench_function("insert_missing", |b| {
        let store = MemStore::new();
        let mut cache = negative_cache(&cfg, 42, 7);
        let fp = cache.fingerprint(&missing);
        // Create the shard first: the steady state is a get and a CAS set.
        cache.lookup(&store, fp, NOW_MS);
        cache.begin_write(&store, fp, NOW_MS);
        b.iter(|| {
            let seen = cache.lookup(&store, fp, NOW_MS);
            cache.insert_missing(&store, black_box(fp), seen.generation, NOW_MS)
        })
    });
    g.bench_function("begin_write+end_write", |b| {
        let store = MemStore::new();
        let mut cache = negative_cache(&cfg, 42, 7);
        let fp = cache.fingerprint(&key);
        cache.begin_write(&store, fp, NOW_MS);
        b.iter(|| {
            cache.begin_write(&store, black_box(fp), NOW_MS);
            cache.end_write(&store, fp, true, NOW_MS)
        })
    });
    g.finish();
}

/// A `/metrics` body shaped like Kask's (Go 1.19, client_golang default registry plus
/// Kask's HTTP metrics): about 170 samples, families sorted by name as client_golang
/// writes them, so the resident-memory gauge is near the end.
fn go_metrics_body() -> Vec<u8> {
    use std::fmt::Write;
    let mut s = String::new();
    let family = |s: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family(
        &mut s,
        "go_gc_duration_seconds",
        "summary",
        "A summary of the pause duration of garbage collection cycles.",
    );
    for (q, v) in [
        ("0", "2.3741e-05"),
        ("0.25", "4.1282e-05"),
        ("0.5", "5.5021e-05"),
        ("0.75", "8.3314e-05"),
        ("1", "0.000812903"),
    ] {
        let _ = writeln!(s, "go_gc_duration_seconds{{quantile=\"{q}\"}} {v}");
    }
    s.push_str("go_gc_duration_seconds_sum 0.091823417\ngo_gc_duration_seconds_count 1432\n");
    family(
        &mut s,
        "go_goroutines",
        "gauge",
        "Number of goroutines that currently exist.",
    );
    s.push_str("go_goroutines 41\n");
    family(
        &mut s,
        "go_info",
        "gauge",
        "Information about the Go environment.",
    );
    s.push_str("go_info{version=\"go1.19.13\"} 1\n");
    let memstats: [(&str, &str, &str); 26] = [
        ("alloc_bytes", "gauge", "5.382144e+06"),
        ("alloc_bytes_total", "counter", "1.2339221504e+10"),
        ("buck_hash_sys_bytes", "gauge", "1.497583e+06"),
        ("frees_total", "counter", "1.44239123e+08"),
        ("gc_cpu_fraction", "gauge", "4.283173218612105e-05"),
        ("gc_sys_bytes", "gauge", "8.971736e+06"),
        ("heap_alloc_bytes", "gauge", "5.382144e+06"),
        ("heap_idle_bytes", "gauge", "1.0960896e+07"),
        ("heap_inuse_bytes", "gauge", "8.478720e+06"),
        ("heap_objects", "gauge", "32811"),
        ("heap_released_bytes", "gauge", "8.880128e+06"),
        ("heap_sys_bytes", "gauge", "1.9439616e+07"),
        ("last_gc_time_seconds", "gauge", "1.7500001233829868e+09"),
        ("lookups_total", "counter", "0"),
        ("mallocs_total", "counter", "1.44271934e+08"),
        ("mcache_inuse_bytes", "gauge", "4800"),
        ("mcache_sys_bytes", "gauge", "15600"),
        ("mspan_inuse_bytes", "gauge", "170272"),
        ("mspan_sys_bytes", "gauge", "212160"),
        ("next_gc_bytes", "gauge", "1.0403648e+07"),
        ("other_sys_bytes", "gauge", "1.006545e+06"),
        ("stack_inuse_bytes", "gauge", "1.114112e+06"),
        ("stack_sys_bytes", "gauge", "1.114112e+06"),
        ("sys_bytes", "gauge", "3.2257432e+07"),
        ("threads", "gauge", "12"),
        ("heap_unused_bytes", "gauge", "0"),
    ];
    for (name, kind, value) in memstats {
        let full = format!("go_memstats_{name}");
        family(&mut s, &full, kind, "Go runtime memory statistic.");
        let _ = writeln!(s, "{full} {value}");
    }
    let series: [(&str, &str); 5] = [
        ("200", "GET"),
        ("404", "GET"),
        ("201", "POST"),
        ("204", "DELETE"),
        ("500", "GET"),
    ];
    family(
        &mut s,
        "http_request_duration_seconds",
        "histogram",
        "Request latency in seconds.",
    );
    for (code, method) in series {
        let mut cumulative = 0u64;
        for (i, le) in [
            "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "+Inf",
        ]
        .iter()
        .enumerate()
        {
            cumulative += 1_000_000 >> i;
            let _ = writeln!(
                s,
                "http_request_duration_seconds_bucket{{code=\"{code}\",method=\"{method}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            s,
            "http_request_duration_seconds_sum{{code=\"{code}\",method=\"{method}\"}} 2391.2331"
        );
        let _ = writeln!(s, "http_request_duration_seconds_count{{code=\"{code}\",method=\"{method}\"}} {cumulative}");
    }
    family(
        &mut s,
        "http_requests_total",
        "counter",
        "Total number of HTTP requests.",
    );
    for (code, method) in series {
        let _ = writeln!(
            s,
            "http_requests_total{{code=\"{code}\",method=\"{method}\"}} 1.9283742e+07"
        );
    }
    family(&mut s, "kask_build_info", "gauge", "Build information.");
    s.push_str("kask_build_info{build_date=\"2020-05-12T14:55:02Z\",build_host=\"deneb\",go_version=\"go1.19.13\",version=\"v1.0.10\"} 1\n");
    for (name, kind, value) in [
        ("process_cpu_seconds_total", "counter", "18213.42"),
        ("process_max_fds", "gauge", "1.048576e+06"),
        ("process_open_fds", "gauge", "87"),
        ("process_resident_memory_bytes", "gauge", "4.5318144e+07"),
        ("process_start_time_seconds", "gauge", "1.74999e+09"),
        ("process_virtual_memory_bytes", "gauge", "7.98048256e+08"),
        (
            "process_virtual_memory_max_bytes",
            "gauge",
            "1.8446744073709552e+19",
        ),
    ] {
        family(&mut s, name, kind, "Process statistic.");
        let _ = writeln!(s, "{name} {value}");
    }
    family(
        &mut s,
        "promhttp_metric_handler_requests_in_flight",
        "gauge",
        "Current number of scrapes being served.",
    );
    s.push_str("promhttp_metric_handler_requests_in_flight 1\n");
    family(
        &mut s,
        "promhttp_metric_handler_requests_total",
        "counter",
        "Total number of scrapes by HTTP status code.",
    );
    for (code, v) in [("200", "86321"), ("500", "0"), ("503", "0")] {
        let _ = writeln!(
            s,
            "promhttp_metric_handler_requests_total{{code=\"{code}\"}} {v}"
        );
    }
    s.into_bytes()
}

fn bench_prom(c: &mut Criterion) {
    let body = go_metrics_body();
    assert_eq!(
        find_gauge(&body, "process_resident_memory_bytes", &[]),
        Ok(4.5318144e7)
    );
    let mut g = c.benchmark_group("prom");
    g.throughput(criterion::Throughput::Bytes(body.len() as u64));
    g.bench_function("find_gauge/process_resident_memory_bytes", |b| {
        b.iter(|| find_gauge(black_box(&body), "process_resident_memory_bytes", &[]))
    });
    g.bench_function("find_gauge/labelled_series", |b| {
        b.iter(|| {
            find_gauge(
                black_box(&body),
                "http_requests_total",
                &[("code", "404"), ("method", "GET")],
            )
        })
    });
    // What one memory poll does with the body: three gauges in one pass, then the curve.
    g.bench_function("pressure_tracker_on_sample", |b| {
        let mut mem = config().memory;
        mem.enabled = Some(true);
        mem.memory_limit_bytes = 400 << 20;
        let mut tracker = PressureTracker::new(&mem);
        let mut now = NOW_MS;
        b.iter(|| {
            now += 1000;
            tracker.on_sample(0, black_box(&body), 0, now).is_ok()
        })
    });
    g.finish();
}

fn bench_reply(c: &mut Criterion) {
    let cfg = config();
    let mut g = c.benchmark_group("reply");
    g.bench_function("overloaded_503", |b| {
        b.iter(|| reply::overloaded(ShedReason::Concurrency, black_box(PATH), 3))
    });
    g.bench_function("cached_not_found_404", |b| {
        b.iter(|| reply::cached_not_found(black_box(MISSING_PATH)))
    });
    g.bench_function("retry_after_seconds", |b| {
        b.iter(|| cfg.retry_after.seconds(black_box(0.7), black_box(0.31)))
    });
    g.finish();
}

/// The core's side of `on_http_request_headers` + `on_http_response_headers` + `on_log`
/// for each path, as `src/host/http.rs` sequences it, minus the hostcalls.
struct Core {
    store: MemStore,
    vm: Vm,
}

impl Core {
    fn new(cfg: Config) -> Self {
        Self {
            store: MemStore::new(),
            vm: Vm::new(cfg, 0xfeed, 42, 9),
        }
    }

    /// One request; returns the status the client would see.
    fn request(&mut self, method: &str, path: &str, upstream_status: u32) -> u32 {
        let request = classify(method, path, &self.vm.config.base_uri);
        let Some(key) = request.key.as_deref() else {
            return upstream_status;
        };
        let req = KeyRequest {
            op: request.op,
            fp: self.vm.cache.fingerprint(key),
            id: 1,
        };
        let fwd = match self.vm.guard().decide(&self.store, req, NOW_MS) {
            Verdict::CachedMissing => return black_box(reply::cached_not_found(path)).status,
            Verdict::Shed {
                reason,
                retry_after_secs,
                ..
            } => return black_box(reply::overloaded(reason, path, retry_after_secs)).status,
            Verdict::Forward(fwd) => fwd,
        };
        // Response headers.
        let (permit, outstanding) = fwd.into_parts();
        let status = Some(upstream_status);
        let wake = self
            .vm
            .guard()
            .settle(&self.store, req, outstanding, status, || true, NOW_MS);
        black_box(wake);
        // on_log.
        let ending = Ending::Response(upstream_status);
        self.vm.admission.record(ending);
        if let Some(permit) = permit {
            let done = Completion {
                rtt_ms: Some(0.3),
                ending,
                lane: Lane::Read,
            };
            self.vm.limiter.release(&self.store, permit, done, NOW_MS);
        }
        upstream_status
    }
}

fn bench_decision(c: &mut Criterion) {
    let mut g = c.benchmark_group("decision");
    g.bench_function("pass_get_known_key", |b| {
        let mut core = Core::new(config());
        assert_eq!(core.request("GET", PATH, 200), 200);
        b.iter(|| core.request("GET", black_box(PATH), 200))
    });
    g.bench_function("negative_cache_hit", |b| {
        let mut core = Core::new(config());
        assert_eq!(core.request("GET", MISSING_PATH, 404), 404);
        b.iter(|| core.request("GET", black_box(MISSING_PATH), 404))
    });
    g.bench_function("shed_concurrency", |b| {
        let mut cfg = config();
        cfg.concurrency.limit = 1;
        cfg.concurrency.min_limit = 1;
        cfg.concurrency.sheddable_share = 0.0;
        let mut core = Core::new(cfg);
        assert_eq!(core.request("GET", PATH, 200), 503);
        b.iter(|| core.request("GET", black_box(PATH), 200))
    });
    g.bench_function("write_post", |b| {
        let mut core = Core::new(config());
        b.iter(|| core.request("POST", black_box(PATH), 201))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    // Short and steady: the whole run stays under a minute.
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(900))
        .sample_size(30);
    targets = bench_classify, bench_limiter, bench_negcache, bench_prom, bench_reply, bench_decision
}
criterion_main!(benches);
