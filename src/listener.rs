//! Where a server listens and what it accepts: a TCP or a Unix stream listener (bound from the
//! command line, or handed over by systemd), the sockets it accepts, and who is on the other end.
//! The mirror's outbound connection uses the same `Socket`.

use crate::buffer::Sink;
use crate::error::Error;
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Interest, Registry, Token};
use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::io::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::path::{Path, PathBuf};

/// The default mode of a Unix export socket: only its owner may connect, as for the control
/// socket (the ACL cannot restrict Unix clients; the file mode is what does).
pub const DEFAULT_UNIX_MODE: u32 = 0o600;

/// Where to listen.
#[derive(Debug)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Unix {
        path: PathBuf,
        mode: u32,
    },
    /// A listening socket passed by systemd (socket activation).
    Inherited(OwnedFd),
}

/// A listening socket.
pub enum Listener {
    Tcp(TcpListener),
    /// `path` is the file to remove at exit: None for a socket systemd made (it owns the file).
    Unix {
        listener: UnixListener,
        path: Option<PathBuf>,
        inode: (u64, u64),
        shown: String,
    },
}

impl Listener {
    pub fn bind(ep: Endpoint) -> Result<Listener, Error> {
        let l = match ep {
            Endpoint::Tcp(a) => {
                let l = TcpListener::bind(a).map_err(|e| Error::Listen { addr: a.to_string(), source: e })?;
                Listener::Tcp(l)
            }
            Endpoint::Unix { path, mode } => bind_unix(&path, mode)?,
            Endpoint::Inherited(fd) => inherited(fd)?,
        };
        // mio listens with a small backlog; a connection storm should queue, not be dropped.
        // SAFETY: listen() again on our own listening socket only changes its backlog.
        unsafe { libc::listen(l.as_raw_fd(), libc::SOMAXCONN) };
        Ok(l)
    }

    /// What the log line `listening on ...` shows: `ADDR:PORT` or `unix:PATH`.
    pub fn describe(&self) -> io::Result<String> {
        match self {
            Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()),
            Listener::Unix { shown, .. } => Ok(shown.clone()),
        }
    }

    pub fn accept(&self) -> io::Result<(Socket, Peer)> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(s, a)| (Socket::Tcp(s), Peer::Tcp(a))),
            Listener::Unix { listener, .. } => listener.accept().map(|(s, _)| {
                let peer = Peer::unix(&s);
                (Socket::Unix(s), peer)
            }),
        }
    }

    pub fn is_unix(&self) -> bool {
        matches!(self, Listener::Unix { .. })
    }

    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix { listener, .. } => listener.as_raw_fd(),
        }
    }
}

impl Drop for Listener {
    /// A socket file we made goes with the listener (shutdown, exit), unless another process
    /// has put its own socket at that path meanwhile.
    fn drop(&mut self) {
        if let Listener::Unix { path: Some(p), inode, .. } = self
            && std::fs::symlink_metadata(&*p).is_ok_and(|m| (m.dev(), m.ino()) == *inode)
        {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl mio::event::Source for Listener {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.register(r, t, i),
            Listener::Unix { listener, .. } => listener.register(r, t, i),
        }
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.reregister(r, t, i),
            Listener::Unix { listener, .. } => listener.reregister(r, t, i),
        }
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.deregister(r),
            Listener::Unix { listener, .. } => listener.deregister(r),
        }
    }
}

/// Binds a Unix socket at `path` with `mode`, replacing a stale socket file left by a dead
/// process, as the control socket does; a live server there, or a file that is not a socket,
/// is an error.
fn bind_unix(path: &Path, mode: u32) -> Result<Listener, Error> {
    let shown = format!("unix:{}", path.display());
    let ctx = |e| Error::Listen { addr: shown.clone(), source: e };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ctx(io::Error::new(io::ErrorKind::AlreadyExists, "exists and is not a socket")));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ctx(io::Error::new(io::ErrorKind::AddrInUse, "a running server is listening there")));
        }
        std::fs::remove_file(path).map_err(ctx)?;
    }
    // Created under a umask that leaves the owner alone, so no other user can connect in the
    // moment before the chmod below sets the mode asked for.
    // SAFETY: umask only swaps the process's file mode mask; we put the old one back at once.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(ctx)?;
    let inode = match std::fs::symlink_metadata(path) {
        Ok(m) => (m.dev(), m.ino()),
        Err(e) => return Err(ctx(e)),
    };
    let l = Listener::Unix { listener, path: Some(path.to_path_buf()), inode, shown: shown.clone() };
    // On failure `l` is dropped, which removes the file again.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(ctx)?;
    Ok(l)
}

/// Takes over a listening socket from systemd: TCP or Unix, it must be a stream socket that
/// already listens.
fn inherited(fd: OwnedFd) -> Result<Listener, Error> {
    let raw = fd.as_raw_fd();
    let bad = |what: &str| Error::Setup {
        what: "the socket systemd passed",
        source: io::Error::new(io::ErrorKind::InvalidInput, what.to_string()),
    };
    if getsockopt_int(raw, libc::SO_TYPE) != Some(libc::SOCK_STREAM) {
        return Err(bad("not a stream socket (use ListenStream=)"));
    }
    if getsockopt_int(raw, libc::SO_ACCEPTCONN) != Some(1) {
        return Err(bad("not a listening socket (use Accept=no)"));
    }
    // mio needs it non-blocking, and no program we might start should inherit it.
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(raw, libc::F_GETFL);
        libc::fcntl(raw, libc::F_SETFL, fl | libc::O_NONBLOCK);
        libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    match socket_family(raw) {
        Some(libc::AF_INET) | Some(libc::AF_INET6) => {
            // SAFETY: an open listening TCP socket whose ownership moves into the listener.
            let std = unsafe { std::net::TcpListener::from_raw_fd(fd.into_raw_fd()) };
            Ok(Listener::Tcp(TcpListener::from_std(std)))
        }
        Some(libc::AF_UNIX) => {
            // SAFETY: an open listening Unix socket whose ownership moves into the listener.
            let std = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd.into_raw_fd()) };
            let shown = match std.local_addr().ok().and_then(|a| a.as_pathname().map(Path::to_path_buf)) {
                Some(p) => format!("unix:{}", p.display()),
                None => "unix:(unnamed)".to_string(),
            };
            Ok(Listener::Unix { listener: UnixListener::from_std(std), path: None, inode: (0, 0), shown })
        }
        _ => Err(bad("neither a TCP nor a Unix socket")),
    }
}

fn getsockopt_int(fd: RawFd, opt: libc::c_int) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a live c_int with its size.
    let r =
        unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&mut v as *mut libc::c_int).cast(), &mut len) };
    (r == 0).then_some(v)
}

fn socket_family(fd: RawFd) -> Option<libc::c_int> {
    // SAFETY: getsockname into a zeroed sockaddr_storage with its size.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let r = unsafe { libc::getsockname(fd, (&mut ss as *mut libc::sockaddr_storage).cast(), &mut len) };
    (r == 0).then_some(libc::c_int::from(ss.ss_family))
}

/// An address to listen on or connect to: an IP literal (IPv6 with or without brackets) or a
/// host name, which takes the first address it resolves to.
pub fn resolve(addr: &str, port: u16) -> Result<SocketAddr, Error> {
    resolve_all(addr, port)?.into_iter().next().ok_or_else(|| Error::BadAddress(addr.to_string()))
}

/// Every address `addr` stands for, in the resolver's order.
pub fn resolve_all(addr: &str, port: u16) -> Result<Vec<SocketAddr>, Error> {
    if let Some(ip) = crate::net::parse_ip(addr) {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let host = addr.trim_start_matches('[').trim_end_matches(']');
    match (host, port).to_socket_addrs() {
        Ok(a) if !host.is_empty() => Ok(a.collect()),
        _ => Err(Error::BadAddress(addr.to_string())),
    }
}

// ---------------------------------------------------------------------------------------------

/// Who is on the other end of an accepted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Tcp(SocketAddr),
    /// A local process; its pid and uid when the kernel tells them (SO_PEERCRED).
    Unix {
        pid: Option<u32>,
        uid: Option<u32>,
    },
}

impl Peer {
    fn unix(s: &UnixStream) -> Peer {
        // SAFETY: getsockopt into a zeroed ucred with its size.
        let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        let r = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if r == 0 {
            Peer::Unix { pid: Some(cred.pid as u32), uid: Some(cred.uid) }
        } else {
            Peer::Unix { pid: None, uid: None }
        }
    }

    /// The IP address ACLs are matched against; none for a Unix peer (ACLs do not apply).
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Peer::Tcp(a) => Some(a.ip()),
            Peer::Unix { .. } => None,
        }
    }
}

impl From<SocketAddr> for Peer {
    fn from(a: SocketAddr) -> Peer {
        Peer::Tcp(a)
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp(a) => write!(f, "{a}"),
            Peer::Unix { pid: Some(p), uid: Some(u) } => write!(f, "unix(pid {p}, uid {u})"),
            Peer::Unix { .. } => write!(f, "unix"),
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// A connected stream socket, TCP or Unix.
pub enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    /// Whether a non-blocking connect has finished: Ok(false) while it is still in progress.
    pub fn connected(&self) -> io::Result<bool> {
        let r = match self {
            Socket::Tcp(s) => s.peer_addr().map(drop),
            Socket::Unix(s) => s.peer_addr().map(drop),
        };
        match r {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        match self {
            Socket::Tcp(s) => s.take_error(),
            Socket::Unix(s) => s.take_error(),
        }
    }

    pub fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.shutdown(how),
            Socket::Unix(s) => s.shutdown(how),
        }
    }

    /// TCP_NODELAY; a Unix socket has no delay to turn off.
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.set_nodelay(on),
            Socket::Unix(_) => Ok(()),
        }
    }

    /// Our end's address, for TCP.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Socket::Tcp(s) => s.local_addr(),
            Socket::Unix(_) => Err(io::ErrorKind::Unsupported.into()),
        }
    }

    /// The far end's address, for TCP.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Socket::Tcp(s) => s.peer_addr(),
            Socket::Unix(_) => Err(io::ErrorKind::Unsupported.into()),
        }
    }

    pub fn is_tcp(&self) -> bool {
        matches!(self, Socket::Tcp(_))
    }
}

impl Read for Socket {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.read(b),
            Socket::Unix(s) => s.read(b),
        }
    }
    fn read_vectored(&mut self, b: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.read_vectored(b),
            Socket::Unix(s) => s.read_vectored(b),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.write(b),
            Socket::Unix(s) => s.write(b),
        }
    }
    fn write_vectored(&mut self, b: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.write_vectored(b),
            Socket::Unix(s) => s.write_vectored(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Sink for Socket {
    fn send_more(&mut self, iov: &[IoSlice<'_>], more: bool) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.send_more(iov, more),
            Socket::Unix(s) => s.send_more(iov, more),
        }
    }
    fn send_file(&mut self, file: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.send_file(file, offset, len),
            Socket::Unix(s) => s.send_file(file, offset, len),
        }
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Tcp(s) => s.as_fd(),
            Socket::Unix(s) => s.as_fd(),
        }
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

impl mio::event::Source for Socket {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.register(r, t, i),
            Socket::Unix(s) => s.register(r, t, i),
        }
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.reregister(r, t, i),
            Socket::Unix(s) => s.reregister(r, t, i),
        }
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.deregister(r),
            Socket::Unix(s) => s.deregister(r),
        }
    }
}

/// Starts a non-blocking connect to `target` for the reactor; it is done once the socket is
/// writable and `Socket::connected` says so. `bind` applies to TCP only.
pub fn connect_nonblocking(target: &crate::net::Target, bind: Option<SocketAddr>) -> io::Result<Socket> {
    match target {
        crate::net::Target::Tcp(a) => {
            Ok(Socket::Tcp(mio::net::TcpStream::from_std(crate::net::connect(*a, bind, true)?)))
        }
        crate::net::Target::Unix(p) => Ok(Socket::Unix(mio::net::UnixStream::connect(p)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("flexnbd-listener-{tag}-{}", std::process::id()))
    }

    #[test]
    fn unix_listener_has_its_mode_and_is_removed_on_drop() {
        let p = temp_path("mode");
        let _ = std::fs::remove_file(&p);
        let l = Listener::bind(Endpoint::Unix { path: p.clone(), mode: 0o640 }).expect("bind");
        let mode = std::fs::metadata(&p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        assert_eq!(l.describe().expect("describe"), format!("unix:{}", p.display()));
        drop(l);
        assert!(!p.exists(), "socket file left behind");
    }

    #[test]
    fn stale_socket_is_replaced_and_live_one_refused() {
        let p = temp_path("stale");
        let _ = std::fs::remove_file(&p);
        // A socket file nobody listens on any more.
        drop(std::os::unix::net::UnixListener::bind(&p).expect("bind stale"));
        assert!(p.exists());
        let live =
            Listener::bind(Endpoint::Unix { path: p.clone(), mode: DEFAULT_UNIX_MODE }).expect("replace");
        let again = Listener::bind(Endpoint::Unix { path: p.clone(), mode: DEFAULT_UNIX_MODE });
        assert!(matches!(again, Err(Error::Listen { .. })), "a live socket must not be replaced");
        drop(live);
        assert!(!p.exists());
    }

    #[test]
    fn a_file_that_is_not_a_socket_is_left_alone() {
        let p = temp_path("plain");
        std::fs::write(&p, b"keep").expect("write");
        assert!(Listener::bind(Endpoint::Unix { path: p.clone(), mode: DEFAULT_UNIX_MODE }).is_err());
        assert_eq!(std::fs::read(&p).expect("read"), b"keep");
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn accepted_unix_peer_shows_its_process() {
        let p = temp_path("peer");
        let _ = std::fs::remove_file(&p);
        let l = Listener::bind(Endpoint::Unix { path: p.clone(), mode: DEFAULT_UNIX_MODE }).expect("bind");
        let _c = std::os::unix::net::UnixStream::connect(&p).expect("connect");
        let (s, peer) = l.accept().expect("accept");
        assert!(!s.is_tcp());
        assert_eq!(peer.ip(), None);
        assert!(peer.to_string().contains(&format!("pid {}", std::process::id())), "{peer}");
    }

    #[test]
    fn host_names_resolve() {
        assert!(resolve("localhost", 1).is_ok());
        assert_eq!(resolve("[::1]", 5).expect("v6").to_string(), "[::1]:5");
        assert!(matches!(resolve("", 1), Err(Error::BadAddress(_))));
        assert!(matches!(resolve("no-such-host.invalid", 1), Err(Error::BadAddress(_))));
    }
}
