//! How long the reactor waits, after a turn that did work, before it polls again.
//!
//! A client that keeps many small requests in flight (fio at depth 32) sends a new request
//! as it takes each reply. Polling again at once means one request read, one pread and one
//! small send per turn, and each send lands in the client's socket while the client is
//! reading it: on 2 cores both sides spent about 8% of their time spinning on each other's
//! socket locks, and the rate stopped near 180k requests/s. Waiting 20-40 µs between turns
//! lets requests pile up, so that each turn reads them with one call and answers them with one
//! send, and the client reads a whole batch undisturbed: 230-255k requests/s in the same run
//! where nbdkit did 160k.
//!
//! The same wait costs a client with few requests in flight dearly (depth 4: 170k/s without,
//! 120k/s with 10 µs, 56k/s with 40 µs), and which wait is best depends on the clients, so it
//! is measured: every `SETTLE`, if the server is busy, each candidate wait runs for `TRIAL`
//! and the one that moved the most requests is kept. A lightly loaded server never waits.

use std::time::{Duration, Instant};

/// The waits tried, in µs. The first (none) is the default and wins ties.
const CANDIDATES: [u64; 4] = [0, 10, 20, 40];
/// How long each candidate is measured.
const TRIAL: Duration = Duration::from_millis(5);
/// How long the winner is kept before measuring again.
const SETTLE: Duration = Duration::from_millis(200);
/// Below this many requests per second the reactor never waits: latency comes first.
const MIN_RATE: f64 = 50_000.0;
/// A longer wait must beat no wait by this factor to be chosen (measurements are noisy).
const MARGIN: f64 = 1.05;
/// No work for this long means the load changed: measurements so far say nothing.
const IDLE: Duration = Duration::from_millis(2);

#[derive(Debug)]
enum Phase {
    Settled,
    Trial { idx: usize, rates: [f64; CANDIDATES.len()] },
}

#[derive(Debug)]
pub struct Batching {
    phase: Phase,
    /// Index into CANDIDATES of the wait in use.
    cur: usize,
    /// Start of the current phase or trial, and the request count then.
    since: Instant,
    start: u64,
    last_tick: Instant,
}

impl Batching {
    pub fn new(now: Instant) -> Batching {
        Batching { phase: Phase::Settled, cur: 0, since: now, start: 0, last_tick: now }
    }

    /// Called after each reactor turn that handled events, with the server's running count of
    /// client requests; returns how long to wait before polling again.
    pub fn after_turn(&mut self, now: Instant, requests: u64) -> Duration {
        if now.saturating_duration_since(self.last_tick) >= IDLE {
            self.phase = Phase::Settled;
            self.cur = 0;
            self.restart(now, requests);
        }
        self.last_tick = now;
        let elapsed = now.saturating_duration_since(self.since);
        let rate = || requests.wrapping_sub(self.start) as f64 / elapsed.as_secs_f64().max(1e-9);
        match &mut self.phase {
            Phase::Settled if elapsed >= SETTLE => {
                if rate() >= MIN_RATE {
                    self.phase = Phase::Trial { idx: 0, rates: [0.0; CANDIDATES.len()] };
                }
                self.cur = 0;
                self.restart(now, requests);
            }
            Phase::Trial { idx, rates } if elapsed >= TRIAL => {
                rates[*idx] = rate();
                *idx += 1;
                if *idx == CANDIDATES.len() {
                    self.cur = best(rates);
                    self.phase = Phase::Settled;
                } else {
                    self.cur = *idx;
                }
                self.restart(now, requests);
            }
            _ => {}
        }
        Duration::from_micros(CANDIDATES[self.cur])
    }

    fn restart(&mut self, now: Instant, requests: u64) {
        self.since = now;
        self.start = requests;
    }
}

/// The candidate with the highest rate; a wait must beat no wait by MARGIN.
fn best(rates: &[f64; CANDIDATES.len()]) -> usize {
    let mut best = 0;
    for (i, &r) in rates.iter().enumerate().skip(1) {
        if r > rates[0] * MARGIN && r > rates[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tuner driven by simulated clients, one turn every 10 µs.
    struct Sim {
        b: Batching,
        t: Instant,
        reqs: f64,
    }

    impl Sim {
        fn new() -> Sim {
            let t = Instant::now();
            Sim { b: Batching::new(t), t, reqs: 0.0 }
        }

        /// Runs for `d`, the clients managing `rate(wait)` requests per second with the wait in
        /// use. Returns the wait in use at the end.
        fn run(&mut self, d: Duration, rate: impl Fn(u64) -> f64) -> u64 {
            let end = self.t + d;
            let mut wait = 0;
            while self.t < end {
                self.t += Duration::from_micros(10);
                self.reqs += rate(wait) * 10e-6;
                wait = self.b.after_turn(self.t, self.reqs as u64).as_micros() as u64;
            }
            wait
        }
    }

    /// Clients with a deep queue: every extra µs of wait moves more requests.
    fn deep(wait: u64) -> f64 {
        180_000.0 + 2_000.0 * wait as f64
    }

    #[test]
    fn a_deep_queue_gets_the_wait_that_moves_the_most_requests() {
        let mut s = Sim::new();
        assert_eq!(s.run(SETTLE / 2, deep), 0, "no wait before measuring");
        assert_eq!(s.run(SETTLE, deep), 40);
        // The clients change: now waiting hurts, and the next measurement sees it.
        let shallow = |w: u64| 170_000.0 - 3_000.0 * w as f64;
        assert_eq!(s.run(SETTLE * 2, shallow), 0);
    }

    #[test]
    fn a_light_load_is_never_held_back() {
        let mut s = Sim::new();
        let light = |w: u64| 30_000.0 + 1_000.0 * w as f64;
        for _ in 0..5 {
            assert_eq!(s.run(SETTLE, light), 0);
        }
    }

    #[test]
    fn a_pause_in_the_work_drops_the_wait_until_measured_again() {
        let mut s = Sim::new();
        assert_eq!(s.run(SETTLE * 2, deep), 40);
        s.t += IDLE;
        assert_eq!(s.b.after_turn(s.t, s.reqs as u64), Duration::ZERO);
    }

    #[test]
    fn small_gains_do_not_count() {
        let rates = [100.0, 104.0, 103.0, 101.0];
        assert_eq!(best(&rates), 0);
        assert_eq!(best(&[100.0, 110.0, 120.0, 115.0]), 2);
    }
}
