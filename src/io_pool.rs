//! Disk worker threads. The reactor submits `Job`s; workers run them against the export and
//! push `Completion`s back, waking the reactor through the mio Waker only when the completion
//! queue goes from empty to non-empty (one wake per drain, not per job).

use crate::buffer::OutQueue;
use crate::export::{Export, Extent};
use crate::sender::Lent;
use crate::token::ConnId;
use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

#[derive(Debug)]
pub enum Op {
    /// Read `len` bytes into `buf[at..at+len]` (the reply header lives in front of it).
    Read {
        offset: u64,
        at: usize,
        len: usize,
    },
    /// Write all of `buf`.
    Write {
        offset: u64,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Zero {
        offset: u64,
        len: u64,
        no_hole: bool,
        fast: bool,
        fua: bool,
    },
    Cache {
        offset: u64,
        len: u64,
    },
    Extents {
        offset: u64,
        len: u32,
        max: usize,
    },
    /// Mirror read: the range's extents, with only the data extents read into `buf`.
    ReadSparse {
        offset: u64,
        len: usize,
    },
    /// Send a client's queued replies on its socket (see `sender`); what is left comes back
    /// in `out`, and `blocked` says whether the socket was full.
    Send {
        out: OutQueue,
        lent: Arc<Lent>,
        blocked: bool,
    },
}

impl Op {
    /// Whether this op changes the file (and so must be counted and mirrored).
    pub fn modifies(&self) -> bool {
        matches!(self, Op::Write { .. } | Op::Trim { .. } | Op::Zero { .. })
    }
}

#[derive(Debug)]
pub struct Job {
    pub conn: ConnId,
    pub cookie: u64,
    pub op: Op,
    pub buf: Vec<u8>,
}

#[derive(Debug)]
pub struct Completion {
    pub job: Job,
    pub result: io::Result<Vec<Extent>>,
}

impl Completion {
    /// The error of a job that failed to change the file (write, trim, zero, flush). A fast
    /// zero refused with ENOTSUP is an answer, not a failure.
    pub fn failed_write(&self) -> Option<&io::Error> {
        let e = self.result.as_ref().err()?;
        let refused_fast = matches!(self.job.op, Op::Zero { fast: true, .. })
            && e.raw_os_error().is_some_and(|n| n == libc::ENOTSUP || n == libc::EOPNOTSUPP);
        let modifying =
            matches!(self.job.op, Op::Write { .. } | Op::Trim { .. } | Op::Zero { .. } | Op::Flush);
        (modifying && !refused_fast).then_some(e)
    }

    /// The file range a modifying job touched (even a failed one may have changed part of it).
    pub fn modified_range(&self) -> Option<(u64, u64)> {
        match self.job.op {
            Op::Write { offset, .. } => Some((offset, self.job.buf.len() as u64)),
            Op::Trim { offset, len, .. } | Op::Zero { offset, len, .. } => Some((offset, len)),
            _ => None,
        }
    }
}

/// Queued jobs: clients' first, so a migration's big reads never delay a client request by
/// more than the one already running. Clients that keep every worker busy would starve the
/// migration for good, though, so a waiting background job gets one pick in `BACK_EVERY`.
///
/// Buffered writes to one file are serialised by the kernel anyway (the inode lock, on tmpfs,
/// ext4 and xfs alike), and writers waiting for it spin on a CPU: so plain writes take turns
/// in a lane of their own, one at a time, and the other workers stay free for reads. Writes
/// with FUA, trims and zeroing may wait for the disk and keep running side by side.
#[derive(Default)]
struct Queues {
    front: VecDeque<Job>,
    back: VecDeque<Job>,
    writes: VecDeque<Job>,
    /// A job from `writes` is running.
    writing: bool,
    closing: bool,
    /// Client jobs picked in a row while a background job waited.
    passed_over: u32,
}

const BACK_EVERY: u32 = 16;

/// Whether a job goes to the one-at-a-time write lane.
fn in_write_lane(job: &Job) -> bool {
    matches!(job.op, Op::Write { fua: false, .. })
}

impl Queues {
    /// Queues a client job; false when it cannot run before the running write finishes (whose
    /// worker then takes it), so that no other worker need be woken for it.
    fn push(&mut self, job: Job) -> bool {
        if in_write_lane(&job) {
            self.writes.push_back(job);
            !self.writing
        } else {
            self.front.push_back(job);
            true
        }
    }

    /// The next job to run, and whether it is a background one.
    fn pop(&mut self) -> Option<(Job, bool)> {
        if !self.writing
            && let Some(j) = self.writes.pop_front()
        {
            self.writing = true;
            return Some((j, false));
        }
        if self.back.is_empty() {
            return self.front.pop_front().map(|j| (j, false));
        }
        if self.passed_over < BACK_EVERY
            && let Some(j) = self.front.pop_front()
        {
            self.passed_over += 1;
            return Some((j, false));
        }
        self.passed_over = 0;
        self.back.pop_front().map(|j| (j, true))
    }
}

/// Completions waiting for the reactor, and how many of them are background jobs (which the
/// reactor does not count as outstanding).
#[derive(Default)]
struct Done {
    list: Vec<Completion>,
    background: usize,
}

struct Shared {
    jobs: Mutex<Queues>,
    cond: Condvar,
    done: Mutex<Done>,
    waker: Arc<mio::Waker>,
    export: Arc<Export>,
}

pub struct IoPool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// Client jobs submitted and not yet drained (the reactor is the only caller of both).
    outstanding: std::cell::Cell<usize>,
    /// Of those, send jobs (see `sender`).
    sending: std::cell::Cell<usize>,
    /// At most this many workers send at once, so the rest are free for disk jobs.
    max_sending: usize,
}

impl IoPool {
    pub fn new(n: usize, export: Arc<Export>, waker: Arc<mio::Waker>) -> io::Result<IoPool> {
        let shared = Arc::new(Shared {
            jobs: Mutex::new(Queues::default()),
            cond: Condvar::new(),
            done: Mutex::new(Done::default()),
            waker,
            export,
        });
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let s = shared.clone();
            // Workers only run syscalls and small bookkeeping: a small stack keeps RSS down.
            let t = std::thread::Builder::new()
                .name(format!("io{i}"))
                .stack_size(128 * 1024)
                .spawn(move || worker(&s))?;
            threads.push(t);
        }
        Ok(IoPool {
            shared,
            threads,
            outstanding: std::cell::Cell::new(0),
            sending: std::cell::Cell::new(0),
            max_sending: n / 2,
        })
    }

    pub fn submit(&self, job: Job) {
        self.outstanding.set(self.outstanding.get() + 1);
        if matches!(job.op, Op::Send { .. }) {
            self.sending.set(self.sending.get() + 1);
        }
        let runnable = lock(&self.shared.jobs).push(job);
        if runnable {
            self.shared.cond.notify_one();
        }
    }

    /// Queues a job that runs only when no client job is waiting.
    pub fn submit_background(&self, job: Job) {
        lock(&self.shared.jobs).back.push_back(job);
        self.shared.cond.notify_one();
    }

    /// Everything completed since the last call.
    pub fn drain(&self, into: &mut Vec<Completion>) {
        let background = {
            let mut d = lock(&self.shared.done);
            std::mem::swap(&mut d.list, into);
            std::mem::take(&mut d.background)
        };
        let client = into.len().saturating_sub(background);
        self.outstanding.set(self.outstanding.get().saturating_sub(client));
        let sends = into.iter().filter(|c| matches!(c.job.op, Op::Send { .. })).count();
        self.sending.set(self.sending.get().saturating_sub(sends));
    }

    /// Whether another client's sending may go to a worker (see `sender`): with a single
    /// worker, never (it would hold up every disk job).
    pub fn may_lend(&self) -> bool {
        self.sending.get() < self.max_sending
    }

    /// Whether a client job is out (its completion will wake the reactor).
    pub fn busy(&self) -> bool {
        self.outstanding.get() > 0
    }

    /// Stops the workers after the jobs already queued have run.
    pub fn shutdown(&mut self) {
        lock(&self.shared.jobs).closing = true;
        self.shared.cond.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A poisoned lock only means another worker panicked mid-push; the queue itself is intact.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn worker(s: &Shared) {
    let mut wrote = false;
    loop {
        let (job, background) = {
            let mut q = lock(&s.jobs);
            // The worker that frees the write lane takes the next write itself, so no waiting
            // write needs a wake-up.
            if std::mem::take(&mut wrote) {
                q.writing = false;
            }
            loop {
                if let Some(j) = q.pop() {
                    break j;
                }
                if q.closing {
                    return;
                }
                q = s.cond.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        wrote = in_write_lane(&job);
        let c = run(&s.export, job);
        let was_empty = {
            let mut d = lock(&s.done);
            d.list.push(c);
            d.background += usize::from(background);
            d.list.len() == 1
        };
        if was_empty {
            let _ = s.waker.wake();
        }
    }
}

pub fn run(e: &Export, mut job: Job) -> Completion {
    let result = match job.op {
        Op::Read { offset, at, len } => e.read_at(&mut job.buf[at..at + len], offset).map(|_| Vec::new()),
        Op::Write { offset, fua } => e.write_at(&job.buf, offset, fua).map(|_| Vec::new()),
        Op::Flush => e.flush().map(|_| Vec::new()),
        Op::Trim { offset, len, fua } => e.trim(offset, len, fua).map(|_| Vec::new()),
        Op::Zero { offset, len, no_hole, fast, fua } => {
            e.write_zeroes(offset, len, no_hole, fast, fua).map(|_| Vec::new())
        }
        Op::Cache { offset, len } => e.cache(offset, len).map(|_| Vec::new()),
        Op::Extents { offset, len, max } => e.extents(offset, len, max),
        Op::ReadSparse { offset, len } => read_sparse(e, &mut job.buf[..len], offset),
        Op::Send { ref mut out, ref lent, ref mut blocked } => {
            crate::sender::send(lent, out, e.as_fd()).map(|b| {
                *blocked = b;
                Vec::new()
            })
        }
    };
    Completion { job, result }
}

/// Reads [offset, offset+buf.len()) for the mirror and splits it into runs: a hole before the
/// first data (from SEEK_DATA, not read) and then whole zero 4 KiB blocks are reported as
/// holes, to be sent as WRITE_ZEROES; data runs are in `buf` at their place.
fn read_sparse(e: &Export, buf: &mut [u8], offset: u64) -> io::Result<Vec<Extent>> {
    let end = offset + buf.len() as u64;
    let data = e.data_from(offset, end)?;
    let hole = crate::proto::STATE_HOLE | crate::proto::STATE_ZERO;
    let mut out: Vec<Extent> = Vec::new();
    if data > offset {
        out.push(((data - offset) as u32, hole));
    }
    if data < end {
        let at = (data - offset) as usize;
        e.read_at(&mut buf[at..], data)?;
        for (s, t, zero) in crate::export::segments(&buf[at..], data) {
            let flags = if zero { hole } else { 0 };
            match out.last_mut() {
                Some(last) if last.1 == flags => last.0 += (t - s) as u32,
                _ => out.push(((t - s) as u32, flags)),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(cookie: u64) -> Job {
        let conn = crate::token::ConnId { token: mio::Token(1), generation: 1 };
        Job { conn, cookie, op: Op::Flush, buf: Vec::new() }
    }

    #[test]
    fn clients_first_but_background_is_never_starved() {
        let mut q = Queues::default();
        q.back.push_back(job(1000));
        for c in 0..40 {
            q.front.push_back(job(c));
        }
        let order: Vec<u64> = std::iter::from_fn(|| q.pop()).map(|(j, _)| j.cookie).collect();
        let at = order.iter().position(|&c| c == 1000);
        assert_eq!(at, Some(BACK_EVERY as usize), "order: {order:?}");
        assert_eq!(order.len(), 41);
        // Alone, a background job goes at once, and is said to be one (the reactor does not
        // count it as a client's); with no background job, clients keep order.
        q.back.push_back(job(7));
        assert_eq!(q.pop().map(|(j, bg)| (j.cookie, bg)), Some((7, true)));
        q.front.extend([job(1), job(2)]);
        assert_eq!(q.pop().map(|(j, bg)| (j.cookie, bg)), Some((1, false)));
    }

    #[test]
    fn plain_writes_run_one_at_a_time_beside_other_jobs() {
        let write = |cookie, fua| {
            let mut j = job(cookie);
            j.op = Op::Write { offset: 0, fua };
            j
        };
        let mut q = Queues::default();
        assert!(q.push(write(1, false)), "the lane is free");
        assert!(q.push(write(2, false)), "nothing runs yet");
        assert!(q.push(job(3)));
        assert!(q.push(write(4, true)), "FUA writes are not in the lane");
        assert_eq!(q.pop().map(|(j, _)| j.cookie), Some(1));
        assert!(!q.push(write(5, false)), "waits for the running write");
        // While 1 runs, 2 waits; everything else goes ahead.
        assert_eq!(q.pop().map(|(j, _)| j.cookie), Some(3));
        assert_eq!(q.pop().map(|(j, _)| j.cookie), Some(4));
        assert!(q.pop().is_none());
        q.writing = false;
        assert_eq!(q.pop().map(|(j, _)| j.cookie), Some(2));
        q.writing = false;
        assert_eq!(q.pop().map(|(j, _)| j.cookie), Some(5));
    }
}
