//! Control-socket commands, and the status line they report.

use super::*;

impl Server {
    pub(super) fn control_event(&mut self, t: Token, readable: bool, writable: bool) -> Next {
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
    pub(super) fn execute(&mut self, from: Token, cmd: Command) -> Option<(u32, String)> {
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
                self.mirror_feed(Event::MaxBps(n));
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
            cmd @ Command::Mirror { .. } => return self.start_mirror(from, cmd),
        })
    }

    pub(super) fn status_line(&self) -> String {
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
            let src = m.source();
            let speed = src.speed(Instant::now());
            let left = src.bytes_left();
            let secs_left = left.checked_div(speed).unwrap_or(0);
            s += &format!(
                " migration_speed={speed} migration_duration={} migration_seconds_left={secs_left} migration_bytes_left={left}",
                src.began().elapsed().as_secs()
            );
            s += &src.status_fields();
        } else if let Some(e) = &self.last_mirror_error {
            s += e;
        }
        s
    }

    pub(super) fn reply_to(&mut self, t: Option<Token>, line: &str) {
        let Some(t) = t else { return };
        let (code, text) = crate::conn::control::parse_reply(line).unwrap_or((1, line));
        let reply = (code, text.to_string());
        if let Some(Conn::Control(c)) = self.conns.get_mut(t.0)
            && c.reply(&self.core.registry, &reply) == Next::Close
        {
            self.close(t);
        }
    }
}
