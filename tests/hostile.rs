//! Hostile-input and load black-box tests: a thousand busy connections, ten thousand idle ones,
//! clients that pipeline reads and never collect the replies, connections reset in the middle of
//! a request, negotiation options whose lengths lie, and a served file that shrinks or stops
//! accepting writes under the server.
//!
//! Every test here starts its own server on loopback with temporary files, bounds every wait in
//! time and every loop in count, and only ever kills the server it started (through the guard).
//! The heavy tests share the machine's descriptors, memory and two cores, so the tests in this
//! file run one at a time (`serial()`), which also keeps the timing assertions meaningful.

mod common;

use common::*;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Barrier, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs the tests of this file one after another (a failed test only poisons the lock).
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn served_random(tag: &str, size: u64, seed: u64) -> (TempDir, PathBuf) {
    let dir = TempDir::new(tag);
    let file = dir.join("disk.img");
    make_random_file(&file, size, seed);
    (dir, file)
}

/// Raises this process's RLIMIT_NOFILE soft limit to its hard limit; returns (soft, hard).
fn raise_nofile() -> (u64, u64) {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0, "getrlimit(RLIMIT_NOFILE)");
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit { rlim_cur: r.rlim_max, rlim_max: r.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                r = want;
            }
        }
    }
    (r.rlim_cur, r.rlim_max)
}

/// The server's resident set size in KiB (VmRSS from /proc/PID/status).
fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status:\n{status}"))
}

/// CPU time (user + system, all threads) the process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/stat: {e}"));
    // Fields after the parenthesised command name start at field 3 (state); utime and stime are
    // fields 14 and 15, in clock ticks.
    let rest = &stat[stat.rfind(')').expect("stat format") + 1..];
    let f: Vec<u64> =
        rest.split_whitespace().skip(11).take(2).map(|x| x.parse().expect("tick count")).collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis((f[0] + f[1]) * 1000 / hz)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// SO_LINGER {on, 0}: closing the socket sends a RST instead of a FIN.
fn set_linger_zero(s: &TcpStream) {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt on a live socket with a pointer to a linger struct of the right size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt(SO_LINGER): {}", io::Error::last_os_error());
}

/// Reset the connection (RST) by closing it with a zero linger time.
fn reset(s: TcpStream) {
    set_linger_zero(&s);
    drop(s);
}

/// A fresh client: handshake + a 4 KiB read compared with the file. Panics (with the server's
/// stderr through the guard) if it fails or takes longer than `within`; returns how long it took.
fn assert_responsive(server: &mut Server, file: &Path, within: Duration, what: &str) -> Duration {
    server.assert_alive(what);
    let t0 = Instant::now();
    let mut c = Nbd::connect(server.addr()).unwrap_or_else(|e| panic!("{what}: fresh client handshake: {e}"));
    let got = c
        .read(0, 4096)
        .unwrap_or_else(|e| panic!("{what}: fresh client read: {e}"))
        .unwrap_or_else(|e| panic!("{what}: fresh client read got NBD error {e}"));
    let took = t0.elapsed();
    assert_eq!(got, read_at(file, 0, 4096), "{what}: fresh client read wrong data");
    assert!(took < within, "{what}: fresh client handshake + read took {took:?} (limit {within:?})");
    took
}

fn assert_no_panic(server: &Server, what: &str) {
    let text = server.stderr_text();
    assert!(
        !text.contains("panicked") && !text.contains("RUST_BACKTRACE"),
        "{what}: the server panicked; stderr:\n{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// 1. A thousand concurrent connections doing I/O
// ---------------------------------------------------------------------------------------------

const BUSY_CONNS: usize = 1000;
const BUSY_THREADS: usize = 20;
const BUSY_ROUNDS: usize = 3;
const BLOCK: usize = 4096;

fn block_data(conn: usize, round: usize) -> Vec<u8> {
    random_bytes(BLOCK, 1_000_000 + (conn * 16 + round) as u64)
}

/// Each round: a 4 KiB WRITE of the connection's own block on every connection, then every
/// reply; then a READ of that block on every connection, then every reply, checked.
/// Where busy connection `i` does its I/O: block 0 is left alone for the fresh clients' reads,
/// which compare it with the file and would race with a writer.
fn busy_block(i: usize) -> u64 {
    ((i + 1) * BLOCK) as u64
}

fn busy_io(conns: &mut [(usize, Nbd)]) -> Result<(), String> {
    for round in 0..BUSY_ROUNDS {
        let mut cookies = Vec::with_capacity(conns.len());
        for (i, c) in conns.iter_mut() {
            let cookie = c.cookie();
            c.send_write(0, cookie, busy_block(*i), &block_data(*i, round))
                .map_err(|e| format!("conn {i} round {round}: send WRITE: {e}"))?;
            cookies.push(cookie);
        }
        for ((i, c), cookie) in conns.iter_mut().zip(&cookies) {
            match c.read_status(*cookie) {
                Ok(0) => {}
                Ok(e) => return Err(format!("conn {i} round {round}: WRITE got NBD error {e}")),
                Err(e) => return Err(format!("conn {i} round {round}: WRITE reply: {e}")),
            }
        }
        cookies.clear();
        for (i, c) in conns.iter_mut() {
            let cookie = c.cookie();
            c.send_request(0, CMD_READ, cookie, busy_block(*i), BLOCK as u32)
                .map_err(|e| format!("conn {i} round {round}: send READ: {e}"))?;
            cookies.push(cookie);
        }
        for ((i, c), cookie) in conns.iter_mut().zip(&cookies) {
            let off = busy_block(*i);
            match c.read_read_reply(*cookie, off, BLOCK as u32) {
                Ok(Ok(d)) if d == block_data(*i, round) => {}
                Ok(Ok(_)) => return Err(format!("conn {i} round {round}: READ returned wrong data")),
                Ok(Err(e)) => return Err(format!("conn {i} round {round}: READ got NBD error {e}")),
                Err(e) => return Err(format!("conn {i} round {round}: READ reply: {e}")),
            }
        }
    }
    Ok(())
}

#[test]
fn thousand_concurrent_connections_doing_io() {
    let _g = serial();
    let (soft, hard) = raise_nofile();
    eprintln!("RLIMIT_NOFILE of the test process: soft {soft}, hard {hard}");
    assert!(soft >= BUSY_CONNS as u64 + 200, "RLIMIT_NOFILE {soft} is too low for {BUSY_CONNS} clients");
    let (_dir, file) = served_random("busy", ((BUSY_CONNS + 1) * BLOCK) as u64, 101);
    // Above the default --max-clients (1024) with the fresh clients on top.
    let mut server = Server::start(&file, &["--max-clients", "2000"]);
    let addr = server.addr();

    // Phase barriers: all connected; all I/O done; main checked a fresh client; release.
    let connected = Barrier::new(BUSY_THREADS + 1);
    let io_done = Barrier::new(BUSY_THREADS + 1);
    let release = Barrier::new(BUSY_THREADS + 1);
    let per = BUSY_CONNS / BUSY_THREADS;
    let t0 = Instant::now();
    let (errors, connect_time, io_time, fresh) = thread::scope(|s| {
        let handles: Vec<_> = (0..BUSY_THREADS)
            .map(|t| {
                let (connected, io_done, release) = (&connected, &io_done, &release);
                s.spawn(move || {
                    // Never panics before the barriers: errors are collected and returned.
                    let mut errs = Vec::new();
                    let mut conns = Vec::with_capacity(per);
                    for i in t * per..(t + 1) * per {
                        match Nbd::connect(addr) {
                            Ok(c) => conns.push((i, c)),
                            Err(e) => errs.push(format!("conn {i}: handshake: {e}")),
                        }
                    }
                    connected.wait();
                    if errs.is_empty()
                        && let Err(e) = busy_io(&mut conns)
                    {
                        errs.push(e);
                    }
                    io_done.wait();
                    release.wait();
                    drop(conns);
                    errs
                })
            })
            .collect();
        connected.wait();
        let connect_time = t0.elapsed();
        // All 1000 connections are open from here until `release`; the first fresh client runs
        // while they do their I/O, the second once they are done. A failure is held until the
        // workers are released (a panic here would leave them waiting at a barrier).
        let during = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            assert_responsive(&mut server, &file, Duration::from_secs(2), "while 1000 connections do I/O")
        }));
        io_done.wait();
        let io_time = t0.elapsed() - connect_time;
        let fresh = during.and_then(|during| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let what = "with 1000 connections open after their I/O";
                (during, assert_responsive(&mut server, &file, Duration::from_secs(2), what))
            }))
        });
        release.wait();
        let errors: Vec<String> =
            handles.into_iter().flat_map(|h| h.join().expect("worker thread")).collect();
        (errors, connect_time, io_time, fresh)
    });
    let fresh = fresh.unwrap_or_else(|p| std::panic::resume_unwind(p));
    eprintln!(
        "{BUSY_CONNS} connections: handshakes in {connect_time:?}, {BUSY_ROUNDS} rounds of 4 KiB \
         write+read on each in {io_time:?}; fresh client handshake+read during their I/O {:?}, \
         after it with all still open {:?}",
        fresh.0, fresh.1
    );
    assert!(
        errors.is_empty(),
        "{} of {BUSY_CONNS} connections failed, first: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    for i in 0..BUSY_CONNS {
        assert_file_range(&file, busy_block(i), &block_data(i, BUSY_ROUNDS - 1), &format!("block {i}"));
    }
    assert_responsive(&mut server, &file, Duration::from_secs(2), "after 1000 connections closed");
    assert_no_panic(&server, "1000 connections");
}

// ---------------------------------------------------------------------------------------------
// 2. Ten thousand idle connections
// ---------------------------------------------------------------------------------------------

const IDLE_WANTED: usize = 10_000;
const IDLE_THREADS: usize = 8;
const IDLE_RSS_LIMIT_KIB: u64 = 64 * 1024;

#[test]
fn ten_thousand_idle_connections() {
    let _g = serial();
    let (soft, hard) = raise_nofile();
    // The server raises its own soft limit to the same hard limit (inherited). Keep a margin
    // for the server's own descriptors and this process's other files.
    let allowed = (soft.min(hard) as usize).saturating_sub(256);
    let n = IDLE_WANTED.min(allowed);
    if n < IDLE_WANTED {
        eprintln!(
            "RLIMIT_NOFILE soft {soft} / hard {hard} does not allow {IDLE_WANTED} connections: \
             opening {n} instead"
        );
    } else {
        eprintln!("RLIMIT_NOFILE soft {soft} / hard {hard}: opening {n} idle connections");
    }
    assert!(n >= 1000, "RLIMIT_NOFILE hard limit {hard} is too low for this test");
    let (_dir, file) = served_random("idle10k", MIB, 102);
    // Idle in negotiation on purpose: no handshake deadline, and no cap below the count.
    let mut server = Server::start(&file, &["--handshake-limit", "0", "--max-clients", "100000"]);
    let addr = server.addr();
    let rss_before = vm_rss_kib(server.pid());

    let t0 = Instant::now();
    let per = n.div_ceil(IDLE_THREADS);
    let results: Vec<(Vec<TcpStream>, Vec<String>)> = thread::scope(|s| {
        let hs: Vec<_> = (0..IDLE_THREADS)
            .map(|t| {
                s.spawn(move || {
                    let mut socks = Vec::with_capacity(per);
                    let mut errs = Vec::new();
                    for i in t * per..((t + 1) * per).min(n) {
                        match TcpStream::connect_timeout(&addr, IO_TIMEOUT) {
                            Ok(mut sock) => {
                                set_timeouts(&sock, IO_TIMEOUT);
                                // Reading the greeting paces the connects to the server's
                                // accepts, so the listen backlog never overflows (a dropped
                                // SYN costs a 1 s retransmit), and shows each one is served.
                                if let Err(e) = read_newstyle_greeting(&mut sock) {
                                    errs.push(format!("idle {i}: greeting: {e}"));
                                }
                                socks.push(sock);
                            }
                            Err(e) => errs.push(format!("idle {i}: connect: {e}")),
                        }
                    }
                    (socks, errs)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("connect thread")).collect()
    });
    let connect_time = t0.elapsed();
    let mut idle = Vec::with_capacity(n);
    let mut errors = Vec::new();
    for (s, e) in results {
        idle.extend(s);
        errors.extend(e);
    }
    assert!(
        errors.is_empty(),
        "{} idle connections failed, first: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    // The server logs each accepted client: wait until it has taken all of them.
    let accepted = server.wait_line_count(": connected", n, Duration::from_secs(20));
    assert_eq!(accepted, n, "the server accepted only {accepted} of {n} idle connections");
    let accept_time = t0.elapsed();

    let (c0, w0) = (cpu_time(server.pid()), Instant::now());
    thread::sleep(Duration::from_secs(1));
    let (cpu, wall) = (cpu_time(server.pid()).saturating_sub(c0), w0.elapsed());
    eprintln!("server CPU over {wall:?} with {n} idle connections: {cpu:?}");
    assert!(
        cpu.as_secs_f64() < 0.1 * wall.as_secs_f64(),
        "server used {cpu:?} of CPU in {wall:?} while idle"
    );
    let took =
        assert_responsive(&mut server, &file, Duration::from_secs(2), "with the idle connections open");
    let rss = vm_rss_kib(server.pid());
    eprintln!(
        "{n} idle connections: connected in {connect_time:?}, all accepted after {accept_time:?}; \
         real client handshake+read {took:?}; server VmRSS {:.1} MiB before, {:.1} MiB with them \
         ({:.0} bytes per connection)",
        mib(rss_before),
        mib(rss),
        (rss.saturating_sub(rss_before) * 1024) as f64 / n as f64
    );
    assert!(
        rss < IDLE_RSS_LIMIT_KIB,
        "server VmRSS {:.1} MiB with {n} idle connections (limit {} MiB)",
        mib(rss),
        IDLE_RSS_LIMIT_KIB / 1024
    );
    // The fresh client's own close is logged too: count from after it.
    let base = server.wait_line_count(": disconnected", 1, Duration::from_secs(2));
    drop(idle);
    let gone = server.wait_line_count(": disconnected", base + n, Duration::from_secs(20)) - base;
    assert_eq!(gone, n, "the server closed only {gone} of {n} idle connections after they closed");
    assert_responsive(&mut server, &file, Duration::from_secs(2), "after the idle connections closed");
    assert_no_panic(&server, "idle connections");
}

// ---------------------------------------------------------------------------------------------
// 3. Slow readers: pipelined READs whose replies are never read
// ---------------------------------------------------------------------------------------------

const SLOW_CLIENTS: usize = 8;
const SLOW_READS: usize = 200;
const SLOW_FILE: u64 = 16 * MIB;
/// The per-connection cap (64 MiB in flight + queued), per slow client, plus 64 MiB margin.
const SLOW_RSS_LIMIT_KIB: u64 = (SLOW_CLIENTS as u64 * 64 + 64) * 1024;

fn slow_offset(client: usize, j: usize) -> u64 {
    ((client * 7 + j) as u64 % (SLOW_FILE / MIB)) * MIB
}

#[test]
fn slow_readers_are_held_back_by_backpressure() {
    let _g = serial();
    let (_dir, file) = served_random("slow", SLOW_FILE, 103);
    let original = read_at(&file, 0, SLOW_FILE as usize);
    let mut server = Server::start(&file, &[]);
    let pid = server.pid();
    let rss_before = vm_rss_kib(pid);

    let mut slow = Vec::with_capacity(SLOW_CLIENTS);
    for k in 0..SLOW_CLIENTS {
        let mut c = Nbd::connect(server.addr()).unwrap_or_else(|e| panic!("slow client {k}: {e}"));
        let mut reqs = Vec::with_capacity(SLOW_READS * 28);
        for j in 0..SLOW_READS {
            reqs.extend_from_slice(&Nbd::request_bytes(
                0,
                CMD_READ,
                j as u64 + 1,
                slow_offset(k, j),
                MIB as u32,
            ));
        }
        c.sock.write_all(&reqs).unwrap_or_else(|e| panic!("slow client {k}: send reads: {e}"));
        slow.push(c);
    }

    // Sample the server's RSS for 3 s while nobody reads.
    let t0 = Instant::now();
    let mut samples: Vec<(Duration, u64)> = Vec::new();
    let mut cpu_from = None;
    for k in 0..13 {
        server.assert_alive("while slow readers pile up replies");
        samples.push((t0.elapsed(), vm_rss_kib(pid)));
        if k == 4 {
            cpu_from = Some((Instant::now(), cpu_time(pid)));
        }
        thread::sleep(Duration::from_millis(250));
    }
    // Paused connections must not make the reactor spin: CPU over the last 2 s of the stall.
    let (cpu_t, cpu0) = cpu_from.expect("cpu sample");
    let (wall, cpu) = (cpu_t.elapsed(), cpu_time(pid).saturating_sub(cpu0));
    let shown: Vec<String> =
        samples.iter().map(|(t, r)| format!("{:.2}s:{:.0}MiB", t.as_secs_f64(), mib(*r))).collect();
    let peak = samples.iter().map(|s| s.1).max().unwrap();
    eprintln!(
        "{SLOW_CLIENTS} slow readers x {SLOW_READS} x 1 MiB READs: server VmRSS before {:.1} MiB, \
         samples [{}], peak {:.1} MiB (limit {} MiB)",
        mib(rss_before),
        shown.join(" "),
        mib(peak),
        SLOW_RSS_LIMIT_KIB / 1024
    );
    eprintln!("server CPU while the slow readers were stalled: {cpu:?} in {wall:?}");
    assert!(
        cpu.as_secs_f64() < 0.2 * wall.as_secs_f64(),
        "server used {cpu:?} of CPU in {wall:?} with {SLOW_CLIENTS} stalled readers (busy loop?)"
    );
    assert!(
        peak < SLOW_RSS_LIMIT_KIB,
        "server VmRSS peaked at {:.1} MiB with {SLOW_CLIENTS} slow readers (limit {} MiB)",
        mib(peak),
        SLOW_RSS_LIMIT_KIB / 1024
    );
    // Plateau: the last second grows at most 16 MiB over the second before it.
    let max_in = |from: f64, to: f64| {
        samples
            .iter()
            .filter(|(t, _)| t.as_secs_f64() >= from && t.as_secs_f64() < to)
            .map(|s| s.1)
            .max()
            .unwrap_or(0)
    };
    let (mid, late) = (max_in(1.0, 2.0), max_in(2.0, 10.0));
    assert!(
        late <= mid + 16 * 1024,
        "server VmRSS still growing: {:.1} MiB in 1-2 s, {:.1} MiB after 2 s",
        mib(mid),
        mib(late)
    );

    let took = assert_responsive(&mut server, &file, Duration::from_secs(2), "with slow readers stalled");
    let mut c = Nbd::connect(server.addr()).expect("second fresh client");
    let got = c.read(5 * MIB, MIB as u32).expect("io").expect("1 MiB read next to slow readers");
    assert!(got == original[5 * MIB as usize..6 * MIB as usize], "1 MiB read returned wrong data");
    eprintln!("fresh client next to the stalled readers: handshake+read {took:?}");

    // Backpressure must only pause, never lose: slow client 0 now reads every reply.
    let t1 = Instant::now();
    let c0 = &mut slow[0];
    let mut pending: HashMap<u64, u64> = (0..SLOW_READS).map(|j| (j as u64 + 1, slow_offset(0, j))).collect();
    for n in 0..SLOW_READS {
        let r = c0.read_reply().unwrap_or_else(|e| panic!("slow client 0: reply {n}: {e}"));
        let Reply::Simple { error, cookie } = r else { panic!("slow client 0: unexpected {r:?}") };
        assert_eq!(error, 0, "slow client 0: cookie {cookie} got error {error}");
        let off = pending.remove(&cookie).unwrap_or_else(|| panic!("slow client 0: unknown cookie {cookie}"));
        let data = c0.read_data(MIB as usize).unwrap_or_else(|e| panic!("slow client 0: data {n}: {e}"));
        assert!(
            data == original[off as usize..(off + MIB) as usize],
            "slow client 0: cookie {cookie} wrong data"
        );
    }
    eprintln!("slow client 0 then collected all {SLOW_READS} MiB of replies in {:?}", t1.elapsed());
    let rss_after = vm_rss_kib(pid);
    eprintln!("server VmRSS after client 0 drained: {:.1} MiB", mib(rss_after));
    drop(slow);
    assert_responsive(&mut server, &file, Duration::from_secs(2), "after the slow readers left");
    assert_no_panic(&server, "slow readers");
}

// ---------------------------------------------------------------------------------------------
// 4. Connections reset mid-request
// ---------------------------------------------------------------------------------------------

#[test]
fn connections_reset_mid_request() {
    let _g = serial();
    let size = 32 * MIB;
    let (_dir, file) = served_random("reset", size, 104);
    let original = read_at(&file, 0, size as usize);
    let mut server = Server::start(&file, &[]);
    let addr = server.addr();
    let rounds = 100;
    let base = server.count_lines(": disconnected");
    let t0 = Instant::now();
    for i in 0..rounds {
        let what = format!("reset round {i} (kind {})", i % 6);
        if i % 6 == 5 {
            // Cut during negotiation: client flags and half an option header.
            let mut s = tcp_connect(addr).unwrap_or_else(|e| panic!("{what}: connect: {e}"));
            read_newstyle_greeting(&mut s).unwrap_or_else(|e| panic!("{what}: greeting: {e}"));
            let mut m = CLIENT_FIXED_NEWSTYLE.to_be_bytes().to_vec();
            m.extend_from_slice(&IHAVEOPT.to_be_bytes());
            m.extend_from_slice(&OPT_GO.to_be_bytes());
            s.write_all(&m).unwrap_or_else(|e| panic!("{what}: send: {e}"));
            reset(s);
            continue;
        }
        let mut c = Nbd::connect(addr).unwrap_or_else(|e| panic!("{what}: handshake: {e}"));
        let junk = random_bytes(MIB as usize, 2000 + i as u64);
        match i % 6 {
            0 => {
                // WRITE of 64 KiB with only 10 KiB of its payload.
                let mut m = Nbd::request_bytes(0, CMD_WRITE, 1, (i as u64 % 32) * MIB, 64 * 1024).to_vec();
                m.extend_from_slice(&junk[..10 * 1024]);
                c.sock.write_all(&m).unwrap_or_else(|e| panic!("{what}: send: {e}"));
            }
            1 => {
                // READ of 16 MiB, reset before any reply.
                c.send_request(0, CMD_READ, 1, 0, 16 * MIB as u32).unwrap_or_else(|e| panic!("{what}: {e}"));
            }
            2 => {
                // WRITE of 32 MiB (the maximum) with 1 MiB of its payload.
                let mut m = Nbd::request_bytes(CMD_FLAG_FUA, CMD_WRITE, 1, 0, 32 * MIB as u32).to_vec();
                m.extend_from_slice(&junk);
                c.sock.write_all(&m).unwrap_or_else(|e| panic!("{what}: send: {e}"));
            }
            3 => {
                // READ of 16 MiB, reset after the first 100 KiB of the reply arrived.
                c.send_request(0, CMD_READ, 1, 8 * MIB, 16 * MIB as u32)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                let mut buf = vec![0u8; 100 * 1024];
                c.sock.read_exact(&mut buf).unwrap_or_else(|e| panic!("{what}: first reply bytes: {e}"));
            }
            _ => {
                // Twenty pipelined 1 MiB READs, then a WRITE header with half its payload.
                let mut m = Vec::new();
                for j in 0..20u64 {
                    m.extend_from_slice(&Nbd::request_bytes(0, CMD_READ, j + 1, j * MIB, MIB as u32));
                }
                m.extend_from_slice(&Nbd::request_bytes(0, CMD_WRITE, 99, 20 * MIB, 8192));
                m.extend_from_slice(&junk[..4096]);
                c.sock.write_all(&m).unwrap_or_else(|e| panic!("{what}: send: {e}"));
            }
        }
        reset(c.sock);
        if i % 10 == 9 {
            server.assert_alive(&what);
        }
    }
    let spent = t0.elapsed();
    // Every reset connection must be closed by the server (none left stuck half-alive).
    let gone = server.wait_line_count(": disconnected", base + rounds, Duration::from_secs(10)) - base;
    eprintln!("{rounds} reset connections in {spent:?}; the server closed {gone} of them");
    assert_eq!(gone, rounds, "the server closed only {gone} of {rounds} reset connections");
    server.assert_alive("after 100 reset connections");
    // Buffers of cut requests (up to a 32 MiB WRITE payload each) must be freed with them.
    let rss = vm_rss_kib(server.pid());
    eprintln!("server VmRSS after the resets: {:.1} MiB", mib(rss));
    assert!(rss < 128 * 1024, "server VmRSS {:.1} MiB after 100 reset connections", mib(rss));
    assert_files_range_unchanged(&file, &original, "after writes cut by a reset");
    let took = assert_responsive(&mut server, &file, Duration::from_secs(2), "after 100 resets");
    let mut c = Nbd::connect(server.addr()).expect("connect after resets");
    let data = random_bytes(8192, 105);
    assert_eq!(c.write(3 * MIB, &data, 0).expect("io"), 0, "write after resets");
    assert_eq!(c.read(3 * MIB, 8192).expect("io").expect("read after resets"), data);
    eprintln!("fresh client after the resets: {took:?}");
    assert_no_panic(&server, "resets");
}

fn assert_files_range_unchanged(file: &Path, original: &[u8], what: &str) {
    assert_eq!(file_len(file), original.len() as u64, "{what}: file size changed");
    assert_file_range(file, 0, original, what);
}

// ---------------------------------------------------------------------------------------------
// 5. Lying lengths during negotiation
// ---------------------------------------------------------------------------------------------

/// Read the server's answer to an option: an error reply or a closed connection are both fine;
/// a success reply or silence is not.
fn expect_error_or_close(n: &mut Negotiation, opt: u32, what: &str) -> String {
    n.sock.set_read_timeout(Some(Duration::from_secs(5))).expect("set_read_timeout");
    match n.read_reply() {
        Ok(r) => {
            assert_eq!(r.opt, opt, "{what}: reply to option {} instead of {opt}", r.opt);
            assert!(r.is_error(), "{what}: expected an error reply or a close, got {r:?}");
            format!("error reply {:#x}", r.typ)
        }
        Err(e) => match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted => "closed".to_string(),
            _ => panic!("{what}: neither an error reply nor a close within 5 s: {e}"),
        },
    }
}

/// Option header + exactly `data` (whose own length fields may lie), with a declared length.
fn send_raw_option(n: &mut Negotiation, opt: u32, declared: u32, data: &[u8]) {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&declared.to_be_bytes());
    m.extend_from_slice(data);
    n.sock.write_all(&m).expect("send option");
}

fn be32v(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}

/// After an error reply, the same connection must still negotiate: GO and read.
fn still_negotiates(n: Negotiation, file: &Path, what: &str) {
    let (mut c, _) = n.go("", &[]).unwrap_or_else(|e| panic!("{what}: GO after the error: {e}"));
    let got = c.read(0, 512).expect("io").unwrap_or_else(|e| panic!("{what}: read error {e}"));
    assert_eq!(got, read_at(file, 0, 512), "{what}: read after the error");
}

#[test]
fn lying_lengths_in_negotiation() {
    let _g = serial();
    let (_dir, file) = served_random("lying", MIB, 106);
    let mut server = Server::start(&file, &[]);
    let addr = server.addr();
    let start = || Negotiation::start(addr).expect("negotiation start");
    let mut outcomes: Vec<String> = Vec::new();
    let mut note = |what: &str, o: String| outcomes.push(format!("{what}: {o}"));

    // Option headers claiming more than any option may carry: 2^32-1, 2^31, 64 KiB + 1.
    for (opt, len) in [
        (OPT_GO, u32::MAX),
        (OPT_EXPORT_NAME, u32::MAX),
        (OPT_LIST, u32::MAX),
        (OPT_SET_META_CONTEXT, u32::MAX),
        (0xdead_beef, u32::MAX),
        (OPT_INFO, 0x8000_0000),
        (OPT_GO, 64 * 1024 + 1),
    ] {
        let what = format!("option {opt:#x} claiming {len} bytes");
        let mut n = start();
        n.send_option_header(opt, len).expect("send");
        let o = expect_error_or_close(&mut n, opt, &what);
        note(&what, o);
    }

    // A 2^32-1 length followed by 1 MiB of junk: closed, nothing buffered.
    {
        let what = "option claiming 2^32-1 bytes followed by 1 MiB";
        let mut n = start();
        n.send_option_header(OPT_GO, u32::MAX).expect("send");
        let junk = random_bytes(MIB as usize, 107);
        for chunk in junk.chunks(64 * 1024) {
            if n.sock.write_all(chunk).is_err() {
                break; // the server closed: fine
            }
        }
        match wait_closed(&mut n.sock, Duration::from_secs(5)) {
            Ok(_) => note(what, "closed".into()),
            Err(e) => {
                // Still open: then it must have answered with an error and kept parsing.
                panic!("{what}: connection not closed: {e}")
            }
        }
    }

    // GO / INFO whose inner lengths lie about the option's own data.
    let export_name_cases: Vec<(&str, u32, Vec<u8>)> = vec![
        ("GO name length 1000 in a 9-byte option", OPT_GO, [&be32v(1000)[..], b"abc", &[0, 0]].concat()),
        ("GO name length 2^32-1", OPT_GO, [&be32v(u32::MAX)[..], &[0, 0]].concat()),
        ("INFO name length 2^32-1", OPT_INFO, [&be32v(u32::MAX)[..], b"x", &[0, 0]].concat()),
        ("GO info count 65535 with no infos", OPT_GO, [&be32v(0)[..], &[0xff, 0xff]].concat()),
        ("INFO info count 3 with one info", OPT_INFO, [&be32v(0)[..], &[0, 3, 0, 1]].concat()),
        ("GO with 1 byte of data", OPT_GO, vec![7]),
        ("GO without the info count", OPT_GO, be32v(0).to_vec()),
        ("GO name length 2 with 1 byte of name", OPT_GO, [&be32v(2)[..], b"a"].concat()),
        ("STRUCTURED_REPLY with 4 bytes of data", OPT_STRUCTURED_REPLY, be32v(u32::MAX).to_vec()),
        ("LIST with 4 bytes of data", OPT_LIST, be32v(u32::MAX).to_vec()),
    ];
    for (what, opt, data) in export_name_cases {
        let mut n = start();
        send_raw_option(&mut n, opt, data.len() as u32, &data);
        let o = expect_error_or_close(&mut n, opt, what);
        if o != "closed" {
            still_negotiates(n, &file, what);
        }
        note(what, o);
    }

    // SET/LIST_META_CONTEXT with lying counts and lengths (after STRUCTURED_REPLY).
    let meta_cases: Vec<(&str, u32, Vec<u8>)> = vec![
        (
            "SET_META_CONTEXT query count 2^32-1",
            OPT_SET_META_CONTEXT,
            [&be32v(0)[..], &be32v(u32::MAX)].concat(),
        ),
        (
            "SET_META_CONTEXT query count 2^32-1 with one query",
            OPT_SET_META_CONTEXT,
            [&be32v(0)[..], &be32v(u32::MAX), &be32v(15), b"base:allocation"].concat(),
        ),
        (
            "SET_META_CONTEXT query length 2^32-1",
            OPT_SET_META_CONTEXT,
            [&be32v(0)[..], &be32v(1), &be32v(u32::MAX), b"base:allocation"].concat(),
        ),
        (
            "SET_META_CONTEXT query count 2 with one query",
            OPT_SET_META_CONTEXT,
            [&be32v(0)[..], &be32v(2), &be32v(15), b"base:allocation"].concat(),
        ),
        (
            "LIST_META_CONTEXT export name length 2^32-1",
            OPT_LIST_META_CONTEXT,
            [&be32v(u32::MAX)[..], &be32v(0)].concat(),
        ),
        (
            "LIST_META_CONTEXT query count 2^32-1",
            OPT_LIST_META_CONTEXT,
            [&be32v(0)[..], &be32v(u32::MAX)].concat(),
        ),
        ("SET_META_CONTEXT with 3 bytes", OPT_SET_META_CONTEXT, vec![0, 0, 0]),
    ];
    for (what, opt, data) in meta_cases {
        let mut n = start();
        let r = n.structured_reply().expect("STRUCTURED_REPLY");
        assert!(n.structured, "{what}: STRUCTURED_REPLY refused: {r:?}");
        send_raw_option(&mut n, opt, data.len() as u32, &data);
        let o = expect_error_or_close(&mut n, opt, what);
        if o != "closed" {
            still_negotiates(n, &file, what);
        }
        note(what, o);
    }

    // An unknown option carrying exactly the maximum 64 KiB: ERR_UNSUP, negotiation goes on.
    {
        let what = "unknown option with 64 KiB of data";
        let mut n = start();
        send_raw_option(&mut n, 0x7fff_0000, 64 * 1024, &random_bytes(64 * 1024, 108));
        let o = expect_error_or_close(&mut n, 0x7fff_0000, what);
        if o != "closed" {
            still_negotiates(n, &file, what);
        }
        note(what, o);
    }

    // Client flags with every bit set.
    {
        let what = "client flags 0xffffffff";
        let mut s = tcp_connect(addr).expect("connect");
        read_newstyle_greeting(&mut s).expect("greeting");
        s.write_all(&u32::MAX.to_be_bytes()).expect("send");
        let r = wait_closed(&mut s, Duration::from_secs(5));
        assert!(r.is_ok(), "{what}: connection not closed: {r:?}");
        note(what, "closed".into());
    }

    // An option that promises 60000 bytes and delivers 100, then the client goes away (RST
    // and FIN): the server waits for the rest without harm, and notices the client leaving.
    for rst in [true, false] {
        let mut n = start();
        n.send_option_header(OPT_GO, 60_000).expect("send");
        n.sock.write_all(&[0u8; 100]).expect("send");
        thread::sleep(Duration::from_millis(100));
        if rst {
            reset(n.sock);
        } else {
            drop(n);
        }
    }

    server.assert_alive("after lying option lengths");
    for o in &outcomes {
        eprintln!("  {o}");
    }
    assert_responsive(&mut server, &file, Duration::from_secs(2), "after lying option lengths");
    assert_no_panic(&server, "lying lengths");
}

// ---------------------------------------------------------------------------------------------
// 6. The served file changes under the server
// ---------------------------------------------------------------------------------------------

#[test]
fn served_file_truncated_while_serving() {
    let _g = serial();
    let size = 16 * MIB;
    let (_dir, file) = served_random("truncate", size, 109);
    let original = read_at(&file, 0, size as usize);
    let mut server = Server::start(&file, &[]);
    let mut c = Nbd::connect(server.addr()).expect("connect");
    let mut sc = Nbd::connect_structured(server.addr()).expect("connect structured");
    // Warm the page cache for the part about to vanish (the inline RWF_NOWAIT path).
    assert_eq!(
        c.read(8 * MIB, 4096).expect("io").expect("read before truncation"),
        &original[8 * MIB as usize..][..4096]
    );

    let f = std::fs::OpenOptions::new().write(true).open(&file).expect("open for truncation");
    f.set_len(MIB).expect("truncate to 1 MiB");
    drop(f);
    assert_eq!(file_len(&file), MIB);

    // Reads past the new end fail with EIO; the connection carries on.
    assert_eq!(c.read(8 * MIB, 4096).expect("io"), Err(EIO), "4 KiB read at 8 MiB after truncation");
    assert_eq!(c.read(8 * MIB, MIB as u32).expect("io"), Err(EIO), "1 MiB read at 8 MiB after truncation");
    assert_eq!(c.read(MIB - 4096, 8192).expect("io"), Err(EIO), "read straddling the new end");
    assert_eq!(c.read(size - 512, 512).expect("io"), Err(EIO), "read at the old end");
    assert_eq!(sc.read(8 * MIB, 4096).expect("io"), Err(EIO), "structured read at 8 MiB after truncation");
    let got = c.read(0, 64 * 1024).expect("io").expect("read inside the remaining range");
    assert!(got == original[..64 * 1024], "read inside the remaining 1 MiB returned wrong data");
    let got = sc.read(MIB - 4096, 4096).expect("io").expect("structured read at the new end");
    assert!(got == original[(MIB - 4096) as usize..MIB as usize], "structured read at the new end wrong");
    // BLOCK_STATUS over the vanished part: any sane answer, no crash.
    let bs = sc.block_status(4 * MIB, MIB as u32, 0).expect("io");
    eprintln!("BLOCK_STATUS at 4 MiB after truncation: {bs:?}");
    server.assert_alive("after reads past the truncated end");

    // A WRITE beyond the new end: success (the file grows again, sparsely) or an error — but
    // whatever it says must be true afterwards.
    let data = random_bytes(4096, 110);
    let st = c.write(8 * MIB, &data, 0).expect("io");
    eprintln!(
        "WRITE at 8 MiB after truncation to 1 MiB: NBD status {st}; file now {} bytes",
        file_len(&file)
    );
    if st == 0 {
        assert_eq!(c.read(8 * MIB, 4096).expect("io").expect("read back the write"), data);
        assert_file_range(&file, 8 * MIB, &data, "write past the truncated end");
        // The gap the write opened reads as zeros; beyond the write is still gone.
        assert_eq!(c.read(4 * MIB, 4096).expect("io").expect("read in the gap"), vec![0u8; 4096]);
        assert_eq!(c.read(12 * MIB, 4096).expect("io"), Err(EIO), "read beyond the regrown end");
    }
    let z = c.write_zeroes(10 * MIB, 64 * 1024, 0).expect("io");
    let t = c.trim(12 * MIB, 64 * 1024).expect("io");
    let fl = c.flush().expect("io");
    eprintln!("after truncation: WRITE_ZEROES past the end -> {z}, TRIM past the end -> {t}, FLUSH -> {fl}");
    assert!(file_len(&file) <= size, "the file grew past its original size");

    server.assert_alive("after writes past the truncated end");
    let got = c.read(4096, 4096).expect("io").expect("read inside the remaining range at the end");
    assert!(got == original[4096..8192]);
    let mut fresh = Nbd::connect(server.addr()).expect("fresh client after truncation");
    eprintln!("fresh client after truncation sees size {} (file is {} bytes)", fresh.size, file_len(&file));
    let got = fresh.read(0, 4096).expect("io").expect("fresh read inside the remaining range");
    assert!(got == original[..4096]);
    assert_no_panic(&server, "truncation");
}

/// `chattr -i` on drop, so a failed test never leaves an undeletable file behind.
struct Immutable(PathBuf);

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

#[test]
fn served_file_made_immutable_while_serving() {
    let _g = serial();
    let size = 4 * MIB;
    let (_dir, file) = served_random("immutable", size, 111);
    let original = read_at(&file, 0, size as usize);
    let mut server = Server::start(&file, &[]);
    let mut c = Nbd::connect(server.addr()).expect("connect");

    // Root ignores permission bits; the immutable attribute stops writes even through a
    // descriptor opened for writing before it was set (on filesystems that support it).
    let out = run_bounded(Command::new("chattr").arg("+i").arg(&file), Duration::from_secs(5));
    if !out.success() {
        eprintln!(
            "SKIPPED: cannot make the served file unwritable here (`chattr +i` failed: {:?} {}{})",
            out.status,
            out.stdout.trim(),
            out.stderr.trim()
        );
        return;
    }
    let _guard = Immutable(file.clone());

    let data = random_bytes(8192, 112);
    let w = c.write(64 * 1024, &data, 0).expect("io");
    let wf = c.write(128 * 1024, &data, CMD_FLAG_FUA).expect("io");
    let wz = c.write(256 * 1024, &[0u8; 8192], 0).expect("io");
    let z = c.write_zeroes(MIB, 64 * 1024, 0).expect("io");
    let zn = c.write_zeroes(MIB, 64 * 1024, CMD_FLAG_NO_HOLE).expect("io");
    let t = c.trim(2 * MIB, 64 * 1024).expect("io");
    let fl = c.flush().expect("io");
    eprintln!(
        "immutable file: WRITE -> {w}, WRITE+FUA -> {wf}, zero WRITE -> {wz}, WRITE_ZEROES -> {z}, \
         WRITE_ZEROES NO_HOLE -> {zn}, TRIM -> {t}, FLUSH -> {fl}"
    );
    for (name, st) in [
        ("WRITE", w),
        ("WRITE+FUA", wf),
        ("zero WRITE", wz),
        ("WRITE_ZEROES", z),
        ("WRITE_ZEROES NO_HOLE", zn),
    ] {
        assert_ne!(st, 0, "{name} to an immutable file reported success");
    }
    server.assert_alive("after writes to an immutable file");
    assert_files_range_unchanged(&file, &original, "immutable file");
    let got = c.read(64 * 1024, 8192).expect("io").expect("read after failed writes");
    assert!(got == original[64 * 1024..64 * 1024 + 8192], "read after failed writes returned wrong data");
    assert_responsive(&mut server, &file, Duration::from_secs(2), "with an immutable file");
    assert_no_panic(&server, "immutable file");
}

/// Writes that fail with EFBIG: the server's RLIMIT_FSIZE lowered (prlimit on our own child).
/// The kernel also sends SIGXFSZ, whose default action kills the process; a server must answer
/// the request with an error instead.
#[test]
fn write_past_the_file_size_rlimit_gets_an_error_reply() {
    let _g = serial();
    let size = 16 * MIB;
    let (_dir, file) = served_random("fsize", size, 113);
    let original = read_at(&file, 0, size as usize);
    let mut server = Server::start(&file, &[]);
    let mut c = Nbd::connect(server.addr()).expect("connect");

    let pid = server.pid() as libc::pid_t;
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    let new = libc::rlimit { rlim_cur: MIB, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: prlimit on our own, still running child with valid structs.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, std::ptr::null(), &mut old) };
    assert_eq!(rc, 0, "prlimit get: {}", io::Error::last_os_error());
    let new = libc::rlimit { rlim_max: old.rlim_max, ..new };
    server.assert_alive("before prlimit");
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, &new, std::ptr::null_mut()) };
    if rc != 0 {
        eprintln!("SKIPPED: cannot lower the server's RLIMIT_FSIZE: {}", io::Error::last_os_error());
        return;
    }

    let data = random_bytes(4096, 114);
    assert_eq!(c.write(0, &data, 0).expect("io"), 0, "write below the limit");
    let r = c.write(8 * MIB, &data, 0);
    if let Some(st) = server.wait_timeout(Duration::from_millis(500)) {
        panic!(
            "server died ({}) on a WRITE at 8 MiB with RLIMIT_FSIZE 1 MiB (client saw {r:?}); \
             SIGXFSZ is {}; stderr:\n{}",
            describe_status(st),
            libc::SIGXFSZ,
            server.stderr_text()
        );
    }
    let st = r.expect("io");
    eprintln!("WRITE past RLIMIT_FSIZE: NBD status {st}");
    assert_ne!(st, 0, "WRITE past RLIMIT_FSIZE reported success");
    assert_file_range(&file, 8 * MIB, &original[8 * MIB as usize..][..4096], "write past RLIMIT_FSIZE");
    let got = c.read(8 * MIB, 4096).expect("io").expect("read after a failed write");
    assert!(got == original[8 * MIB as usize..][..4096]);
    assert_responsive(&mut server, &file, Duration::from_secs(2), "after a write past RLIMIT_FSIZE");
    assert_no_panic(&server, "RLIMIT_FSIZE");
}

/// The request buffers a bulk writer leaves in the pool are kept a few seconds for the next
/// client (see POOL_LINGER in event_loop.rs) and then given back: an idle server shrinks to its
/// starting size and stays quiet.
#[test]
fn request_buffers_go_back_after_the_last_client() {
    let _g = serial();
    require_tool("nbdcopy");
    let dir = TempDir::new("linger");
    let (file, input) = served_and_input(&dir, 64 * MIB, 110);
    let mut server = Server::start(&file, &[]);
    let rss_before = vm_rss_kib(server.pid());

    let out = run_bounded(Command::new("nbdcopy").arg(&input).arg(server.uri()), Duration::from_secs(60));
    out.assert_success("nbdcopy in.img nbd://");
    let rss_after = vm_rss_kib(server.pid());

    // The release comes 5 s after the disconnect; allow for a slow machine.
    let deadline = Instant::now() + Duration::from_secs(20);
    let limit = rss_before + 2 * 1024;
    let mut rss = rss_after;
    while rss > limit && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
        rss = vm_rss_kib(server.pid());
    }
    eprintln!(
        "VmRSS {:.1} MiB before, {:.1} MiB after writing 64 MiB, {:.1} MiB once idle",
        mib(rss_before),
        mib(rss_after),
        mib(rss)
    );
    assert!(rss <= limit, "server still holds {:.1} MiB after 20 s without clients", mib(rss));

    let cpu = cpu_time(server.pid());
    thread::sleep(Duration::from_secs(1));
    let used = cpu_time(server.pid()) - cpu;
    assert!(used <= Duration::from_millis(20), "idle server used {used:?} of CPU in 1 s");
    assert_files_equal(&input, &file);
    server.assert_alive("after the buffers were released");
}
