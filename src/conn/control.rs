//! Control socket: a Unix stream listener (mode 0600) and one session per connection.
//! A request is LF-terminated lines (command, then one argument per line) ended by a blank line
//! or EOF; the answer is one line `<code>: <text>`, after which the session closes.
//!
//! | state   | input                      | next                                  |
//! |---------|----------------------------|---------------------------------------|
//! | Reading | partial request            | Reading                               |
//! | Reading | blank line / EOF           | Replying (reactor executes command)   |
//! | Reading | line too long, bad request | Replying (error reply)                |
//! | Replying| reply fully written        | closed                                |

use super::Next;
use crate::error::Error;
use crate::migration::Mode;
use crate::net::Target;
use log::{debug, info};
use mio::net::{UnixListener, UnixStream};
use mio::{Interest, Registry, Token};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest line accepted (the original's limit).
pub const MAX_LINE: usize = 256;
/// Most lines in one request: a command plus a generous ACL.
pub const MAX_LINES: usize = 1024;

/// A parsed control request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Status,
    Acl(Vec<String>),
    Break,
    Mirror {
        target: Target,
        action: MirrorAction,
        /// Local address to connect from (TCP only; the unspecified address means none).
        bind: Option<SocketAddr>,
        max_bps: Option<u64>,
        /// Ours: after "Migration started", keep the session and send a second line when the
        /// migration ends (`mirror --wait`).
        wait: bool,
        /// Ours: the longest freeze before an attempt is abandoned.
        freeze_limit: Option<Duration>,
        /// Ours: how client writes reach the destination (`mode=auto|background|active`).
        mode: Option<Mode>,
    },
    MirrorMaxBps(u64),
    /// Ours: reply only when the running migration ends (used by `mirror --wait`).
    MirrorWait,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorAction {
    Exit,
    Unlink,
    Nothing,
}

/// Why a request cannot be executed; the text is what the client is told after `1: `.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    LineTooLong,
    TooManyLines,
    NotText,
    Empty,
    Unknown(String),
    BadArgs(String),
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestError::LineTooLong => write!(f, "line too long (limit {MAX_LINE} bytes)"),
            RequestError::TooManyLines => write!(f, "too many lines (limit {MAX_LINES})"),
            RequestError::NotText => write!(f, "request is not text"),
            RequestError::Empty => write!(f, "empty request"),
            RequestError::Unknown(c) => write!(f, "unknown command: {c}"),
            RequestError::BadArgs(m) => write!(f, "{m}"),
        }
    }
}

/// Splits a request into lines. `Ok(None)`: more bytes needed. With `eof`, whatever arrived
/// (including a last line without LF) is the whole request.
pub fn parse_lines(buf: &[u8], eof: bool) -> Result<Option<(Vec<String>, usize)>, RequestError> {
    let mut lines = Vec::new();
    let mut pos = 0;
    loop {
        let rest = &buf[pos..];
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                if i > MAX_LINE {
                    return Err(RequestError::LineTooLong);
                }
                let line = &rest[..i];
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                pos += i + 1;
                if line.is_empty() {
                    return Ok(Some((lines, pos)));
                }
                lines.push(String::from_utf8(line.to_vec()).map_err(|_| RequestError::NotText)?);
                if lines.len() > MAX_LINES {
                    return Err(RequestError::TooManyLines);
                }
            }
            None if rest.len() > MAX_LINE => return Err(RequestError::LineTooLong),
            None if eof => {
                let line = rest.strip_suffix(b"\r").unwrap_or(rest);
                if !line.is_empty() {
                    lines.push(String::from_utf8(line.to_vec()).map_err(|_| RequestError::NotText)?);
                    if lines.len() > MAX_LINES {
                        return Err(RequestError::TooManyLines);
                    }
                }
                return Ok(Some((lines, buf.len())));
            }
            None => return Ok(None),
        }
    }
}

/// Interprets the lines of one request.
pub fn parse_command(lines: &[String]) -> Result<Command, RequestError> {
    let Some((cmd, args)) = lines.split_first() else { return Err(RequestError::Empty) };
    let bad = |m: &str| RequestError::BadArgs(m.to_string());
    match cmd.as_str() {
        "status" => Ok(Command::Status),
        "break" => Ok(Command::Break),
        "mirror_wait" => Ok(Command::MirrorWait),
        "acl" => Ok(Command::Acl(args.to_vec())),
        "mirror_max_bps" => match args {
            [n] => n.parse().map(Command::MirrorMaxBps).map_err(|_| bad("bad speed limit")),
            _ => Err(bad("mirror_max_bps takes one argument")),
        },
        "mirror" => {
            if args.len() < 2 || args.len() > 8 {
                return Err(bad(
                    "mirror takes addr, port, [action], [bind], [max_bps], then [wait], [freeze_limit_ms=N] and [mode=M]",
                ));
            }
            let addr = &args[0];
            // Ours: `unix:PATH` (port ignored) for a destination on a Unix socket.
            let unix = addr.strip_prefix(crate::net::UNIX_PREFIX).is_some_and(|p| !p.is_empty());
            if !unix && crate::net::parse_ip(addr).is_none() {
                return Err(bad("bad IP address"));
            }
            let port = match args[1].parse::<u16>() {
                Ok(p) if p > 0 || unix => p,
                _ => return Err(bad("bad IP port number")),
            };
            let target = Target::parse(addr, port).ok_or_else(|| bad("bad IP address"))?;
            let action = match args.get(2).map(String::as_str) {
                None | Some("exit") => MirrorAction::Exit,
                Some("unlink") => MirrorAction::Unlink,
                Some("nothing") => MirrorAction::Nothing,
                Some(_) => return Err(bad("unknown action")),
            };
            let bind = match args.get(3).map(|b| (b.is_empty(), crate::net::parse_ip(b))) {
                None | Some((true, _)) => None,
                Some((false, None)) => return Err(bad("bad bind address")),
                // The unspecified address fills the slot when nothing is bound.
                Some((false, Some(b))) if b.is_unspecified() => None,
                Some((false, Some(_))) if unix => {
                    return Err(bad("a bind address does not apply to a Unix socket"));
                }
                Some((false, Some(b))) => Some(SocketAddr::new(b, 0)),
            };
            // 0 or u64::MAX (or nothing) means no limit: our CLI fills the slot positionally with
            // u64::MAX, which the original also reads as no limit.
            let max_bps = match args.get(4) {
                None => None,
                Some(n) => Some(n.parse::<u64>().map_err(|_| bad("bad speed limit"))?)
                    .filter(|&n| n > 0 && n != u64::MAX),
            };
            // Our own slots, after the original's five: each a word or key=value.
            let (mut wait, mut freeze_limit, mut mode) = (false, None, None);
            for opt in args.iter().skip(5) {
                match opt.split_once('=') {
                    None if opt.is_empty() => {}
                    None if opt == "wait" => wait = true,
                    Some(("freeze_limit_ms", ms)) => match ms.parse::<u64>() {
                        Ok(ms) if ms > 0 => freeze_limit = Some(Duration::from_millis(ms)),
                        _ => return Err(bad("bad freeze limit")),
                    },
                    Some(("mode", m)) => mode = Some(Mode::parse(m).ok_or_else(|| bad("bad mirror mode"))?),
                    _ => return Err(bad("unknown mirror option")),
                }
            }
            Ok(Command::Mirror { target, action, bind, max_bps, wait, freeze_limit, mode })
        }
        other => Err(RequestError::Unknown(other.chars().take(64).collect())),
    }
}

/// Lines of a request as a client sends them (used by our CLI).
pub fn encode_request(cmd: &str, args: &[String]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(cmd.as_bytes());
    v.push(b'\n');
    for a in args {
        v.extend_from_slice(a.as_bytes());
        v.push(b'\n');
    }
    v.push(b'\n');
    v
}

/// A `mirror` request as our CLI sends it. The slots are positional and the original server
/// reads every one it gets (a speed of 0 stalls it, an empty bind address is an error), so
/// only slots the user set are sent, with placeholders that mean "not set" to both servers
/// where a later slot needs an earlier one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MirrorRequest {
    pub addr: String,
    pub port: u16,
    pub unlink: bool,
    pub bind: Option<String>,
    /// 0 means no limit.
    pub max_bps: Option<u64>,
    pub wait: bool,
    pub freeze_limit: Option<Duration>,
    pub mode: Option<Mode>,
}

/// "No speed limit" in a speed slot: the original parses it as UINT64_MAX (its own default),
/// we as no limit; 0 would stop the original's copy.
pub const NO_LIMIT: u64 = u64::MAX;

impl MirrorRequest {
    pub fn slots(&self) -> Vec<String> {
        let action = if self.unlink { "unlink" } else { "exit" };
        let mut v = vec![self.addr.clone(), self.port.to_string(), action.to_string()];
        let mut ours = Vec::new();
        if self.wait {
            ours.push("wait".to_string());
        }
        if let Some(f) = self.freeze_limit {
            ours.push(format!("freeze_limit_ms={}", f.as_millis().max(1)));
        }
        if let Some(m) = self.mode {
            ours.push(format!("mode={}", m.as_str()));
        }
        if self.bind.is_some() || self.max_bps.is_some() || !ours.is_empty() {
            // Binding to the unspecified address is what not binding means.
            let ipv6 = self.addr.contains(':') && !self.addr.starts_with(crate::net::UNIX_PREFIX);
            let unspecified = if ipv6 { "::" } else { "0.0.0.0" };
            v.push(self.bind.clone().unwrap_or_else(|| unspecified.to_string()));
        }
        if self.max_bps.is_some() || !ours.is_empty() {
            v.push(speed_slot(self.max_bps.unwrap_or(0)));
        }
        v.extend(ours);
        v
    }
}

/// A speed limit as sent in a control request: 0 (no limit) becomes NO_LIMIT.
pub fn speed_slot(bps: u64) -> String {
    if bps == 0 { NO_LIMIT.to_string() } else { bps.to_string() }
}

/// The reply line, `<code>: <text>\n`.
pub fn encode_reply(code: u32, text: &str) -> Vec<u8> {
    format!("{code}: {text}\n").into_bytes()
}

/// Splits `<code>: <text>` as received by a client.
pub fn parse_reply(line: &str) -> Option<(u32, &str)> {
    let line = line.strip_suffix('\n').unwrap_or(line);
    let (code, text) = line.split_once(": ").or_else(|| line.split_once(':'))?;
    Some((code.trim().parse().ok()?, text))
}

// ---------------------------------------------------------------------------------------------

pub struct ControlListener {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlListener {
    /// Binds SOCK, replacing a stale socket file left by a dead process; a live server on it,
    /// or a path that is not a socket, is an error.
    pub fn bind(path: &Path) -> Result<ControlListener, Error> {
        let ctx = |e| Error::ControlSocket { path: path.to_path_buf(), source: e };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(ctx(io::Error::new(io::ErrorKind::AlreadyExists, "exists and is not a socket")));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::ControlSocketInUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(ctx)?;
        }
        let listener = UnixListener::bind(path).map_err(ctx)?;
        // Made before the chmod, so that a failure from here on removes the file again (Drop).
        let l = ControlListener { listener, path: path.to_path_buf() };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(ctx)?;
        Ok(l)
    }

    pub fn register(&mut self, r: &Registry, t: Token) -> io::Result<()> {
        r.register(&mut self.listener, t, Interest::READABLE)
    }

    pub fn accept(&self) -> Option<UnixStream> {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => return Some(s),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!("control accept failed: {e}");
                    return None;
                }
            }
        }
    }

    /// Unlinks the socket file (at shutdown).
    pub fn remove(self) {
        drop(self);
    }
}

/// However the server ends (a signal, a completed migration, a setup or poll error), the
/// socket file goes with it: a stale file makes the next `--sock` user guess.
impl Drop for ControlListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

enum State {
    Reading,
    /// The command's answer comes later (mirror start, mirror_wait).
    Waiting,
    Replying,
}

pub struct ControlConn {
    token: Token,
    stream: UnixStream,
    state: State,
    buf: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    registered: Interest,
}

impl ControlConn {
    pub fn new(token: Token, stream: UnixStream) -> ControlConn {
        ControlConn {
            token,
            stream,
            state: State::Reading,
            buf: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            registered: Interest::READABLE,
        }
    }

    pub fn register(&mut self, r: &Registry) -> io::Result<()> {
        r.register(&mut self.stream, self.token, Interest::READABLE)
    }

    pub fn deregister(&mut self, r: &Registry) {
        let _ = r.deregister(&mut self.stream);
    }

    /// Reads; returns a command for the reactor to execute once a whole request arrived.
    pub fn on_event(&mut self, r: &Registry, readable: bool, _writable: bool) -> (Next, Option<Command>) {
        match self.state {
            State::Replying => (self.write_out(r), None),
            State::Waiting if !readable => (self.write_out(r), None),
            State::Waiting => (self.check_alive(), None),
            State::Reading if !readable => (Next::Continue, None),
            State::Reading => self.read_request(r),
        }
    }

    fn read_request(&mut self, r: &Registry) -> (Next, Option<Command>) {
        let mut chunk = [0u8; 4096];
        loop {
            let eof = match self.stream.read(&mut chunk) {
                Ok(0) => true,
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    false
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (Next::Continue, None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return (Next::Close, None),
            };
            match parse_lines(&self.buf, eof) {
                Ok(None) => continue,
                Ok(Some((lines, _))) if lines.is_empty() && eof => return (Next::Close, None),
                Ok(Some((lines, _))) => match parse_command(&lines) {
                    Ok(cmd) => {
                        self.buf = Vec::new();
                        return (Next::Continue, Some(cmd));
                    }
                    Err(e) => return (self.reply(r, &(1, e.to_string())), None),
                },
                Err(e) => {
                    info!("control request refused: {e}");
                    return (self.reply(r, &(1, e.to_string())), None);
                }
            }
        }
    }

    /// The reactor will answer later; meanwhile only notice the client going away.
    pub fn wait(&mut self) {
        self.state = State::Waiting;
    }

    fn check_alive(&mut self) -> Next {
        let mut b = [0u8; 256];
        loop {
            match self.stream.read(&mut b) {
                Ok(0) => return Next::Close,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Continue,
                Err(_) => return Next::Close,
            }
        }
    }

    /// Queues the one reply line and starts sending it.
    pub fn reply(&mut self, r: &Registry, reply: &(u32, String)) -> Next {
        self.buf = Vec::new();
        self.out.drain(..self.out_pos);
        self.out_pos = 0;
        self.out.extend_from_slice(&encode_reply(reply.0, &reply.1));
        self.state = State::Replying;
        self.write_out(r)
    }

    /// Sends a line but keeps waiting for the final one (`mirror` with wait).
    pub fn interim(&mut self, r: &Registry, reply: &(u32, String)) -> Next {
        self.out.extend_from_slice(&encode_reply(reply.0, &reply.1));
        self.state = State::Waiting;
        self.write_out(r)
    }

    fn write_out(&mut self, r: &Registry) -> Next {
        while self.out_pos < self.out.len() {
            match self.stream.write(&self.out[self.out_pos..]) {
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.registered != Interest::WRITABLE {
                        self.registered = Interest::WRITABLE;
                        if r.reregister(&mut self.stream, self.token, Interest::WRITABLE).is_err() {
                            return Next::Close;
                        }
                    }
                    return Next::Continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Next::Close,
            }
        }
        match self.state {
            State::Replying => Next::Close,
            _ => Next::Continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn lines_complete_incomplete_trailing() {
        assert_eq!(parse_lines(b"status\n\nxx", false).unwrap(), Some((lines(&["status"]), 8)));
        assert_eq!(parse_lines(b"status\n", false).unwrap(), None);
        assert_eq!(parse_lines(b"status", true).unwrap(), Some((lines(&["status"]), 6)));
        assert_eq!(parse_lines(b"acl\r\n1.2.3.4\n\n", false).unwrap().unwrap().0, lines(&["acl", "1.2.3.4"]));
        assert_eq!(parse_lines(b"", true).unwrap(), Some((vec![], 0)));
    }

    #[test]
    fn lines_limits() {
        assert_eq!(parse_lines(&[b'a'; 1 << 20], false), Err(RequestError::LineTooLong));
        let mut long = vec![b'a'; 300];
        long.push(b'\n');
        assert_eq!(parse_lines(&long, false), Err(RequestError::LineTooLong));
        assert_eq!(parse_lines(b"\xff\xfe\n\n", false), Err(RequestError::NotText));
        let many = "x\n".repeat(MAX_LINES + 2);
        assert_eq!(parse_lines(many.as_bytes(), false), Err(RequestError::TooManyLines));
        // The same limit holds when the last line ends at EOF (fuzz regression).
        let at_eof = format!("acl\n{}2", "1\n".repeat(MAX_LINES - 1));
        assert_eq!(parse_lines(at_eof.as_bytes(), true), Err(RequestError::TooManyLines));
        assert_eq!(parse_lines(b"status\r", true).unwrap().unwrap().0, vec!["status".to_string()]);
    }

    #[test]
    fn commands() {
        assert_eq!(parse_command(&lines(&["status"])), Ok(Command::Status));
        assert_eq!(parse_command(&lines(&["acl", "10.0.0.1"])), Ok(Command::Acl(lines(&["10.0.0.1"]))));
        assert_eq!(parse_command(&lines(&["mirror_max_bps", "100"])), Ok(Command::MirrorMaxBps(100)));
        assert_eq!(
            parse_command(&lines(&["mirror", "127.0.0.1", "4000", "unlink", "127.0.0.2", "5"])),
            Ok(Command::Mirror {
                target: Target::Tcp("127.0.0.1:4000".parse().expect("addr")),
                action: MirrorAction::Unlink,
                bind: Some("127.0.0.2:0".parse().expect("addr")),
                max_bps: Some(5),
                wait: false,
                freeze_limit: None,
                mode: None,
            })
        );
        let full = [
            "mirror",
            "::1",
            "4000",
            "exit",
            "::",
            "18446744073709551615",
            "wait",
            "freeze_limit_ms=500",
            "mode=active",
        ];
        assert_eq!(
            parse_command(&lines(&full)),
            Ok(Command::Mirror {
                target: Target::Tcp("[::1]:4000".parse().expect("addr")),
                action: MirrorAction::Exit,
                // The unspecified address is what "not bound" looks like in the slot.
                bind: None,
                max_bps: None,
                wait: true,
                freeze_limit: Some(Duration::from_millis(500)),
                mode: Some(Mode::Active),
            })
        );
        for bad in ["freeze_limit_ms=0", "freeze_limit_ms=x", "later", "mode=fast"] {
            let req = lines(&["mirror", "::1", "4000", "exit", "::", "0", bad]);
            assert!(matches!(parse_command(&req), Err(RequestError::BadArgs(_))), "{bad}");
        }
        assert_eq!(
            parse_command(&lines(&["mirror", "nope", "4000"])),
            Err(RequestError::BadArgs("bad IP address".into()))
        );
        assert_eq!(
            parse_command(&lines(&["mirror", "::1", "0"])),
            Err(RequestError::BadArgs("bad IP port number".into()))
        );
        assert!(matches!(parse_command(&lines(&["frobnicate"])), Err(RequestError::Unknown(_))));
        assert_eq!(parse_command(&[]), Err(RequestError::Empty));
    }

    #[test]
    fn mirror_requests_leave_out_what_was_not_set() {
        let base = MirrorRequest { addr: "10.0.0.2".into(), port: 4000, ..Default::default() };
        assert_eq!(base.slots(), lines(&["10.0.0.2", "4000", "exit"]));
        let bind = MirrorRequest { bind: Some("10.0.0.1".into()), unlink: true, ..base.clone() };
        assert_eq!(bind.slots(), lines(&["10.0.0.2", "4000", "unlink", "10.0.0.1"]));
        let slow = MirrorRequest { max_bps: Some(5000), ..base.clone() };
        assert_eq!(slow.slots(), lines(&["10.0.0.2", "4000", "exit", "0.0.0.0", "5000"]));
        let unlimited = MirrorRequest { max_bps: Some(0), ..base.clone() };
        assert_eq!(unlimited.slots()[4], u64::MAX.to_string());
        let wait = MirrorRequest { addr: "::1".into(), wait: true, ..base.clone() };
        assert_eq!(wait.slots(), lines(&["::1", "4000", "exit", "::", &u64::MAX.to_string(), "wait"]));
        let freeze = MirrorRequest { freeze_limit: Some(Duration::from_millis(1500)), ..base };
        assert_eq!(freeze.slots()[5], "freeze_limit_ms=1500");
        // Whatever we send, our own parser reads back what was meant.
        for req in [bind, slow, unlimited, wait, freeze] {
            let mut all = vec!["mirror".to_string()];
            all.extend(req.slots());
            let Ok(Command::Mirror { max_bps, wait: w, freeze_limit, .. }) = parse_command(&all) else {
                panic!("{all:?} did not parse");
            };
            assert_eq!(max_bps, req.max_bps.filter(|&n| n > 0), "{all:?}");
            assert_eq!((w, freeze_limit), (req.wait, req.freeze_limit), "{all:?}");
        }
    }

    #[test]
    fn mirror_to_a_unix_socket_takes_a_path_and_port_0() {
        let m = parse_command(&lines(&["mirror", "unix:/run/d.sock", "0"]));
        assert!(
            matches!(m, Ok(Command::Mirror { target: Target::Unix(ref p), bind: None, .. }) if p.to_str() == Some("/run/d.sock")),
            "{m:?}"
        );
        let bound = parse_command(&lines(&["mirror", "unix:/run/d.sock", "0", "exit", "10.0.0.1"]));
        assert_eq!(
            bound,
            Err(RequestError::BadArgs("a bind address does not apply to a Unix socket".into()))
        );
        let unbound = parse_command(&lines(&["mirror", "unix:/run/d.sock", "0", "exit", "0.0.0.0", "5"]));
        assert!(matches!(unbound, Ok(Command::Mirror { bind: None, .. })), "{unbound:?}");
        assert_eq!(
            parse_command(&lines(&["mirror", "unix:", "0"])),
            Err(RequestError::BadArgs("bad IP address".into()))
        );
    }

    #[test]
    fn reply_roundtrip() {
        let r = encode_reply(0, "pid=1 size=2");
        assert_eq!(parse_reply(std::str::from_utf8(&r).unwrap()), Some((0, "pid=1 size=2")));
        assert_eq!(parse_reply("1: not mirroring\n"), Some((1, "not mirroring")));
        assert_eq!(parse_reply("garbage"), None);
    }
}
