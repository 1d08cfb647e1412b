//! Shutdown on SIGTERM/SIGINT/SIGQUIT: exit 0 even with clients connected, and every write the
//! server acknowledged before going away is in the file.

mod common;

use common::*;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

fn idle_server_exits_zero_on(sig: i32) {
    let dir = TempDir::new("signal");
    let file = dir.join("disk.img");
    make_random_file(&file, MIB, 50);
    let mut server = Server::start(&file, &[]);
    // One client idle in transmission, one idle in negotiation: neither may hold up the exit.
    let mut idle = Nbd::connect(server.addr()).expect("connect");
    assert!(idle.read(0, 512).expect("io").is_ok());
    let mut negotiating = Negotiation::start(server.addr()).expect("greeting");

    let st = server.stop_with(sig, IO_TIMEOUT);
    assert_eq!(st.code(), Some(0), "exit after signal {sig}: {}", describe_status(st));
    wait_closed(&mut idle.sock, Duration::from_secs(5)).expect("transmission client closed");
    wait_closed(&mut negotiating.sock, Duration::from_secs(5)).expect("negotiating client closed");
}

#[test]
fn sigterm_exits_zero_with_clients_connected() {
    idle_server_exits_zero_on(libc::SIGTERM);
}

#[test]
fn sigint_exits_zero_with_clients_connected() {
    idle_server_exits_zero_on(libc::SIGINT);
}

#[test]
fn sigquit_exits_zero_with_clients_connected() {
    idle_server_exits_zero_on(libc::SIGQUIT);
}

const BLOCK: usize = 64 * 1024;
const BLOCKS: u64 = 1024;

fn block_data(i: u64) -> Vec<u8> {
    random_bytes(BLOCK, 0x5eed_0000 + i)
}

/// A raw client pipelines WRITEs of distinct patterns; SIGTERM arrives mid-stream. The server
/// exits 0 and every block it acknowledged is in the file.
#[test]
fn sigterm_mid_write_stream_keeps_every_acknowledged_write() {
    let dir = TempDir::new("sigterm-writes");
    let file = dir.join("disk.img");
    make_sparse_file(&file, BLOCKS * BLOCK as u64);
    let mut server = Server::start(&file, &[]);
    let mut c = Nbd::connect(server.addr()).expect("connect");
    let mut wsock = c.sock.try_clone().expect("clone socket");

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut sent = 0u64;
            for i in 0..BLOCKS {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let mut m = Nbd::request_bytes(0, CMD_WRITE, i + 1, i * BLOCK as u64, BLOCK as u32).to_vec();
                m.extend_from_slice(&block_data(i));
                if wsock.write_all(&m).is_err() {
                    break;
                }
                sent += 1;
                // Bursts of 16 (so several are in flight at once), paced so the signal lands
                // while writes are still streaming.
                if i % 16 == 15 {
                    thread::sleep(Duration::from_millis(2));
                }
            }
            sent
        })
    };

    let acked = Arc::new(Mutex::new(Vec::new()));
    let acks = Arc::new(AtomicUsize::new(0));
    let reader = {
        let acked = Arc::clone(&acked);
        let acks = Arc::clone(&acks);
        thread::spawn(move || {
            let mut errors = Vec::new();
            for _ in 0..BLOCKS {
                match c.read_reply() {
                    Ok(Reply::Simple { error: 0, cookie }) => {
                        acked.lock().unwrap().push(cookie);
                        acks.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Reply::Simple { error, cookie }) => errors.push((cookie, error)),
                    Ok(other) => panic!("unexpected reply {other:?}"),
                    Err(_) => break, // the server closed the connection
                }
            }
            errors
        })
    };

    let deadline = Instant::now() + IO_TIMEOUT;
    while acks.load(Ordering::SeqCst) < 40 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(2));
    }
    let before = acks.load(Ordering::SeqCst);
    assert!(before >= 40, "only {before} writes acknowledged before the deadline");
    server.signal(libc::SIGTERM);
    let status = server.wait_timeout(IO_TIMEOUT);
    stop.store(true, Ordering::SeqCst);
    let sent = writer.join().expect("writer thread");
    let errors = reader.join().expect("reader thread");

    let status = status.unwrap_or_else(|| panic!("no exit within {IO_TIMEOUT:?} of SIGTERM"));
    assert_eq!(status.code(), Some(0), "exit after SIGTERM: {}", describe_status(status));
    assert!(
        sent < BLOCKS,
        "all {sent} writes went out before the signal took effect; nothing was interrupted"
    );
    for (cookie, error) in &errors {
        assert_eq!(
            *error, ESHUTDOWN,
            "write {cookie} failed with {error} (only ESHUTDOWN expected while draining)"
        );
    }

    let acked = acked.lock().unwrap().clone();
    eprintln!(
        "sent {sent} writes, {before} acknowledged at SIGTERM, {} in all, {} refused while draining",
        acked.len(),
        errors.len()
    );
    assert!(acked.len() >= before);
    for cookie in &acked {
        let i = cookie - 1;
        assert_file_range(&file, i * BLOCK as u64, &block_data(i), &format!("acknowledged write #{i}"));
    }
}

/// nbdcopy streams a file (through its stdin) into the export; SIGTERM arrives while it runs.
/// The server exits 0 and nbdcopy terminates instead of hanging.
#[test]
fn sigterm_during_nbdcopy_write_exits_zero() {
    require_tool("nbdcopy");
    let dir = TempDir::new("sigterm-nbdcopy");
    let file = dir.join("disk.img");
    let size = 64 * MIB;
    make_sparse_file(&file, size);
    let mut server = Server::start(&file, &[]);

    let mut copy = Command::new("nbdcopy")
        .arg("-")
        .arg(server.uri())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nbdcopy");
    let mut stdin = copy.stdin.take().expect("stdin");
    let mut copy_err = copy.stderr.take().expect("stderr");
    let err_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut copy_err, &mut s);
        s
    });

    let chunk = |i: u64| random_bytes(MIB as usize, 0xc0de + i);
    let mut fed = 0u64;
    // Feed 8 MiB, then wait (bounded) until data is landing in the served file.
    while fed < 8 {
        stdin.write_all(&chunk(fed)).expect("feed nbdcopy");
        fed += 1;
    }
    let deadline = Instant::now() + IO_TIMEOUT;
    while allocated_bytes(&file) == 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    assert!(allocated_bytes(&file) > 0, "nbdcopy wrote nothing within {IO_TIMEOUT:?}");

    server.signal(libc::SIGTERM);
    // Keep nbdcopy busy while the server shuts down.
    while fed < size / MIB {
        if server.try_wait().is_some() || stdin.write_all(&chunk(fed)).is_err() {
            break;
        }
        fed += 1;
        thread::sleep(Duration::from_millis(5));
    }
    drop(stdin);

    let status = server.wait_timeout(IO_TIMEOUT);
    let copy_status = wait_child(&mut copy, Duration::from_secs(30));
    if copy_status.is_none() {
        let _ = copy.kill();
        let _ = copy.wait();
    }
    let copy_stderr = err_reader.join().unwrap_or_default();

    let status = status.unwrap_or_else(|| panic!("no exit within {IO_TIMEOUT:?} of SIGTERM"));
    assert_eq!(status.code(), Some(0), "exit after SIGTERM: {}", describe_status(status));
    assert!(copy_status.is_some(), "nbdcopy hung after the server exited; stderr:\n{copy_stderr}");
    eprintln!(
        "fed nbdcopy {fed} MiB; nbdcopy {}; its stderr: {copy_stderr}",
        describe_status(copy_status.unwrap())
    );
    // If nbdcopy nevertheless reports success, every byte it was fed must be in the file.
    if copy_status.unwrap().success() {
        for i in 0..fed {
            assert_file_range(&file, i * MIB, &chunk(i), &format!("MiB #{i} of a completed nbdcopy"));
        }
    }
}
