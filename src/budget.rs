//! One memory budget for the WRITE payloads every client has sent and we have not yet written.
//!
//! Each connection's cap (64 MiB in flight) bounds one client, but nothing bounded the sum: 50
//! clients that each sent 31 MiB of a 32 MiB WRITE and stopped held 1.5 GiB. Now a WRITE's
//! payload is read only once its whole length is reserved here; the reservation goes back when
//! the write's disk job completes, or when its connection closes before the payload is whole.
//!
//! A client whose reservation does not fit waits at the header, leaving the payload in its
//! socket (the kernel's memory, bounded by the socket buffers). Granting whole payloads keeps the
//! budget deadlock-free: every reserved payload can be completed by its own client alone.
//!
//! Stalled clients cannot starve the rest: every client may hold up to `FLOOR` bytes outside the
//! budget, so small writes go on however much big, stalled ones have reserved, and a client
//! stalled mid-payload is closed after the stall limit (see `deadlines`), which frees its share.
//! So the payload memory is at most `limit + FLOOR * clients`, plus one payload bigger than the
//! whole budget, which is let in when nothing else is reserved (else it could never run), plus
//! what was read together with a waiting header (kept in the connection's `carry`, at most the
//! shared read buffer's 256 KiB).

use crate::token::ConnId;
use std::fmt;

/// What a client may hold whatever the budget says: a 64 KiB write (a typical small request)
/// always gets through.
pub const FLOOR: usize = 64 * 1024;
/// The default budget: 256 MiB, or a quarter of the RAM on smaller hosts.
pub const DEFAULT_MAX: usize = 256 << 20;

#[derive(Debug)]
pub struct PayloadBudget {
    limit: usize,
    /// What every client may hold whatever the budget says (FLOOR but in simulations).
    floor: usize,
    held: usize,
    /// Clients waiting for room, to be tried again once some is freed.
    waiters: Vec<ConnId>,
}

impl PayloadBudget {
    pub fn new(limit: usize) -> PayloadBudget {
        PayloadBudget::with_floor(limit, FLOOR)
    }

    /// A budget with another floor: the simulated session uses a tiny one, so that the fuzzer
    /// reaches a waiting write with inputs of a few KiB.
    pub fn with_floor(limit: usize, floor: usize) -> PayloadBudget {
        PayloadBudget { limit, floor, held: 0, waiters: Vec::new() }
    }

    /// Whether a client that already holds `mine` may reserve `len` more now.
    pub fn fits(&self, mine: usize, len: usize) -> bool {
        self.held.saturating_add(len) <= self.limit
            || self.held == 0
            || mine.saturating_add(len) <= self.floor
    }

    /// Takes `len` bytes (the caller checked `fits`).
    pub fn reserve(&mut self, len: usize) {
        self.held += len;
    }

    /// A client found no room: it is tried again once some is freed.
    pub fn wait(&mut self, id: ConnId) {
        self.waiters.push(id);
    }

    pub fn release(&mut self, len: usize) {
        debug_assert!(len <= self.held, "released {len} of {} held", self.held);
        self.held = self.held.saturating_sub(len);
    }

    /// The waiting clients, once there is room: each either fits now or waits again.
    pub fn take_waiters(&mut self) -> Vec<ConnId> {
        if self.waiters.is_empty() || self.held >= self.limit {
            return Vec::new();
        }
        std::mem::take(&mut self.waiters)
    }

    pub fn held(&self) -> usize {
        self.held
    }

    pub fn limit(&self) -> usize {
        self.limit
    }
}

/// The default budget for a host with `ram` bytes of memory.
pub fn default_limit(ram: Option<u64>) -> usize {
    match ram {
        Some(r) => DEFAULT_MAX.min(usize::try_from(r / 4).unwrap_or(usize::MAX)),
        None => DEFAULT_MAX,
    }
}

/// Physical memory of this host, if the system says.
pub fn host_ram() -> Option<u64> {
    // SAFETY: sysconf has no memory effects.
    let (pages, size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    (pages > 0 && size > 0).then(|| (pages as u64).saturating_mul(size as u64))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadSize(pub String);

impl fmt::Display for BadSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} is not a size: give a number of bytes, optionally followed by K, M or G (powers of 1024), e.g. 256M",
            self.0
        )
    }
}

impl std::error::Error for BadSize {}

/// A byte count as given on the command line: `1048576`, `1024K`, `256M`, `1G`. Zero is refused
/// (no budget at all would refuse every write).
pub fn parse_size(s: &str) -> Result<usize, BadSize> {
    let bad = || BadSize(s.to_string());
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 10),
        Some((i, 'm' | 'M')) => (&t[..i], 20),
        Some((i, 'g' | 'G')) => (&t[..i], 30),
        _ => (t, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: usize = digits.parse().map_err(|_| bad())?;
    let v = n.checked_mul(1usize << shift).ok_or_else(bad)?;
    if v == 0 {
        return Err(bad());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    fn take(b: &mut PayloadBudget, mine: usize, len: usize) -> bool {
        let ok = b.fits(mine, len);
        if ok {
            b.reserve(len);
        } else {
            b.wait(ConnId { token: mio::Token(0), generation: 7 });
        }
        ok
    }

    #[test]
    fn whole_payloads_are_granted_while_they_fit() {
        let mut b = PayloadBudget::new(64 * MIB);
        assert!(take(&mut b, 0, 32 * MIB));
        assert!(take(&mut b, 0, 32 * MIB));
        assert!(!take(&mut b, 0, 32 * MIB), "a third 32 MiB payload does not fit in 64 MiB");
        assert!(b.take_waiters().is_empty(), "nothing was freed yet");
        b.release(32 * MIB);
        assert_eq!(b.take_waiters().len(), 1, "room freed while a client waited");
        assert!(b.take_waiters().is_empty(), "one wake-up per wait");
        assert!(take(&mut b, 0, 32 * MIB));
        assert_eq!(b.held(), 64 * MIB);
    }

    #[test]
    fn small_writes_pass_a_full_budget_up_to_the_floor() {
        let mut b = PayloadBudget::new(64 * MIB);
        assert!(take(&mut b, 0, 64 * MIB));
        assert!(take(&mut b, 0, 4096), "a fresh client's 4 KiB write");
        assert!(take(&mut b, 4096, FLOOR - 4096), "up to the floor");
        assert!(!take(&mut b, FLOOR, 1), "not beyond it");
    }

    #[test]
    fn a_payload_bigger_than_the_budget_runs_alone() {
        let mut b = PayloadBudget::new(MIB);
        assert!(take(&mut b, 0, 32 * MIB), "nothing else held: let it in, or it never runs");
        assert!(!take(&mut b, 0, 2 * MIB));
        b.release(32 * MIB);
        assert_eq!(b.held(), 0);
    }

    #[test]
    fn default_is_256_mib_or_a_quarter_of_ram() {
        assert_eq!(default_limit(None), DEFAULT_MAX);
        assert_eq!(default_limit(Some(64 << 30)), DEFAULT_MAX);
        assert_eq!(default_limit(Some(512 << 20)), 128 << 20);
    }

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("256m"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        for bad in ["", "0", "M", "-1", "1.5G", "12Q", "99999999999999999999G", " "] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_size("x").unwrap_err().to_string().contains("256M"));
    }
}
