//! Outgoing byte queues, and reuse of request buffers.
//!
//! Reuse of request buffers. Fresh buffers cost an allocation and a zero fill (and for big ones
//! page faults) on every request; clients send the same few sizes over and over, so buffers
//! are kept by exact length and handed out again. The pool is bounded and owned by the reactor
//! thread, and emptied a few seconds after the last client leaves so an idle server is small.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice, Write};
use std::os::unix::io::{AsRawFd, BorrowedFd, RawFd};

/// Smallest buffer worth keeping (reply headers and such are cheaper to allocate).
const MIN_POOLED: usize = 4096;
/// Most bytes kept in the pool.
const MAX_POOLED_BYTES: usize = 64 << 20;
/// Most buffers kept of one length.
const MAX_PER_LEN: usize = 256;

#[derive(Default)]
pub struct BufPool {
    free: HashMap<usize, Vec<Vec<u8>>>,
    bytes: usize,
    /// Keep only buffers of these lengths (empty: any length).
    only: &'static [usize],
    /// Most bytes kept (0: MAX_POOLED_BYTES).
    limit: usize,
}

impl BufPool {
    /// A pool that keeps at most `limit` bytes of buffers whose length is one of `lengths`.
    pub fn of_lengths(lengths: &'static [usize], limit: usize) -> BufPool {
        BufPool { only: lengths, limit, ..BufPool::default() }
    }

    /// A buffer of exactly `len` bytes; its contents are unspecified (but initialised).
    pub fn take(&mut self, len: usize) -> Vec<u8> {
        if let Some(b) = self.free.get_mut(&len).and_then(Vec::pop) {
            self.bytes -= len;
            return b;
        }
        vec![0u8; len]
    }

    /// Gives a buffer back for reuse (or drops it when the pool is full).
    pub fn give(&mut self, buf: Vec<u8>) {
        let len = buf.len();
        let limit = if self.limit == 0 { MAX_POOLED_BYTES } else { self.limit };
        if len < MIN_POOLED
            || self.bytes + len > limit
            || (!self.only.is_empty() && !self.only.contains(&len))
        {
            return;
        }
        let list = self.free.entry(len).or_default();
        if list.len() < MAX_PER_LEN {
            list.push(buf);
            self.bytes += len;
        }
    }

    /// Frees everything (when the server goes idle).
    pub fn clear(&mut self) {
        self.free = HashMap::new();
        self.bytes = 0;
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Most buffers handed to one writev.
const MAX_IOV: usize = 64;

/// What a socket must offer to send a queue: gathered writes that may say more follows at
/// once, and file ranges sent straight from the page cache.
pub trait Sink: Write {
    /// Like `write_vectored`; `more` asks the kernel to hold a partial segment back because
    /// the next send continues it (a reply header followed by its file data).
    fn send_more(&mut self, iov: &[IoSlice<'_>], more: bool) -> io::Result<usize>;
    /// Sends up to `len` bytes of `file` from `offset` without copying them through us.
    fn send_file(&mut self, file: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<usize>;
}

/// `Sink::send_more` for any socket, by descriptor.
fn sendmsg_more(fd: RawFd, iov: &[IoSlice<'_>], more: bool) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is valid (no address, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is ABI-compatible with iovec; the kernel only reads through these pointers.
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len() as _;
    let flags = libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 };
    // SAFETY: msg points at live iovecs for the duration of the call.
    let n = unsafe { libc::sendmsg(fd, &msg, flags) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// `Sink::send_file` for any socket, by descriptor.
fn sendfile(fd: RawFd, file: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<usize> {
    let mut off = libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: both descriptors are open; `off` is a live off_t the kernel advances.
    let n = unsafe { libc::sendfile(fd, file.as_raw_fd(), &mut off, len) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

macro_rules! socket_sink {
    ($($t:ty),*) => {$(
        impl Sink for $t {
            fn send_more(&mut self, iov: &[IoSlice<'_>], more: bool) -> io::Result<usize> {
                sendmsg_more(self.as_raw_fd(), iov, more)
            }
            fn send_file(&mut self, file: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<usize> {
                sendfile(self.as_raw_fd(), file, offset, len)
            }
        }
    )*};
}
socket_sink!(mio::net::TcpStream, mio::net::UnixStream, SockFd<'_>);

/// A connection's socket as a disk worker sends on it (see `sender`), by descriptor.
pub struct SockFd<'a>(pub BorrowedFd<'a>);

impl AsRawFd for SockFd<'_> {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Write for SockFd<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        sendmsg_more(self.0.as_raw_fd(), &[IoSlice::new(b)], false)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One queued piece of output.
enum Chunk {
    Mem(Vec<u8>),
    /// A range of the served file, sent with sendfile when its turn comes.
    File {
        offset: u64,
        len: usize,
    },
}

impl Chunk {
    fn len(&self) -> usize {
        match self {
            Chunk::Mem(b) => b.len(),
            Chunk::File { len, .. } => *len,
        }
    }
}

/// Output waiting to be written to a socket: buffers go out with (gathered) writes, file
/// ranges with sendfile.
#[derive(Default)]
pub struct OutQueue {
    chunks: VecDeque<Chunk>,
    /// Bytes of the front chunk already written.
    pos: usize,
    bytes: usize,
    /// Bytes of file ranges queued (including any part of the front one already sent).
    file_bytes: usize,
}

impl std::fmt::Debug for OutQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OutQueue({} chunks, {} bytes)", self.chunks.len(), self.bytes())
    }
}

impl OutQueue {
    pub fn push(&mut self, b: Vec<u8>) {
        self.bytes += b.len();
        self.chunks.push_back(Chunk::Mem(b));
    }

    /// Queues `len` bytes of the served file from `offset`; they are read when sent.
    pub fn push_file(&mut self, offset: u64, len: usize) {
        if len > 0 {
            self.bytes += len;
            self.file_bytes += len;
            self.chunks.push_back(Chunk::File { offset, len });
        }
    }

    /// Bytes of file ranges waiting (the part that sendfile sends).
    pub fn file_bytes(&self) -> usize {
        self.file_bytes
    }

    /// Moves everything queued in `later` behind what is queued here.
    pub fn append(&mut self, later: &mut OutQueue) {
        let pos = std::mem::take(&mut later.pos);
        if pos > 0 {
            // Not expected (a queue is handed over whole), but a started front chunk must
            // not be sent again.
            if let Some(front) = later.chunks.front_mut() {
                match front {
                    Chunk::Mem(b) => {
                        b.drain(..pos);
                    }
                    Chunk::File { offset, len } => {
                        *offset += pos as u64;
                        *len -= pos;
                        later.file_bytes -= pos;
                    }
                }
                later.bytes -= pos;
            }
        }
        self.bytes += std::mem::take(&mut later.bytes);
        self.file_bytes += std::mem::take(&mut later.file_bytes);
        self.chunks.append(&mut later.chunks);
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Bytes still to write.
    pub fn bytes(&self) -> usize {
        self.bytes - self.pos
    }

    pub fn clear(&mut self) {
        *self = OutQueue::default();
    }

    /// Writes until the queue is empty (`Ok(false)`) or the socket is full (`Ok(true)`).
    /// Fully written buffers go back to `pool`, if one is given; file chunks are read from
    /// `file`, which must be given if any were queued.
    pub fn write_to(
        &mut self,
        w: &mut impl Sink,
        mut pool: Option<&mut BufPool>,
        file: Option<BorrowedFd<'_>>,
    ) -> io::Result<bool> {
        while let Some(front) = self.chunks.front() {
            let r = match *front {
                Chunk::File { offset, len } => {
                    let file = file.ok_or_else(|| io::Error::other("file data queued without a file"))?;
                    match w.send_file(file, offset + self.pos as u64, len - self.pos) {
                        // The file ended under us: the reply already promised these bytes.
                        Ok(0) => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "served file shrank")),
                        r => r,
                    }
                }
                Chunk::Mem(_) => {
                    let mut iov = [IoSlice::new(&[]); MAX_IOV];
                    let mut n = 0;
                    let mut more = false;
                    for c in self.chunks.iter().take(MAX_IOV) {
                        match c {
                            Chunk::Mem(b) => {
                                iov[n] = IoSlice::new(if n == 0 { &b[self.pos..] } else { b });
                                n += 1;
                            }
                            Chunk::File { .. } => {
                                more = true;
                                break;
                            }
                        }
                    }
                    match w.send_more(&iov[..n], more) {
                        Ok(0) => Err(io::ErrorKind::WriteZero.into()),
                        r => r,
                    }
                }
            };
            match r {
                Ok(k) => self.advance(k, pool.as_deref_mut()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    fn advance(&mut self, mut k: usize, mut pool: Option<&mut BufPool>) {
        while k > 0 {
            let Some(front) = self.chunks.front() else { return };
            let left = front.len() - self.pos;
            if k < left {
                self.pos += k;
                return;
            }
            k -= left;
            self.bytes -= front.len();
            if let Chunk::File { len, .. } = front {
                self.file_bytes -= len;
            }
            self.pos = 0;
            if let (Some(Chunk::Mem(b)), Some(p)) = (self.chunks.pop_front(), pool.as_deref_mut()) {
                p.give(b);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Accepts at most `cap` bytes per call, then reports WouldBlock once.
    struct Trickle {
        got: Vec<u8>,
        cap: usize,
        block_next: bool,
    }

    impl Trickle {
        fn new(cap: usize) -> Trickle {
            Trickle { got: Vec::new(), cap, block_next: false }
        }
    }

    impl Write for Trickle {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            if std::mem::take(&mut self.block_next) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.block_next = true;
            let n = b.len().min(self.cap);
            self.got.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Sink for Trickle {
        fn send_more(&mut self, iov: &[IoSlice<'_>], _more: bool) -> io::Result<usize> {
            self.write_vectored(iov)
        }
        fn send_file(&mut self, file: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<usize> {
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::from(file.try_clone_to_owned()?);
            let mut b = vec![0u8; len.min(self.cap)];
            let n = f.read_at(&mut b, offset)?;
            if n == 0 {
                return Ok(0);
            }
            self.write(&b[..n])
        }
    }

    /// Writes `q` out, socket-full after socket-full, within a bounded number of rounds.
    fn drain(q: &mut OutQueue, w: &mut Trickle, file: Option<BorrowedFd<'_>>) -> io::Result<()> {
        for _ in 0..100 {
            if !q.write_to(w, None, file)? {
                return Ok(());
            }
        }
        panic!("the queue did not drain in 100 rounds");
    }

    pub(crate) fn memfd_with(data: &[u8]) -> std::fs::File {
        use std::os::unix::io::FromRawFd;
        // SAFETY: memfd_create with a static name; the fd is wrapped at once.
        let fd = unsafe { libc::memfd_create(c"flexnbd-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh descriptor we own.
        let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
        f.write_all(data).unwrap();
        f
    }

    #[test]
    fn out_queue_sends_file_ranges_in_order() {
        use std::os::unix::io::AsFd;
        let f = memfd_with(b"0123456789");
        let mut q = OutQueue::default();
        q.push(b"hdr".to_vec());
        q.push_file(2, 5);
        q.push(b"tail".to_vec());
        q.push_file(9, 1);
        assert_eq!(q.bytes(), 13);
        let mut w = Trickle::new(2);
        drain(&mut q, &mut w, Some(f.as_fd())).unwrap();
        assert_eq!(w.got, b"hdr23456tail9");
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn out_queue_reports_a_file_that_shrank() {
        use std::os::unix::io::AsFd;
        let f = memfd_with(b"0123");
        let mut q = OutQueue::default();
        q.push_file(2, 5);
        let mut w = Trickle::new(64);
        let err = drain(&mut q, &mut w, Some(f.as_fd())).err();
        assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::UnexpectedEof));
        assert!(q.write_to(&mut w, None, None).is_err(), "file data without a file is an error");
    }

    #[test]
    fn appended_queues_keep_their_order_and_counts() {
        use std::os::unix::io::AsFd;
        let f = memfd_with(b"0123456789");
        let mut first = OutQueue::default();
        first.push(b"a".to_vec());
        first.push_file(0, 4);
        let mut w = Trickle::new(3);
        assert!(first.write_to(&mut w, None, Some(f.as_fd())).unwrap());
        assert!(first.write_to(&mut w, None, Some(f.as_fd())).unwrap());
        assert_eq!(w.got, b"a012");
        assert_eq!((first.bytes(), first.file_bytes()), (1, 4));
        // A queue partly sent elsewhere: only its unsent part moves.
        let mut later = OutQueue::default();
        later.push_file(6, 4);
        later.push(b"z".to_vec());
        let mut w2 = Trickle::new(3);
        assert!(later.write_to(&mut w2, None, Some(f.as_fd())).unwrap());
        assert_eq!(w2.got, b"678");
        first.append(&mut later);
        assert!(later.is_empty());
        assert_eq!((later.bytes(), later.file_bytes()), (0, 0));
        assert_eq!((first.bytes(), first.file_bytes()), (3, 5));
        drain(&mut first, &mut w, Some(f.as_fd())).unwrap();
        assert_eq!(w.got, b"a01239z");
        assert_eq!((first.bytes(), first.file_bytes()), (0, 0));
    }

    #[test]
    fn out_queue_survives_partial_writes() {
        let mut q = OutQueue::default();
        q.push(b"hello ".to_vec());
        q.push(b"wide ".to_vec());
        q.push(b"world".to_vec());
        let mut w = Trickle::new(4);
        drain(&mut q, &mut w, None).unwrap();
        assert_eq!(w.got, b"hello wide world");
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn reuses_by_exact_length_and_stays_bounded() {
        let mut p = BufPool::default();
        let mut b = p.take(8192);
        b[0] = 7;
        p.give(b);
        assert_eq!(p.bytes(), 8192);
        assert_eq!(p.take(8192)[0], 7, "the same buffer comes back");
        assert_eq!(p.bytes(), 0);
        p.give(vec![0; 16]);
        assert_eq!(p.bytes(), 0, "small buffers are not kept");
        for _ in 0..(MAX_PER_LEN + 10) {
            p.give(vec![0; 4096]);
        }
        assert_eq!(p.bytes(), MAX_PER_LEN * 4096);
        p.clear();
        assert_eq!(p.bytes(), 0);
    }
}
