//! Migration, both sides, without I/O: the reactor feeds events in and carries out the actions
//! that come back (see docs/ARCHITECTURE.md).
//!
//! - `source`: the outbound session of `serve` (passes over the dirty map, checkpoints, the
//!   freeze, the handover, retries and resuming).
//! - `dest`: what a `listen` server keeps about its migration senders (the resume token, who
//!   may write, when the migration is complete).
//! - `sim`: a deterministic simulation of both, with clients, a network and disks that fail.

pub mod dest;
pub mod sim;
pub mod source;

use crate::export::Extent;
use std::io;

/// What the reactor tells a migration source. Time comes with every call, never from the
/// clock, so a simulation can run it in virtual time.
#[derive(Debug)]
pub enum Event<'a> {
    /// A timer may have expired (see `Source::deadline`).
    Tick,
    /// The connection asked for with `Action::Connect` is up.
    Connected,
    /// It could not be made (refused, unreachable, timed out in the kernel).
    ConnectFailed(String),
    /// Bytes from the destination. A read that also saw the end delivers the bytes first.
    Received(&'a [u8]),
    /// The destination closed the connection.
    Closed,
    /// The connection failed (a send or receive error).
    Broken(String),
    /// Everything sent so far has been written to the socket.
    Drained,
    /// A read asked for with `Action::Read` finished: `buf` holds its data extents.
    ReadDone { attempt: u32, offset: u64, len: usize, result: io::Result<Vec<Extent>>, buf: Vec<u8> },
    /// A client's write, trim or zero finished on the source's disk, before it is acknowledged.
    /// If the source answers `Action::Delay(ticket)`, the acknowledgement waits for
    /// `Action::Ack(ticket)` (active mirroring).
    ClientWrote { offset: u64, len: u64, what: Written<'a>, ticket: u64 },
    /// No client write is in flight (sent after `Action::Hold` once that is so).
    ClientWritesIdle,
    /// Clients sent requests since the last event: they are at work.
    ClientsBusy,
    /// `mirror-speed`: a new limit in bytes per second (0 or u64::MAX: none).
    MaxBps(u64),
}

/// What a migration source asks the reactor to do, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Connect to the destination (its address is the reactor's).
    Connect,
    /// Queue bytes for the destination.
    Send(Vec<u8>),
    /// Read this range of the export with its extents; answer with `Event::ReadDone`.
    Read { attempt: u32, offset: u64, len: usize },
    /// A buffer the source no longer needs.
    Recycle(Vec<u8>),
    /// Close the connection (the attempt is over).
    Disconnect,
    /// Stop reading client requests: the freeze begins.
    Hold,
    /// Clients may go on (a freeze was abandoned or the attempt failed).
    Release,
    /// Hold back the acknowledgement of the client write with this ticket...
    Delay(u64),
    /// ...until now.
    Ack(u64),
    /// Sizes matched with a first destination: "Migration started".
    Started,
    /// The migration is over without a handover; the text is for whoever waits on it.
    GaveUp(String),
    /// Everything is on the destination, durable, and the goodbye is on the wire.
    HandedOver,
}

/// What a finished client write left in its range.
#[derive(Debug, Clone, Copy)]
pub enum Written<'a> {
    /// These bytes (a WRITE).
    Data(&'a [u8]),
    /// Zeros (WRITE_ZEROES, TRIM).
    Zeroes,
    /// Not known (the write failed part way): only a later pass can copy it.
    Unknown,
}

/// How client writes reach the destination while a migration runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Background passes, switching to active once passes stop shrinking.
    #[default]
    Auto,
    /// Background passes only: writes are marked dirty and sent by a later pass.
    Background,
    /// From the start, each client write is also sent to the destination, and acknowledged
    /// once the destination has it (durably, by FUA).
    Active,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "auto" => Some(Mode::Auto),
            "background" => Some(Mode::Background),
            "active" => Some(Mode::Active),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Background => "background",
            Mode::Active => "active",
        }
    }
}
