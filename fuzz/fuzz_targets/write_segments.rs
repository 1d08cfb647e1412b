//! export::segments, which splits a WRITE into data runs and whole zero blocks to punch.
//!
//! Input layout (so that small inputs describe big, mostly-zero writes): bytes 0..8 = the write
//! offset (u64 BE), bytes 8..10 = length (u16 BE, so up to 64 KiB - 1), then (u16 BE position,
//! u8 value) patches applied to an all-zero buffer of that length. Also checks export::is_zero
//! against a byte loop on the raw input.
#![no_main]

use flexnbd::export::{ZERO_BLOCK, is_zero, segments};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|buf: &[u8]| {
    assert_eq!(is_zero(buf), buf.iter().all(|&b| b == 0));
    if buf.len() < 10 {
        return;
    }
    let off = u64::from_be_bytes(buf[..8].try_into().unwrap());
    let len = u16::from_be_bytes([buf[8], buf[9]]) as usize;
    let mut data = vec![0u8; len];
    if len > 0 {
        for p in buf[10..].chunks_exact(3) {
            let at = u16::from_be_bytes([p[0], p[1]]) as usize % len;
            data[at] = p[2];
        }
    }

    let segs = segments(&data, off);
    let block = ZERO_BLOCK as usize;
    let mut pos = 0;
    let mut prev_zero: Option<bool> = None;
    for &(s, e, zero) in &segs {
        assert_eq!(s, pos, "segments not contiguous: {segs:?}");
        assert!(e > s, "empty segment: {segs:?}");
        assert_ne!(prev_zero, Some(zero), "adjacent segments of one kind not merged: {segs:?}");
        if zero {
            assert_eq!((off % ZERO_BLOCK + s as u64) % ZERO_BLOCK, 0, "zero run misaligned: {segs:?}");
            assert_eq!((e - s) % block, 0, "zero run not whole blocks: {segs:?}");
            assert!(data[s..e].iter().all(|&b| b == 0), "zero run has data: {segs:?}");
        } else {
            // A data run holds no aligned, whole, all-zero block (those must be punched).
            let first = s + ((ZERO_BLOCK - (off % ZERO_BLOCK + s as u64) % ZERO_BLOCK) % ZERO_BLOCK) as usize;
            let mut b = first;
            while b + block <= e {
                assert!(
                    !data[b..b + block].iter().all(|&x| x == 0),
                    "zero block at {b} left in data: {segs:?}"
                );
                b += block;
            }
        }
        prev_zero = Some(zero);
        pos = e;
    }
    assert_eq!(pos, len, "segments do not cover 0..{len}: {segs:?}");
    assert_eq!(segs.is_empty(), len == 0);
});
