//! Which requests read the host clock, and what the others use instead.
//!
//! A clock read is a hostcall, and a timed request makes two (when it starts and
//! when its response arrives) and reads its status (a routine read that is not timed
//! does not, see `host::http`). The adaptive limit needs a few dozen round trips per
//! second, not all of them, and the rest of the filter needs time only roughly:
//! TTLs of seconds, heartbeats, deadlines of hundreds of ms. So a VM times about
//! [`TIMED_PER_TICK`] requests per tick, every k-th one (k from the previous tick's
//! count, so they are spread evenly and the RTT sample is not biased to any part of
//! the tick), and every other request uses the last reading. Under load that reading
//! is under 10 ms old (a timed request comes every `tick / TIMED_PER_TICK`); with
//! little traffic every request is timed; the tick reads the clock too.

/// Requests a VM times per tick under load: 120 per second, where the adaptive limit
/// evaluates windows of at least 20 (`gradient::MIN_SAMPLES`). In Envoy's V8 a timed
/// request costs several untimed ones (three hostcalls and an allocation callback
/// more): docs/perf.md ("Where the pass path's cost goes") has the pass path's speed
/// at 32 and at 12 per tick.
pub const TIMED_PER_TICK: u32 = 12;

#[derive(Debug, Clone)]
pub struct Clock {
    /// The last reading, ns; 0 before the first.
    last_ns: u64,
    /// Every `stride`-th request is timed (at least 1).
    stride: u32,
    /// Requests to let pass before the next timed one.
    until_next: u32,
    /// Requests since the last tick.
    this_tick: u32,
}

impl Default for Clock {
    fn default() -> Self {
        Self {
            last_ns: 0,
            stride: 1,
            until_next: 0,
            this_tick: 0,
        }
    }
}

impl Clock {
    /// Whether the request now starting should read the clock and be timed.
    pub fn should_time(&mut self) -> bool {
        self.this_tick = self.this_tick.saturating_add(1);
        if self.last_ns == 0 || self.until_next == 0 {
            self.until_next = self.stride.saturating_sub(1);
            return true;
        }
        self.until_next -= 1;
        false
    }

    /// Records a reading of the host clock and returns it. The latest reading wins
    /// (a clock stepped back is followed, not held at its old maximum).
    pub fn read(&mut self, now_ns: u64) -> u64 {
        self.last_ns = now_ns;
        now_ns
    }

    /// One timed request stands for this many requests now.
    pub fn stride(&self) -> u32 {
        self.stride
    }

    /// The last reading, for requests that are not timed.
    pub fn last_ns(&self) -> u64 {
        self.last_ns
    }

    /// Every tick, with the tick's own reading: sets the stride for the next tick.
    pub fn tick(&mut self, now_ns: u64) {
        self.read(now_ns);
        self.stride = (self.this_tick / TIMED_PER_TICK).max(1);
        self.until_next = self.until_next.min(self.stride - 1);
        self.this_tick = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn timed_of(c: &mut Clock, requests: u32) -> u32 {
        (0..requests).map(|_| u32::from(c.should_time())).sum()
    }

    #[test]
    fn before_any_reading_every_request_is_timed() {
        let mut c = Clock::default();
        assert!(c.should_time() && c.should_time());
        c.read(5);
        assert_eq!(c.last_ns(), 5);
    }

    #[test]
    fn little_traffic_times_every_request() {
        let mut c = Clock::default();
        c.tick(1);
        for t in 2..20 {
            assert_eq!(timed_of(&mut c, TIMED_PER_TICK), TIMED_PER_TICK);
            c.tick(t);
        }
    }

    #[test]
    fn under_load_about_the_target_is_timed_and_evenly_spread() {
        let busy = 100 * TIMED_PER_TICK;
        let mut c = Clock::default();
        c.tick(1);
        // The first busy tick times everything, then the stride follows the load.
        assert_eq!(timed_of(&mut c, busy), busy);
        c.tick(2);
        let pattern: Vec<bool> = (0..busy).map(|_| c.should_time()).collect();
        assert_eq!(
            pattern.iter().filter(|t| **t).count() as u32,
            TIMED_PER_TICK
        );
        let gaps: Vec<usize> = pattern
            .iter()
            .enumerate()
            .filter(|(_, t)| **t)
            .map(|(i, _)| i)
            .collect::<Vec<_>>()
            .windows(2)
            .map(|w| w[1] - w[0])
            .collect();
        assert!(gaps.iter().all(|g| *g == 100), "{gaps:?}");
        // Load falls: the stride falls with it on the next tick.
        c.tick(3);
        assert_eq!(timed_of(&mut c, 2 * TIMED_PER_TICK), 1);
        c.tick(4);
        assert_eq!(
            timed_of(&mut c, 20),
            10,
            "2 x TIMED_PER_TICK last tick: every 2nd"
        );
        c.tick(5);
        assert_eq!(timed_of(&mut c, 20), 20, "20 last tick: all");
    }

    #[test]
    fn the_latest_reading_wins_even_backwards() {
        let mut c = Clock::default();
        c.tick(1_000);
        c.read(900);
        assert_eq!(c.last_ns(), 900);
        c.tick(800);
        assert_eq!(c.last_ns(), 800);
    }

    #[test]
    fn a_huge_count_does_not_overflow() {
        let mut c = Clock {
            this_tick: u32::MAX - 1,
            ..Clock::default()
        };
        c.read(1);
        for _ in 0..4 {
            let _ = c.should_time();
        }
        c.tick(2);
        assert_eq!(c.stride, u32::MAX / TIMED_PER_TICK);
    }
}
