//! Ending client connections: closing one, the deadlines and the payload budget's waiters,
//! the ACL after a change, the way out at shutdown or handover; and completions that reach a
//! client late (held for the migration's destination) or not at all (the client has gone).

use super::*;

impl Server {
    /// After an ACL change, disconnects every client the new list no longer admits.
    pub(super) fn enforce_acl(&mut self) {
        self.close_clients_where(
            |core, c| c.peer.ip().is_some_and(|ip| !core.acl.admits(ip)),
            "no longer admitted by the access control list",
        );
    }

    /// Closes every client `pick` chooses, logging `why` for each.
    fn close_clients_where(&mut self, pick: impl Fn(&Core, &ClientConn<Socket>) -> bool, why: &str) {
        let chosen: Vec<Token> = self
            .conns
            .iter()
            .filter_map(|(k, c)| match c {
                Conn::Client(c) if pick(&self.core, c) => Some(Token(k)),
                _ => None,
            })
            .collect();
        for t in chosen {
            if let Some(Conn::Client(c)) = self.conns.get(t.0) {
                info!("{} {}: {why}", c.id, c.peer);
            }
            self.close(t);
        }
    }

    pub(super) fn close(&mut self, t: Token) {
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

    /// Clients that found no room in the payload budget try again once some was freed.
    pub(super) fn wake_budget_waiters(&mut self) {
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
    pub(super) fn enforce_deadlines(&mut self) {
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
    pub(super) fn close_peer_waiters(&mut self) {
        let why = format!("peer still busy {PEER_GRACE:?} into shutdown; closing");
        self.close_clients_where(|_, c| !c.waits_on_disk(), &why);
    }

    pub(super) fn begin_shutdown(&mut self) {
        self.notify.stopping("finishing in-flight requests before exiting");
        self.peer_grace_until = Some(Instant::now() + PEER_GRACE);
        // Writes held for a destination are on our disk: their clients hear so before we go,
        // rather than waiting on a migration that ends with this process.
        for (_, c) in std::mem::take(&mut self.delayed) {
            self.deliver_late(c);
        }
        self.wind_down(DRAIN_TIMEOUT, ClientConn::shut_down);
    }

    /// The way out of shutdown and handover alike: no new clients, each client told by `end`
    /// how to finish, and the process exits once they are gone or `within` has passed.
    pub(super) fn wind_down(&mut self, within: Duration, end: fn(&mut ClientConn<Socket>)) {
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

    /// Returns an exit status when the process must end now.
    pub(super) fn on_signal(&mut self) -> Option<i32> {
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

    pub(super) fn drop_completion(&mut self, c: Completion) {
        debug!("{}: dropping completion for a closed connection", c.job.conn);
        if let Op::Write { .. } = c.job.op {
            self.core.budget.release(c.job.buf.len());
        }
    }

    /// A client completion held back by the migration (see `delayed`) goes to its client.
    pub(super) fn deliver_late(&mut self, c: Completion) {
        let id = c.job.conn;
        match self.conns.get_mut(id.token.0) {
            Some(Conn::Client(conn)) if conn.id == id => {
                let mut ctx = self.core.ctx();
                conn.complete(&mut ctx, c);
                self.step(id.token);
            }
            _ => self.drop_completion(c),
        }
    }
}
