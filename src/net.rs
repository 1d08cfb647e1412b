//! Outbound sockets: TCP with an optional local bind address (needed behind a remote ACL),
//! blocking (CLI clients) or non-blocking (the mirror on the reactor), and the mirror's Unix
//! socket destinations.

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
pub fn tune_client_socket(fd: i32) {
    set_keepalive(fd);
    set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, NOTSENT_LOWAT);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::io::AsRawFd;

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
