//! Reuse of request buffers. Fresh buffers cost an allocation and a zero fill (and for big ones
//! page faults) on every request; clients send the same few sizes over and over, so buffers
//! are kept by exact length and handed out again. The pool is bounded and owned by the reactor
//! thread, and emptied when no client is connected so an idle server stays small.

use std::collections::HashMap;

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
}

impl BufPool {
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
        if len < MIN_POOLED || self.bytes + len > MAX_POOLED_BYTES {
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

#[cfg(test)]
mod tests {
    use super::*;

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
