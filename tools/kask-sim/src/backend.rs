//! The Cassandra stand-in: a fixed pool of `--backend-parallelism` worker threads, each holding
//! a job for a sampled service time. Load beyond `parallelism / mean service time` therefore
//! queues here, and the queue is what grows in-flight requests and memory upstream, as a slow
//! Cassandra did in the 2020 incident.
//!
//! Workers are OS threads rather than async tasks because tokio's timer rounds sleeps up to the
//! next millisecond, which would distort a 2 ms mean; the store calls block anyway.
//!
//! A queued job whose request is gone (the client disconnected or timed out, so hyper dropped
//! the handler and with it the reply receiver) is skipped, not served: Kask's Go `net/http`
//! cancels a request's context when its client goes away, and gocql does not send a query on a
//! cancelled context. Serving the dead backlog would keep the store answering nobody long
//! after a surge. Skipped jobs are counted (`kasksim_abandoned_total`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::rng::Rng;
use crate::store::{Store, StoreResult};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ServiceDist {
    /// Exponential with the given mean (memoryless; the default).
    Exp,
    /// Always exactly the mean.
    Const,
    /// Log-normal with sigma 1 and the given mean (heavy tail: p99 is about 6x the mean).
    Lognormal,
}

/// Never hold a worker longer than this, whatever the distribution draws.
const MAX_SERVICE: Duration = Duration::from_secs(60);
const LOGNORMAL_SIGMA: f64 = 1.0;

#[derive(Clone, Copy, Debug)]
pub struct ServiceTime {
    pub mean_ms: f64,
    pub dist: ServiceDist,
}

impl ServiceTime {
    pub fn sample(&self, rng: &mut Rng) -> Duration {
        if self.mean_ms <= 0.0 {
            return Duration::ZERO;
        }
        let ms = match self.dist {
            ServiceDist::Const => self.mean_ms,
            ServiceDist::Exp => rng.exponential(self.mean_ms),
            ServiceDist::Lognormal => {
                let mu = self.mean_ms.ln() - LOGNORMAL_SIGMA * LOGNORMAL_SIGMA / 2.0;
                (mu + LOGNORMAL_SIGMA * rng.standard_normal()).exp()
            }
        };
        Duration::try_from_secs_f64(ms / 1000.0)
            .unwrap_or(MAX_SERVICE)
            .min(MAX_SERVICE)
    }
}

pub enum Job {
    Get(Vec<u8>),
    Set(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
}

pub enum Outcome {
    Value(Option<Vec<u8>>),
    Done,
}

type Reply = oneshot::Sender<StoreResult<Outcome>>;

struct Queue {
    jobs: VecDeque<(Job, Reply)>,
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    depth: AtomicUsize,
    busy: AtomicUsize,
    abandoned: AtomicU64,
    store: Arc<Store>,
    service: ServiceTime,
}

pub struct Backend {
    shared: Arc<Shared>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Backend {
    pub fn start(
        store: Arc<Store>,
        parallelism: usize,
        service: ServiceTime,
    ) -> std::io::Result<Backend> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                closed: false,
            }),
            ready: Condvar::new(),
            depth: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            abandoned: AtomicU64::new(0),
            store,
            service,
        });
        let mut workers = Vec::with_capacity(parallelism);
        for i in 0..parallelism {
            let s = Arc::clone(&shared);
            workers.push(
                std::thread::Builder::new()
                    .name(format!("kask-sim-backend-{i}"))
                    .stack_size(256 << 10)
                    .spawn(move || worker(&s))?,
            );
        }
        Ok(Backend {
            shared,
            workers: Mutex::new(workers),
        })
    }

    /// Queues a job and waits for a worker to finish it.
    pub async fn run(&self, job: Job) -> StoreResult<Outcome> {
        let (tx, rx) = oneshot::channel();
        {
            let mut q = lock(&self.shared.queue);
            if q.closed {
                return Err("backend is shut down".into());
            }
            q.jobs.push_back((job, tx));
            self.shared.depth.fetch_add(1, Ordering::Relaxed);
        }
        self.shared.ready.notify_one();
        rx.await
            .unwrap_or_else(|_| Err("backend worker dropped the job".into()))
    }

    /// Jobs waiting for a worker.
    pub fn queue_depth(&self) -> usize {
        self.shared.depth.load(Ordering::Relaxed)
    }

    /// Workers currently holding a job.
    pub fn busy(&self) -> usize {
        self.shared.busy.load(Ordering::Relaxed)
    }

    /// Queued jobs dropped unserved because their request had already gone away.
    pub fn abandoned(&self) -> u64 {
        self.shared.abandoned.load(Ordering::Relaxed)
    }

    /// Finishes queued jobs, then stops the workers.
    pub fn shutdown(&self) {
        lock(&self.shared.queue).closed = true;
        self.shared.ready.notify_all();
        for h in lock(&self.workers).drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn worker(s: &Shared) {
    let mut rng = Rng::new();
    loop {
        let (job, reply) = {
            let mut q = lock(&s.queue);
            loop {
                if let Some(item) = q.jobs.pop_front() {
                    break item;
                }
                if q.closed {
                    return;
                }
                q = s.ready.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        s.depth.fetch_sub(1, Ordering::Relaxed);
        if reply.is_closed() {
            // Nobody is waiting for this answer any more: do not spend a worker on it.
            s.abandoned.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        s.busy.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = match job {
            Job::Get(k) => s.store.get(&k).map(Outcome::Value),
            Job::Set(k, v) => s.store.set(&k, &v).map(|_| Outcome::Done),
            Job::Delete(k) => s.store.delete(&k).map(|_| Outcome::Done),
        };
        // The service time is the whole time a worker is held; real storage work counts in it.
        let remaining = s.service.sample(&mut rng).saturating_sub(started.elapsed());
        if !remaining.is_zero() {
            std::thread::sleep(remaining);
        }
        s.busy.fetch_sub(1, Ordering::Relaxed);
        let _ = reply.send(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn const_and_zero_service_times() {
        let mut rng = Rng::new();
        let c = ServiceTime {
            mean_ms: 2.0,
            dist: ServiceDist::Const,
        };
        assert_eq!(c.sample(&mut rng), Duration::from_millis(2));
        let z = ServiceTime {
            mean_ms: 0.0,
            dist: ServiceDist::Exp,
        };
        assert_eq!(z.sample(&mut rng), Duration::ZERO);
    }

    /// A job whose caller went away before a worker picked it up is dropped unserved and
    /// counted; the jobs behind it do not wait for the dead backlog.
    #[test]
    fn abandoned_jobs_are_skipped_and_counted() {
        let dir = std::env::temp_dir().join(format!(
            "kask-sim-unit-abandon-{}-{}",
            std::process::id(),
            crate::log::unix_millis()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Arc::new(Store::open(&dir, 0).unwrap());
        let service = ServiceTime {
            mean_ms: 200.0,
            dist: ServiceDist::Const,
        };
        let backend = Arc::new(Backend::start(Arc::clone(&store), 1, service).unwrap());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            // Occupies the only worker for 200 ms.
            let b = Arc::clone(&backend);
            let first = tokio::spawn(async move { b.run(Job::Get(b"a".to_vec())).await.is_ok() });
            tokio::time::sleep(Duration::from_millis(10)).await;
            // Twenty callers queue behind it and give up after 20 ms.
            let quitters: Vec<_> = (0..20u8)
                .map(|i| {
                    let b = Arc::clone(&backend);
                    tokio::spawn(async move {
                        tokio::time::timeout(Duration::from_millis(20), b.run(Job::Get(vec![i])))
                            .await
                            .is_err()
                    })
                })
                .collect();
            for q in quitters {
                assert!(q.await.unwrap(), "a quitter was served within 20 ms");
            }
            assert_eq!(backend.queue_depth(), 20);
            // Served right after the first job (~170 ms), not after 20 dead jobs (~4 s).
            let started = Instant::now();
            let last = backend.run(Job::Get(b"z".to_vec())).await;
            let waited = started.elapsed();
            assert!(matches!(last, Ok(Outcome::Value(None))));
            assert!(waited < Duration::from_millis(1500), "waited {waited:?}");
            assert!(first.await.unwrap());
        });
        assert_eq!(backend.abandoned(), 20);
        assert_eq!(backend.queue_depth(), 0);
        backend.shutdown();
        store.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn lognormal_mean_is_close() {
        let mut rng = Rng::new();
        let l = ServiceTime {
            mean_ms: 2.0,
            dist: ServiceDist::Lognormal,
        };
        let n = 200_000;
        let total: f64 = (0..n)
            .map(|_| l.sample(&mut rng).as_secs_f64() * 1000.0)
            .sum();
        let mean = total / n as f64;
        assert!((mean - 2.0).abs() < 0.1, "mean {mean}");
    }
}
