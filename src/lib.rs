//! flexnbd: a fast NBD server that can live-migrate the file it serves.
//!
//! Thread model:
//! ```text
//!   reactor thread (mio::Poll)                          disk workers (N threads)
//!   listener -> ACL -> ClientConn state machines  --Job-->  pread / pwrite / fallocate
//!   control listener -> ControlConn sessions              fdatasync / SEEK_DATA|HOLE
//!   signalfd -> drain and exit                    <-Completion + mio::Waker--
//! ```
//! One thread owns every socket and all protocol state. The one exception: a client whose
//! socket stays full while big reads stream out is lent to a worker, which sends its queued
//! replies (sendfile) while the reactor keeps reading its requests (see `sender`). A job
//! carries its connection's `ConnId` so a completion for a closed connection is dropped.

pub mod acl;
pub mod batching;
pub mod budget;
pub mod buffer;
pub mod cli;
pub mod conn;
pub mod deadlines;
pub mod dirty;
pub mod error;
pub mod event_loop;
pub mod export;
pub mod io_pool;
pub mod listener;
pub mod log;
pub mod migration;
pub mod net;
pub mod proto;
pub mod remote;
pub mod sender;
pub mod signals;
pub mod systemd;
pub mod token;
