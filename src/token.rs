//! mio Tokens: slab keys are Tokens; fixed sources sit at the top of the range.

use mio::Token;

pub const LISTENER: Token = Token(usize::MAX - 1);
pub const WAKER: Token = Token(usize::MAX - 2);
pub const SIGNAL: Token = Token(usize::MAX - 3);
pub const CONTROL: Token = Token(usize::MAX - 4);
/// Slab keys must stay below this so they never collide with the reserved tokens.
pub const FIRST_RESERVED: usize = usize::MAX - 16;

/// A connection's identity: its slab slot plus a generation, so a completion that arrives after
/// the slot was reused for a new connection is recognised as stale and dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnId {
    pub token: Token,
    pub generation: u64,
}

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "c{}", self.generation)
    }
}
