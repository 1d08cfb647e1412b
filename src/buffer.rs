//! Outgoing byte queues, and reuse of request buffers.
//!
//! Reuse of request buffers. Fresh buffers cost an allocation and a zero fill (and for big ones
//! page faults) on every request; clients send the same few sizes over and over, so buffers
//! are kept by exact length and handed out again. The pool is bounded and owned by the reactor
//! thread, and emptied when no client is connected so an idle server stays small.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice, Write};

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

/// Buffers waiting to be written to a socket, sent with writev.
#[derive(Default)]
pub struct OutQueue {
    bufs: VecDeque<Vec<u8>>,
    /// Bytes of the front buffer already written.
    pos: usize,
    bytes: usize,
}

impl OutQueue {
    pub fn push(&mut self, b: Vec<u8>) {
        self.bytes += b.len();
        self.bufs.push_back(b);
    }

    pub fn is_empty(&self) -> bool {
        self.bufs.is_empty()
    }

    /// Bytes still to write.
    pub fn bytes(&self) -> usize {
        self.bytes - self.pos
    }

    pub fn clear(&mut self) {
        *self = OutQueue::default();
    }

    /// Writes until the queue is empty (`Ok(false)`) or the socket is full (`Ok(true)`).
    /// Fully written buffers go back to `pool`, if one is given.
    pub fn write_to(&mut self, w: &mut impl Write, mut pool: Option<&mut BufPool>) -> io::Result<bool> {
        while !self.bufs.is_empty() {
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let mut n = 0;
            for (i, b) in self.bufs.iter().take(MAX_IOV).enumerate() {
                iov[i] = IoSlice::new(if i == 0 { &b[self.pos..] } else { b });
                n += 1;
            }
            match w.write_vectored(&iov[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
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
            let Some(front) = self.bufs.front() else { return };
            let left = front.len() - self.pos;
            if k < left {
                self.pos += k;
                return;
            }
            k -= left;
            self.bytes -= front.len();
            self.pos = 0;
            if let (Some(b), Some(p)) = (self.bufs.pop_front(), pool.as_deref_mut()) {
                p.give(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepts at most `cap` bytes per call, then reports WouldBlock once.
    struct Trickle {
        got: Vec<u8>,
        cap: usize,
        block_next: bool,
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

    #[test]
    fn out_queue_survives_partial_writes() {
        let mut q = OutQueue::default();
        q.push(b"hello ".to_vec());
        q.push(b"wide ".to_vec());
        q.push(b"world".to_vec());
        let mut w = Trickle { got: Vec::new(), cap: 4, block_next: false };
        let mut rounds = 0;
        while q.write_to(&mut w, None).unwrap() {
            rounds += 1;
            assert!(rounds < 100);
        }
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
