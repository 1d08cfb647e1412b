//! The reactor: one mio Poll drives the listener, every connection's state machine, the control
//! socket, signals (signalfd) and disk completions (Waker). It owns all sockets and all protocol
//! state; disk workers only ever see jobs.

mod clients;
mod commands;
mod migrating;
mod setup;

pub use setup::{ServeOptions, serve};

use crate::acl::Acl;
use crate::batching::Batching;
use crate::budget::PayloadBudget;
use crate::buffer::BufPool;
use crate::conn::client::ClientConn;
use crate::conn::control::{Command, ControlConn, ControlListener, MirrorAction};
use crate::conn::mirror::{Io, MirrorConn};
use crate::conn::{Ctx, InlineIo, Next, SHARED_READ_BUF, ServeConfig};
use crate::deadlines::{Limits, Watch};
use crate::error::Error;
use crate::export::Export;
use crate::io_pool::{Completion, IoPool, Op};
use crate::listener::{Endpoint, Listener, Peer, Socket};
use crate::migration::dest::Lineage;
use crate::migration::source::{self, Source};
use crate::migration::{Action, Event, Written};
use crate::systemd::Notifier;
use crate::token::{self, ConnId};
use crate::{fatal, signals};
use log::{debug, info, warn};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use slab::Slab;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long shutdown waits for in-flight disk work (a disk that hangs) before giving up on it.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// After a handover, how long clients get to hear ESHUTDOWN for what they sent before the
/// process exits (the destination serves them from now on).
const HANDOVER_DRAIN: Duration = Duration::from_secs(1);
/// How long shutdown waits on peers: a client that has not sent the rest of a request or read
/// its replies by then is closed (the man page says so).
const PEER_GRACE: Duration = Duration::from_secs(2);
/// Back-off after accept() fails for lack of descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long the reactor keeps polling without sleeping after the last event.
const SPIN: Duration = Duration::from_micros(50);
/// How long request buffers are kept after the last client leaves. Tools like nbdcopy and
/// qemu-img connect afresh for every copy, and refilling the pool costs a page fault per 4 KiB
/// (a 1 GiB nbdcopy write faulted 5,500 times, about 9 us each on the benchmark VM). Long
/// enough for a script's next command, short enough that an idle server is soon small again.
const POOL_LINGER: Duration = Duration::from_secs(5);
/// How often the service manager hears how a migration is going (STATUS=).
const STATUS_EVERY: Duration = Duration::from_secs(1);

// Nearly every entry is a client, so boxing clients would save no memory and cost an
// allocation per connection and a pointer chase per event.
#[allow(clippy::large_enum_variant)]
pub enum Conn {
    Client(ClientConn<Socket>),
    Control(ControlConn),
    Mirror(Box<MirrorConn>),
}

/// Everything but the connections, so a connection can borrow it while the slab is borrowed.
pub struct Core {
    pub export: Arc<Export>,
    pub pool: IoPool,
    pub cfg: ServeConfig,
    pub acl: Acl,
    pub registry: Registry,
    pub sbuf: Vec<u8>,
    pub migration_done: bool,
    pub num_clients: usize,
    /// Migration freeze: clients are not read from.
    pub frozen: bool,
    /// Set with `frozen` and cleared by the reactor once it has let the held clients go.
    pub held: bool,
    pub writes_in_flight: usize,
    /// Client requests received so far: the migration watches it to notice clients at work.
    pub requests: u64,
    new_sender: Option<ConnId>,
    bufs: BufPool,
    inline: InlineIo,
    inline_done: Vec<Completion>,
    lineage: Lineage,
    generation: u64,
    budget: PayloadBudget,
}

impl Core {
    fn ctx(&mut self) -> Ctx<'_> {
        Ctx {
            export: &self.export,
            pool: &self.pool,
            cfg: &self.cfg,
            acl: &self.acl,
            registry: &self.registry,
            sbuf: &mut self.sbuf,
            migration_done: &mut self.migration_done,
            frozen: self.frozen,
            writes_in_flight: &mut self.writes_in_flight,
            requests: &mut self.requests,
            new_sender: &mut self.new_sender,
            bufs: &mut self.bufs,
            inline: &mut self.inline,
            inline_done: &mut self.inline_done,
            lineage: &mut self.lineage,
            budget: &mut self.budget,
        }
    }

    pub fn next_generation(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }
}

pub struct Server {
    poll: Poll,
    listener: Option<Listener>,
    control: Option<ControlListener>,
    signals: signals::SignalFd,
    conns: Slab<Conn>,
    core: Core,
    mirror: Option<Token>,
    file: PathBuf,
    /// Set when a handover completed and the process should exit 0.
    handed_over: bool,
    /// Status keys saying why the last migration gave up, until the next one starts.
    last_mirror_error: Option<String>,
    /// A listen server failed to write its file: it cannot complete a migration, so it exits.
    write_failure: Option<String>,
    pending: Vec<Token>,
    completions: Vec<Completion>,
    accept_paused_until: Option<Instant>,
    shutdown_deadline: Option<Instant>,
    spin_until: Option<Instant>,
    /// Chooses the pause between busy turns that lets requests batch up (see `batching`).
    batching: Batching,
    pause_until: Option<Instant>,
    /// When the request buffers go back to the system, if no client has come by then.
    release_bufs_at: Option<Instant>,
    /// The service manager (systemd), told when we are ready, how a migration goes, and when
    /// we stop; `status_at` is when it next hears about a running migration.
    notify: Notifier,
    status_at: Option<Instant>,
    idle_status: String,
    /// Deadlines on negotiation and on payloads, and the client cap.
    watch: Watch,
    /// When shutdown stops waiting on peers (see PEER_GRACE).
    peer_grace_until: Option<Instant>,
    /// Client write completions held back until the migration's destination has the write
    /// too (active mirroring), by ticket; `ticket` numbers them.
    delayed: HashMap<u64, Completion>,
    ticket: u64,
}

impl Server {
    /// Runs until a signal (exit status 0 after draining) or, in listen mode, a completed
    /// migration. Returns the process exit status.
    pub fn run(mut self) -> Result<i32, Error> {
        let mut events = Events::with_capacity(1024);
        self.notify.ready(&self.idle_status);
        let status = loop {
            if let Some(until) = self.pause_until.take() {
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            }
            let timeout = self.timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Io { what: "poll failed".into(), source: e });
            }
            let now = Instant::now();
            if !events.is_empty() {
                let pause = self.batching.after_turn(now, self.core.requests);
                self.pause_until = (!pause.is_zero()).then(|| now + pause);
            }
            // Right after activity, poll without sleeping for a moment: a sleeping vCPU takes
            // tens of microseconds to wake, which dominates a one-request-at-a-time client.
            // Once nothing happens for SPIN, block as usual (an idle server uses no CPU).
            // Not while disk jobs are out: their completions wake us anyway, and spinning
            // then only takes CPU from the workers and the clients.
            if !events.is_empty() && !self.core.pool.busy() {
                self.spin_until = Some(now + SPIN);
            } else if self.spin_until.is_some_and(|t| now >= t) {
                self.spin_until = None;
            }
            for ev in events.iter() {
                match ev.token() {
                    token::LISTENER => self.accept(),
                    token::WAKER => {}
                    token::SIGNAL => {
                        if let Some(code) = self.on_signal() {
                            return Ok(code);
                        }
                    }
                    token::CONTROL => self.accept_control(),
                    t => {
                        let hup = ev.is_read_closed() || ev.is_error();
                        let r = ev.is_readable() || hup;
                        let w = ev.is_writable() || ev.is_write_closed() || ev.is_error();
                        self.conn_event(t, r, w, hup);
                    }
                }
            }
            self.drain_completions();
            if let Some(why) = self.write_failure.take() {
                fatal!(
                    "cannot write {}: {why}; exiting, since no migration can complete here",
                    self.file.display()
                );
                break 1;
            }
            self.mirror_tick();
            self.notify_progress();
            self.release_held();
            self.run_pending();
            self.wake_budget_waiters();
            self.enforce_deadlines();
            self.replace_sender();
            if let Some(at) = self.release_bufs_at
                && Instant::now() >= at
            {
                self.release_bufs_at = None;
                self.core.bufs.clear();
            }
            if let Some(until) = self.accept_paused_until
                && Instant::now() >= until
            {
                self.accept_paused_until = None;
                self.accept();
            }
            if self.core.migration_done {
                info!("migration complete");
                break 0;
            }
            if let Some(deadline) = self.shutdown_deadline {
                // A listen server stopped before its migration completed has failed.
                let code = i32::from(self.core.cfg.listen);
                if self.core.num_clients == 0 {
                    break code;
                }
                if self.peer_grace_until.is_some_and(|t| Instant::now() >= t) {
                    self.close_peer_waiters();
                    if self.core.num_clients == 0 {
                        break code;
                    }
                }
                if Instant::now() >= deadline {
                    warn!(
                        "{} clients still busy at the shutdown deadline; exiting anyway",
                        self.core.num_clients
                    );
                    break code;
                }
            }
        };
        self.finish();
        Ok(status)
    }

    fn timeout(&self) -> Option<Duration> {
        // Jobs run inline after the last drain (by a step or a completion's follow-up) have
        // replies waiting on no event at all: sleeping now would strand them.
        if !self.pending.is_empty()
            || !self.core.inline_done.is_empty()
            || self.spin_until.is_some_and(|t| Instant::now() < t)
        {
            return Some(Duration::ZERO);
        }
        let mut t: Option<Duration> = None;
        if self.shutdown_deadline.is_some() || self.accept_paused_until.is_some() {
            t = Some(ACCEPT_BACKOFF);
        }
        let deadlines = self
            .running_mirror()
            .and_then(|m| m.source().deadline(Instant::now()))
            .into_iter()
            .chain(self.release_bufs_at)
            .chain(self.status_at)
            .chain(self.watch.next_deadline(self.core.budget.held() > 0));
        for d in deadlines {
            let left = d.saturating_duration_since(Instant::now());
            t = Some(t.map_or(left, |t| t.min(left)));
        }
        t
    }

    fn accept(&mut self) {
        if self.accept_paused_until.is_some() {
            return;
        }
        loop {
            let Some(listener) = self.listener.as_ref() else { return };
            let (stream, peer) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
                    ) =>
                {
                    warn!("cannot accept: {e}; pausing accepts for {ACCEPT_BACKOFF:?}");
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    return;
                }
                Err(e) => {
                    debug!("accept failed: {e}");
                    continue;
                }
            };
            if self.is_own_mirror(&stream, peer) {
                // Every block we sent ourselves would dirty the map again: the passes would never
                // shrink and the freeze would wait for an answer from a frozen client.
                warn!("refused {peer}: it is this server's own migration connection");
                self.stop_mirror("1: Mirror target is this server itself");
                continue;
            }
            if self.core.frozen {
                info!("refused {peer}: migration handover in progress");
                continue;
            }
            if !self.watch.admit(self.core.num_clients) {
                continue;
            }
            // ACL entries are IP addresses: a Unix socket's clients are who its file mode lets in.
            if peer.ip().is_some_and(|ip| !self.core.acl.admits(ip)) {
                info!("refused {peer}: not in the access control list");
                continue;
            }
            if stream.is_tcp() {
                if let Err(e) = stream.set_nodelay(true) {
                    debug!("{peer}: cannot set TCP_NODELAY: {e}");
                }
                crate::net::tune_client_socket(stream.as_raw_fd());
            }
            let entry = self.conns.vacant_entry();
            let token = Token(entry.key());
            if token.0 >= token::FIRST_RESERVED {
                warn!("refused {peer}: too many connections");
                continue;
            }
            let id = ConnId { token, generation: self.core.next_generation() };
            let ctx = self.core.ctx();
            let mut c = ClientConn::new(id, peer, stream, &ctx);
            if let Err(e) = c.register(&self.core.registry, token) {
                warn!("{id} {peer}: cannot register: {e}");
                continue;
            }
            info!("{id} {peer}: connected");
            self.watch.connected(id, Instant::now());
            entry.insert(Conn::Client(c));
            self.core.num_clients += 1;
            self.release_bufs_at = None;
            self.conn_event(token, true, true, false);
        }
    }

    fn accept_control(&mut self) {
        while let Some(stream) = self.control.as_ref().and_then(|l| l.accept()) {
            let entry = self.conns.vacant_entry();
            let token = Token(entry.key());
            if token.0 >= token::FIRST_RESERVED {
                continue;
            }
            let mut c = ControlConn::new(token, stream);
            if c.register(&self.core.registry).is_err() {
                continue;
            }
            entry.insert(Conn::Control(c));
            self.conn_event(token, true, true, false);
        }
    }

    fn conn_event(&mut self, t: Token, readable: bool, writable: bool, hup: bool) {
        let next = match self.conns.get_mut(t.0) {
            None => return,
            Some(Conn::Client(c)) => {
                let mut ctx = self.core.ctx();
                let n = c.on_event(&mut ctx, readable, writable, hup);
                if n == Next::Continue && c.wants_read(&ctx) {
                    self.pending.push(t);
                }
                n
            }
            Some(Conn::Control(_)) => self.control_event(t, readable, writable),
            Some(Conn::Mirror(m)) => {
                let io =
                    Io { registry: &self.core.registry, pool: &self.core.pool, requests: self.core.requests };
                let acts = m.on_event(&io, readable, writable);
                self.mirror_actions(acts);
                Next::Continue
            }
        };
        if next == Next::Close {
            self.close(t);
        }
        self.replace_sender();
    }

    fn drain_completions(&mut self) {
        self.core.pool.drain(&mut self.completions);
        self.completions.append(&mut self.core.inline_done);
        if self.completions.is_empty() {
            return;
        }
        let mut touched: Vec<Token> = Vec::new();
        let mut done = std::mem::take(&mut self.completions);
        for c in done.drain(..) {
            let id = c.job.conn;
            if self.core.cfg.listen
                && self.write_failure.is_none()
                && let Some(e) = c.failed_write()
            {
                self.write_failure = Some(e.to_string());
            }
            // Counted and mirrored whoever asked, even a client that has gone since.
            let c = match c.modified_range() {
                Some((offset, len)) => {
                    self.core.writes_in_flight -= 1;
                    let held = self.mirror.is_some() && self.client_wrote(offset, len, &c);
                    // Answered once the destination has it too (active mirroring); stored
                    // before anything else the migration does can let it go.
                    let c = if held {
                        self.delayed.insert(self.ticket, c);
                        None
                    } else {
                        Some(c)
                    };
                    if self.core.frozen && self.core.writes_in_flight == 0 {
                        self.mirror_feed(Event::ClientWritesIdle);
                    }
                    c
                }
                None => Some(c),
            };
            let Some(c) = c else { continue };
            match self.conns.get_mut(id.token.0) {
                Some(Conn::Mirror(m)) if m.id == id => {
                    let io = Io {
                        registry: &self.core.registry,
                        pool: &self.core.pool,
                        requests: self.core.requests,
                    };
                    let acts = m.complete(&io, c);
                    self.mirror_actions(acts);
                }
                Some(Conn::Client(conn)) if conn.id == id => {
                    let mut ctx = self.core.ctx();
                    conn.complete(&mut ctx, c);
                    if touched.last() != Some(&id.token) {
                        touched.push(id.token);
                    }
                }
                // The connection went away (or its slot was reused) while the disk worked.
                _ => self.drop_completion(c),
            }
        }
        self.completions = done;
        touched.sort_unstable_by_key(|t| t.0);
        touched.dedup();
        // One flush per connection covers every reply this drain produced (one writev).
        for t in touched {
            self.step(t);
        }
    }

    fn run_pending(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        for t in pending {
            self.step(t);
        }
    }

    /// Lets a connection read (if it may) and send; re-queues it if it could read more.
    fn step(&mut self, t: Token) {
        let Some(Conn::Client(c)) = self.conns.get_mut(t.0) else { return };
        let mut ctx = self.core.ctx();
        let next = c.step(&mut ctx);
        if next == Next::Close {
            self.close(t);
        } else if c.wants_read(&ctx) && !self.pending.contains(&t) {
            self.pending.push(t);
        }
    }
}
