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
//! | Frozen..Closing | freeze deadline passed              | Backoff (clients released)     |
//! | any         | failure before the first hello          | given up (reported, no retry)  |
//! | any         | size mismatch, read-only destination    | given up                       |
//! | any         | same destination error, REFUSAL_LIMIT attempts in a row | given up       |
//! | any         | other failure after a hello             | Backoff -> Connecting          |
//!
//! Only what the destination advertises is sent: holes go as WRITE_ZEROES where it offers
//! them and as zero-filled WRITEs elsewhere (the original flexnbd offers neither WRITE_ZEROES
//! nor TRIM); without SEND_FLUSH there are no checkpoints and no final FLUSH.
//!
//! Bytes read before an EOF are parsed before the EOF is acted on: a hello followed at once by
//! a close is a failure after the hello (retried), not a rejection.
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
/// Attempts in a row that end with the same error reply before the migration gives up: a
/// destination that refuses a command every time will not change its mind by itself.
const REFUSAL_LIMIT: u32 = 3;
/// How long clients may be held by a freeze before the attempt is abandoned (guests commonly
/// time out I/O after 30 s; the original's 60 s request limit was too long for a freeze).
pub const DEFAULT_FREEZE_LIMIT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct MirrorSpec {
    pub target: crate::net::Target,
    pub bind: Option<SocketAddr>,
    pub action: MirrorAction,
    pub max_bps: Option<u64>,
    /// Longest freeze before the attempt is abandoned and clients go on against the source.
    pub freeze_limit: Duration,
}

/// What the reactor must do after a mirror event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    None,
    /// First valid hello from the destination: tell the `mirror` client.
    Started,
    /// Given up: failed before any hello (the original's texts) or for good (a permanent
    /// refusal). The text goes to whoever waits on the migration.
    GaveUp(String),
    /// All data is on the destination, flushed, and the connection closed cleanly.
    HandedOver,
}

/// Why an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    Connect(String),
    /// Closed, or a hello with the wrong magic, before any hello: turned away (by an ACL, say).
    Rejected(String),
    NoHello,
    SizeMismatch {
        ours: u64,
        theirs: u64,
    },
    ReadOnly,
    /// The destination answered with an error: `what` names the command and the error
    /// (`WRITE:ENOSPC`), the same text for the same refusal.
    Refused {
        what: String,
        detail: String,
    },
    Closed,
    Io(String),
    Protocol(String),
    RequestTimeout,
    FreezeDeadline(Duration),
    SourceRead(String),
}

impl Failure {
    /// The short reason shown in status (no spaces).
    fn token(&self) -> &'static str {
        match self {
            Failure::Connect(_) => "connect_failed",
            Failure::Rejected(_) => "rejected",
            Failure::NoHello => "no_hello",
            Failure::SizeMismatch { .. } => "size_mismatch",
            Failure::ReadOnly => "read_only",
            Failure::Refused { .. } => "destination_error",
            Failure::Closed => "closed_by_destination",
            Failure::Io(_) => "connection_error",
            Failure::Protocol(_) => "protocol_error",
            Failure::RequestTimeout => "request_timeout",
            Failure::FreezeDeadline(_) => "freeze_deadline",
            Failure::SourceRead(_) => "source_read_error",
        }
    }

    /// What `mirror` is told when this ends the migration before any hello (the original's
    /// texts) or for good.
    fn message(&self) -> String {
        match self {
            Failure::Connect(_) | Failure::Io(_) | Failure::SourceRead(_) => {
                "Mirror failed to connect".into()
            }
            Failure::Rejected(_) | Failure::Closed => "Mirror was rejected".into(),
            Failure::NoHello
            | Failure::Protocol(_)
            | Failure::RequestTimeout
            | Failure::FreezeDeadline(_) => "Remote server failed to respond".into(),
            Failure::SizeMismatch { .. } => "Remote size does not match local size".into(),
            Failure::ReadOnly => "Destination is read-only".into(),
            Failure::Refused { what, .. } => format!("Destination refused {what}"),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect(d) => write!(f, "connect: {d}"),
            Failure::Rejected(d) => write!(f, "turned away before a hello: {d}"),
            Failure::NoHello => write!(f, "no hello in time"),
            Failure::SizeMismatch { ours, theirs } => {
                write!(f, "destination size {theirs} differs from ours ({ours})")
            }
            Failure::ReadOnly => write!(f, "the destination's export is read-only"),
            Failure::Refused { detail, .. } => write!(f, "{detail}"),
            Failure::Closed => write!(f, "destination closed the connection"),
            Failure::Io(d) => write!(f, "connection: {d}"),
            Failure::Protocol(d) => write!(f, "protocol error: {d}"),
            Failure::RequestTimeout => write!(f, "request unanswered for too long"),
            Failure::FreezeDeadline(d) => {
                write!(f, "final pass not acknowledged within the freeze limit ({d:?})")
            }
            Failure::SourceRead(d) => write!(f, "reading the source: {d}"),
        }
    }
}

impl From<ParseError> for Failure {
    fn from(e: ParseError) -> Failure {
        Failure::Protocol(e.to_string())
    }
}

/// A request on its way to the destination, kept to name it if it is refused.
#[derive(Debug, Clone, Copy)]
struct Sent {
    cmd: Cmd,
    offset: u64,
    len: u64,
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
    hello_seen: bool,
    /// "Migration started" has been reported (sizes matched once).
    started: bool,
    /// Attempts that failed after a hello (each is retried).
    failed_attempts: u32,
    /// Why the last attempt failed, for status.
    last_failure: Option<&'static str>,
    /// A failure seen together with the peer's last bytes, acted on at the next tick.
    pending_failure: Option<Failure>,
    /// The destination's last error reply (`WRITE:ENOSPC`), how many attempts in a row ended
    /// with that same one, and how many error replies came in all.
    refusal: Option<String>,
    refusal_streak: u32,
    dest_errors: u64,
    /// Freezes that ran past `spec.freeze_limit` and were abandoned.
    freezes_abandoned: u32,
    /// Transmission flags of the destination in this attempt.
    dest_flags: u16,
    /// The destination refused a FLUSH it advertised (see `flush_unsupported`).
    flush_refused: bool,
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
    inflight: HashMap<u64, Sent>,
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
            hello_seen: false,
            started: false,
            failed_attempts: 0,
            last_failure: None,
            pending_failure: None,
            refusal: None,
            refusal_streak: 0,
            dest_errors: 0,
            freezes_abandoned: 0,
            dest_flags: 0,
            flush_refused: false,
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
        if self.pending_failure.is_some() {
            return Some(Instant::now());
        }
        [self.deadline, self.throttle_until(), self.freeze_deadline()].into_iter().flatten().min()
    }

    /// When the current freeze is abandoned, while one is on.
    fn freeze_deadline(&self) -> Option<Instant> {
        self.freeze_started.map(|f| f + self.spec.freeze_limit)
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

    /// 0 and u64::MAX (what our CLI sends to mean "no limit", since the original takes 0
    /// literally) both lift the limit.
    pub fn set_max_bps(&mut self, n: u64) {
        self.spec.max_bps = (n != 0 && n != u64::MAX).then_some(n);
    }

    /// The migration's own status keys (after the common ones), `key=value` with no spaces.
    pub fn status_fields(&self) -> String {
        let mut s = format!(
            " migration_retrying={} migration_failed_attempts={} migration_freezes_abandoned={} \
             migration_destination_errors={} migration_freeze_limit_ms={}",
            self.retrying(),
            self.failed_attempts,
            self.freezes_abandoned,
            self.dest_errors,
            self.spec.freeze_limit.as_millis()
        );
        if let Some(n) = self.spec.max_bps {
            s += &format!(" migration_speed_limit={n}");
        }
        if let Some(why) = self.last_failure {
            s += &format!(" migration_last_failure={why}");
        }
        if let Some(r) = &self.refusal {
            s += &format!(" migration_error={r}");
        }
        s
    }

    /// Status keys kept after the migration gave up: why, and the destination's last refusal.
    pub fn gave_up_fields(&self) -> String {
        let mut s = format!(" migration_gave_up={}", self.last_failure.unwrap_or("unknown"));
        if let Some(r) = &self.refusal {
            s += &format!(" migration_error={r}");
        }
        s
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
            Err(e) => return self.fail(core, Failure::Connect(e.to_string())),
        };
        let _ = s.set_nodelay(true);
        if let Err(e) = core.registry.register(&mut s, self.id.token, Interest::READABLE | Interest::WRITABLE)
        {
            return self.fail(core, Failure::Connect(format!("register: {e}")));
        }
        self.registered = Some(Interest::READABLE | Interest::WRITABLE);
        self.stream = Some(s);
        self.state = State::Connecting;
        self.deadline = Some(Instant::now() + CONNECT_TIMEOUT);
        info!("mirror {}: connecting to {}", self.id, self.spec.target);
        Outcome::None
    }

    /// Timers: connect/hello deadlines, freeze deadline, request time limit, retry back-off,
    /// throttle; and a failure that arrived with the peer's last bytes.
    pub fn tick(&mut self, core: &mut Core) -> Outcome {
        if let Some(f) = self.pending_failure.take() {
            return self.fail(core, f);
        }
        let now = Instant::now();
        if let Some(d) = self.deadline
            && now >= d
        {
            self.deadline = None;
            return match self.state {
                State::Backoff => self.connect(core),
                State::Connecting => self.fail(core, Failure::Connect("connect timed out".into())),
                _ => self.fail(core, Failure::NoHello),
            };
        }
        if self.freeze_deadline().is_some_and(|d| now >= d) {
            self.freezes_abandoned = self.freezes_abandoned.saturating_add(1);
            return self.fail(core, Failure::FreezeDeadline(self.spec.freeze_limit));
        }
        let waiting =
            !self.inflight.is_empty() || self.checkpoint_cookie.is_some() || self.flush_cookie.is_some();
        if waiting && now.duration_since(self.last_reply) > self.request_limit {
            return self.fail(core, Failure::RequestTimeout);
        }
        self.pump(core)
    }

    pub fn on_event(&mut self, core: &mut Core, readable: bool, writable: bool) -> Outcome {
        if self.state == State::Connecting && (writable || readable) {
            let Some(s) = self.stream.as_ref() else { return Outcome::None };
            match s.take_error() {
                Ok(Some(e)) | Err(e) => return self.fail(core, Failure::Connect(e.to_string())),
                Ok(None) => {}
            }
            match s.connected() {
                Ok(true) => {
                    self.state = State::Hello;
                    self.deadline = Some(Instant::now() + HELLO_TIMEOUT);
                    crate::event_loop::set_keepalive(std::os::unix::io::AsRawFd::as_raw_fd(s));
                }
                Ok(false) => return Outcome::None,
                Err(e) => return self.fail(core, Failure::Connect(e.to_string())),
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
            return self.fail(core, Failure::Io(format!("send: {e}")));
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
                return self.fail(core, Failure::Io(e.to_string()));
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
        let mut end = None;
        loop {
            let Some(s) = self.stream.as_mut() else { return Outcome::None };
            match s.read(&mut chunk) {
                Ok(0) => {
                    end = Some(Failure::Closed);
                    break;
                }
                Ok(n) => self.rbuf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    end = Some(Failure::Io(e.to_string()));
                    break;
                }
            }
        }
        // The peer's last bytes come before its EOF: a hello, a reply, an error reply.
        let outcome = match self.parse(core) {
            Ok(o) => o,
            Err(f) => return self.fail(core, f),
        };
        match end {
            None => outcome,
            Some(f) if !self.hello_seen && self.state == State::Hello => {
                let why = match f {
                    Failure::Closed => "closed before a hello".to_string(),
                    other => other.to_string(),
                };
                self.fail(core, Failure::Rejected(why))
            }
            Some(f) if outcome == Outcome::None => self.fail(core, f),
            // Report what the bytes said (say "started") now, the end at the next tick.
            Some(f) => {
                self.pending_failure = Some(f);
                outcome
            }
        }
    }

    fn parse(&mut self, core: &mut Core) -> Result<Outcome, Failure> {
        let mut pos = 0;
        let mut outcome = Outcome::None;
        loop {
            let rest = &self.rbuf[pos..];
            match self.state {
                State::Hello => {
                    let greeting = match hs::parse_greeting(rest) {
                        Ok(g) => g,
                        // Not an NBD server (or not one that wants us): the original's "rejected".
                        Err(e) if !self.hello_seen => return Err(Failure::Rejected(e.to_string())),
                        Err(e) => return Err(e.into()),
                    };
                    let Some((g, used)) = greeting else { break };
                    pos += used;
                    self.hello_seen = true;
                    match g {
                        Greeting::Oldstyle { size, flags } => {
                            // The low 16 bits are the transmission flags (0x000d from the original).
                            let tf = (flags & 0xffff) as u16;
                            let tf = if tf & TF_HAS_FLAGS != 0 { tf } else { 0 };
                            outcome = self.begin_copy(core, size, tf)?;
                        }
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
                        if let Some((size, flags)) = info {
                            self.remote_size = Some(size);
                            self.dest_flags = flags;
                        } else if rep == RepType::Ack as u32 {
                            let Some(size) = self.remote_size else {
                                return Err(Failure::Protocol(
                                    "GO acknowledged without the export size".into(),
                                ));
                            };
                            outcome = self.begin_copy(core, size, self.dest_flags)?;
                        } else if rep & REP_FLAG_ERROR != 0 {
                            self.dest_errors += 1;
                            let name = rep_error_name(rep);
                            return Err(Failure::Refused {
                                what: format!("GO:{name}"),
                                detail: format!(
                                    "destination refused the export (NBD_OPT_GO answered {name})"
                                ),
                            });
                        }
                    }
                    // Replies to our migration option: ACK from a flexnbd listener, an error
                    // from other servers, which we can still copy to.
                }
                State::Copying | State::Checkpoint | State::Frozen | State::Final | State::Flushing => {
                    let Some((h, used)) = tx::parse_reply_header(rest)? else { break };
                    let ReplyHeader::Simple { error, cookie } = h else {
                        return Err(Failure::Protocol("structured reply we did not ask for".into()));
                    };
                    pos += used;
                    self.last_reply = Instant::now();
                    let flush = self.checkpoint_cookie == Some(cookie) || self.flush_cookie == Some(cookie);
                    if error != 0 && flush && self.flush_unsupported(error) {
                        // Taken as "FLUSH not offered": a checkpoint is skipped, the final FLUSH
                        // goes straight on to the goodbye.
                        if self.checkpoint_cookie.take().is_some() {
                            self.state = State::Copying;
                            continue;
                        }
                        self.flush_cookie = None;
                        self.send_disc();
                        break;
                    }
                    if error != 0 {
                        return Err(self.refused(cookie, error));
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
                        self.send_disc();
                        break;
                    }
                    let Some(Sent { len, .. }) = self.inflight.remove(&cookie) else {
                        return Err(Failure::Protocol("reply to a request we did not send".into()));
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

    /// An error reply: names the command it answers and counts it (`fail` keeps it for status).
    fn refused(&mut self, cookie: u64, error: u32) -> Failure {
        self.dest_errors += 1;
        let errno = crate::proto::errno_name(error);
        let (what, detail) = match self.inflight.get(&cookie) {
            Some(r) => (
                format!("{}:{errno}", r.cmd.name()),
                format!(
                    "destination answered {} at offset {} length {} with {errno} ({error})",
                    r.cmd.name(),
                    r.offset,
                    r.len
                ),
            ),
            None if self.flush_cookie == Some(cookie) || self.checkpoint_cookie == Some(cookie) => {
                (format!("FLUSH:{errno}"), format!("destination answered FLUSH with {errno} ({error})"))
            }
            None => {
                (format!("UNKNOWN:{errno}"), format!("destination answered an unknown request with {errno}"))
            }
        };
        Failure::Refused { what, detail }
    }

    fn can(&self, flag: u16) -> bool {
        self.dest_flags & flag != 0 && !(flag == TF_SEND_FLUSH && self.flush_refused)
    }

    /// A FLUSH refused as unknown or unsupported by a destination that advertised it (nbdkit
    /// 1.32 does this in oldstyle mode): from now on this migration sends none to it.
    fn flush_unsupported(&mut self, error: u32) -> bool {
        if error != NbdErr::Inval as u32 && error != NbdErr::NotSup as u32 {
            return false;
        }
        self.dest_errors += 1;
        if !std::mem::replace(&mut self.flush_refused, true) {
            warn!(
                "mirror {}: destination advertises FLUSH but refused it ({}); going on without FLUSH, \
                 so the handover does not wait for its data to be durable",
                self.id,
                crate::proto::errno_name(error)
            );
        }
        true
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
        self.dest_flags = 0;
        self.offered_instance = None;
        self.state = State::Negotiating;
    }

    fn begin_copy(&mut self, core: &mut Core, remote_size: u64, flags: u16) -> Result<Outcome, Failure> {
        let size = core.export.size();
        if remote_size != size {
            return Err(Failure::SizeMismatch { ours: size, theirs: remote_size });
        }
        self.dest_flags = flags;
        if self.can(TF_READ_ONLY) {
            return Err(Failure::ReadOnly);
        }
        info!(
            "mirror {}: destination flags {flags:#06x}: holes sent as {}, {}",
            self.id,
            if self.can(TF_SEND_WRITE_ZEROES) { "WRITE_ZEROES" } else { "zero-filled WRITEs" },
            if self.can(TF_SEND_FLUSH) {
                "FLUSH at checkpoints and before the handover"
            } else {
                "no FLUSH offered: no checkpoints, handover without a final FLUSH"
            }
        );
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
        Ok(if first { Outcome::Started } else { Outcome::None })
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
                if self.can(TF_SEND_FLUSH) {
                    self.flush_cookie = Some(self.send_flush());
                    self.state = State::Flushing;
                } else {
                    // Everything is acknowledged, and the destination offers nothing more.
                    self.send_disc();
                }
                return self.after_io(core);
            }
            if !self.pass_checkpointed && self.can(TF_SEND_FLUSH) {
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

    /// Queues the goodbye; the handover happens once it is on the wire.
    fn send_disc(&mut self) {
        let disc = Request { flags: 0, kind: Cmd::Disc as u16, cookie: 0, offset: 0, len: 0 };
        self.out.push(disc.encode().to_vec());
        self.state = State::Closing;
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
            Err(e) => return self.fail(core, Failure::SourceRead(e.to_string())),
        };
        let mut buf = Some(job.buf);
        let whole = matches!(extents.as_slice(), [(l, 0)] if *l as usize == len);
        let mut pos = 0usize;
        for (elen, flags) in extents {
            let elen = elen as usize;
            let cookie = self.cookie();
            let hole = flags & STATE_HOLE != 0;
            // Without WRITE_ZEROES a hole is written as zeros (a sparse destination such as
            // ours punches them out again).
            let zero_cmd = hole && self.can(TF_SEND_WRITE_ZEROES);
            let kind = if zero_cmd { Cmd::WriteZeroes } else { Cmd::Write };
            let req = Request {
                flags: 0,
                kind: kind as u16,
                cookie,
                offset: offset + pos as u64,
                len: elen as u32,
            };
            self.out.push(req.encode().to_vec());
            if hole {
                if !zero_cmd {
                    self.out.push(vec![0; elen]);
                }
            } else if whole {
                // One data run: send the read buffer itself, no copy on the reactor.
                self.out.push(buf.take().unwrap_or_default());
            } else if let Some(b) = buf.as_ref() {
                self.out.push(b[pos..pos + elen].to_vec());
            }
            self.inflight.insert(cookie, Sent { cmd: kind, offset: req.offset, len: elen as u64 });
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

    /// Ends the attempt. Before any hello, or for a failure that will not go away, the
    /// migration gives up (the original's texts); otherwise it retries after RETRY_DELAY.
    fn fail(&mut self, core: &mut Core, f: Failure) -> Outcome {
        self.teardown(&core.registry);
        // Reads still in the pool must not be taken for this session's any more.
        self.id.generation = core.next_generation();
        self.inflight.clear();
        self.inflight_bytes = 0;
        self.reads = 0;
        self.read_bytes = 0;
        self.flush_cookie = None;
        self.pass_map = None;
        self.pending_failure = None;
        core.frozen = false;
        self.freeze_started = None;
        self.last_failure = Some(f.token());
        match &f {
            Failure::Refused { what, .. } => {
                let same = self.refusal_streak > 0 && self.refusal.as_ref() == Some(what);
                self.refusal_streak = if same { self.refusal_streak + 1 } else { 1 };
                self.refusal = Some(what.clone());
            }
            // Something else happened in between (a listen that exited, a new one not up yet):
            // the next refusal starts a new count (the last one stays in status).
            _ => self.refusal_streak = 0,
        }
        let permanent = match f {
            Failure::SizeMismatch { .. } | Failure::ReadOnly => true,
            Failure::Refused { .. } => self.refusal_streak >= REFUSAL_LIMIT,
            _ => false,
        };
        if permanent || !self.hello_seen {
            let mut msg = f.message();
            if let Failure::Refused { .. } = f {
                msg += &format!(" on {} attempts in a row", self.refusal_streak);
            }
            warn!("mirror {}: {msg} ({f}); giving up", self.id);
            return Outcome::GaveUp(msg);
        }
        self.failed_attempts = self.failed_attempts.saturating_add(1);
        warn!("mirror {}: attempt failed ({f}); retrying in {RETRY_DELAY:?}", self.id);
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

/// The spec's name of an option error reply, for logs and status.
fn rep_error_name(rep: u32) -> String {
    match RepType::try_from(rep) {
        Ok(RepType::ErrUnsup) => "ERR_UNSUP".into(),
        Ok(RepType::ErrPolicy) => "ERR_POLICY".into(),
        Ok(RepType::ErrInvalid) => "ERR_INVALID".into(),
        Ok(RepType::ErrPlatform) => "ERR_PLATFORM".into(),
        Ok(RepType::ErrTlsReqd) => "ERR_TLS_REQD".into(),
        Ok(RepType::ErrUnknown) => "ERR_UNKNOWN".into(),
        Ok(RepType::ErrShutdown) => "ERR_SHUTDOWN".into(),
        Ok(RepType::ErrBlockSizeReqd) => "ERR_BLOCK_SIZE_REQD".into(),
        Ok(RepType::ErrTooBig) => "ERR_TOO_BIG".into(),
        _ => format!("{rep:#x}"),
    }
}
