//! systemd integration with std and libc only: socket activation (`LISTEN_PID`/`LISTEN_FDS`,
//! sd_listen_fds(3)) and the notification socket (`NOTIFY_SOCKET`, sd_notify(3)): `READY=1`
//! once listening, `STATUS=` lines, `STOPPING=1`.

use log::debug;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The first descriptor systemd passes (after stdin, stdout and stderr).
const LISTEN_FDS_START: RawFd = 3;
/// More than anyone configures; a larger count is a broken environment, not sockets.
const MAX_LISTEN_FDS: i32 = 64;

/// The sockets systemd passed to this process: none unless `LISTEN_PID` names us. The variables
/// are removed, so nothing we might start takes them for its own.
///
/// Call it before any other thread exists (it changes the environment).
pub fn listen_fds() -> Vec<OwnedFd> {
    let ours = std::env::var("LISTEN_PID").ok().and_then(|p| p.trim().parse::<u32>().ok())
        == Some(std::process::id());
    let n = std::env::var("LISTEN_FDS").ok().and_then(|n| n.trim().parse::<i32>().ok()).unwrap_or(0);
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // SAFETY: the caller runs this while the process has one thread, so nothing reads the
        // environment at the same time.
        unsafe { std::env::remove_var(v) };
    }
    if !ours || !(1..=MAX_LISTEN_FDS).contains(&n) {
        return Vec::new();
    }
    (LISTEN_FDS_START..LISTEN_FDS_START + n)
        // SAFETY: F_GETFD only asks whether the descriptor is open.
        .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0)
        // SAFETY: systemd handed these descriptors to us; nothing else in the process owns them.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect()
}

/// Messages to the service manager; does nothing when not started by one.
#[derive(Debug, Default)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    last_status: String,
    stopping: bool,
}

impl Notifier {
    /// From `NOTIFY_SOCKET`: a path, or `@name` for an abstract socket.
    pub fn from_env() -> Notifier {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return Notifier::default() };
        let addr = match path.as_encoded_bytes() {
            [b'@', name @ ..] => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name)
            }
            _ => SocketAddr::from_pathname(&path),
        };
        // Non-blocking: a busy manager must never stall the event loop.
        let sock = UnixDatagram::unbound().and_then(|s| s.set_nonblocking(true).map(|()| s));
        match (sock, addr) {
            (Ok(s), Ok(a)) => Notifier { target: Some((s, a)), ..Notifier::default() },
            (Err(e), _) | (_, Err(e)) => {
                debug!("NOTIFY_SOCKET {}: {e}; not notifying", path.to_string_lossy());
                Notifier::default()
            }
        }
    }

    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    fn send(&self, msg: &str) {
        if let Some((s, a)) = &self.target
            && let Err(e) = s.send_to_addr(msg.as_bytes(), a)
        {
            debug!("cannot notify the service manager: {e}");
        }
    }

    /// Listening and ready for clients.
    pub fn ready(&mut self, status: &str) {
        self.last_status = one_line(status);
        self.send(&format!("READY=1\nSTATUS={}\nMAINPID={}", self.last_status, std::process::id()));
    }

    /// A new STATUS= line, sent only when it changed.
    pub fn status(&mut self, status: &str) {
        let s = one_line(status);
        if s != self.last_status && !self.stopping {
            self.send(&format!("STATUS={s}"));
            self.last_status = s;
        }
    }

    /// Shutting down (sent once).
    pub fn stopping(&mut self, status: &str) {
        if !self.stopping {
            self.stopping = true;
            self.send(&format!("STOPPING=1\nSTATUS={}", one_line(status)));
        }
    }
}

/// A STATUS= value is one line.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn notifier_to(a: SocketAddr) -> Notifier {
        Notifier { target: Some((UnixDatagram::unbound().expect("socket"), a)), ..Notifier::default() }
    }

    fn recv(s: &UnixDatagram) -> String {
        let mut b = [0u8; 4096];
        let n = s.recv(&mut b).expect("a notification");
        String::from_utf8_lossy(&b[..n]).into_owned()
    }

    #[test]
    fn ready_status_and_stopping_reach_the_socket() {
        let name = format!("flexnbd-notify-test-{}", std::process::id());
        use std::os::linux::net::SocketAddrExt;
        let a = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
        let server = UnixDatagram::bind_addr(&a).expect("bind");
        server.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut n = notifier_to(a);
        n.ready("serving x");
        let m = recv(&server);
        assert!(m.starts_with("READY=1\nSTATUS=serving x\nMAINPID="), "{m:?}");
        n.status("serving x");
        n.status("migrating\nto y");
        assert_eq!(recv(&server), "STATUS=migrating to y", "an unchanged status is not sent again");
        n.stopping("bye");
        n.stopping("bye");
        n.status("late");
        assert_eq!(recv(&server), "STOPPING=1\nSTATUS=bye");
        server.set_nonblocking(true).expect("nonblocking");
        let mut b = [0u8; 64];
        assert!(server.recv(&mut b).is_err(), "STOPPING=1 is sent once and nothing follows it");
    }

    #[test]
    fn without_notify_socket_nothing_happens() {
        let mut n = Notifier::default();
        assert!(!n.enabled());
        n.ready("x");
        n.stopping("y");
    }
}
