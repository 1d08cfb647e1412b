//! Outbound TCP sockets with an optional local bind address (needed behind a remote ACL),
//! blocking (CLI clients) or non-blocking (the mirror on the reactor).

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::io::FromRawFd;

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
