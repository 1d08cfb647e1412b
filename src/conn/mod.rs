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
    /// A connection that just declared itself the migration sender (listen mode).
    pub new_sender: &'a mut Option<crate::token::ConnId>,
}

/// A byte stream a connection can be driven over.
pub trait Stream: std::io::Read + std::io::Write + mio::event::Source {}
impl<T: std::io::Read + std::io::Write + mio::event::Source> Stream for T {}

/// Where connections send disk jobs: the worker pool, or (in the stateful fuzz target) a queue
/// the harness runs itself.
pub trait Submit {
    fn submit(&self, job: Job);
}

impl Submit for crate::io_pool::IoPool {
    fn submit(&self, job: Job) {
        crate::io_pool::IoPool::submit(self, job)
    }
}

/// What a handler tells its owner to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Continue,
    Close,
}
