//! Prometheus text exposition (format 0.0.4) shaped like Kask's: its own request counter and
//! histogram, `kask_build_info`, the client_golang process/runtime families a shedder would
//! read, and `kasksim_*` gauges that only a simulator can offer. Families are sorted by name
//! and series by label values, as client_golang's registry does.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;

use crate::memory::MemStats;

/// Kask's `http_request_duration_seconds` buckets.
pub const BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Default)]
struct Series {
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

pub struct BuildInfo {
    pub version: &'static str,
    pub build_date: &'static str,
    pub build_host: &'static str,
    pub go_version: &'static str,
}

pub const BUILD: BuildInfo = BuildInfo {
    version: env!("CARGO_PKG_VERSION"),
    build_date: env!("KASK_SIM_BUILD_DATE"),
    build_host: env!("KASK_SIM_BUILD_HOST"),
    go_version: env!("KASK_SIM_RUSTC_VERSION"),
};

pub struct Metrics {
    /// Keyed by (code, method) as strings so iteration order is client_golang's.
    series: Mutex<BTreeMap<(String, String), Series>>,
    inflight: AtomicI64,
    peak: AtomicI64,
    start_time: f64,
}

/// Everything outside this module that /metrics reports, sampled at scrape time.
pub struct Snapshot {
    pub goroutines: usize,
    pub mem: MemStats,
    pub rss: u64,
    pub vsz: u64,
    pub queue_depth: usize,
    pub abandoned: u64,
    pub backend_busy: usize,
    pub backend_parallelism: usize,
    pub memory_limit: u64,
}

/// Counts one request as in flight until dropped.
pub struct InflightGuard<'a>(&'a Metrics);

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            series: Mutex::new(BTreeMap::new()),
            inflight: AtomicI64::new(0),
            peak: AtomicI64::new(0),
            start_time: crate::log::unix_millis() as f64 / 1000.0,
        }
    }

    pub fn enter(&self) -> InflightGuard<'_> {
        let now = self.inflight.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(now, Ordering::Relaxed);
        InflightGuard(self)
    }

    pub fn inflight(&self) -> i64 {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Restarts peak tracking from the current in-flight count.
    pub fn reset_peak(&self) {
        self.peak.store(self.inflight(), Ordering::Relaxed);
    }

    pub fn observe(&self, code: u16, method: &str, secs: f64) {
        let mut map = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let s = map
            .entry((code.to_string(), method.to_string()))
            .or_default();
        s.count += 1;
        s.sum += secs;
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                s.buckets[i] += 1;
            }
        }
    }

    pub fn render(&self, snap: &Snapshot) -> String {
        let mut out = String::with_capacity(8192);
        let proc = ProcStat::read();

        gauge(
            &mut out,
            "go_goroutines",
            "Number of goroutines that currently exist.",
            snap.goroutines as f64,
        );
        gauge(
            &mut out,
            "go_memstats_heap_idle_bytes",
            "Number of heap bytes waiting to be used.",
            snap.mem.heap_idle as f64,
        );
        gauge(
            &mut out,
            "go_memstats_heap_inuse_bytes",
            "Number of heap bytes that are in use.",
            snap.mem.heap_inuse as f64,
        );
        gauge(
            &mut out,
            "go_memstats_heap_released_bytes",
            "Number of heap bytes released to OS.",
            snap.mem.heap_released as f64,
        );
        gauge(
            &mut out,
            "go_memstats_stack_inuse_bytes",
            "Number of bytes in use by the stack allocator.",
            snap.mem.stack_inuse as f64,
        );

        let map = self.series.lock().unwrap_or_else(|e| e.into_inner());
        header(
            &mut out,
            "http_request_duration_seconds",
            "A histogram of latencies for requests, partitioned by status code and HTTP method.",
            "histogram",
        );
        for ((code, method), s) in map.iter() {
            let labels = format!("code=\"{}\",method=\"{}\"", esc(code), esc(method));
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "http_request_duration_seconds_bucket{{{labels},le=\"{b}\"}} {}",
                    s.buckets[i]
                );
            }
            let _ = writeln!(
                out,
                "http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                s.count
            );
            let _ = writeln!(
                out,
                "http_request_duration_seconds_sum{{{labels}}} {}",
                s.sum
            );
            let _ = writeln!(
                out,
                "http_request_duration_seconds_count{{{labels}}} {}",
                s.count
            );
        }
        header(
            &mut out,
            "http_requests_total",
            "Count of HTTP requests processed, partitioned by status code and HTTP method.",
            "counter",
        );
        for ((code, method), s) in map.iter() {
            let _ = writeln!(
                out,
                "http_requests_total{{code=\"{}\",method=\"{}\"}} {}",
                esc(code),
                esc(method),
                s.count
            );
        }
        drop(map);

        header(
            &mut out,
            "kask_build_info",
            "A metric with a constant '1' value labeled by version, build_date, build_host, and go_version from which kask was built.",
            "gauge",
        );
        let _ = writeln!(
            out,
            "kask_build_info{{build_date=\"{}\",build_host=\"{}\",go_version=\"{}\",version=\"{}\"}} 1",
            esc(BUILD.build_date),
            esc(BUILD.build_host),
            esc(BUILD.go_version),
            esc(BUILD.version)
        );

        header(
            &mut out,
            "kasksim_abandoned_total",
            "Queued backend jobs dropped unserved because their client had gone away.",
            "counter",
        );
        let _ = writeln!(out, "kasksim_abandoned_total {}", snap.abandoned);
        gauge(
            &mut out,
            "kasksim_backend_busy",
            "Backend (Cassandra stand-in) workers currently serving a request.",
            snap.backend_busy as f64,
        );
        gauge(
            &mut out,
            "kasksim_backend_parallelism",
            "Backend (Cassandra stand-in) worker count.",
            snap.backend_parallelism as f64,
        );
        gauge(
            &mut out,
            "kasksim_backend_queue_depth",
            "Requests waiting for a backend worker.",
            snap.queue_depth as f64,
        );
        gauge(
            &mut out,
            "kasksim_inflight_peak",
            "Most requests in flight at once since start or the last peak reset.",
            self.peak.load(Ordering::Relaxed) as f64,
        );
        gauge(
            &mut out,
            "kasksim_inflight_requests",
            "Requests currently in flight (all routes, including this scrape).",
            self.inflight() as f64,
        );
        gauge(
            &mut out,
            "kasksim_memory_limit_bytes",
            "Emulated container memory limit; 0 means none.",
            snap.memory_limit as f64,
        );

        if let Some(p) = &proc {
            header(
                &mut out,
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds.",
                "counter",
            );
            let _ = writeln!(out, "process_cpu_seconds_total {}", p.cpu_seconds);
        }
        if let Some(max) = max_fds() {
            gauge(
                &mut out,
                "process_max_fds",
                "Maximum number of open file descriptors.",
                max as f64,
            );
        }
        if let Some(n) = open_fds() {
            gauge(
                &mut out,
                "process_open_fds",
                "Number of open file descriptors.",
                n as f64,
            );
        }
        gauge(
            &mut out,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            snap.rss as f64,
        );
        gauge(
            &mut out,
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            self.start_time,
        );
        gauge(
            &mut out,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            snap.vsz as f64,
        );
        out
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn gauge(out: &mut String, name: &str, help: &str, value: f64) {
    header(out, name, help, "gauge");
    let _ = writeln!(out, "{name} {value}");
}

/// Label value escaping of the text format.
fn esc(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

struct ProcStat {
    cpu_seconds: f64,
}

impl ProcStat {
    fn read() -> Option<ProcStat> {
        let text = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the parenthesised command name, which may itself contain spaces.
        let rest = &text[text.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the full line, 11 and 12 after `comm`.
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        // SAFETY: sysconf has no preconditions.
        let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let tck = if tck > 0 { tck as f64 } else { 100.0 };
        Some(ProcStat {
            cpu_seconds: (utime + stime) / tck,
        })
    }
}

fn open_fds() -> Option<usize> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count())
}

fn max_fds() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid, writable rlimit.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    (rc == 0).then_some(r.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap() -> Snapshot {
        Snapshot {
            goroutines: 3,
            mem: MemStats {
                live: 0,
                heap_inuse: 100,
                stack_inuse: 10,
                heap_idle: 0,
                heap_released: 0,
            },
            rss: 1234,
            vsz: 5678,
            queue_depth: 2,
            abandoned: 7,
            backend_busy: 1,
            backend_parallelism: 16,
            memory_limit: 0,
        }
    }

    #[test]
    fn histogram_and_counter_lines() {
        let m = Metrics::new();
        m.observe(404, "GET", 0.002);
        m.observe(404, "GET", 2.0);
        m.observe(201, "POST", 0.0001);
        let text = m.render(&snap());
        assert!(text.contains("# TYPE http_request_duration_seconds histogram\n"));
        assert!(text.contains(
            "http_request_duration_seconds_bucket{code=\"404\",method=\"GET\",le=\"0.001\"} 0\n"
        ));
        assert!(text.contains(
            "http_request_duration_seconds_bucket{code=\"404\",method=\"GET\",le=\"0.0025\"} 1\n"
        ));
        assert!(text.contains(
            "http_request_duration_seconds_bucket{code=\"404\",method=\"GET\",le=\"1\"} 1\n"
        ));
        assert!(text.contains(
            "http_request_duration_seconds_bucket{code=\"404\",method=\"GET\",le=\"+Inf\"} 2\n"
        ));
        assert!(
            text.contains("http_request_duration_seconds_count{code=\"404\",method=\"GET\"} 2\n")
        );
        assert!(text.contains("http_requests_total{code=\"201\",method=\"POST\"} 1\n"));
        // Series are sorted by label values.
        let a = text.find("http_requests_total{code=\"201\"").unwrap();
        let b = text.find("http_requests_total{code=\"404\"").unwrap();
        assert!(a < b);
        assert!(text.contains("process_resident_memory_bytes 1234\n"));
        assert!(text.contains("go_memstats_heap_inuse_bytes 100\n"));
        assert!(text.contains("kasksim_backend_queue_depth 2\n"));
        assert!(
            text.contains("# TYPE kasksim_abandoned_total counter\nkasksim_abandoned_total 7\n")
        );
    }

    #[test]
    fn families_are_sorted_by_name() {
        let m = Metrics::new();
        m.observe(200, "GET", 0.01);
        let text = m.render(&snap());
        let names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap_or(""))
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
    }

    #[test]
    fn peak_tracks_and_resets() {
        let m = Metrics::new();
        {
            let _a = m.enter();
            let _b = m.enter();
        }
        assert_eq!(m.peak.load(Ordering::Relaxed), 2);
        let _c = m.enter();
        m.reset_peak();
        assert_eq!(m.peak.load(Ordering::Relaxed), 1);
    }
}
