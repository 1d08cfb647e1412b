//! The command-line clients: `status`, `acl`, `break`, `mirror`, `mirror-speed` talk to a
//! server's control socket; `read` and `write` are one-shot blocking NBD clients.

use crate::conn::control::{encode_request, parse_reply};
use crate::error::Error;
use crate::proto::handshake::{self as hs, Greeting};
use crate::proto::transmission::{self as tx, ReadChunk, ReplyHeader, Request};
use crate::proto::*;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub const MAX_OFFSET: u64 = 1 << 62;
pub const MAX_SIZE: u64 = 1 << 30;
/// How long a CLI client waits on a silent server before giving up.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

fn remote(msg: impl Into<String>) -> Error {
    Error::Remote(msg.into())
}

fn io_ctx(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// An empty argument or one with a line break would end or split the request early (a blank
/// line ends it), so the server would act on part of what was asked: refuse such arguments.
fn check_args(args: &[String]) -> Result<(), Error> {
    match args.iter().find(|a| a.is_empty() || a.contains(['\n', '\r'])) {
        Some(a) => Err(Error::Usage(format!("bad argument {a:?}: empty or containing a line break"))),
        None => Ok(()),
    }
}

/// Sends one request on the control socket and returns (code, text).
pub fn control(sock: &Path, cmd: &str, args: &[String]) -> Result<(u32, String), Error> {
    check_args(args)?;
    let mut s = UnixStream::connect(sock)
        .map_err(io_ctx(format!("cannot connect to control socket {}", sock.display())))?;
    s.set_read_timeout(Some(IO_TIMEOUT)).map_err(io_ctx("control socket"))?;
    s.write_all(&encode_request(cmd, args)).map_err(io_ctx("cannot send control request"))?;
    let mut reply = Vec::new();
    // The server sends one line then closes; read to EOF, but never more than a sane amount.
    (&mut s).take(64 * 1024).read_to_end(&mut reply).map_err(io_ctx("cannot read control reply"))?;
    let text = String::from_utf8_lossy(&reply);
    let line = text.lines().next().unwrap_or("");
    let (code, msg) =
        parse_reply(line).ok_or_else(|| remote(format!("unexpected reply from server: {line:?}")))?;
    Ok((code, msg.to_string()))
}

/// Prints a control reply the way every control command does: text to stdout on success,
/// to stderr (and exit 1) otherwise.
pub fn print_reply((code, text): (u32, String)) -> i32 {
    if code == 0 {
        println!("{text}");
        0
    } else {
        eprintln!("{text}");
        1
    }
}

// ---------------------------------------------------------------------------------------------
// NBD client for read/write.

pub struct NbdClient {
    stream: TcpStream,
    pub size: u64,
    pub flags: u16,
    max_block: u32,
    cookie: u64,
    /// The server took NBD_OPT_EXTENDED_HEADERS: 32-byte headers, every reply in chunks.
    extended: bool,
}

impl NbdClient {
    pub fn connect(addr: &str, port: u16, bind: Option<&str>) -> Result<NbdClient, Error> {
        let stream = connect_tcp(addr, port, bind)?;
        stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(io_ctx("socket"))?;
        stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(io_ctx("socket"))?;
        let _ = stream.set_nodelay(true);
        let mut c =
            NbdClient { stream, size: 0, flags: 0, max_block: MAX_REQUEST_LEN, cookie: 1, extended: false };
        c.handshake()?;
        Ok(c)
    }

    fn handshake(&mut self) -> Result<(), Error> {
        let mut buf = vec![0u8; 16];
        self.read_exact(&mut buf, "the server's greeting")?;
        let more = match crate::proto::be64(&buf[8..]) {
            IHAVEOPT => 2,
            OLDSTYLE_MAGIC => OLDSTYLE_HELLO_LEN - 16,
            _ => 0,
        };
        buf.resize(16 + more, 0);
        self.read_exact(&mut buf[16..], "the server's greeting")?;
        let greeting = hs::parse_greeting(&buf)
            .map_err(|e| remote(format!("not an NBD server: {e}")))?
            .ok_or_else(|| remote("short greeting"))?
            .0;
        match greeting {
            Greeting::Oldstyle { size, flags } => {
                self.size = size;
                self.flags = flags as u16;
                Ok(())
            }
            Greeting::Newstyle { flags } => self.negotiate(flags),
        }
    }

    fn negotiate(&mut self, server_flags: u16) -> Result<(), Error> {
        let fixed = server_flags & FLAG_FIXED_NEWSTYLE != 0;
        let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
        let mut cflags = 0u32;
        if fixed {
            cflags |= CLIENT_FIXED_NEWSTYLE;
        }
        if no_zeroes {
            cflags |= CLIENT_NO_ZEROES;
        }
        let mut out = cflags.to_be_bytes().to_vec();
        if !fixed {
            hs::encode_option(&mut out, OptCode::ExportName as u32, b"");
            self.write_all(&out)?;
            let mut b = vec![0u8; if no_zeroes { 10 } else { 134 }];
            self.read_exact(&mut b, "the export")?;
            let ((size, flags), _) = hs::parse_export_name_reply(&b, no_zeroes)
                .map_err(|e| remote(e.to_string()))?
                .ok_or_else(|| remote("short export reply"))?;
            self.size = size;
            self.flags = flags;
            return Ok(());
        }
        // Extended headers first (a server without them refuses and we stay compact), then GO
        // once that is answered: options must not be pipelined.
        hs::encode_option(&mut out, OptCode::ExtendedHeaders as u32, &[]);
        self.write_all(&out)?;
        let mut data = Vec::new();
        hs::encode_export_request(&mut data, b"", &[InfoType::BlockSize as u16]);
        let mut go = Vec::new();
        hs::encode_option(&mut go, OptCode::Go as u32, &data);
        loop {
            let mut h = [0u8; 20];
            self.read_exact(&mut h, "an option reply")?;
            let len = crate::proto::be32(&h[16..]);
            if len > MAX_OPTION_LEN {
                return Err(remote(format!("option reply of {len} bytes is too long")));
            }
            let mut b = h.to_vec();
            b.resize(20 + len as usize, 0);
            self.read_exact(&mut b[20..], "an option reply")?;
            let (r, _) = hs::parse_option_reply(&b)
                .map_err(|e| remote(format!("bad option reply: {e}")))?
                .ok_or_else(|| remote("short option reply"))?;
            if r.opt == OptCode::ExtendedHeaders as u32 {
                self.extended = r.rep == RepType::Ack as u32;
                self.write_all(&go)?;
                continue;
            }
            match RepType::try_from(r.rep) {
                Ok(RepType::Ack) => break,
                Ok(RepType::Info) => {
                    if let Some((size, flags)) =
                        hs::parse_info_export(r.data).map_err(|e| remote(e.to_string()))?
                    {
                        self.size = size;
                        self.flags = flags;
                    } else if r.data.len() == 14 && crate::proto::be16(r.data) == InfoType::BlockSize as u16 {
                        let max = crate::proto::be32(&r.data[10..]);
                        if max > 0 {
                            self.max_block = max.min(MAX_REQUEST_LEN);
                        }
                    }
                }
                _ if r.rep & REP_FLAG_ERROR != 0 => {
                    let msg = String::from_utf8_lossy(r.data);
                    return Err(remote(format!("server refused the export (error {:#x}): {msg}", r.rep)));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), Error> {
        if offset > MAX_OFFSET {
            return Err(remote(format!("offset {offset} is over the limit of 2^62")));
        }
        if len > MAX_SIZE {
            return Err(remote(format!("size {len} is over the limit of 2^30")));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(remote(format!(
                "range {offset}+{len} is beyond the end of the export ({} bytes)",
                self.size
            ))),
        }
    }

    /// Reads `len` bytes at `offset`, in requests no bigger than the server's maximum.
    pub fn read(&mut self, offset: u64, len: u64, out: &mut impl Write) -> Result<(), Error> {
        self.check_range(offset, len)?;
        let mut done = 0u64;
        let mut buf = Vec::new();
        while done < len {
            let n = (len - done).min(u64::from(self.max_block)) as u32;
            let cookie = self.send(Cmd::Read, offset + done, n, &[])?;
            buf.resize(n as usize, 0);
            if self.extended {
                self.chunks(cookie, offset + done, &mut buf)?;
            } else {
                self.expect_reply(cookie)?;
                self.read_exact(&mut buf, "read data")?;
            }
            out.write_all(&buf).map_err(io_ctx("cannot write to stdout"))?;
            done += u64::from(n);
        }
        out.flush().map_err(io_ctx("cannot write to stdout"))
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), Error> {
        self.check_range(offset, data.len() as u64)?;
        for (i, chunk) in data.chunks(self.max_block as usize).enumerate() {
            let off = offset + (i as u64) * u64::from(self.max_block);
            let cookie = self.send(Cmd::Write, off, chunk.len() as u32, chunk)?;
            self.expect_reply(cookie)?;
        }
        Ok(())
    }

    pub fn disconnect(mut self) {
        let _ = self.send(Cmd::Disc, 0, 0, &[]);
    }

    fn send(&mut self, cmd: Cmd, offset: u64, len: u32, payload: &[u8]) -> Result<u64, Error> {
        self.cookie += 1;
        let req = Request { flags: 0, kind: cmd as u16, cookie: self.cookie, offset, len };
        if self.extended {
            let mut req = tx::ExtRequest::from(req);
            if cmd == Cmd::Write {
                req.flags |= CMD_FLAG_PAYLOAD_LEN;
            }
            self.write_all(&req.encode())?;
        } else {
            self.write_all(&req.encode())?;
        }
        if !payload.is_empty() {
            self.write_all(payload)?;
        }
        Ok(self.cookie)
    }

    fn expect_reply(&mut self, cookie: u64) -> Result<(), Error> {
        if self.extended {
            return self.chunks(cookie, 0, &mut []);
        }
        let mut h = [0u8; tx::SIMPLE_REPLY_LEN];
        self.read_exact(&mut h, "a reply")?;
        match tx::parse_reply_header(&h).map_err(|e| remote(format!("bad reply: {e}")))? {
            Some((ReplyHeader::Simple { error, cookie: c }, _)) if c == cookie => match error {
                0 => Ok(()),
                e => Err(remote(format!("server replied with error {e} ({})", errno_name(e)))),
            },
            Some((h, _)) => Err(remote(format!("unexpected reply {h:?}"))),
            None => Err(remote("short reply")),
        }
    }

    /// Extended reply chunks for `cookie` up to the final one. A READ's data and holes land in
    /// `buf` (its `buf.len()` bytes at `offset`), which they must cover whole unless an error
    /// chunk came; any other reply must carry no data.
    fn chunks(&mut self, cookie: u64, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let bad = |e: crate::proto::handshake::ParseError| remote(format!("bad reply: {e}"));
        let (mut covered, mut failed) = (0usize, None);
        loop {
            let mut h = [0u8; tx::EXT_REPLY_LEN];
            self.read_exact(&mut h, "a reply")?;
            let (h, _) = tx::parse_ext_reply_header(&h).map_err(bad)?.ok_or_else(|| remote("short reply"))?;
            if h.cookie != cookie {
                return Err(remote(format!("unexpected reply {h:?}")));
            }
            // Bounded by the parser (MAX_CHUNK_LEN).
            let mut p = vec![0u8; h.len as usize];
            self.read_exact(&mut p, "a reply")?;
            match tx::read_chunk(h.kind, &p, offset, buf.len() as u64).map_err(bad)? {
                ReadChunk::Data { at, data } => {
                    buf[at..at + data.len()].copy_from_slice(data);
                    covered += data.len();
                }
                ReadChunk::Hole { at, len } => {
                    buf[at..at + len].fill(0);
                    covered += len;
                }
                ReadChunk::Error { error, .. } => failed = failed.or(Some(error)),
                ReadChunk::None => {}
            }
            if h.flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        match failed {
            Some(e) => Err(remote(format!("server replied with error {e} ({})", errno_name(e)))),
            None if covered != buf.len() => Err(remote("the server's read reply left bytes out")),
            None => Ok(()),
        }
    }

    fn read_exact(&mut self, b: &mut [u8], what: &str) -> Result<(), Error> {
        self.stream.read_exact(b).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                remote(format!("server closed the connection while we waited for {what}"))
            }
            _ => Error::Io { what: format!("reading {what}"), source: e },
        })
    }

    fn write_all(&mut self, b: &[u8]) -> Result<(), Error> {
        self.stream.write_all(b).map_err(io_ctx("sending to the server"))
    }
}

/// Connects over TCP, first binding to `bind` (needed when the server has an ACL). A host name
/// is tried at each of its addresses (of the bind address's family) in turn.
pub fn connect_tcp(addr: &str, port: u16, bind: Option<&str>) -> Result<TcpStream, Error> {
    let local = match bind {
        Some(b) => Some(crate::listener::resolve(b, 0)?),
        None => None,
    };
    let targets: Vec<SocketAddr> = crate::listener::resolve_all(addr, port)?
        .into_iter()
        .filter(|t| local.is_none_or(|l| l.is_ipv4() == t.is_ipv4()))
        .collect();
    let mut last = None;
    for target in &targets {
        let r = match local {
            None => TcpStream::connect_timeout(target, Duration::from_secs(15)),
            Some(l) => crate::net::connect(*target, Some(l), false),
        };
        match r {
            Ok(s) => return Ok(s),
            Err(e) => last = Some((*target, e)),
        }
    }
    match (last, bind) {
        (Some((t, e)), None) => Err(io_ctx(format!("cannot connect to {t}"))(e)),
        (Some((t, e)), Some(b)) => Err(io_ctx(format!("cannot connect to {t} from {b}"))(e)),
        (None, _) => Err(Error::Usage(format!("{addr} has no address of the bind address's family"))),
    }
}

fn check_limits(from: u64, size: u64) -> Result<(), Error> {
    if from > MAX_OFFSET || size > MAX_SIZE {
        return Err(Error::Usage("--from must be at most 2^62 and --size at most 2^30".into()));
    }
    Ok(())
}

/// `flexnbd read`: SIZE bytes at OFFSET to stdout.
pub fn read_cmd(addr: &str, port: u16, from: u64, size: u64, bind: Option<&str>) -> Result<(), Error> {
    check_limits(from, size)?;
    let mut c = NbdClient::connect(addr, port, bind)?;
    let stdout = io::stdout();
    let mut out = io::BufWriter::with_capacity(1 << 20, stdout.lock());
    c.read(from, size, &mut out)?;
    c.disconnect();
    Ok(())
}

/// `flexnbd write`: exactly SIZE bytes from stdin to OFFSET. All of stdin is read first, so a
/// short input writes nothing.
pub fn write_cmd(addr: &str, port: u16, from: u64, size: u64, bind: Option<&str>) -> Result<(), Error> {
    check_limits(from, size)?;
    // A bad address is a command-line error: say so before waiting on stdin.
    crate::listener::resolve_all(addr, port)?;
    if let Some(b) = bind {
        crate::listener::resolve(b, 0)?;
    }
    let mut data = Vec::with_capacity(size as usize);
    io::stdin().lock().take(size).read_to_end(&mut data).map_err(io_ctx("cannot read stdin"))?;
    if (data.len() as u64) < size {
        return Err(remote(format!("stdin ended after {} of {size} bytes; nothing written", data.len())));
    }
    let mut c = NbdClient::connect(addr, port, bind)?;
    c.write(from, &data)?;
    c.disconnect();
    Ok(())
}

/// `flexnbd mirror`: asks the server to migrate; with `wait`, stays until the migration ends,
/// showing progress, and exits 0 only if the handover completed.
pub fn mirror_cmd(sock: &Path, args: &[String], wait: bool) -> Result<i32, Error> {
    use std::io::BufRead;
    check_args(args)?;
    let mut s = UnixStream::connect(sock)
        .map_err(io_ctx(format!("cannot connect to control socket {}", sock.display())))?;
    s.write_all(&encode_request("mirror", args)).map_err(io_ctx("cannot send control request"))?;
    // The first answer comes once the destination's hello arrived (bounded by the server's
    // own connect and hello timeouts).
    s.set_read_timeout(Some(IO_TIMEOUT)).map_err(io_ctx("control socket"))?;
    let mut r = io::BufReader::new(s.try_clone().map_err(io_ctx("control socket"))?);
    let mut line = String::new();
    r.read_line(&mut line).map_err(io_ctx("cannot read control reply"))?;
    let (code, text) =
        parse_reply(&line).ok_or_else(|| remote(format!("unexpected reply from server: {line:?}")))?;
    if code != 0 || !wait {
        return Ok(print_reply((code, text.to_string())));
    }
    println!("{text}");
    let tty = unsafe { libc::isatty(1) } == 1;
    let every = if tty { Duration::from_secs(1) } else { Duration::from_secs(5) };
    s.set_read_timeout(Some(every)).map_err(io_ctx("control socket"))?;
    let mut line = String::new();
    loop {
        match r.read_line(&mut line) {
            Ok(0) => {
                if tty {
                    println!();
                }
                return Err(remote("the source server went away before the migration finished"));
            }
            Ok(_) if line.ends_with('\n') => {
                if tty {
                    println!();
                }
                let (code, text) = parse_reply(&line)
                    .ok_or_else(|| remote(format!("unexpected reply from server: {line:?}")))?;
                return Ok(print_reply((code, text.to_string())));
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                if let Ok((0, status)) = control(sock, "status", &[]) {
                    let p = progress_line(&status);
                    if tty {
                        print!("\r{p}\x1b[K");
                    } else {
                        println!("{p}");
                    }
                    let _ = io::stdout().flush();
                }
            }
            Err(e) => return Err(io_ctx("reading from the control socket")(e)),
        }
    }
}

/// "42.0% 1048576 bytes left at 5242880 B/s, ETA 1 s" from a status line.
pub fn progress_line(status: &str) -> String {
    let get = |k: &str| {
        status
            .split(' ')
            .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('=')?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let size = get("size");
    let left = get("migration_bytes_left").min(size);
    let pct = if size > 0 { 100.0 * (size - left) as f64 / size as f64 } else { 100.0 };
    format!(
        "{pct:.1}% {left} bytes left at {} B/s, ETA {} s",
        get("migration_speed"),
        get("migration_seconds_left")
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn progress_from_status() {
        let s = "pid=1 size=1000 is_mirroring=true clients_allowed=true num_clients=0 has_control=true \
                 migration_speed=100 migration_duration=2 migration_seconds_left=3 migration_bytes_left=250";
        assert_eq!(super::progress_line(s), "75.0% 250 bytes left at 100 B/s, ETA 3 s");
    }
}
