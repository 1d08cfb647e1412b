//! Dirty-range bitmap for migration: which parts of the export changed since they were sent.
//!
//! The grain is as fine as memory allows: 4 KiB (a client's usual write) up to 64 GiB exports,
//! then doubled so the bitmap never exceeds 2 MiB (2^24 bits). A coarse grain turns each small
//! random write into a large re-send, which is what makes passes converge slowly under load.

/// Finest grain: one block of the export's preferred size.
pub const MIN_GRAIN: u64 = 4096;
/// Most bits a map holds.
const MAX_BITS: u64 = 1 << 24;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyMap {
    words: Vec<u64>,
    size: u64,
    grain: u64,
    count: u64,
    /// No dirty bit lies in a word before this one.
    first_word: usize,
}

impl DirtyMap {
    pub fn new(size: u64) -> DirtyMap {
        let grain = size.div_ceil(MAX_BITS).next_power_of_two().max(MIN_GRAIN);
        let bits = size.div_ceil(grain);
        DirtyMap { words: vec![0; bits.div_ceil(64) as usize], size, grain, count: 0, first_word: 0 }
    }

    /// Marks every grain touching [off, off+len).
    pub fn mark(&mut self, off: u64, len: u64) {
        if len == 0 || off >= self.size {
            return;
        }
        let end = off.saturating_add(len).min(self.size);
        let first = off / self.grain;
        self.first_word = self.first_word.min((first / 64) as usize);
        for bit in first..end.div_ceil(self.grain) {
            let (w, b) = ((bit / 64) as usize, bit % 64);
            if self.words[w] & (1 << b) == 0 {
                self.words[w] |= 1 << b;
                self.count += 1;
            }
        }
    }

    /// Bytes covered by dirty grains (the last grain is clipped to the export size).
    pub fn dirty_bytes(&self) -> u64 {
        let mut bytes = self.count * self.grain;
        let last = self.size.div_ceil(self.grain).saturating_sub(1);
        if self.is_set(last) {
            bytes -= last * self.grain + self.grain - self.size;
        }
        bytes
    }

    /// Adds every grain dirty in `other` (same export size, so the same grain).
    pub fn merge(&mut self, other: &DirtyMap) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            self.count += u64::from((*o & !*w).count_ones());
            *w |= *o;
        }
        self.first_word = self.first_word.min(other.first_word);
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn is_set(&self, bit: u64) -> bool {
        self.words.get((bit / 64) as usize).is_some_and(|w| w & (1 << (bit % 64)) != 0)
    }

    /// Removes and returns the first dirty run, at most `max` bytes long (or one grain).
    pub fn take(&mut self, max: u64) -> Option<(u64, u64)> {
        let g = self.grain;
        let w = self.first_word + self.words.get(self.first_word..)?.iter().position(|&w| w != 0)?;
        self.first_word = w;
        let first = w as u64 * 64 + u64::from(self.words[w].trailing_zeros());
        let nbits = self.size.div_ceil(g);
        let mut bit = first;
        while bit < nbits && self.is_set(bit) && (bit - first + 1) * g <= max.max(g) {
            self.words[(bit / 64) as usize] &= !(1 << (bit % 64));
            self.count -= 1;
            bit += 1;
        }
        let off = first * g;
        let end = (bit * g).min(self.size);
        Some((off, end - off))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRAIN: u64 = MIN_GRAIN;

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
    fn grain_grows_only_past_64_gib() {
        assert_eq!(DirtyMap::new(1000).grain, 4096);
        assert_eq!(DirtyMap::new(64 << 30).grain, 4096);
        assert_eq!(DirtyMap::new((64 << 30) + 1).grain, 8192);
        let big = DirtyMap::new(1 << 40);
        assert_eq!(big.grain, 64 * 1024);
        assert!(big.words.len() * 8 <= 2 << 20);
    }

    #[test]
    fn take_after_mark_before_the_scan_hint() {
        let mut d = DirtyMap::new(1000 * GRAIN);
        d.mark(900 * GRAIN, 1);
        assert_eq!(d.take(GRAIN), Some((900 * GRAIN, GRAIN)));
        assert!(d.take(GRAIN).is_none());
        d.mark(3 * GRAIN, 1);
        assert_eq!(d.take(GRAIN), Some((3 * GRAIN, GRAIN)));
        let mut e = DirtyMap::new(1000 * GRAIN);
        e.mark(0, 1);
        d.merge(&e);
        assert_eq!(d.take(GRAIN), Some((0, GRAIN)));
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
