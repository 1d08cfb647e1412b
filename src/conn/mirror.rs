//! The outbound migration connection: carries out a `migration::Source`'s actions on a socket
//! and the disk pool, and feeds it what happens there. What the migration decides is in
//! `migration::source`; this file only moves bytes.
//!
//! Actions for the rest of the server (Hold, Release, Started, GaveUp, HandedOver) are handed
//! back to the reactor in order.

use crate::buffer::{BufPool, OutQueue};
use crate::conn::control::MirrorAction;
use crate::io_pool::{Completion, IoPool, Job, Op};
use crate::listener::Socket;
use crate::migration::source::{CHUNK, CHUNK_BUSY, MAX_IN_FLIGHT, Source};
use crate::migration::{Action, Event};
use crate::net::Target;
use crate::token::ConnId;
use mio::{Interest, Registry, Token};
use std::io::{self, Read};
use std::net::SocketAddr;
use std::time::Instant;

/// What the reactor lends the mirror connection for one call.
pub struct Io<'a> {
    pub registry: &'a Registry,
    pub pool: &'a IoPool,
    /// Client requests received so far: a change means clients are at work.
    pub requests: u64,
}

pub struct MirrorConn {
    pub id: ConnId,
    source: Source,
    target: Target,
    bind: Option<SocketAddr>,
    pub action: MirrorAction,
    stream: Option<Socket>,
    connecting: bool,
    registered: Option<Interest>,
    out: OutQueue,
    /// Read buffers come back here once their WRITE is on the socket.
    bufs: BufPool,
    write_blocked: bool,
    seen_requests: u64,
    /// Control sessions waiting on the start, and on the end.
    pub start_waiter: Option<Token>,
    pub waiters: Vec<Token>,
    /// The `mirror` client asked to hear about the end too.
    pub wait_after_start: bool,
}

impl MirrorConn {
    pub fn new(
        id: ConnId,
        source: Source,
        target: Target,
        bind: Option<SocketAddr>,
        action: MirrorAction,
        start_waiter: Token,
    ) -> MirrorConn {
        MirrorConn {
            id,
            source,
            target,
            bind,
            action,
            stream: None,
            connecting: false,
            registered: None,
            out: OutQueue::default(),
            bufs: BufPool::of_lengths(&[CHUNK as usize, CHUNK_BUSY as usize], MAX_IN_FLIGHT as usize),
            write_blocked: false,
            seen_requests: 0,
            start_waiter: Some(start_waiter),
            waiters: Vec::new(),
            wait_after_start: false,
        }
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// A control session waiting on this mirror went away.
    pub fn forget_waiter(&mut self, t: Token) {
        if self.start_waiter == Some(t) {
            self.start_waiter = None;
        }
        self.waiters.retain(|w| *w != t);
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.stream.as_ref().and_then(|s| s.local_addr().ok())
    }

    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.stream.as_ref().and_then(|s| s.peer_addr().ok())
    }

    /// Stops everything (break, or the reactor is exiting).
    pub fn teardown(&mut self, r: &Registry) {
        if let Some(mut s) = self.stream.take() {
            let _ = s.shutdown(std::net::Shutdown::Write);
            let _ = r.deregister(&mut s);
        }
        self.registered = None;
        self.connecting = false;
        self.out.clear();
        self.write_blocked = false;
    }

    /// Feeds one event to the source and carries out what it asks; returns the actions that
    /// are the reactor's.
    pub fn feed(&mut self, io: &Io, ev: Event<'_>) -> Vec<Action> {
        let now = Instant::now();
        let mut acts = Vec::new();
        if io.requests != self.seen_requests {
            self.seen_requests = io.requests;
            self.source.handle(now, Event::ClientsBusy, &mut acts);
        }
        self.source.handle(now, ev, &mut acts);
        let mut theirs = Vec::new();
        self.carry_out(io, acts, &mut theirs);
        theirs
    }

    /// Socket readiness.
    pub fn on_event(&mut self, io: &Io, readable: bool, writable: bool) -> Vec<Action> {
        let mut theirs = Vec::new();
        if self.connecting && (readable || writable) {
            let Some(s) = self.stream.as_ref() else { return theirs };
            let done = match s.take_error() {
                Ok(Some(e)) | Err(e) => Err(e.to_string()),
                Ok(None) => match s.connected() {
                    Ok(up) => Ok(up),
                    Err(e) => Err(e.to_string()),
                },
            };
            match done {
                Ok(false) => return theirs,
                Ok(true) => {
                    self.connecting = false;
                    crate::net::set_keepalive(std::os::unix::io::AsRawFd::as_raw_fd(s));
                    theirs.extend(self.feed(io, Event::Connected));
                }
                Err(e) => return self.feed(io, Event::ConnectFailed(e)),
            }
        }
        if writable {
            self.write_blocked = false;
        }
        let (data, end) = self.read_input();
        if !data.is_empty() {
            theirs.extend(self.feed(io, Event::Received(&data)));
        }
        // The peer's last bytes come before its end (which is moot if they ended the attempt).
        match end {
            Some(_) if self.stream.is_none() => {}
            Some(end) => theirs.extend(self.feed(io, end)),
            None => self.carry_out(io, Vec::new(), &mut theirs),
        }
        theirs
    }

    /// A source read finished in the disk pool.
    pub fn complete(&mut self, io: &Io, c: Completion) -> Vec<Action> {
        let Completion { job, result } = c;
        let Op::ReadSparse { offset, len } = job.op else { return Vec::new() };
        let attempt = job.cookie as u32;
        self.feed(io, Event::ReadDone { attempt, offset, len, result, buf: job.buf })
    }

    /// What the destination sent, and how its side ended if it did (`Closed` or `Broken`).
    fn read_input(&mut self) -> (Vec<u8>, Option<Event<'static>>) {
        let mut data = Vec::new();
        if self.connecting {
            return (data, None);
        }
        let Some(s) = self.stream.as_mut() else { return (data, None) };
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match s.read(&mut chunk) {
                Ok(0) => return (data, Some(Event::Closed)),
                Ok(n) => data.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (data, None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return (data, Some(Event::Broken(e.to_string()))),
            }
        }
    }

    /// Does the socket and disk actions, feeding back what they cause, until nothing is left.
    fn carry_out(&mut self, io: &Io, mut acts: Vec<Action>, theirs: &mut Vec<Action>) {
        // Bounded: each round answers feedback from the last; a source makes progress on each.
        for _ in 0..64 {
            let mut feedback = None;
            for a in acts.drain(..) {
                match a {
                    Action::Connect => {
                        if let Err(e) = self.connect(io.registry) {
                            feedback = Some(Event::ConnectFailed(e.to_string()));
                        }
                    }
                    Action::Send(b) => self.out.push(b),
                    Action::Read { attempt, offset, len } => {
                        let buf = self.bufs.take(len);
                        let op = Op::ReadSparse { offset, len };
                        io.pool.submit_background(Job { conn: self.id, cookie: u64::from(attempt), op, buf });
                    }
                    Action::Recycle(b) => self.bufs.give(b),
                    Action::Disconnect => self.teardown(io.registry),
                    other => theirs.push(other),
                }
            }
            if feedback.is_none() {
                feedback = self.flush(io.registry);
            }
            let Some(f) = feedback else { return };
            if let Event::Broken(_) = f {
                // A send fails once the destination has gone; what it said before going (an
                // error reply, say) is still to be read, and comes first.
                let (data, _) = self.read_input();
                if !data.is_empty() {
                    // (If that ends the attempt, the source ignores the send error after it.)
                    self.source.handle(Instant::now(), Event::Received(&data), &mut acts);
                }
            }
            self.source.handle(Instant::now(), f, &mut acts);
        }
    }

    /// Writes what is queued and keeps the socket's interest right; reports a send error, or
    /// that everything queued is now on the wire.
    fn flush(&mut self, registry: &Registry) -> Option<Event<'static>> {
        let s = self.stream.as_mut()?;
        if self.connecting {
            return None;
        }
        let had = !self.out.is_empty();
        if had && !self.write_blocked {
            match self.out.write_to(s, Some(&mut self.bufs), None) {
                Ok(blocked) => self.write_blocked = blocked,
                Err(e) => return Some(Event::Broken(format!("send: {e}"))),
            }
        }
        let want =
            if self.write_blocked { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
        if self.registered != Some(want) {
            if let Err(e) = registry.reregister(s, self.id.token, want) {
                return Some(Event::Broken(e.to_string()));
            }
            self.registered = Some(want);
        }
        (had && self.out.is_empty()).then_some(Event::Drained)
    }

    fn connect(&mut self, registry: &Registry) -> io::Result<()> {
        self.teardown(registry);
        let mut s = crate::listener::connect_nonblocking(&self.target, self.bind)?;
        let _ = s.set_nodelay(true);
        registry.register(&mut s, self.id.token, Interest::READABLE | Interest::WRITABLE)?;
        self.registered = Some(Interest::READABLE | Interest::WRITABLE);
        self.stream = Some(s);
        self.connecting = true;
        Ok(())
    }
}
