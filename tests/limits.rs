//! Hostile networks: deadlines and caps that keep one peer from holding the server's resources.
//! A connection that never finishes negotiating (`--handshake-limit`), more connections than
//! `--max-clients`, WRITE payloads that stall half-way (`--payload-budget`, `--stall-limit`), and
//! signals arriving while a peer is stalled (SIGHUP, SIGTERM).
//!
//! Every wait is bounded in time, every loop in count; only the servers started here are
//! signalled (through the guard). The tests run one at a time (`serial()`): the budget test moves
//! a gigabyte through loopback and measures the server's memory.

mod common;

use common::*;
use std::io::{self, Read, Write};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The server's resident set size in KiB (VmRSS from /proc/PID/status).
fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// A WRITE header for `len` bytes at `offset`, sent alone: the payload follows (or not).
fn write_header(c: &mut Nbd, cookie: u64, offset: u64, len: u32) {
    c.send_request(0, CMD_WRITE, cookie, offset, len).expect("send WRITE header");
}

// ---------------------------------------------------------------------------------------------
// 1. Negotiation deadline and the cap on clients
// ---------------------------------------------------------------------------------------------

#[test]
fn a_client_that_does_not_finish_negotiating_is_closed_after_the_handshake_limit() {
    let _g = serial();
    let dir = TempDir::new("handshake-limit");
    let file = dir.join("disk.img");
    make_sparse_file(&file, MIB);
    let mut server = Server::start(&file, &["--handshake-limit", "1"]);

    // Silent after the greeting; another that stops half-way through the options; a third that
    // finishes negotiating and then idles past the limit, which is not negotiation.
    let t0 = Instant::now();
    let mut silent = tcp_connect(server.addr()).expect("connect");
    read_newstyle_greeting(&mut silent).expect("greeting");
    let silent_addr = silent.local_addr().expect("local addr");
    let mut halfway = Negotiation::start(server.addr()).expect("greeting");
    assert_eq!(halfway.list().expect("LIST").last().unwrap().typ, REP_ACK);
    let mut done = Nbd::connect(server.addr()).expect("negotiate");

    for (what, s) in [("silent", &mut silent), ("half-way", &mut halfway.sock)] {
        let got = wait_closed(s, Duration::from_secs(15));
        assert!(got.is_ok(), "{what} client not closed: {got:?}\n{}", server.stderr_text());
    }
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(900), "closed after {took:?}, before the 1 s limit");
    let needle = format!("{silent_addr}: negotiation not finished within 1 s");
    assert!(
        server.wait_for_line(&needle, IO_TIMEOUT),
        "no I line with the address:\n{}",
        server.stderr_text()
    );
    assert!(server.stderr_lines().iter().any(|l| l.starts_with("I:") && l.contains(&needle)));

    thread::sleep(Duration::from_millis(300));
    assert_eq!(done.read(0, 4096).expect("io after the limit").expect("read"), vec![0; 4096]);
    server.assert_alive("after closing late negotiators");
}

#[test]
fn connections_beyond_max_clients_are_closed_with_one_warning_per_burst() {
    let _g = serial();
    let dir = TempDir::new("max-clients");
    let file = dir.join("disk.img");
    make_sparse_file(&file, MIB);
    let server = Server::start(&file, &["--max-clients", "2"]);
    let a = Nbd::connect(server.addr()).expect("first client");
    let mut b = Nbd::connect(server.addr()).expect("second client");

    for i in 0..5 {
        let mut s = tcp_connect(server.addr()).expect("connect (the kernel accepts)");
        let got = wait_closed(&mut s, Duration::from_secs(5));
        assert_eq!(got, Ok(0), "connection {i} over the cap got {got:?} instead of a close");
    }
    assert_eq!(server.wait_line_count("(--max-clients)", 1, IO_TIMEOUT), 1);
    assert_eq!(
        server.stderr_lines().iter().filter(|l| l.starts_with("W:") && l.contains("--max-clients")).count(),
        1,
        "one W line for the burst:\n{}",
        server.stderr_text()
    );
    assert!(b.read(0, 512).expect("io").is_ok(), "admitted clients are served meanwhile");

    drop(a);
    // Bounded retries: the server notices the close on its next turn.
    let mut admitted = None;
    for _ in 0..100 {
        match Nbd::connect(server.addr()) {
            Ok(c) => {
                admitted = Some(c);
                break;
            }
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
    let mut c = admitted.unwrap_or_else(|| panic!("no room after a client left:\n{}", server.stderr_text()));
    assert!(c.read(0, 512).expect("io").is_ok());
    assert!(server.wait_for_line("admitting clients again (5 connections refused", IO_TIMEOUT));
}

// ---------------------------------------------------------------------------------------------
// 2. One budget for WRITE payloads, and the stall limit
// ---------------------------------------------------------------------------------------------

const STALLERS: usize = 50;
const BIG: usize = 32 << 20;
const SENT: usize = 31 << 20;
const BUDGET_MIB: u64 = 64;

/// 50 clients each send 31 MiB of a 32 MiB WRITE and stop. The server's memory stays within
/// the budget + 32 MiB, a fresh client's 4 KiB write completes meanwhile, and once the stalled
/// clients are gone a full 32 MiB write gets through (their reservations were given back).
#[test]
fn stalled_writers_are_held_to_the_payload_budget() {
    let _g = serial();
    let dir = TempDir::new("payload-budget");
    let file = dir.join("disk.img");
    make_sparse_file(&file, 64 * MIB);
    let budget = format!("{BUDGET_MIB}M");
    let mut server = Server::start(&file, &["--payload-budget", &budget]);
    let rss_before = vm_rss_kib(server.pid());

    let payload = vec![0xa5u8; SENT];
    let mut stallers: Vec<(Nbd, usize)> = (0..STALLERS)
        .map(|i| {
            let mut c = Nbd::connect(server.addr()).unwrap_or_else(|e| panic!("staller {i}: {e}"));
            write_header(&mut c, i as u64 + 1, 0, BIG as u32);
            c.sock.set_nonblocking(true).expect("nonblocking");
            (c, 0)
        })
        .collect();
    // Push payload while anyone makes progress; stop after a quiet second (or 120 s in all).
    let t0 = Instant::now();
    let mut last_progress = Instant::now();
    while last_progress.elapsed() < Duration::from_secs(1) && t0.elapsed() < Duration::from_secs(120) {
        let mut moved = false;
        for (c, sent) in stallers.iter_mut().filter(|(_, sent)| *sent < SENT) {
            match c.sock.write(&payload[*sent..]) {
                Ok(n) => {
                    *sent += n;
                    moved |= n > 0;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("staller write: {e}\n{}", server.stderr_text()),
            }
        }
        if moved {
            last_progress = Instant::now();
        } else {
            thread::sleep(Duration::from_millis(5));
        }
    }
    let whole = stallers.iter().filter(|(_, s)| *s == SENT).count();
    let pushed: usize = stallers.iter().map(|(_, s)| *s).sum();
    let rss = vm_rss_kib(server.pid());
    eprintln!(
        "{STALLERS} stalled writers pushed {} MiB ({whole} sent all 31 MiB); server RSS {} -> {} MiB",
        pushed >> 20,
        rss_before / 1024,
        rss / 1024
    );
    assert!(whole >= 1, "no staller got its payload read: the budget let nobody in");
    let limit_kib = rss_before + (BUDGET_MIB + 32) * 1024;
    assert!(rss <= limit_kib, "RSS {rss} KiB is over the budget + 32 MiB ({limit_kib} KiB)");

    let mut fresh = Nbd::connect(server.addr()).expect("fresh client");
    let block = random_bytes(4096, 77);
    assert_eq!(fresh.write(40 * MIB, &block, 0).expect("io"), 0, "fresh 4 KiB write");
    assert_eq!(fresh.read(40 * MIB, 4096).expect("io").expect("read"), block);
    assert!(vm_rss_kib(server.pid()) <= limit_kib);

    drop(stallers);
    // Their reservations come back as the server notices the closes; the write waits till then.
    let big = random_bytes(BIG, 78);
    let e = fresh.write(0, &big, 0).unwrap_or_else(|e| panic!("32 MiB write: {e}\n{}", server.stderr_text()));
    assert_eq!(e, 0, "32 MiB write after the stallers left");
    assert_file_range(&file, 0, &big, "the 32 MiB write");
    server.assert_alive("after the stalled writers");
}

/// A client that stops in the middle of a payload is closed after the stall limit, which frees
/// its share of the budget for a client waiting on it; a slow client that keeps sending is not.
#[test]
fn a_writer_stalled_mid_payload_is_closed_after_the_stall_limit() {
    let _g = serial();
    let dir = TempDir::new("stall-limit");
    let file = dir.join("disk.img");
    make_sparse_file(&file, 64 * MIB);
    let server = Server::start(&file, &["--payload-budget", "32M", "--stall-limit", "2"]);

    // The staller reserves the whole budget and sends 1 MiB of it.
    let mut staller = Nbd::connect(server.addr()).expect("staller");
    let staller_addr = staller.sock.local_addr().expect("addr");
    write_header(&mut staller, 1, 0, BIG as u32);
    staller.sock.write_all(&vec![0x5a; 1 << 20]).expect("part of the payload");
    thread::sleep(Duration::from_millis(300));

    // A 1 MiB write does not fit beside it: it waits, and completes once the staller is closed.
    let t0 = Instant::now();
    let mut waiter = Nbd::connect(server.addr()).expect("waiter");
    let data = random_bytes(1 << 20, 5);
    let cookie = waiter.cookie();
    waiter.send_write(0, cookie, 8 * MIB, &data).expect("send");
    waiter.sock.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    assert_eq!(waiter.read_status(cookie).expect("reply once the staller is gone"), 0);
    let waited = t0.elapsed();
    assert_eq!(wait_closed(&mut staller.sock, Duration::from_secs(5)), Ok(0), "staller closed");
    assert!(
        waited >= Duration::from_millis(1500),
        "the write went through after {waited:?}, before the limit"
    );
    let needle = format!("{staller_addr}: sent nothing more of a WRITE payload");
    assert!(server.wait_for_line(&needle, IO_TIMEOUT), "{}", server.stderr_text());
    assert_file_range(&file, 8 * MIB, &data, "the waiting write");
    assert_file_range(&file, 0, &vec![0; 1 << 20], "the stalled write changed nothing");

    // Slow but steady: a 64 KiB payload in 8 pieces over about 3 s, past the 2 s limit.
    let mut slow = Nbd::connect(server.addr()).expect("slow client");
    let data = random_bytes(64 * 1024, 6);
    let cookie = slow.cookie();
    write_header(&mut slow, cookie, 16 * MIB, data.len() as u32);
    for piece in data.chunks(8 * 1024) {
        thread::sleep(Duration::from_millis(400));
        slow.sock.write_all(piece).expect("a piece of the slow payload");
    }
    assert_eq!(slow.read_status(cookie).expect("slow client's reply"), 0);
    assert_file_range(&file, 16 * MIB, &data, "the slow write");
}

// ---------------------------------------------------------------------------------------------
// 3. Signals
// ---------------------------------------------------------------------------------------------

#[test]
fn sighup_shuts_down_cleanly_and_removes_the_control_socket() {
    let _g = serial();
    let dir = TempDir::new("sighup");
    let file = dir.join("disk.img");
    make_sparse_file(&file, MIB);
    let sock = dir.join("ctl.sock");
    let sock_arg = sock.to_str().expect("utf-8 path").to_string();
    let mut server = Server::start(&file, &["--sock", &sock_arg]);
    let mut c = Nbd::connect(server.addr()).expect("client");
    assert!(c.read(0, 512).expect("io").is_ok());
    assert!(sock.exists(), "control socket created");

    let st = server.stop_with(libc::SIGHUP, IO_TIMEOUT);
    assert_eq!(st.code(), Some(0), "exit after SIGHUP: {}", describe_status(st));
    assert!(!sock.exists(), "SIGHUP left the control socket behind");
    assert!(wait_closed(&mut c.sock, Duration::from_secs(5)).is_ok());
}

/// SIGTERM while one client is stalled in the middle of a WRITE payload and another does not
/// read 16 MiB of replies: the server waits on them 2 s (the man page's figure), not the 10 s it
/// gives disk work, and exits 0.
#[test]
fn shutdown_does_not_wait_long_for_stalled_peers() {
    let _g = serial();
    let dir = TempDir::new("stalled-shutdown");
    let file = dir.join("disk.img");
    // Small enough that the final flush at exit is quick; 16 MiB of replies still fill the socket.
    make_random_file(&file, 16 * MIB, 9);
    let mut server = Server::start(&file, &[]);

    let mut writer = Nbd::connect(server.addr()).expect("writer");
    write_header(&mut writer, 1, 0, 1 << 20);
    writer.sock.write_all(&vec![1; 100 * 1024]).expect("part of the payload");
    let mut reader = Nbd::connect(server.addr()).expect("reader");
    for i in 0..16u64 {
        reader.send_request(0, CMD_READ, i + 1, i * MIB, MIB as u32).expect("pipelined read");
    }
    thread::sleep(Duration::from_millis(500));

    let t0 = Instant::now();
    let st = server.stop_with(libc::SIGTERM, Duration::from_secs(20));
    let took = t0.elapsed();
    assert_eq!(st.code(), Some(0), "exit after SIGTERM: {}", describe_status(st));
    assert!(took < Duration::from_secs(8), "shutdown took {took:?} with stalled peers");
    assert!(server.count_lines("into shutdown; closing") >= 1, "{}", server.stderr_text());
    // The stalled write changed nothing.
    let mut buf = vec![0u8; 100 * 1024];
    std::fs::File::open(&file).and_then(|mut f| f.read_exact(&mut buf)).expect("read file");
    assert_ne!(buf, vec![1; 100 * 1024]);
    drop((writer, reader));
}

// ---------------------------------------------------------------------------------------------
// The new options on the command line
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_limit_values_are_refused_with_a_sentence_and_huge_ones_mean_no_limit() {
    let _g = serial();
    let dir = TempDir::new("limit-options");
    let file = dir.join("disk.img");
    make_sparse_file(&file, MIB);
    let f = file.to_str().expect("utf-8 path");
    let base = ["serve", "-l", "127.0.0.1", "-p", "0", "-f", f];
    for (opt, val, needle) in [
        ("--payload-budget", "12Q", "is not a size"),
        ("--payload-budget", "0", "is not a size"),
        ("--max-clients", "0", "--max-clients"),
        ("--handshake-limit", "1.5", "--handshake-limit"),
        ("--stall-limit", "soon", "--stall-limit"),
    ] {
        let mut args = base.to_vec();
        args.extend([opt, val]);
        let (st, lines) = run_expect_exit(&args, IO_TIMEOUT);
        let text = lines.join("\n");
        assert_eq!(st.code(), Some(2), "{opt} {val}: {}\n{text}", describe_status(st));
        assert!(text.contains(needle) && !text.contains("panicked"), "{opt} {val}:\n{text}");
    }
    let huge = u64::MAX.to_string();
    let server = Server::start(
        &file,
        &[
            "--handshake-limit",
            &huge,
            "--stall-limit",
            &huge,
            "--payload-budget",
            "1G",
            "--max-clients",
            "4000000000",
        ],
    );
    let mut c = Nbd::connect(server.addr()).expect("connect");
    assert_eq!(c.write(0, &[7; 4096], 0).expect("io"), 0);
}
