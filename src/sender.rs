//! Sending a client's replies from a disk worker (see `ClientConn::offload`).
//!
//! A client that streams big reads keeps its socket full. Pushing that data through TCP (on
//! loopback, the receiving half of the protocol too) is then most of what serving it costs,
//! and on the reactor that work is serial across every connection and waits behind the
//! clients' own threads for a CPU. A worker sends instead, and keeps sending while the
//! reactor queues more replies behind it: the two meet in a `Lent`.
//!
//! | worker's queue     | `later` (reactor's replies)  | worker does                          |
//! |--------------------|------------------------------|--------------------------------------|
//! | sent, socket full  | -                            | waits up to WAIT for room, goes on   |
//! | sent, socket full  | - (no room within WAIT)      | stops: blocked, the reactor polls     |
//! | empty              | has replies                  | takes them, goes on                  |
//! | empty              | empty                        | waits up to LINGER, else stops: done |
//! | any, after SLICE   | -                            | stops, taking `later` along          |
//!
//! Stopping closes `later` under its lock, so a reply the reactor queues is either taken by
//! the worker or stays with the reactor, never both and never lost.

use crate::buffer::{OutQueue, SockFd};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Longest a worker waits for room in a full socket before leaving it to the reactor: a
/// reader that slow gains nothing from a worker, and the worker is needed for disk jobs.
const WAIT: Duration = Duration::from_millis(5);
/// Longest one send job runs, so a worker goes back to disk jobs now and then.
const SLICE: Duration = Duration::from_millis(20);
/// How long a worker that sent everything waits for the reactor's next replies. A streaming
/// client's next requests are one round trip away; giving up sooner means a trip back to the
/// reactor and a new job for each batch.
const LINGER: Duration = Duration::from_millis(2);

/// A connection's socket, lent to workers for as long as the connection lives.
#[derive(Debug)]
pub struct Lent {
    /// A duplicate of the connection's descriptor: a worker still sending after the
    /// connection closed writes to the dying socket, never to a descriptor number reused
    /// by another.
    sock: OwnedFd,
    /// Replies queued by the reactor while a worker sends.
    later: Mutex<Later>,
    /// Signalled when replies are given to a lingering worker.
    given: Condvar,
    /// Bytes handed to the running send and not yet written (for the reactor's backpressure).
    backlog: AtomicUsize,
}

impl Lent {
    pub fn new(sock: BorrowedFd<'_>) -> io::Result<Lent> {
        Ok(Lent {
            sock: sock.try_clone_to_owned()?,
            later: Mutex::default(),
            given: Condvar::new(),
            backlog: AtomicUsize::new(0),
        })
    }

    /// A send job of `out` is about to start: from now on `give` hands replies to it.
    pub fn open(&self, out: &OutQueue) {
        self.backlog.store(out.bytes(), Ordering::Relaxed);
        lock(&self.later).queue = Some(OutQueue::default());
    }

    /// Hands `out` to the running send job. False (and `out` untouched) when it has stopped
    /// taking replies: its completion is on the way.
    pub fn give(&self, out: &mut OutQueue) -> bool {
        let mut later = lock(&self.later);
        let Some(q) = later.queue.as_mut() else { return false };
        self.backlog.fetch_add(out.bytes(), Ordering::Relaxed);
        q.append(out);
        if later.lingering {
            self.given.notify_one();
        }
        true
    }

    /// Bytes given to the running send job and not yet written.
    pub fn backlog(&self) -> usize {
        self.backlog.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
struct Later {
    /// `None` when no worker takes replies.
    queue: Option<OutQueue>,
    /// The worker waits on `given`.
    lingering: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The worker's side: sends `out`, then whatever the reactor queues behind it, as the table
/// above says. Returns whether it stopped on a full socket; what is left is in `out`.
pub fn send(lent: &Lent, out: &mut OutQueue, file: BorrowedFd<'_>) -> io::Result<bool> {
    let start = Instant::now();
    let result = loop {
        let before = out.bytes();
        let r = out.write_to(&mut SockFd(lent.sock.as_fd()), None, Some(file));
        lent.backlog.fetch_sub(before - out.bytes(), Ordering::Relaxed);
        match r {
            Err(e) => break Err(e),
            Ok(true) => {
                if start.elapsed() >= SLICE || !writable_within(lent.sock.as_fd(), WAIT) {
                    break Ok(true);
                }
            }
            Ok(false) => {
                if start.elapsed() >= SLICE || !take_later(lent, out) {
                    break Ok(false);
                }
            }
        }
    };
    if let Some(mut q) = lock(&lent.later).queue.take() {
        out.append(&mut q);
    }
    result
}

/// Moves the reactor's replies into `out`, waiting up to LINGER for some; false if none came.
fn take_later(lent: &Lent, out: &mut OutQueue) -> bool {
    let mut later = lock(&lent.later);
    let deadline = Instant::now() + LINGER;
    loop {
        let Some(q) = later.queue.as_mut() else { return false };
        if !q.is_empty() {
            out.append(q);
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        later.lingering = true;
        later = lent
            .given
            .wait_timeout(later, deadline - now)
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0);
        later.lingering = false;
    }
}

/// Waits until the socket has room (or an error to report), at most `t`.
fn writable_within(fd: BorrowedFd<'_>, t: Duration) -> bool {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
    let ms = libc::c_int::try_from(t.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one live pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    // An interrupted wait is retried by the caller's next write.
    r > 0 || (r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::tests::memfd_with;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    /// Reads `len` bytes from `r` on a thread, after an initial pause so the socket fills.
    fn reader(mut r: UnixStream, len: usize, pause: Duration) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            std::thread::sleep(pause);
            r.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
            let mut got = vec![0u8; len];
            r.read_exact(&mut got).expect("all bytes arrive");
            got
        })
    }

    /// A file holding `len` bytes of a pattern, a socket lent as a connection's would be, and
    /// the socket's other end.
    fn setup(len: usize) -> (Vec<u8>, std::fs::File, std::sync::Arc<Lent>, UnixStream) {
        let data = pattern(len);
        let f = memfd_with(&data);
        let (a, b) = UnixStream::pair().expect("pair");
        a.set_nonblocking(true).expect("nonblocking");
        let lent = std::sync::Arc::new(Lent::new(a.as_fd()).expect("lend"));
        (data, f, lent, b)
    }

    #[test]
    fn sends_what_it_was_given_then_what_the_reactor_queued_in_order() {
        let (data, f, lent, b) = setup(3 << 20);
        let mut out = OutQueue::default();
        out.push(b"head".to_vec());
        out.push_file(0, 1 << 20);
        lent.open(&out);
        // What the reactor queues while the worker sends.
        let mut more = OutQueue::default();
        more.push(b"mid".to_vec());
        more.push_file(1 << 20, 2 << 20);
        let total = 4 + 3 + (3 << 20);
        let read = reader(b, total, Duration::from_millis(0));
        let worker = {
            let lent = lent.clone();
            let file = f.try_clone().expect("dup");
            std::thread::spawn(move || {
                let r = send(&lent, &mut out, file.as_fd());
                (r.map_err(|e| e.kind()), out)
            })
        };
        let given = lent.give(&mut more);
        let (r, mut left) = worker.join().expect("worker");
        assert!(r.is_ok(), "{r:?}");
        if given {
            assert!(more.is_empty());
        } else {
            // The worker stopped first: the reactor sends it itself, after the worker's rest.
            left.append(&mut more);
        }
        assert!(!lent.give(&mut OutQueue::default()), "a stopped worker takes nothing more");
        // Whatever the worker left (a full socket) goes out after, as the reactor would send it.
        for _ in 0..1000 {
            if left.is_empty() {
                break;
            }
            lent.open(&left);
            let mut q = std::mem::take(&mut left);
            send(&lent, &mut q, f.as_fd()).expect("send");
            left = q;
        }
        assert!(left.is_empty());
        let got = read.join().expect("reader");
        let mut want = b"head".to_vec();
        want.extend_from_slice(&data[..1 << 20]);
        want.extend_from_slice(b"mid");
        want.extend_from_slice(&data[1 << 20..]);
        assert!(got == want, "bytes out of order or lost");
    }

    #[test]
    fn stops_on_a_socket_nobody_reads_and_keeps_the_rest() {
        let (_data, f, lent, b) = setup(8 << 20);
        let mut out = OutQueue::default();
        out.push_file(0, 8 << 20);
        lent.open(&out);
        let t = Instant::now();
        let blocked = send(&lent, &mut out, f.as_fd()).expect("send");
        assert!(blocked, "8 MiB cannot fit in an unread socket");
        assert!(t.elapsed() < Duration::from_secs(2), "gave up within its wait, took {:?}", t.elapsed());
        let sent = (8 << 20) - out.bytes();
        assert!(sent > 0 && !out.is_empty());
        assert_eq!(lent.backlog(), out.bytes(), "backlog counts what is left");
        drop(b);
    }
}
