//! A deterministic simulation of a migration, in the spirit of FoundationDB's and TigerBeetle's
//! simulators: the real `Source` state machine against a simulated destination that speaks NBD
//! (with our own parsers), simulated clients writing to the source's in-memory disk, and a
//! simulated network that delays, splits, cuts and hangs connections. One seeded RNG drives every
//! choice and time is virtual, so `run(seed, cfg)` replays exactly.
//!
//! The sim plays the reactor's part as `event_loop.rs` and `conn/mirror.rs` do: socket and disk
//! actions first, then Hold/Release/...; a client write completes on the source's disk, is
//! reported with `ClientWrote`, and only then acknowledged; after `Hold` no client request starts
//! and `ClientWritesIdle` follows once no client write is in flight.
//!
//! Invariants, checked after every step (a failure is a `Violation` naming seed, step and time):
//! 1. at `HandedOver`, every acknowledged client write is on the destination, and its durable
//!    content equals the source's disk;
//! 2. the destination counts the migration complete (its sender said goodbye after everything
//!    it wrote was durable, as `ClientConn::flush` does) only when its data is durable, and it
//!    does so after a handover the network carried;
//! 3. a freeze (Hold until Release or HandedOver) never outlasts the freeze limit plus the tick
//!    granularity;
//! 4. no attempt loops without a status change: every new attempt follows a counted failure, at
//!    most ~one attempt per `RETRY_DELAY`, and each event yields a bounded number of actions;
//! 5. the source never hands over while clients run or a client write is in flight;
//! 6. the source only sends what the destination offered (flags, commands, ranges);
//! 7. once the faults stop, the run ends (handover or give up) within `converge_within`.

use super::source::{Source, Spec};
use super::{Action, Event, Mode, Written};
// The resume token of a `listen` server (moving to migration::dest).
use super::dest::Lineage;
use crate::export::Extent;
use crate::proto::handshake as hs;
use crate::proto::transmission::{self as tx, Request};
use crate::proto::*;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

/// Extents and the dirty map both work in 4 KiB blocks.
const BLOCK: u64 = 4096;
/// Timers fire at their deadline plus up to this (a poll timeout's rounding).
pub const TICK_GRANULARITY: Duration = Duration::from_millis(1);
/// The source's `RETRY_DELAY`: attempts come at most this often.
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// Lines of trace kept for a violation.
const TRACE_LINES: usize = 120;

// ---------------------------------------------------------------------------------------------
// Configuration and results

/// What every seed shares; the rest (sizes, latencies, flags, fault rates) comes from the seed.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Faults happen only before this much virtual time (each seed picks a window up to it).
    pub fault_window: Duration,
    /// Once the faults stop, the run must end within this.
    pub converge_within: Duration,
    /// Scales how often faults come (0: none).
    pub fault_rate: f64,
    /// Bytes of a connection the source closed may still arrive once a partition heals, after
    /// its next connection is up (an orphaned socket's retransmissions).
    pub stale_deliveries: bool,
    /// The destination stops applying a sender's older connections when it declares itself on
    /// a new one (see the report on issue 21: the real one does not yet).
    pub fence_old_senders: bool,
    /// A destination whose disk fails for good may also exit after each failure (and be started
    /// again), as a `listen` that cannot write does.
    pub lasting_fault_exits: bool,
    pub max_steps: u64,
    /// Keep a trace of the last steps (a violation is replayed with it on).
    pub trace: bool,
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig {
            fault_window: Duration::from_secs(20),
            converge_within: Duration::from_secs(600),
            fault_rate: 1.0,
            stale_deliveries: false,
            fence_old_senders: false,
            lasting_fault_exits: false,
            // A slow link with a tiny socket buffer moves an export a few KiB per event, over
            // and over when the destination keeps dying: many steps, all in virtual time. A
            // livelock shows as events at one instant (below) long before this.
            max_steps: 20_000_000,
            trace: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    HandedOver,
    GaveUp(String),
    /// Still retrying, each attempt counted, against a destination that keeps failing and
    /// exiting: its error reply can be lost with its socket, so nothing on the wire says the
    /// failure is for good (a source retries a destination that dies, as the manual says).
    Retrying,
}

/// What a run that kept every invariant did.
#[derive(Debug, Clone)]
pub struct Report {
    pub seed: u64,
    pub steps: u64,
    pub elapsed: Duration,
    pub outcome: Outcome,
    pub attempts: u32,
    pub failed_attempts: u32,
    pub freezes: u32,
    pub freezes_abandoned: u32,
    pub acked_writes: u64,
    pub dest_restarts: u32,
    pub dest_complete: bool,
    pub longest_freeze: Duration,
    /// Client writes whose acknowledgement waited for the destination (active mirroring).
    pub active_writes: u64,
}

#[derive(Debug, Clone)]
pub struct Violation {
    pub seed: u64,
    pub step: u64,
    pub at: Duration,
    pub message: String,
    /// The last steps before it (filled by replaying the seed with tracing on).
    pub trace: Vec<String>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "seed {} step {} at {:?}: {}", self.seed, self.step, self.at, self.message)?;
        for l in &self.trace {
            writeln!(f, "  {l}")?;
        }
        Ok(())
    }
}

/// Runs one seed. The same seed and config always make the same run.
pub fn run(seed: u64, cfg: &SimConfig) -> Result<Report, Violation> {
    let r = World::new(seed, cfg).run();
    match r {
        Err(mut v) if !cfg.trace => {
            // Replay with the trace on: deterministic, so the same violation comes back.
            let traced = SimConfig { trace: true, ..cfg.clone() };
            if let Err(t) = World::new(seed, &traced).run() {
                v.trace = t.trace;
            }
            Err(v)
        }
        other => other,
    }
}

/// Turns fuzzer bytes into a seed and a config (8 bytes of seed, then knobs).
pub fn from_bytes(data: &[u8]) -> (u64, SimConfig) {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    let seed = u64::from_le_bytes(b);
    let knob = |i: usize| data.get(8 + i).copied().unwrap_or(0);
    let cfg = SimConfig {
        fault_window: Duration::from_millis(100 * u64::from(knob(0)) + 1),
        fault_rate: f64::from(knob(1) % 8) / 2.0,
        stale_deliveries: knob(2) & 1 != 0,
        fence_old_senders: knob(2) & 2 != 0,
        lasting_fault_exits: knob(2) & 4 != 0,
        max_steps: 400_000,
        ..SimConfig::default()
    };
    (seed, cfg)
}

// ---------------------------------------------------------------------------------------------
// Rng: splitmix64, small and good enough to pick schedules.

#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// 0..n (0 when n is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// lo..=hi
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }

    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64) / ((1u64 << 53) as f64) < p
    }

    pub fn micros(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_micros(self.range(lo, hi))
    }

    /// Spread over orders of magnitude: lo..hi, log-uniform.
    pub fn log_range(&mut self, lo: u64, hi: u64) -> u64 {
        let (l, h) = ((lo.max(1) as f64).ln(), (hi.max(1) as f64).ln());
        let x = ((self.next_u64() >> 11) as f64) / ((1u64 << 53) as f64);
        (l + (h - l) * x).exp() as u64
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// What a seed picks for its run.
#[derive(Debug, Clone)]
struct Params {
    size: u64,
    /// One way.
    latency: Duration,
    /// Bytes per second each way.
    bandwidth: u64,
    /// Bytes the source's socket takes before a send blocks.
    sndbuf: usize,
    dest_flags: u16,
    dest_features: u64,
    clients: usize,
    client_requests: u32,
    think_max: Duration,
    max_write: u64,
    freeze_limit: Duration,
    request_limit: Duration,
    max_bps: Option<u64>,
    /// How client writes reach the destination (active mirroring needs its FUA).
    mode: Mode,
    /// Faults come this often on average, until `fault_end`.
    fault_every: Duration,
    fault_end: Duration,
}

impl Params {
    fn pick(rng: &mut Rng, cfg: &SimConfig) -> Params {
        let mut size = if rng.chance(0.85) { rng.range(4, 64) * BLOCK } else { rng.range(64, 512) * BLOCK };
        if rng.chance(0.3) {
            // An odd tail: the last block is partial.
            size += rng.range(1, BLOCK - 1);
        }
        let mut dest_flags = TF_HAS_FLAGS;
        for (flag, p) in
            [(TF_SEND_FLUSH, 0.9), (TF_SEND_FUA, 0.7), (TF_SEND_WRITE_ZEROES, 0.6), (TF_SEND_TRIM, 0.5)]
        {
            if rng.chance(p) {
                dest_flags |= flag;
            }
        }
        let faulty = cfg.fault_rate > 0.0 && rng.chance(0.8);
        let mut p = Params {
            size,
            latency: Duration::from_micros(rng.log_range(10, 40_000)),
            bandwidth: rng.log_range(5 << 20, 2 << 30),
            sndbuf: rng.log_range(4096, 4 << 20) as usize,
            dest_flags,
            dest_features: if rng.chance(0.5) { SENDER_FEATURE_FUA_HANDOVER } else { 0 },
            clients: rng.below(5) as usize,
            client_requests: rng.log_range(1, 2000) as u32,
            think_max: Duration::from_micros(rng.log_range(50, 50_000)),
            max_write: rng.log_range(1, 128 * 1024),
            freeze_limit: Duration::from_millis(rng.range(50, 2000)),
            // Raised below to what one freeze needs at this latency and bandwidth.
            request_limit: Duration::from_millis(rng.range(500, 10_000)),
            max_bps: rng.chance(0.15).then(|| rng.log_range(1 << 20, 1 << 30)),
            mode: match rng.below(4) {
                0 => Mode::Background,
                1 => Mode::Active,
                _ => Mode::Auto,
            },
            fault_every: Duration::from_micros(
                (rng.log_range(2_000, 3_000_000) as f64 / cfg.fault_rate.max(1e-3)) as u64,
            ),
            fault_end: if faulty {
                Duration::from_micros(rng.range(0, cfg.fault_window.as_micros() as u64))
            } else {
                Duration::ZERO
            },
        };
        // A freeze needs two round trips (final writes, then FLUSH) and the last dirty data's
        // time on the wire: below that no attempt can finish, and the source retries forever
        // (reported on issue 21; not what this simulation looks for).
        let rtt = p.latency * 2;
        // A socket buffer sends at most itself per round trip.
        let bps = (p.bandwidth as f64).min(p.sndbuf as f64 / rtt.as_secs_f64().max(1e-6));
        let wire = Duration::from_secs_f64(2.0 * (256 * 1024) as f64 / bps);
        p.freeze_limit = p.freeze_limit.max(rtt * 4 + wire + Duration::from_millis(100));
        // Likewise a request limit shorter than one chunk's time on the wire is never met (the
        // source retries forever; reported on issue 21).
        let chunk = Duration::from_secs_f64(4.0 * p.size.min(super::source::CHUNK) as f64 / bps);
        p.request_limit = p.request_limit.max(chunk + rtt * 8 + Duration::from_millis(200));
        p
    }
}

// ---------------------------------------------------------------------------------------------
// Event queue: ordered by (time, sequence), so equal times keep their scheduling order.

/// Events at one virtual instant beyond which the run is stuck (nothing a source or network
/// does needs that many without time passing).
const SAME_INSTANT_LIMIT: u64 = 100_000;

#[derive(Debug)]
enum Ev {
    Tick,
    /// A wakeup for another reason (the reactor's loop turns for other sockets): a Tick too.
    Wake,
    ConnectDone {
        link: usize,
        ok: bool,
    },
    /// The source's socket takes more of its queue.
    Drain {
        link: usize,
    },
    /// The head of a pipe arrives.
    Arrive {
        link: usize,
        down: bool,
    },
    ReadExec {
        attempt: u32,
        offset: u64,
        len: usize,
    },
    ReadDone {
        attempt: u32,
        offset: u64,
        len: usize,
        result: Result<Vec<Extent>, ()>,
        buf: Vec<u8>,
    },
    ClientStart(usize),
    ClientExec(usize),
    ClientDone(usize),
    /// The destination finished a request of one of its connections.
    DestDone {
        link: usize,
        incarnation: u32,
        req: Request,
        payload: Vec<u8>,
    },
    Fault,
    MaxBps(u64),
}

struct Scheduled {
    at: Duration,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    // Reversed: BinaryHeap pops the greatest, we want the earliest.
    fn cmp(&self, o: &Self) -> Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Default)]
struct Queue {
    heap: BinaryHeap<Scheduled>,
    seq: u64,
}

impl Queue {
    fn at(&mut self, at: Duration, ev: Ev) {
        self.seq += 1;
        self.heap.push(Scheduled { at, seq: self.seq, ev });
    }
}

// ---------------------------------------------------------------------------------------------
// Disk: the source's export, in memory.

struct Disk {
    data: Vec<u8>,
}

impl Disk {
    /// Extents of [off, off+len) as the disk pool reports them: all-zero 4 KiB blocks are holes.
    fn extents(&self, off: u64, len: usize) -> Vec<Extent> {
        let mut out: Vec<Extent> = Vec::new();
        let end = off + len as u64;
        let mut pos = off;
        while pos < end {
            let next = ((pos / BLOCK + 1) * BLOCK).min(end);
            let blk = (pos / BLOCK * BLOCK) as usize
                ..((pos / BLOCK + 1) * BLOCK).min(self.data.len() as u64) as usize;
            let flags = if self.data[blk].iter().all(|&b| b == 0) { STATE_HOLE | STATE_ZERO } else { 0 };
            let n = (next - pos) as u32;
            match out.last_mut() {
                Some((l, f)) if *f == flags => *l += n,
                _ => out.push((n, flags)),
            }
            pos = next;
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Net: connections as pairs of byte pipes.

#[derive(Debug)]
enum Seg {
    Data(Vec<u8>),
    /// The sender's end: a close, or a reset.
    End {
        broken: bool,
    },
}

#[derive(Default)]
struct Pipe {
    /// (arrival time, segment), arrival times non-decreasing: a connection keeps its order.
    segs: VecDeque<(Duration, Seg)>,
    armed: bool,
    /// When the link is free to carry the next byte.
    busy_until: Duration,
    in_flight: usize,
    ended: bool,
}

impl Pipe {
    /// Keeps the first `keep` bytes in flight and drops the rest (a cut at any byte).
    fn truncate(&mut self, mut keep: usize) {
        let mut out = VecDeque::new();
        while let Some((t, s)) = self.segs.pop_front() {
            match s {
                Seg::Data(mut d) if keep > 0 => {
                    d.truncate(keep);
                    keep -= d.len();
                    out.push_back((t, Seg::Data(d)));
                }
                _ => break,
            }
        }
        self.in_flight = out.iter().map(|(_, s)| if let Seg::Data(d) = s { d.len() } else { 0 }).sum();
        self.segs = out;
        // An end was at the tail, so it went too: the caller puts the new one.
        self.ended = false;
    }

    fn last_arrival(&self) -> Duration {
        self.segs.back().map_or(Duration::ZERO, |(t, _)| *t)
    }
}

/// One connection: the source's end, the destination's end and the pipes between them.
#[derive(Default)]
struct Link {
    /// Source to destination.
    up: Pipe,
    /// Destination to source.
    down: Pipe,
    /// The source's send queue: bytes that have not left it yet.
    out: Vec<u8>,
    /// What of `out` has left already.
    out_pos: usize,
    draining: bool,
    src_open: bool,
    /// Reset: the source's sends fail.
    cut: bool,
    hung_until: Duration,
    dest: Option<DestConn>,
}

// ---------------------------------------------------------------------------------------------
// DestSim: a `listen` server's disk, resume token and connections.

#[derive(Debug, PartialEq, Eq)]
enum DPhase {
    Flags,
    Options,
    Transmission,
    Closed,
}

#[derive(Debug)]
struct DestConn {
    incarnation: u32,
    phase: DPhase,
    buf: Vec<u8>,
    declared: Option<u64>,
    sender: bool,
    /// Requests being processed.
    pending: usize,
    disc: bool,
    /// Sequence of the last write not yet durable by our own rule, and what FLUSHes covered.
    last_undurable: u64,
    flushed_upto: u64,
    /// The sender came back on another connection: this one no longer changes the file.
    fenced: bool,
}

/// A disk that fails writes for a while.
#[derive(Debug, Clone, Copy)]
struct DiskFault {
    errno: NbdErr,
    p: f64,
    /// Stays after the fault window: the migration should give up.
    lasting: bool,
    /// After the error reply the server exits (as a `listen` that cannot write does) and is
    /// started again: the source sees the reply, then the close.
    exits: bool,
}

struct DestSim {
    flags: u16,
    features: u64,
    visible: Vec<u8>,
    durable: Vec<u8>,
    /// Ranges written since the last FLUSH (lost by a crash).
    volatile: Vec<(u64, u64)>,
    lineage: Lineage,
    incarnation: u32,
    down_until: Duration,
    fault: Option<DiskFault>,
    complete: bool,
    /// Writes accepted, for the FLUSH bookkeeping.
    write_seq: u64,
    restarts: u32,
}

impl DestSim {
    fn can(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    fn apply(&mut self, off: u64, data: Option<&[u8]>, len: u64, durable: bool) {
        let r = off as usize..(off + len) as usize;
        match data {
            Some(d) => self.visible[r.clone()].copy_from_slice(d),
            None => self.visible[r.clone()].fill(0),
        }
        if durable || !self.can(TF_SEND_FLUSH) {
            // Write-through: a server without FLUSH has nothing volatile.
            let (v, d) = (&self.visible, &mut self.durable);
            d[r.clone()].copy_from_slice(&v[r]);
        } else {
            self.volatile.push((off, len));
        }
    }

    fn flush(&mut self) {
        for (off, len) in self.volatile.drain(..) {
            let r = off as usize..(off + len) as usize;
            self.durable[r.clone()].copy_from_slice(&self.visible[r]);
        }
    }

    /// A crash: what was not durable is gone, and the token moves on.
    fn crash(&mut self, new_seed: u64) {
        for (off, len) in self.volatile.drain(..) {
            let r = off as usize..(off + len) as usize;
            self.visible[r.clone()].copy_from_slice(&self.durable[r]);
        }
        self.lineage = Lineage::new(new_seed);
        self.incarnation += 1;
        self.restarts += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// Clients writing to the source.

#[derive(Debug, Clone)]
enum COp {
    Write { offset: u64, data: Vec<u8> },
    Zero { offset: u64, len: u64 },
    Flush,
}

impl COp {
    fn range(&self) -> Option<(u64, u64)> {
        match self {
            COp::Write { offset, data } => Some((*offset, data.len() as u64)),
            COp::Zero { offset, len } => Some((*offset, *len)),
            COp::Flush => None,
        }
    }
}

#[derive(Default)]
struct ClientSim {
    op: Option<COp>,
    /// Wanted to start while clients were held.
    deferred: bool,
    left: u32,
}

#[derive(Default)]
struct Clients {
    list: Vec<ClientSim>,
    writes_in_flight: usize,
    requests: u64,
    seen_requests: u64,
    acked: u64,
    /// Per block: the last acknowledged write touching it (for messages).
    last_acked: Vec<u64>,
}

// ---------------------------------------------------------------------------------------------
// World: everything, and the step loop.

type R = Result<(), String>;

struct World<'c> {
    seed: u64,
    cfg: &'c SimConfig,
    p: Params,
    rng: Rng,
    q: Queue,
    base: Instant,
    now: Duration,
    step: u64,
    source: Source,
    disk: Disk,
    clients: Clients,
    links: Vec<Link>,
    cur: Option<usize>,
    dest: DestSim,
    held: Option<Duration>,
    /// Client writes whose acknowledgement the source holds back (active mirroring):
    /// ticket -> (client, offset, len); `delay_asked` is the ticket it just asked to hold.
    delayed: HashMap<u64, (usize, u64, u64)>,
    delay_asked: Option<u64>,
    tickets: u64,
    /// Failed attempts when the time to converge ran out (see `Outcome::Retrying`).
    failed_at_limit: Option<u32>,
    /// Events in a row at the same virtual instant.
    same_instant: u64,
    active_writes: u64,
    next_tick: Option<Duration>,
    outcome: Option<Outcome>,
    handed_over_at: Option<Duration>,
    // Invariant 4.
    attempts: u32,
    last_failed: u32,
    connects: VecDeque<Duration>,
    freezes: u32,
    longest_freeze: Duration,
    trace: VecDeque<String>,
}

impl<'c> World<'c> {
    fn new(seed: u64, cfg: &'c SimConfig) -> World<'c> {
        let mut rng = Rng::new(seed);
        let p = Params::pick(&mut rng, cfg);
        let base = Instant::now();
        let size = p.size as usize;
        // The source: a mix of data and all-zero blocks; the destination: old garbage.
        let mut data = vec![0u8; size];
        let mut garbage = vec![0u8; size];
        for (blk, g) in data.chunks_mut(BLOCK as usize).zip(garbage.chunks_mut(BLOCK as usize)) {
            if rng.chance(0.5) {
                rng.fill(blk);
            }
            if rng.chance(0.3) {
                rng.fill(g);
            }
        }
        let spec = Spec {
            target: "sim".into(),
            max_bps: p.max_bps,
            mode: p.mode,
            freeze_limit: p.freeze_limit,
            request_limit: p.request_limit,
        };
        let sender = rng.next_u64();
        let source = Source::new(spec, "sim".into(), p.size, sender, base);
        let dest = DestSim {
            flags: p.dest_flags,
            features: p.dest_features,
            visible: garbage.clone(),
            durable: garbage,
            volatile: Vec::new(),
            lineage: Lineage::new(rng.next_u64()),
            incarnation: 0,
            down_until: Duration::ZERO,
            fault: None,
            complete: false,
            write_seq: 0,
            restarts: 0,
        };
        let blocks = p.size.div_ceil(BLOCK) as usize;
        let clients = Clients {
            list: (0..p.clients)
                .map(|_| ClientSim { left: p.client_requests, ..Default::default() })
                .collect(),
            last_acked: vec![0; blocks],
            ..Default::default()
        };
        let mut w = World {
            seed,
            cfg,
            p,
            rng,
            q: Queue::default(),
            base,
            now: Duration::ZERO,
            step: 0,
            source,
            disk: Disk { data },
            clients,
            links: Vec::new(),
            cur: None,
            dest,
            held: None,
            delayed: HashMap::new(),
            delay_asked: None,
            tickets: 0,
            failed_at_limit: None,
            same_instant: 0,
            active_writes: 0,
            next_tick: None,
            outcome: None,
            handed_over_at: None,
            attempts: 0,
            last_failed: 0,
            connects: VecDeque::new(),
            freezes: 0,
            longest_freeze: Duration::ZERO,
            trace: VecDeque::new(),
        };
        w.q.at(Duration::ZERO, Ev::Tick);
        w.q.at(Duration::ZERO, Ev::Wake);
        for c in 0..w.p.clients {
            let t = w.rng.micros(0, 2000);
            w.q.at(t, Ev::ClientStart(c));
        }
        if w.p.fault_end > Duration::ZERO {
            let t = w.fault_gap();
            w.q.at(t, Ev::Fault);
        }
        if w.rng.chance(0.1) {
            let t = w.rng.micros(0, 200_000);
            let bps = if w.rng.chance(0.5) { 0 } else { w.rng.log_range(1 << 20, 1 << 30) };
            w.q.at(t, Ev::MaxBps(bps));
        }
        w
    }

    fn violation(&self, message: String) -> Violation {
        Violation {
            seed: self.seed,
            step: self.step,
            at: self.now,
            message,
            trace: self.trace.iter().cloned().collect(),
        }
    }

    fn faults_on(&self) -> bool {
        self.now < self.p.fault_end && self.outcome.is_none()
    }

    fn fault_gap(&mut self) -> Duration {
        let mean = self.p.fault_every.as_micros() as u64;
        self.rng.micros(1, 2 * mean.max(1))
    }

    fn log(&mut self, line: impl FnOnce() -> String) {
        if self.cfg.trace {
            if self.trace.len() == TRACE_LINES {
                self.trace.pop_front();
            }
            let l = format!("#{} {:?}: {}", self.step, self.now, line());
            self.trace.push_back(l);
        }
    }

    fn run(mut self) -> Result<Report, Violation> {
        let limit = self.p.fault_end + self.cfg.converge_within;
        loop {
            let Some(s) = self.q.heap.pop() else {
                return Err(
                    self.violation("(7) nothing left to happen, yet the migration is not over".into())
                );
            };
            self.same_instant = if s.at == self.now { self.same_instant + 1 } else { 0 };
            if self.same_instant > SAME_INSTANT_LIMIT {
                return Err(
                    self.violation(format!("(4) {SAME_INSTANT_LIMIT} events at one instant: a livelock"))
                );
            }
            self.now = s.at;
            self.step += 1;
            if self.step > self.cfg.max_steps {
                return Err(self.violation(format!("(7) no end after {} steps", self.cfg.max_steps)));
            }
            if self.now > limit && self.outcome.is_none() {
                // Given a minute more, a source facing a destination that keeps dying must show
                // it is still trying: a new failed attempt (status changes).
                let dying = self.dest.fault.is_some_and(|f| f.lasting && f.exits);
                let base = *self.failed_at_limit.get_or_insert(self.source.failed_attempts());
                if dying && self.source.failed_attempts() > base {
                    self.outcome = Some(Outcome::Retrying);
                    break;
                }
                if !dying || self.now > limit + Duration::from_secs(60) {
                    return Err(self.violation(format!(
                        "(7) not over {:?} after the faults stopped",
                        self.cfg.converge_within
                    )));
                }
            }
            if let Err(m) = self.handle(s.ev).and_then(|_| self.check()) {
                return Err(self.violation(m));
            }
            match &self.outcome {
                None => self.arm_tick(),
                Some(Outcome::GaveUp(_) | Outcome::Retrying) => break,
                // Let the network carry the goodbye to the destination, then check it took over.
                Some(Outcome::HandedOver) => {
                    if self.q.heap.iter().all(|s| !matches!(s.ev, Ev::Arrive { .. } | Ev::DestDone { .. })) {
                        break;
                    }
                }
            }
        }
        if let Err(m) = self.epilogue() {
            return Err(self.violation(m));
        }
        Ok(Report {
            seed: self.seed,
            steps: self.step,
            elapsed: self.now,
            outcome: self.outcome.clone().unwrap_or(Outcome::GaveUp(String::new())),
            attempts: self.attempts,
            failed_attempts: self.source.failed_attempts(),
            freezes: self.freezes,
            freezes_abandoned: self.source.freezes_abandoned(),
            acked_writes: self.clients.acked,
            dest_restarts: self.dest.restarts,
            dest_complete: self.dest.complete,
            longest_freeze: self.longest_freeze,
            active_writes: self.active_writes,
        })
    }

    fn epilogue(&mut self) -> R {
        match self.outcome {
            Some(Outcome::HandedOver) if !self.dest.complete => {
                Err("(2) handed over, but the destination never counted the migration complete".into())
            }
            Some(Outcome::GaveUp(_)) if self.dest.complete => {
                Err("(2) the destination took over, yet the source gave up and lets clients go on".into())
            }
            _ => Ok(()),
        }
    }

    /// Makes sure a Tick comes at the source's deadline (plus a poll's rounding).
    fn arm_tick(&mut self) {
        let Some(d) = self.source.deadline(self.base + self.now) else { return };
        let at = d.saturating_duration_since(self.base).max(self.now) + self.rng.micros(1, 1000);
        if self.next_tick.is_none_or(|t| at < t) {
            self.next_tick = Some(at);
            self.q.at(at, Ev::Tick);
        }
    }

    /// Invariants that hold between any two steps.
    fn check(&mut self) -> R {
        if let Some(since) = self.held {
            let held = self.now - since;
            if held > self.p.freeze_limit + TICK_GRANULARITY {
                return Err(format!(
                    "(3) clients held for {held:?}, over the freeze limit {:?}",
                    self.p.freeze_limit
                ));
            }
        }
        Ok(())
    }

    fn handle(&mut self, ev: Ev) -> R {
        if self.outcome.is_some() && !matches!(ev, Ev::Arrive { .. } | Ev::DestDone { .. }) {
            return Ok(());
        }
        // FLEXNBD_SIM_EVENTS=1: every event goes into a replay's trace too.
        static EVENTS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *EVENTS.get_or_init(|| std::env::var_os("FLEXNBD_SIM_EVENTS").is_some()) {
            self.log(|| format!("event {}", format!("{ev:?}").split([' ', '{', '(']).next().unwrap_or("")));
        }
        match ev {
            Ev::Tick => {
                if self.next_tick.is_some_and(|t| t <= self.now) {
                    self.next_tick = None;
                }
                self.log(|| "tick".into());
                self.feed(Event::Tick)
            }
            Ev::Wake => {
                let t = self.now + self.rng.micros(1000, 2_000_000);
                self.q.at(t, Ev::Wake);
                self.feed(Event::Tick)
            }
            Ev::MaxBps(n) => self.feed(Event::MaxBps(n)),
            Ev::ConnectDone { link, ok } => self.connect_done(link, ok),
            Ev::Drain { link } => {
                self.links[link].draining = false;
                match self.drain(link) {
                    Some(ev) => self.feed_feedback(ev),
                    None => Ok(()),
                }
            }
            Ev::Arrive { link, down } => self.arrive(link, down),
            Ev::ReadExec { attempt, offset, len } => {
                let buf = self.disk.data[offset as usize..offset as usize + len].to_vec();
                let result = if self.faults_on() && self.rng.chance(0.01) {
                    Err(())
                } else {
                    Ok(self.disk.extents(offset, len))
                };
                let t = self.now + self.rng.micros(0, 1000);
                self.q.at(t, Ev::ReadDone { attempt, offset, len, result, buf });
                Ok(())
            }
            Ev::ReadDone { attempt, offset, len, result, buf } => {
                self.log(|| format!("read done attempt {attempt} {offset}+{len} ok={}", result.is_ok()));
                let result = result.map_err(|()| std::io::Error::from_raw_os_error(libc::EIO));
                self.feed(Event::ReadDone { attempt, offset, len, result, buf })
            }
            Ev::ClientStart(c) => self.client_start(c),
            Ev::ClientExec(c) => {
                match self.clients.list[c].op.as_ref() {
                    Some(COp::Write { offset, data }) => {
                        let o = *offset as usize;
                        self.disk.data[o..o + data.len()].copy_from_slice(data);
                    }
                    Some(COp::Zero { offset, len }) => {
                        self.disk.data[*offset as usize..(*offset + *len) as usize].fill(0);
                    }
                    _ => {}
                }
                let t = self.now + self.rng.micros(0, 500);
                self.q.at(t, Ev::ClientDone(c));
                Ok(())
            }
            Ev::ClientDone(c) => self.client_done(c),
            Ev::DestDone { link, incarnation, req, payload } => {
                self.dest_done(link, incarnation, req, payload)
            }
            Ev::Fault => self.fault(),
        }
    }

    // -- the source and the reactor's part -----------------------------------------------------

    /// One event to the source, as `MirrorConn::feed` gives it (clients' activity first).
    fn feed(&mut self, ev: Event<'_>) -> R {
        let now = self.base + self.now;
        let mut acts = Vec::new();
        if self.clients.requests != self.clients.seen_requests {
            self.clients.seen_requests = self.clients.requests;
            self.source.handle(now, Event::ClientsBusy, &mut acts);
        }
        self.source.handle(now, ev, &mut acts);
        self.carry_out(acts)
    }

    /// What carrying out a socket action reports back (`mirror.rs` feeds it without ClientsBusy).
    fn feed_feedback(&mut self, ev: Event<'_>) -> R {
        let mut acts = Vec::new();
        self.source.handle(self.base + self.now, ev, &mut acts);
        self.carry_out(acts)
    }

    fn action_bound(&self) -> usize {
        // A read's extents alternate at most per block, two sends each; plus a few others.
        64 + 4 * self.p.size.div_ceil(BLOCK) as usize
    }

    /// Socket and disk actions first (as `MirrorConn::carry_out`), then the reactor's, in order.
    fn carry_out(&mut self, mut acts: Vec<Action>) -> R {
        if acts.len() > self.action_bound() {
            return Err(format!("(4) {} actions for one event", acts.len()));
        }
        let mut theirs = Vec::new();
        for _ in 0..64 {
            let mut sent = false;
            for a in acts.drain(..) {
                match a {
                    Action::Connect => self.connect()?,
                    Action::Send(b) => {
                        self.log(|| format!("send {}", describe_send(&b)));
                        let Some(l) = self.cur else { return Err("Send with no connection".into()) };
                        self.links[l].out.extend_from_slice(&b);
                        sent = true;
                    }
                    Action::Read { attempt, offset, len } => {
                        let t = self.now + self.rng.micros(0, 2000);
                        self.q.at(t, Ev::ReadExec { attempt, offset, len });
                    }
                    Action::Recycle(_) => {}
                    Action::Disconnect => self.disconnect(),
                    other => theirs.push(other),
                }
            }
            let Some(l) = self.cur.filter(|_| sent) else { break };
            if self.links[l].draining {
                break;
            }
            // The socket may take everything at once, or later.
            if self.rng.chance(0.6) {
                let Some(ev) = self.drain(l) else { break };
                self.source.handle(self.base + self.now, ev, &mut acts);
                if acts.len() > self.action_bound() {
                    return Err(format!("(4) {} actions for one event", acts.len()));
                }
            } else {
                self.links[l].draining = true;
                let t = self.now + self.rng.micros(0, 500);
                self.q.at(t, Ev::Drain { link: l });
                break;
            }
        }
        for a in theirs {
            if self.outcome.is_some() {
                break;
            }
            self.log(|| format!("action {a:?}"));
            match a {
                Action::Hold => {
                    if self.held.is_some() {
                        return Err("Hold while clients are already held".into());
                    }
                    self.held = Some(self.now);
                    self.freezes += 1;
                    if self.clients.writes_in_flight == 0 {
                        self.feed(Event::ClientWritesIdle)?;
                    }
                }
                Action::Release => {
                    let Some(since) = self.held.take() else {
                        return Err("Release with no clients held".into());
                    };
                    self.longest_freeze = self.longest_freeze.max(self.now - since);
                    for c in 0..self.clients.list.len() {
                        if std::mem::take(&mut self.clients.list[c].deferred) {
                            self.q.at(self.now, Ev::ClientStart(c));
                        }
                    }
                }
                Action::Started => {}
                Action::Delay(t) => {
                    if !self.source_mode_may_delay() {
                        return Err(format!("(6) held write {t} back from a destination without FUA"));
                    }
                    self.delay_asked = Some(t);
                    self.active_writes += 1;
                }
                Action::Ack(t) => {
                    if self.delay_asked == Some(t) {
                        // Released in the same call that held it back.
                        self.delay_asked = None;
                        continue;
                    }
                    let Some((c, offset, len)) = self.delayed.remove(&t) else {
                        return Err(format!("Ack of write {t}, which is not held"));
                    };
                    self.client_acked(c, offset, len);
                }
                Action::GaveUp(msg) => {
                    if self.held.is_some() {
                        return Err("(3) gave up with clients still held".into());
                    }
                    if !self.delayed.is_empty() {
                        return Err(format!(
                            "gave up with {} client writes still held back",
                            self.delayed.len()
                        ));
                    }
                    self.outcome = Some(Outcome::GaveUp(msg));
                }
                Action::HandedOver => {
                    self.handed_over()?;
                    // Clients are the destination's now; the freeze is over.
                    self.held = None;
                    self.outcome = Some(Outcome::HandedOver);
                    self.handed_over_at = Some(self.now);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Active mirroring acknowledges through the destination's FUA only.
    fn source_mode_may_delay(&self) -> bool {
        self.p.mode != Mode::Background && self.p.dest_flags & TF_SEND_FUA != 0
    }

    /// Invariants 1 and 5, at the moment the source hands over.
    fn handed_over(&mut self) -> R {
        if !self.delayed.is_empty() {
            return Err(format!("(5) handed over with {} client writes still held back", self.delayed.len()));
        }
        let Some(since) = self.held else { return Err("(5) handed over while clients were not held".into()) };
        self.longest_freeze = self.longest_freeze.max(self.now - since);
        if self.now - since > self.p.freeze_limit + TICK_GRANULARITY {
            return Err(format!("(3) handed over after a freeze of {:?}", self.now - since));
        }
        if self.clients.writes_in_flight > 0 {
            return Err(format!(
                "(5) handed over with {} client writes in flight",
                self.clients.writes_in_flight
            ));
        }
        if let Some(off) = first_diff(&self.dest.durable, &self.disk.data) {
            let blk = (off / BLOCK) as usize;
            let id = self.clients.last_acked[blk];
            let on_visible = self.dest.visible[off as usize] == self.disk.data[off as usize];
            let what = if id > 0 {
                format!("(1) acknowledged client write #{id} (block {blk}) is missing on the destination")
            } else {
                "(1) the destination's content differs from the source's".into()
            };
            return Err(format!(
                "{what} at handover: first difference at offset {off}{}",
                if on_visible { " (there, but not durable)" } else { "" }
            ));
        }
        Ok(())
    }

    // -- network ---------------------------------------------------------------------------------

    fn connect(&mut self) -> R {
        self.attempts += 1;
        // Invariant 4: a new attempt follows a counted failure, and attempts are spaced out.
        let failed = self.source.failed_attempts();
        if self.attempts > 1 && failed <= self.last_failed {
            return Err(format!(
                "(4) attempt {} without a counted failure (failed_attempts {failed})",
                self.attempts
            ));
        }
        self.last_failed = failed;
        self.connects.push_back(self.now);
        while self.connects.front().is_some_and(|t| self.now - *t > Duration::from_secs(60)) {
            self.connects.pop_front();
        }
        if self.connects.len() as u64 > 60 / RETRY_DELAY.as_secs() + 1 {
            return Err(format!("(4) {} attempts within a minute", self.connects.len()));
        }
        let link = self.links.len();
        self.links.push(Link { src_open: true, ..Default::default() });
        self.cur = Some(link);
        self.log(|| format!("connect: link {link}"));
        let (refused, hang) = if self.now < self.dest.down_until || self.dest.complete {
            (true, false)
        } else if self.faults_on() && self.attempts > 1 && self.rng.chance(0.15) {
            let hang = self.rng.chance(0.3);
            (!hang, hang)
        } else {
            (false, false)
        };
        if hang {
            // No answer at all: the source's connect timeout ends it.
            return Ok(());
        }
        let t = self.now + self.p.latency * 2 + self.rng.micros(0, 100);
        self.q.at(t, Ev::ConnectDone { link, ok: !refused });
        Ok(())
    }

    fn connect_done(&mut self, link: usize, ok: bool) -> R {
        if self.cur != Some(link) {
            return Ok(());
        }
        if !ok || self.now < self.dest.down_until {
            return self.feed(Event::ConnectFailed("connection refused".into()));
        }
        self.links[link].dest = Some(DestConn {
            incarnation: self.dest.incarnation,
            phase: DPhase::Flags,
            buf: Vec::new(),
            declared: None,
            sender: false,
            pending: 0,
            disc: false,
            last_undurable: 0,
            flushed_upto: 0,
            fenced: false,
        });
        let mut g = Vec::new();
        hs::encode_newstyle_greeting(&mut g, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        self.send_down(link, g);
        self.feed(Event::Connected)
    }

    /// Moves what the source's socket takes into the network; reports Drained once its queue
    /// is empty, or Broken if the connection was reset.
    fn drain(&mut self, link: usize) -> Option<Event<'static>> {
        let l = &mut self.links[link];
        if !l.src_open || l.out.is_empty() {
            return None;
        }
        if l.cut {
            l.out.clear();
            l.out_pos = 0;
            return (self.cur == Some(link)).then(|| Event::Broken("send: connection reset by peer".into()));
        }
        let room = self.p.sndbuf.saturating_sub(l.up.in_flight);
        let n = room.min(l.out.len() - l.out_pos);
        if n > 0 {
            // Taken from a cursor: a small socket buffer takes megabytes a few KiB at a time.
            let bytes = if l.out_pos == 0 && n == l.out.len() {
                std::mem::take(&mut l.out)
            } else {
                let b = l.out[l.out_pos..l.out_pos + n].to_vec();
                l.out_pos += n;
                if l.out_pos == l.out.len() {
                    l.out.clear();
                    l.out_pos = 0;
                }
                b
            };
            self.push(link, false, bytes);
        }
        // Otherwise the next arrival on this pipe makes room and drains again.
        (self.links[link].out.is_empty() && self.cur == Some(link)).then_some(Event::Drained)
    }

    /// Puts bytes on a pipe in one to three pieces, each arriving after latency and its share of
    /// the bandwidth.
    fn push(&mut self, link: usize, down: bool, bytes: Vec<u8>) {
        let (lat, bw) = (self.p.latency, self.p.bandwidth);
        let pieces = self.rng.range(1, 3) as usize;
        let mut cuts: Vec<usize> =
            (1..pieces).map(|_| self.rng.below(bytes.len() as u64 + 1) as usize).collect();
        cuts.sort_unstable();
        cuts.push(bytes.len());
        let jitter = self.rng.micros(0, lat.as_micros() as u64 / 4);
        let now = self.now;
        let pipe = if down { &mut self.links[link].down } else { &mut self.links[link].up };
        if pipe.ended {
            return;
        }
        let mut from = 0;
        for to in cuts {
            if to <= from {
                continue;
            }
            let n = to - from;
            pipe.busy_until = pipe.busy_until.max(now) + Duration::from_nanos(n as u64 * 1_000_000_000 / bw);
            let at = (pipe.busy_until + lat + jitter).max(pipe.last_arrival());
            pipe.in_flight += n;
            pipe.segs.push_back((at, Seg::Data(bytes[from..to].to_vec())));
            from = to;
        }
        self.arm(link, down);
    }

    fn push_end(&mut self, link: usize, down: bool, broken: bool) {
        let now = self.now + self.p.latency;
        let pipe = if down { &mut self.links[link].down } else { &mut self.links[link].up };
        if std::mem::replace(&mut pipe.ended, true) {
            return;
        }
        let at = now.max(pipe.last_arrival());
        pipe.segs.push_back((at, Seg::End { broken }));
        self.arm(link, down);
    }

    fn arm(&mut self, link: usize, down: bool) {
        let l = &mut self.links[link];
        let hung = l.hung_until;
        let pipe = if down { &mut l.down } else { &mut l.up };
        if pipe.armed {
            return;
        }
        if let Some((t, _)) = pipe.segs.front() {
            pipe.armed = true;
            let at = (*t).max(hung);
            self.q.at(at, Ev::Arrive { link, down });
        }
    }

    fn send_down(&mut self, link: usize, bytes: Vec<u8>) {
        if !self.links[link].cut {
            self.push(link, true, bytes);
        }
    }

    /// Delivers what has arrived at the head of a pipe: data (coalesced, as one read would), then
    /// an end if one follows.
    fn arrive(&mut self, link: usize, down: bool) -> R {
        let hung = self.links[link].hung_until;
        let pipe = if down { &mut self.links[link].down } else { &mut self.links[link].up };
        pipe.armed = false;
        if self.now < hung {
            self.arm(link, down);
            return Ok(());
        }
        let mut data = Vec::new();
        let mut end = None;
        while let Some((t, _)) = pipe.segs.front() {
            if *t > self.now || (!data.is_empty() && !self.rng.chance(0.7)) {
                break;
            }
            match pipe.segs.pop_front().map(|(_, s)| s) {
                Some(Seg::Data(d)) => {
                    pipe.in_flight -= d.len();
                    data.extend_from_slice(&d);
                }
                Some(Seg::End { broken }) => {
                    end = Some(broken);
                    break;
                }
                None => break,
            }
        }
        self.arm(link, down);
        if down {
            // The source reads only its current connection.
            if self.cur != Some(link) || !self.links[link].src_open {
                return Ok(());
            }
            if !data.is_empty() {
                self.log(|| format!("source receives {} bytes", data.len()));
                self.feed(Event::Received(&data))?;
            }
            if let Some(broken) = end
                && self.cur == Some(link)
            {
                self.log(|| format!("source sees the end (broken={broken})"));
                let ev =
                    if broken { Event::Broken("connection reset by peer".into()) } else { Event::Closed };
                self.feed(ev)?;
            }
        } else {
            if !data.is_empty() {
                self.dest_receive(link, &data)?;
            }
            if end.is_some() {
                self.dest_close(link);
            }
            // Room in the socket: the source's queue drains further.
            let l = &mut self.links[link];
            if !l.out.is_empty() && !l.draining && l.src_open {
                l.draining = true;
                self.q.at(self.now, Ev::Drain { link });
            }
        }
        Ok(())
    }

    /// The source closes its connection (`MirrorConn::teardown`): unsent bytes are dropped; bytes
    /// in flight still arrive, then the close, unless the link was hung and stale deliveries
    /// are off (a reset then drops them).
    fn disconnect(&mut self) {
        let Some(link) = self.cur.take() else { return };
        self.log(|| format!("disconnect link {link}"));
        // A reset drops what is in flight; the source has read everything by a handover, so that
        // one closes cleanly.
        let reset =
            self.links[link].hung_until > self.now && !self.cfg.stale_deliveries && !self.source.over();
        let l = &mut self.links[link];
        l.src_open = false;
        l.out.clear();
        l.out_pos = 0;
        l.down.segs.clear();
        l.down.in_flight = 0;
        if reset {
            l.up.truncate(0);
            self.push_end(link, false, true);
        } else {
            self.push_end(link, false, false);
        }
    }

    // -- faults -----------------------------------------------------------------------------------

    fn fault(&mut self) -> R {
        if !self.faults_on() {
            // The window is over: a disk that failed for a while recovers.
            if self.dest.fault.is_some_and(|f| !f.lasting) {
                self.dest.fault = None;
            }
            return Ok(());
        }
        let t = self.now + self.fault_gap();
        self.q.at(t.min(self.p.fault_end), Ev::Fault);
        let kind = self.rng.below(100);
        let cur = self.cur;
        match (kind, cur) {
            (0..=29, Some(link)) => {
                // Cut at any byte: each direction keeps a prefix of what is in flight.
                let (up, down) = (self.links[link].up.in_flight, self.links[link].down.in_flight);
                let (ku, kd) =
                    (self.rng.below(up as u64 + 1) as usize, self.rng.below(down as u64 + 1) as usize);
                let (bu, bd) = (self.rng.chance(0.5), self.rng.chance(0.5));
                self.log(|| format!("fault: cut link {link} (keep {ku}/{up} up, {kd}/{down} down)"));
                let l = &mut self.links[link];
                l.cut = true;
                l.up.truncate(ku);
                l.down.truncate(kd);
                self.push_end(link, false, bu);
                self.push_end(link, true, bd);
            }
            (30..=54, Some(link)) => {
                let d = self.rng.micros(10_000, 2 * self.p.request_limit.as_micros() as u64);
                self.log(|| format!("fault: link {link} hangs for {d:?}"));
                let l = &mut self.links[link];
                l.hung_until = l.hung_until.max(self.now + d);
            }
            (55..=64, _) => self.restart(),
            (65..=79, _) => {
                let errno = if self.rng.chance(0.5) { NbdErr::NoSpc } else { NbdErr::Io };
                let p = [0.02, 0.3, 1.0][self.rng.below(3) as usize];
                let lasting = self.rng.chance(0.1);
                let exits = self.rng.chance(0.5) && (!lasting || self.cfg.lasting_fault_exits);
                self.log(|| {
                    format!("fault: destination disk fails writes ({errno:?}, p={p}, lasting={lasting})")
                });
                self.dest.fault = Some(DiskFault { errno, p, lasting, exits });
            }
            _ => {
                if self.dest.fault.is_some_and(|f| !f.lasting) {
                    self.dest.fault = None;
                }
            }
        }
        Ok(())
    }

    /// The destination crashes and comes back after a while.
    fn restart(&mut self) {
        let down = self.rng.micros(0, 3_000_000);
        let seed = self.rng.next_u64();
        self.log(|| format!("destination restarts, down for {down:?}"));
        self.dest.crash(seed);
        self.dest.down_until = self.now + down;
        for link in 0..self.links.len() {
            if self.links[link].dest.take().is_some() {
                self.links[link].cut = true;
                self.links[link].up.truncate(0);
                self.push_end(link, true, true);
            }
        }
    }

    // -- clients ----------------------------------------------------------------------------------

    fn client_start(&mut self, c: usize) -> R {
        if self.held.is_some() {
            self.clients.list[c].deferred = true;
            return Ok(());
        }
        let cl = &mut self.clients.list[c];
        if cl.left == 0 || cl.op.is_some() {
            return Ok(());
        }
        cl.left -= 1;
        let size = self.p.size;
        let offset = self.rng.below(size);
        let len = self.rng.range(1, self.p.max_write).min(size - offset);
        let op = match self.rng.below(10) {
            0..=6 => {
                let mut data = vec![0u8; len as usize];
                self.rng.fill(&mut data);
                COp::Write { offset, data }
            }
            7 | 8 => COp::Zero { offset, len },
            _ => COp::Flush,
        };
        self.clients.requests += 1;
        let t = self.now + self.rng.micros(0, 2000);
        if op.range().is_some() {
            self.clients.writes_in_flight += 1;
            self.q.at(t, Ev::ClientExec(c));
        } else {
            self.q.at(t, Ev::ClientDone(c));
        }
        self.clients.list[c].op = Some(op);
        Ok(())
    }

    /// Completion: on the disk already; reported to the source, then acknowledged (at once,
    /// or when the source says so if it holds the acknowledgement back).
    fn client_done(&mut self, c: usize) -> R {
        let Some(op) = self.clients.list[c].op.take() else { return Ok(()) };
        if let Some((offset, len)) = op.range() {
            self.clients.writes_in_flight -= 1;
            self.tickets += 1;
            let ticket = self.tickets;
            let what = match &op {
                COp::Write { data, .. } => Written::Data(data),
                _ => Written::Zeroes,
            };
            self.delay_asked = None;
            self.feed(Event::ClientWrote { offset, len, what, ticket })?;
            if self.held.is_some() && self.clients.writes_in_flight == 0 {
                self.feed(Event::ClientWritesIdle)?;
            }
            if self.delay_asked.take() == Some(ticket) && self.outcome.is_none() {
                self.delayed.insert(ticket, (c, offset, len));
                return Ok(());
            }
            self.client_acked(c, offset, len);
            return Ok(());
        }
        let t = self.now + self.rng.micros(0, self.p.think_max.as_micros() as u64);
        self.q.at(t, Ev::ClientStart(c));
        Ok(())
    }

    /// A client hears its write is done, and goes on.
    fn client_acked(&mut self, c: usize, offset: u64, len: u64) {
        self.clients.acked += 1;
        let id = self.clients.acked;
        for b in offset / BLOCK..(offset + len).div_ceil(BLOCK) {
            self.clients.last_acked[b as usize] = id;
        }
        let t = self.now + self.rng.micros(0, self.p.think_max.as_micros() as u64);
        self.q.at(t, Ev::ClientStart(c));
    }

    // -- destination ------------------------------------------------------------------------------

    fn dest_receive(&mut self, link: usize, data: &[u8]) -> R {
        let Some(dc) = self.links[link].dest.as_mut() else { return Ok(()) };
        if dc.phase == DPhase::Closed || dc.fenced {
            return Ok(());
        }
        dc.buf.extend_from_slice(data);
        loop {
            let Some(dc) = self.links[link].dest.as_mut() else { return Ok(()) };
            match dc.phase {
                DPhase::Flags => {
                    let Some((_, used)) = hs::parse_client_flags(&dc.buf).map_err(|e| format!("(6) {e}"))?
                    else {
                        return Ok(());
                    };
                    dc.buf.drain(..used);
                    dc.phase = DPhase::Options;
                }
                DPhase::Options => {
                    let Some((o, used)) = hs::parse_option(&dc.buf).map_err(|e| format!("(6) {e}"))? else {
                        return Ok(());
                    };
                    let (code, data) = (o.code, o.data.to_vec());
                    dc.buf.drain(..used);
                    self.dest_option(link, code, &data)?;
                }
                DPhase::Transmission => {
                    // Parsed from a cursor, and the buffer compacted once: a pass can arrive
                    // in one piece of megabytes.
                    let mut pos = 0;
                    let mut reqs = Vec::new();
                    while let Some((req, used)) =
                        tx::parse_request(&dc.buf[pos..]).map_err(|e| format!("(6) {e}"))?
                    {
                        let plen = if req.kind == Cmd::Write as u16 { req.len as usize } else { 0 };
                        if dc.buf.len() < pos + used + plen {
                            break;
                        }
                        reqs.push((req, dc.buf[pos + used..pos + used + plen].to_vec()));
                        pos += used + plen;
                    }
                    dc.buf.drain(..pos);
                    for (req, payload) in reqs {
                        self.dest_request(link, req, payload)?;
                    }
                    return Ok(());
                }
                DPhase::Closed => return Ok(()),
            }
        }
    }

    fn dest_option(&mut self, link: usize, code: u32, data: &[u8]) -> R {
        let mut out = Vec::new();
        let fence = self.cfg.fence_old_senders;
        let dest = &mut self.dest;
        let Some(dc) = self.links[link].dest.as_mut() else { return Ok(()) };
        match OptCode::try_from(code) {
            Ok(OptCode::FlexnbdSender) if data.len() == 8 => {
                dc.declared = Some(be64(data));
                hs::encode_option_reply(&mut out, code, RepType::Ack, &dest.features.to_be_bytes());
            }
            Ok(OptCode::FlexnbdMigrate) if data.is_empty() => {
                if !dc.sender {
                    dest.lineage.sender_joined();
                }
                dc.sender = true;
                let token = dest.lineage.sender(dc.declared);
                hs::encode_option_reply(&mut out, code, RepType::Ack, &token.to_be_bytes());
                if fence {
                    // Older connections of a sender stop changing the file once it is back.
                    for (i, l) in self.links.iter_mut().enumerate() {
                        if i != link
                            && let Some(o) = l.dest.as_mut()
                        {
                            o.fenced = true;
                        }
                    }
                }
            }
            Ok(OptCode::Go) => {
                let info = hs::info_export(self.p.size, dest.flags);
                hs::encode_option_reply(&mut out, code, RepType::Info, &info);
                hs::encode_option_reply(&mut out, code, RepType::Ack, &[]);
                dc.phase = DPhase::Transmission;
            }
            _ => hs::encode_option_reply(&mut out, code, RepType::ErrUnsup, b"unsupported option"),
        }
        self.send_down(link, out);
        Ok(())
    }

    /// Checks a request against what we offered (invariant 6), then processes it after a delay.
    fn dest_request(&mut self, link: usize, req: Request, payload: Vec<u8>) -> R {
        let dest = &mut self.dest;
        let Some(dc) = self.links[link].dest.as_mut() else { return Ok(()) };
        let Some(cmd) = req.cmd() else { return Err(format!("(6) unknown command {}", req.kind)) };
        if dc.disc {
            return Err(format!("(6) {} after DISC", cmd.name()));
        }
        if !tx::flags_fit(cmd, req.flags, false) {
            return Err(format!("(6) flags {:#x} on {}", req.flags, cmd.name()));
        }
        if req.flags & CMD_FLAG_FUA != 0 && !dest.can(TF_SEND_FUA) {
            return Err(format!("(6) {} with FUA, which the destination did not offer", cmd.name()));
        }
        let offered = match cmd {
            Cmd::Write | Cmd::Disc => true,
            Cmd::Flush => dest.can(TF_SEND_FLUSH),
            Cmd::WriteZeroes => dest.can(TF_SEND_WRITE_ZEROES),
            Cmd::Trim => dest.can(TF_SEND_TRIM),
            _ => false,
        };
        if !offered {
            return Err(format!(
                "(6) {} sent, which the destination did not offer (flags {:#x})",
                cmd.name(),
                dest.flags
            ));
        }
        if matches!(cmd, Cmd::Write | Cmd::WriteZeroes | Cmd::Trim)
            && (req.len == 0 || req.offset + u64::from(req.len) > self.p.size)
        {
            return Err(format!("(6) {} at {}+{} outside the export", cmd.name(), req.offset, req.len));
        }
        match cmd {
            Cmd::Disc => {
                dc.disc = true;
                if dc.pending == 0 {
                    self.dest_finish(link)?;
                }
                return Ok(());
            }
            Cmd::Write | Cmd::WriteZeroes | Cmd::Trim => {
                // Our completion rule: durable once a later FLUSH is done, or at once for a FUA
                // write where we told the sender we count it.
                dest.write_seq += 1;
                let fua_counts =
                    req.flags & CMD_FLAG_FUA != 0 && dest.features & SENDER_FEATURE_FUA_HANDOVER != 0;
                if !fua_counts && dest.can(TF_SEND_FLUSH) {
                    dc.last_undurable = dest.write_seq;
                }
            }
            _ => {}
        }
        dc.pending += 1;
        let incarnation = dc.incarnation;
        let t = self.now + self.rng.micros(0, 3000);
        self.q.at(t, Ev::DestDone { link, incarnation, req, payload });
        Ok(())
    }

    fn dest_done(&mut self, link: usize, incarnation: u32, req: Request, payload: Vec<u8>) -> R {
        if incarnation != self.dest.incarnation {
            // It crashed while working on it.
            return Ok(());
        }
        let fail = self.dest.fault.is_some_and(|f| self.rng.chance(f.p));
        let Some(dc) = self.links[link].dest.as_mut() else { return Ok(()) };
        dc.pending -= 1;
        if dc.fenced {
            return Ok(());
        }
        let write_seq = self.dest.write_seq;
        let mut error = 0;
        match req.cmd() {
            Some(Cmd::Write | Cmd::WriteZeroes | Cmd::Trim) if fail => {
                error = self.dest.fault.map_or(NbdErr::Io, |f| f.errno) as u32;
            }
            Some(Cmd::Flush) if fail && self.rng.chance(0.2) => error = NbdErr::Io as u32,
            Some(c @ (Cmd::Write | Cmd::WriteZeroes | Cmd::Trim)) => {
                let durable = req.flags & CMD_FLAG_FUA != 0;
                let data = (c == Cmd::Write).then_some(payload.as_slice());
                self.dest.apply(req.offset, data, u64::from(req.len), durable);
            }
            Some(Cmd::Flush) => {
                self.dest.flush();
                dc.flushed_upto = write_seq;
            }
            _ => {}
        }
        let (pending, disc, open) = (dc.pending, dc.disc, dc.phase != DPhase::Closed);
        if open {
            self.send_down(link, tx::encode_simple_reply(error, req.cookie).to_vec());
        }
        if error != 0 && req.cmd() != Some(Cmd::Flush) && self.dest.fault.is_some_and(|f| f.exits) {
            self.log(|| "destination: write failed, exiting".into());
            self.push_end(link, true, false);
            self.restart();
            return Ok(());
        }
        if disc && pending == 0 {
            self.dest_finish(link)?;
        }
        Ok(())
    }

    /// Goodbye with nothing pending: the migration is complete if the sender's writes are all
    /// durable by our rule; invariant 2 checks that against the disk.
    fn dest_finish(&mut self, link: usize) -> R {
        let Some(dc) = self.links[link].dest.as_mut() else { return Ok(()) };
        if dc.sender && dc.last_undurable <= dc.flushed_upto && !self.dest.complete {
            self.log(|| "destination: migration complete".into());
            if let Some(off) = first_diff(&self.dest.durable, &self.dest.visible) {
                return Err(format!("(2) destination complete with data not yet durable at offset {off}"));
            }
            if let Some(off) = first_diff(&self.dest.durable, &self.disk.data) {
                return Err(format!("(2) destination complete, but differs from the source at offset {off}"));
            }
            self.dest.complete = true;
        }
        self.dest_close(link);
        self.push_end(link, true, false);
        Ok(())
    }

    fn dest_close(&mut self, link: usize) {
        if let Some(dc) = self.links[link].dest.as_mut()
            && dc.phase != DPhase::Closed
        {
            dc.phase = DPhase::Closed;
            if dc.sender && dc.incarnation == self.dest.incarnation {
                self.dest.lineage.sender_left();
            }
        }
    }
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<u64> {
    if a == b {
        return None;
    }
    a.iter().zip(b).position(|(x, y)| x != y).map(|p| p as u64)
}

/// A Send's first bytes as a request, for the trace.
fn describe_send(b: &[u8]) -> String {
    match tx::parse_request(b) {
        Ok(Some((r, _))) => {
            let name = r.cmd().map_or("?", Cmd::name);
            format!("{name} cookie {} {}+{} flags {:#x}", r.cookie, r.offset, r.len, r.flags)
        }
        _ => format!("{} bytes", b.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs seeds 0..n: (handed over, given up, steps, handed over after active mirroring).
    fn seeds(n: u64, cfg: &SimConfig) -> (u64, u64, u64, u64) {
        let (mut handed, mut gave_up, mut steps, mut active) = (0, 0, 0, 0);
        for seed in 0..n {
            match run(seed, cfg) {
                Ok(r) => {
                    steps += r.steps;
                    match r.outcome {
                        Outcome::HandedOver => {
                            handed += 1;
                            active += u64::from(r.active_writes > 0);
                        }
                        Outcome::GaveUp(_) | Outcome::Retrying => gave_up += 1,
                    }
                }
                Err(v) => panic!("{v}"),
            }
        }
        (handed, gave_up, steps, active)
    }

    #[test]
    fn rng_replays() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        assert!((0..100).all(|_| a.next_u64() == b.next_u64()));
    }

    #[test]
    fn a_seed_replays_exactly() {
        let cfg = SimConfig::default();
        for seed in [1, 2, 3, 99] {
            let (a, b) = (run(seed, &cfg).expect("passes"), run(seed, &cfg).expect("passes"));
            assert_eq!((a.steps, a.elapsed, a.outcome), (b.steps, b.elapsed, b.outcome));
        }
    }

    /// Seeds that found an active write's acknowledgement released in the same call that
    /// held it back (the attempt failed at once), which the reactor then held for ever.
    #[test]
    fn found_seeds_replay_clean() {
        let cfg = SimConfig::default();
        for seed in [902, 2020, 2604, 3878, 7357, 10287] {
            if let Err(v) = run(seed, &cfg) {
                panic!("{v}");
            }
        }
    }

    #[test]
    fn without_faults_every_seed_hands_over() {
        let cfg = SimConfig { fault_rate: 0.0, ..SimConfig::default() };
        let (handed, gave_up, _, _) = seeds(300, &cfg);
        assert_eq!((handed, gave_up), (300, 0));
    }

    #[test]
    fn a_fixed_set_of_seeds_keeps_every_invariant() {
        // CI: a bounded number; more with FLEXNBD_SIM_SEEDS and the ignored test below.
        let (handed, gave_up, _, active) = seeds(800, &SimConfig::default());
        assert!(handed > gave_up, "{handed} handovers, {gave_up} given up");
        // Active mirroring is covered: handovers after client writes waited on the destination.
        assert!(active > 0, "no handover after active mirroring in {handed}");
        eprintln!("{handed} handovers ({active} after active mirroring), {gave_up} given up");
    }

    /// Found by this simulation (seed 35 with `lasting_fault_exits`, before the fix): a
    /// destination whose disk fails every write answers WRITE with ENOSPC and exits, as a
    /// `listen` that cannot write does; started again by its supervisor, it refuses the next
    /// attempt's first WRITE the same way. The connect failures in between used to reset the
    /// source's refusal streak, so it retried for ever; now it gives up.
    #[test]
    fn a_failing_destination_that_exits_after_each_refusal_is_given_up_on() {
        let cfg = SimConfig { lasting_fault_exits: true, ..SimConfig::default() };
        for seed in 0..200 {
            if let Err(v) = run(seed, &cfg) {
                panic!("{v}");
            }
        }
    }

    /// `FLEXNBD_SIM_SEEDS=1000000 cargo test --release --lib migration::sim -- --ignored --nocapture`
    /// (FLEXNBD_SIM_FIRST: the first seed, to split a run over processes).
    #[test]
    #[ignore]
    fn many_seeds() {
        let var = |k: &str, d: u64| std::env::var(k).ok().and_then(|s| s.parse().ok()).unwrap_or(d);
        let (n, first) = (var("FLEXNBD_SIM_SEEDS", 100_000), var("FLEXNBD_SIM_FIRST", 0));
        let cfg = SimConfig {
            stale_deliveries: var("FLEXNBD_SIM_STALE", 0) != 0,
            fence_old_senders: var("FLEXNBD_SIM_FENCE", 0) != 0,
            lasting_fault_exits: var("FLEXNBD_SIM_EXITS", 0) != 0,
            ..SimConfig::default()
        };
        let t = Instant::now();
        let mut s = Stats::default();
        let mut bad = Vec::new();
        for seed in first..first + n {
            match run(seed, &cfg) {
                Ok(r) => s.add(&r),
                Err(v) => {
                    println!("VIOLATION seed {seed} step {} at {:?}: {}", v.step, v.at, v.message);
                    if bad.is_empty() {
                        // The first one in full, with the trace of its last steps.
                        println!("{v}");
                    }
                    bad.push(seed);
                }
            }
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "{n} seeds from {first} in {secs:.1}s ({:.0} seeds/s), {} violations\n{s}",
            n as f64 / secs,
            bad.len()
        );
        assert!(bad.is_empty(), "failing seeds: {bad:?}");
    }

    #[derive(Default)]
    struct Stats {
        handed: u64,
        gave_up: u64,
        steps: u64,
        failed_attempts: u64,
        retried: u64,
        freezes: u64,
        freezes_abandoned: u64,
        restarts: u64,
        acked: u64,
        active: u64,
        why: std::collections::BTreeMap<String, u64>,
    }

    impl Stats {
        fn add(&mut self, r: &Report) {
            match r.outcome {
                Outcome::HandedOver => {
                    self.handed += 1;
                    self.active += u64::from(r.active_writes > 0);
                }
                Outcome::GaveUp(ref m) => {
                    self.gave_up += 1;
                    *self.why.entry(m.clone()).or_default() += 1;
                }
                Outcome::Retrying => {
                    self.gave_up += 1;
                    *self.why.entry("(still retrying a destination that keeps dying)".into()).or_default() +=
                        1;
                }
            }
            self.steps += r.steps;
            self.failed_attempts += u64::from(r.failed_attempts);
            self.retried += u64::from(r.failed_attempts > 0);
            self.freezes += u64::from(r.freezes);
            self.freezes_abandoned += u64::from(r.freezes_abandoned);
            self.restarts += u64::from(r.dest_restarts);
            self.acked += r.acked_writes;
        }
    }

    impl fmt::Display for Stats {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(
                f,
                "handed over {} ({} after active mirroring), gave up {}; steps {}; runs with retries {}, \
                 failed attempts {}; freezes {}, abandoned {}; destination restarts {}; client writes acknowledged {}",
                self.handed,
                self.active,
                self.gave_up,
                self.steps,
                self.retried,
                self.failed_attempts,
                self.freezes,
                self.freezes_abandoned,
                self.restarts,
                self.acked
            )?;
            for (m, n) in &self.why {
                write!(f, "\n  gave up {n}: {m}")?;
            }
            Ok(())
        }
    }
}
