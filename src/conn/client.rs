//! One NBD client session: ClientFlags -> Options -> Transmission -> (ShuttingDown) -> Draining
//! -> closed.
//!
//! Input is read into the reactor's shared buffer and parsed there; only a partial frame is kept
//! per connection (`carry`), and a WRITE payload too big for the buffer is read straight into its
//! own job buffer. Replies queue in `out` and leave in one writev per flush. Requests may be
//! answered out of order as the disk pool completes them. What the connection is to a migration
//! (plain client, declared sender, ...) is its `Role` (see `migration::dest`).
//!
//! | phase          | input                       | next                                   |
//! |----------------|-----------------------------|----------------------------------------|
//! | ClientFlags    | u32 client flags            | Options                                |
//! | Options        | EXPORT_NAME / GO            | Transmission                           |
//! | Options        | ABORT                       | Draining                               |
//! | Options        | INFO/LIST/STRUCTURED/META   | Options                                |
//! | Options        | EXTENDED_HEADERS            | Options (32-byte headers from GO on)   |
//! | Options        | FLEXNBD_SENDER / _MIGRATE   | Options (role: see `migration::dest`)  |
//! | Transmission   | request (+ payload)         | Transmission (job or inline reply)     |
//! | Transmission   | DISC                        | Draining { disc }                      |
//! | Transmission   | bad request magic           | Draining (EINVAL with its cookie first) |
//! | Transmission   | shutdown / handover         | ShuttingDown { handed_over }           |
//! | ClientFlags, Options | shutdown / handover   | Draining { handed_over }               |
//! | ShuttingDown   | request (DISC: as above)    | ShuttingDown, answered ESHUTDOWN       |
//! | ShuttingDown   | -                           | closed once nothing is in flight/queued (handover: socket drained too) |
//! | Draining       | handover                    | Draining { handed_over }               |
//! | Draining       | -                           | closed likewise                        |
//! | any but Draining | EOF                       | Draining if requests are in flight, else closed |
//! | any            | I/O error                   | closed                                 |
//!
//! A DISC from a migration sender whose data is durable completes the migration when the
//! connection closes (`Role::completes_on_disc`).

use super::{Ctx, Next, Stream};
use crate::buffer::OutQueue;
use crate::export::Extent;
use crate::io_pool::{Completion, Job, Op};
use crate::listener::Peer;
use crate::migration::dest::{self, Role};
use crate::proto::handshake::{self as hs, ParseError};
use crate::proto::transmission::{self as tx, ExtRequest as Request};
use crate::proto::*;
use crate::sender::Lent;
use crate::token::ConnId;
use log::{debug, info, warn};
use mio::{Interest, Registry};
use std::io::{self, Read};
use std::sync::Arc;

/// Reads handled per readiness event before yielding to other connections.
const READ_BUDGET: usize = 16;
/// Reads at most this big may be served inline from the page cache on the reactor thread;
/// bigger ones would hold up every other connection for the memcpy.
const INLINE_READ_MAX: usize = 128 * 1024;
/// Reads at least this big whose pages are all cached are sent with sendfile. Smaller ones are
/// cheaper copied: their replies share one writev, where each sendfile is a syscall of its own.
const SENDFILE_MIN: usize = 32 * 1024;
/// From this size on, a WRITE's payload is worth a read of its own (see `bulk_writes`); below
/// it, reading many small requests at once and copying their payloads out is cheaper.
const BULK_WRITE: usize = 32 * 1024;
/// A congested socket with at least this much file data queued for it is sent to by a disk
/// worker (see `offload`).
const OFFLOAD_MIN: usize = 256 * 1024;
/// Most extents returned for one BLOCK_STATUS request.
const MAX_EXTENTS: usize = 2048;
/// Most of the export one BLOCK_STATUS looks at: the largest 4 KiB multiple a compact
/// descriptor holds (an extended request's length may be bigger).
const MAX_STATUS_LEN: u64 = u32::MAX as u64 & !4095;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    ClientFlags,
    Options,
    Transmission,
    /// Transmission after a server shutdown or the migration's handover: requests still
    /// arrive and get ESHUTDOWN (DISC excepted); closes once nothing is in flight.
    /// `handed_over`: a WRITE whose payload is still arriving is refused too, and the socket
    /// is read down to its end so every request sent gets its answer.
    ShuttingDown {
        handed_over: bool,
    },
    /// Nothing more is read; closes once nothing is in flight or queued. `disc`: the peer said
    /// goodbye (NBD_CMD_DISC), which may complete a migration; `handed_over` as above.
    Draining {
        disc: bool,
        handed_over: bool,
    },
}

/// Where the next transmission bytes go.
enum Incoming {
    Header,
    /// A WRITE's payload, being read into the buffer that becomes its job.
    Payload {
        req: Request,
        buf: Vec<u8>,
        filled: usize,
    },
    /// A payload we refuse: dropped as it arrives, then answered with `err`.
    Discard {
        req: Request,
        remaining: u64,
        err: NbdErr,
    },
}

/// Why a connection must close at once.
#[derive(Debug)]
pub enum Fatal {
    Eof,
    Io(io::Error),
    Parse(ParseError),
}

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fatal::Eof => write!(f, "disconnected"),
            Fatal::Io(e) => write!(f, "{e}"),
            Fatal::Parse(e) => write!(f, "protocol error: {e}"),
        }
    }
}

/// Generic over the byte stream so the state machine can be driven without TCP (the stateful
/// fuzz target uses a Unix socket pair); the server uses `listener::Socket` (TCP or Unix).
pub struct ClientConn<S: Stream = mio::net::TcpStream> {
    pub id: ConnId,
    pub peer: Peer,
    stream: S,
    phase: Phase,
    incoming: Incoming,
    carry: Vec<u8>,
    /// `carry` holds only an incomplete frame: parsing it again without new bytes is useless.
    carry_stale: bool,
    /// The last request was a WRITE of at least BULK_WRITE bytes: expect another.
    bulk_writes: bool,
    out: OutQueue,
    in_flight: usize,
    in_flight_bytes: usize,
    no_zeroes: bool,
    structured: bool,
    /// NBD_OPT_EXTENDED_HEADERS agreed: 32-byte requests and replies, and every reply a chunk.
    /// Implies `structured`.
    extended: bool,
    meta_base_allocation: bool,
    /// Readable edge seen and not yet read down to WouldBlock.
    read_ready: bool,
    /// Last write hit WouldBlock: wait for WRITABLE.
    write_blocked: bool,
    /// The last send filled the socket: the peer reads slower than we queue (see `offload`).
    congested: bool,
    /// A worker is sending earlier replies (see `offload`); `out` holds only later ones.
    sending: bool,
    /// What the worker that sent last failed with, for the reactor to close on.
    send_error: Option<io::Error>,
    /// The socket as lent to workers, made on the first offload.
    lent: Option<Arc<Lent>>,
    /// The peer's FIN (or an error) was reported: read until EOF, never stop at a short read.
    hup: bool,
    registered: Option<Interest>,
    /// What this connection is to a migration coming in (listen), or who it said it is (serve).
    role: Role,
    /// WRITE payload bytes this connection holds in the payload budget (see `budget`).
    reserved: usize,
    /// A WRITE header waits in `carry` for room in the payload budget.
    budget_wait: bool,
}

impl<S: Stream> ClientConn<S> {
    pub fn new(id: ConnId, peer: Peer, stream: S, ctx: &Ctx) -> ClientConn<S> {
        let mut c = ClientConn {
            id,
            peer,
            stream,
            phase: Phase::ClientFlags,
            incoming: Incoming::Header,
            carry: Vec::new(),
            carry_stale: true,
            bulk_writes: false,
            out: OutQueue::default(),
            in_flight: 0,
            in_flight_bytes: 0,
            no_zeroes: false,
            structured: false,
            extended: false,
            meta_base_allocation: false,
            read_ready: true,
            write_blocked: false,
            congested: false,
            sending: false,
            send_error: None,
            lent: None,
            hup: false,
            registered: None,
            // An original flexnbd sender cannot declare itself; on an oldstyle listener every
            // client that writes and then disconnects cleanly is taken for one.
            role: Role::new(ctx.cfg.oldstyle && ctx.cfg.listen),
            reserved: 0,
            budget_wait: false,
        };
        let mut hello = Vec::with_capacity(OLDSTYLE_HELLO_LEN);
        if ctx.cfg.oldstyle {
            hs::encode_oldstyle_hello(
                &mut hello,
                ctx.export.size(),
                u32::from(transmission_flags(ctx, false)),
            );
            c.phase = Phase::Transmission;
        } else {
            hs::encode_newstyle_greeting(&mut hello, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        }
        c.push_out(hello);
        c
    }

    /// Server shutdown: answer what is in flight, refuse anything new with ESHUTDOWN, close.
    pub fn shut_down(&mut self) {
        self.phase = match self.phase {
            Phase::Transmission => Phase::ShuttingDown { handed_over: false },
            Phase::ClientFlags | Phase::Options => Phase::Draining { disc: false, handed_over: false },
            p @ (Phase::ShuttingDown { .. } | Phase::Draining { .. }) => p,
        };
    }

    /// The migration handed over: the destination serves from now on. Like a shutdown, but a
    /// write whose payload is still arriving is refused too: nothing may change the file here
    /// any more.
    pub fn hand_over(&mut self) {
        self.phase = match self.phase {
            Phase::Transmission | Phase::ShuttingDown { .. } => Phase::ShuttingDown { handed_over: true },
            Phase::ClientFlags | Phase::Options => Phase::Draining { disc: false, handed_over: true },
            Phase::Draining { disc, .. } => Phase::Draining { disc, handed_over: true },
        };
    }

    /// Set by `hand_over`.
    fn handed_over(&self) -> bool {
        matches!(
            self.phase,
            Phase::ShuttingDown { handed_over: true } | Phase::Draining { handed_over: true, .. }
        )
    }

    /// Stops reading: what is in flight is answered, then the connection closes. A goodbye
    /// already seen (and a handover) stays noted.
    fn drain(&mut self) {
        if !matches!(self.phase, Phase::Draining { .. }) {
            self.phase = Phase::Draining { disc: false, handed_over: self.handed_over() };
        }
    }

    /// Closed cleanly: nothing left to answer or send after a DISC/ABORT/shutdown.
    pub fn finished(&self) -> bool {
        matches!(self.phase, Phase::Draining { .. } | Phase::ShuttingDown { .. })
            && self.in_flight == 0
            && self.out.is_empty()
            && !self.sending
            // Handed over: every request already sent gets its ESHUTDOWN before the close.
            && !(self.handed_over() && (self.read_ready || self.carry_ready()))
    }

    /// Whether this connection declared itself a migration sender (or is taken for one on an
    /// oldstyle listen server).
    pub fn is_migration_sender(&self) -> bool {
        self.role.is_sender()
    }

    /// The migration this connection said it is (`FlexnbdSender`), whether or not we are its
    /// destination.
    pub fn declared_sender(&self) -> Option<u64> {
        self.role.declared_sender()
    }

    /// Would reading now make progress (edge seen, not paused)?
    pub fn wants_read(&self, ctx: &Ctx) -> bool {
        (self.read_ready || self.carry_ready()) && !self.paused(ctx)
    }

    fn paused(&self, ctx: &Ctx) -> bool {
        matches!(self.phase, Phase::Draining { .. })
            || ctx.frozen
            || self.budget_wait
            || self.in_flight_bytes + self.out.bytes() + self.lent_backlog() >= ctx.cfg.max_in_flight_bytes
            || self.in_flight >= ctx.cfg.max_in_flight_reqs
    }

    pub fn register(&mut self, registry: &Registry, token: mio::Token) -> io::Result<()> {
        let want = self.wanted_interest();
        registry.register(&mut self.stream, token, want)?;
        self.registered = Some(want);
        Ok(())
    }

    fn wanted_interest(&self) -> Interest {
        if self.write_blocked { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE }
    }

    /// Re-registers only when the wanted interest changed (WRITABLE only while output waits).
    pub fn update_interest(&mut self, registry: &Registry) -> io::Result<()> {
        let want = self.wanted_interest();
        if self.registered != Some(want) {
            registry.reregister(&mut self.stream, self.id.token, want)?;
            self.registered = Some(want);
        }
        Ok(())
    }

    pub fn deregister(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.stream);
    }

    /// A readiness event for this connection.
    pub fn on_event(&mut self, ctx: &mut Ctx, readable: bool, writable: bool, hup: bool) -> Next {
        if writable {
            self.write_blocked = false;
        }
        self.hup |= hup;
        if readable {
            self.read_ready = true;
        }
        self.step(ctx)
    }

    /// Read what we may, send what we have; used for events and for resuming paused input.
    pub fn step(&mut self, ctx: &mut Ctx) -> Next {
        if let Err(e) = self.read_input(ctx) {
            return self.fail(e);
        }
        self.flush(ctx)
    }

    /// Sends queued output and reports whether the connection is done.
    pub fn flush(&mut self, ctx: &mut Ctx) -> Next {
        if let Err(e) = self.write_out(ctx) {
            return self.fail(Fatal::Io(e));
        }
        if self.finished() {
            // The migration is complete only when its sender's data is all answered, durable
            // (or, for an original oldstyle sender, written) and it said goodbye.
            if matches!(self.phase, Phase::Draining { disc: true, .. }) && self.role.completes_on_disc() {
                *ctx.migration_done = true;
            }
            return Next::Close;
        }
        if let Err(e) = self.update_interest(ctx.registry) {
            return self.fail(Fatal::Io(e));
        }
        Next::Continue
    }

    fn fail(&self, e: Fatal) -> Next {
        match e {
            Fatal::Eof if self.in_flight == 0 => debug!("{} {}: closed by peer", self.id, self.peer),
            Fatal::Eof => {
                info!("{} {}: closed by peer with {} requests in flight", self.id, self.peer, self.in_flight)
            }
            Fatal::Parse(_) => warn!("{} {}: {e}; closing", self.id, self.peer),
            Fatal::Io(_) => info!("{} {}: {e}; closing", self.id, self.peer),
        }
        Next::Close
    }

    // ------------------------------------------------------------------------------------------
    // Input

    fn read_input(&mut self, ctx: &mut Ctx) -> Result<(), Fatal> {
        for _ in 0..READ_BUDGET {
            if self.paused(ctx) || !(self.read_ready || self.carry_ready()) {
                return Ok(());
            }
            match &mut self.incoming {
                // Bytes parked in `carry` by a pause come before anything still in the socket.
                Incoming::Payload { buf, filled, .. } if !self.carry.is_empty() => {
                    let k = (buf.len() - *filled).min(self.carry.len());
                    buf[*filled..*filled + k].copy_from_slice(&self.carry[..k]);
                    *filled += k;
                    self.carry.drain(..k);
                    if *filled == buf.len() {
                        self.payload_complete(ctx);
                    }
                }
                Incoming::Payload { buf, filled, .. } => {
                    // The next request's header comes in the same read, if it is there already.
                    let mut next = [0u8; tx::EXT_REQUEST_LEN];
                    let next = &mut next[..tx::request_len(self.extended)];
                    let want = buf.len() - *filled;
                    match read_some_vectored(&mut self.stream, &mut buf[*filled..], next)? {
                        None => self.read_ready = false,
                        Some(n) => {
                            // A short read drained the socket; the next byte brings a new edge.
                            if n < want + next.len() && !self.hup {
                                self.read_ready = false;
                            }
                            let p = n.min(want);
                            *filled += p;
                            if n > p {
                                self.carry.extend_from_slice(&next[..n - p]);
                                self.carry_stale = false;
                            }
                            if *filled == buf.len() {
                                self.payload_complete(ctx);
                            }
                        }
                    }
                }
                Incoming::Discard { .. } | Incoming::Header => {
                    let mut sbuf = std::mem::take(ctx.sbuf);
                    let r = self.read_and_parse(ctx, &mut sbuf);
                    *ctx.sbuf = sbuf;
                    r?;
                }
            }
        }
        Ok(())
    }

    /// `carry` may hold whole frames (left by a pause) that can be parsed without new input.
    fn carry_ready(&self) -> bool {
        !self.carry.is_empty() && !self.carry_stale
    }

    /// Moves `carry` to the front of the shared buffer, reads after it (if the socket has
    /// something), parses every whole frame and keeps the rest in `carry`.
    fn read_and_parse(&mut self, ctx: &mut Ctx, sbuf: &mut [u8]) -> Result<(), Fatal> {
        let c = self.carry.len();
        sbuf[..c].copy_from_slice(&self.carry);
        self.carry.clear();
        let mut n = c;
        let mut eof = false;
        // While big WRITEs stream in, read no further than the next header, so that its
        // payload goes straight into its own buffer instead of being copied out of ours.
        let limit = if self.bulk_writes { tx::request_len(self.extended).max(c) } else { sbuf.len() };
        if self.read_ready && c < limit {
            match read_some(&mut self.stream, &mut sbuf[c..limit]) {
                Ok(Some(k)) => {
                    // A short read drained the socket (saves an EAGAIN read per request); with
                    // edge-triggered readiness, anything arriving later raises a new event.
                    if k < limit - c && !self.hup {
                        self.read_ready = false;
                    }
                    n += k;
                }
                Ok(None) => self.read_ready = false,
                Err(Fatal::Eof) => {
                    self.read_ready = false;
                    eof = true;
                }
                Err(e) => return Err(e),
            }
        }
        let used = self.parse(ctx, &sbuf[..n])?;
        self.carry.extend_from_slice(&sbuf[used..n]);
        // Unless a pause cut parsing short, what is left is an incomplete frame.
        self.carry_stale = !self.paused(ctx);
        if eof {
            // The peer stopped sending: answer what arrived whole (it may still read), then close.
            if self.in_flight == 0 && self.out.is_empty() {
                return Err(Fatal::Eof);
            }
            debug!("{} {}: peer finished sending; answering {} requests", self.id, self.peer, self.in_flight);
            self.drain();
        }
        Ok(())
    }

    /// Consumes as many whole frames from `data` as the current phase allows.
    fn parse(&mut self, ctx: &mut Ctx, data: &[u8]) -> Result<usize, Fatal> {
        let mut pos = 0;
        while pos < data.len() && !self.paused(ctx) {
            let rest = &data[pos..];
            // Per frame: an EXTENDED_HEADERS just handled changes how the next one is framed.
            let ext = self.extended;
            let used = match self.phase {
                Phase::ClientFlags => match hs::parse_client_flags(rest).map_err(Fatal::Parse)? {
                    None => break,
                    Some((flags, used)) => {
                        self.no_zeroes = flags & CLIENT_NO_ZEROES != 0;
                        self.phase = Phase::Options;
                        used
                    }
                },
                Phase::Options => match hs::parse_option(rest).map_err(Fatal::Parse)? {
                    None => break,
                    Some((opt, used)) => {
                        self.handle_option(ctx, opt.code, opt.data);
                        used
                    }
                },
                Phase::Transmission | Phase::ShuttingDown { .. } => match &mut self.incoming {
                    Incoming::Discard { remaining, .. } => {
                        let k = (*remaining).min(rest.len() as u64);
                        *remaining -= k;
                        if *remaining == 0 {
                            self.discard_complete();
                        }
                        k as usize
                    }
                    Incoming::Payload { buf, filled, .. } => {
                        let k = (buf.len() - *filled).min(rest.len());
                        buf[*filled..*filled + k].copy_from_slice(&rest[..k]);
                        *filled += k;
                        if *filled == buf.len() {
                            self.payload_complete(ctx);
                        }
                        k
                    }
                    Incoming::Header => match tx::parse_any_request(rest, ext) {
                        Err(e) => {
                            self.bad_request(rest, e);
                            break;
                        }
                        Ok(None) => break,
                        Ok(Some((req, _))) if self.wait_for_budget(ctx, &req) => break,
                        Ok(Some((req, used))) => {
                            self.handle_request(ctx, req);
                            used
                        }
                    },
                },
                Phase::Draining { .. } => break,
            };
            pos += used;
        }
        Ok(pos)
    }

    // ------------------------------------------------------------------------------------------
    // Negotiation

    fn handle_option(&mut self, ctx: &mut Ctx, code: u32, data: &[u8]) {
        let Ok(opt) = OptCode::try_from(code) else {
            debug!("{} {}: unsupported option {code}", self.id, self.peer);
            return self.opt_reply(code, RepType::ErrUnsup, b"unsupported option");
        };
        debug!("{} {}: option {opt:?}", self.id, self.peer);
        match opt {
            // EXPORT_NAME has no error reply: refusing it means hanging up.
            OptCode::ExportName if data.len() > MAX_STRING_LEN => {
                info!("{} {}: export name of {} bytes is too long; closing", self.id, self.peer, data.len());
                self.drain();
            }
            // A client that agreed to extended headers must use GO (the spec's MUST); this one
            // cannot be told so, as EXPORT_NAME has no error reply.
            OptCode::ExportName if self.extended => {
                info!("{} {}: EXPORT_NAME after EXTENDED_HEADERS; closing", self.id, self.peer);
                self.drain();
            }
            OptCode::ExportName => {
                let mut b = Vec::with_capacity(134);
                hs::encode_export_name_reply(
                    &mut b,
                    ctx.export.size(),
                    transmission_flags(ctx, self.structured),
                    self.no_zeroes,
                );
                self.push_out(b);
                self.enter_transmission();
            }
            OptCode::Abort => {
                self.opt_reply(code, RepType::Ack, &[]);
                self.drain();
            }
            OptCode::List if !data.is_empty() => {
                self.opt_reply(code, RepType::ErrInvalid, b"LIST takes no data")
            }
            OptCode::List => {
                // One export; its name is empty and any name is accepted.
                self.opt_reply(code, RepType::Server, &0u32.to_be_bytes());
                self.opt_reply(code, RepType::Ack, &[]);
            }
            OptCode::Info | OptCode::Go => match hs::parse_export_request(data) {
                Err(hs::ParseError::TooLong { .. }) => {
                    self.opt_reply(code, RepType::ErrTooBig, b"export name longer than 4096 bytes")
                }
                Err(_) => self.opt_reply(code, RepType::ErrInvalid, b"malformed export request"),
                Ok(req) => {
                    self.opt_reply(
                        code,
                        RepType::Info,
                        &hs::info_export(ctx.export.size(), transmission_flags(ctx, self.structured)),
                    );
                    if req.infos.contains(&(InfoType::Name as u16)) {
                        let mut b = Vec::with_capacity(2 + req.name.len());
                        b.extend_from_slice(&(InfoType::Name as u16).to_be_bytes());
                        b.extend_from_slice(req.name);
                        self.opt_reply(code, RepType::Info, &b);
                    }
                    self.opt_reply(
                        code,
                        RepType::Info,
                        &hs::info_block_size(1, PREFERRED_BLOCK, MAX_REQUEST_LEN),
                    );
                    self.opt_reply(code, RepType::Ack, &[]);
                    if opt == OptCode::Go {
                        self.enter_transmission();
                    }
                }
            },
            OptCode::StructuredReply if !data.is_empty() => {
                self.opt_reply(code, RepType::ErrInvalid, b"STRUCTURED_REPLY takes no data")
            }
            // Extended headers take precedence and cannot be downgraded: the spec's own error.
            OptCode::StructuredReply if self.extended => {
                self.opt_reply(code, RepType::ErrExtHeaderReqd, b"extended headers already negotiated")
            }
            OptCode::StructuredReply => {
                self.structured = true;
                self.opt_reply(code, RepType::Ack, &[]);
            }
            OptCode::ExtendedHeaders if !data.is_empty() => {
                self.opt_reply(code, RepType::ErrInvalid, b"EXTENDED_HEADERS takes no data")
            }
            OptCode::ExtendedHeaders if self.extended => {
                self.opt_reply(code, RepType::ErrInvalid, b"extended headers already negotiated")
            }
            OptCode::ExtendedHeaders => {
                // Extended replies are chunks, so everything that needs structured replies
                // (meta contexts, DF) comes with them; contexts already set stay set.
                self.extended = true;
                self.structured = true;
                self.opt_reply(code, RepType::Ack, &[]);
            }
            OptCode::ListMetaContext | OptCode::SetMetaContext => {
                self.meta_context(code, opt == OptCode::SetMetaContext, data)
            }
            OptCode::FlexnbdSender if data.len() == 8 => {
                self.role.declare(crate::proto::be64(data));
                if ctx.cfg.listen {
                    // Our own option, so our own reply: the ACK carries our feature bits.
                    // Sources before them read no data from this ACK (only the replies to
                    // FlexnbdMigrate and GO), so they take it as before.
                    self.opt_reply(code, RepType::Ack, &dest::sender_ack());
                } else {
                    // Not a destination: the reactor still checks it is not our own mirror come
                    // round through a forwarder; to the sender we are any other server.
                    *ctx.new_sender = Some(self.id);
                    self.opt_reply(code, RepType::ErrUnsup, b"unsupported option");
                }
            }
            OptCode::FlexnbdMigrate if ctx.cfg.listen && data.is_empty() => {
                // Who it is came just before, in FlexnbdSender (if it said).
                let m = self.role.migrate();
                // A repeated option must not count the connection twice.
                if m.joined {
                    ctx.lineage.sender_joined();
                }
                *ctx.new_sender = Some(self.id);
                // Our own option, so our own reply: the ACK carries the resume token.
                let token = ctx.lineage.sender(m.sender);
                self.opt_reply(code, RepType::Ack, &token.to_be_bytes());
            }
            _ => self.opt_reply(code, RepType::ErrUnsup, b"unsupported option"),
        }
    }

    fn meta_context(&mut self, code: u32, set: bool, data: &[u8]) {
        // A SET replaces the selection even when it fails.
        if set {
            self.meta_base_allocation = false;
        }
        // Both need structured replies first (LIST: the spec's SHOULD NOT / MAY; SET: its
        // MUST NOT / SHOULD).
        if !self.structured {
            return self.opt_reply(code, RepType::ErrInvalid, b"structured replies not negotiated");
        }
        let Ok(req) = hs::parse_meta_request(data) else {
            return self.opt_reply(code, RepType::ErrInvalid, b"malformed meta context request");
        };
        // LIST with no queries means "all"; "base:" lists the whole base namespace.
        let matched = if set {
            req.queries.iter().any(|q| *q == META_BASE_ALLOCATION.as_bytes())
        } else {
            req.queries.is_empty()
                || req.queries.iter().any(|q| *q == META_BASE_ALLOCATION.as_bytes() || *q == b"base:")
        };
        if matched {
            let mut b = Vec::with_capacity(4 + META_BASE_ALLOCATION.len());
            b.extend_from_slice(&META_BASE_ALLOCATION_ID.to_be_bytes());
            b.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
            self.opt_reply(code, RepType::MetaContext, &b);
        }
        if set {
            self.meta_base_allocation = matched;
        }
        self.opt_reply(code, RepType::Ack, &[]);
    }

    fn enter_transmission(&mut self) {
        self.phase = Phase::Transmission;
        debug!(
            "{} {}: transmission (structured={}, extended={}, base:allocation={})",
            self.id, self.peer, self.structured, self.extended, self.meta_base_allocation
        );
    }

    fn opt_reply(&mut self, opt: u32, rep: RepType, data: &[u8]) {
        let mut b = Vec::with_capacity(20 + data.len());
        hs::encode_option_reply(&mut b, opt, rep, data);
        self.push_out(b);
    }

    // ------------------------------------------------------------------------------------------
    // Transmission

    fn handle_request(&mut self, ctx: &mut Ctx, req: Request) {
        *ctx.requests += 1;
        self.bulk_writes = req.kind == Cmd::Write as u16 && req.len >= BULK_WRITE as u64;
        let size = ctx.export.size();
        let len = req.len;
        let end = req.offset.checked_add(len);
        let inside = end.is_some_and(|e| e <= size);
        let ro = ctx.export.read_only() || self.sender_only(ctx);
        let Some(cmd) = req.cmd() else {
            debug!("{} {}: unknown command {}", self.id, self.peer, req.kind);
            return self.reply_error(req, NbdErr::Inval, "unknown command");
        };
        // A DISC never gets a reply, so flags cannot be refused there: the client is leaving
        // either way (an EINVAL would answer a request it thinks it never has to wait for, and
        // we would go on reading after it said goodbye).
        // PAYLOAD_LEN only says how the request is framed (see `ExtRequest::has_payload`).
        let flags = if self.extended { req.flags & !CMD_FLAG_PAYLOAD_LEN } else { req.flags };
        if cmd != Cmd::Disc && !tx::flags_fit(cmd, flags, self.structured) {
            return self.refuse(req, NbdErr::Inval);
        }
        // No command but WRITE takes a payload here; the spec has one sent anyway read past
        // and refused. A FLUSH's range must be zero; with extended headers its reply would
        // have to echo an offset the flush job does not carry.
        if !matches!(cmd, Cmd::Write | Cmd::Disc) && req.has_payload(self.extended)
            || self.extended && cmd == Cmd::Flush && (req.offset != 0 || req.len != 0)
        {
            return self.refuse(req, NbdErr::Inval);
        }
        if req.len == 0 && tx::needs_length(cmd) {
            return self.refuse(req, NbdErr::Inval);
        }
        let fua = req.flags & CMD_FLAG_FUA != 0;
        if matches!(self.phase, Phase::ShuttingDown { .. }) && cmd != Cmd::Disc {
            return self.refuse(req, NbdErr::Shutdown);
        }
        match cmd {
            Cmd::Read if req.len > u64::from(MAX_REQUEST_LEN) => {
                self.reply_error(req, NbdErr::Inval, "read too long")
            }
            Cmd::Read if !inside => self.reply_error(req, NbdErr::Inval, "read beyond the end"),
            Cmd::Read => self.start_read(ctx, req),
            Cmd::Write if ro => self.refuse(req, NbdErr::Perm),
            Cmd::Write if req.len > u64::from(MAX_REQUEST_LEN) => self.refuse(req, NbdErr::Inval),
            Cmd::Write if !inside => self.refuse(req, NbdErr::NoSpc),
            Cmd::Write => {
                self.note_write(ctx, fua);
                self.in_flight += 1;
                self.in_flight_bytes += req.len as usize;
                // `wait_for_budget` made sure it fits.
                self.reserved += req.len as usize;
                ctx.budget.reserve(req.len as usize);
                let buf = ctx.bufs.take(req.len as usize);
                self.incoming = Incoming::Payload { req, buf, filled: 0 };
            }
            Cmd::Disc => {
                info!("{} {}: disconnect requested", self.id, self.peer);
                self.phase = Phase::Draining { disc: true, handed_over: self.handed_over() };
            }
            Cmd::Flush => self.submit(ctx, req, Op::Flush, Vec::new()),
            Cmd::Trim if ro => self.reply_error(req, NbdErr::Perm, "not writable now"),
            Cmd::Trim if !inside => self.reply_error(req, NbdErr::Inval, "trim beyond the end"),
            Cmd::Trim => {
                self.note_write(ctx, fua);
                self.submit(ctx, req, Op::Trim { offset: req.offset, len, fua }, Vec::new())
            }
            Cmd::WriteZeroes if ro => self.reply_error(req, NbdErr::Perm, "not writable now"),
            Cmd::WriteZeroes if !inside => self.reply_error(req, NbdErr::NoSpc, "write beyond the end"),
            Cmd::WriteZeroes => {
                self.note_write(ctx, fua);
                let op = Op::Zero {
                    offset: req.offset,
                    len,
                    no_hole: req.flags & CMD_FLAG_NO_HOLE != 0,
                    fast: req.flags & CMD_FLAG_FAST_ZERO != 0,
                    fua,
                };
                self.submit(ctx, req, op, Vec::new())
            }
            Cmd::Cache if !inside => self.reply_error(req, NbdErr::Inval, "cache beyond the end"),
            Cmd::Cache => self.submit(ctx, req, Op::Cache { offset: req.offset, len }, Vec::new()),
            Cmd::BlockStatus if !self.meta_base_allocation => {
                self.reply_error(req, NbdErr::Inval, "no metadata context negotiated")
            }
            Cmd::BlockStatus if !inside => self.reply_error(req, NbdErr::Inval, "block status range invalid"),
            Cmd::BlockStatus => {
                let max = if req.flags & CMD_FLAG_REQ_ONE != 0 { 1 } else { MAX_EXTENTS };
                // A 64-bit length is a hint; the spec lets the answer cover less.
                let len = req.len.min(MAX_STATUS_LEN) as u32;
                self.submit(ctx, req, Op::Extents { offset: req.offset, len, max }, Vec::new())
            }
        }
    }

    /// A WRITE whose payload does not fit in the budget now waits, its header left unparsed
    /// (the payload stays in the socket), until the reactor calls `budget_retry`. Writes that
    /// will be refused (too long) carry no payload we keep, so they never wait.
    fn wait_for_budget(&mut self, ctx: &mut Ctx, req: &Request) -> bool {
        if req.kind != Cmd::Write as u16 || req.len > u64::from(MAX_REQUEST_LEN) {
            return false;
        }
        let len = req.len as usize;
        if ctx.budget.fits(self.reserved, len) {
            return false;
        }
        debug!("{} {}: a {len}-byte write waits for room in the payload budget", self.id, self.peer);
        self.budget_wait = true;
        ctx.budget.wait(self.id);
        true
    }

    /// Room was freed in the payload budget: parse the waiting header again.
    pub fn budget_retry(&mut self) {
        if std::mem::take(&mut self.budget_wait) {
            self.carry_stale = false;
        }
    }

    fn release_payload(&mut self, ctx: &mut Ctx, len: usize) {
        self.reserved -= len;
        ctx.budget.release(len);
    }

    /// The reservation of a payload still being received, which closing the connection frees
    /// (payloads already handed to the disk free theirs when the job completes).
    pub fn unfinished_payload(&self) -> usize {
        match &self.incoming {
            Incoming::Payload { buf, .. } => buf.len(),
            _ => 0,
        }
    }

    /// While the peer owes us the rest of a WRITE payload and has sent nothing we have not
    /// read: how much of it has arrived (the reactor closes a client whose count stops moving).
    pub fn stall_probe(&self) -> Option<u64> {
        match &self.incoming {
            Incoming::Payload { filled, .. } if !self.read_ready && !self.hup && self.carry.is_empty() => {
                Some(*filled as u64)
            }
            _ => None,
        }
    }

    /// Still in negotiation (the handshake deadline applies).
    pub fn negotiating(&self) -> bool {
        matches!(self.phase, Phase::ClientFlags | Phase::Options)
    }

    /// Some of its requests are with the disk (or the payload cache) rather than waiting on
    /// the peer: shutdown lets these finish.
    pub fn waits_on_disk(&self) -> bool {
        let receiving = usize::from(matches!(self.incoming, Incoming::Payload { .. }));
        self.in_flight > receiving
    }

    /// A request header with a bad magic: the framing is lost, so the connection ends; but
    /// first the request gets EINVAL with its cookie, if the header is long enough to have
    /// one, as the original flexnbd did (its acceptance tests expect it).
    fn bad_request(&mut self, rest: &[u8], e: ParseError) {
        warn!("{} {}: protocol error: {e}; closing", self.id, self.peer);
        // The cookie sits at the same place in compact and extended headers.
        if let Some(cookie) = tx::request_cookie(rest) {
            self.error_reply(cookie, 0, false, NbdErr::Inval, "bad request magic");
        }
        self.drain();
    }

    /// A listen server takes writes from its migration sender only while one is connected.
    fn sender_only(&self, ctx: &Ctx) -> bool {
        ctx.cfg.listen && !self.role.is_sender() && ctx.lineage.migrating()
    }

    /// A write-type request was accepted (`fua`: it is durable once answered).
    fn note_write(&mut self, ctx: &mut Ctx, fua: bool) {
        self.role.note_write(fua);
        if ctx.cfg.listen && !self.role.is_sender() {
            ctx.lineage.foreign_write();
        }
    }

    /// Refuses a request; a WRITE's payload is still on its way and is skipped, never buffered.
    fn refuse(&mut self, req: Request, err: NbdErr) {
        if req.has_payload(self.extended) && req.len > 0 {
            self.incoming = Incoming::Discard { req, remaining: req.len, err };
        } else {
            self.reply_error(req, err, "request refused");
        }
    }

    fn discard_complete(&mut self) {
        if let Incoming::Discard { req, err, .. } = std::mem::replace(&mut self.incoming, Incoming::Header) {
            self.reply_error(req, err, "write refused");
        }
    }

    fn payload_complete(&mut self, ctx: &mut Ctx) {
        if let Incoming::Payload { req, buf, .. } = std::mem::replace(&mut self.incoming, Incoming::Header) {
            // in_flight was counted when the header arrived.
            self.in_flight -= 1;
            self.in_flight_bytes -= buf.len();
            if self.handed_over() {
                ctx.bufs.give(buf);
                return self.reply_error(req, NbdErr::Shutdown, "migrated away");
            }
            if self.sender_only(ctx) {
                // Its header came before a sender connected; the sender's data must not be
                // overwritten now.
                self.release_payload(ctx, buf.len());
                ctx.bufs.give(buf);
                return self.reply_error(req, NbdErr::Perm, "a migration is coming in");
            }
            let fua = req.flags & CMD_FLAG_FUA != 0;
            self.submit(ctx, req, Op::Write { offset: req.offset, fua }, buf);
        }
    }

    fn start_read(&mut self, ctx: &mut Ctx, req: Request) {
        let len = req.len as usize;
        if len >= SENDFILE_MIN && ctx.export.cached(req.offset, len) {
            return self.reply_from_file(req);
        }
        let at = self.read_header_len();
        let mut buf = ctx.bufs.take(at + len);
        if len <= INLINE_READ_MAX
            && let Some(result) = ctx.export.try_read_nowait(&mut buf[at..], req.offset)
        {
            self.in_flight += 1;
            self.in_flight_bytes += buf.len();
            let job =
                Job { conn: self.id, cookie: req.cookie, op: Op::Read { offset: req.offset, at, len }, buf };
            return self.complete(ctx, Completion { job, result: result.map(|_| Vec::new()) });
        }
        // Where RWF_NOWAIT works, falling through means the data is not cached: the pool must
        // wait for the disk. Where it doesn't (tmpfs), a small read may run inline like a write.
        let inline_ok = !ctx.export.nowait_reads();
        self.submit_with(ctx, req, Op::Read { offset: req.offset, at, len }, buf, inline_ok);
    }

    /// Answers a read whose data is all in the page cache: the header now, the data straight
    /// from the file when the socket takes it (sendfile). No disk job, no copy through us.
    /// The data is what the file holds when it is sent; anything written to the range by then
    /// was sent while this read was still unanswered, which NBD leaves unordered anyway.
    fn reply_from_file(&mut self, req: Request) {
        let mut h = Vec::with_capacity(tx::EXT_REPLY_LEN + 8);
        if self.extended {
            let len = 8 + req.len;
            h.extend_from_slice(&tx::encode_ext_header(
                REPLY_FLAG_DONE,
                CHUNK_OFFSET_DATA,
                req.cookie,
                req.offset,
                len,
            ));
            h.extend_from_slice(&req.offset.to_be_bytes());
        } else if self.structured {
            h.extend_from_slice(&tx::encode_chunk_header(
                REPLY_FLAG_DONE,
                CHUNK_OFFSET_DATA,
                req.cookie,
                8 + req.len as u32,
            ));
            h.extend_from_slice(&req.offset.to_be_bytes());
        } else {
            h.extend_from_slice(&tx::encode_simple_reply(0, req.cookie));
        }
        self.push_out(h);
        self.out.push_file(req.offset, req.len as usize);
    }

    fn submit(&mut self, ctx: &mut Ctx, req: Request, op: Op, buf: Vec<u8>) {
        self.submit_with(ctx, req, op, buf, true)
    }

    /// Hands a job to the pool, or runs it here when `inline_ok` and the inline policy agree.
    fn submit_with(&mut self, ctx: &mut Ctx, req: Request, op: Op, buf: Vec<u8>, inline_ok: bool) {
        if op.modifies() {
            *ctx.writes_in_flight += 1;
        }
        self.in_flight += 1;
        self.in_flight_bytes += buf.len();
        let job = Job { conn: self.id, cookie: req.cookie, op, buf };
        if inline_ok && ctx.inline.allows(&job) {
            let t = std::time::Instant::now();
            let c = crate::io_pool::run(ctx.export, job);
            ctx.inline.took(t.elapsed());
            ctx.inline_done.push(c);
        } else {
            ctx.pool.submit(job);
        }
    }

    /// A finished job: turn it into a reply.
    pub fn complete(&mut self, ctx: &mut Ctx, c: Completion) {
        let Completion { job, result } = c;
        if let Op::Send { out, blocked, .. } = job.op {
            return self.sent(out, blocked, result);
        }
        self.in_flight -= 1;
        self.in_flight_bytes -= job.buf.len();
        if let Op::Write { .. } = job.op {
            self.release_payload(ctx, job.buf.len());
        }
        let cookie = job.cookie;
        // Read data leaves with the reply; every other job's buffer is done with here.
        let mut spare = Some(job.buf);
        match (job.op, result) {
            (Op::Read { offset, at, len }, Ok(_)) => {
                let Some(mut buf) = spare.take() else { return };
                if self.extended {
                    let h = tx::encode_ext_header(
                        REPLY_FLAG_DONE,
                        CHUNK_OFFSET_DATA,
                        cookie,
                        offset,
                        8 + len as u64,
                    );
                    buf[..tx::EXT_REPLY_LEN].copy_from_slice(&h);
                    buf[tx::EXT_REPLY_LEN..at].copy_from_slice(&offset.to_be_bytes());
                } else if self.structured {
                    let h =
                        tx::encode_chunk_header(REPLY_FLAG_DONE, CHUNK_OFFSET_DATA, cookie, 8 + len as u32);
                    buf[..tx::CHUNK_HEADER_LEN].copy_from_slice(&h);
                    buf[tx::CHUNK_HEADER_LEN..at].copy_from_slice(&offset.to_be_bytes());
                } else {
                    buf[..at].copy_from_slice(&tx::encode_simple_reply(0, cookie));
                }
                self.push_out(buf);
            }
            (Op::Extents { offset, .. }, Ok(ext)) => self.reply_extents(cookie, offset, &ext),
            (op, Ok(_)) => {
                if matches!(op, Op::Flush) {
                    self.role.flushed();
                }
                self.reply_done(cookie, op_offset(&op));
            }
            (op, Err(e)) => {
                if op.modifies() {
                    self.role.write_failed();
                }
                let err = errno_to_nbd(&e);
                warn!("{} {}: {op:?} failed: {e}", self.id, self.peer);
                let is_read = matches!(op, Op::Read { .. } | Op::Extents { .. });
                self.error_reply(cookie, op_offset(&op), is_read, err, &e.to_string());
            }
        }
        if let Some(b) = spare {
            ctx.bufs.give(b);
        }
    }

    /// Bytes in front of a READ's data in its reply: the header, and for a data chunk its offset.
    fn read_header_len(&self) -> usize {
        if self.extended {
            tx::EXT_REPLY_LEN + 8
        } else if self.structured {
            tx::CHUNK_HEADER_LEN + 8
        } else {
            tx::SIMPLE_REPLY_LEN
        }
    }

    /// Success without data: a simple reply, or with extended headers (which allow no simple
    /// replies) a final empty chunk echoing the request's offset.
    fn reply_done(&mut self, cookie: u64, offset: u64) {
        if self.extended {
            self.push_out(tx::encode_ext_done(cookie, offset).to_vec());
        } else {
            self.push_out(tx::encode_simple_reply(0, cookie).to_vec());
        }
    }

    fn reply_extents(&mut self, cookie: u64, offset: u64, ext: &[Extent]) {
        if self.extended {
            // Extended headers get the 64-bit descriptors: what they were made for, and what a
            // client that asked for them handles best.
            let wide: Vec<(u64, u32)> = ext.iter().map(|&(l, f)| (u64::from(l), f)).collect();
            let mut b = Vec::with_capacity(tx::EXT_REPLY_LEN + 8 + 16 * ext.len());
            tx::encode_block_status_ext(&mut b, cookie, offset, META_BASE_ALLOCATION_ID, &wide);
            return self.push_out(b);
        }
        let mut b = Vec::with_capacity(tx::CHUNK_HEADER_LEN + 4 + 8 * ext.len());
        tx::encode_block_status(&mut b, cookie, META_BASE_ALLOCATION_ID, ext);
        self.push_out(b);
    }

    fn reply_error(&mut self, req: Request, err: NbdErr, msg: &str) {
        let is_read = matches!(req.cmd(), Some(Cmd::Read) | Some(Cmd::BlockStatus));
        self.error_reply(req.cookie, req.offset, is_read, err, msg);
    }

    /// READ and BLOCK_STATUS get a structured error chunk once structured replies are on (a
    /// simple reply to them would break the client's framing); everything else a simple reply.
    /// With extended headers every error is a chunk.
    fn error_reply(&mut self, cookie: u64, offset: u64, is_read: bool, err: NbdErr, msg: &str) {
        if self.extended {
            let mut b = Vec::with_capacity(tx::EXT_REPLY_LEN + 6 + msg.len());
            tx::encode_ext_error_chunk(&mut b, cookie, offset, err as u32, msg);
            self.push_out(b);
        } else if self.structured && is_read {
            let mut b = Vec::with_capacity(tx::CHUNK_HEADER_LEN + 6 + msg.len());
            tx::encode_error_chunk(&mut b, cookie, err as u32, msg);
            self.push_out(b);
        } else {
            self.push_out(tx::encode_simple_reply(err as u32, cookie).to_vec());
        }
    }

    // ------------------------------------------------------------------------------------------
    // Output

    fn push_out(&mut self, b: Vec<u8>) {
        self.out.push(b);
    }

    /// Writes queued replies with writev until done or the socket is full.
    fn write_out(&mut self, ctx: &mut Ctx) -> io::Result<()> {
        if let Some(e) = self.send_error.take() {
            return Err(e);
        }
        if self.sending {
            // The worker takes them unless it is just stopping; then they wait for its
            // completion, which flushes again.
            if let Some(l) = &self.lent {
                l.give(&mut self.out);
            }
            return Ok(());
        }
        if self.write_blocked {
            return Ok(());
        }
        if self.congested && self.out.file_bytes() >= OFFLOAD_MIN && ctx.pool.may_lend() {
            return self.offload(ctx);
        }
        self.write_blocked = self.out.write_to(&mut self.stream, Some(ctx.bufs), Some(ctx.export.as_fd()))?;
        self.congested = self.write_blocked;
        Ok(())
    }

    /// Hands the queue to a disk worker to send, and the replies queued after it until the
    /// worker stops (see `sender`). Only once the socket is congested: the data would wait in
    /// the socket anyway, so the thread hops add no latency, and a light client goes on being
    /// answered from here.
    fn offload(&mut self, ctx: &mut Ctx) -> io::Result<()> {
        let lent = match &self.lent {
            Some(l) => l.clone(),
            None => self.lent.insert(Arc::new(Lent::new(self.stream.as_fd())?)).clone(),
        };
        let out = std::mem::take(&mut self.out);
        lent.open(&out);
        self.sending = true;
        ctx.pool.submit(Job {
            conn: self.id,
            cookie: 0,
            op: Op::Send { out, lent, blocked: false },
            buf: Vec::new(),
        });
        Ok(())
    }

    /// Bytes a worker has yet to send for us.
    fn lent_backlog(&self) -> usize {
        match &self.lent {
            Some(l) if self.sending => l.backlog(),
            _ => 0,
        }
    }

    /// A worker finished sending (see `offload`): what it left goes out before anything
    /// queued since.
    fn sent(&mut self, mut left: OutQueue, blocked: bool, result: io::Result<Vec<Extent>>) {
        self.sending = false;
        if let Err(e) = result {
            self.send_error = Some(e);
            return;
        }
        left.append(&mut self.out);
        self.out = left;
        self.write_blocked = blocked;
        self.congested = blocked;
    }
}

/// The offset of the request a job serves, which an extended reply must echo. Every job but
/// FLUSH carries it; a FLUSH's is zero (others are refused before they become jobs).
fn op_offset(op: &Op) -> u64 {
    match *op {
        Op::Read { offset, .. }
        | Op::Write { offset, .. }
        | Op::Trim { offset, .. }
        | Op::Zero { offset, .. }
        | Op::Cache { offset, .. }
        | Op::Extents { offset, .. }
        | Op::ReadSparse { offset, .. } => offset,
        Op::Flush | Op::Send { .. } => 0,
    }
}

/// One read: Some(n>0) bytes, None on WouldBlock, Err(Eof) when the peer closed.
fn read_some(s: &mut impl Read, buf: &mut [u8]) -> Result<Option<usize>, Fatal> {
    read_some_vectored(s, buf, &mut [])
}

/// Like `read_some`, filling `a` first and then `b`.
fn read_some_vectored(s: &mut impl Read, a: &mut [u8], b: &mut [u8]) -> Result<Option<usize>, Fatal> {
    loop {
        match s.read_vectored(&mut [io::IoSliceMut::new(a), io::IoSliceMut::new(b)]) {
            Ok(0) => return Err(Fatal::Eof),
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Fatal::Io(e)),
        }
    }
}

/// What this export supports. DF is only offered with structured replies: it is about their
/// chunks, and the spec has servers clear it otherwise.
pub fn transmission_flags(ctx: &Ctx, structured: bool) -> u16 {
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_CACHE;
    if ctx.cfg.multi_conn {
        f |= TF_CAN_MULTI_CONN;
    }
    if structured {
        f |= TF_SEND_DF;
    }
    if ctx.export.read_only() {
        f |= TF_READ_ONLY;
    } else {
        f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
    }
    f
}

/// Maps an OS error onto the few errno values NBD carries.
pub fn errno_to_nbd(e: &io::Error) -> NbdErr {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => NbdErr::Perm,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => NbdErr::NoSpc,
        Some(libc::EINVAL) => NbdErr::Inval,
        Some(libc::ENOMEM) => NbdErr::NoMem,
        Some(libc::EOPNOTSUPP) => NbdErr::NotSup,
        Some(libc::EOVERFLOW) => NbdErr::Overflow,
        _ => NbdErr::Io,
    }
}
