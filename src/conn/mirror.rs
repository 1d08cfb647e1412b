//! Outbound migration: the source's NBD client session towards the destination, on the reactor.
//!
//! | state       | event                                   | next                           |
//! |-------------|-----------------------------------------|--------------------------------|
//! | Connecting  | connected                               | Hello                          |
//! | Hello       | oldstyle hello, sizes match             | Copying (reply "started")      |
//! | Hello       | newstyle greeting                       | Negotiating (MIGRATE + GO)     |
//! | Negotiating | GO acknowledged, sizes match            | Copying (reply "started")      |
//! | Copying     | pass done, remainder small or stuck     | Frozen (clients paused)        |
//! | Copying     | pass done, no checkpoint yet            | Checkpoint (FLUSH sent)        |
//! | Checkpoint  | FLUSH acknowledged                      | Copying (pass done, decide)    |
//! | Copying     | pass done, remainder large              | Copying (next pass over dirty) |
//! | Frozen      | no client write in flight               | Final (last dirty pass)        |
//! | Final       | everything acknowledged                 | Flushing (FLUSH sent)          |
//! | Flushing    | FLUSH acknowledged                      | Closing (DISC sent)            |
//! | Closing     | DISC written                            | handed over                    |
//! | any         | failure before the first hello          | refused (reported, no retry)   |
//! | any         | failure after a hello                   | Backoff -> Connecting          |
//!
//! Resuming: a flexnbd destination answers our migrate option (preceded by one carrying
//! `sender`, the same for every attempt) with a resume token (`Lineage` on its side: it changes when the file may
//! hold anything we did not write there). Each checkpoint (a FLUSH between passes) makes
//! everything acknowledged before it safe under that token; what a checkpoint does not cover is
//! the pass after it (`pass_origin`) plus every range dirtied since. After a failure the source
//! keeps tracking writes, and if the next attempt gets the same token it re-sends only that; any
//! other token or destination (or no checkpoint yet) gets a full copy.
//!
//! Every client write marks the dirty map when it completes (before it is acknowledged), so an
//! acknowledged write is either in data a pass read afterwards or still dirty; the freeze waits
//! for in-flight writes, and the handover happens only after the final pass is flushed.

use crate::buffer::{BufPool, OutQueue};
use crate::conn::control::MirrorAction;
use crate::dirty::DirtyMap;
use crate::event_loop::Core;
use crate::io_pool::{Completion, Job, Op};
use crate::listener::Socket;
use crate::proto::handshake::{self as hs, Greeting, ParseError};
use crate::proto::transmission::{self as tx, ReplyHeader, Request};
use crate::proto::*;
use crate::token::ConnId;
use log::{info, warn};
use mio::{Interest, Registry, Token};
use std::collections::HashMap;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Bytes one source read covers, and so the largest WRITE we send (the design allows 8 MiB;
/// smaller reads interleave better with client jobs in the disk pool and on the reactor).
pub const CHUNK: u64 = 2 * 1024 * 1024;
/// The read size while clients are at work. Sending a 2 MiB WRITE holds the reactor for about
/// half a millisecond on loopback, and a client request arriving then waits it out: measured
/// with 4 KiB writes at 2000 IOPS during a 128 MiB/s migration, p99 latency was 650 us with
/// 2 MiB reads, 70 us with 256 KiB and 40 us with 128 KiB (35 us without a migration), while
/// an idle 1 GiB migration ran at 1.9, 1.6 and 1.35 GB/s.
const CHUNK_BUSY: u64 = 128 * 1024;
/// Clients count as at work for this long after their last request.
const BUSY_WINDOW: Duration = Duration::from_millis(100);
/// Bytes being read or awaiting acknowledgement at once.
const MAX_IN_FLIGHT: u64 = 16 * CHUNK;
/// Source reads queued or running at once: fewer than the disk workers, so a client job
/// always finds a free one.
const MAX_READS: usize = 2;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// Passes after which we freeze even if the remainder still shrinks.
const MAX_PASSES: u32 = 16;
/// Freeze once the remainder would take this long to send at the measured rate. The original
/// allowed about a second; clients stall for the whole freeze, so we keep passing until it is
/// short (with a 4 KiB dirty grain, passes shrink fast even under a random-write load).
const FREEZE_BUDGET: Duration = Duration::from_millis(20);
/// A remainder this small is frozen for whatever the rate.
const FREEZE_ALWAYS: u64 = 256 * 1024;

#[derive(Debug, Clone)]
pub struct MirrorSpec {
    pub target: crate::net::Target,
    pub bind: Option<SocketAddr>,
    pub action: MirrorAction,
    pub max_bps: Option<u64>,
}

/// What the reactor must do after a mirror event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    None,
    /// First valid hello from the destination: tell the `mirror` client.
    Started,
    /// Failed before any hello: report and give up (the original's texts).
    Refused(&'static str),
    /// All data is on the destination, flushed, and the connection closed cleanly.
    HandedOver,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Hello,
    Negotiating,
    Copying,
    Checkpoint,
    Frozen,
    Final,
    Flushing,
    Closing,
    Backoff,
}

pub struct Mirror {
    pub spec: MirrorSpec,
    pub id: ConnId,
    state: State,
    deadline: Option<Instant>,
    stream: Option<Socket>,
    registered: Option<Interest>,
    rbuf: Vec<u8>,
    out: OutQueue,
    /// Read buffers come back here once their WRITE is on the socket.
    bufs: BufPool,
    write_blocked: bool,
    /// A destination has answered with a valid hello at least once: failures now retry.
    started: bool,
    /// Attempts that failed after `started` (each is retried).
    failed_attempts: u32,
    /// The destination's size from NBD_INFO_EXPORT, until GO is acknowledged.
    remote_size: Option<u64>,
    /// Resume token the destination offered in this attempt's negotiation.
    offered_instance: Option<u64>,
    /// The destination refused our migration option once already (warned about, once).
    plain_target: bool,
    /// Token the current (or last) attempt copied under.
    dest_instance: Option<u64>,
    /// Sent before our migration option: a destination hands the same token back to the same
    /// sender only (see `Lineage`).
    sender: u64,
    /// Set by a failure that left a usable checkpoint on `dest_instance`.
    resume_from: Option<u64>,
    /// A checkpoint holds on `dest_instance`; `pass_origin` is what it does not cover.
    checkpointed: bool,
    pass_origin: Option<DirtyMap>,
    checkpoint_cookie: Option<u64>,
    /// The current pass ended with a checkpoint already.
    pass_checkpointed: bool,
    pass: u32,
    cursor: u64,
    pass_map: Option<DirtyMap>,
    reads: usize,
    read_bytes: u64,
    /// `core.requests` when last looked at, and until when clients count as busy.
    seen_requests: u64,
    busy_until: Option<Instant>,
    inflight: HashMap<u64, u64>,
    inflight_bytes: u64,
    next_cookie: u64,
    flush_cookie: Option<u64>,
    last_pass_dirty: u64,
    last_reply: Instant,
    attempt_started: Instant,
    attempt_bytes: u64,
    freeze_started: Option<Instant>,
    pub began: Instant,
    pub bytes_sent: u64,
    pub waiters: Vec<Token>,
    pub start_waiter: Option<Token>,
    /// The `mirror` client asked to hear about the end too.
    pub wait_after_start: bool,
    request_limit: Duration,
}

impl Mirror {
    pub fn new(spec: MirrorSpec, id: ConnId, start_waiter: Token, sender: u64) -> Mirror {
        let now = Instant::now();
        let limit =
            std::env::var("FLEXNBD_MS_REQUEST_LIMIT_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
        Mirror {
            spec,
            id,
            sender,
            state: State::Backoff,
            deadline: Some(now),
            stream: None,
            registered: None,
            rbuf: Vec::new(),
            out: OutQueue::default(),
            bufs: BufPool::of_lengths(&[CHUNK as usize, CHUNK_BUSY as usize], MAX_IN_FLIGHT as usize),
            write_blocked: false,
            started: false,
            failed_attempts: 0,
            remote_size: None,
            offered_instance: None,
            plain_target: false,
            dest_instance: None,
            resume_from: None,
            checkpointed: false,
            pass_origin: None,
            checkpoint_cookie: None,
            pass_checkpointed: false,
            pass: 0,
            cursor: 0,
            pass_map: None,
            reads: 0,
            read_bytes: 0,
            seen_requests: 0,
            busy_until: None,
            inflight: HashMap::new(),
            inflight_bytes: 0,
            next_cookie: 1,
            flush_cookie: None,
            last_pass_dirty: u64::MAX,
            last_reply: now,
            attempt_started: now,
            attempt_bytes: 0,
            freeze_started: None,
            began: now,
            bytes_sent: 0,
            waiters: Vec::new(),
            start_waiter: Some(start_waiter),
            wait_after_start: false,
            request_limit: Duration::from_secs(limit),
        }
    }

    pub fn deadline(&self) -> Option<Instant> {
        let throttle = self.throttle_until();
        match (self.deadline, throttle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Bytes still to send: the rest of this pass plus everything dirtied since.
    pub fn bytes_left(&self, core: &Core) -> u64 {
        // Between attempts the last one's figures are stale: the next copies everything, or on
        // a resume what the checkpoint does not cover.
        if matches!(self.state, State::Backoff | State::Connecting | State::Hello | State::Negotiating) {
            return match (&self.resume_from, core.dirty.as_ref()) {
                (Some(_), Some(d)) => d.dirty_bytes(),
                _ => core.export.size(),
            };
        }
        let pass_left = if self.pass == 0 {
            core.export.size().saturating_sub(self.cursor)
        } else {
            self.pass_map.as_ref().map_or(0, DirtyMap::dirty_bytes)
        };
        // Ranges dirtied ahead of the sweep are counted twice (the sweep sends them anyway);
        // whatever the overlap, no more than the whole file is left.
        (pass_left
            + self.read_bytes
            + self.inflight_bytes
            + core.dirty.as_ref().map_or(0, DirtyMap::dirty_bytes))
        .min(core.export.size())
    }

    /// Average speed of the current attempt, bytes per second.
    pub fn speed(&self) -> u64 {
        let secs = self.attempt_started.elapsed().as_secs_f64();
        if secs > 0.0 { (self.attempt_bytes as f64 / secs) as u64 } else { 0 }
    }

    /// Attempts that failed and were retried so far.
    pub fn failed_attempts(&self) -> u32 {
        self.failed_attempts
    }

    /// Between a failed attempt and the next one's copying: waiting to reconnect, connecting
    /// or negotiating again.
    pub fn retrying(&self) -> bool {
        self.failed_attempts > 0
            && matches!(self.state, State::Backoff | State::Connecting | State::Hello | State::Negotiating)
    }

    pub fn set_max_bps(&mut self, n: u64) {
        self.spec.max_bps = if n == 0 { None } else { Some(n) };
    }

    /// Which migration this is, as told to destinations.
    pub fn sender(&self) -> u64 {
        self.sender
    }

    /// A control session waiting on this mirror went away.
    pub fn forget_waiter(&mut self, t: Token) {
        if self.start_waiter == Some(t) {
            self.start_waiter = None;
        }
        self.waiters.retain(|w| *w != t);
    }

    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.stream.as_ref().and_then(|s| s.local_addr().ok())
    }

    pub fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        self.stream.as_ref().and_then(|s| s.peer_addr().ok())
    }

    /// Stops everything (break, or the reactor is exiting); clients are thawed by the caller.
    pub fn teardown(&mut self, r: &Registry) {
        if let Some(mut s) = self.stream.take() {
            let _ = r.deregister(&mut s);
        }
        self.registered = None;
    }

    // ------------------------------------------------------------------------------------------

    fn connect(&mut self, core: &mut Core) -> Outcome {
        self.id.generation = core.next_generation();
        self.rbuf.clear();
        self.out.clear();
        self.write_blocked = false;
        let mut s = match crate::net::connect_nonblocking(&self.spec.target, self.spec.bind) {
            Ok(s) => s,
            Err(e) => return self.fail(core, "Mirror failed to connect", &format!("connect: {e}")),
        };
        let _ = s.set_nodelay(true);
        if let Err(e) = core.registry.register(&mut s, self.id.token, Interest::READABLE | Interest::WRITABLE)
        {
            return self.fail(core, "Mirror failed to connect", &format!("register: {e}"));
        }
        self.registered = Some(Interest::READABLE | Interest::WRITABLE);
        self.stream = Some(s);
        self.state = State::Connecting;
        self.deadline = Some(Instant::now() + CONNECT_TIMEOUT);
        info!("mirror {}: connecting to {}", self.id, self.spec.target);
        Outcome::None
    }

    /// Timers: connect/hello deadlines, request time limit, retry back-off, throttle.
    pub fn tick(&mut self, core: &mut Core) -> Outcome {
        let now = Instant::now();
        if let Some(d) = self.deadline
            && now >= d
        {
            self.deadline = None;
            return match self.state {
                State::Backoff => self.connect(core),
                State::Connecting => self.fail(core, "Mirror failed to connect", "connect timed out"),
                _ => self.fail(core, "Remote server failed to respond", "no hello in time"),
            };
        }
        let waiting =
            !self.inflight.is_empty() || self.checkpoint_cookie.is_some() || self.flush_cookie.is_some();
        if waiting && now.duration_since(self.last_reply) > self.request_limit {
            return self.fail(core, "Remote server failed to respond", "request unanswered for too long");
        }
        self.pump(core)
    }

    pub fn on_event(&mut self, core: &mut Core, readable: bool, writable: bool) -> Outcome {
        if self.state == State::Connecting && (writable || readable) {
            let Some(s) = self.stream.as_ref() else { return Outcome::None };
            match s.take_error() {
                Ok(Some(e)) | Err(e) => return self.fail(core, "Mirror failed to connect", &e.to_string()),
                Ok(None) => {}
            }
            match s.connected() {
                Ok(true) => {
                    self.state = State::Hello;
                    self.deadline = Some(Instant::now() + HELLO_TIMEOUT);
                    crate::event_loop::set_keepalive(std::os::unix::io::AsRawFd::as_raw_fd(s));
                }
                Ok(false) => return Outcome::None,
                Err(e) => return self.fail(core, "Mirror failed to connect", &e.to_string()),
            }
        }
        if writable {
            self.write_blocked = false;
        }
        let r = self.read_input(core);
        if r != Outcome::None {
            return r;
        }
        self.after_io(core)
    }

    fn after_io(&mut self, core: &mut Core) -> Outcome {
        if let Err(e) = self.write_out() {
            return self.fail(core, "Mirror failed to connect", &format!("send: {e}"));
        }
        if self.state == State::Closing && self.out.is_empty() {
            if let Some(s) = self.stream.as_ref() {
                let _ = s.shutdown(std::net::Shutdown::Write);
            }
            self.teardown(&core.registry);
            if let Some(f) = self.freeze_started {
                info!("mirror {}: handed over; clients were held for {:?}", self.id, f.elapsed());
            }
            return Outcome::HandedOver;
        }
        let want = if self.write_blocked || self.state == State::Connecting {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        if let Some(s) = self.stream.as_mut()
            && self.registered != Some(want)
        {
            if let Err(e) = core.registry.reregister(s, self.id.token, want) {
                return self.fail(core, "Mirror failed to connect", &e.to_string());
            }
            self.registered = Some(want);
        }
        Outcome::None
    }

    fn read_input(&mut self, core: &mut Core) -> Outcome {
        if matches!(self.state, State::Connecting | State::Backoff) {
            return Outcome::None;
        }
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let Some(s) = self.stream.as_mut() else { return Outcome::None };
            match s.read(&mut chunk) {
                Ok(0) => {
                    let why = if self.state == State::Hello {
                        "Mirror was rejected"
                    } else {
                        "Mirror failed to connect"
                    };
                    return self.fail(core, why, "destination closed the connection");
                }
                Ok(n) => self.rbuf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let why = if self.state == State::Hello {
                        "Mirror was rejected"
                    } else {
                        "Mirror failed to connect"
                    };
                    return self.fail(core, why, &e.to_string());
                }
            }
        }
        match self.parse(core) {
            Ok(o) => o,
            Err(e) => self.fail(core, "Remote server failed to respond", &format!("protocol error: {e}")),
        }
    }

    fn parse(&mut self, core: &mut Core) -> Result<Outcome, ParseError> {
        let mut pos = 0;
        let mut outcome = Outcome::None;
        loop {
            let rest = &self.rbuf[pos..];
            match self.state {
                State::Hello => {
                    let Some((g, used)) = hs::parse_greeting(rest)? else { break };
                    pos += used;
                    match g {
                        Greeting::Oldstyle { size, .. } => outcome = self.begin_copy(core, size),
                        Greeting::Newstyle { flags } => self.negotiate(flags),
                    }
                }
                State::Negotiating => {
                    let Some((r, used)) = hs::parse_option_reply(rest)? else { break };
                    let (opt, rep) = (r.opt, r.rep);
                    let info =
                        if rep == RepType::Info as u32 { hs::parse_info_export(r.data)? } else { None };
                    if opt == OptCode::FlexnbdMigrate as u32 {
                        if rep == RepType::Ack as u32 && r.data.len() == 8 {
                            self.offered_instance = Some(crate::proto::be64(r.data));
                        } else if rep & REP_FLAG_ERROR != 0
                            && !std::mem::replace(&mut self.plain_target, true)
                        {
                            // Still a valid target, but nothing there waits to take over: say so,
                            // since a script that expects a `listen` there has the wrong address.
                            warn!(
                                "mirror {}: destination is not a flexnbd listen server (it refused the \
                                 migration option); copying to it as a plain NBD server",
                                self.id
                            );
                        }
                    }
                    pos += used;
                    if opt == OptCode::Go as u32 {
                        if let Some((size, _)) = info {
                            self.remote_size = Some(size);
                        } else if rep == RepType::Ack as u32 {
                            let Some(size) = self.remote_size else {
                                return Err(ParseError::Malformed("GO acknowledged without the export size"));
                            };
                            outcome = self.begin_copy(core, size);
                        } else if rep & REP_FLAG_ERROR != 0 {
                            return Err(ParseError::Malformed("destination refused the export"));
                        }
                    }
                    // Replies to our migration option: ACK from a flexnbd listener, an error
                    // from other servers, which we can still copy to.
                }
                State::Copying | State::Checkpoint | State::Frozen | State::Final | State::Flushing => {
                    let Some((h, used)) = tx::parse_reply_header(rest)? else { break };
                    let ReplyHeader::Simple { error, cookie } = h else {
                        return Err(ParseError::Malformed("structured reply we did not ask for"));
                    };
                    pos += used;
                    self.last_reply = Instant::now();
                    if error != 0 {
                        return Err(ParseError::Malformed("destination replied with an error"));
                    }
                    if self.checkpoint_cookie == Some(cookie) {
                        // Everything sent so far is on the destination; what is not is in the
                        // dirty map, which a failure folds into what to re-send.
                        self.checkpoint_cookie = None;
                        self.checkpointed = true;
                        self.pass_origin = Some(DirtyMap::new(core.export.size()));
                        self.state = State::Copying;
                        info!("mirror {}: checkpoint after pass {} acknowledged", self.id, self.pass);
                        continue;
                    }
                    if self.flush_cookie == Some(cookie) {
                        self.flush_cookie = None;
                        let disc = Request { flags: 0, kind: Cmd::Disc as u16, cookie: 0, offset: 0, len: 0 };
                        self.out.push(disc.encode().to_vec());
                        self.state = State::Closing;
                        break;
                    }
                    let Some(len) = self.inflight.remove(&cookie) else {
                        return Err(ParseError::Malformed("reply to a request we did not send"));
                    };
                    self.inflight_bytes -= len;
                    self.bytes_sent += len;
                    self.attempt_bytes += len;
                }
                State::Connecting | State::Backoff | State::Closing => break,
            }
            if outcome != Outcome::None {
                break;
            }
        }
        self.rbuf.drain(..pos);
        if outcome == Outcome::None {
            outcome = self.pump(core);
        }
        Ok(outcome)
    }

    fn negotiate(&mut self, server_flags: u16) {
        let mut cflags = CLIENT_FIXED_NEWSTYLE;
        if server_flags & FLAG_NO_ZEROES != 0 {
            cflags |= CLIENT_NO_ZEROES;
        }
        let mut b = cflags.to_be_bytes().to_vec();
        hs::encode_option(&mut b, OptCode::FlexnbdSender as u32, &self.sender.to_be_bytes());
        hs::encode_option(&mut b, OptCode::FlexnbdMigrate as u32, &[]);
        let mut go = Vec::new();
        hs::encode_export_request(&mut go, b"", &[]);
        hs::encode_option(&mut b, OptCode::Go as u32, &go);
        self.out.push(b);
        self.remote_size = None;
        self.offered_instance = None;
        self.state = State::Negotiating;
    }

    fn begin_copy(&mut self, core: &mut Core, remote_size: u64) -> Outcome {
        let size = core.export.size();
        if remote_size != size {
            warn!("mirror {}: destination size {remote_size} differs from ours ({size})", self.id);
            self.started = false;
            return self.fail(core, "Remote size does not match local size", "size mismatch");
        }
        self.deadline = None;
        self.state = State::Copying;
        self.last_pass_dirty = u64::MAX;
        self.attempt_started = Instant::now();
        self.attempt_bytes = 0;
        self.last_reply = Instant::now();
        let resume = self.resume_from.is_some() && self.resume_from == self.offered_instance;
        self.dest_instance = self.offered_instance;
        self.resume_from = None;
        match core.dirty.replace(DirtyMap::new(size)) {
            Some(left) if resume => {
                info!(
                    "mirror {}: destination token {:016x} unchanged: it kept what it acknowledged; re-sending {} bytes",
                    self.id,
                    self.dest_instance.unwrap_or(0),
                    left.dirty_bytes()
                );
                // The old checkpoint still holds under this token; it does not cover `left`.
                self.pass = 1;
                self.pass_origin = Some(left.clone());
                self.pass_map = Some(left);
                self.checkpointed = true;
                self.pass_checkpointed = false;
            }
            _ => {
                // Everything is sent by the sweep; only what changes from now on needs a later pass.
                self.pass = 0;
                self.cursor = 0;
                self.pass_map = None;
                self.pass_origin = None;
                self.checkpointed = false;
                self.pass_checkpointed = false;
                info!("mirror {}: copying {size} bytes to {}", self.id, self.spec.target);
            }
        }
        let first = !self.started;
        self.started = true;
        if first { Outcome::Started } else { Outcome::None }
    }

    fn throttle_until(&self) -> Option<Instant> {
        let bps = self.spec.max_bps?;
        if !matches!(self.state, State::Copying) {
            return None;
        }
        let sent = self.attempt_bytes + self.inflight_bytes + self.read_bytes;
        let due = self.attempt_started + Duration::from_secs_f64(sent as f64 / bps as f64);
        (due > Instant::now()).then_some(due)
    }

    /// Starts reads for the current pass while the window allows; moves between passes.
    fn pump(&mut self, core: &mut Core) -> Outcome {
        loop {
            if !matches!(self.state, State::Copying | State::Final | State::Frozen) {
                return Outcome::None;
            }
            if self.state == State::Frozen {
                if core.writes_in_flight > 0 {
                    return Outcome::None;
                }
                self.state = State::Final;
                self.next_pass(core);
            }
            let chunk = self.chunk(core);
            while self.reads < MAX_READS
                && self.inflight_bytes + self.read_bytes < MAX_IN_FLIGHT
                && self.throttle_until().is_none()
            {
                let next = if self.pass == 0 {
                    let size = core.export.size();
                    (self.cursor < size).then(|| {
                        let r = (self.cursor, chunk.min(size - self.cursor));
                        self.cursor += r.1;
                        r
                    })
                } else {
                    self.pass_map.as_mut().and_then(|m| m.take(chunk))
                };
                let Some((offset, len)) = next else { break };
                self.reads += 1;
                self.read_bytes += len;
                let op = Op::ReadSparse { offset, len: len as usize };
                let buf = self.bufs.take(len as usize);
                core.pool.submit_background(Job { conn: self.id, cookie: offset, op, buf });
            }
            let pass_left = if self.pass == 0 {
                self.cursor < core.export.size()
            } else {
                self.pass_map.as_ref().is_some_and(|m| !m.is_empty())
            };
            if pass_left || self.reads > 0 || !self.inflight.is_empty() {
                return Outcome::None;
            }
            if self.state == State::Final {
                self.flush_cookie = Some(self.send_flush());
                self.state = State::Flushing;
                return self.after_io(core);
            }
            if !self.pass_checkpointed {
                // Make this pass's data safe on the destination before going on, so a cut
                // connection can resume from here.
                self.pass_checkpointed = true;
                self.checkpoint_cookie = Some(self.send_flush());
                self.state = State::Checkpoint;
                return self.after_io(core);
            }
            let dirty = core.dirty.as_ref().map_or(0, DirtyMap::dirty_bytes);
            let stuck = self.pass >= 2 && dirty >= self.last_pass_dirty;
            let quick =
                dirty <= FREEZE_ALWAYS || (dirty as f64) <= self.speed() as f64 * FREEZE_BUDGET.as_secs_f64();
            if quick || self.pass >= MAX_PASSES || stuck {
                info!("mirror {}: pass {} done, {dirty} bytes dirty: freezing clients", self.id, self.pass);
                core.frozen = true;
                core.held = true;
                self.freeze_started = Some(Instant::now());
                self.state = State::Frozen;
                continue;
            }
            self.last_pass_dirty = dirty;
            self.next_pass(core);
        }
    }

    /// How much to read next: less while clients are sending requests, so that our WRITEs never
    /// hold the reactor long in front of theirs.
    fn chunk(&mut self, core: &Core) -> u64 {
        let now = Instant::now();
        if core.requests != self.seen_requests {
            self.seen_requests = core.requests;
            self.busy_until = Some(now + BUSY_WINDOW);
        }
        if self.busy_until.is_some_and(|t| now < t) { CHUNK_BUSY } else { CHUNK }
    }

    /// Starts the next pass over what was dirtied during the last one.
    fn next_pass(&mut self, core: &mut Core) {
        self.pass += 1;
        self.pass_checkpointed = false;
        let size = core.export.size();
        self.pass_map = core.dirty.replace(DirtyMap::new(size));
        // The last checkpoint does not cover this pass's ranges until the next one.
        if let (Some(origin), Some(map)) = (self.pass_origin.as_mut(), self.pass_map.as_ref()) {
            origin.merge(map);
        }
    }

    /// Queues a FLUSH and returns its cookie.
    fn send_flush(&mut self) -> u64 {
        let cookie = self.cookie();
        let flush = Request { flags: 0, kind: Cmd::Flush as u16, cookie, offset: 0, len: 0 };
        self.out.push(flush.encode().to_vec());
        cookie
    }

    fn cookie(&mut self) -> u64 {
        self.next_cookie += 1;
        self.next_cookie
    }

    /// A sparse read finished: send its holes as WRITE_ZEROES and its data as WRITEs.
    pub fn complete(&mut self, core: &mut Core, c: Completion) -> Outcome {
        let Completion { job, result } = c;
        let Op::ReadSparse { offset, len } = job.op else { return Outcome::None };
        self.reads -= 1;
        self.read_bytes -= len as u64;
        let extents = match result {
            Ok(e) => e,
            Err(e) => {
                return self.fail(core, "Mirror failed to connect", &format!("reading the source: {e}"));
            }
        };
        let mut buf = Some(job.buf);
        let whole = matches!(extents.as_slice(), [(l, 0)] if *l as usize == len);
        let mut pos = 0usize;
        for (elen, flags) in extents {
            let elen = elen as usize;
            let cookie = self.cookie();
            let hole = flags & STATE_HOLE != 0;
            let kind = if hole { Cmd::WriteZeroes } else { Cmd::Write };
            let req = Request {
                flags: 0,
                kind: kind as u16,
                cookie,
                offset: offset + pos as u64,
                len: elen as u32,
            };
            self.out.push(req.encode().to_vec());
            if whole {
                // One data run: send the read buffer itself, no copy on the reactor.
                self.out.push(buf.take().unwrap_or_default());
            } else if !hole && let Some(b) = buf.as_ref() {
                self.out.push(b[pos..pos + elen].to_vec());
            }
            self.inflight.insert(cookie, elen as u64);
            self.inflight_bytes += elen as u64;
            pos += elen;
        }
        if let Some(b) = buf {
            self.bufs.give(b);
        }
        let o = self.after_io(core);
        if o != Outcome::None {
            return o;
        }
        self.pump(core)
    }

    /// Before the first hello: give up with the original's message. After: retry from scratch.
    fn fail(&mut self, core: &mut Core, first_msg: &'static str, detail: &str) -> Outcome {
        self.teardown(&core.registry);
        // Reads still in the pool must not be taken for this session's any more.
        self.id.generation = core.next_generation();
        self.inflight.clear();
        self.inflight_bytes = 0;
        self.reads = 0;
        self.read_bytes = 0;
        self.flush_cookie = None;
        self.pass_map = None;
        core.frozen = false;
        self.freeze_started = None;
        if !self.started {
            warn!("mirror {}: {first_msg} ({detail})", self.id);
            return Outcome::Refused(first_msg);
        }
        self.failed_attempts = self.failed_attempts.saturating_add(1);
        warn!("mirror {}: attempt failed ({detail}); retrying in {RETRY_DELAY:?}", self.id);
        self.checkpoint_cookie = None;
        let origin = self.pass_origin.take();
        match (self.checkpointed, origin, core.dirty.as_mut()) {
            // Keep tracking writes: if the next attempt gets the same token, only these
            // ranges (and what changes meanwhile) need sending again.
            (true, Some(origin), Some(dirty)) => {
                dirty.merge(&origin);
                self.resume_from = self.dest_instance;
            }
            // Otherwise the next attempt re-sends everything; its sweep catches later writes.
            _ => {
                core.dirty = None;
                self.resume_from = None;
            }
        }
        self.checkpointed = false;
        self.state = State::Backoff;
        self.deadline = Some(Instant::now() + RETRY_DELAY);
        Outcome::None
    }

    fn write_out(&mut self) -> io::Result<()> {
        let Some(s) = self.stream.as_mut() else { return Ok(()) };
        if self.state != State::Connecting && !self.write_blocked {
            self.write_blocked = self.out.write_to(s, Some(&mut self.bufs), None)?;
        }
        Ok(())
    }
}
