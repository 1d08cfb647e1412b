//! What a peer may not keep from us for ever: a connection that never finishes negotiating
//! (`--handshake-limit`), a WRITE payload started and never finished (`--stall-limit`), and more
//! connections than we admit (`--max-clients`). The reactor asks this module who is overdue and
//! closes them; the connections themselves only report their phase and progress.

use crate::token::ConnId;
use log::{info, warn};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How often connections mid-payload are checked for progress (the stall limit's resolution).
const SWEEP: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest a client may take from connecting to the end of negotiation.
    pub handshake: Option<Duration>,
    /// Longest a client may leave a WRITE payload unfinished without sending a byte of it.
    pub stall: Option<Duration>,
    /// Most NBD clients connected at once.
    pub max_clients: usize,
}

impl Limits {
    /// From the command line's seconds, where 0 means no limit.
    pub fn from_secs(handshake: u64, stall: u64, max_clients: usize) -> Limits {
        let secs = |s| (s > 0).then(|| Duration::from_secs(s));
        Limits { handshake: secs(handshake), stall: secs(stall), max_clients }
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::from_secs(10, 60, 1024)
    }
}

pub struct Watch {
    limits: Limits,
    /// Connections still negotiating, oldest first (every deadline is as long, so pushing at
    /// the back keeps them in order). Entries for connections that finished are dropped lazily.
    handshakes: VecDeque<(Instant, ConnId)>,
    /// Connection generation -> (payload bytes received, since when that count has not moved).
    stalls: HashMap<u64, (u64, Instant)>,
    next_sweep: Instant,
    /// Connections refused at the cap since the last W line; None while admitting.
    refused: Option<u64>,
}

impl Watch {
    pub fn new(limits: Limits, now: Instant) -> Watch {
        Watch {
            limits,
            handshakes: VecDeque::new(),
            stalls: HashMap::new(),
            next_sweep: now + SWEEP,
            refused: None,
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// A client was admitted.
    pub fn connected(&mut self, id: ConnId, now: Instant) {
        // A limit too far out to represent (a huge --handshake-limit) is no limit.
        if let Some(at) = self.limits.handshake.and_then(|d| now.checked_add(d)) {
            self.handshakes.push_back((at, id));
        }
    }

    /// Whether a new connection may be admitted with `clients` connected. The first refusal of
    /// a burst logs one W line; `client_left` ends the burst.
    pub fn admit(&mut self, clients: usize) -> bool {
        if clients < self.limits.max_clients {
            return true;
        }
        match &mut self.refused {
            Some(n) => *n += 1,
            None => {
                warn!(
                    "{clients} clients connected, the most allowed (--max-clients): refusing new connections"
                );
                self.refused = Some(1);
            }
        }
        false
    }

    /// A client left; with room again, the refusing burst (if any) is over.
    pub fn client_left(&mut self, clients: usize) {
        if clients < self.limits.max_clients
            && let Some(n) = self.refused.take()
        {
            info!("admitting clients again ({n} connections refused while full)");
        }
    }

    /// When the reactor must next check deadlines. `payloads` says whether any WRITE payload
    /// is buffered (reserved in the budget): without one nobody can stall mid-payload, and an
    /// idle server need not wake up for the sweep.
    pub fn next_deadline(&self, payloads: bool) -> Option<Instant> {
        let sweep = (payloads && self.limits.stall.is_some()).then_some(self.next_sweep);
        let hs = self.handshakes.front().map(|&(t, _)| t);
        match (sweep, hs) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Connections whose negotiation deadline has passed (whether they are still negotiating
    /// is for the caller to check).
    pub fn handshakes_due(&mut self, now: Instant) -> Vec<ConnId> {
        let mut due = Vec::new();
        while let Some(&(t, id)) = self.handshakes.front() {
            if t > now {
                break;
            }
            due.push(id);
            self.handshakes.pop_front();
        }
        due
    }

    /// Once per SWEEP: given each client's payload progress (Some(bytes received) while it owes
    /// us the rest of a payload and its socket is empty), returns those that have not moved for
    /// the stall limit, with how long.
    pub fn stalled(
        &mut self,
        now: Instant,
        probes: impl Iterator<Item = (ConnId, Option<u64>)>,
    ) -> Vec<(ConnId, Duration)> {
        let Some(limit) = self.limits.stall else { return Vec::new() };
        if now < self.next_sweep {
            return Vec::new();
        }
        self.next_sweep = now + SWEEP;
        let mut seen = HashMap::with_capacity(self.stalls.len());
        let mut out = Vec::new();
        for (id, probe) in probes {
            let Some(progress) = probe else { continue };
            let since = match self.stalls.get(&id.generation) {
                Some(&(p, since)) if p == progress => since,
                _ => now,
            };
            if now.duration_since(since) >= limit {
                out.push((id, now.duration_since(since)));
            } else {
                seen.insert(id.generation, (progress, since));
            }
        }
        self.stalls = seen;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> ConnId {
        ConnId { token: mio::Token(n as usize), generation: n }
    }

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn zero_seconds_means_no_limit() {
        let l = Limits::from_secs(0, 0, 5);
        assert_eq!((l.handshake, l.stall), (None, None));
        let mut w = Watch::new(l, Instant::now());
        w.connected(id(1), Instant::now());
        assert_eq!(w.next_deadline(true), None, "nothing to wake up for");
    }

    #[test]
    fn a_huge_limit_is_no_limit() {
        let now = Instant::now();
        let mut w = Watch::new(Limits::from_secs(u64::MAX, u64::MAX, usize::MAX), now);
        w.connected(id(1), now);
        assert_eq!(w.next_deadline(false), None);
        assert!(w.stalled(now + s(5), vec![(id(1), Some(1))].into_iter()).is_empty());
        assert!(w.admit(1_000_000));
    }

    #[test]
    fn handshake_deadlines_come_due_in_order() {
        let t0 = Instant::now();
        let mut w = Watch::new(Limits::from_secs(10, 0, 5), t0);
        w.connected(id(1), t0);
        w.connected(id(2), t0 + s(3));
        assert_eq!(w.next_deadline(false), Some(t0 + s(10)));
        assert!(w.handshakes_due(t0 + s(9)).is_empty());
        assert_eq!(w.handshakes_due(t0 + s(10)), vec![id(1)]);
        assert_eq!(w.next_deadline(false), Some(t0 + s(13)));
        assert_eq!(w.handshakes_due(t0 + s(20)), vec![id(2)]);
        assert_eq!(w.next_deadline(false), None);
    }

    #[test]
    fn a_payload_that_does_not_move_for_the_limit_is_stalled() {
        let t0 = Instant::now();
        let mut w = Watch::new(Limits::from_secs(0, 5, 5), t0);
        let probes = |a: Option<u64>, b: Option<u64>| vec![(id(1), a), (id(2), b)].into_iter();
        assert!(w.stalled(t0 + s(1), probes(Some(10), Some(10))).is_empty());
        // Client 2 moves on, client 1 does not.
        assert!(w.stalled(t0 + s(3), probes(Some(10), Some(20))).is_empty());
        assert!(w.stalled(t0 + s(4), probes(Some(10), Some(20))).is_empty(), "4 s without progress");
        let out = w.stalled(t0 + s(6), probes(Some(10), Some(20)));
        assert_eq!(out, vec![(id(1), s(5))]);
        // A client that finished its payload (None) starts afresh next time.
        assert!(w.stalled(t0 + s(8), probes(None, None)).is_empty());
        assert!(w.stalled(t0 + s(9), probes(Some(20), None)).is_empty());
    }

    #[test]
    fn the_stall_check_runs_once_per_sweep() {
        let t0 = Instant::now();
        let mut w = Watch::new(Limits::from_secs(0, 1, 5), t0);
        assert!(w.stalled(t0, vec![(id(1), Some(1))].into_iter()).is_empty(), "before the first sweep");
        assert!(w.stalled(t0 + s(1), vec![(id(1), Some(1))].into_iter()).is_empty());
        assert_eq!(w.next_deadline(true), Some(t0 + s(2)));
        assert_eq!(w.next_deadline(false), None, "no payloads, no sweeps");
    }

    #[test]
    fn refusals_at_the_cap_end_when_a_client_leaves() {
        let mut w = Watch::new(Limits::from_secs(0, 0, 2), Instant::now());
        assert!(w.admit(1));
        assert!(!w.admit(2));
        assert!(!w.admit(2));
        assert_eq!(w.refused, Some(2));
        w.client_left(2);
        assert_eq!(w.refused, Some(2), "still full");
        w.client_left(1);
        assert_eq!(w.refused, None);
    }
}
