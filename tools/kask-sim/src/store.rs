//! Durable key-value storage on redb, standing in for Kask's Cassandra table.
//!
//! Writes go through one writer thread that does group commit: it takes every write queued
//! while the previous commit was syncing, applies them in one durable transaction and only then
//! acknowledges them. An acknowledged POST therefore survives `kill -9`, while the cost of an
//! fsync is shared by everything that arrived during the last one.
//!
//! Each value is stored as `[expiry unix ms, u64 LE; 0 = never][value bytes]`. Expired values
//! read as missing and are removed lazily (on read) and by a background sweep in bounded steps.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::log;

const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("values");

/// redb's page cache lives in this process, so it counts in the RSS that the memory model
/// exposes; Cassandra's memory is not in Kask's pod. Keep it small.
const CACHE_BYTES: usize = 8 << 20;
/// Upper bound on one group commit, so a flood cannot build one huge transaction.
const MAX_BATCH: usize = 2048;
const SWEEP_EVERY: Duration = Duration::from_secs(5);
const SWEEP_BATCH: usize = 4096;

pub type StoreResult<T> = Result<T, String>;

enum Op {
    Set(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    /// Lazy expiry: re-checked inside the transaction so a newer POST is never removed.
    DeleteIfExpired(Vec<u8>),
}

struct WriteReq {
    op: Op,
    ack: Option<SyncSender<StoreResult<()>>>,
}

pub struct Store {
    db: Arc<Database>,
    tx: Mutex<Option<Sender<WriteReq>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    ttl_ms: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn now_ms() -> u64 {
    log::unix_millis()
}

fn is_expired(stored: &[u8], now: u64) -> bool {
    match stored.get(..8) {
        Some(head) => {
            let mut b = [0u8; 8];
            b.copy_from_slice(head);
            let exp = u64::from_le_bytes(b);
            exp != 0 && exp <= now
        }
        // Not written by us: treat as garbage that reads as missing.
        None => true,
    }
}

impl Store {
    /// Opens (creating if needed) `data_dir/kask-sim.redb`; `ttl_secs == 0` disables expiry.
    pub fn open(data_dir: &Path, ttl_secs: u64) -> StoreResult<Store> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| format!("cannot create data dir {}: {e}", data_dir.display()))?;
        let path: PathBuf = data_dir.join("kask-sim.redb");
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let txn = db.begin_write().map_err(|e| e.to_string())?;
        txn.open_table(TABLE).map_err(|e| e.to_string())?;
        txn.commit().map_err(|e| e.to_string())?;

        let db = Arc::new(db);
        let ttl_ms = ttl_secs.saturating_mul(1000);
        let (tx, rx) = mpsc::channel();
        let wdb = Arc::clone(&db);
        let writer = std::thread::Builder::new()
            .name("kask-sim-writer".into())
            .spawn(move || writer_loop(&wdb, rx, ttl_ms > 0))
            .map_err(|e| format!("cannot start writer thread: {e}"))?;
        Ok(Store {
            db,
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            ttl_ms,
        })
    }

    /// Blocking read of a live value.
    pub fn get(&self, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        let txn = self.db.begin_read().map_err(|e| e.to_string())?;
        let table = txn.open_table(TABLE).map_err(|e| e.to_string())?;
        let Some(guard) = table.get(key).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let stored = guard.value();
        if is_expired(stored, now_ms()) {
            self.send(Op::DeleteIfExpired(key.to_vec()), None);
            return Ok(None);
        }
        Ok(Some(stored[8..].to_vec()))
    }

    /// Blocking, durable upsert that resets the TTL; returns once committed.
    pub fn set(&self, key: &[u8], value: &[u8]) -> StoreResult<()> {
        let expiry = if self.ttl_ms == 0 {
            0
        } else {
            now_ms().saturating_add(self.ttl_ms)
        };
        let mut stored = Vec::with_capacity(8 + value.len());
        stored.extend_from_slice(&expiry.to_le_bytes());
        stored.extend_from_slice(value);
        self.write(Op::Set(key.to_vec(), stored))
    }

    /// Blocking, durable delete; deleting a missing key succeeds.
    pub fn delete(&self, key: &[u8]) -> StoreResult<()> {
        self.write(Op::Delete(key.to_vec()))
    }

    fn write(&self, op: Op) -> StoreResult<()> {
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        if !self.send(op, Some(ack_tx)) {
            return Err("store is shut down".into());
        }
        ack_rx
            .recv()
            .unwrap_or_else(|_| Err("writer thread exited".into()))
    }

    fn send(&self, op: Op, ack: Option<SyncSender<StoreResult<()>>>) -> bool {
        match lock(&self.tx).as_ref() {
            Some(tx) => tx.send(WriteReq { op, ack }).is_ok(),
            None => false,
        }
    }

    /// Commits everything queued, then stops the writer.
    pub fn shutdown(&self) {
        lock(&self.tx).take();
        if let Some(h) = lock(&self.writer).take() {
            let _ = h.join();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn writer_loop(db: &Database, rx: Receiver<WriteReq>, sweep: bool) {
    let mut cursor: Option<Vec<u8>> = None;
    let mut next_sweep = Instant::now() + SWEEP_EVERY;
    loop {
        let wait = next_sweep.saturating_duration_since(Instant::now());
        let first = match rx.recv_timeout(wait) {
            Ok(req) => Some(req),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut batch: Vec<WriteReq> = first.into_iter().collect();
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(req) => batch.push(req),
                Err(_) => break,
            }
        }
        let due = Instant::now() >= next_sweep;
        if due {
            next_sweep = Instant::now() + SWEEP_EVERY;
        }
        let do_sweep = due && sweep;
        if batch.is_empty() && !do_sweep {
            continue;
        }
        let result = commit_batch(db, &batch, if do_sweep { Some(&mut cursor) } else { None });
        if let Err(e) = &result {
            log::error(&format!("Error writing to storage ({e})"));
        }
        for req in batch {
            if let Some(ack) = req.ack {
                let _ = ack.send(result.clone());
            }
        }
    }
}

fn commit_batch(
    db: &Database,
    batch: &[WriteReq],
    sweep_cursor: Option<&mut Option<Vec<u8>>>,
) -> StoreResult<()> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    {
        let mut table = txn.open_table(TABLE).map_err(|e| e.to_string())?;
        let now = now_ms();
        for req in batch {
            match &req.op {
                Op::Set(k, v) => {
                    table
                        .insert(k.as_slice(), v.as_slice())
                        .map_err(|e| e.to_string())?;
                }
                Op::Delete(k) => {
                    table.remove(k.as_slice()).map_err(|e| e.to_string())?;
                }
                Op::DeleteIfExpired(k) => {
                    let expired = match table.get(k.as_slice()).map_err(|e| e.to_string())? {
                        Some(v) => is_expired(v.value(), now),
                        None => false,
                    };
                    if expired {
                        table.remove(k.as_slice()).map_err(|e| e.to_string())?;
                    }
                }
            }
        }
        if let Some(cursor) = sweep_cursor {
            sweep_step(&mut table, cursor, now)?;
        }
    }
    txn.commit().map_err(|e| e.to_string())
}

/// Removes expired values among the next `SWEEP_BATCH` keys after `cursor`, wrapping around.
fn sweep_step(
    table: &mut redb::Table<&[u8], &[u8]>,
    cursor: &mut Option<Vec<u8>>,
    now: u64,
) -> StoreResult<()> {
    let mut expired = Vec::new();
    let mut last = None;
    let mut seen = 0;
    {
        let lower = match cursor.as_deref() {
            Some(c) => Bound::Excluded(c),
            None => Bound::Unbounded,
        };
        let iter = table
            .range::<&[u8]>((lower, Bound::Unbounded))
            .map_err(|e| e.to_string())?;
        for item in iter.take(SWEEP_BATCH) {
            let (k, v) = item.map_err(|e| e.to_string())?;
            seen += 1;
            if is_expired(v.value(), now) {
                expired.push(k.value().to_vec());
            }
            last = Some(k.value().to_vec());
        }
    }
    for k in &expired {
        table.remove(k.as_slice()).map_err(|e| e.to_string())?;
    }
    *cursor = if seen < SWEEP_BATCH { None } else { last };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "kask-sim-unit-{tag}-{}-{}",
            std::process::id(),
            now_ms()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn set_get_delete_roundtrip_and_reopen() {
        let dir = tempdir("roundtrip");
        {
            let s = Store::open(&dir, 0).unwrap();
            assert_eq!(s.get(b"k").unwrap(), None);
            s.set(b"k", b"v1").unwrap();
            s.set(b"k", b"v2").unwrap();
            assert_eq!(s.get(b"k").unwrap(), Some(b"v2".to_vec()));
            s.set(b"gone", b"x").unwrap();
            s.delete(b"gone").unwrap();
            s.delete(b"never").unwrap();
        }
        let s = Store::open(&dir, 0).unwrap();
        assert_eq!(s.get(b"k").unwrap(), Some(b"v2".to_vec()));
        assert_eq!(s.get(b"gone").unwrap(), None);
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn expiry_reads_as_missing_and_sweeps() {
        let dir = tempdir("expiry");
        let s = Store::open(&dir, 1).unwrap();
        s.set(b"a", b"1").unwrap();
        assert!(is_expired(&(now_ms() - 1).to_le_bytes(), now_ms()));
        assert!(!is_expired(&0u64.to_le_bytes(), now_ms()));
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(s.get(b"a").unwrap(), None);
        let mut cursor = None;
        let txn = s.db.begin_write().unwrap();
        {
            let mut t = txn.open_table(TABLE).unwrap();
            sweep_step(&mut t, &mut cursor, now_ms()).unwrap();
            assert!(t.get(b"a".as_slice()).unwrap().is_none());
        }
        txn.commit().unwrap();
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn concurrent_writes_are_group_committed() {
        let dir = tempdir("group");
        let s = Arc::new(Store::open(&dir, 0).unwrap());
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let s = Arc::clone(&s);
                std::thread::spawn(move || {
                    for i in 0..50 {
                        s.set(format!("{t}-{i}").as_bytes(), b"v").unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(s.get(b"7-49").unwrap(), Some(b"v".to_vec()));
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
