//! Dirty-range bitmap for migration: which parts of the export changed since they were sent.
//! Fixed granularity keeps memory bounded (1 bit per 64 KiB: 2 MiB of bitmap per TiB).

pub const GRAIN: u64 = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyMap {
    words: Vec<u64>,
    size: u64,
    count: u64,
}

impl DirtyMap {
    pub fn new(size: u64) -> DirtyMap {
        let bits = size.div_ceil(GRAIN);
        DirtyMap { words: vec![0; bits.div_ceil(64) as usize], size, count: 0 }
    }

    /// Marks every grain touching [off, off+len).
    pub fn mark(&mut self, off: u64, len: u64) {
        if len == 0 || off >= self.size {
            return;
        }
        let end = off.saturating_add(len).min(self.size);
        for bit in off / GRAIN..end.div_ceil(GRAIN) {
            let (w, b) = ((bit / 64) as usize, bit % 64);
            if self.words[w] & (1 << b) == 0 {
                self.words[w] |= 1 << b;
                self.count += 1;
            }
        }
    }

    /// Bytes covered by dirty grains (the last grain is clipped to the export size).
    pub fn dirty_bytes(&self) -> u64 {
        let mut bytes = self.count * GRAIN;
        let last = self.size.div_ceil(GRAIN).saturating_sub(1);
        if self.is_set(last) {
            bytes -= last * GRAIN + GRAIN - self.size;
        }
        bytes
    }

    /// Adds every grain dirty in `other` (same export size).
    pub fn merge(&mut self, other: &DirtyMap) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            self.count += u64::from((*o & !*w).count_ones());
            *w |= *o;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn is_set(&self, bit: u64) -> bool {
        self.words.get((bit / 64) as usize).is_some_and(|w| w & (1 << (bit % 64)) != 0)
    }

    /// Removes and returns the first dirty run, at most `max` bytes long (max >= GRAIN).
    pub fn take(&mut self, max: u64) -> Option<(u64, u64)> {
        let w = self.words.iter().position(|&w| w != 0)?;
        let first = w as u64 * 64 + u64::from(self.words[w].trailing_zeros());
        let nbits = self.size.div_ceil(GRAIN);
        let mut bit = first;
        while bit < nbits && self.is_set(bit) && (bit - first + 1) * GRAIN <= max.max(GRAIN) {
            self.words[(bit / 64) as usize] &= !(1 << (bit % 64));
            self.count -= 1;
            bit += 1;
        }
        let off = first * GRAIN;
        let end = (bit * GRAIN).min(self.size);
        Some((off, end - off))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_take_and_count() {
        let mut d = DirtyMap::new(10 * GRAIN + 100);
        assert!(d.take(GRAIN).is_none());
        d.mark(GRAIN + 5, 1);
        d.mark(2 * GRAIN, GRAIN * 2);
        assert_eq!(d.dirty_bytes(), 3 * GRAIN);
        assert_eq!(d.take(2 * GRAIN), Some((GRAIN, 2 * GRAIN)));
        assert_eq!(d.take(8 * GRAIN), Some((3 * GRAIN, GRAIN)));
        assert!(d.is_empty());
        d.mark(10 * GRAIN, 1);
        assert_eq!(d.dirty_bytes(), 100);
        assert_eq!(d.take(GRAIN), Some((10 * GRAIN, 100)));
    }

    #[test]
    fn merge_counts_each_grain_once() {
        let mut a = DirtyMap::new(8 * GRAIN);
        let mut b = DirtyMap::new(8 * GRAIN);
        a.mark(0, 2 * GRAIN);
        b.mark(GRAIN, 2 * GRAIN);
        a.merge(&b);
        assert_eq!(a.dirty_bytes(), 3 * GRAIN);
        assert_eq!(a.take(8 * GRAIN), Some((0, 3 * GRAIN)));
    }

    #[test]
    fn out_of_range_and_overflow_are_clipped() {
        let mut d = DirtyMap::new(GRAIN);
        d.mark(u64::MAX - 1, 10);
        d.mark(0, u64::MAX);
        assert_eq!(d.dirty_bytes(), GRAIN);
        assert_eq!(d.take(1), Some((0, GRAIN)));
    }
}
