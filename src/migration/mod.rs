//! Migration, both sides: the listen side's bookkeeping is `dest`.

pub mod dest;
