//! The reactor's side of a migration: starting one, carrying out what the source asks of the
//! server (hold and release clients, answer `mirror`, hand over), and telling the service
//! manager how it goes. What the migration decides is in `migration::source`.

use super::*;

impl Server {
    /// `mirror`: starts a migration to the requested destination; its answer comes later.
    pub(super) fn start_mirror(&mut self, from: Token, cmd: Command) -> Option<(u32, String)> {
        let Command::Mirror { target, action, bind, max_bps, wait, freeze_limit, mode } = cmd else {
            return Some((1, "not a mirror request".into()));
        };
        let request_limit = std::env::var("FLEXNBD_MS_REQUEST_LIMIT_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(source::DEFAULT_REQUEST_LIMIT, Duration::from_secs);
        let spec = source::Spec {
            target: target.to_string(),
            max_bps,
            freeze_limit: freeze_limit.unwrap_or(source::DEFAULT_FREEZE_LIMIT),
            request_limit,
            mode: mode.unwrap_or_default(),
        };
        self.last_mirror_error = None;
        let entry = self.conns.vacant_entry();
        let token = Token(entry.key());
        let id = ConnId { token, generation: self.core.next_generation() };
        // Who we are to the destination: the same for every attempt of this migration,
        // different for any other (here or in another process).
        let sender = self.core.cfg.instance_id ^ id.generation.rotate_left(32);
        let src = Source::new(spec, id.to_string(), self.core.export.size(), sender, Instant::now());
        let mut m = MirrorConn::new(id, src, target, bind, action, from);
        m.wait_after_start = wait;
        entry.insert(Conn::Mirror(Box::new(m)));
        self.mirror = Some(token);
        self.mirror_tick();
        None
    }

    /// A client of this `serve` declared itself a migration sender: if it is our own mirror
    /// (through a forwarder or NAT, so `own_mirror_addr` could not tell), end both.
    pub(super) fn refuse_own_mirror(&mut self) {
        let Some(own) = self.running_mirror().map(|m| m.source().sender()) else { return };
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
    pub(super) fn is_own_mirror(&self, stream: &Socket, peer: Peer) -> bool {
        let Some(m) = self.running_mirror() else { return false };
        let Peer::Tcp(peer) = peer else { return false };
        let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        match (m.local_addr(), m.peer_addr(), stream.local_addr()) {
            (Some(ml), Some(mp), Ok(ours)) => canon(ml) == canon(peer) && canon(mp) == canon(ours),
            _ => false,
        }
    }

    /// listen admits one migration sender at a time: a new one means the previous attempt is
    /// dead (e.g. a cut connection not yet noticed), so the older sender is dropped. On a serve,
    /// a declared sender may be our own mirror come back through a forwarder.
    pub(super) fn replace_sender(&mut self) {
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

    /// The mirror connection, while one runs.
    pub(super) fn running_mirror(&self) -> Option<&MirrorConn> {
        match self.mirror.and_then(|t| self.conns.get(t.0)) {
            Some(Conn::Mirror(m)) => Some(m),
            _ => None,
        }
    }

    pub(super) fn running_mirror_mut(&mut self) -> Option<&mut MirrorConn> {
        match self.mirror.and_then(|t| self.conns.get_mut(t.0)) {
            Some(Conn::Mirror(m)) => Some(m),
            _ => None,
        }
    }

    /// Tells the service manager how a running migration goes, once every STATUS_EVERY, and
    /// when it has ended.
    pub(super) fn notify_progress(&mut self) {
        if !self.notify.enabled() {
            return;
        }
        let now = Instant::now();
        if self.status_at.is_some_and(|t| now < t) {
            return;
        }
        let line = match self.running_mirror() {
            Some(m) => {
                let src = m.source();
                let size = self.core.export.size();
                let left = src.bytes_left().min(size);
                let done = if size > 0 { 100.0 * (size - left) as f64 / size as f64 } else { 100.0 };
                let retry = if src.retrying() { ", retrying" } else { "" };
                format!(
                    "migrating to {}: {done:.1}% done, {left} bytes left at {} B/s{retry}",
                    src.spec().target,
                    src.speed(now)
                )
            }
            None => self.idle_status.clone(),
        };
        self.status_at = self.mirror.is_some().then(|| now + STATUS_EVERY);
        self.notify.status(&line);
    }

    /// Tells the migration a client write finished on our disk; true if its completion must
    /// wait for the destination.
    pub(super) fn client_wrote(&mut self, offset: u64, len: u64, c: &Completion) -> bool {
        self.ticket += 1;
        let what = match (&c.job.op, &c.result) {
            (Op::Write { .. }, Ok(_)) => Written::Data(&c.job.buf),
            (Op::Zero { .. }, Ok(_)) => Written::Zeroes,
            // Trim is advisory (the data may stay); a failed write may have changed any part.
            _ => Written::Unknown,
        };
        let ticket = self.ticket;
        let acts = self.mirror_ask(Event::ClientWrote { offset, len, what, ticket });
        // Held, unless the same call already let it go (the attempt failed at once).
        let held = acts.contains(&Action::Delay(ticket)) && !acts.contains(&Action::Ack(ticket));
        self.mirror_actions(acts);
        held
    }

    pub(super) fn mirror_tick(&mut self) {
        self.mirror_feed(Event::Tick);
    }

    /// Gives the running migration an event and carries out what it asks of the server.
    pub(super) fn mirror_feed(&mut self, ev: Event<'_>) {
        let acts = self.mirror_ask(ev);
        self.mirror_actions(acts);
    }

    /// Gives the running migration an event; returns what it asks of the server.
    fn mirror_ask(&mut self, ev: Event<'_>) -> Vec<Action> {
        let Some(t) = self.mirror else { return Vec::new() };
        let Some(Conn::Mirror(m)) = self.conns.get_mut(t.0) else { return Vec::new() };
        let io = Io { registry: &self.core.registry, pool: &self.core.pool, requests: self.core.requests };
        m.feed(&io, ev)
    }

    /// Carries out what the migration asked of the server, in order.
    pub(super) fn mirror_actions(&mut self, acts: Vec<Action>) {
        for a in acts {
            let Some(t) = self.mirror else { return };
            match a {
                Action::Hold => {
                    self.core.frozen = true;
                    self.core.held = true;
                    if self.core.writes_in_flight == 0 {
                        self.mirror_feed(Event::ClientWritesIdle);
                    }
                }
                // The reactor's loop steps the held clients (see release_held).
                Action::Release => self.core.frozen = false,
                Action::Started => self.mirror_started(t),
                Action::GaveUp(msg) => {
                    self.last_mirror_error = self.running_mirror().map(|m| m.source().gave_up_fields());
                    self.stop_mirror(&format!("1: {msg}"));
                }
                Action::HandedOver => {
                    let Some(Conn::Mirror(m)) = self.conns.get(t.0) else { return };
                    let action = m.action;
                    info!("migration to {} complete", m.target());
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
                // Held by `client_wrote`, which reads it from the actions it asked for.
                Action::Delay(_) => {}
                Action::Ack(t) => {
                    if let Some(c) = self.delayed.remove(&t) {
                        self.deliver_late(c);
                    }
                }
                // The connection's own actions never reach here.
                Action::Connect
                | Action::Send(_)
                | Action::Read { .. }
                | Action::Recycle(_)
                | Action::Disconnect => {}
            }
        }
    }

    /// "Migration started": the `mirror` client hears it now, and with `--wait` stays for the end.
    pub(super) fn mirror_started(&mut self, t: Token) {
        let Some(Conn::Mirror(m)) = self.conns.get_mut(t.0) else { return };
        let w = m.start_waiter.take();
        if !m.wait_after_start {
            return self.reply_to(w, "0: Migration started");
        }
        m.waiters.extend(w);
        if let Some(w) = w
            && let Some(Conn::Control(c)) = self.conns.get_mut(w.0)
            && c.interim(&self.core.registry, &(0, "Migration started".into())) == Next::Close
        {
            self.close(w);
        }
    }

    /// `--unlink`: removes the path only if it still names the file we served (a file renamed
    /// over it since belongs to someone else).
    pub(super) fn unlink_served_file(&self) {
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
    pub(super) fn hand_over_clients(&mut self) {
        self.notify.stopping("migrated away: answering what clients sent with ESHUTDOWN");
        // Unfrozen only to be refused: `hand_over` makes every request an ESHUTDOWN.
        self.core.frozen = false;
        self.core.held = false;
        self.wind_down(HANDOVER_DRAIN, ClientConn::hand_over);
    }

    /// Ends the mirror session, thaws clients and answers everyone waiting on it.
    pub(super) fn stop_mirror(&mut self, waiter_reply: &str) {
        let Some(t) = self.mirror.take() else { return };
        if let Some(Conn::Mirror(mut m)) = self.conns.try_remove(t.0) {
            m.teardown(&self.core.registry);
            let start = m.start_waiter.take();
            self.reply_to(start, waiter_reply);
            for w in std::mem::take(&mut m.waiters) {
                self.reply_to(Some(w), waiter_reply);
            }
        }
        // Writes the migration held back are on the source: their clients hear of them now.
        for (_, c) in std::mem::take(&mut self.delayed) {
            self.deliver_late(c);
        }
        self.thaw();
    }

    /// Ends a freeze (if one is on) and lets the clients it held run again.
    pub(super) fn thaw(&mut self) {
        if self.handed_over {
            return;
        }
        self.core.frozen = false;
        self.release_held();
    }

    /// A freeze can also end inside the mirror (a failed attempt lifts it before retrying).
    /// Either way the held clients have requests waiting in their sockets and no new event
    /// coming (edge-triggered), so each gets a step of its own.
    pub(super) fn release_held(&mut self) {
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
}
