//! SIGINT/SIGQUIT/SIGTERM/SIGHUP delivered through a signalfd that the reactor polls. SIGHUP
//! (a closed terminal, or an operator used to daemons that reload on it) shuts down like SIGTERM:
//! there is nothing to reload, and dying of it would leave the control socket behind.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};

pub struct SignalFd {
    fd: RawFd,
}

impl SignalFd {
    /// Blocks the four signals for this thread (and every thread it starts later) and opens a
    /// non-blocking signalfd for them. Must run before any other thread is spawned.
    pub fn new() -> io::Result<SignalFd> {
        // SAFETY: sigset manipulation on a local, zero-initialised set.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in [libc::SIGINT, libc::SIGQUIT, libc::SIGTERM, libc::SIGHUP] {
                libc::sigaddset(&mut set, s);
            }
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            // A write past RLIMIT_FSIZE must fail with EFBIG (answered as ENOSPC), not kill
            // the server and every client with it.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(SignalFd { fd })
        }
    }

    /// The next pending signal number, if any.
    pub fn read(&self) -> Option<u32> {
        // SAFETY: reading one signalfd_siginfo into a correctly sized, zeroed struct.
        unsafe {
            let mut info: libc::signalfd_siginfo = std::mem::zeroed();
            let n = libc::read(
                self.fd,
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                std::mem::size_of::<libc::signalfd_siginfo>(),
            );
            if n == std::mem::size_of::<libc::signalfd_siginfo>() as isize {
                Some(info.ssi_signo)
            } else {
                None
            }
        }
    }
}

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd
    }
}

impl Drop for SignalFd {
    fn drop(&mut self) {
        // SAFETY: closing the fd we own exactly once.
        unsafe { libc::close(self.fd) };
    }
}
