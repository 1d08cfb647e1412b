//! Per-connection state machines driven by the reactor, and what they share with it.

pub mod client;
pub mod control;
pub mod mirror;
pub mod sim;

use crate::acl::Acl;
use crate::export::Export;
use crate::io_pool::Job;
use std::sync::Arc;

/// Size of the reactor's one read buffer, shared by every connection (single-threaded).
pub const SHARED_READ_BUF: usize = 256 * 1024;

/// Fixed facts about how this server serves.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub oldstyle: bool,
    pub read_only: bool,
    /// `listen` mode: the destination of a migration (`has_control=false`).
    pub listen: bool,
    /// Per-connection cap on bytes read but not yet answered (backpressure threshold).
    pub max_in_flight_bytes: usize,
    pub max_in_flight_reqs: usize,
    /// Random id of this process: seeds the resume token a `listen` server gives migration
    /// senders (`Lineage`) and tells this process's migrations apart from any other's.
    pub instance_id: u64,
    /// Advertise CAN_MULTI_CONN (`--multi-conn`, resolved against the CPU count at startup).
    pub multi_conn: bool,
}

/// What the reactor lends a connection while it handles an event.
pub struct Ctx<'a> {
    pub export: &'a Arc<Export>,
    pub pool: &'a dyn Submit,
    pub cfg: &'a ServeConfig,
    pub acl: &'a Acl,
    pub registry: &'a mio::Registry,
    /// The shared read buffer (taken out of the reactor for the duration of a call).
    pub sbuf: &'a mut Vec<u8>,
    /// Set by a connection that declared itself a migration sender and completed cleanly.
    pub migration_done: &'a mut bool,
    /// Migration freeze: no client request is read until the handover or a failure.
    pub frozen: bool,
    /// Client write-type jobs (WRITE, TRIM, WRITE_ZEROES) submitted and not yet completed.
    pub writes_in_flight: &'a mut usize,
    /// Client requests received (counted for the mirror, which yields to busy clients).
    pub requests: &'a mut u64,
    /// A connection that just declared itself the migration sender (listen mode).
    pub new_sender: &'a mut Option<crate::token::ConnId>,
    /// Request buffers for reuse.
    pub bufs: &'a mut crate::buffer::BufPool,
    /// When small reads and writes may run on the reactor thread itself.
    pub inline: &'a mut InlineIo,
    /// Jobs run inline; the reactor handles them exactly like the pool's completions.
    pub inline_done: &'a mut Vec<crate::io_pool::Completion>,
    /// What a `listen` server tells migration senders about its file (see `Lineage`).
    pub lineage: &'a mut crate::migration::dest::Lineage,
    /// Memory for WRITE payloads, shared by every client.
    pub budget: &'a mut crate::budget::PayloadBudget,
}

/// Small buffered writes (and, where RWF_NOWAIT reads are unsupported, small reads) usually
/// complete in the page cache in microseconds, far less than the two thread wake-ups a trip
/// through the pool costs, so they run on the reactor. ext4 and tmpfs have no non-blocking
/// buffered writes (RWF_NOWAIT fails with EOPNOTSUPP), so an operation that does stall
/// (writeback throttling, a slow disk) would hold up every connection: when inline operations
/// stall, everything goes through the pool again for a while.
///
/// One slow operation is not a stall: on a busy machine the scheduler preempts the reactor
/// now and then, and a preemption that lands inside a 4 KiB pread makes it "take" several
/// milliseconds (seen on 2 cores under fio at depth 32, several times in a few seconds).
/// Pausing for each of those sent most of a run through the pool. A stalling disk or
/// writeback throttling slows operations in runs, so a second slow one close behind the
/// first pauses, as does one slow beyond any preemption.
#[derive(Debug, Default)]
pub struct InlineIo {
    paused_until: Option<std::time::Instant>,
    /// Inline operations timed so far, and that count at the last slow one.
    done: u64,
    last_slow: Option<u64>,
}

impl InlineIo {
    /// Largest read or write done inline.
    pub const MAX: usize = 64 * 1024;
    /// An inline operation slower than this is slow...
    const SLOW: std::time::Duration = std::time::Duration::from_millis(1);
    /// ...and a second slow one within this many operations sends everything to the pool...
    const RUN: u64 = 64;
    /// ...as does a single one this slow...
    const STALL: std::time::Duration = std::time::Duration::from_millis(50);
    /// ...for this long.
    const PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

    pub fn allows(&mut self, job: &Job) -> bool {
        let small = match job.op {
            crate::io_pool::Op::Write { fua: false, .. } => job.buf.len() <= Self::MAX,
            crate::io_pool::Op::Read { len, .. } => len <= Self::MAX,
            _ => false,
        };
        if !small {
            return false;
        }
        match self.paused_until {
            Some(t) if std::time::Instant::now() < t => false,
            _ => {
                self.paused_until = None;
                true
            }
        }
    }

    pub fn took(&mut self, d: std::time::Duration) {
        self.done += 1;
        if d <= Self::SLOW {
            return;
        }
        let again = self.last_slow.is_some_and(|n| self.done - n <= Self::RUN);
        self.last_slow = Some(self.done);
        if again || d >= Self::STALL {
            log::info!("inline I/O took {d:?}; using the disk workers for {:?}", Self::PAUSE);
            self.paused_until = Some(std::time::Instant::now() + Self::PAUSE);
            self.last_slow = None;
        }
    }
}

/// A byte stream a connection can be driven over.
pub trait Stream: std::io::Read + crate::buffer::Sink + mio::event::Source + std::os::fd::AsFd {}
impl<T: std::io::Read + crate::buffer::Sink + mio::event::Source + std::os::fd::AsFd> Stream for T {}

/// Where connections send disk jobs: the worker pool, or (in the stateful fuzz target) a queue
/// the harness runs itself.
pub trait Submit {
    fn submit(&self, job: Job);
    /// Whether a worker may take on a client's sending (see `sender`) now.
    fn may_lend(&self) -> bool;
}

impl Submit for crate::io_pool::IoPool {
    fn submit(&self, job: Job) {
        crate::io_pool::IoPool::submit(self, job)
    }
    fn may_lend(&self) -> bool {
        crate::io_pool::IoPool::may_lend(self)
    }
}

/// What a handler tells its owner to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Continue,
    Close,
}

#[cfg(test)]
mod tests {
    use super::InlineIo;
    use crate::io_pool::{Job, Op};
    use crate::token::ConnId;
    use std::time::Duration;

    fn small_write() -> Job {
        Job {
            conn: ConnId { token: mio::Token(0), generation: 0 },
            cookie: 0,
            op: Op::Write { offset: 0, fua: false },
            buf: vec![0; 4096],
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn one_slow_inline_operation_is_taken_for_a_preemption() {
        let mut io = InlineIo::default();
        io.took(ms(9));
        assert!(io.allows(&small_write()), "one slow operation alone pauses nothing");
        for _ in 0..InlineIo::RUN {
            io.took(Duration::from_micros(5));
        }
        io.took(ms(9));
        assert!(io.allows(&small_write()), "slow ones far apart are preemptions, not a stall");
    }

    #[test]
    fn slow_inline_operations_in_a_run_send_work_to_the_pool() {
        let mut io = InlineIo::default();
        io.took(ms(2));
        io.took(Duration::from_micros(5));
        io.took(ms(2));
        assert!(!io.allows(&small_write()), "a second slow one close behind pauses inline I/O");
    }

    #[test]
    fn one_very_slow_inline_operation_is_a_stall() {
        let mut io = InlineIo::default();
        io.took(InlineIo::STALL);
        assert!(!io.allows(&small_write()));
    }
}
