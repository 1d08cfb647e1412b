//! The reactor: one mio Poll drives the listener, every connection's state machine, the control
//! socket, signals (signalfd) and disk completions (Waker). It owns all sockets and all protocol
//! state; disk workers only ever see jobs.

use crate::acl::Acl;
use crate::batching::Batching;
use crate::budget::PayloadBudget;
use crate::buffer::BufPool;
use crate::cli::MultiConn;
use crate::conn::client::ClientConn;
use crate::conn::control::{Command, ControlConn, ControlListener, MirrorAction};
use crate::conn::mirror::{DEFAULT_FREEZE_LIMIT, Mirror, MirrorSpec, Outcome};
use crate::conn::{Ctx, InlineIo, Next, SHARED_READ_BUF, ServeConfig};
use crate::deadlines::{Limits, Watch};
use crate::dirty::DirtyMap;
use crate::error::Error;
use crate::export::Export;
use crate::io_pool::{Completion, IoPool, Op};
use crate::listener::{Endpoint, Listener, Peer, Socket};
use crate::migration::dest::Lineage;
use crate::net::Target;
use crate::systemd::Notifier;
use crate::token::{self, ConnId};
use crate::{fatal, signals};
use log::{debug, info, warn};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use slab::Slab;
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

pub struct ServeOptions {
    pub endpoint: Endpoint,
    pub file: PathBuf,
    pub sock: Option<PathBuf>,
    pub default_deny: bool,
    pub acl: Vec<String>,
    pub oldstyle: bool,
    pub read_only: bool,
    pub listen: bool,
    pub workers: usize,
    pub multi_conn: MultiConn,
    /// Handshake and stall deadlines, and the cap on clients.
    pub limits: Limits,
    /// Bytes of WRITE payload all clients together may have buffered (see `budget`).
    pub payload_budget: usize,
}

// Nearly every entry is a client, so boxing clients would save no memory and cost an
// allocation per connection and a pointer chase per event.
#[allow(clippy::large_enum_variant)]
pub enum Conn {
    Client(ClientConn<Socket>),
    Control(ControlConn),
    Mirror(Box<Mirror>),
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
    /// Set while a migration is running: ranges changed since they were last sent.
    pub dirty: Option<DirtyMap>,
    /// Migration freeze: clients are not read from.
    pub frozen: bool,
    /// Set with `frozen` and cleared by the reactor once it has let the held clients go.
    pub held: bool,
    pub writes_in_flight: usize,
    /// Client requests received so far: the mirror watches it to notice clients at work.
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
}

impl Server {
    pub fn new(o: ServeOptions) -> Result<Server, Error> {
        let acl = Acl::parse(&o.acl, o.default_deny)?;
        let export = Arc::new(Export::open(&o.file, o.read_only)?);
        raise_nofile_limit();
        // Signals are blocked before any thread starts, so only the signalfd ever sees them.
        let signals = signals::SignalFd::new()
            .map_err(|e| Error::Setup { what: "cannot set up signal handling", source: e })?;
        let setup = |what| move |e| Error::Setup { what, source: e };
        let poll = Poll::new().map_err(setup("cannot create poll"))?;
        let mut listener = Listener::bind(o.endpoint)?;
        let local = listener.describe().map_err(setup("cannot read listening address"))?;
        let control = match &o.sock {
            Some(p) => Some(ControlListener::bind(p)?),
            None => None,
        };
        let registry = poll.registry().try_clone().map_err(setup("cannot clone registry"))?;
        registry
            .register(&mut listener, token::LISTENER, Interest::READABLE)
            .map_err(setup("cannot register listener"))?;
        registry
            .register(&mut SourceFd(&signals.as_raw_fd()), token::SIGNAL, Interest::READABLE)
            .map_err(setup("cannot register signals"))?;
        let mut control = control;
        if let Some(c) = control.as_mut() {
            c.register(&registry, token::CONTROL).map_err(setup("cannot register control socket"))?;
        }
        let waker = Arc::new(Waker::new(&registry, token::WAKER).map_err(setup("cannot create waker"))?);
        let pool =
            IoPool::new(o.workers, export.clone(), waker).map_err(setup("cannot start disk workers"))?;
        info!("listening on {local}, serving {} ({} bytes)", o.file.display(), export.size());
        let idle_status = if o.listen {
            format!("waiting for a migration into {} on {local}", o.file.display())
        } else {
            format!("serving {} on {local}", o.file.display())
        };
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let multi_conn = o.multi_conn.advertise(cpus);
        if !multi_conn && o.multi_conn == MultiConn::Auto {
            info!("multi-conn not advertised on {cpus} CPUs (--multi-conn on advertises it)");
        }
        let cfg = ServeConfig {
            oldstyle: o.oldstyle,
            read_only: o.read_only,
            listen: o.listen,
            max_in_flight_bytes: 64 << 20,
            max_in_flight_reqs: 1024,
            instance_id: random_u64(),
            multi_conn,
        };
        let instance_id = cfg.instance_id;
        Ok(Server {
            poll,
            listener: Some(listener),
            control,
            signals,
            conns: Slab::new(),
            core: Core {
                export,
                pool,
                cfg,
                acl,
                registry,
                sbuf: vec![0u8; SHARED_READ_BUF],
                migration_done: false,
                num_clients: 0,
                dirty: None,
                frozen: false,
                held: false,
                writes_in_flight: 0,
                requests: 0,
                new_sender: None,
                bufs: BufPool::default(),
                inline: InlineIo::default(),
                inline_done: Vec::new(),
                lineage: Lineage::new(instance_id),
                generation: 0,
                budget: PayloadBudget::new(o.payload_budget),
            },
            mirror: None,
            file: o.file.clone(),
            handed_over: false,
            last_mirror_error: None,
            write_failure: None,
            pending: Vec::new(),
            completions: Vec::new(),
            accept_paused_until: None,
            shutdown_deadline: None,
            spin_until: None,
            batching: Batching::new(Instant::now()),
            pause_until: None,
            release_bufs_at: None,
            notify: Notifier::from_env(),
            status_at: None,
            idle_status,
            watch: Watch::new(o.limits, Instant::now()),
            peer_grace_until: None,
        })
    }

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
            .and_then(|m| m.deadline())
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

    /// Flush the file, remove the control socket, stop the workers.
    fn finish(&mut self) {
        self.notify.stopping("exiting");
        for (_, c) in self.conns.iter_mut() {
            if let Conn::Client(c) = c {
                c.deregister(&self.core.registry);
            }
        }
        self.conns.clear();
        self.core.pool.shutdown();
        if let Err(e) = self.core.export.flush() {
            warn!("final flush failed: {e}");
        }
        if let Some(c) = self.control.take() {
            c.remove();
        }
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
                tune_client_socket(stream.as_raw_fd());
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

    /// A client of this `serve` declared itself a migration sender: if it is our own mirror
    /// (through a forwarder or NAT, so `own_mirror_addr` could not tell), end both.
    fn refuse_own_mirror(&mut self) {
        let Some(own) = self.running_mirror().map(|m| m.sender()) else { return };
        // Scan rather than look up the new sender: two declarations in one pass keep only one.
        let Some((k, c)) = self.conns.iter().find_map(|(k, c)| match c {
            Conn::Client(c) if c.declared_sender() == Some(own) => Some((k, c)),
            _ => None,
        }) else {
            return;
        };
        warn!("{} {}: refused: it is this server's own migration connection", c.id, c.peer);
        self.close(Token(k));
        self.stop_mirror("1: Mirror target is this server itself");
    }

    /// Whether an accepted connection is the running mirror's own, by both its ends (a local
    /// port may be reused towards another destination, so one end alone proves nothing; and a
    /// dual-stack listener sees IPv4 peers as IPv4-mapped IPv6).
    fn is_own_mirror(&self, stream: &Socket, peer: Peer) -> bool {
        let Some(m) = self.running_mirror() else { return false };
        let Peer::Tcp(peer) = peer else { return false };
        let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        match (m.local_addr(), m.peer_addr(), stream.local_addr()) {
            (Some(ml), Some(mp), Ok(ours)) => canon(ml) == canon(peer) && canon(mp) == canon(ours),
            _ => false,
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

    /// listen admits one migration sender at a time: a new one means the previous attempt is
    /// dead (e.g. a cut connection not yet noticed), so the older sender is dropped. On a serve,
    /// a declared sender may be our own mirror come back through a forwarder.
    fn replace_sender(&mut self) {
        let Some(id) = self.core.new_sender.take() else { return };
        if !self.core.cfg.listen {
            return self.refuse_own_mirror();
        }
        let stale: Vec<Token> = self
            .conns
            .iter()
            .filter_map(|(k, c)| match c {
                Conn::Client(c) if c.is_migration_sender() && c.id != id => Some(Token(k)),
                _ => None,
            })
            .collect();
        for t in stale {
            info!("a new migration sender replaces the previous one");
            self.close(t);
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
                let o = m.on_event(&mut self.core, readable, writable);
                self.mirror_outcome(o);
                Next::Continue
            }
        };
        if next == Next::Close {
            self.close(t);
        }
        self.replace_sender();
    }

    fn control_event(&mut self, t: Token, readable: bool, writable: bool) -> Next {
        let Some(Conn::Control(c)) = self.conns.get_mut(t.0) else { return Next::Close };
        let (next, cmd) = c.on_event(&self.core.registry, readable, writable);
        if let Some(cmd) = cmd {
            let reply = self.execute(t, cmd);
            if let Some(Conn::Control(c)) = self.conns.get_mut(t.0) {
                return match reply {
                    Some(reply) => c.reply(&self.core.registry, &reply),
                    None => {
                        c.wait();
                        Next::Continue
                    }
                };
            }
        }
        next
    }

    /// Runs one control command; `None` means the answer comes later (to control session `from`).
    fn execute(&mut self, from: Token, cmd: Command) -> Option<(u32, String)> {
        debug!("control command {cmd:?}");
        let running = self.mirror.is_some();
        Some(match cmd {
            Command::Status => (0, self.status_line()),
            Command::Acl(entries) => match Acl::parse(&entries, self.core.acl.default_deny()) {
                Err(e) => (1, format!("bad spec: {}", e.0)),
                Ok(acl) => {
                    self.core.acl = acl;
                    self.enforce_acl();
                    (0, "updated".into())
                }
            },
            Command::Break | Command::MirrorMaxBps(_) | Command::MirrorWait if !running => {
                (1, "not mirroring".into())
            }
            Command::Break => {
                self.stop_mirror("1: mirror stopped");
                (0, "mirror stopped".into())
            }
            Command::MirrorMaxBps(n) => {
                if let Some(m) = self.running_mirror_mut() {
                    m.set_max_bps(n);
                }
                (0, "updated".into())
            }
            Command::MirrorWait => {
                if let Some(m) = self.running_mirror_mut() {
                    m.waiters.push(from);
                }
                return None;
            }
            Command::Mirror { .. } if running => (1, "mirror already running".into()),
            Command::Mirror { .. } if self.core.cfg.listen => {
                (1, "cannot mirror from a listen server".into())
            }
            Command::Mirror { addr, port, action, bind, max_bps, wait, freeze_limit } => {
                let Some(target) = Target::parse(&addr, port) else {
                    return Some((1, "bad IP address".into()));
                };
                let bind = match bind.as_deref().map(crate::net::parse_ip) {
                    None => None,
                    Some(None) => return Some((1, "bad bind address".into())),
                    // The unspecified address fills the slot when nothing is bound.
                    Some(Some(b)) if matches!(target, Target::Unix(_)) => {
                        if !b.is_unspecified() {
                            return Some((1, "a bind address does not apply to a Unix socket".into()));
                        }
                        None
                    }
                    Some(Some(b)) => Some(SocketAddr::new(b, 0)),
                };
                let freeze_limit = freeze_limit.unwrap_or(DEFAULT_FREEZE_LIMIT);
                let spec = MirrorSpec { target, bind, action, max_bps, freeze_limit };
                self.last_mirror_error = None;
                let entry = self.conns.vacant_entry();
                let token = Token(entry.key());
                let id = ConnId { token, generation: self.core.next_generation() };
                // Who we are to the destination: the same for every attempt of this migration,
                // different for any other (here or in another process).
                let sender = self.core.cfg.instance_id ^ id.generation.rotate_left(32);
                let mut m = Mirror::new(spec, id, from, sender);
                m.wait_after_start = wait;
                entry.insert(Conn::Mirror(Box::new(m)));
                self.mirror = Some(token);
                self.mirror_tick();
                return None;
            }
        })
    }

    fn status_line(&self) -> String {
        let mut s = format!(
            "pid={} size={} is_mirroring={} clients_allowed={} num_clients={} has_control={}",
            std::process::id(),
            self.core.export.size(),
            self.mirror.is_some(),
            // The ACL does not restrict a Unix socket's clients.
            self.listener.as_ref().is_some_and(|l| l.is_unix() || self.core.acl.allows_any())
                && !self.core.frozen,
            self.core.num_clients,
            !self.core.cfg.listen,
        );
        if let Some(m) = self.running_mirror() {
            let speed = m.speed();
            let left = m.bytes_left(&self.core);
            let secs_left = left.checked_div(speed).unwrap_or(0);
            s += &format!(
                " migration_speed={speed} migration_duration={} migration_seconds_left={secs_left} migration_bytes_left={left}",
                m.began.elapsed().as_secs()
            );
            s += &m.status_fields();
        } else if let Some(e) = &self.last_mirror_error {
            s += e;
        }
        s
    }

    /// The mirror connection, while one runs.
    fn running_mirror(&self) -> Option<&Mirror> {
        match self.mirror.and_then(|t| self.conns.get(t.0)) {
            Some(Conn::Mirror(m)) => Some(m),
            _ => None,
        }
    }

    fn running_mirror_mut(&mut self) -> Option<&mut Mirror> {
        match self.mirror.and_then(|t| self.conns.get_mut(t.0)) {
            Some(Conn::Mirror(m)) => Some(m),
            _ => None,
        }
    }

    /// Tells the service manager how a running migration goes, once every STATUS_EVERY, and
    /// when it has ended.
    fn notify_progress(&mut self) {
        if !self.notify.enabled() {
            return;
        }
        let now = Instant::now();
        if self.status_at.is_some_and(|t| now < t) {
            return;
        }
        let line = match self.running_mirror() {
            Some(m) => {
                let size = self.core.export.size();
                let left = m.bytes_left(&self.core).min(size);
                let done = if size > 0 { 100.0 * (size - left) as f64 / size as f64 } else { 100.0 };
                let retry = if m.retrying() { ", retrying" } else { "" };
                format!(
                    "migrating to {}: {done:.1}% done, {left} bytes left at {} B/s{retry}",
                    m.spec.target,
                    m.speed()
                )
            }
            None => self.idle_status.clone(),
        };
        self.status_at = self.mirror.is_some().then(|| now + STATUS_EVERY);
        self.notify.status(&line);
    }

    fn mirror_tick(&mut self) {
        let Some(t) = self.mirror else { return };
        let Some(Conn::Mirror(m)) = self.conns.get_mut(t.0) else { return };
        let o = m.tick(&mut self.core);
        self.mirror_outcome(o);
    }

    /// Acts on what the mirror reported.
    fn mirror_outcome(&mut self, o: Outcome) {
        let Some(t) = self.mirror else { return };
        let start_waiter = |conns: &mut Slab<Conn>| match conns.get_mut(t.0) {
            Some(Conn::Mirror(m)) => m.start_waiter.take(),
            _ => None,
        };
        match o {
            Outcome::None => {}
            Outcome::Started => {
                let w = start_waiter(&mut self.conns);
                let keep = match self.conns.get_mut(t.0) {
                    Some(Conn::Mirror(m)) if m.wait_after_start => {
                        m.waiters.extend(w);
                        true
                    }
                    _ => false,
                };
                if !keep {
                    return self.reply_to(w, "0: Migration started");
                }
                // `mirror --wait`: the first line now, the session stays for the final one.
                if let Some(w) = w
                    && let Some(Conn::Control(c)) = self.conns.get_mut(w.0)
                    && c.interim(&self.core.registry, &(0, "Migration started".into())) == Next::Close
                {
                    self.close(w);
                }
            }
            Outcome::GaveUp(msg) => {
                self.last_mirror_error = self.running_mirror().map(Mirror::gave_up_fields);
                self.stop_mirror(&format!("1: {msg}"));
            }
            Outcome::HandedOver => {
                let Some(Conn::Mirror(m)) = self.conns.get(t.0) else { return };
                let action = m.spec.action;
                info!("migration to {} complete", m.spec.target);
                if action == MirrorAction::Unlink {
                    self.unlink_served_file();
                }
                // Set before stop_mirror: once handed over, clients must never run again here.
                self.handed_over = action != MirrorAction::Nothing;
                self.stop_mirror("0: migration complete");
                if self.handed_over {
                    self.hand_over_clients();
                }
            }
        }
    }

    /// `--unlink`: removes the path only if it still names the file we served (a file renamed
    /// over it since belongs to someone else).
    fn unlink_served_file(&self) {
        let path = &self.file;
        let ours = self.core.export.identity();
        let now = std::fs::symlink_metadata(path).map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino())
        });
        match (ours, now) {
            (Ok(a), Ok(b)) if a == b => match std::fs::remove_file(path) {
                Ok(()) => info!("unlinked {}", path.display()),
                Err(e) => warn!("cannot unlink {}: {e}", path.display()),
            },
            (Ok(_), Ok(_)) => {
                warn!("not unlinking {}: the path now names another file than the one served", path.display())
            }
            (_, Err(e)) => warn!("not unlinking {}: {e}", path.display()),
            (Err(e), _) => warn!("not unlinking {}: cannot identify the served file: {e}", path.display()),
        }
    }

    /// After a handover: no new clients; each client's pending requests are answered with
    /// ESHUTDOWN (none runs here any more), then the process exits once they are all closed
    /// or HANDOVER_DRAIN has passed.
    fn hand_over_clients(&mut self) {
        self.notify.stopping("migrated away: answering what clients sent with ESHUTDOWN");
        // Unfrozen only to be refused: `hand_over` makes every request an ESHUTDOWN.
        self.core.frozen = false;
        self.core.held = false;
        self.wind_down(HANDOVER_DRAIN, ClientConn::hand_over);
    }

    /// Ends the mirror session, thaws clients and answers everyone waiting on it.
    fn stop_mirror(&mut self, waiter_reply: &str) {
        let Some(t) = self.mirror.take() else { return };
        if let Some(Conn::Mirror(mut m)) = self.conns.try_remove(t.0) {
            m.teardown(&self.core.registry);
            let start = m.start_waiter.take();
            self.reply_to(start, waiter_reply);
            for w in std::mem::take(&mut m.waiters) {
                self.reply_to(Some(w), waiter_reply);
            }
        }
        self.core.dirty = None;
        self.thaw();
    }

    /// Ends a freeze (if one is on) and lets the clients it held run again.
    fn thaw(&mut self) {
        if self.handed_over {
            return;
        }
        self.core.frozen = false;
        self.release_held();
    }

    /// A freeze can also end inside the mirror (a failed attempt lifts it before retrying).
    /// Either way the held clients have requests waiting in their sockets and no new event
    /// coming (edge-triggered), so each gets a step of its own.
    fn release_held(&mut self) {
        if self.core.frozen || !self.core.held || self.handed_over {
            return;
        }
        self.core.held = false;
        let tokens: Vec<Token> =
            self.conns.iter().filter(|(_, c)| matches!(c, Conn::Client(_))).map(|(k, _)| Token(k)).collect();
        for t in tokens {
            self.step(t);
        }
    }

    fn reply_to(&mut self, t: Option<Token>, line: &str) {
        let Some(t) = t else { return };
        let (code, text) = crate::conn::control::parse_reply(line).unwrap_or((1, line));
        let reply = (code, text.to_string());
        if let Some(Conn::Control(c)) = self.conns.get_mut(t.0)
            && c.reply(&self.core.registry, &reply) == Next::Close
        {
            self.close(t);
        }
    }

    /// After an ACL change, disconnects every client the new list no longer admits.
    fn enforce_acl(&mut self) {
        let refused: Vec<Token> = self
            .conns
            .iter()
            .filter_map(|(k, c)| match c {
                Conn::Client(c) if c.peer.ip().is_some_and(|ip| !self.core.acl.admits(ip)) => Some(Token(k)),
                _ => None,
            })
            .collect();
        for t in refused {
            if let Some(Conn::Client(c)) = self.conns.get(t.0) {
                info!("{} {}: no longer admitted by the access control list", c.id, c.peer);
            }
            self.close(t);
        }
    }

    fn close(&mut self, t: Token) {
        // Only stop_mirror ends the mirror session.
        if matches!(self.conns.get(t.0), Some(Conn::Mirror(_))) {
            return;
        }
        match self.conns.try_remove(t.0) {
            Some(Conn::Client(mut c)) => {
                c.deregister(&self.core.registry);
                self.core.num_clients -= 1;
                self.core.budget.release(c.unfinished_payload());
                self.watch.client_left(self.core.num_clients);
                if c.is_migration_sender() {
                    self.core.lineage.sender_left();
                }
                if self.core.num_clients == 0 {
                    // Nobody to reuse them for: give the memory back unless a client comes soon.
                    self.release_bufs_at = Some(Instant::now() + POOL_LINGER);
                }
                info!("{} {}: disconnected", c.id, c.peer);
            }
            Some(Conn::Control(mut c)) => {
                c.deregister(&self.core.registry);
                // The slot goes to the next session: the mirror's answer must not reach it.
                if let Some(m) = self.running_mirror_mut() {
                    m.forget_waiter(t);
                }
            }
            Some(Conn::Mirror(_)) | None => {}
        }
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
            if let Some((off, len)) = c.modified_range() {
                self.core.writes_in_flight -= 1;
                if let Some(d) = self.core.dirty.as_mut() {
                    d.mark(off, len);
                }
            }
            match self.conns.get_mut(id.token.0) {
                Some(Conn::Mirror(m)) if m.id == id => {
                    let o = m.complete(&mut self.core, c);
                    self.mirror_outcome(o);
                }
                Some(Conn::Client(conn)) if conn.id == id => {
                    let mut ctx = self.core.ctx();
                    conn.complete(&mut ctx, c);
                    if touched.last() != Some(&id.token) {
                        touched.push(id.token);
                    }
                }
                // The connection went away (or its slot was reused) while the disk worked.
                _ => {
                    debug!("{id}: dropping completion for a closed connection");
                    if let Op::Write { .. } = c.job.op {
                        self.core.budget.release(c.job.buf.len());
                    }
                }
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

    /// Returns an exit status when the process must end now.
    fn on_signal(&mut self) -> Option<i32> {
        let sig = self.signals.read()?;
        if self.shutdown_deadline.is_some() {
            fatal!("second signal ({sig}) during shutdown: exiting at once");
            if let Some(c) = self.control.take() {
                c.remove();
            }
            return Some(1);
        }
        info!("signal {sig}: no new clients, finishing in-flight requests");
        self.begin_shutdown();
        None
    }

    fn begin_shutdown(&mut self) {
        self.notify.stopping("finishing in-flight requests before exiting");
        self.peer_grace_until = Some(Instant::now() + PEER_GRACE);
        self.wind_down(DRAIN_TIMEOUT, ClientConn::shut_down);
    }

    /// The way out of shutdown and handover alike: no new clients, each client told by `end`
    /// how to finish, and the process exits once they are gone or `within` has passed.
    fn wind_down(&mut self, within: Duration, end: fn(&mut ClientConn<Socket>)) {
        self.shutdown_deadline = Some(Instant::now() + within);
        if let Some(mut l) = self.listener.take() {
            let _ = self.core.registry.deregister(&mut l);
        }
        let tokens: Vec<Token> = self.conns.iter().map(|(k, _)| Token(k)).collect();
        for t in tokens {
            if let Some(Conn::Client(c)) = self.conns.get_mut(t.0) {
                end(c);
            }
            self.step(t);
        }
    }
}

impl Server {
    /// Clients that found no room in the payload budget try again once some was freed.
    fn wake_budget_waiters(&mut self) {
        for id in self.core.budget.take_waiters() {
            if let Some(Conn::Client(c)) = self.conns.get_mut(id.token.0)
                && c.id == id
            {
                c.budget_retry();
                self.step(id.token);
            }
        }
    }

    /// Closes clients that did not finish negotiating in time, or stopped in the middle of a
    /// WRITE payload for longer than the stall limit.
    fn enforce_deadlines(&mut self) {
        let now = Instant::now();
        let limits = self.watch.limits();
        for id in self.watch.handshakes_due(now) {
            if let Some(Conn::Client(c)) = self.conns.get(id.token.0)
                && c.id == id
                && c.negotiating()
            {
                let secs = limits.handshake.unwrap_or_default().as_secs();
                info!(
                    "{id} {}: negotiation not finished within {secs} s (--handshake-limit); closing",
                    c.peer
                );
                self.close(id.token);
            }
        }
        let probes = self.conns.iter().filter_map(|(_, c)| match c {
            Conn::Client(c) => Some((c.id, c.stall_probe())),
            _ => None,
        });
        for (id, idle) in self.watch.stalled(now, probes) {
            if let Some(Conn::Client(c)) = self.conns.get(id.token.0) {
                info!(
                    "{id} {}: sent nothing more of a WRITE payload for {} s (--stall-limit); closing",
                    c.peer,
                    idle.as_secs()
                );
                self.close(id.token);
            }
        }
    }

    /// Shutdown has waited PEER_GRACE on the clients: those with nothing left at the disk are
    /// waiting on their peer (the rest of a request, or room for its replies) and are closed.
    /// Disk work still running is waited for (up to DRAIN_TIMEOUT).
    fn close_peer_waiters(&mut self) {
        let waiting: Vec<Token> = self
            .conns
            .iter()
            .filter_map(|(k, c)| match c {
                Conn::Client(c) if !c.waits_on_disk() => Some(Token(k)),
                _ => None,
            })
            .collect();
        for t in waiting {
            if let Some(Conn::Client(c)) = self.conns.get(t.0) {
                info!("{} {}: peer still busy {PEER_GRACE:?} into shutdown; closing", c.id, c.peer);
            }
            self.close(t);
        }
    }
}

/// An integer socket option; failures are left to the caller's defaults (an option a socket
/// does not support is simply not applied).
fn set_int_opt(fd: i32, level: libc::c_int, opt: libc::c_int, val: libc::c_int) {
    // SAFETY: setsockopt with a pointer to a live c_int of the right size.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// SO_KEEPALIVE with the original's timings, so a vanished peer is noticed.
pub fn set_keepalive(fd: i32) {
    set_int_opt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 30);
    set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10);
    set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
}

/// How much written-but-untransmitted data a client's socket may hold (TCP_NOTSENT_LOWAT).
///
/// Without a limit a streaming reader's socket takes megabytes that wait for the client's
/// receive window, and the client then transmits them itself: each ACK its reads send
/// pushes our queued segments, so our half of TCP runs on the client's threads, in its
/// softirqs (perf: nbdcopy's recv -> ACK -> tcp_ack -> __tcp_push_pending_frames). On 2
/// cores nbdcopy spent 430-580 ms of CPU per GiB read that way, 250-390 ms against nbdkit,
/// and read 2.7 GB/s. With 48 KiB from the start of the connection it spent about 285 ms
/// and the median rate was 3.6-3.9 GB/s (nbdkit 2.9; single copies are bimodal, about 2.5
/// or 4-5 GB/s, see bench/README.md; 32 and 64 KiB were close, 8 KiB and
/// 128 KiB or more were not better than no limit). Set only at a connection's first
/// offload instead, the same limit made things worse (2.5 GB/s); why is not known.
/// Clients of small requests never leave that much unsent: random I/O rates did not move.
const NOTSENT_LOWAT: libc::c_int = 48 * 1024;

/// The options every accepted client socket gets (TCP_NODELAY is set through std).
fn tune_client_socket(fd: i32) {
    set_keepalive(fd);
    set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, NOTSENT_LOWAT);
}

/// A random number from the kernel (instance ids); time and pid if that fails.
fn random_u64() -> u64 {
    use std::io::Read;
    let mut b = [0u8; 8];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        Ok(()) => u64::from_ne_bytes(b),
        Err(_) => {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            (t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32)
        }
    }
}

/// Many idle clients need many descriptors: take the soft limit up to the hard one.
fn raise_nofile_limit() {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                debug!("cannot raise RLIMIT_NOFILE");
            }
        }
    }
}

pub fn serve(o: ServeOptions) -> Result<i32, Error> {
    Server::new(o)?.run()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get_int_opt(fd: i32, level: libc::c_int, opt: libc::c_int) -> libc::c_int {
        let mut v: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt into a live c_int with its size.
        let r = unsafe { libc::getsockopt(fd, level, opt, (&mut v as *mut libc::c_int).cast(), &mut len) };
        assert_eq!(r, 0, "getsockopt: {}", io::Error::last_os_error());
        v
    }

    #[test]
    fn accepted_client_sockets_get_keepalive_and_a_short_unsent_queue() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let _c = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (s, _) = l.accept().expect("accept");
        tune_client_socket(s.as_raw_fd());
        assert_eq!(get_int_opt(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT), NOTSENT_LOWAT);
        assert_eq!(get_int_opt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(get_int_opt(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 30);
    }
}
