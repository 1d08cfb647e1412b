//! Drives one client connection's state machine in memory: a Unix socket pair instead of TCP,
//! a memfd instead of the served file, and disk jobs run by the caller instead of the pool.
//! The stateful fuzz target and the unit tests below use it to check, for arbitrary client
//! bytes, that nothing panics, every reply answers a request that was made, and nothing outside
//! a write-type request's range changes.

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
use std::os::unix::io::FromRawFd;
use std::path::Path;
use std::sync::Arc;

/// Export size used by the simulation: small, with an odd tail to exercise the edges.
pub const SIM_SIZE: u64 = 256 * 1024 + 512;
/// Rounds of feed/step/complete before giving up (each round moves at least some bytes).
const MAX_ROUNDS: usize = 4096;

struct Queue(RefCell<Vec<Job>>);

impl Submit for Queue {
    fn submit(&self, job: Job) {
        self.0.borrow_mut().push(job);
    }
}

/// What one simulated session produced.
pub struct Outcome {
    pub output: Vec<u8>,
    pub before: Vec<u8>,
    pub after: Vec<u8>,
}

fn memfd(size: u64) -> io::Result<File> {
    // SAFETY: memfd_create with a static NUL-terminated name; the fd is wrapped at once.
    let fd = unsafe { libc::memfd_create(c"flexnbd-sim".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size)?;
    Ok(f)
}

/// Runs `input` (client-to-server bytes) against a fresh connection. `oldstyle` skips
/// negotiation, so the input is requests from its first byte.
pub fn run(input: &[u8], oldstyle: bool) -> io::Result<Outcome> {
    use std::os::unix::fs::FileExt;
    let file = memfd(SIM_SIZE)?;
    // Data in the first half, a hole in the second.
    let before: Vec<u8> =
        (0..SIM_SIZE).map(|i| if i < SIM_SIZE / 2 { (i % 251) as u8 + 1 } else { 0 }).collect();
    file.write_all_at(&before[..(SIM_SIZE / 2) as usize], 0)?;
    let export = Arc::new(Export::from_file(file, Path::new("memfd"), false).map_err(io::Error::other)?);
    let poll = mio::Poll::new()?;
    let registry = poll.registry().try_clone()?;
    let (server, mut client) = mio::net::UnixStream::pair()?;
    let cfg = ServeConfig {
        oldstyle,
        read_only: false,
        listen: false,
        max_in_flight_bytes: 8 << 20,
        max_in_flight_reqs: 64,
        instance_id: 1,
    };
    let acl = Acl::default();
    let queue = Queue(RefCell::new(Vec::new()));
    let mut sbuf = vec![0u8; super::SHARED_READ_BUF];
    let (mut done, mut writes, mut requests, mut new_sender) = (false, 0usize, 0u64, None);
    let mut bufs = crate::buffer::BufPool::default();
    let mut inline = super::InlineIo::default();
    let mut inline_done = Vec::new();
    let mut ctx = Ctx {
        export: &export,
        pool: &queue,
        cfg: &cfg,
        acl: &acl,
        registry: &registry,
        sbuf: &mut sbuf,
        migration_done: &mut done,
        frozen: false,
        writes_in_flight: &mut writes,
        requests: &mut requests,
        new_sender: &mut new_sender,
        bufs: &mut bufs,
        inline: &mut inline,
        inline_done: &mut inline_done,
    };
    let id = ConnId { token: mio::Token(0), generation: 1 };
    let peer = "127.0.0.1:0".parse().map_err(io::Error::other)?;
    let mut conn = ClientConn::new(id, peer, server, &ctx);
    conn.register(&registry, mio::Token(0))?;
    let mut output = Vec::new();
    let mut fed = 0;
    let mut chunk = vec![0u8; 64 * 1024];
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
            }
            conn.complete(&mut ctx, c);
        }
        if next == Next::Continue {
            next = conn.flush(&mut ctx);
        }
        loop {
            match client.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    output.extend_from_slice(&chunk[..n]);
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
    let mut after = vec![0u8; SIM_SIZE as usize];
    export.read_at(&mut after, 0)?;
    Ok(Outcome { output, before, after })
}

/// The requests an oldstyle session's input holds, as the server must frame them: each header,
/// then a WRITE's payload (always consumed, even when refused), up to a bad magic.
pub fn requests(input: &[u8]) -> Vec<tx::Request> {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Ok(Some((r, used))) = tx::parse_request(&input[pos..]) {
        pos += used;
        out.push(r);
        if r.has_payload() {
            pos = pos.saturating_add(r.len as usize);
        }
        if r.kind == Cmd::Disc as u16 || pos >= input.len() {
            break;
        }
    }
    out
}

/// Checks an oldstyle session's invariants; returns a description of the first violation.
pub fn check_oldstyle(input: &[u8]) -> Result<(), String> {
    let o = run(input, true).map_err(|e| format!("harness error: {e}"))?;
    let reqs = requests(input);
    // Nothing outside a write-type request's range may change.
    let mut may_change = vec![false; SIM_SIZE as usize];
    for r in &reqs {
        let modifies = matches!(r.cmd(), Some(Cmd::Write | Cmd::Trim | Cmd::WriteZeroes));
        if modifies {
            let start = r.offset.min(SIM_SIZE) as usize;
            let end = r.offset.saturating_add(u64::from(r.len)).min(SIM_SIZE) as usize;
            may_change[start..end].iter_mut().for_each(|m| *m = true);
        }
    }
    if let Some(i) = (0..SIM_SIZE as usize).find(|&i| !may_change[i] && o.before[i] != o.after[i]) {
        return Err(format!("byte {i} changed outside every write range"));
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
    if o.output.len() < OLDSTYLE_HELLO_LEN {
        return if o.output.is_empty() { Ok(()) } else { Err("short hello".into()) };
    }
    let mut pos = OLDSTYLE_HELLO_LEN;
    while pos < o.output.len() {
        let Ok(Some((ReplyHeader::Simple { error, cookie }, used))) =
            tx::parse_reply_header(&o.output[pos..])
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

    #[test]
    fn newstyle_negotiation_survives_noise() {
        run(&[0, 0, 0, 3, 0x49, 0x48, 0x41, 0x56, 1, 2, 3], false).unwrap();
    }
}
