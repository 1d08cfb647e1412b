//! The migration source: `serve`'s session towards the destination, as a state machine that
//! takes `Event`s and returns `Action`s (no sockets, no disk, no clock of its own).
//!
//! | state       | event                                    | next                                 |
//! |-------------|------------------------------------------|--------------------------------------|
//! | Backoff     | its time comes                           | Connecting (Connect)                 |
//! | Connecting  | Connected                                | Hello                                |
//! | Hello       | oldstyle hello, sizes match              | Attempt/Copying (Started, once)      |
//! | Hello       | newstyle greeting                        | Negotiating (SENDER + MIGRATE + GO)  |
//! | Negotiating | GO acknowledged, sizes match             | Attempt/Copying (Started, once)      |
//! | Copying     | pass done, not yet checkpointed          | Checkpoint (FLUSH sent)              |
//! | Checkpoint  | FLUSH acknowledged                       | Copying (pass done, decide)          |
//! | Copying     | pass done, remainder large               | Copying (next pass over dirty)       |
//! | Copying     | pass done, stuck, mode auto, FUA offered | Copying, active (next pass)          |
//! | Copying     | pass done, remainder small or stuck      | Frozen (Hold)                        |
//! | Frozen      | ClientWritesIdle, active writes answered | Final (last pass; FUA if offered)    |
//! | Final       | all acknowledged, FUA handover           | Closing (DISC sent)                  |
//! | Final       | all acknowledged, otherwise              | Flushing (FLUSH sent), or Closing    |
//! | Flushing    | FLUSH acknowledged                       | Closing (DISC sent)                  |
//! | Closing     | Drained                                  | Over (Disconnect, HandedOver)        |
//! | Frozen..Closing | freeze limit passed                  | Backoff (Disconnect, Release)        |
//! | any         | failure before any hello                 | Over (GaveUp with the original's text) |
//! | any         | size mismatch, read-only destination     | Over (GaveUp)                        |
//! | any         | same error reply, REFUSAL_LIMIT attempts in a row | Over (GaveUp)               |
//! | any         | other failure                            | Backoff (Disconnect, Release if held) |
//!
//! Only what the destination advertises is sent: holes go as WRITE_ZEROES where it offers them
//! and as zero-filled WRITEs elsewhere; without SEND_FLUSH there are no checkpoints and no
//! final FLUSH. Bytes that arrive with the destination's close are parsed before the close is
//! acted on (the reactor delivers `Received` before `Closed`).
//!
//! Resuming: a flexnbd destination answers our migrate option (after one naming `sender`, the
//! same for every attempt) with a resume token that changes whenever its file may hold
//! anything we did not write there. A checkpoint (FLUSH between passes) makes everything
//! acknowledged before it safe under that token; what it does not cover is kept in
//! `Attempt::uncovered` (the passes since) plus the dirty map. After a failure the dirty map
//! keeps tracking writes, and if the next attempt gets the same token only those ranges are
//! sent again; any other token (or no checkpoint) means a full copy.
//!
//! Every client write marks the dirty map when it completes, before it is acknowledged, so an
//! acknowledged write is in data a pass read afterwards or still dirty; the freeze waits for
//! in-flight writes, and the handover happens only once the final pass is durable: by a FLUSH,
//! or, where the destination says it counts FUA writes as durable for the handover, by the
//! final pass's own FUA writes (everything before it was covered by the last checkpoint), which
//! saves the freeze one round trip.

use super::{Action, Event, Mode, Written};
use crate::dirty::DirtyMap;
use crate::export::Extent;
use crate::proto::handshake::{self as hs, Greeting, ParseError};
use crate::proto::transmission::{self as tx, ReplyHeader, Request};
use crate::proto::*;
use log::{info, warn};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// Bytes one source read covers, and so the largest WRITE we send (the design allows 8 MiB;
/// smaller reads interleave better with client jobs in the disk pool and on the reactor).
pub const CHUNK: u64 = 2 * 1024 * 1024;
/// The read size while clients are at work (see bench/README.md: a 2 MiB WRITE holds the
/// reactor long enough to show in a busy client's tail latency).
pub const CHUNK_BUSY: u64 = 128 * 1024;
/// Clients count as at work for this long after their last request.
const BUSY_WINDOW: Duration = Duration::from_millis(100);
/// Bytes being read or awaiting acknowledgement at once.
pub const MAX_IN_FLIGHT: u64 = 16 * CHUNK;
/// Source reads queued or running at once: fewer than the disk workers, so a client job
/// always finds a free one.
const MAX_READS: usize = 2;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// Passes after which we freeze even if the remainder still shrinks.
const MAX_PASSES: u32 = 16;
/// Freeze once the remainder would take this long to send at the rate of the last pass over
/// dirty ranges. Clients stall for the whole freeze, so we keep passing until it is short.
/// Not at the first sweep's rate: scattered 4 KiB blocks went 4-5x slower than the sweep on
/// the benchmark VM (a freeze estimated at 20 ms took 88), so the sweep alone never decides.
const FREEZE_BUDGET: Duration = Duration::from_millis(20);
/// A remainder this small is frozen for whatever the rate.
const FREEZE_ALWAYS: u64 = 256 * 1024;
/// Attempts in a row that end with the same error reply before the migration gives up: a
/// destination that refuses a command every time will not change its mind by itself.
const REFUSAL_LIMIT: u32 = 3;
/// How long clients may be held by a freeze before the attempt is abandoned (guests commonly
/// time out I/O after 30 s; the original's 60 s request limit was too long for a freeze).
pub const DEFAULT_FREEZE_LIMIT: Duration = Duration::from_secs(2);
/// How long a request may go unanswered before the attempt is given up as hung.
pub const DEFAULT_REQUEST_LIMIT: Duration = Duration::from_secs(60);

/// What a migration is asked to do.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The destination as the logs name it.
    pub target: String,
    pub max_bps: Option<u64>,
    /// Longest freeze before the attempt is abandoned and clients go on against the source.
    pub freeze_limit: Duration,
    pub request_limit: Duration,
    pub mode: Mode,
}

/// Why an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
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
    pub fn token(&self) -> &'static str {
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

    /// A failure that another attempt cannot fix.
    fn permanent(&self) -> bool {
        matches!(self, Failure::SizeMismatch { .. } | Failure::ReadOnly)
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
    /// A client write sent actively: the ticket of its held acknowledgement.
    ticket: Option<u64>,
}

/// Ranges being read for the destination or written to it. They never overlap: the
/// destination may run requests in any order, so two overlapping writes in flight could land
/// either way round, and a pass's read could carry data older than a client write sent
/// meanwhile.
#[derive(Debug, Default)]
struct Flight {
    /// start -> end
    ranges: BTreeMap<u64, u64>,
}

impl Flight {
    fn overlaps(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        self.ranges.range(..end).next_back().is_some_and(|(_, e)| *e > offset)
    }

    fn insert(&mut self, offset: u64, len: u64) {
        self.ranges.insert(offset, offset.saturating_add(len));
    }

    fn remove(&mut self, offset: u64) {
        self.ranges.remove(&offset);
    }
}

/// What a newstyle destination said during negotiation, until GO is acknowledged.
#[derive(Debug, Default)]
struct Offer {
    size: Option<u64>,
    flags: u16,
    /// Its resume token (a flexnbd `listen` only).
    token: Option<u64>,
    /// Feature bits from its answer to our sender option.
    features: u64,
}

/// What the current pass still has to read.
#[derive(Debug)]
enum Sweep {
    /// The first pass: the whole export from `cursor` on.
    Whole { cursor: u64 },
    /// A later pass: what was dirtied during the one before.
    Dirty(DirtyMap),
}

impl Sweep {
    fn next(&mut self, chunk: u64, size: u64) -> Option<(u64, u64)> {
        match self {
            Sweep::Whole { cursor } => (*cursor < size).then(|| {
                let r = (*cursor, chunk.min(size - *cursor));
                *cursor += r.1;
                r
            }),
            Sweep::Dirty(m) => m.take(chunk),
        }
    }

    fn bytes_left(&self, size: u64) -> u64 {
        match self {
            Sweep::Whole { cursor } => size.saturating_sub(*cursor),
            Sweep::Dirty(m) => m.dirty_bytes(),
        }
    }
}

/// Where an attempt that is copying stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Copying,
    /// A FLUSH between passes is out.
    Checkpoint {
        cookie: u64,
    },
    /// Clients are held; waiting for their writes in flight (`idle` once there are none) and
    /// for the destination's answers to client writes sent actively.
    Frozen {
        since: Instant,
        idle: bool,
    },
    /// The last pass, clients held.
    Final {
        since: Instant,
    },
    /// The final FLUSH is out, clients held.
    Flushing {
        since: Instant,
        cookie: u64,
    },
}

impl Phase {
    fn frozen_since(self) -> Option<Instant> {
        match self {
            Phase::Frozen { since, .. } | Phase::Final { since } | Phase::Flushing { since, .. } => {
                Some(since)
            }
            Phase::Copying | Phase::Checkpoint { .. } => None,
        }
    }
}

/// One attempt, from the destination's accepted hello on.
#[derive(Debug)]
struct Attempt {
    phase: Phase,
    /// The destination's transmission flags.
    flags: u16,
    /// It refused a FLUSH it advertised: none is sent to it any more.
    flush_refused: bool,
    /// Its final pass goes with FUA and no final FLUSH (see the module doc).
    fua_handover: bool,
    /// Client writes are sent to it as they complete (active mirroring).
    active: bool,
    /// Client writes sent actively and not yet answered.
    active_writes: usize,
    flight: Flight,
    pass: u32,
    /// When the current pass began, and what it had to send then.
    pass_started: Instant,
    pass_bytes: u64,
    sweep: Sweep,
    /// This pass ended with a checkpoint already.
    pass_checkpointed: bool,
    last_pass_dirty: u64,
    /// Some once a checkpoint holds: what that checkpoint does not cover.
    uncovered: Option<DirtyMap>,
    inflight: HashMap<u64, Sent>,
    inflight_bytes: u64,
    reads: usize,
    read_bytes: u64,
    last_reply: Instant,
}

impl Attempt {
    fn can(&self, flag: u16) -> bool {
        self.flags & flag != 0 && !(flag == TF_SEND_FLUSH && self.flush_refused)
    }

    /// A request is out and unanswered.
    fn waiting(&self) -> bool {
        !self.inflight.is_empty() || matches!(self.phase, Phase::Checkpoint { .. } | Phase::Flushing { .. })
    }
}

#[derive(Debug)]
enum State {
    Backoff {
        until: Instant,
    },
    Connecting {
        until: Instant,
    },
    Hello {
        until: Instant,
    },
    Negotiating {
        until: Instant,
        offer: Offer,
    },
    Attempt(Box<Attempt>),
    /// The goodbye is queued; clients have been held since `since`.
    Closing {
        since: Instant,
    },
    /// Handed over or given up.
    Over,
}

/// What outlives attempts: for status, and for deciding to give up.
#[derive(Debug, Default)]
struct History {
    /// A destination has answered with a valid hello at least once: failures now retry.
    hello_seen: bool,
    /// "Migration started" has been reported (sizes matched once).
    started: bool,
    failed_attempts: u32,
    last_failure: Option<&'static str>,
    /// The destination's last error reply (`WRITE:ENOSPC`) and how many attempts in a row
    /// ended with it.
    refusal: Option<String>,
    refusal_streak: u32,
    dest_errors: u64,
    freezes_abandoned: u32,
    /// Client writes sent to the destination as they completed (active mirroring).
    active_writes: u64,
    /// Warned once that the destination is not a flexnbd `listen`.
    plain_target: bool,
}

pub struct Source {
    spec: Spec,
    /// How the logs name this migration.
    label: String,
    size: u64,
    /// Sent before our migration option: a destination hands the same token back to the same
    /// sender only.
    sender: u64,
    state: State,
    /// Numbers attempts, so a read finishing after its attempt ended is told apart.
    attempt: u32,
    rbuf: Vec<u8>,
    next_cookie: u64,
    /// Ranges written since they were last sent, while anything needs tracking.
    dirty: Option<DirtyMap>,
    /// The token a failed attempt left a usable checkpoint under.
    resume_from: Option<u64>,
    busy_until: Option<Instant>,
    history: History,
    began: Instant,
    /// The current (or last) attempt's start and bytes acknowledged, for the speed.
    attempt_started: Instant,
    attempt_bytes: u64,
}

impl Source {
    /// A migration of an export of `size` bytes; it connects at the first `Tick`.
    pub fn new(spec: Spec, label: String, size: u64, sender: u64, now: Instant) -> Source {
        Source {
            spec,
            label,
            size,
            sender,
            state: State::Backoff { until: now },
            attempt: 0,
            rbuf: Vec::new(),
            next_cookie: 1,
            dirty: None,
            resume_from: None,
            busy_until: None,
            history: History::default(),
            began: now,
            attempt_started: now,
            attempt_bytes: 0,
        }
    }

    pub fn handle(&mut self, now: Instant, ev: Event<'_>, out: &mut Vec<Action>) {
        match ev {
            Event::Tick => self.tick(now, out),
            Event::Connected => {
                if let State::Connecting { .. } = self.state {
                    self.state = State::Hello { until: now + HELLO_TIMEOUT };
                }
            }
            Event::ConnectFailed(e) => {
                if let State::Connecting { .. } = self.state {
                    self.fail(now, Failure::Connect(e), out);
                }
            }
            Event::Received(b) => {
                if self.connected() {
                    self.rbuf.extend_from_slice(b);
                    if let Err(f) = self.parse(now, out) {
                        self.fail(now, f, out);
                    }
                }
            }
            Event::Closed => self.lost(now, Failure::Closed, out),
            Event::Broken(e) => self.lost(now, Failure::Io(e), out),
            Event::Drained => {
                if let State::Closing { since } = self.state {
                    info!(
                        "mirror {}: handed over; clients were held for {:?}; {} client writes were mirrored actively",
                        self.label,
                        now - since,
                        self.history.active_writes
                    );
                    self.state = State::Over;
                    self.dirty = None;
                    out.extend([Action::Disconnect, Action::HandedOver]);
                }
            }
            Event::ReadDone { attempt, offset, len, result, buf } => {
                self.read_done(now, attempt, offset, len, result, buf, out)
            }
            Event::ClientWrote { offset, len, what, ticket } => {
                self.client_wrote(offset, len, what, ticket, out)
            }
            Event::ClientWritesIdle => {
                if let State::Attempt(a) = &mut self.state
                    && let Phase::Frozen { since, .. } = a.phase
                {
                    a.phase = Phase::Frozen { since, idle: true };
                    self.pump(now, out);
                }
            }
            Event::ClientsBusy => self.busy_until = Some(now + BUSY_WINDOW),
            Event::MaxBps(n) => {
                self.spec.max_bps = (n != 0 && n != u64::MAX).then_some(n);
                self.pump(now, out);
            }
        }
    }

    /// When `Tick` must come next, at the latest.
    pub fn deadline(&self, now: Instant) -> Option<Instant> {
        let state = match &self.state {
            State::Backoff { until }
            | State::Connecting { until }
            | State::Hello { until }
            | State::Negotiating { until, .. } => Some(*until),
            State::Attempt(_) | State::Closing { .. } | State::Over => None,
        };
        let request = match &self.state {
            State::Attempt(a) if a.waiting() => Some(a.last_reply + self.spec.request_limit),
            _ => None,
        };
        let throttle = self.throttle_until().filter(|due| *due > now);
        [state, request, self.freeze_deadline(), throttle].into_iter().flatten().min()
    }

    pub fn over(&self) -> bool {
        matches!(self.state, State::Over)
    }

    /// Which migration this is, as told to destinations.
    pub fn sender(&self) -> u64 {
        self.sender
    }

    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    pub fn began(&self) -> Instant {
        self.began
    }

    /// Bytes still to send: the rest of this pass plus everything dirtied since.
    pub fn bytes_left(&self) -> u64 {
        match &self.state {
            // Between attempts the last one's figures are stale: the next copies everything,
            // or on a resume what the checkpoint does not cover.
            State::Backoff { .. }
            | State::Connecting { .. }
            | State::Hello { .. }
            | State::Negotiating { .. } => match (&self.resume_from, &self.dirty) {
                (Some(_), Some(d)) => d.dirty_bytes(),
                _ => self.size,
            },
            // Ranges dirtied ahead of the sweep are counted twice (the sweep sends them
            // anyway); whatever the overlap, no more than the whole file is left.
            State::Attempt(a) => (a.sweep.bytes_left(self.size)
                + a.read_bytes
                + a.inflight_bytes
                + self.dirty.as_ref().map_or(0, DirtyMap::dirty_bytes))
            .min(self.size),
            State::Closing { .. } | State::Over => 0,
        }
    }

    /// Average speed of the current (or last) attempt, bytes per second.
    pub fn speed(&self, now: Instant) -> u64 {
        let secs = now.saturating_duration_since(self.attempt_started).as_secs_f64();
        if secs > 0.0 { (self.attempt_bytes as f64 / secs) as u64 } else { 0 }
    }

    pub fn failed_attempts(&self) -> u32 {
        self.history.failed_attempts
    }

    pub fn freezes_abandoned(&self) -> u32 {
        self.history.freezes_abandoned
    }

    /// Clients are held by a freeze.
    pub fn frozen(&self) -> bool {
        match &self.state {
            State::Attempt(a) => a.phase.frozen_since().is_some(),
            State::Closing { .. } => true,
            _ => false,
        }
    }

    /// Between a failed attempt and the next one's copying.
    pub fn retrying(&self) -> bool {
        self.history.failed_attempts > 0
            && matches!(
                self.state,
                State::Backoff { .. }
                    | State::Connecting { .. }
                    | State::Hello { .. }
                    | State::Negotiating { .. }
            )
    }

    /// The migration's own status keys (after the common ones), `key=value` with no spaces.
    pub fn status_fields(&self) -> String {
        let h = &self.history;
        let (mode, pass) = self.mode_and_pass();
        let mut s = format!(
            " migration_mode={mode} migration_passes={pass} migration_retrying={} migration_failed_attempts={} \
             migration_freezes_abandoned={} migration_destination_errors={} migration_freeze_limit_ms={} \
             migration_active_writes={}",
            self.retrying(),
            h.failed_attempts,
            h.freezes_abandoned,
            h.dest_errors,
            self.spec.freeze_limit.as_millis(),
            h.active_writes
        );
        if let Some(n) = self.spec.max_bps {
            s += &format!(" migration_speed_limit={n}");
        }
        if let Some(why) = h.last_failure {
            s += &format!(" migration_last_failure={why}");
        }
        if let Some(r) = &h.refusal {
            s += &format!(" migration_error={r}");
        }
        s
    }

    /// How client writes reach the destination now, and the current pass.
    pub fn mode_and_pass(&self) -> (&'static str, u32) {
        match &self.state {
            State::Attempt(a) => (if a.active { "active" } else { "background" }, a.pass),
            _ => ("background", 0),
        }
    }

    /// Status keys kept after the migration gave up: why, and the destination's last refusal.
    pub fn gave_up_fields(&self) -> String {
        let mut s = format!(" migration_gave_up={}", self.history.last_failure.unwrap_or("unknown"));
        if let Some(r) = &self.history.refusal {
            s += &format!(" migration_error={r}");
        }
        s
    }

    // ------------------------------------------------------------------------------------------

    fn connected(&self) -> bool {
        !matches!(self.state, State::Backoff { .. } | State::Connecting { .. } | State::Over)
    }

    fn freeze_deadline(&self) -> Option<Instant> {
        let since = match &self.state {
            State::Attempt(a) => a.phase.frozen_since(),
            State::Closing { since } => Some(*since),
            _ => None,
        };
        since.map(|s| s + self.spec.freeze_limit)
    }

    fn throttle_until(&self) -> Option<Instant> {
        let State::Attempt(a) = &self.state else { return None };
        throttle_due(self.spec.max_bps, self.attempt_started, self.attempt_bytes, a)
    }

    fn tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        match self.state {
            State::Backoff { until } if now >= until => return self.connect(now, out),
            State::Connecting { until } if now >= until => {
                return self.fail(now, Failure::Connect("connect timed out".into()), out);
            }
            State::Hello { until } | State::Negotiating { until, .. } if now >= until => {
                return self.fail(now, Failure::NoHello, out);
            }
            _ => {}
        }
        if self.freeze_deadline().is_some_and(|d| now >= d) {
            self.history.freezes_abandoned = self.history.freezes_abandoned.saturating_add(1);
            return self.fail(now, Failure::FreezeDeadline(self.spec.freeze_limit), out);
        }
        if let State::Attempt(a) = &self.state
            && a.waiting()
            && now.saturating_duration_since(a.last_reply) >= self.spec.request_limit
        {
            return self.fail(now, Failure::RequestTimeout, out);
        }
        self.pump(now, out);
    }

    fn connect(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.attempt = self.attempt.wrapping_add(1);
        self.rbuf.clear();
        self.state = State::Connecting { until: now + CONNECT_TIMEOUT };
        info!("mirror {}: connecting to {}", self.label, self.spec.target);
        out.push(Action::Connect);
    }

    /// The connection ended (closed or broken). Before any hello that is a rejection.
    fn lost(&mut self, now: Instant, f: Failure, out: &mut Vec<Action>) {
        match self.state {
            State::Backoff { .. } | State::Over => {}
            State::Hello { .. } if !self.history.hello_seen => {
                let why = match f {
                    Failure::Closed => "closed before a hello".to_string(),
                    other => other.to_string(),
                };
                self.fail(now, Failure::Rejected(why), out)
            }
            _ => self.fail(now, f, out),
        }
    }

    fn parse(&mut self, now: Instant, out: &mut Vec<Action>) -> Result<(), Failure> {
        let mut pos = 0;
        let result = self.parse_frames(now, &mut pos, out);
        self.rbuf.drain(..pos.min(self.rbuf.len()));
        result?;
        self.pump(now, out);
        Ok(())
    }

    /// Parses whole frames from `rbuf[*pos..]`, moving `pos` past each.
    fn parse_frames(&mut self, now: Instant, pos: &mut usize, out: &mut Vec<Action>) -> Result<(), Failure> {
        loop {
            let rest = &self.rbuf[*pos..];
            match &mut self.state {
                State::Hello { until } => {
                    let until = *until;
                    let greeting = match hs::parse_greeting(rest) {
                        Ok(g) => g,
                        // Not an NBD server (or not one that wants us): the original's "rejected".
                        Err(e) if !self.history.hello_seen => return Err(Failure::Rejected(e.to_string())),
                        Err(e) => return Err(e.into()),
                    };
                    let Some((g, used)) = greeting else { return Ok(()) };
                    *pos += used;
                    self.history.hello_seen = true;
                    match g {
                        Greeting::Oldstyle { size, flags } => {
                            // The low 16 bits are the transmission flags (0x000d from the original).
                            let tf = (flags & 0xffff) as u16;
                            let tf = if tf & TF_HAS_FLAGS != 0 { tf } else { 0 };
                            let offer = Offer { size: Some(size), flags: tf, token: None, features: 0 };
                            self.begin_copy(now, offer, out)?;
                        }
                        Greeting::Newstyle { flags } => {
                            out.push(Action::Send(self.negotiation(flags)));
                            self.state = State::Negotiating { until, offer: Offer::default() };
                        }
                    }
                }
                State::Negotiating { offer, .. } => {
                    let Some((r, used)) = hs::parse_option_reply(rest)? else { return Ok(()) };
                    *pos += used;
                    let (opt, rep, data) = (r.opt, r.rep, r.data);
                    let acked = rep == RepType::Ack as u32;
                    if opt == OptCode::FlexnbdSender as u32 && acked && data.len() == 8 {
                        offer.features = be64(data);
                    } else if opt == OptCode::FlexnbdMigrate as u32 {
                        if acked && data.len() == 8 {
                            offer.token = Some(be64(data));
                        } else if rep & REP_FLAG_ERROR != 0
                            && !std::mem::replace(&mut self.history.plain_target, true)
                        {
                            // Still a valid target, but nothing there waits to take over: say so,
                            // since a script that expects a `listen` there has the wrong address.
                            warn!(
                                "mirror {}: destination is not a flexnbd listen server (it refused the \
                                 migration option); copying to it as a plain NBD server",
                                self.label
                            );
                        }
                    } else if opt == OptCode::Go as u32 {
                        if rep == RepType::Info as u32 {
                            if let Some((size, flags)) = hs::parse_info_export(data)? {
                                offer.size = Some(size);
                                offer.flags = flags;
                            }
                        } else if acked {
                            let offer = std::mem::take(offer);
                            if offer.size.is_none() {
                                return Err(Failure::Protocol(
                                    "GO acknowledged without the export size".into(),
                                ));
                            }
                            self.begin_copy(now, offer, out)?;
                        } else if rep & REP_FLAG_ERROR != 0 {
                            self.history.dest_errors += 1;
                            let name = rep_error_name(rep);
                            return Err(Failure::Refused {
                                what: format!("GO:{name}"),
                                detail: format!(
                                    "destination refused the export (NBD_OPT_GO answered {name})"
                                ),
                            });
                        }
                    }
                }
                State::Attempt(a) => {
                    let Some((h, used)) = tx::parse_reply_header(rest)? else { return Ok(()) };
                    let ReplyHeader::Simple { error, cookie } = h else {
                        return Err(Failure::Protocol("structured reply we did not ask for".into()));
                    };
                    *pos += used;
                    a.last_reply = now;
                    let flush = match a.phase {
                        Phase::Checkpoint { cookie: c } | Phase::Flushing { cookie: c, .. } => c == cookie,
                        _ => false,
                    };
                    if error != 0
                        && flush
                        && Self::flush_unsupported(&self.label, &mut self.history, a, error)
                    {
                        // Taken as "FLUSH not offered": a checkpoint is skipped, the final FLUSH
                        // goes straight on to the goodbye.
                        match a.phase {
                            Phase::Flushing { since, .. } => {
                                self.send_disc(since, out);
                                return Ok(());
                            }
                            _ => a.phase = Phase::Copying,
                        }
                        continue;
                    }
                    if error != 0 {
                        return Err(Self::refused(&mut self.history, a, cookie, error));
                    }
                    match a.phase {
                        Phase::Checkpoint { .. } if flush => {
                            // Everything sent so far is on the destination; what is not is in
                            // the dirty map, which a failure folds into what to re-send.
                            a.uncovered = Some(DirtyMap::new(self.size));
                            a.phase = Phase::Copying;
                            info!("mirror {}: checkpoint after pass {} acknowledged", self.label, a.pass);
                        }
                        Phase::Flushing { since, .. } if flush => {
                            self.send_disc(since, out);
                            return Ok(());
                        }
                        _ => {
                            let Some(Sent { offset, len, ticket, .. }) = a.inflight.remove(&cookie) else {
                                return Err(Failure::Protocol("reply to a request we did not send".into()));
                            };
                            a.flight.remove(offset);
                            match ticket {
                                // The client's write is on the destination, durably (FUA).
                                Some(t) => {
                                    a.active_writes -= 1;
                                    out.push(Action::Ack(t));
                                }
                                None => {
                                    a.inflight_bytes -= len;
                                    self.attempt_bytes += len;
                                }
                            }
                        }
                    }
                }
                State::Backoff { .. } | State::Connecting { .. } | State::Closing { .. } | State::Over => {
                    return Ok(());
                }
            }
        }
    }

    /// An error reply: names the command it answers and counts it (`fail` keeps it for status).
    fn refused(h: &mut History, a: &Attempt, cookie: u64, error: u32) -> Failure {
        h.dest_errors += 1;
        let errno = errno_name(error);
        let (what, detail) = match a.inflight.get(&cookie) {
            Some(r) => (
                format!("{}:{errno}", r.cmd.name()),
                format!(
                    "destination answered {} at offset {} length {} with {errno} ({error})",
                    r.cmd.name(),
                    r.offset,
                    r.len
                ),
            ),
            None if matches!(a.phase, Phase::Checkpoint { .. } | Phase::Flushing { .. }) => {
                (format!("FLUSH:{errno}"), format!("destination answered FLUSH with {errno} ({error})"))
            }
            None => {
                (format!("UNKNOWN:{errno}"), format!("destination answered an unknown request with {errno}"))
            }
        };
        Failure::Refused { what, detail }
    }

    /// A FLUSH refused as unknown or unsupported by a destination that advertised it (nbdkit
    /// 1.32 does this in oldstyle mode): from now on this attempt sends none to it.
    fn flush_unsupported(label: &str, h: &mut History, a: &mut Attempt, error: u32) -> bool {
        if error != NbdErr::Inval as u32 && error != NbdErr::NotSup as u32 {
            return false;
        }
        h.dest_errors += 1;
        if !std::mem::replace(&mut a.flush_refused, true) {
            warn!(
                "mirror {label}: destination advertises FLUSH but refused it ({}); going on without FLUSH, \
                 so the handover does not wait for its data to be durable",
                errno_name(error)
            );
        }
        a.fua_handover = false;
        true
    }

    /// Our options after a newstyle greeting: who we are, that we migrate, and GO.
    fn negotiation(&self, server_flags: u16) -> Vec<u8> {
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
        b
    }

    fn begin_copy(&mut self, now: Instant, offer: Offer, out: &mut Vec<Action>) -> Result<(), Failure> {
        let theirs = offer.size.unwrap_or(0);
        if theirs != self.size {
            return Err(Failure::SizeMismatch { ours: self.size, theirs });
        }
        let flags = offer.flags;
        if flags & TF_READ_ONLY != 0 {
            return Err(Failure::ReadOnly);
        }
        let can_flush = flags & TF_SEND_FLUSH != 0;
        let fua_handover =
            can_flush && flags & TF_SEND_FUA != 0 && offer.features & SENDER_FEATURE_FUA_HANDOVER != 0;
        // Active mirroring acknowledges a client write once the destination has it durably,
        // which takes FUA.
        let active = self.spec.mode == Mode::Active && flags & TF_SEND_FUA != 0;
        if self.spec.mode == Mode::Active && !active {
            warn!(
                "mirror {}: the destination does not offer FUA: copying in the background only",
                self.label
            );
        }
        info!(
            "mirror {}: destination flags {flags:#06x}: holes sent as {}, {}",
            self.label,
            if flags & TF_SEND_WRITE_ZEROES != 0 { "WRITE_ZEROES" } else { "zero-filled WRITEs" },
            match (can_flush, fua_handover) {
                (true, true) => "FLUSH at checkpoints, final pass with FUA",
                (true, false) => "FLUSH at checkpoints and before the handover",
                _ => "no FLUSH offered: no checkpoints, handover without a final FLUSH",
            }
        );
        self.attempt_started = now;
        self.attempt_bytes = 0;
        let resume = self.resume_from.is_some() && self.resume_from == offer.token;
        self.resume_from = offer.token;
        let (pass, sweep, uncovered) = match self.dirty.replace(DirtyMap::new(self.size)) {
            Some(left) if resume => {
                info!(
                    "mirror {}: destination token {:016x} unchanged: it kept what it acknowledged; re-sending {} bytes",
                    self.label,
                    offer.token.unwrap_or(0),
                    left.dirty_bytes()
                );
                // The old checkpoint still holds under this token; it does not cover `left`.
                (1, Sweep::Dirty(left.clone()), Some(left))
            }
            _ => {
                // Everything is sent by the sweep; only what changes from now on needs a later pass.
                info!("mirror {}: copying {} bytes to {}", self.label, self.size, self.spec.target);
                (0, Sweep::Whole { cursor: 0 }, None)
            }
        };
        self.state = State::Attempt(Box::new(Attempt {
            phase: Phase::Copying,
            flags,
            flush_refused: false,
            fua_handover,
            pass,
            pass_started: now,
            pass_bytes: sweep.bytes_left(self.size),
            sweep,
            pass_checkpointed: false,
            last_pass_dirty: u64::MAX,
            uncovered,
            inflight: HashMap::new(),
            active,
            active_writes: 0,
            flight: Flight::default(),
            inflight_bytes: 0,
            reads: 0,
            read_bytes: 0,
            last_reply: now,
        }));
        if !std::mem::replace(&mut self.history.started, true) {
            out.push(Action::Started);
        }
        Ok(())
    }

    /// Starts reads for the current pass while the window allows; moves between passes.
    fn pump(&mut self, now: Instant, out: &mut Vec<Action>) {
        let chunk = if self.busy_until.is_some_and(|t| now < t) { CHUNK_BUSY } else { CHUNK };
        loop {
            let (bps, started, acked) = (self.spec.max_bps, self.attempt_started, self.attempt_bytes);
            let State::Attempt(a) = &mut self.state else { return };
            let throttled = |a: &Attempt| throttle_due(bps, started, acked, a).is_some_and(|due| due > now);
            let since = match a.phase {
                Phase::Copying => None,
                Phase::Final { since } => Some(since),
                // The last pass starts once clients are quiet and every client write sent
                // actively is answered, so nothing it sends can cross one of those.
                Phase::Frozen { since, idle: true } if a.active_writes == 0 => {
                    a.phase = Phase::Final { since };
                    Self::next_pass(a, &mut self.dirty, self.size, now);
                    continue;
                }
                Phase::Checkpoint { .. } | Phase::Frozen { .. } | Phase::Flushing { .. } => return,
            };
            while a.reads < MAX_READS && a.inflight_bytes + a.read_bytes < MAX_IN_FLIGHT && !throttled(a) {
                let Some((offset, len)) = a.sweep.next(chunk, self.size) else { break };
                if a.flight.overlaps(offset, len) {
                    // A client write sent actively is still out there: a later pass reads this.
                    if let Some(d) = self.dirty.as_mut() {
                        d.mark(offset, len);
                    }
                    continue;
                }
                a.flight.insert(offset, len);
                a.reads += 1;
                a.read_bytes += len;
                out.push(Action::Read { attempt: self.attempt, offset, len: len as usize });
            }
            let background = a.inflight.len() - a.active_writes;
            if a.sweep.bytes_left(self.size) > 0 || a.reads > 0 || background > 0 {
                return;
            }
            if let Some(since) = since {
                if a.can(TF_SEND_FLUSH) && !a.fua_handover {
                    let cookie = self.cookie();
                    out.push(Action::Send(flush_request(cookie)));
                    if let State::Attempt(a) = &mut self.state {
                        a.phase = Phase::Flushing { since, cookie };
                    }
                } else {
                    // Everything is acknowledged (and durable, if the destination can say so).
                    self.send_disc(since, out);
                }
                return;
            }
            if !a.pass_checkpointed && a.can(TF_SEND_FLUSH) {
                // Make this pass's data safe on the destination before going on, so a cut
                // connection can resume from here.
                a.pass_checkpointed = true;
                let cookie = self.cookie();
                out.push(Action::Send(flush_request(cookie)));
                if let State::Attempt(a) = &mut self.state {
                    a.phase = Phase::Checkpoint { cookie };
                }
                return;
            }
            let dirty = self.dirty.as_ref().map_or(0, DirtyMap::dirty_bytes);
            let stuck = a.pass >= 2 && dirty >= a.last_pass_dirty;
            let pass_rate = (a.pass > 0).then(|| {
                a.pass_bytes as f64 / now.saturating_duration_since(a.pass_started).as_secs_f64().max(1e-6)
            });
            let quick = dirty <= FREEZE_ALWAYS
                || pass_rate.is_some_and(|r| dirty as f64 <= r * FREEZE_BUDGET.as_secs_f64());
            if stuck && !quick && !a.active && self.spec.mode == Mode::Auto && a.can(TF_SEND_FUA) {
                // Writes come faster than passes send them: from now on each one goes to the
                // destination as it completes, so what is dirty only shrinks.
                info!(
                    "mirror {}: pass {} done, {dirty} bytes dirty and not shrinking: mirroring client writes actively",
                    self.label, a.pass
                );
                a.active = true;
            } else if quick || a.pass >= MAX_PASSES || stuck {
                info!("mirror {}: pass {} done, {dirty} bytes dirty: freezing clients", self.label, a.pass);
                a.phase = Phase::Frozen { since: now, idle: false };
                out.push(Action::Hold);
                return;
            }
            a.last_pass_dirty = dirty;
            Self::next_pass(a, &mut self.dirty, self.size, now);
        }
    }

    /// Starts the next pass over what was dirtied during the last one.
    fn next_pass(a: &mut Attempt, dirty: &mut Option<DirtyMap>, size: u64, now: Instant) {
        a.pass += 1;
        a.pass_checkpointed = false;
        let map = dirty.replace(DirtyMap::new(size)).unwrap_or_else(|| DirtyMap::new(size));
        a.pass_started = now;
        a.pass_bytes = map.dirty_bytes();
        // The last checkpoint does not cover this pass's ranges until the next one.
        if let Some(u) = a.uncovered.as_mut() {
            u.merge(&map);
        }
        a.sweep = Sweep::Dirty(map);
    }

    /// A client write finished on the source. While mirroring actively, it goes to the
    /// destination now with FUA, and its acknowledgement waits for the destination's; otherwise
    /// (or if it crosses anything in flight) it is dirty, for a later pass.
    fn client_wrote(&mut self, offset: u64, len: u64, what: Written<'_>, ticket: u64, out: &mut Vec<Action>) {
        if let State::Attempt(a) = &mut self.state
            && a.active
            && matches!(a.phase, Phase::Copying | Phase::Checkpoint { .. })
            && len > 0
            && len <= u64::from(u32::MAX)
            && !matches!(what, Written::Unknown)
            && !a.flight.overlaps(offset, len)
        {
            self.next_cookie += 1;
            let cookie = self.next_cookie;
            let zeroes = matches!(what, Written::Zeroes) && a.can(TF_SEND_WRITE_ZEROES);
            let kind = if zeroes { Cmd::WriteZeroes } else { Cmd::Write };
            let req = Request { flags: CMD_FLAG_FUA, kind: kind as u16, cookie, offset, len: len as u32 };
            out.push(Action::Send(req.encode().to_vec()));
            match what {
                Written::Data(b) => out.push(Action::Send(b.to_vec())),
                Written::Zeroes if !zeroes => out.push(Action::Send(vec![0; len as usize])),
                Written::Zeroes | Written::Unknown => {}
            }
            a.inflight.insert(cookie, Sent { cmd: kind, offset, len, ticket: Some(ticket) });
            a.flight.insert(offset, len);
            a.active_writes += 1;
            self.history.active_writes += 1;
            out.push(Action::Delay(ticket));
            return;
        }
        if let Some(d) = self.dirty.as_mut() {
            d.mark(offset, len);
        }
    }

    /// Queues the goodbye; the handover happens once it is on the wire.
    fn send_disc(&mut self, since: Instant, out: &mut Vec<Action>) {
        let disc = Request { flags: 0, kind: Cmd::Disc as u16, cookie: 0, offset: 0, len: 0 };
        out.push(Action::Send(disc.encode().to_vec()));
        self.state = State::Closing { since };
    }

    fn cookie(&mut self) -> u64 {
        self.next_cookie += 1;
        self.next_cookie
    }

    /// A sparse read finished: its holes go as WRITE_ZEROES (or zeros), its data as WRITEs.
    #[allow(clippy::too_many_arguments)]
    fn read_done(
        &mut self,
        now: Instant,
        attempt: u32,
        offset: u64,
        len: usize,
        result: std::io::Result<Vec<Extent>>,
        buf: Vec<u8>,
        out: &mut Vec<Action>,
    ) {
        let State::Attempt(a) = &mut self.state else { return out.push(Action::Recycle(buf)) };
        if attempt != self.attempt {
            return out.push(Action::Recycle(buf));
        }
        a.reads -= 1;
        a.read_bytes -= len as u64;
        a.flight.remove(offset);
        let extents = match result {
            Ok(e) => e,
            Err(e) => {
                out.push(Action::Recycle(buf));
                return self.fail(now, Failure::SourceRead(e.to_string()), out);
            }
        };
        let fua = matches!(a.phase, Phase::Final { .. }) && a.fua_handover;
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        let zeroes = a.can(TF_SEND_WRITE_ZEROES);
        let whole = matches!(extents.as_slice(), [(l, 0)] if *l as usize == len);
        let mut buf = Some(buf);
        let mut pos = 0usize;
        for (elen, eflags) in extents {
            let elen = (elen as usize).min(len - pos);
            self.next_cookie += 1;
            let cookie = self.next_cookie;
            let hole = eflags & STATE_HOLE != 0;
            // Without WRITE_ZEROES a hole is written as zeros (a sparse destination such as
            // ours punches them out again).
            let kind = if hole && zeroes { Cmd::WriteZeroes } else { Cmd::Write };
            let req =
                Request { flags, kind: kind as u16, cookie, offset: offset + pos as u64, len: elen as u32 };
            out.push(Action::Send(req.encode().to_vec()));
            if hole {
                if !zeroes {
                    out.push(Action::Send(vec![0; elen]));
                }
            } else if whole {
                // One data run: send the read buffer itself, no copy.
                out.push(Action::Send(buf.take().unwrap_or_default()));
            } else if let Some(b) = buf.as_ref() {
                out.push(Action::Send(b[pos..pos + elen].to_vec()));
            }
            a.inflight.insert(cookie, Sent { cmd: kind, offset: req.offset, len: elen as u64, ticket: None });
            a.flight.insert(req.offset, elen as u64);
            a.inflight_bytes += elen as u64;
            pos += elen;
            if pos >= len {
                break;
            }
        }
        if let Some(b) = buf {
            out.push(Action::Recycle(b));
        }
        self.pump(now, out);
    }

    /// Ends the attempt. Before any hello, or for a failure that will not go away, the
    /// migration gives up (the original's texts); otherwise it retries after RETRY_DELAY.
    fn fail(&mut self, now: Instant, f: Failure, out: &mut Vec<Action>) {
        let held = self.frozen();
        let state = std::mem::replace(&mut self.state, State::Over);
        out.push(Action::Disconnect);
        if held {
            out.push(Action::Release);
        }
        if let State::Attempt(a) = &state {
            // Client writes sent actively and not answered: their clients hear success now
            // (the source has them), and a later attempt copies them.
            for sent in a.inflight.values() {
                if let Some(t) = sent.ticket {
                    if let Some(d) = self.dirty.as_mut() {
                        d.mark(sent.offset, sent.len);
                    }
                    out.push(Action::Ack(t));
                }
            }
        }
        let h = &mut self.history;
        h.last_failure = Some(f.token());
        match &f {
            Failure::Refused { what, .. } => {
                let same = h.refusal_streak > 0 && h.refusal.as_ref() == Some(what);
                h.refusal_streak = if same { h.refusal_streak + 1 } else { 1 };
                h.refusal = Some(what.clone());
            }
            // Attempts that reached no destination say nothing about its mind: a listen that
            // exits after each refusal and is started again must not be retried for ever.
            Failure::Connect(_) | Failure::NoHello => {}
            // Anything else happened in between: the next refusal starts a new count (the
            // last one stays in status).
            _ => h.refusal_streak = 0,
        }
        let permanent =
            f.permanent() || (matches!(f, Failure::Refused { .. }) && h.refusal_streak >= REFUSAL_LIMIT);
        if permanent || !h.hello_seen {
            let mut msg = f.message();
            if let Failure::Refused { .. } = f {
                msg += &format!(" on {} attempts in a row", h.refusal_streak);
            }
            warn!("mirror {}: {msg} ({f}); giving up", self.label);
            self.dirty = None;
            out.push(Action::GaveUp(msg));
            return;
        }
        h.failed_attempts = h.failed_attempts.saturating_add(1);
        warn!("mirror {}: attempt failed ({f}); retrying in {RETRY_DELAY:?}", self.label);
        // A failure before copying, or after everything was acknowledged (Closing), leaves
        // what there is to resume from as it was.
        if let State::Attempt(a) = state {
            match (a.uncovered, self.dirty.as_mut()) {
                // Keep tracking writes: if the next attempt gets the same token, only these
                // ranges (and what changes meanwhile) need sending again.
                (Some(uncovered), Some(dirty)) => dirty.merge(&uncovered),
                // Otherwise the next attempt re-sends everything; its sweep catches later writes.
                _ => {
                    self.dirty = None;
                    self.resume_from = None;
                }
            }
        }
        self.state = State::Backoff { until: now + RETRY_DELAY };
    }
}

/// When what an attempt has read and sent is due under a speed limit of `bps`, counting from
/// `started` with `acked` bytes answered. The limit holds for background copying only, never
/// for the freeze.
fn throttle_due(bps: Option<u64>, started: Instant, acked: u64, a: &Attempt) -> Option<Instant> {
    let bps = bps?;
    let sent = acked + a.inflight_bytes + a.read_bytes;
    (a.phase == Phase::Copying).then(|| started + Duration::from_secs_f64(sent as f64 / bps as f64))
}

fn flush_request(cookie: u64) -> Vec<u8> {
    Request { flags: 0, kind: Cmd::Flush as u16, cookie, offset: 0, len: 0 }.encode().to_vec()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::handshake as hs;
    use crate::proto::transmission as tx;

    const SIZE: u64 = 4 * CHUNK;

    /// A scripted destination around a source: what it was sent, parsed; time moves by hand.
    struct Bench {
        src: Source,
        now: Instant,
        acts: Vec<Action>,
        /// Bytes sent to the destination and not yet parsed.
        wire: Vec<u8>,
    }

    impl Bench {
        fn new() -> Bench {
            Bench::with_mode(Mode::Background)
        }

        fn with_mode(mode: Mode) -> Bench {
            let now = Instant::now();
            let spec = Spec {
                target: "dest".into(),
                max_bps: None,
                freeze_limit: DEFAULT_FREEZE_LIMIT,
                request_limit: DEFAULT_REQUEST_LIMIT,
                mode,
            };
            Bench {
                src: Source::new(spec, "t".into(), SIZE, 7, now),
                now,
                acts: Vec::new(),
                wire: Vec::new(),
            }
        }

        fn ev(&mut self, ev: Event<'_>) {
            let seen = self.acts.len();
            self.src.handle(self.now, ev, &mut self.acts);
            for a in &self.acts[seen..] {
                if let Action::Send(b) = a {
                    self.wire.extend_from_slice(b);
                }
            }
        }

        fn take(&mut self) -> Vec<Action> {
            std::mem::take(&mut self.acts)
        }

        /// Connects and negotiates with a newstyle destination of these flags and features.
        fn start(&mut self, flags: u16, features: u64) {
            self.ev(Event::Tick);
            assert_eq!(self.take(), vec![Action::Connect]);
            self.ev(Event::Connected);
            let mut g = Vec::new();
            hs::encode_newstyle_greeting(&mut g, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
            self.ev(Event::Received(&g));
            self.take();
            self.wire.clear();
            let mut r = Vec::new();
            hs::encode_option_reply(
                &mut r,
                OptCode::FlexnbdSender as u32,
                RepType::Ack,
                &features.to_be_bytes(),
            );
            hs::encode_option_reply(
                &mut r,
                OptCode::FlexnbdMigrate as u32,
                RepType::Ack,
                &42u64.to_be_bytes(),
            );
            hs::encode_option_reply(&mut r, OptCode::Go as u32, RepType::Info, &hs::info_export(SIZE, flags));
            hs::encode_option_reply(&mut r, OptCode::Go as u32, RepType::Ack, &[]);
            self.ev(Event::Received(&r));
        }

        /// Completes every read asked for with data, returns what was read.
        fn complete_reads(&mut self) -> usize {
            let reads: Vec<(u32, u64, usize)> = self
                .take()
                .into_iter()
                .filter_map(|a| match a {
                    Action::Read { attempt, offset, len } => Some((attempt, offset, len)),
                    _ => None,
                })
                .collect();
            for &(attempt, offset, len) in &reads {
                let result = Ok(vec![(len as u32, 0)]);
                self.ev(Event::ReadDone { attempt, offset, len, result, buf: vec![1; len] });
            }
            reads.len()
        }

        /// Answers every whole request on the wire with success; returns them.
        fn answer_all(&mut self) -> Vec<tx::Request> {
            let reqs = requests_on_wire(self);
            let mut replies = Vec::new();
            for r in &reqs {
                if r.kind != Cmd::Disc as u16 {
                    replies.extend_from_slice(&tx::encode_simple_reply(0, r.cookie));
                }
            }
            if !replies.is_empty() {
                self.ev(Event::Received(&replies));
            }
            reqs
        }

        /// Runs reads and replies until the source holds clients; returns every request.
        fn copy_until_frozen(&mut self) -> Vec<tx::Request> {
            let mut all = Vec::new();
            for _ in 0..100 {
                if self.src.frozen() {
                    return all;
                }
                self.complete_reads();
                all.extend(self.answer_all());
            }
            panic!("never froze: {:?} {:?}", self.src.state, self.src.history);
        }
    }

    fn kinds(reqs: &[tx::Request]) -> Vec<u16> {
        reqs.iter().map(|r| r.kind).collect()
    }

    const FLAGS: u16 = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_WRITE_ZEROES;

    #[test]
    fn the_final_pass_goes_with_fua_and_no_flush_where_the_destination_counts_it() {
        let mut b = Bench::new();
        b.start(FLAGS, SENDER_FEATURE_FUA_HANDOVER);
        assert!(b.acts.contains(&Action::Started));
        let before = b.copy_until_frozen();
        assert!(kinds(&before).contains(&(Cmd::Flush as u16)), "a checkpoint covers the passes");
        // A client write lands during the last pass; then clients are quiet.
        b.ev(Event::ClientWrote { offset: 4096, len: 4096, what: Written::Unknown, ticket: 1 });
        b.ev(Event::ClientWritesIdle);
        b.complete_reads();
        let last = b.answer_all();
        assert_eq!(kinds(&last), vec![Cmd::Write as u16], "the final pass: {last:?}");
        assert_eq!(last[0].flags & CMD_FLAG_FUA, CMD_FLAG_FUA, "sent with FUA");
        let end = b.answer_all();
        assert_eq!(kinds(&end), vec![Cmd::Disc as u16], "no FLUSH before the goodbye");
        b.take();
        b.ev(Event::Drained);
        assert_eq!(b.take(), vec![Action::Disconnect, Action::HandedOver]);
    }

    #[test]
    fn without_the_feature_the_final_pass_is_flushed_before_the_goodbye() {
        let mut b = Bench::new();
        b.start(FLAGS, 0);
        b.copy_until_frozen();
        b.ev(Event::ClientWrote { offset: 0, len: 512, what: Written::Unknown, ticket: 1 });
        b.ev(Event::ClientWritesIdle);
        b.complete_reads();
        let last = b.answer_all();
        assert_eq!(last[0].flags & CMD_FLAG_FUA, 0);
        assert_eq!(kinds(&b.answer_all()), vec![Cmd::Flush as u16]);
        assert_eq!(kinds(&b.answer_all()), vec![Cmd::Disc as u16]);
    }

    #[test]
    fn a_freeze_past_its_limit_releases_clients_and_retries() {
        let mut b = Bench::new();
        b.start(FLAGS, SENDER_FEATURE_FUA_HANDOVER);
        b.copy_until_frozen();
        assert!(b.take().contains(&Action::Hold));
        b.ev(Event::ClientWrote { offset: 0, len: 512, what: Written::Unknown, ticket: 1 });
        b.ev(Event::ClientWritesIdle);
        b.complete_reads();
        b.take();
        // The destination never answers the final pass.
        b.now += DEFAULT_FREEZE_LIMIT;
        assert_eq!(b.src.deadline(b.now), Some(b.now));
        b.ev(Event::Tick);
        assert_eq!(b.take(), vec![Action::Disconnect, Action::Release]);
        assert_eq!(b.src.freezes_abandoned(), 1);
        assert!(b.src.retrying());
        assert!(b.src.status_fields().contains("migration_last_failure=freeze_deadline"));
    }

    #[test]
    fn a_hello_and_a_close_in_one_read_is_a_failure_after_the_hello() {
        let mut b = Bench::new();
        b.ev(Event::Tick);
        b.ev(Event::Connected);
        b.take();
        let mut g = Vec::new();
        hs::encode_oldstyle_hello(&mut g, SIZE, u32::from(TF_HAS_FLAGS | TF_SEND_FLUSH));
        b.ev(Event::Received(&g));
        b.ev(Event::Closed);
        let acts = b.take();
        assert_eq!(acts.first(), Some(&Action::Started), "{acts:?}");
        assert!(acts.contains(&Action::Disconnect));
        assert!(!acts.iter().any(|a| matches!(a, Action::GaveUp(_))), "retried, not rejected: {acts:?}");
        assert!(b.src.retrying());
    }

    #[test]
    fn zeroes_go_as_writes_to_a_destination_without_write_zeroes() {
        let mut b = Bench::new();
        b.start(TF_HAS_FLAGS | TF_SEND_FLUSH, 0);
        let reads: Vec<Action> = b.take();
        let Some(Action::Read { attempt, offset, len }) =
            reads.into_iter().find(|a| matches!(a, Action::Read { .. }))
        else {
            panic!("no read");
        };
        b.ev(Event::ReadDone {
            attempt,
            offset,
            len,
            result: Ok(vec![(len as u32, STATE_HOLE)]),
            buf: vec![0; len],
        });
        let reqs = b.answer_all();
        assert!(kinds(&reqs).iter().all(|k| *k == Cmd::Write as u16), "{reqs:?}");
    }

    #[test]
    fn a_read_from_an_ended_attempt_is_recycled_and_ignored() {
        let mut b = Bench::new();
        b.start(FLAGS, 0);
        let Some(Action::Read { attempt, offset, len }) =
            b.take().into_iter().find(|a| matches!(a, Action::Read { .. }))
        else {
            panic!("no read");
        };
        b.ev(Event::Closed);
        b.take();
        b.ev(Event::ReadDone { attempt, offset, len, result: Ok(vec![(len as u32, 0)]), buf: vec![1; 8] });
        assert_eq!(b.take(), vec![Action::Recycle(vec![1; 8])]);
    }

    /// Requests on the wire with their payloads, not answered.
    fn requests_on_wire(b: &mut Bench) -> Vec<tx::Request> {
        let mut reqs = Vec::new();
        let mut pos = 0;
        while let Ok(Some((r, used))) = tx::parse_request(&b.wire[pos..]) {
            let payload = if r.kind == Cmd::Write as u16 { r.len as usize } else { 0 };
            pos += used + payload;
            reqs.push(r);
        }
        b.wire.drain(..pos);
        reqs
    }

    #[test]
    fn an_active_write_is_acknowledged_once_the_destination_has_it() {
        let mut b = Bench::with_mode(Mode::Active);
        b.start(FLAGS, 0);
        // Every read of the first pass is out; a client writes past them.
        let reads: Vec<(u64, usize)> = b
            .take()
            .into_iter()
            .filter_map(|a| match a {
                Action::Read { offset, len, .. } => Some((offset, len)),
                _ => None,
            })
            .collect();
        let past = reads.iter().map(|(o, l)| o + *l as u64).max().unwrap_or(0);
        b.wire.clear();
        b.ev(Event::ClientWrote { offset: past, len: 4096, what: Written::Data(&[7; 4096]), ticket: 9 });
        assert!(b.acts.contains(&Action::Delay(9)), "held for the destination");
        let reqs = requests_on_wire(&mut b);
        assert_eq!(kinds(&reqs), vec![Cmd::Write as u16]);
        assert_eq!((reqs[0].offset, reqs[0].flags & CMD_FLAG_FUA), (past, CMD_FLAG_FUA));
        b.take();
        b.ev(Event::Received(&tx::encode_simple_reply(0, reqs[0].cookie)));
        assert_eq!(b.take(), vec![Action::Ack(9)]);
        // A write over a range being read is left to a later pass, answered at once.
        let (o, _) = reads[0];
        b.ev(Event::ClientWrote { offset: o, len: 4096, what: Written::Data(&[7; 4096]), ticket: 10 });
        assert!(b.take().is_empty(), "not sent, not held");
        assert!(b.src.dirty.as_ref().is_some_and(|d| d.dirty_bytes() == 4096));
    }

    #[test]
    fn active_writes_cut_off_by_a_failure_are_acknowledged_and_dirty_again() {
        let mut b = Bench::with_mode(Mode::Active);
        b.start(FLAGS, 0);
        b.take();
        b.ev(Event::ClientWrote { offset: SIZE - 4096, len: 4096, what: Written::Zeroes, ticket: 3 });
        assert!(b.take().contains(&Action::Delay(3)));
        b.ev(Event::Closed);
        let acts = b.take();
        assert!(acts.contains(&Action::Ack(3)), "no client waits on a dead attempt");
        // The attempt had no checkpoint: the next one copies everything, this write included.
        assert!(b.src.retrying());
    }

    #[test]
    fn auto_turns_active_when_passes_stop_shrinking_and_the_freeze_waits_for_active_writes() {
        let mut b = Bench::with_mode(Mode::Auto);
        b.start(FLAGS, 0);
        // Every pass, clients dirty the same 2 MiB (8 x 256 KiB apart): passes never shrink.
        let mut ticket = 0;
        for _ in 0..20 {
            if b.src.mode_and_pass().0 == "active" {
                break;
            }
            // Each pass takes a while (the freeze rule looks at the last pass's rate).
            b.now += Duration::from_millis(100);
            b.complete_reads();
            b.answer_all();
            for i in 0..8 {
                ticket += 1;
                let what = Written::Unknown;
                b.ev(Event::ClientWrote { offset: i * 512 * 1024, len: 256 * 1024, what, ticket });
            }
        }
        assert_eq!(b.src.mode_and_pass().0, "active", "{:?}", b.src.state);
        assert!(!b.src.frozen(), "it went active instead of freezing with a large remainder");
        // Drive to the freeze with one active write left unanswered.
        let mut held = None;
        for _ in 0..50 {
            if b.src.frozen() {
                break;
            }
            b.complete_reads();
            b.answer_all();
            if held.is_none() {
                ticket += 1;
                b.ev(Event::ClientWrote { offset: SIZE - 8192, len: 4096, what: Written::Zeroes, ticket });
                if b.acts.contains(&Action::Delay(ticket)) {
                    held = Some(ticket);
                    b.wire.clear();
                }
            }
        }
        assert!(b.src.frozen());
        assert!(held.is_some());
        b.take();
        b.ev(Event::ClientWritesIdle);
        assert!(
            b.take().iter().all(|a| !matches!(a, Action::Read { .. } | Action::Send(_))),
            "the last pass waits for the active write"
        );
        assert!(
            matches!(&b.src.state, State::Attempt(a) if matches!(a.phase, Phase::Frozen { idle: true, .. }))
        );
    }

    #[test]
    fn the_same_refusal_with_nothing_listening_in_between_still_counts_as_in_a_row() {
        let mut b = Bench::new();
        for round in 1..=REFUSAL_LIMIT {
            b.start(FLAGS, 0);
            b.complete_reads();
            let reqs = requests_on_wire(&mut b);
            b.take();
            let refusal = tx::encode_simple_reply(NbdErr::NoSpc as u32, reqs[0].cookie);
            b.ev(Event::Received(&refusal));
            let acts = b.take();
            if round == REFUSAL_LIMIT {
                let gave_up =
                    acts.iter().any(|a| matches!(a, Action::GaveUp(m) if m.contains("WRITE:ENOSPC")));
                assert!(gave_up, "{:?}", b.src.history);
                return;
            }
            // The listen exits after refusing; nothing answers the next connect.
            b.now += RETRY_DELAY;
            b.ev(Event::Tick);
            b.ev(Event::ConnectFailed("refused".into()));
            b.now += RETRY_DELAY;
            b.take();
        }
    }
}
