//! Live migration, black-box: a `serve` source migrating to a `listen` destination with
//! `flexnbd mirror`, while clients write (every acknowledged write must arrive, in one pass or
//! several) or read (only correct data), through a relay that cuts the first connection, across
//! error replies and a destination killed and restarted, through break/mirror cycles; a long
//! pipeline into the destination; refusals (size mismatch, nothing listening, ACL), the listener
//! not ending on a plain client, `--unlink`, tiny files, progress in `status`, `--bind`, and an
//! original (oldstyle) sender.
//!
//! Everything runs on loopback with temporary files; every wait is bounded; only processes
//! started here are signalled (through their own handles).

mod common;

use common::migration::*;
use common::*;
use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

const BLOCK: u64 = 4 * KIB;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A file of `len` bytes with random data in `regions` 1 MiB pieces at distinct MiB-aligned
/// offsets, holes elsewhere.
fn make_sparse_with_regions(path: &Path, len: u64, regions: usize, seed: u64) {
    make_sparse_file(path, len);
    let mut rng = XorShift::new(seed);
    let slots = len / MIB;
    let mut used = Vec::new();
    while used.len() < regions {
        let m = rng.next_u64() % slots;
        if !used.contains(&m) {
            used.push(m);
            write_at(path, m * MIB, &random_bytes(MIB as usize, seed ^ (m + 1)));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Concurrent writers during a migration
// ---------------------------------------------------------------------------------------------

/// What one writer saw.
#[derive(Default)]
struct WriterLog {
    /// Offset -> seed of the pattern of the last acknowledged write there.
    acked: HashMap<u64, u64>,
    /// Every write sent, in order: (offset, seed, acknowledged), for diagnostics.
    history: Vec<(u64, u64, bool)>,
    writes_acked: u64,
    /// NBD error replies: (offset, error).
    error_replies: Vec<(u64, u32)>,
    /// How the writer stopped.
    end: String,
    timed_out: bool,
}

const SIZE_UNDER_WRITERS: u64 = 256 * MIB;

fn pattern(seed: u64) -> Vec<u8> {
    random_bytes(BLOCK as usize, seed)
}

/// Writes unique 4 KiB patterns at random blocks congruent to `id` mod `of` (so writers never
/// race on a block and "the last acknowledged write" is well defined), one request at a time,
/// until the connection ends, an error reply arrives, or `deadline`.
fn writer(
    addr: SocketAddr,
    id: u64,
    of: u64,
    spread: u64,
    acked_total: Arc<AtomicU64>,
    deadline: Instant,
) -> WriterLog {
    let mut log = WriterLog::default();
    let mut c = match Nbd::connect(addr) {
        Ok(c) => c,
        Err(e) => {
            log.end = format!("connect failed: {e}");
            return log;
        }
    };
    let mut rng = XorShift::new(1000 + id);
    let blocks = SIZE_UNDER_WRITERS / BLOCK;
    let hot = (16 * MIB / BLOCK).min(blocks);
    let mut seq = 0u64;
    loop {
        if Instant::now() >= deadline {
            log.end = "deadline".into();
            break;
        }
        // Mostly a hot 16 MiB window (rewrites), one write in `spread` anywhere.
        let r = rng.next_u64();
        let b = if !r.is_multiple_of(spread) { (r >> 8) % hot } else { (r >> 8) % blocks };
        let b = b - b % of + id;
        if b >= blocks {
            continue;
        }
        let off = b * BLOCK;
        seq += 1;
        let seed = (id + 1) << 40 | seq;
        match c.write(off, &pattern(seed), 0) {
            Ok(0) => {
                log.history.push((off, seed, true));
                log.acked.insert(off, seed);
                log.writes_acked += 1;
                acked_total.fetch_add(1, Ordering::SeqCst);
            }
            // The handover: a request the source read but will not run any more.
            Ok(ESHUTDOWN) => {
                log.history.push((off, seed, false));
                log.end = format!("ESHUTDOWN for a write at {off}");
                break;
            }
            Ok(e) => {
                log.history.push((off, seed, false));
                log.error_replies.push((off, e));
                log.end = format!("error reply {e} to a write at {off}");
                break;
            }
            Err(e) => {
                log.history.push((off, seed, false));
                log.timed_out = matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut);
                log.end = format!("connection ended: {e}");
                break;
            }
        }
        // Paced (about 1000 writes/s per writer) so the throttled migration can converge.
        thread::sleep(Duration::from_millis(1));
    }
    log
}

/// If the files differ, panic naming the first differing 4 KiB block and which of the writes
/// sent there (if any) each file holds.
fn explain_first_difference(a: &Path, b: &Path, logs: &[WriterLog]) {
    let len = file_len(a);
    let mut off = 0;
    while off < len {
        let n = (len - off).min(MIB) as usize;
        let (da, db) = (read_at(a, off, n), read_at(b, off, n));
        if da != db {
            let i = da.iter().zip(&db).position(|(x, y)| x != y).unwrap() as u64;
            let blk = (off + i) / BLOCK * BLOCK;
            let (ba, bb) = (read_at(a, blk, BLOCK as usize), read_at(b, blk, BLOCK as usize));
            let sent: Vec<(usize, u64, bool)> = logs
                .iter()
                .enumerate()
                .flat_map(|(w, l)| l.history.iter().filter(|h| h.0 == blk).map(move |h| (w, h.1, h.2)))
                .collect();
            let which = |data: &[u8]| {
                sent.iter()
                    .position(|&(_, seed, _)| pattern(seed) == data)
                    .map_or_else(|| "none of the writes sent there".to_string(), |k| format!("write #{k}"))
            };
            panic!(
                "{} and {} differ at byte {} (block {blk}); writes sent to that block (writer, seed, \
                 acknowledged), oldest first: {sent:?}; the first file holds {}, the second {}",
                a.display(),
                b.display(),
                off + i,
                which(&ba),
                which(&bb)
            );
        }
        off += n as u64;
    }
}

/// 256 MiB sparse source with 20 random 1 MiB data regions, four writers doing random 4 KiB
/// writes of unique patterns, `mirror EXTRA...` started while they write. Afterwards both
/// processes have exited 0, no writer got an error reply or hung, the files are identical, every
/// acknowledged write is on the destination, and the destination is as sparse as the source.
fn migrate_under_writers(tag: &str, spread: u64, mirror_extra: &[&str]) {
    migrate_under_writers_with(tag, spread, mirror_extra, false)
}

/// The same; with `kill_dst`, the destination is killed (SIGKILL) once the migration has made
/// progress, and a new listen takes its port a moment later.
fn migrate_under_writers_with(tag: &str, spread: u64, mirror_extra: &[&str], kill_dst: bool) {
    const SIZE: u64 = SIZE_UNDER_WRITERS;
    const WRITERS: u64 = 4;
    let dir = TempDir::new(tag);
    let (src_file, dst_file) = (dir.join("src.img"), dir.join("dst.img"));
    let (src_sock, dst_sock) = (dir.join("src.sock"), dir.join("dst.sock"));
    make_sparse_with_regions(&src_file, SIZE, 20, 11);
    make_sparse_file(&dst_file, SIZE);

    let mut src = serve(&src_file, &src_sock);
    let mut dst = listen(&dst_file, Some(&dst_sock), &[]);
    let acked_total = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + MIGRATION_TIMEOUT + Duration::from_secs(5);
    let writers: Vec<JoinHandle<WriterLog>> = (0..WRITERS)
        .map(|id| {
            let (addr, acked) = (src.addr(), Arc::clone(&acked_total));
            thread::spawn(move || writer(addr, id, WRITERS, spread, acked, deadline))
        })
        .collect();

    // Let them get going, then migrate under load.
    let warm = Instant::now() + Duration::from_secs(10);
    while acked_total.load(Ordering::SeqCst) < 400 && Instant::now() < warm {
        thread::sleep(Duration::from_millis(10));
    }
    let acked_before = acked_total.load(Ordering::SeqCst);
    assert!(acked_before >= 400, "writers made no progress before the migration ({acked_before} writes)");
    let began = Instant::now();
    start_mirror(&src_sock, dst.port(), mirror_extra);
    if kill_dst {
        wait_for_bytes_left_below(&src_sock, SIZE / 2, Duration::from_secs(20));
        let port = dst.port();
        let st = dst.stop_with(libc::SIGKILL, IO_TIMEOUT);
        assert!(!st.success(), "killed listen: {}", describe_status(st));
        thread::sleep(Duration::from_millis(1200));
        dst = listen_on_port(&dst_file, port, Some(&dst_sock));
        let out = cli(&["mirror-speed", "-s", s(&src_sock), "--max-bps", "0"]);
        out.assert_success("flexnbd mirror-speed --max-bps 0");
    }
    assert_migration_completes(&mut src, &mut dst);
    let took = began.elapsed();
    let logs: Vec<WriterLog> = writers.into_iter().map(|h| h.join().expect("writer thread")).collect();
    let acked_after = acked_total.load(Ordering::SeqCst);
    let passes: Vec<String> = src.stderr_lines().into_iter().filter(|l| l.contains(" done, ")).collect();
    eprintln!(
        "{tag}: migration under load took {took:?}; writes acknowledged before mirror {acked_before}, \
         total {acked_after}; writers ended: {:?}; source: {passes:?}",
        logs.iter().map(|l| l.end.as_str()).collect::<Vec<_>>()
    );
    for (i, l) in logs.iter().enumerate() {
        assert!(
            l.error_replies.is_empty(),
            "writer {i} got error replies before the handover: {:?}",
            l.error_replies
        );
        assert!(!l.timed_out, "writer {i} hung (no reply within {IO_TIMEOUT:?}): {}", l.end);
        assert!(
            l.end.starts_with("connection ended") || l.end.starts_with("ESHUTDOWN"),
            "writer {i} did not see its connection end: {}",
            l.end
        );
    }
    // A write never acknowledged must not surface on either side (each block gets a new
    // pattern each time, so finding it means the write ran).
    for l in &logs {
        for &(off, seed, acked) in &l.history {
            if acked {
                continue;
            }
            for f in [&src_file, &dst_file] {
                assert!(
                    read_at(f, off, BLOCK as usize) != pattern(seed),
                    "unacknowledged write at {off} is in {f:?}"
                );
            }
        }
    }
    assert!(acked_after > acked_before, "no write was acknowledged while the migration ran");
    if mirror_extra.contains(&"active") {
        let active = src
            .stderr_lines()
            .into_iter()
            .find_map(|l| {
                l.split("; ")
                    .nth(2)
                    .and_then(|t| t.strip_suffix(" client writes were mirrored actively"))
                    .map(String::from)
            })
            .and_then(|n| n.parse::<u64>().ok());
        assert!(active.is_some_and(|n| n > 0), "no write went to the destination actively: {active:?}");
    }

    explain_first_difference(&src_file, &dst_file, &logs);
    assert_files_equal(&src_file, &dst_file);
    let mut checked = 0;
    for l in &logs {
        for (&off, &seed) in &l.acked {
            assert_file_range(&dst_file, off, &pattern(seed), "acknowledged write on the destination");
            checked += 1;
        }
    }
    assert!(checked > 0);
    let (a_src, a_dst) = (allocated_bytes(&src_file), allocated_bytes(&dst_file));
    let margin = (a_src / 20).max(2 * MIB);
    assert!(
        a_dst.abs_diff(a_src) <= margin,
        "destination allocates {a_dst} bytes, source {a_src} (margin {margin}): sparseness not kept"
    );
}

#[test]
fn migration_with_concurrent_writers_keeps_every_acknowledged_write() {
    migrate_under_writers("mirror-writers", 16, &[]);
}

/// The same with the sweep throttled and the writes spread wider, so the migration lasts
/// seconds and the writers dirty more than a second's worth while it runs: the source needs
/// further passes over the dirty ranges before it freezes.
#[test]
fn throttled_migration_with_concurrent_writers_keeps_every_acknowledged_write() {
    migrate_under_writers("mirror-writers-slow", 4, &["--max-bps", &(64 * MIB).to_string()]);
}

/// Active mirroring from the start: each acknowledged write went to the destination before
/// its acknowledgement, or was dirty and went with a pass.
#[test]
fn active_mirroring_keeps_every_acknowledged_write() {
    migrate_under_writers("mirror-active", 16, &["--mode", "active", "--max-bps", &(64 * MIB).to_string()]);
}

/// A destination killed while client writes wait on it: the writers see no error and no
/// hang (their writes are acknowledged from the source and copied again), and the migration
/// completes to the restarted destination.
#[test]
fn a_destination_killed_while_mirroring_actively_costs_writers_nothing() {
    let slow = ["--mode", "active", "--max-bps", &(32 * MIB).to_string()];
    migrate_under_writers_with("mirror-active-kill", 16, &slow, true);
}

// ---------------------------------------------------------------------------------------------
// 2. A relay that cuts the first connection: the migration is retried
// ---------------------------------------------------------------------------------------------

/// A TCP relay on 127.0.0.1:0 to `target`. The first connection is cut (both directions) after
/// `cut_after` bytes from the source; later connections are forwarded in full.
struct Relay {
    port: u16,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    pumps: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

/// How a relay ends its first connection, watching the source-to-destination direction.
#[derive(Clone)]
enum Cut {
    /// After this many bytes.
    After(u64),
    /// At the `n`th FLUSH request header: nothing from it on goes through, and the connection
    /// is shut once `release` is set (or the relay is dropped).
    AtFlush { n: usize, release: Arc<AtomicBool> },
    /// At the `n`th FLUSH request header: nothing from it on goes through until `release` is
    /// set; then everything does.
    HoldFlush { n: usize, release: Arc<AtomicBool> },
    /// Not a cut (destination-to-source direction): the destination's answer to our sender
    /// option is forwarded with its feature bits cleared, as an older destination sends it.
    ClearSenderFeatures,
}

/// The start of a listen server's ACK to FlexnbdSender: option reply magic, the option, ACK,
/// 8 bytes of data (the feature bits) follow.
const SENDER_ACK: [u8; 20] =
    [0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0x46, 0x58, 0x00, 0x02, 0, 0, 0, 1, 0, 0, 0, 8];

/// A FLUSH request header's first 8 bytes: magic, no flags, type 3. Random payload bytes match
/// it with odds of 2^-64 per position.
const FLUSH_HEADER: [u8; 8] = [0x25, 0x60, 0x95, 0x13, 0, 0, 0, 3];

impl Relay {
    fn start(target: SocketAddr, cut_after: u64) -> Relay {
        Relay::start_full(target, Cut::After(cut_after), true)
    }

    /// `later`: whether connections after the first are relayed too (else they are closed).
    fn start_full(target: SocketAddr, cut: Cut, later: bool) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").expect("relay bind");
        l.set_nonblocking(true).expect("nonblocking");
        let port = l.local_addr().expect("relay addr").port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let pumps = Arc::new(Mutex::new(Vec::new()));
        let (acc, st, ps) = (Arc::clone(&accepted), Arc::clone(&stop), Arc::clone(&pumps));
        let acceptor = thread::spawn(move || {
            // Bounded by the stop flag, set when the Relay is dropped.
            while !st.load(Ordering::SeqCst) {
                let (client, _) = match l.accept() {
                    Ok(x) => x,
                    Err(_) => {
                        thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                let n = acc.fetch_add(1, Ordering::SeqCst);
                if n > 0 && !later {
                    continue;
                }
                let _ = client.set_nonblocking(false);
                let Ok(server) = TcpStream::connect_timeout(&target, IO_TIMEOUT) else { continue };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let limit = (n == 0).then(|| cut.clone());
                // A cut at a FLUSH aims at the final FLUSH, which a source sends only to a
                // destination that does not take FUA writes as the handover's proof: the relay
                // plays one by clearing the feature bits in its answer to our sender option.
                let older = matches!(limit, Some(Cut::AtFlush { .. } | Cut::HoldFlush { .. }));
                let (c2, s2) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
                let (st1, st2) = (Arc::clone(&st), Arc::clone(&st));
                let mut v = ps.lock().unwrap();
                v.push(thread::spawn(move || pump(client, server, limit, st1)));
                v.push(thread::spawn(move || {
                    let back = if older { Some(Cut::ClearSenderFeatures) } else { None };
                    pump(s2, c2, back, st2)
                }));
            }
        });
        Relay { port, accepted, stop, acceptor: Some(acceptor), pumps }
    }
}

/// Copies `from` -> `to` until EOF, an error, the `cut` or the stop flag; then shuts both
/// sockets down in both directions (which also ends the opposite pump).
fn pump(mut from: TcpStream, mut to: TcpStream, cut: Option<Cut>, stop: Arc<AtomicBool>) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = to.set_write_timeout(Some(IO_TIMEOUT));
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    let limit = match &cut {
        Some(Cut::After(n)) => Some(*n),
        _ => None,
    };
    // For Cut::AtFlush: flushes seen, and the last bytes forwarded (a header may straddle reads).
    let mut flushes = 0usize;
    let mut tail: Vec<u8> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(_) => break,
        };
        let n = limit.map_or(n, |l| n.min((l - total) as usize));
        if let Some(Cut::ClearSenderFeatures) = &cut
            && let Some(at) = buf[..n].windows(SENDER_ACK.len()).position(|w| w == SENDER_ACK)
            && at + SENDER_ACK.len() + 8 <= n
        {
            buf[at + SENDER_ACK.len()..at + SENDER_ACK.len() + 8].fill(0);
        }
        if let Some(Cut::AtFlush { n: nth, release } | Cut::HoldFlush { n: nth, release }) = &cut
            && flushes < *nth
        {
            // `tail` keeps the last 7 bytes already forwarded, so every match in it is new.
            let old = tail.len();
            tail.extend_from_slice(&buf[..n]);
            let starts: Vec<usize> = tail
                .windows(FLUSH_HEADER.len())
                .enumerate()
                .filter(|(_, w)| *w == FLUSH_HEADER)
                .map(|(i, _)| i)
                .collect();
            if flushes + starts.len() >= *nth {
                // Forward what came before that header, then hold everything until released.
                let at = starts[*nth - flushes - 1];
                let _ = to.write_all(&tail[old.min(at)..at]);
                let until = Instant::now() + Duration::from_secs(60);
                while !release.load(Ordering::SeqCst)
                    && !stop.load(Ordering::SeqCst)
                    && Instant::now() < until
                {
                    thread::sleep(Duration::from_millis(10));
                }
                if !matches!(cut, Some(Cut::HoldFlush { .. })) || to.write_all(&tail[old.max(at)..]).is_err()
                {
                    break;
                }
                total += n as u64;
                flushes = *nth;
                continue;
            }
            flushes += starts.len();
            tail.drain(..tail.len().saturating_sub(FLUSH_HEADER.len() - 1));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        total += n as u64;
        if limit == Some(total) {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
        for h in self.pumps.lock().unwrap().drain(..) {
            let _ = h.join();
        }
    }
}

/// Reads random 64 KiB blocks until the connection ends or `deadline`; returns (reads done,
/// problems seen).
fn reader(addr: SocketAddr, expected: Arc<Vec<u8>>, deadline: Instant) -> (u64, Vec<String>) {
    let mut problems = Vec::new();
    let mut c = match Nbd::connect(addr) {
        Ok(c) => c,
        Err(e) => return (0, vec![format!("connect: {e}")]),
    };
    let mut rng = XorShift::new(77);
    let len = 64 * KIB;
    let blocks = (expected.len() as u64 - len) / BLOCK;
    let mut reads = 0;
    while Instant::now() < deadline && problems.len() < 10 {
        let off = (rng.next_u64() % blocks) * BLOCK;
        match c.read(off, len as u32) {
            Ok(Ok(data)) => {
                if data[..] != expected[off as usize..(off + len) as usize] {
                    problems.push(format!("wrong data read at {off}"));
                }
                reads += 1;
            }
            // The handover: the source refuses what it read but will not serve any more.
            Ok(Err(ESHUTDOWN)) => break,
            Ok(Err(e)) => problems.push(format!("error reply {e} to a read at {off}")),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                problems.push(format!("read at {off} unanswered: {e}"));
                break;
            }
            Err(_) => break, // the source closed the connection at the handover
        }
    }
    (reads, problems)
}

#[test]
fn migration_cut_mid_way_is_retried_and_readers_see_correct_data() {
    const SIZE: u64 = 64 * MIB;
    let Pair { dir: _dir, src_file, dst_file, src_sock, mut src, mut dst, .. } =
        pair("mirror-relay", SIZE, 21, &[]);
    let expected = Arc::new(fs::read(&src_file).expect("read source"));

    let relay = Relay::start(dst.addr(), 20 * MIB);

    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    let (addr, exp) = (src.addr(), Arc::clone(&expected));
    let rd = thread::spawn(move || reader(addr, exp, deadline));
    thread::sleep(Duration::from_millis(100));

    start_mirror(&src_sock, relay.port, &[]);
    assert_migration_completes(&mut src, &mut dst);
    let (reads, problems) = rd.join().expect("reader thread");
    let accepted = relay.accepted.load(Ordering::SeqCst);
    drop(relay);

    assert!(problems.is_empty(), "reader on the source saw: {problems:?}");
    assert!(reads > 0, "the reader did not complete a single read");
    assert!(accepted >= 2, "the relay saw {accepted} connection(s): the cut attempt was not retried");
    assert_files_equal(&src_file, &dst_file);
}

/// The source pipelines many small WRITE / WRITE_ZEROES requests when the data is fragmented
/// (random 4 KiB writes): a WRITE whose header arrives just as the destination connection reaches
/// its in-flight limit (1024 requests) must still be read with its own payload.
#[test]
fn destination_takes_a_write_arriving_at_the_in_flight_request_limit() {
    const ZEROES: u64 = 1023;
    let dir = TempDir::new("mirror-pipeline");
    let dst_file = dir.join("dst.img");
    make_sparse_file(&dst_file, 16 * MIB);
    let mut dst = listen(&dst_file, None, &[]);
    let mut c = Nbd::connect(dst.addr()).expect("connect");
    c.sock.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");

    // One send: 1023 WRITE_ZEROES, a 4 KiB WRITE (the 1024th request), a FLUSH.
    let mut m = Vec::new();
    for i in 0..ZEROES {
        m.extend_from_slice(&Nbd::request_bytes(0, CMD_WRITE_ZEROES, i + 1, i * BLOCK, BLOCK as u32));
    }
    let (woff, data) = (8 * MIB, random_bytes(BLOCK as usize, 9));
    m.extend_from_slice(&Nbd::request_bytes(0, CMD_WRITE, ZEROES + 1, woff, BLOCK as u32));
    m.extend_from_slice(&data);
    m.extend_from_slice(&Nbd::request_bytes(0, CMD_FLUSH, ZEROES + 2, 0, 0));
    c.sock.write_all(&m).expect("send the pipeline");

    let mut answered = std::collections::HashSet::new();
    while answered.len() < (ZEROES + 2) as usize {
        match c.read_reply() {
            Ok(Reply::Simple { error: 0, cookie }) => {
                assert!(answered.insert(cookie), "cookie {cookie} twice")
            }
            Ok(r) => panic!("unexpected reply {r:?} after {} replies", answered.len()),
            Err(e) => panic!(
                "{} of {} pipelined requests answered, then: {e} (missing: {:?})",
                answered.len(),
                ZEROES + 2,
                (1..=ZEROES + 2).filter(|k| !answered.contains(k)).collect::<Vec<_>>()
            ),
        }
    }
    assert_file_range(&dst_file, woff, &data, "the pipelined WRITE");
    dst.assert_alive("after a long pipeline");
}

#[test]
fn clients_held_by_a_freeze_go_on_when_the_attempt_fails() {
    let Pair { dir: _dir, src_file, src_sock, mut src, dst, .. } =
        pair("mirror-freeze-fail", 8 * MIB, 131, &[]);
    // Nothing writes, so pass 0 ends with a checkpoint FLUSH and the freeze comes next: the
    // second FLUSH is the final one, sent while clients are held.
    let release = Arc::new(AtomicBool::new(false));
    // Retries are turned away, so the source stays in its retry loop until `break`.
    let relay = Relay::start_full(dst.addr(), Cut::AtFlush { n: 2, release: Arc::clone(&release) }, false);
    let mut c = Nbd::connect(src.addr()).expect("connect to the source");
    start_mirror(&src_sock, relay.port, &[]);
    assert!(src.wait_for_line("freezing clients", MIGRATION_TIMEOUT), "no freeze: {}", src.stderr_text());

    // A request arriving during the freeze waits...
    let cookie = c.cookie();
    c.send_request(0, CMD_READ, cookie, MIB, 4096).expect("send READ during the freeze");
    thread::sleep(Duration::from_millis(300));
    // ...until the attempt fails (the relay drops the connection): then it is answered.
    release.store(true, Ordering::SeqCst);
    assert!(
        src.wait_for_line("attempt failed", IO_TIMEOUT),
        "the attempt did not fail: {}",
        src.stderr_text()
    );
    let got = c.read_read_reply(cookie, MIB, 4096).expect("reply to the READ held by the freeze");
    assert_eq!(got.expect("read ok"), read_at(&src_file, MIB, 4096));
    assert_eq!(c.read(0, 4096).expect("io").expect("read after"), read_at(&src_file, 0, 4096));

    cli(&["break", "-s", s(&src_sock)]).assert_success("flexnbd break");
    assert_eq!(
        c.read(2 * MIB, 4096).expect("io").expect("read after break"),
        read_at(&src_file, 2 * MIB, 4096)
    );
    src.assert_alive("after the failed freeze");
    drop(relay);
    drop(dst);
}

#[test]
fn a_retry_copies_everything_again_when_another_sender_wrote_to_the_destination() {
    let Pair { dir: _dir, src_file, dst_file, src_sock, mut src, mut dst, .. } =
        pair("mirror-two-senders", 8 * MIB, 141, &[]);
    let release = Arc::new(AtomicBool::new(false));
    let relay = Relay::start_full(dst.addr(), Cut::AtFlush { n: 2, release: Arc::clone(&release) }, true);
    start_mirror(&src_sock, relay.port, &[]);
    // Our source has checkpointed everything and is frozen on its final FLUSH (held by the relay).
    assert!(src.wait_for_line("freezing clients", MIGRATION_TIMEOUT), "no freeze: {}", src.stderr_text());

    // Meanwhile another sender (an operator's mistake) takes the destination over and writes.
    let mut b = declare_sender(dst.addr(), 0x1234_5678);
    assert_eq!(b.write(0, &random_bytes(MIB as usize, 142), 0).expect("io"), 0, "second sender's write");
    assert_eq!(b.flush().expect("io"), 0);
    drop(b);
    release.store(true, Ordering::SeqCst);

    // The source's retry reaches the same process, but its copy there is no longer its own:
    // it must send everything again rather than resume.
    assert_migration_completes(&mut src, &mut dst);
    assert!(
        !src.stderr_text().contains("kept what it acknowledged"),
        "the source resumed on a destination another sender wrote to"
    );
    assert_files_equal(&src_file, &dst_file);
    drop(relay);
}

// ---------------------------------------------------------------------------------------------
// 3. Destination killed mid-way and restarted on the same port
// ---------------------------------------------------------------------------------------------

/// Polls status until the running migration has less than `below` bytes left; it must still be
/// running at every poll, and get there within `within`.
fn wait_for_bytes_left_below(src_sock: &Path, below: u64, within: Duration) {
    let until = Instant::now() + within;
    loop {
        let st = status(src_sock);
        assert_eq!(field(&st, "is_mirroring"), "true", "migration ended too early: {st:?}");
        if int_field(&st, "migration_bytes_left") < below {
            return;
        }
        assert!(Instant::now() < until, "no progress within {within:?}: {st:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn destination_killed_mid_way_and_restarted_still_completes() {
    const SIZE: u64 = 64 * MIB;
    let Pair { dir: _dir, src_file, dst_file, src_sock, mut src, mut dst, .. } =
        pair("mirror-kill", SIZE, 31, &[]);

    let port = dst.port();
    start_mirror(&src_sock, port, &["--max-bps", &(16 * MIB).to_string()]);

    // Wait until some data has been acknowledged, then kill the destination outright.
    wait_for_bytes_left_below(&src_sock, SIZE, Duration::from_secs(10));
    let st = dst.stop_with(libc::SIGKILL, IO_TIMEOUT);
    assert!(!st.success(), "killed listen: {}", describe_status(st));

    // The source keeps trying (nothing listens for now).
    thread::sleep(Duration::from_millis(1500));
    src.assert_alive("while its destination was down");
    let st = status(&src_sock);
    assert_eq!(field(&st, "is_mirroring"), "true", "source gave up after the destination died: {st:?}");
    // No checkpoint was reached, so the next attempt copies everything: the status says so
    // rather than showing the dead attempt's figures.
    assert_eq!(int_field(&st, "migration_bytes_left"), SIZE, "while retrying: {st:?}");
    assert_eq!(field(&st, "migration_retrying"), "true", "nothing listens on the port: {st:?}");
    assert!(int_field(&st, "migration_failed_attempts") >= 1, "after its destination died: {st:?}");

    let mut dst2 = listen_on_port(&dst_file, port, None);
    // Lift the limit so the retry is quick.
    let out = cli(&["mirror-speed", "-s", s(&src_sock), "--max-bps", "0"]);
    out.assert_success("flexnbd mirror-speed --max-bps 0");
    assert_migration_completes(&mut src, &mut dst2);
    assert_files_equal(&src_file, &dst_file);
}

// ---------------------------------------------------------------------------------------------
// 4. break / mirror cycles
// ---------------------------------------------------------------------------------------------

#[test]
fn break_and_mirror_again_three_times_then_complete() {
    const SIZE: u64 = 32 * MIB;
    let Pair { dir: _dir, src_file, dst_file, src_sock, mut src, mut dst, .. } =
        pair("mirror-break", SIZE, 41, &[]);

    let out = cli(&["break", "-s", s(&src_sock)]);
    out.assert_failure_with("not mirroring", "break without a migration");

    for round in 1..=3 {
        start_mirror(&src_sock, dst.port(), &["--max-bps", &(4 * MIB).to_string()]);
        let st = status(&src_sock);
        assert_eq!(field(&st, "is_mirroring"), "true", "round {round}, after mirror: {st:?}");
        if round == 1 {
            let out = mirror(&src_sock, dst.port(), &[]);
            out.assert_failure_with("mirror already running", "a second mirror while one runs");
        }
        thread::sleep(Duration::from_millis(200));
        let out = cli(&["break", "-s", s(&src_sock)]);
        out.assert_success("flexnbd break");
        assert!(out.stdout.contains("mirror stopped"), "round {round}: break printed {:?}", out.stdout);
        let st = status(&src_sock);
        assert_eq!(field(&st, "is_mirroring"), "false", "round {round}, after break: {st:?}");
        assert!(
            !st.contains_key("migration_bytes_left"),
            "round {round}: migration keys after break: {st:?}"
        );
        src.assert_alive("after break");
        dst.assert_alive("after the source broke off a migration");
        // The source keeps serving normally.
        let mut c = Nbd::connect(src.addr()).expect("connect to the source after break");
        let got = c.read(MIB, 4096).expect("read io").expect("read after break");
        assert_eq!(got, read_at(&src_file, MIB, 4096), "round {round}: read after break");
    }
    start_mirror(&src_sock, dst.port(), &[]);
    assert_migration_completes(&mut src, &mut dst);
    assert_files_equal(&src_file, &dst_file);
}

// ---------------------------------------------------------------------------------------------
// 5. Refusals, a plain client on the listener, --unlink, tiny files, status, --bind
// ---------------------------------------------------------------------------------------------

#[test]
fn plain_clients_do_not_end_a_listen_server_but_a_signal_fails_it() {
    let dir = TempDir::new("mirror-listen-read");
    let (dst_file, dst_sock) = (dir.join("dst.img"), dir.join("dst.sock"));
    make_random_file(&dst_file, 4 * MIB, 51);
    let mut dst = listen(&dst_file, Some(&dst_sock), &[]);
    let port = dst.port().to_string();

    // `flexnbd read` (stdout to a file: the data is binary).
    let out_file = dir.join("read.out");
    let mut child = Command::new(flexnbd_bin())
        .args(["read", "-l", "127.0.0.1", "-p", &port, "-F", "4096", "-S", "8192"])
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_file).expect("create read.out"))
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn flexnbd read");
    let st = wait_child(&mut child, CLI_TIMEOUT);
    if st.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(st.is_some_and(|s| s.success()), "flexnbd read from a listen server: {st:?}");
    assert!(
        fs::read(&out_file).expect("read.out") == read_at(&dst_file, 4096, 8192),
        "flexnbd read: wrong bytes"
    );

    // A plain newstyle client that writes, flushes and disconnects cleanly is no migration either.
    let mut c = Nbd::connect(dst.addr()).expect("connect");
    assert_eq!(c.write(0, &random_bytes(4096, 5), 0).expect("write io"), 0);
    assert_eq!(c.flush().expect("flush io"), 0);
    c.disconnect().expect("disc");
    wait_closed(&mut c.sock, Duration::from_secs(5)).expect("closed after DISC");

    thread::sleep(Duration::from_millis(500));
    dst.assert_alive("after plain clients read, wrote and disconnected");
    let st = status(&dst_sock);
    assert_eq!(field(&st, "has_control"), "false", "listen status: {st:?}");
    assert_eq!(field(&st, "is_mirroring"), "false", "listen status: {st:?}");

    // Stopped before any migration completed: a failure.
    let st = dst.stop_with(libc::SIGTERM, IO_TIMEOUT);
    assert!(st.code().is_some_and(|c| c != 0), "listen stopped by SIGTERM: {}", describe_status(st));
}

#[test]
fn size_mismatch_is_refused_once() {
    let dir = TempDir::new("mirror-size");
    let (src_file, dst_file, src_sock) = (dir.join("src.img"), dir.join("dst.img"), dir.join("src.sock"));
    make_random_file(&src_file, 4 * MIB, 61);
    make_sparse_file(&dst_file, 4 * MIB + 4096);
    let mut src = serve(&src_file, &src_sock);
    let mut dst = listen(&dst_file, None, &[]);

    let out = mirror(&src_sock, dst.port(), &[]);
    out.assert_failure_with("Remote size does not match local size", "mirror to a different size");
    thread::sleep(Duration::from_secs(3));
    let n = connections_logged(&dst);
    assert!(n <= 2, "the destination saw {n} connections in 3 s: the refused mirror retries");
    let st = status(&src_sock);
    assert_eq!(field(&st, "is_mirroring"), "false", "after a refused mirror: {st:?}");
    src.assert_alive("after a refused mirror");
    dst.assert_alive("after a refused mirror");
}

#[test]
fn nothing_listening_is_reported_as_failed_to_connect() {
    let (_dir, _, src_sock, mut src) = source("mirror-refused", MIB, 71);
    let out = mirror(&src_sock, unused_port(), &[]);
    out.assert_failure_with("Mirror failed to connect", "mirror to a closed port");
    let st = status(&src_sock);
    assert_eq!(field(&st, "is_mirroring"), "false", "after a failed mirror: {st:?}");
    src.assert_alive("after a failed mirror");
}

#[test]
fn a_killed_mirror_commands_answer_does_not_reach_the_next_control_session() {
    let (_dir, _, src_sock, mut src) = source("mirror-killed-cli", MIB, 74);
    // A peer that never greets: the mirror's answer ("Remote server failed to respond") comes
    // after about 5 s, long after its command was killed.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("local_addr").port().to_string();
    let mut m = Command::new(flexnbd_bin())
        .args(["mirror", "-l", "127.0.0.1", "-p", &port, "-s", s(&src_sock)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn flexnbd mirror");
    thread::sleep(Duration::from_millis(500));
    let _ = m.kill();
    let _ = m.wait();
    thread::sleep(Duration::from_millis(200));

    // The next session (likely in the same slot) sends its request only after the answer is due.
    let mut c = std::os::unix::net::UnixStream::connect(&src_sock).expect("connect to the control socket");
    c.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    c.write_all(b"status\n").expect("send the first line");
    let until = Instant::now() + Duration::from_secs(10);
    while field(&status(&src_sock), "is_mirroring") == "true" {
        assert!(Instant::now() < until, "the mirror to a silent peer never gave up");
        thread::sleep(Duration::from_millis(100));
    }
    c.write_all(b"\n").expect("end the request");
    let mut reply = String::new();
    let _ = c.read_to_string(&mut reply);
    assert!(reply.starts_with("0: "), "status answered with {reply:?}");
    assert!(reply.contains("is_mirroring=false"), "status answered with {reply:?}");
    src.assert_alive("after a killed mirror command");
    drop(silent);
}

#[test]
fn a_listen_server_takes_writes_only_from_its_sender_once_one_declared_itself() {
    let dir = TempDir::new("mirror-listen-writes");
    let dst_file = dir.join("dst.img");
    make_random_file(&dst_file, 4 * MIB, 75);
    let dst = listen(&dst_file, None, &[]);
    // Before any migration a plain client may write (the incoming copy overwrites it all).
    let mut plain = Nbd::connect(dst.addr()).expect("connect");
    assert_eq!(plain.write(0, &[7u8; 4096], 0).expect("io"), 0, "write before any sender");
    // A WRITE whose header arrives now but whose data is only complete once a sender is there.
    let mut straddler = Nbd::connect(dst.addr()).expect("connect");
    let cookie = straddler.cookie();
    straddler
        .sock
        .write_all(&Nbd::request_bytes(0, CMD_WRITE, cookie, 2 * MIB, 4096))
        .and_then(|()| straddler.sock.write_all(&[3u8; 2048]))
        .expect("send half a WRITE");

    let mut sender = declare_sender(dst.addr(), 0x77);

    // From now on a plain client's write would land in the middle of the copy: refused.
    let before = read_at(&dst_file, MIB, 4096);
    assert_eq!(plain.write(MIB, &[9u8; 4096], 0).expect("io"), EPERM, "plain write during a migration");
    assert_eq!(plain.trim(MIB, 4096).expect("io"), EPERM, "plain trim during a migration");
    assert_eq!(plain.write_zeroes(MIB, 4096, 0).expect("io"), EPERM, "plain write_zeroes during a migration");
    assert_eq!(plain.read(MIB, 4096).expect("io").expect("plain read"), before, "plain read");
    let mut late = Nbd::connect(dst.addr()).expect("connect a later plain client");
    assert_eq!(late.write(0, &[9u8; 512], 0).expect("io"), EPERM, "a later plain client's write");
    assert_eq!(sender.write(MIB, &[5u8; 4096], 0).expect("io"), 0, "the sender's write");
    assert_eq!(sender.write(2 * MIB, &[5u8; 4096], 0).expect("io"), 0, "the sender's write");
    assert_eq!(sender.flush().expect("io"), 0);
    straddler.sock.write_all(&[3u8; 2048]).expect("send the rest of the WRITE");
    assert_eq!(straddler.read_status(cookie).expect("io"), EPERM, "a WRITE completed after the sender came");
    assert_eq!(read_at(&dst_file, MIB, 4096), vec![5u8; 4096]);
    assert_eq!(read_at(&dst_file, 2 * MIB, 4096), vec![5u8; 4096], "the straddling WRITE landed");

    // When an attempt breaks off (no DISC: a clean goodbye after a flush would complete the
    // migration), plain writes are taken again; the next attempt then copies everything.
    let _ = sender.sock.shutdown(Shutdown::Both);
    drop(sender);
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let st = plain.write(3 * MIB, &[8u8; 4096], 0).expect("io");
        if st == 0 {
            break;
        }
        assert!(Instant::now() < until, "plain writes still refused after the sender left: {st}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// The final pass may go with FUA instead of a second FLUSH: the listen server says so in its
/// ACK to FlexnbdSender, and completes on a goodbye after FLUSH then FUA writes; a write without
/// FUA after the FLUSH is not durable, so that goodbye completes nothing.
#[test]
fn a_listen_server_counts_fua_writes_after_a_flush_as_durable_for_the_handover() {
    let dir = TempDir::new("mirror-fua-handover");
    let dst_file = dir.join("dst.img");
    make_sparse_file(&dst_file, 4 * MIB);
    let mut dst = listen(&dst_file, None, &[]);

    // Not durable: FLUSH, then a plain write, then goodbye.
    let (mut sender, features) = declare_sender_with_features(dst.addr(), 0x99);
    let features = features.expect("the ACK to FlexnbdSender carries 8 bytes of feature bits");
    assert_eq!(features & SENDER_FEATURE_FUA_HANDOVER, SENDER_FEATURE_FUA_HANDOVER, "features {features:#x}");
    assert_eq!(sender.write(0, &[1u8; 4096], 0).expect("io"), 0);
    assert_eq!(sender.flush().expect("io"), 0);
    assert_eq!(sender.write(MIB, &[2u8; 4096], CMD_FLAG_FUA).expect("io"), 0, "FUA after FLUSH");
    assert_eq!(sender.write(2 * MIB, &[3u8; 4096], 0).expect("io"), 0, "no FUA after FLUSH");
    sender.disconnect().expect("DISC");
    wait_closed(&mut sender.sock, Duration::from_secs(5)).expect("closed after DISC");
    thread::sleep(Duration::from_millis(300));
    dst.assert_alive("after a goodbye with a write not flushed");

    // Durable: FLUSH, then only FUA writes, then goodbye: complete without a second FLUSH.
    let mut sender = declare_sender(dst.addr(), 0x99);
    assert_eq!(sender.write(0, &[4u8; 4096], 0).expect("io"), 0);
    assert_eq!(sender.flush().expect("io"), 0);
    assert_eq!(sender.write(MIB, &[5u8; 4096], CMD_FLAG_FUA).expect("io"), 0);
    assert_eq!(sender.write_zeroes(2 * MIB, 4096, CMD_FLAG_FUA).expect("io"), 0);
    sender.disconnect().expect("DISC");
    assert_exits_zero(&mut dst, "listen after FLUSH, FUA writes and DISC", Duration::from_secs(10));
    assert_eq!(read_at(&dst_file, MIB, 4096), vec![5u8; 4096]);
    assert_eq!(read_at(&dst_file, 2 * MIB, 4096), vec![0u8; 4096]);
}

#[test]
fn a_sender_that_declares_itself_twice_still_lets_plain_writes_back_when_it_goes() {
    let dir = TempDir::new("mirror-declare-twice");
    let dst_file = dir.join("dst.img");
    make_random_file(&dst_file, MIB, 76);
    let dst = listen(&dst_file, None, &[]);
    let mut plain = Nbd::connect(dst.addr()).expect("connect");
    let mut n = Negotiation::start(dst.addr()).expect("sender: greeting");
    for _ in 0..2 {
        let r = n.option(0x4658_0001, &[]).expect("sender: migrate option");
        assert!(r.last().is_some_and(|r| r.typ == REP_ACK), "sender refused: {r:?}");
    }
    assert_eq!(plain.write(0, &[1u8; 512], 0).expect("io"), EPERM, "plain write while a sender is there");
    let _ = n.sock.shutdown(Shutdown::Both);
    drop(n);
    let until = Instant::now() + Duration::from_secs(5);
    while plain.write(0, &[1u8; 512], 0).expect("io") != 0 {
        assert!(Instant::now() < until, "plain writes still refused after the only sender left");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn mirroring_a_server_to_itself_is_refused() {
    let (_dir, src_file, src_sock, mut src) = source("mirror-self", 4 * MIB, 73);
    let out = mirror(&src_sock, src.port(), &[]);
    out.assert_failure_with("Mirror target is this server itself", "mirror to the server's own port");
    let st = status(&src_sock);
    assert_eq!(field(&st, "is_mirroring"), "false", "after a refused self mirror: {st:?}");
    assert_eq!(field(&st, "clients_allowed"), "true", "after a refused self mirror: {st:?}");
    let mut c = Nbd::connect(src.addr()).expect("connect after a refused self mirror");
    assert_eq!(c.read(0, 4096).expect("io").expect("read"), read_at(&src_file, 0, 4096));

    // Through a forwarder (or NAT) the addresses do not match, but the migration option does.
    let relay = Relay::start(src.addr(), u64::MAX);
    let out = mirror(&src_sock, relay.port, &[]);
    out.assert_failure_with("Mirror target is this server itself", "self mirror through a relay");
    assert!(src.wait_for_line("own migration connection", IO_TIMEOUT), "{}", src.stderr_text());
    let until = Instant::now() + IO_TIMEOUT;
    while field(&status(&src_sock), "is_mirroring") == "true" {
        assert!(Instant::now() < until, "the self mirror through a relay never stopped");
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(field(&status(&src_sock), "clients_allowed"), "true");
    assert_eq!(c.read(MIB, 4096).expect("io").expect("read"), read_at(&src_file, MIB, 4096));
    src.assert_alive("after a refused self mirror through a relay");
    drop(relay);
}

#[test]
fn a_destination_that_never_says_hello_is_reported_as_not_responding() {
    let (_dir, _, src_sock, mut src) = source("mirror-silent", MIB, 72);
    // Accepts (the kernel completes the handshake from the backlog) and never writes a byte.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("local_addr").port();
    let t0 = Instant::now();
    let out = mirror(&src_sock, port, &[]);
    out.assert_failure_with("Remote server failed to respond", "mirror to a silent peer");
    assert!(t0.elapsed() < Duration::from_secs(15), "took {:?} to give up", t0.elapsed());
    assert_eq!(field(&status(&src_sock), "is_mirroring"), "false");
    src.assert_alive("after a silent destination");
    drop(silent);
}

#[test]
fn unlink_removes_the_source_file_after_success() {
    const SIZE: u64 = 8 * MIB;
    let Pair { dir: _dir, src_file, dst_file, src_sock, mut src, mut dst, .. } =
        pair("mirror-unlink", SIZE, 81, &[]);
    let original = fs::read(&src_file).expect("read source");
    start_mirror(&src_sock, dst.port(), &["--unlink"]);
    assert_migration_completes(&mut src, &mut dst);
    assert!(!src_file.exists(), "--unlink: {} still exists after the migration", src_file.display());
    assert!(
        fs::read(&dst_file).expect("read destination") == original,
        "destination differs from the source"
    );
}

#[test]
fn a_1000_byte_file_migrates() {
    let Pair { dir: _dir, src_file, dst_file, src_sock, mut src, mut dst, .. } =
        pair("mirror-tiny", 1000, 91, &[]);
    start_mirror(&src_sock, dst.port(), &[]);
    assert_migration_completes(&mut src, &mut dst);
    assert_files_equal(&src_file, &dst_file);
}

/// A plain NBD server (here a flexnbd `serve`, which refuses the migration option like any
/// other server) is still a valid target: the data arrives and the source hands over, but the
/// source says once that nobody there will take over.
#[test]
fn mirroring_to_a_plain_nbd_server_warns_once_and_completes() {
    const SIZE: u64 = 4 * MIB;
    let (dir, src_file, src_sock, mut src) = source("mirror-plain", SIZE, 92);
    let dst_file = dir.join("dst.img");
    make_sparse_file(&dst_file, SIZE);
    let mut dst = Server::start(&dst_file, &[]);
    start_mirror(&src_sock, dst.port(), &[]);
    assert_exits_zero(&mut src, "source after mirroring to a plain server", MIGRATION_TIMEOUT);
    assert_files_equal(&src_file, &dst_file);
    let warned = src.count_lines("is not a flexnbd listen server");
    assert_eq!(warned, 1, "expected one warning about the plain target; stderr:\n{}", src.stderr_text());
    dst.assert_alive("a plain destination keeps serving after the handover");
}

#[test]
fn status_shows_progress_and_speed_limit_while_mirroring() {
    const SIZE: u64 = 32 * MIB;
    const LIMIT: u64 = 4 * MIB;
    let Pair { dir: _dir, src_file, dst_file, src_sock, mut src, mut dst, .. } =
        pair("mirror-status", SIZE, 101, &[]);
    start_mirror(&src_sock, dst.port(), &["--max-bps", &LIMIT.to_string()]);

    thread::sleep(Duration::from_millis(1200));
    let st = status(&src_sock);
    assert_eq!(field(&st, "is_mirroring"), "true", "{st:?}");
    assert_eq!(int_field(&st, "migration_speed_limit"), LIMIT, "{st:?}");
    for key in ["migration_speed", "migration_duration", "migration_seconds_left", "migration_bytes_left"] {
        int_field(&st, key);
    }
    let left = int_field(&st, "migration_bytes_left");
    assert!(left > 0 && left <= SIZE, "migration_bytes_left={left} for a {SIZE}-byte file: {st:?}");
    assert!(int_field(&st, "migration_duration") >= 1, "migration_duration after 1.2 s: {st:?}");
    let speed = int_field(&st, "migration_speed");
    assert!(speed <= 3 * LIMIT, "migration_speed={speed} with a limit of {LIMIT}: {st:?}");
    assert_eq!(field(&st, "migration_retrying"), "false", "a first attempt that is copying: {st:?}");
    assert_eq!(int_field(&st, "migration_failed_attempts"), 0, "{st:?}");
    // Nobody writes: the first sweep, in the background.
    assert_eq!(field(&st, "migration_mode"), "background", "{st:?}");
    assert_eq!(int_field(&st, "migration_passes"), 0, "{st:?}");
    assert_eq!(int_field(&st, "migration_active_writes"), 0, "{st:?}");

    let out = cli(&["mirror-speed", "-s", s(&src_sock), "--max-bps", "0"]);
    out.assert_success("flexnbd mirror-speed --max-bps 0");
    let st = status(&src_sock);
    assert!(!st.contains_key("migration_speed_limit"), "limit still shown after removing it: {st:?}");
    assert_migration_completes(&mut src, &mut dst);
    assert_files_equal(&src_file, &dst_file);
}

#[test]
fn mirror_with_bind_reaches_a_destination_with_an_acl() {
    const SIZE: u64 = 2 * MIB;
    let Pair { dir: _dir, src_file, dst_file, src_sock, mut src, mut dst, .. } =
        pair("mirror-bind", SIZE, 111, &["127.0.0.2"]);

    // From 127.0.0.1 the destination closes before its hello.
    let out = mirror(&src_sock, dst.port(), &[]);
    out.assert_failure_with("Mirror was rejected", "mirror from an address the ACL refuses");
    dst.assert_alive("after refusing a sender by ACL");

    start_mirror(&src_sock, dst.port(), &["--bind", "127.0.0.2"]);
    assert_migration_completes(&mut src, &mut dst);
    assert_files_equal(&src_file, &dst_file);
}

// ---------------------------------------------------------------------------------------------
// 6. An original (oldstyle) sender
// ---------------------------------------------------------------------------------------------

/// Behaves like the original flexnbd's mirror: reads the 152-byte oldstyle hello, WRITEs all of
/// `data` (8 MiB at most per request, one at a time), then, if `goodbye`, sends NBD_CMD_DISC;
/// then closes.
fn original_sender(addr: SocketAddr, data: &[u8], goodbye: bool) {
    let mut c = Nbd::connect_oldstyle(addr).expect("oldstyle hello");
    assert_eq!(c.size, data.len() as u64, "size in the oldstyle hello");
    for (i, chunk) in data.chunks(8 * MIB as usize).enumerate() {
        let off = i as u64 * 8 * MIB;
        assert_eq!(c.write(off, chunk, 0).expect("write io"), 0, "write at {off}");
    }
    if goodbye {
        c.disconnect().expect("DISC");
    }
    let _ = c.sock.shutdown(Shutdown::Both);
}

#[test]
fn oldstyle_listen_completes_on_an_original_senders_clean_disconnect() {
    const SIZE: u64 = 4 * MIB;
    let dir = TempDir::new("mirror-oldstyle");
    let dst_file = dir.join("dst.img");
    make_sparse_file(&dst_file, SIZE);
    let mut dst = listen(&dst_file, None, &["--oldstyle"]);

    // A sender that drops without saying goodbye has not completed anything.
    original_sender(dst.addr(), &random_bytes(SIZE as usize, 1), false);
    // Nor has a client that only reads and then says goodbye.
    let mut reader = Nbd::connect_oldstyle(dst.addr()).expect("oldstyle hello");
    assert!(reader.read(0, 4096).expect("read io").is_ok(), "oldstyle read");
    reader.disconnect().expect("DISC");
    wait_closed(&mut reader.sock, Duration::from_secs(5)).expect("closed after DISC");
    thread::sleep(Duration::from_millis(500));
    dst.assert_alive("after an oldstyle sender dropped without NBD_CMD_DISC and a reader left");

    let data = random_bytes(SIZE as usize, 2);
    original_sender(dst.addr(), &data, true);
    assert_exits_zero(&mut dst, "oldstyle listen after the sender's DISC", Duration::from_secs(10));
    assert!(fs::read(&dst_file).expect("read destination") == data, "destination differs from what was sent");
}

/// A cut after a checkpoint, reconnecting to the same destination process, re-sends only what
/// the checkpoint does not cover, not the whole export (the source logs how much).
#[test]
fn a_retry_to_the_same_destination_resumes_instead_of_copying_everything() {
    const SIZE: u64 = 64 * MIB;
    const HOT: u64 = 24 * MIB;
    let Pair { dir: _dir, src_file, dst_file, src_sock: ssock, dst_sock: dsock, mut src, mut dst } =
        pair_with_sockets("mirror-resume", SIZE, 77);

    // A writer dirtying a 24 MiB window keeps a second pass busy after the sweep.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (addr, stop) = (src.addr(), stop.clone());
        thread::spawn(move || {
            let mut c = Nbd::connect(addr).expect("writer connects");
            let mut rng = XorShift::new(5);
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut acked = 0u64;
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                let off = (rng.next_u64() % (HOT / BLOCK)) * BLOCK;
                match c.write(off, &pattern(rng.next_u64()), 0) {
                    Ok(0) => acked += 1,
                    other => panic!("writer got {other:?} before the handover"),
                }
                thread::sleep(Duration::from_millis(1));
            }
            acked
        })
    };

    start_mirror(&ssock, dst.port(), &["--max-bps", "16000000"]);
    assert!(
        src.wait_for_line("checkpoint after pass", Duration::from_secs(30)),
        "no checkpoint was acknowledged; source stderr:\n{}",
        src.stderr_text()
    );
    stop.store(true, Ordering::SeqCst);
    let acked = writer.join().expect("writer thread");
    assert!(acked > 0, "the writer made no writes");
    // Cut the sender off from the destination's side, then let it back in.
    cli(&["acl", "-s", s(&dsock), "127.0.0.9"]).assert_success("acl dropping the sender");
    thread::sleep(Duration::from_millis(200));
    cli(&["acl", "-s", s(&dsock)]).assert_success("acl admitting everyone again");

    assert!(
        src.wait_for_line("re-sending", Duration::from_secs(20)),
        "the retry did not resume; source stderr:\n{}",
        src.stderr_text()
    );
    let line = src.stderr_lines().into_iter().find(|l| l.contains("re-sending")).unwrap_or_default();
    let resent: u64 = line
        .split("re-sending ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the byte count in {line:?}"));
    println!("resumed: {resent} of {SIZE} bytes re-sent");
    assert!(resent < SIZE, "a resume must not re-send the whole export ({resent} of {SIZE})");
    cli(&["mirror-speed", "-s", s(&ssock), "--max-bps", "0"]);
    assert_migration_completes(&mut src, &mut dst);
    assert_files_equal(&src_file, &dst_file);
}

// ---------------------------------------------------------------------------------------------
// 8. `mirror --wait`
// ---------------------------------------------------------------------------------------------

/// `flexnbd mirror ... --wait EXTRA...` in the background, stdout and stderr to files.
fn spawn_mirror_wait(
    dir: &TempDir,
    tag: &str,
    sock: &Path,
    port: u16,
    extra: &[&str],
) -> std::process::Child {
    let port = port.to_string();
    let mut args = vec!["mirror", "-l", "127.0.0.1", "-p", &port, "-s", s(sock), "--wait"];
    args.extend_from_slice(extra);
    Command::new(flexnbd_bin())
        .args(&args)
        .stdin(Stdio::null())
        .stdout(fs::File::create(dir.join(&format!("{tag}.out"))).expect("create mirror stdout"))
        .stderr(fs::File::create(dir.join(&format!("{tag}.err"))).expect("create mirror stderr"))
        .spawn()
        .expect("spawn flexnbd mirror --wait")
}

/// Waits (bounded) for a `mirror --wait` child; returns its exit status, stdout and stderr.
fn finish_mirror_wait(
    dir: &TempDir,
    tag: &str,
    child: &mut std::process::Child,
    timeout: Duration,
) -> (std::process::ExitStatus, String, String) {
    let st = wait_child(child, timeout);
    if st.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let out = fs::read_to_string(dir.join(&format!("{tag}.out"))).unwrap_or_default();
    let err = fs::read_to_string(dir.join(&format!("{tag}.err"))).unwrap_or_default();
    let st =
        st.unwrap_or_else(|| panic!("mirror --wait ({tag}) still running after {timeout:?}; stdout {out:?}"));
    assert!(!err.contains("panicked"), "mirror --wait ({tag}) panicked: {err}");
    (st, out, err)
}

/// Waits (bounded by `within`) until the `mirror --wait` child's stdout contains `needle`.
fn wait_for_mirror_output(dir: &TempDir, tag: &str, needle: &str, within: Duration) {
    let until = Instant::now() + within;
    while Instant::now() < until
        && !fs::read_to_string(dir.join(&format!("{tag}.out"))).unwrap_or_default().contains(needle)
    {
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn mirror_wait_reports_progress_and_exits_zero_only_on_handover() {
    let Pair { dir, src_file, dst_file, src_sock: ssock, mut src, mut dst, .. } =
        pair_with_sockets("mirror-wait", 16 * MIB, 91);

    // Slow enough to outlast a progress line (every 5 s when stdout is not a terminal), then
    // stopped with `break`: the waiting client exits non-zero and the source keeps serving.
    let mut m = spawn_mirror_wait(&dir, "broken", &ssock, dst.port(), &["--max-bps", "1000000"]);
    wait_for_mirror_output(&dir, "broken", "bytes left", Duration::from_secs(15));
    cli(&["break", "-s", s(&ssock)]).assert_success("flexnbd break");
    let (st, out, err) = finish_mirror_wait(&dir, "broken", &mut m, CLI_TIMEOUT);
    assert!(
        !st.success(),
        "mirror --wait must fail when the migration is broken: stdout {out:?} stderr {err:?}"
    );
    assert!(out.starts_with("Migration started\n"), "mirror --wait stdout: {out:?}");
    let progress = out.lines().find(|l| l.contains("bytes left")).unwrap_or_else(|| {
        panic!("mirror --wait printed no progress line in 15 s: {out:?}");
    });
    assert!(
        progress.contains('%') && progress.contains("B/s") && progress.contains("ETA"),
        "progress line {progress:?}"
    );
    assert!(err.contains("mirror stopped"), "mirror --wait stderr after break: {err:?}");
    src.assert_alive("after break");
    assert_eq!(field(&status(&ssock), "is_mirroring"), "false");

    // Unthrottled: the waiting client exits 0 once the handover completed.
    let mut m = spawn_mirror_wait(&dir, "done", &ssock, dst.port(), &[]);
    let (st, out, err) = finish_mirror_wait(&dir, "done", &mut m, MIGRATION_TIMEOUT);
    assert!(st.success(), "mirror --wait after a completed migration: {st:?} stdout {out:?} stderr {err:?}");
    assert!(out.starts_with("Migration started\n"), "mirror --wait stdout: {out:?}");
    assert!(out.contains("migration complete"), "mirror --wait stdout: {out:?}");
    assert_migration_completes(&mut src, &mut dst);
    assert_files_equal(&src_file, &dst_file);
}

#[test]
fn mirror_wait_fails_when_the_source_dies() {
    let Pair { dir, src_sock: ssock, mut src, dst, .. } = pair_with_sockets("mirror-wait-dies", 16 * MIB, 92);
    let mut m = spawn_mirror_wait(&dir, "dies", &ssock, dst.port(), &["--max-bps", "1000000"]);
    wait_for_mirror_output(&dir, "dies", "started", Duration::from_secs(10));
    src.stop_with(libc::SIGKILL, IO_TIMEOUT);
    let (st, out, err) = finish_mirror_wait(&dir, "dies", &mut m, CLI_TIMEOUT);
    assert!(!st.success(), "mirror --wait must fail when the source dies: stdout {out:?} stderr {err:?}");
    assert!(err.contains("went away"), "mirror --wait stderr: {err:?}");
}

/// What a paced writer saw: acknowledged writes (offset -> pattern seed), the slowest reply,
/// how it ended.
#[derive(Default)]
struct PacedLog {
    acked: HashMap<u64, u64>,
    slowest: Duration,
    errors: Vec<(u64, u32)>,
    end: String,
}

/// Writes a new 4 KiB pattern to one of the first 16 blocks every 10 ms until the connection
/// ends, an error, `stop` or `deadline`. 64 KiB is below what the source always freezes with,
/// so however slow a loaded machine makes the first pass, the second FLUSH is the final one.
fn paced_writer(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    deadline: Instant,
) -> PacedLog {
    let mut log = PacedLog::default();
    let mut c = match Nbd::connect(addr) {
        Ok(c) => c,
        Err(e) => {
            log.end = format!("connect: {e}");
            return log;
        }
    };
    let mut seq = 0u64;
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        seq += 1;
        let off = (seq % 16) * BLOCK;
        let seed = (7 << 40) | seq;
        let t = Instant::now();
        let r = c.write(off, &pattern(seed), 0);
        log.slowest = log.slowest.max(t.elapsed());
        match r {
            Ok(0) => {
                log.acked.insert(off, seed);
                acked.fetch_add(1, Ordering::SeqCst);
            }
            Ok(ESHUTDOWN) => {
                log.end = "ESHUTDOWN at the handover".into();
                return log;
            }
            Ok(e) => log.errors.push((off, e)),
            Err(e) => {
                log.end = format!("connection ended: {e}");
                return log;
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
    log.end = "stopped".into();
    log
}

/// A destination that hangs during the freeze (SIGSTOP) holds client writes only until the
/// freeze limit: the attempt is abandoned, the held writes go on against the source without an
/// error, and once the destination runs again a new attempt completes with every acknowledged
/// write. The relay holds the final FLUSH so that the test can stop the destination while
/// `status` shows the freeze.
#[test]
fn a_destination_stopped_during_the_freeze_holds_clients_only_until_the_freeze_limit() {
    // Long enough that `status`, polled by a new process each time, sees the freeze on a
    // loaded machine before the limit ends it by itself.
    const FREEZE_LIMIT: Duration = Duration::from_secs(3);
    let Pair { dir: _dir, dst_file, src_sock, mut src, mut dst, .. } =
        pair("mirror-sigstop", 8 * MIB, 151, &[]);
    let release = Arc::new(AtomicBool::new(false));
    let relay = Relay::start_full(dst.addr(), Cut::HoldFlush { n: 2, release: Arc::clone(&release) }, true);
    let (stop, acked) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let deadline = Instant::now() + MIGRATION_TIMEOUT + Duration::from_secs(20);
    let w = {
        let (addr, stop, acked) = (src.addr(), Arc::clone(&stop), Arc::clone(&acked));
        thread::spawn(move || paced_writer(addr, stop, acked, deadline))
    };
    let limit = FREEZE_LIMIT.as_secs().to_string();
    start_mirror(&src_sock, relay.port, &["--freeze-limit", &limit]);
    let st = wait_status(&src_sock, Duration::from_secs(20), |st| {
        st.get("clients_allowed").is_some_and(|v| v == "false")
    });
    assert_eq!(field(&st, "clients_allowed"), "false", "no freeze seen: {st:?}\n{}", src.stderr_text());
    dst.signal(libc::SIGSTOP);
    release.store(true, Ordering::SeqCst);

    let st = wait_status(&src_sock, Duration::from_secs(10), |st| {
        st.get("migration_freezes_abandoned").is_some_and(|n| n != "0")
    });
    assert_eq!(field(&st, "migration_freezes_abandoned"), "1", "{st:?}\n{}", src.stderr_text());
    assert_eq!(field(&st, "clients_allowed"), "true", "{st:?}");
    let before = acked.load(Ordering::SeqCst);
    let until = Instant::now() + Duration::from_secs(5);
    while acked.load(Ordering::SeqCst) < before + 20 && Instant::now() < until {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        acked.load(Ordering::SeqCst) >= before + 20,
        "writes did not go on after the freeze was abandoned"
    );

    dst.signal(libc::SIGCONT);
    assert_migration_completes(&mut src, &mut dst);
    stop.store(true, Ordering::SeqCst);
    let log = w.join().expect("writer");
    drop(relay);
    assert!(log.errors.is_empty(), "writer got error replies: {:?}", log.errors);
    assert!(
        log.slowest <= FREEZE_LIMIT + Duration::from_secs(1),
        "a client write waited {:?} (freeze limit {FREEZE_LIMIT:?}); writer ended: {}",
        log.slowest,
        log.end
    );
    for (&off, &seed) in &log.acked {
        assert_file_range(&dst_file, off, &pattern(seed), "acknowledged write on the destination");
    }
}

/// At the handover, a client with a batch of pipelined writes in the source's socket gets an
/// answer to every one of them (done, or ESHUTDOWN) and then an orderly close, never a reset
/// or a missing reply; what got ESHUTDOWN is on neither side. (A batch sent after the source
/// closed the then idle connection gets no reply at all, and runs nowhere either.)
#[test]
fn pipelined_requests_at_the_handover_are_all_answered() {
    const BATCH: u64 = 16;
    let Pair { dir: _dir, src_file, dst_file, src_sock, mut src, mut dst, .. } =
        pair("mirror-handover-batch", 8 * MIB, 161, &[]);
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    let addr = src.addr();
    let client = thread::spawn(move || {
        let mut c = Nbd::connect(addr).expect("connect");
        let (mut acked, mut refused) = (Vec::new(), Vec::new());
        let mut seq = 0u64;
        while Instant::now() < deadline {
            let mut batch = Vec::new();
            let mut sent = HashMap::new();
            for _ in 0..BATCH {
                seq += 1;
                let (off, seed) = ((seq % 512) * BLOCK, (9 << 40) | seq);
                let cookie = c.cookie();
                batch.extend_from_slice(&Nbd::request_bytes(0, CMD_WRITE, cookie, off, BLOCK as u32));
                batch.extend_from_slice(&pattern(seed));
                sent.insert(cookie, (off, seed));
            }
            if let Err(e) = c.sock.write_all(&batch) {
                return (acked, refused, format!("send failed after {} batches: {e}", seq / BATCH - 1));
            }
            for i in 0..BATCH {
                match c.read_reply() {
                    Ok(Reply::Simple { error, cookie }) => {
                        let w = sent[&cookie];
                        match error {
                            0 => acked.push(w),
                            ESHUTDOWN => refused.push(w),
                            e => return (acked, refused, format!("error {e}")),
                        }
                    }
                    Ok(r) => return (acked, refused, format!("unexpected reply {r:?}")),
                    // A batch sent just as the source closed an idle connection is never read:
                    // no reply at all then, and none of it may run.
                    Err(_) if i == 0 => {
                        refused.extend(sent.into_values());
                        return (acked, refused, "closed before the batch was read".into());
                    }
                    Err(e) => return (acked, refused, format!("reply {i} of {BATCH} missing: {e}")),
                }
            }
            if !refused.is_empty() {
                let mut rest = [0u8; 1];
                return match c.sock.read(&mut rest) {
                    Ok(0) => (acked, refused, "closed".into()),
                    other => (acked, refused, format!("after ESHUTDOWN: {other:?}")),
                };
            }
            thread::sleep(Duration::from_millis(2));
        }
        (acked, refused, "deadline".into())
    });
    thread::sleep(Duration::from_millis(100));
    start_mirror(&src_sock, dst.port(), &[]);
    assert_migration_completes(&mut src, &mut dst);
    let (acked, refused, end) = client.join().expect("client");
    assert!(
        end == "closed" || end.starts_with("send failed") || end == "closed before the batch was read",
        "the client saw: {end}"
    );
    assert!(!acked.is_empty(), "nothing was acknowledged");
    // Each block's last acknowledged pattern is on the destination; refused ones are nowhere.
    let mut last = HashMap::new();
    for &(off, seed) in &acked {
        last.insert(off, seed);
    }
    for (&off, &seed) in &last {
        assert_file_range(&dst_file, off, &pattern(seed), "acknowledged write on the destination");
    }
    for &(off, seed) in &refused {
        for f in [&src_file, &dst_file] {
            assert!(read_at(f, off, BLOCK as usize) != pattern(seed), "a refused write at {off} is in {f:?}");
        }
    }
}
