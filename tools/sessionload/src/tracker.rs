//! Correctness tracking for the sessions this run writes and deletes.
//!
//! Every send and every acknowledgement gets a number from one global event
//! counter, taken under the tracker's lock: a send is numbered just before the
//! request is handed to its connection, an acknowledgement just after its
//! response arrived. So "A happened before B" on the numbers implies it
//! happened before on the wire, and every judgement errs towards "correct".
//!
//! Rules for a GET of a written session, sent at S and evaluated when its
//! response arrives:
//! - 404 is `stale_404` iff some write of the key was acknowledged (201)
//!   before S and no DELETE of the key had been sent by the time the 404
//!   arrived. A GET sent before the first 201 arrived may legitimately miss.
//! - 200 must carry the value of a write that was sent, and not one that was
//!   superseded before S: the latest write acknowledged before S (call it L),
//!   any write not yet acknowledged at S (in flight, or failed: a timed-out
//!   write may still land), or a write whose acknowledgement came after L was
//!   sent (it overlapped L, so the store may have applied it after L).
//!   Anything else is `wrong_body`.
//! - 200 for a GET sent after the key's DELETE was acknowledged is
//!   `resurrected_200`.
//!
//! Keys where a write was sent after the DELETE (possible only when requests
//! overtake each other in the connection queue) are not judged.

use std::collections::HashMap;

use crate::workload::Login;

#[derive(Debug, Clone, Copy)]
struct VersionState {
    version: u32,
    sent: u64,
    acked: Option<u64>,
    done: bool,
}

#[derive(Debug, Default)]
struct KeyState {
    pending: u32,
    pending_gets: u32,
    versions: Vec<VersionState>,
    first_ack: Option<u64>,
    delete_sent: Option<u64>,
    delete_acked: Option<u64>,
    delete_done: bool,
    ambiguous: bool,
}

/// Keep at most this many failed (never acknowledged) versions per key.
const MAX_FAILED_VERSIONS: usize = 32;

/// What a GET's response was, as far as the tracker cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GetResult {
    NotFound,
    /// 200 with the version parsed from the body (None if it had none).
    Found(Option<u32>),
    /// Anything else (shed, error, timeout, never sent): not judged.
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Correct (for a 200 the caller still compares the bytes).
    Ok,
    /// A correct 404 (key not yet acknowledged, or being deleted).
    NotFoundOk,
    Stale404,
    WrongBody,
    Resurrected200,
    /// Not judged (not a 200/404, or the key is ambiguous).
    NotJudged,
}

#[derive(Debug, Default)]
pub struct Tracker {
    seq: u64,
    keys: HashMap<u64, KeyState>,
    sessions_acked: u64,
    sessions_deleted: u64,
}

impl Tracker {
    pub fn new() -> Self {
        Self::default()
    }

    fn tick(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Sessions with at least one acknowledged write.
    pub fn sessions_acked(&self) -> u64 {
        self.sessions_acked
    }

    /// Sessions whose DELETE was acknowledged.
    pub fn sessions_deleted(&self) -> u64 {
        self.sessions_deleted
    }

    /// Keys currently tracked (bounded by live sessions + in-flight work).
    #[cfg(test)]
    pub fn tracked_keys(&self) -> usize {
        self.keys.len()
    }

    /// A request for session `id` was scheduled (before it is queued).
    pub fn dispatched(&mut self, id: u64, is_get: bool) {
        let k = self.keys.entry(id).or_default();
        k.pending += 1;
        if is_get {
            k.pending_gets += 1;
        }
    }

    pub fn write_sent(&mut self, id: u64, version: u32) {
        let seq = self.tick();
        let k = self.keys.entry(id).or_default();
        if k.delete_sent.is_some() {
            k.ambiguous = true;
        }
        k.versions.push(VersionState {
            version,
            sent: seq,
            acked: None,
            done: false,
        });
    }

    /// A write finished; `acked` = 201 received.
    pub fn write_done(&mut self, id: u64, version: u32, acked: bool) {
        let seq = self.tick();
        let mut newly = false;
        if let Some(k) = self.keys.get_mut(&id) {
            if let Some(v) = k
                .versions
                .iter_mut()
                .find(|v| v.version == version && !v.done)
            {
                v.done = true;
                if acked {
                    v.acked = Some(seq);
                    if k.first_ack.is_none() {
                        k.first_ack = Some(seq);
                        newly = true;
                    }
                }
            }
        }
        if newly {
            self.sessions_acked += 1;
        }
        self.finish(id, false);
    }

    pub fn delete_sent(&mut self, id: u64) {
        let seq = self.tick();
        let k = self.keys.entry(id).or_default();
        k.delete_sent.get_or_insert(seq);
    }

    /// A DELETE finished; `acked` = a success status arrived.
    pub fn delete_done(&mut self, id: u64, acked: bool) {
        let seq = self.tick();
        let mut newly = false;
        if let Some(k) = self.keys.get_mut(&id) {
            k.delete_done = true;
            if acked && k.delete_acked.is_none() {
                k.delete_acked = Some(seq);
                newly = true;
            }
        }
        if newly {
            self.sessions_deleted += 1;
        }
        self.finish(id, false);
    }

    /// Where session `id`'s first write stands: acknowledged, still pending, or
    /// failed (nothing pending and never acknowledged). A failed login's key is
    /// forgotten: the workload drops the session, so no request names it again.
    pub fn login(&mut self, id: u64) -> Login {
        let state = match self.keys.get(&id) {
            Some(k) if k.first_ack.is_some() => Login::Acked,
            Some(k) if k.pending > 0 => Login::Pending,
            _ => Login::Failed,
        };
        if state == Login::Failed {
            self.keys.remove(&id);
        }
        state
    }

    /// A GET is about to be sent; returns its send number S.
    pub fn get_sent(&mut self, id: u64) -> u64 {
        let seq = self.tick();
        self.keys.entry(id).or_default();
        seq
    }

    /// A GET finished. `sent` is the number from [`Tracker::get_sent`] (None
    /// if it never got onto a connection).
    pub fn get_done(&mut self, id: u64, sent: Option<u64>, result: GetResult) -> Verdict {
        let verdict = match (sent, self.keys.get(&id)) {
            (Some(s), Some(k)) if !k.ambiguous => judge(k, s, result),
            _ => Verdict::NotJudged,
        };
        self.finish(id, true);
        verdict
    }

    /// A request that was never sent (or whose kind needs no bookkeeping)
    /// is finished.
    pub fn abandoned(&mut self, id: u64, is_get: bool) {
        self.finish(id, is_get);
    }

    fn finish(&mut self, id: u64, is_get: bool) {
        let Some(k) = self.keys.get_mut(&id) else {
            return;
        };
        k.pending = k.pending.saturating_sub(1);
        if is_get {
            k.pending_gets = k.pending_gets.saturating_sub(1);
        }
        if k.pending == 0 && k.delete_done {
            // Deleted sessions are never scheduled again: forget the key.
            self.keys.remove(&id);
            return;
        }
        if k.pending_gets == 0 {
            prune(k);
        }
    }
}

fn judge(k: &KeyState, s: u64, result: GetResult) -> Verdict {
    match result {
        GetResult::Other => Verdict::NotJudged,
        GetResult::NotFound => {
            let acked_before = k.first_ack.is_some_and(|a| a < s);
            if acked_before && k.delete_sent.is_none() {
                Verdict::Stale404
            } else {
                Verdict::NotFoundOk
            }
        }
        GetResult::Found(version) => {
            if k.delete_acked.is_some_and(|d| d < s) {
                return Verdict::Resurrected200;
            }
            let Some(version) = version else {
                return Verdict::WrongBody;
            };
            let Some(v) = k.versions.iter().find(|v| v.version == version) else {
                return Verdict::WrongBody;
            };
            let latest = k
                .versions
                .iter()
                .filter(|x| x.acked.is_some_and(|a| a < s))
                .max_by_key(|x| x.acked);
            match latest {
                None => Verdict::Ok,
                Some(l) => {
                    let ok = v.version == l.version || v.acked.is_none_or(|a| a > s || a > l.sent);
                    if ok {
                        Verdict::Ok
                    } else {
                        Verdict::WrongBody
                    }
                }
            }
        }
    }
}

/// Drop versions no future GET can legitimately return. Only called when no
/// GET of the key is pending, so every future GET is sent after now.
fn prune(k: &mut KeyState) {
    if k.versions.len() <= 1 {
        return;
    }
    let latest = k
        .versions
        .iter()
        .filter(|x| x.acked.is_some())
        .max_by_key(|x| x.acked)
        .copied();
    if let Some(l) = latest {
        // A version still in flight may become the latest acknowledged one,
        // so nothing it overlaps can be dropped either.
        let horizon = k
            .versions
            .iter()
            .filter(|x| !x.done)
            .map(|x| x.sent)
            .chain(std::iter::once(l.sent))
            .min()
            .unwrap_or(l.sent);
        k.versions
            .retain(|x| x.version == l.version || !x.done || x.acked.is_none_or(|a| a >= horizon));
    }
    let failed = k
        .versions
        .iter()
        .filter(|x| x.done && x.acked.is_none())
        .count();
    if failed > MAX_FAILED_VERSIONS {
        let mut drop = failed - MAX_FAILED_VERSIONS;
        k.versions.retain(|x| {
            if drop > 0 && x.done && x.acked.is_none() {
                drop -= 1;
                false
            } else {
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Schedules and sends a write, returning nothing; ack separately.
    fn send_write(t: &mut Tracker, id: u64, v: u32) {
        t.dispatched(id, false);
        t.write_sent(id, v);
    }

    fn get(t: &mut Tracker, id: u64) -> u64 {
        t.dispatched(id, true);
        t.get_sent(id)
    }

    #[test]
    fn get_sent_after_ack_that_404s_is_stale() {
        let mut t = Tracker::new();
        send_write(&mut t, 1, 1);
        t.write_done(1, 1, true);
        let s = get(&mut t, 1);
        assert_eq!(
            t.get_done(1, Some(s), GetResult::NotFound),
            Verdict::Stale404
        );
        assert_eq!(t.sessions_acked(), 1);
    }

    #[test]
    fn get_sent_before_ack_may_404() {
        let mut t = Tracker::new();
        send_write(&mut t, 1, 1);
        let s = get(&mut t, 1); // sent while the POST is in flight
        t.write_done(1, 1, true); // 201 arrives
        assert_eq!(
            t.get_done(1, Some(s), GetResult::NotFound),
            Verdict::NotFoundOk
        );
    }

    #[test]
    fn get_before_any_write_may_404() {
        let mut t = Tracker::new();
        let s = get(&mut t, 7);
        assert_eq!(
            t.get_done(7, Some(s), GetResult::NotFound),
            Verdict::NotFoundOk
        );
    }

    #[test]
    fn a_login_is_pending_until_answered_and_a_failed_one_is_forgotten() {
        let mut t = Tracker::new();
        send_write(&mut t, 1, 1);
        send_write(&mut t, 2, 1);
        assert_eq!((t.login(1), t.login(2)), (Login::Pending, Login::Pending));
        t.write_done(1, 1, true);
        t.write_done(2, 1, false);
        assert_eq!((t.login(1), t.login(2)), (Login::Acked, Login::Failed));
        assert_eq!(t.tracked_keys(), 1, "the failed login's key is dropped");
    }

    #[test]
    fn failed_write_does_not_make_404_stale() {
        let mut t = Tracker::new();
        send_write(&mut t, 1, 1);
        t.write_done(1, 1, false); // 503 or timeout
        let s = get(&mut t, 1);
        assert_eq!(
            t.get_done(1, Some(s), GetResult::NotFound),
            Verdict::NotFoundOk
        );
    }

    #[test]
    fn delete_sent_makes_404_correct() {
        let mut t = Tracker::new();
        send_write(&mut t, 1, 1);
        t.write_done(1, 1, true);
        // GET sent, then DELETE sent before the GET's response: the DELETE may
        // have overtaken it on another connection.
        let s = get(&mut t, 1);
        t.dispatched(1, false);
        t.delete_sent(1);
        assert_eq!(
            t.get_done(1, Some(s), GetResult::NotFound),
            Verdict::NotFoundOk
        );
        // A 404 after the DELETE was sent is always fine.
        let s2 = get(&mut t, 1);
        assert_eq!(
            t.get_done(1, Some(s2), GetResult::NotFound),
            Verdict::NotFoundOk
        );
    }

    #[test]
    fn get_never_sent_is_not_judged() {
        let mut t = Tracker::new();
        send_write(&mut t, 1, 1);
        t.write_done(1, 1, true);
        t.dispatched(1, true);
        assert_eq!(t.get_done(1, None, GetResult::NotFound), Verdict::NotJudged);
        let s = get(&mut t, 1);
        assert_eq!(t.get_done(1, Some(s), GetResult::Other), Verdict::NotJudged);
    }

    #[test]
    fn body_must_be_latest_acked_or_in_flight() {
        let mut t = Tracker::new();
        send_write(&mut t, 1, 1);
        t.write_done(1, 1, true);
        send_write(&mut t, 1, 2);
        t.write_done(1, 2, true);
        // v1 was acknowledged before v2 was sent: superseded.
        let s = get(&mut t, 1);
        assert_eq!(
            t.get_done(1, Some(s), GetResult::Found(Some(1))),
            Verdict::WrongBody
        );
        let s = get(&mut t, 1);
        assert_eq!(
            t.get_done(1, Some(s), GetResult::Found(Some(2))),
            Verdict::Ok
        );
        // v3 in flight when the GET is sent: either v2 or v3 is fine.
        send_write(&mut t, 1, 3);
        let s = get(&mut t, 1);
        assert_eq!(
            t.get_done(1, Some(s), GetResult::Found(Some(3))),
            Verdict::Ok
        );
        let s = get(&mut t, 1);
        assert_eq!(
            t.get_done(1, Some(s), GetResult::Found(Some(2))),
            Verdict::Ok
        );
        // never-written version, or no version at all
        let s = get(&mut t, 1);
        assert_eq!(
            t.get_done(1, Some(s), GetResult::Found(Some(9))),
            Verdict::WrongBody
        );
        let s = get(&mut t, 1);
        assert_eq!(
            t.get_done(1, Some(s), GetResult::Found(None)),
            Verdict::WrongBody
        );
    }

    #[test]
    fn overlapping_writes_may_land_in_either_order() {
        let mut t = Tracker::new();
        send_write(&mut t, 1, 1);
        send_write(&mut t, 1, 2); // both in flight
        t.write_done(1, 2, true);
        t.write_done(1, 1, true); // v1's 201 arrives last, but it overlapped v2
        let s = get(&mut t, 1);
        assert_eq!(
            t.get_done(1, Some(s), GetResult::Found(Some(2))),
            Verdict::Ok
        );
        let s = get(&mut t, 1);
        assert_eq!(
            t.get_done(1, Some(s), GetResult::Found(Some(1))),
            Verdict::Ok
        );
    }

    #[test]
    fn failed_write_may_still_land() {
        let mut t = Tracker::new();
        send_write(&mut t, 1, 1);
        t.write_done(1, 1, true);
        send_write(&mut t, 1, 2);
        t.write_done(1, 2, false); // timed out: the store may still apply it
        let s = get(&mut t, 1);
        assert_eq!(
            t.get_done(1, Some(s), GetResult::Found(Some(2))),
            Verdict::Ok
        );
    }

    #[test]
    fn resurrected_after_delete_ack() {
        let mut t = Tracker::new();
        send_write(&mut t, 1, 1);
        t.write_done(1, 1, true);
        t.dispatched(1, true); // a GET queued before the DELETE
        t.dispatched(1, false);
        t.delete_sent(1);
        t.delete_done(1, true);
        let s = t.get_sent(1);
        assert_eq!(
            t.get_done(1, Some(s), GetResult::Found(Some(1))),
            Verdict::Resurrected200
        );
        assert_eq!(t.sessions_deleted(), 1);
        assert_eq!(t.tracked_keys(), 0, "forgotten once deleted and idle");
    }

    #[test]
    fn write_after_delete_makes_key_unjudged() {
        let mut t = Tracker::new();
        t.dispatched(1, false); // write queued
        t.dispatched(1, false);
        t.delete_sent(1);
        t.write_sent(1, 1); // overtook... arrives after the delete
        t.write_done(1, 1, true);
        let s = get(&mut t, 1);
        assert_eq!(
            t.get_done(1, Some(s), GetResult::NotFound),
            Verdict::NotJudged
        );
    }

    #[test]
    fn pruning_bounds_memory_and_keeps_judgements() {
        let mut t = Tracker::new();
        for v in 1..=1000u32 {
            send_write(&mut t, 1, v);
            t.write_done(1, v, v % 3 != 0);
        }
        let k = t.keys.get(&1).unwrap();
        assert!(
            k.versions.len() <= MAX_FAILED_VERSIONS + 2,
            "{}",
            k.versions.len()
        );
        let s = get(&mut t, 1);
        assert_eq!(
            t.get_done(1, Some(s), GetResult::Found(Some(1000))),
            Verdict::Ok
        );
        let s = get(&mut t, 1);
        assert_eq!(
            t.get_done(1, Some(s), GetResult::Found(Some(1))),
            Verdict::WrongBody
        );
        let s = get(&mut t, 1);
        assert_eq!(
            t.get_done(1, Some(s), GetResult::NotFound),
            Verdict::Stale404
        );
    }

    #[test]
    fn no_pruning_while_a_get_is_pending() {
        let mut t = Tracker::new();
        send_write(&mut t, 1, 1);
        t.write_done(1, 1, true);
        let s = get(&mut t, 1); // sent when v1 was the latest
        send_write(&mut t, 1, 2);
        t.write_done(1, 2, true);
        send_write(&mut t, 1, 3);
        t.write_done(1, 3, true);
        // The slow GET may legitimately return v1, v2 or v3.
        assert_eq!(
            t.get_done(1, Some(s), GetResult::Found(Some(1))),
            Verdict::Ok
        );
    }
}
