//! Outbound sockets: TCP with an optional local bind address (needed behind a remote ACL),
//! blocking (CLI clients) or non-blocking (the mirror on the reactor), and the mirror's Unix
//! socket destinations.

use crate::listener::Socket;
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::io::FromRawFd;
use std::path::PathBuf;

/// An IP address literal, IPv6 with or without brackets (`[::1]`, as in URIs and on the original's
/// command line). No name resolution: the control protocol carries addresses.
pub fn parse_ip(s: &str) -> Option<IpAddr> {
    s.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// Where a migration goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Tcp(SocketAddr),
    /// A destination on this host listening on a Unix socket (`listen --unix`).
    Unix(PathBuf),
}

/// The prefix that marks a Unix socket path in the control socket's `mirror` request, where an
/// address goes: the original flexnbd answers such a request with "bad IP address".
pub const UNIX_PREFIX: &str = "unix:";

impl Target {
    /// The `mirror` request's address and port lines: an IP address and a port, or
    /// `unix:PATH` and a port that is ignored.
    pub fn parse(addr: &str, port: u16) -> Option<Target> {
        if let Some(p) = addr.strip_prefix(UNIX_PREFIX) {
            return (!p.is_empty()).then(|| Target::Unix(PathBuf::from(p)));
        }
        let ip = parse_ip(addr)?;
        (port > 0).then_some(Target::Tcp(SocketAddr::new(ip, port)))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp(a) => write!(f, "{a}"),
            Target::Unix(p) => write!(f, "{UNIX_PREFIX}{}", p.display()),
        }
    }
}

/// Starts a non-blocking connect to `target` for the reactor; it is done once the socket is
/// writable and `Socket::connected` says so. `bind` applies to TCP only.
pub fn connect_nonblocking(target: &Target, bind: Option<SocketAddr>) -> io::Result<Socket> {
    match target {
        Target::Tcp(a) => Ok(Socket::Tcp(mio::net::TcpStream::from_std(connect(*a, bind, true)?))),
        Target::Unix(p) => Ok(Socket::Unix(mio::net::UnixStream::connect(p)?)),
    }
}

/// Creates a socket, binds it to `bind` (port 0) if given, and connects to `target`. With
/// `nonblocking`, the connect is only started (EINPROGRESS is success) and the caller waits
/// for writability.
pub fn connect(target: SocketAddr, bind: Option<SocketAddr>, nonblocking: bool) -> io::Result<TcpStream> {
    let (fam, sa, len) = sockaddr(&target);
    let mut ty = libc::SOCK_STREAM | libc::SOCK_CLOEXEC;
    if nonblocking {
        ty |= libc::SOCK_NONBLOCK;
    }
    // SAFETY: a fresh socket we own (wrapped at once so it is closed on every path); the
    // sockaddr buffers are sized for the family they hold.
    unsafe {
        let fd = libc::socket(fam, ty, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        if let Some(b) = bind {
            if b.is_ipv4() != target.is_ipv4() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "bind and target address families differ",
                ));
            }
            let (_, bsa, blen) = sockaddr(&b);
            if libc::bind(fd, (&bsa as *const libc::sockaddr_storage).cast(), blen) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        if libc::connect(fd, (&sa as *const libc::sockaddr_storage).cast(), len) != 0 {
            let e = io::Error::last_os_error();
            if !(nonblocking && e.raw_os_error() == Some(libc::EINPROGRESS)) {
                return Err(e);
            }
        }
        Ok(stream)
    }
}

fn sockaddr(a: &SocketAddr) -> (i32, libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; we fill the variant matching the family.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            (libc::AF_INET, ss, std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: v6.ip().octets() },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            (libc::AF_INET6, ss, std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_targets_from_the_request_lines() {
        assert_eq!(Target::parse("127.0.0.1", 5), Some(Target::Tcp("127.0.0.1:5".parse().unwrap())));
        assert_eq!(Target::parse("[::1]", 5), Some(Target::Tcp("[::1]:5".parse().unwrap())));
        assert_eq!(Target::parse("127.0.0.1", 0), None);
        assert_eq!(Target::parse("localhost", 5), None, "the server takes addresses, the CLI resolves");
        assert_eq!(Target::parse("unix:/run/x.sock", 0), Some(Target::Unix("/run/x.sock".into())));
        assert_eq!(Target::parse("unix:", 0), None);
        assert_eq!(Target::Unix("/a b".into()).to_string(), "unix:/a b");
    }
}
