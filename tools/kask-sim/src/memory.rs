//! The memory model: in-flight requests hold real, touched memory, freed memory is returned to
//! the OS late (as Go's heap is), and exceeding `--memory-limit` ends the process the way the
//! kernel's OOM killer does. See README.md "Memory model" for the parameters and their origin.
//!
//! Request buffers are fixed-size slots carved out of large anonymous mappings. A slot is
//! *live* while a request holds it, *pooled* (resident, free, reusable) after the request ends,
//! and *released* (pages given back with `MADV_DONTNEED`) once it has sat in the pool for
//! `--release-delay-secs`. Doing this with our own mappings, instead of `Vec`, makes RSS follow
//! the model exactly: glibc would keep or trim freed 36 KB blocks on its own schedule.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::log;

/// Set by `kask-sim supervise`: the child writes its pid here before killing itself over the
/// memory limit, so the supervisor can tell an emulated OOM kill from any other SIGKILL.
pub const OOM_MARKER_ENV: &str = "KASK_SIM_OOM_MARKER";

/// Share of each request's in-use bytes reported as goroutine stack (Kask: ~12 KB of ~30 KB).
const STACK_SHARE_NUM: u64 = 2;
const STACK_SHARE_DEN: u64 = 5;
/// The HTTP stack's live memory per open connection, counted in the in-use gauges with the
/// modelled request bytes. kask-sim's hyper stack holds ~16 KB of RSS per connection (README,
/// calibration note), part of it buffer capacity never touched; 12 KiB makes a request on its
/// own connection with the default 20Ki report ~33 KB in use against ~36 KB resident (~88% measured),
/// Kask's own ratio at scale (heap + stack in use ~30 KB of ~33-34 KB resident per request
/// at 2,000-5,000 in flight). Without it the gauges saw only 55% of a
/// surge's memory, and none of the connections a proxy opens (and keeps) during one.
pub const HTTP_HEAP_BYTES: usize = 12 << 10;
const CHUNK_TARGET_BYTES: usize = 4 << 20;
const WATCH_EVERY: Duration = Duration::from_millis(10);

pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// Resident set size of this process from /proc/self/statm, in bytes.
pub fn rss_bytes() -> u64 {
    statm_field(1).unwrap_or(0) * page_size() as u64
}

/// Virtual memory size of this process, in bytes.
pub fn vsz_bytes() -> u64 {
    statm_field(0).unwrap_or(0) * page_size() as u64
}

fn statm_field(i: usize) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/statm").ok()?;
    text.split_whitespace().nth(i)?.parse().ok()
}

struct Arena {
    /// Base addresses of mappings, each `slots_per_chunk * slot_bytes` long.
    chunks: Vec<usize>,
    total_slots: usize,
    pooled: VecDeque<(usize, Instant)>,
    released: Vec<usize>,
}

pub struct MemoryModel {
    request_bytes: usize,
    slot_bytes: usize,
    slots_per_chunk: usize,
    release_delay: Duration,
    limit: Option<u64>,
    base_bytes: u64,
    arena: Mutex<Arena>,
    live: AtomicUsize,
    pooled: AtomicUsize,
    released: AtomicUsize,
    peak_rss: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemStats {
    pub live: usize,
    pub heap_inuse: u64,
    pub stack_inuse: u64,
    pub heap_idle: u64,
    pub heap_released: u64,
}

/// Memory held on behalf of one in-flight request; returned to the pool on drop.
pub struct MemGuard {
    model: Arc<MemoryModel>,
    slot: Option<usize>,
}

impl Drop for MemGuard {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.model.free(slot);
        }
        self.model.live.fetch_sub(1, Ordering::Relaxed);
    }
}

fn lock(m: &Mutex<Arena>) -> std::sync::MutexGuard<'_, Arena> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MemoryModel {
    pub fn new(request_bytes: usize, release_delay: Duration, limit: Option<u64>) -> MemoryModel {
        let page = page_size();
        let slot_bytes = request_bytes.div_ceil(page).max(1) * page;
        MemoryModel {
            request_bytes,
            slot_bytes,
            slots_per_chunk: (CHUNK_TARGET_BYTES / slot_bytes).max(1),
            release_delay,
            limit,
            base_bytes: rss_bytes(),
            arena: Mutex::new(Arena {
                chunks: Vec::new(),
                total_slots: 0,
                pooled: VecDeque::new(),
                released: Vec::new(),
            }),
            live: AtomicUsize::new(0),
            pooled: AtomicUsize::new(0),
            released: AtomicUsize::new(0),
            peak_rss: AtomicU64::new(0),
        }
    }

    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    fn slot_ptr(&self, arena: &Arena, slot: usize) -> *mut u8 {
        let chunk = arena.chunks[slot / self.slots_per_chunk];
        (chunk + (slot % self.slots_per_chunk) * self.slot_bytes) as *mut u8
    }

    /// Takes and touches one request's memory. Reuses pooled memory first, as Go reuses its
    /// heap, so RSS grows only when live demand exceeds everything retained so far.
    pub fn acquire(self: &Arc<Self>) -> Result<MemGuard, String> {
        self.live.fetch_add(1, Ordering::Relaxed);
        let guard = MemGuard {
            model: Arc::clone(self),
            slot: None,
        };
        if self.request_bytes == 0 {
            return Ok(guard);
        }
        let mut guard = guard;
        let (ptr, grew) = {
            let mut a = lock(&self.arena);
            let (slot, grew) = if let Some((slot, _)) = a.pooled.pop_back() {
                self.pooled.fetch_sub(1, Ordering::Relaxed);
                (slot, false)
            } else if let Some(slot) = a.released.pop() {
                self.released.fetch_sub(1, Ordering::Relaxed);
                (slot, true)
            } else {
                if a.total_slots == a.chunks.len() * self.slots_per_chunk {
                    let len = self.slots_per_chunk * self.slot_bytes;
                    // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
                    let p = unsafe {
                        libc::mmap(
                            std::ptr::null_mut(),
                            len,
                            libc::PROT_READ | libc::PROT_WRITE,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                            -1,
                            0,
                        )
                    };
                    if p == libc::MAP_FAILED {
                        return Err(format!(
                            "mmap of {len} bytes failed: {}",
                            std::io::Error::last_os_error()
                        ));
                    }
                    a.chunks.push(p as usize);
                }
                let slot = a.total_slots;
                a.total_slots += 1;
                (slot, true)
            };
            guard.slot = Some(slot);
            (self.slot_ptr(&a, slot), grew)
        };
        // SAFETY: the slot lies inside one of our live mappings, is `slot_bytes >=
        // request_bytes` long and is owned exclusively by this guard until it is dropped.
        unsafe { std::ptr::write_bytes(ptr, 0xa5, self.request_bytes) };
        if grew {
            self.check_limit();
        }
        Ok(guard)
    }

    fn free(&self, slot: usize) {
        if self.release_delay.is_zero() {
            // No malloc_trim here: it would run once per request.
            let ptr = self.slot_ptr(&lock(&self.arena), slot);
            release_pages(ptr, self.slot_bytes);
            lock(&self.arena).released.push(slot);
            self.released.fetch_add(1, Ordering::Relaxed);
        } else {
            lock(&self.arena).pooled.push_back((slot, Instant::now()));
            self.pooled.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Returns to the OS the pooled slots that have been idle for the release delay.
    pub fn release_aged(&self) {
        let now = Instant::now();
        let mut due = Vec::new();
        {
            let mut a = lock(&self.arena);
            while let Some(&(slot, since)) = a.pooled.front() {
                if now.duration_since(since) < self.release_delay {
                    break;
                }
                a.pooled.pop_front();
                due.push((slot, self.slot_ptr(&a, slot)));
            }
        }
        if due.is_empty() {
            return;
        }
        self.pooled.fetch_sub(due.len(), Ordering::Relaxed);
        for &(_, ptr) in &due {
            release_pages(ptr, self.slot_bytes);
        }
        {
            let mut a = lock(&self.arena);
            a.released.extend(due.iter().map(|&(slot, _)| slot));
        }
        self.released.fetch_add(due.len(), Ordering::Relaxed);
        trim_malloc();
    }

    /// Go's in-use gauges, modelled on Kask's measured split (heap ~18 KB + stack ~12 KB of the
    /// ~36 KB resident per in-flight request): the modelled bytes of each live request, plus
    /// [`HTTP_HEAP_BYTES`] for each open connection (in Go, its goroutine's stack and its
    /// bufio buffers; here hyper's buffers and task), 3/5 as heap and 2/5 as stack, on top of
    /// the RSS at start. `connections` is the number of open client connections. The sum
    /// follows live demand (a little below RSS, as Go's does) and falls the moment requests
    /// end and connections close.
    pub fn stats(&self, connections: usize) -> MemStats {
        let live = self.live.load(Ordering::Relaxed);
        let inuse = (live * self.request_bytes + connections * HTTP_HEAP_BYTES) as u64;
        let stack = inuse * STACK_SHARE_NUM / STACK_SHARE_DEN;
        MemStats {
            live,
            heap_inuse: self.base_bytes + inuse - stack,
            stack_inuse: stack,
            // As in Go, idle includes what was released to the OS: idle − released is
            // the memory held resident but free, which a shedder must not count as demand.
            heap_idle: ((self.pooled.load(Ordering::Relaxed)
                + self.released.load(Ordering::Relaxed))
                * self.slot_bytes) as u64,
            heap_released: (self.released.load(Ordering::Relaxed) * self.slot_bytes) as u64,
        }
    }

    /// Kills the process if measured RSS exceeds the limit.
    pub fn check_limit(&self) {
        let Some(limit) = self.limit else { return };
        let rss = rss_bytes();
        self.peak_rss.fetch_max(rss, Ordering::Relaxed);
        if rss > limit {
            oom_kill(rss, limit, self.live.load(Ordering::Relaxed));
        }
    }

    /// Starts the thread that checks the limit every 10 ms and ages the retained pool.
    pub fn start_watchdog(self: &Arc<Self>) -> std::io::Result<()> {
        let model = Arc::clone(self);
        std::thread::Builder::new()
            .name("kask-sim-memwatch".into())
            .spawn(move || loop {
                model.check_limit();
                model.release_aged();
                std::thread::sleep(WATCH_EVERY);
            })
            .map(|_| ())
    }
}

/// The HTTP stack's own per-connection allocations (hyper buffers, tasks) come from malloc,
/// which keeps freed memory mapped. Trimming when the modelled heap is released makes RSS fall
/// back to the base instead of keeping a surge's malloc high-water mark forever.
fn trim_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap memory to the OS.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn release_pages(ptr: *mut u8, len: usize) {
    // SAFETY: `ptr..ptr+len` is a page-aligned slot inside our private anonymous mapping and no
    // guard owns it; MADV_DONTNEED drops its pages so they read back as zeros later.
    unsafe {
        libc::madvise(ptr.cast(), len, libc::MADV_DONTNEED);
    }
}

/// What the kernel's OOM killer does to a container over its limit: SIGKILL, no cleanup. The
/// log line comes first because nothing can be written after.
fn oom_kill(rss: u64, limit: u64, live: usize) -> ! {
    // The watchdog and an allocating request can both get here; a second writer would truncate
    // the marker while the first is already killing the process.
    static DYING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if DYING.swap(true, Ordering::SeqCst) {
        loop {
            std::thread::park();
        }
    }
    log::fatal(&format!(
        "memory limit exceeded: rss {rss} bytes > limit {limit} bytes with {live} requests in flight; killing self with SIGKILL (emulated OOM kill)"
    ));
    if let Ok(path) = std::env::var(OOM_MARKER_ENV) {
        let _ = std::fs::write(path, std::process::id().to_string());
    }
    // SAFETY: signalling our own pid has no memory-safety implications.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    std::process::abort()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_accounting_follows_guards() {
        let m = Arc::new(MemoryModel::new(36_864, Duration::from_secs(60), None));
        let base = m.stats(0).heap_inuse;
        let guards: Vec<_> = (0..10).map(|_| m.acquire().unwrap()).collect();
        // Ten requests, each on its own connection, and two idle connections.
        let s = m.stats(12);
        assert_eq!(s.live, 10);
        let inuse = (10 * 36_864 + 12 * HTTP_HEAP_BYTES) as u64;
        assert_eq!(s.stack_inuse, inuse * 2 / 5);
        assert_eq!(s.heap_inuse + s.stack_inuse, base + inuse);
        drop(guards);
        let s = m.stats(0);
        assert_eq!(s.live, 0);
        assert_eq!(s.heap_inuse, base);
        assert_eq!(s.heap_idle, 10 * 36_864);
    }

    #[test]
    fn pool_is_bounded_by_peak_and_reused() {
        let m = Arc::new(MemoryModel::new(36_864, Duration::from_secs(60), None));
        for _ in 0..5 {
            let guards: Vec<_> = (0..20).map(|_| m.acquire().unwrap()).collect();
            drop(guards);
        }
        assert_eq!(lock(&m.arena).total_slots, 20);
        assert_eq!(m.stats(0).heap_idle, 20 * 36_864);
    }

    #[test]
    fn release_returns_pages_to_the_os() {
        let bytes = 1 << 20;
        let m = Arc::new(MemoryModel::new(bytes, Duration::from_millis(1), None));
        let before = rss_bytes();
        let guards: Vec<_> = (0..32).map(|_| m.acquire().unwrap()).collect();
        let during = rss_bytes();
        assert!(during >= before + 24 * bytes as u64, "{before} -> {during}");
        drop(guards);
        std::thread::sleep(Duration::from_millis(5));
        m.release_aged();
        let after = rss_bytes();
        assert!(after + 24 * bytes as u64 <= during, "{during} -> {after}");
        assert_eq!(m.stats(0).heap_released, 32 * bytes as u64);
        // Released slots are reused before new ones are mapped.
        let g = m.acquire().unwrap();
        assert_eq!(lock(&m.arena).total_slots, 32);
        drop(g);
    }

    #[test]
    fn zero_bytes_per_request_allocates_nothing() {
        let m = Arc::new(MemoryModel::new(0, Duration::ZERO, None));
        let g = m.acquire().unwrap();
        assert_eq!(m.stats(0).live, 1);
        drop(g);
        assert_eq!(lock(&m.arena).total_slots, 0);
    }
}
