//! Drives one client connection's state machine in memory: a Unix socket pair instead of TCP,
//! a memfd instead of the served file, and disk jobs run by the caller instead of the pool.
//! The stateful fuzz target and the unit tests below use it to check, for arbitrary client
//! bytes, that nothing panics, every reply answers a request that was made, and nothing outside
//! a write-type request's range changes.
//!
//! The fuzz target needs millions of sessions, so what is costly to set up (the memfd and its
//! content, the poll instance, the big buffers) is made once per thread and reused; a session
//! that changed the export puts back only what it changed. The socket pair is the exception:
//! the client half is shut down to end the input, which cannot be undone.

use super::client::ClientConn;
use super::{Ctx, Next, ServeConfig, Submit};
use crate::acl::Acl;
use crate::export::Export;
use crate::io_pool::{self, Job};
use crate::proto::transmission::{self as tx, ReplyHeader};
use crate::proto::{Cmd, MAX_REQUEST_LEN, OLDSTYLE_HELLO_LEN};
use crate::token::ConnId;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::Arc;

/// Export size used by the simulation: small, with an odd tail to exercise the edges.
pub const SIM_SIZE: u64 = 256 * 1024 + 512;
/// The export starts with data up to here and a hole after it. Not page aligned, so the page
/// that holds the boundary is part data, part zeros.
const DATA_END: u64 = SIM_SIZE / 2;
/// tmpfs allocates and punches whole pages.
const PAGE: u64 = 4096;
/// Payload budget of the simulated server, and what a client may hold beyond it: small, so that
/// a second write of a few KiB waits for the first (the budget's path) in a short input.
const SIM_BUDGET: usize = 4096;
const SIM_FLOOR: usize = 1024;
/// Rounds of feed/step/complete before giving up (each round moves at least some bytes).
const MAX_ROUNDS: usize = 4096;

struct Queue(RefCell<Vec<Job>>);

impl Submit for Queue {
    fn submit(&self, job: Job) {
        self.0.borrow_mut().push(job);
    }
    fn may_lend(&self) -> bool {
        true
    }
}

/// What one simulated session produced.
pub struct Outcome {
    pub output: Vec<u8>,
    pub before: Vec<u8>,
    pub after: Vec<u8>,
}

fn memfd() -> io::Result<File> {
    // SAFETY: memfd_create with a static NUL-terminated name; the fd is wrapped at once.
    let fd = unsafe { libc::memfd_create(c"flexnbd-sim".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// What a thread keeps from one session to the next.
struct Sim {
    /// Never polled: connections only need a registry to (re)register with.
    poll: mio::Poll,
    /// The export's backing file, equal to `before` (content and allocation) between sessions
    /// unless `dirty`.
    file: File,
    /// A session was cut short (an I/O error) before it put the file back.
    dirty: bool,
    before: Vec<u8>,
    /// The file as a session left it, read only when a write-type job ran.
    after: Vec<u8>,
    /// The reactor's shared read buffer.
    sbuf: Vec<u8>,
    chunk: Vec<u8>,
    output: Vec<u8>,
}

thread_local! {
    static SIM: RefCell<Option<Sim>> = const { RefCell::new(None) };
}

/// Runs `f` on this thread's simulation, creating it on first use.
fn with_sim<R>(f: impl FnOnce(&mut Sim) -> io::Result<R>) -> io::Result<R> {
    SIM.with(|cell| {
        let mut slot = cell.try_borrow_mut().map_err(|_| io::Error::other("simulation re-entered"))?;
        if slot.is_none() {
            *slot = Some(Sim::new()?);
        }
        match slot.as_mut() {
            Some(sim) => f(sim),
            None => Err(io::Error::other("simulation missing")),
        }
    })
}

impl Sim {
    fn new() -> io::Result<Sim> {
        let before = (0..SIM_SIZE).map(|i| if i < DATA_END { (i % 251) as u8 + 1 } else { 0 }).collect();
        let mut sim = Sim {
            poll: mio::Poll::new()?,
            file: memfd()?,
            dirty: true,
            before,
            after: vec![0; SIM_SIZE as usize],
            sbuf: vec![0; super::SHARED_READ_BUF],
            chunk: vec![0; 64 * 1024],
            output: Vec::new(),
        };
        sim.reset()?;
        Ok(sim)
    }

    /// Rebuilds the file from nothing: data written up to DATA_END, never-written pages after.
    fn reset(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.set_len(SIM_SIZE)?;
        self.file.write_all_at(&self.before[..DATA_END as usize], 0)?;
        self.dirty = false;
        Ok(())
    }

    /// Puts back what a session changed, given the file's content in `after`. Content alone is
    /// not enough: extents report allocation, so a page that got written (even with zeros) past
    /// DATA_END must become a hole again. Before DATA_END every byte is non-zero, so a page
    /// that was punched there always shows up as changed content and is rewritten.
    fn restore(&mut self) -> io::Result<()> {
        if self.file.metadata()?.len() != SIM_SIZE {
            return self.reset();
        }
        let data_end = DATA_END as usize;
        for start in (0..data_end).step_by(PAGE as usize) {
            let end = (start + PAGE as usize).min(data_end);
            if self.after[start..end] != self.before[start..end] {
                self.file.write_all_at(&self.before[start..end], start as u64)?;
            }
        }
        // Up to the page after the end, so the last (partial) page is freed rather than zeroed;
        // the boundary page is only zeroed from DATA_END and keeps its data.
        let len = SIM_SIZE.next_multiple_of(PAGE) - DATA_END;
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: plain syscall on our own fd.
        if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, DATA_END as i64, len as i64) } != 0 {
            return Err(io::Error::last_os_error());
        }
        self.dirty = false;
        Ok(())
    }

    /// Runs `input` (client-to-server bytes) against a fresh connection; the server's bytes end
    /// up in `output`. Returns whether a write-type job ran: only those touch the file, so
    /// otherwise it still equals `before`. When one ran, or `read_after`, `after` holds the file
    /// as the session left it; either way the file is put back for the next session.
    fn session(&mut self, input: &[u8], oldstyle: bool, read_after: bool) -> io::Result<bool> {
        if self.dirty {
            self.reset()?;
        }
        self.dirty = true;
        self.output.clear();
        // As fresh as a new buffer, so that no session can depend on the one before (a crash
        // must replay alone). Everything put there is input, so no more than that was touched.
        let touched = input.len().min(self.sbuf.len());
        self.sbuf[..touched].fill(0);
        // A new Export each time: it remembers what the filesystem refused (punch, zero range,
        // RWF_NOWAIT), and one session must not steer the next.
        let export = Arc::new(
            Export::from_file(self.file.try_clone()?, Path::new("memfd"), false).map_err(io::Error::other)?,
        );
        let registry = self.poll.registry();
        let (server, mut client) = mio::net::UnixStream::pair()?;
        let cfg = ServeConfig {
            oldstyle,
            read_only: false,
            listen: false,
            max_in_flight_bytes: 8 << 20,
            max_in_flight_reqs: 64,
            instance_id: 1,
            multi_conn: true,
        };
        let acl = Acl::default();
        let queue = Queue(RefCell::new(Vec::new()));
        let (mut done, mut writes, mut requests, mut new_sender) = (false, 0usize, 0u64, None);
        let mut bufs = crate::buffer::BufPool::default();
        let mut lineage = crate::migration::dest::Lineage::new(1);
        let mut inline = super::InlineIo::default();
        let mut inline_done = Vec::new();
        // Small, so that a second big write in flight waits for the first (the budget's path).
        let mut budget = crate::budget::PayloadBudget::with_floor(SIM_BUDGET, SIM_FLOOR);
        let mut ctx = Ctx {
            export: &export,
            pool: &queue,
            cfg: &cfg,
            acl: &acl,
            registry,
            sbuf: &mut self.sbuf,
            migration_done: &mut done,
            frozen: false,
            writes_in_flight: &mut writes,
            requests: &mut requests,
            new_sender: &mut new_sender,
            bufs: &mut bufs,
            inline: &mut inline,
            inline_done: &mut inline_done,
            lineage: &mut lineage,
            budget: &mut budget,
        };
        let id = ConnId { token: mio::Token(0), generation: 1 };
        let peer = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let mut conn = ClientConn::new(id, peer.into(), server, &ctx);
        conn.register(registry, mio::Token(0))?;
        let mut modified = false;
        let mut fed = 0;
        for _ in 0..MAX_ROUNDS {
            let mut progress = false;
            if fed < input.len() {
                match client.write(&input[fed..]) {
                    Ok(n) => {
                        fed += n;
                        progress |= n > 0;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if fed == input.len() {
                    client.shutdown(std::net::Shutdown::Write)?;
                }
            }
            let mut next = conn.on_event(&mut ctx, true, true, fed == input.len());
            let jobs = std::mem::take(&mut *queue.0.borrow_mut());
            let inline: Vec<_> = ctx.inline_done.drain(..).collect();
            progress |= !jobs.is_empty() || !inline.is_empty();
            for c in jobs.into_iter().map(|job| io_pool::run(&export, job)).chain(inline) {
                if c.job.op.modifies() {
                    *ctx.writes_in_flight -= 1;
                    modified = true;
                }
                conn.complete(&mut ctx, c);
            }
            // As the reactor does: freed room lets a waiting write try again.
            if !ctx.budget.take_waiters().is_empty() {
                conn.budget_retry();
                progress = true;
            }
            if next == Next::Continue {
                next = conn.flush(&mut ctx);
            }
            loop {
                match client.read(&mut self.chunk) {
                    Ok(0) => break,
                    Ok(n) => {
                        self.output.extend_from_slice(&self.chunk[..n]);
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                    Err(e) => return Err(e),
                }
            }
            if next == Next::Close || (!progress && fed == input.len()) {
                break;
            }
        }
        conn.deregister(registry);
        if modified || read_after {
            export.read_at(&mut self.after, 0)?;
        }
        if modified {
            self.restore()?;
        } else {
            self.dirty = false;
        }
        Ok(modified)
    }
}

/// Runs `input` (client-to-server bytes) against a fresh connection. `oldstyle` skips
/// negotiation, so the input is requests from its first byte.
pub fn run(input: &[u8], oldstyle: bool) -> io::Result<Outcome> {
    with_sim(|sim| {
        sim.session(input, oldstyle, true)?;
        Ok(Outcome { output: sim.output.clone(), before: sim.before.clone(), after: sim.after.clone() })
    })
}

/// Like `run`, without copying out what the session produced (for callers that only need it
/// not to panic or hang).
pub fn drive(input: &[u8], oldstyle: bool) -> io::Result<()> {
    with_sim(|sim| sim.session(input, oldstyle, false).map(drop))
}

/// The requests an oldstyle session's input holds, as the server must frame them: each header,
/// then a WRITE's payload (always consumed, even when refused), up to a bad magic.
pub fn requests(input: &[u8]) -> Vec<tx::Request> {
    framing(input).0
}

/// The requests (as `requests`), and the cookie of the header with a bad magic that ends them,
/// if one does: the server answers it with EINVAL before closing.
fn framing(input: &[u8]) -> (Vec<tx::Request>, Option<u64>) {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let rest = input.get(pos..).unwrap_or_default();
        match tx::parse_request(rest) {
            Ok(Some((r, used))) => {
                pos += used;
                out.push(r);
                if r.has_payload() {
                    pos = pos.saturating_add(r.len as usize);
                }
                if r.kind == Cmd::Disc as u16 || pos >= input.len() {
                    return (out, None);
                }
            }
            Ok(None) => return (out, None),
            Err(_) => return (out, tx::request_cookie(rest)),
        }
    }
}

/// Checks an oldstyle session's invariants; returns a description of the first violation.
pub fn check_oldstyle(input: &[u8]) -> Result<(), String> {
    with_sim(|sim| {
        let modified = sim.session(input, true, false)?;
        Ok(check(input, &sim.output, modified.then_some((&sim.before[..], &sim.after[..]))))
    })
    .map_err(|e| format!("harness error: {e}"))?
}

/// `files` is the export before and after, when it may have changed.
fn check(input: &[u8], output: &[u8], files: Option<(&[u8], &[u8])>) -> Result<(), String> {
    let (reqs, bad_cookie) = framing(input);
    // Nothing outside a write-type request's range may change. Ranges, not a map of every
    // byte: the gaps between them are compared whole, and only a failing one byte by byte.
    if let Some((before, after)) = files {
        let mut ranges: Vec<(usize, usize)> = reqs
            .iter()
            .filter(|r| matches!(r.cmd(), Some(Cmd::Write | Cmd::Trim | Cmd::WriteZeroes)))
            .map(|r| {
                let start = r.offset.min(SIM_SIZE) as usize;
                let end = r.offset.saturating_add(u64::from(r.len)).min(SIM_SIZE) as usize;
                (start, end)
            })
            .collect();
        ranges.sort_unstable();
        ranges.push((SIM_SIZE as usize, SIM_SIZE as usize));
        let mut from = 0;
        for (start, end) in ranges {
            if start > from && before[from..start] != after[from..start] {
                let i = (from..start).find(|&i| before[i] != after[i]).unwrap_or(from);
                return Err(format!("byte {i} changed outside every write range"));
            }
            from = from.max(end);
        }
    }
    // Every reply answers a request that was made; read data has the requested length.
    let mut lens: HashMap<u64, Option<u32>> = HashMap::new();
    for r in &reqs {
        let len = (r.kind == Cmd::Read as u16).then_some(r.len);
        if *lens.entry(r.cookie).or_insert(len) != len {
            // One cookie used for different reads: the reply stream cannot be framed from here.
            return Ok(());
        }
    }
    if let Some(c) = bad_cookie {
        lens.entry(c).or_insert(None);
    }
    if output.len() < OLDSTYLE_HELLO_LEN {
        return if output.is_empty() { Ok(()) } else { Err("short hello".into()) };
    }
    let mut pos = OLDSTYLE_HELLO_LEN;
    while pos < output.len() {
        let Ok(Some((ReplyHeader::Simple { error, cookie }, used))) = tx::parse_reply_header(&output[pos..])
        else {
            return Err(format!("unparsable reply at {pos}"));
        };
        pos += used;
        let Some(len) = lens.get(&cookie) else { return Err(format!("reply to cookie {cookie} never sent")) };
        if error == 0
            && let Some(len) = len.filter(|&l| l <= MAX_REQUEST_LEN)
        {
            pos += len as usize;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::transmission::Request;

    fn req(kind: Cmd, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        Request { flags: 0, kind: kind as u16, cookie, offset, len }.encode().to_vec()
    }

    #[test]
    fn reads_writes_and_errors_keep_invariants() {
        let mut input = req(Cmd::Write, 1, 4096, 8);
        input.extend_from_slice(b"ABCDEFGH");
        input.extend(req(Cmd::Read, 2, 4096, 8));
        input.extend(req(Cmd::Read, 3, SIM_SIZE, 1)); // EINVAL
        input.extend(req(Cmd::Trim, 4, SIM_SIZE - 512, 512));
        input.extend(req(Cmd::WriteZeroes, 5, 0, 4096));
        input.extend(req(Cmd::Write, 6, SIM_SIZE, 4)); // ENOSPC, payload skipped
        input.extend_from_slice(b"zzzz");
        input.extend(req(Cmd::Flush, 7, 0, 0));
        input.extend(req(Cmd::Disc, 8, 0, 0));
        check_oldstyle(&input).unwrap();
        let o = run(&input, true).unwrap();
        assert_eq!(&o.after[4096..4104], b"ABCDEFGH");
        assert!(o.after[..4096].iter().all(|&b| b == 0));
    }

    /// Found by the fuzzer: a DISC with flags we do not know was refused with EINVAL, and the
    /// requests after it were answered too.
    #[test]
    fn disc_with_unknown_flags_still_disconnects() {
        let mut input =
            Request { flags: 0x41, kind: Cmd::Disc as u16, cookie: 1, offset: 0, len: 0 }.encode().to_vec();
        input.extend(req(Cmd::Read, 2, 0, 512));
        let out = run(&input, true).unwrap();
        assert_eq!(out.output.len(), OLDSTYLE_HELLO_LEN, "no reply after DISC: {:?}", out.output);
        check_oldstyle(&input).unwrap();
    }

    #[test]
    fn bad_magic_is_answered_with_its_cookie_then_the_connection_ends() {
        let mut input = req(Cmd::Read, 1, 0, 512);
        let mut bad = req(Cmd::Read, 0x77, 0, 512);
        bad[0] ^= 0xff;
        input.extend(bad);
        input.extend(req(Cmd::Read, 3, 0, 512));
        check_oldstyle(&input).unwrap();
        let out = run(&input, true).unwrap().output;
        let rest = &out[OLDSTYLE_HELLO_LEN..];
        assert_eq!(rest.len(), 16 + 512 + 16, "the read, the EINVAL, and nothing after: {rest:?}");
        let einval = tx::encode_simple_reply(22, 0x77);
        assert!(rest.windows(16).any(|w| w == einval), "no EINVAL with the bad request's cookie");
    }

    #[test]
    fn a_write_waiting_for_the_budget_goes_through_once_room_is_freed() {
        let big = (SIM_BUDGET as u32 / 4) * 3;
        let mut input = req(Cmd::Write, 1, 0, big);
        input.extend(vec![1u8; big as usize]);
        input.extend(req(Cmd::Write, 2, u64::from(big), big));
        input.extend(vec![2u8; big as usize]);
        input.extend(req(Cmd::Read, 3, 0, 512));
        check_oldstyle(&input).unwrap();
        let o = run(&input, true).unwrap();
        let rest = &o.output[OLDSTYLE_HELLO_LEN..];
        assert_eq!(rest.len(), 16 + 16 + 16 + 512, "both writes and the read answered");
        assert!(o.after[..big as usize].iter().all(|&b| b == 1));
        assert!(o.after[big as usize..2 * big as usize].iter().all(|&b| b == 2));
    }

    #[test]
    fn garbage_and_cut_payloads() {
        check_oldstyle(b"").unwrap();
        check_oldstyle(&[0xff; 100]).unwrap();
        let mut cut = req(Cmd::Write, 1, 0, 4096);
        cut.extend_from_slice(&[1; 100]);
        check_oldstyle(&cut).unwrap();
        let o = run(&cut, true).unwrap();
        assert_eq!(o.before, o.after, "a cut write must change nothing");
        let mut huge = req(Cmd::Write, 1, 0, u32::MAX);
        huge.extend_from_slice(&[1; 1000]);
        check_oldstyle(&huge).unwrap();
    }

    /// A WRITE header that hits the in-flight cap parks its payload in `carry`; the payload must
    /// be taken from there when reading resumes (regression: it was read from the socket).
    #[test]
    fn payload_parked_by_a_pause_is_not_lost() {
        let mut input = Vec::new();
        for i in 0..63 {
            input.extend(req(Cmd::WriteZeroes, i, SIM_SIZE / 2, 512));
        }
        input.extend(req(Cmd::Write, 100, 0, 4096));
        input.extend_from_slice(&[7u8; 4096]);
        input.extend(req(Cmd::Read, 101, 0, 4096));
        check_oldstyle(&input).unwrap();
        let o = run(&input, true).unwrap();
        assert!(o.after[..4096].iter().all(|&b| b == 7));
        let replies = o.output.len() - OLDSTYLE_HELLO_LEN - 4096;
        assert_eq!(replies / tx::SIMPLE_REPLY_LEN, 65, "every request answered");
    }

    /// A session must leave the export as it found it, allocation included: extents report
    /// holes, and the next session must not see what this one wrote.
    #[test]
    fn sessions_put_the_export_back() {
        let mut input = req(Cmd::Trim, 1, 8192, 3 * 4096);
        input.extend(req(Cmd::Write, 2, DATA_END - 100, 300)); // across the data/hole boundary
        input.extend_from_slice(&[9; 300]);
        input.extend(req(Cmd::Write, 3, DATA_END + 10_000, 100)); // zeros, yet allocates a page
        input.extend_from_slice(&[0; 100]);
        let mut zero = req(Cmd::WriteZeroes, 4, 200_000, 5000);
        zero[4..6].copy_from_slice(&crate::proto::CMD_FLAG_NO_HOLE.to_be_bytes());
        input.extend(zero);
        input.extend(req(Cmd::Write, 5, SIM_SIZE - 512, 512)); // the partial last page
        input.extend_from_slice(&[5; 512]);
        check_oldstyle(&input).unwrap();
        let o = run(&input, true).unwrap();
        assert_ne!(o.before, o.after);
        with_sim(|sim| {
            let mut now = vec![0u8; SIM_SIZE as usize];
            sim.file.read_exact_at(&mut now, 0)?;
            assert!(now == sim.before, "content put back");
            let export = Export::from_file(sim.file.try_clone()?, Path::new("memfd"), false).unwrap();
            let data = DATA_END.next_multiple_of(PAGE);
            let hole = crate::proto::STATE_HOLE | crate::proto::STATE_ZERO;
            let want = vec![(data as u32, 0), ((SIM_SIZE - data) as u32, hole)];
            assert_eq!(export.extents(0, SIM_SIZE as u32, 100)?, want, "allocation put back");
            Ok(())
        })
        .unwrap();
        // And the same input gives the same answer again.
        assert!(run(&input, true).unwrap().output == o.output);
    }

    #[test]
    fn newstyle_negotiation_survives_noise() {
        run(&[0, 0, 0, 3, 0x49, 0x48, 0x41, 0x56, 1, 2, 3], false).unwrap();
    }
}
