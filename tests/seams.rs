//! Migration at its seams, black-box, with real peers where one exists: destinations that do
//! not offer WRITE_ZEROES (nbdkit's nozero filter, newstyle and oldstyle), one that fails every
//! write (nbdkit's error filter), a read-only one, the control requests an original flexnbd
//! server would receive from our CLI, a hello and a close arriving together (a fake: no server
//! does that on purpose), a hello with the wrong magic, a `listen` whose filesystem is full, and
//! `--unlink` after the path was renamed over.
//!
//! Everything runs on loopback with temporary files; every wait and loop is bounded; only
//! processes started here are signalled, through their own handles.

mod common;

use common::migration::*;
use common::*;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

const SIZE: u64 = 16 * MIB;

/// A source serving a striped file (data and holes) with a control socket.
fn striped_source(tag: &str, seed: u64) -> (TempDir, std::path::PathBuf, std::path::PathBuf, Server) {
    let dir = TempDir::new(tag);
    let (src_file, src_sock) = (dir.join("src.img"), dir.join("src.sock"));
    make_striped_file(&src_file, SIZE, seed);
    let src = serve(&src_file, &src_sock);
    (dir, src_file, src_sock, src)
}

/// Migrates a striped file to `kit` and checks, through nbdcopy, that every byte arrived.
fn migrate_to_nbdkit(tag: &str, kit: &Nbdkit) {
    let (dir, src_file, src_sock, mut src) = striped_source(tag, 7);
    let expected = fs::read(&src_file).expect("read source");
    start_mirror(&src_sock, kit.port, &[]);
    assert_exits_zero(&mut src, "source after migrating to nbdkit", MIGRATION_TIMEOUT);
    assert_eq!(
        src.count_lines("zero-filled WRITEs"),
        1,
        "holes were not sent as data:\n{}",
        src.stderr_text()
    );
    let copy = dir.join("copy.img");
    copy_out(&kit.uri(), &copy);
    assert!(fs::read(&copy).expect("read copy") == expected, "{tag}: the destination's bytes differ");
}

#[test]
fn a_newstyle_destination_without_write_zeroes_gets_every_byte() {
    // The destination starts full of other data, so a hole not sent would show.
    let kit = Nbdkit::start(&["--filter=nozero", "memory", "16M", "zeromode=none"]);
    let junk = random_bytes(SIZE as usize, 99);
    let dir = TempDir::new("seam-nozero-fill");
    let junk_file = dir.join("junk.img");
    fs::write(&junk_file, &junk).expect("write junk");
    let out = run_bounded(Command::new("nbdcopy").args([s(&junk_file), &kit.uri()]), Duration::from_secs(60));
    out.assert_success("fill nbdkit with junk");
    migrate_to_nbdkit("seam-nozero", &kit);
}

/// The original flexnbd speaks oldstyle and offers no WRITE_ZEROES: nbdkit -o with nozero is
/// the same on the wire (nbdkit 1.32 also refuses the FLUSH it advertises there).
#[test]
fn an_oldstyle_destination_without_write_zeroes_gets_every_byte() {
    let kit = Nbdkit::start(&["-o", "--filter=nozero", "memory", "16M", "zeromode=none"]);
    migrate_to_nbdkit("seam-oldstyle-nozero", &kit);
}

/// Zero-filled WRITEs to a destination that punches zeros (a flexnbd behind nbdkit's nbd
/// plugin with nozero, so it sees no WRITE_ZEROES) leave its file as sparse as ours.
#[test]
fn zero_blocks_sent_as_writes_stay_holes_on_a_sparse_destination() {
    let (dir, src_file, src_sock, mut src) = striped_source("seam-nozero-sparse", 8);
    let dst_file = dir.join("dst.img");
    make_random_file(&dst_file, SIZE, 5);
    let dst = Server::start(&dst_file, &[]);
    let port = dst.port().to_string();
    let kit = Nbdkit::start(&["--filter=nozero", "nbd", "hostname=127.0.0.1", &format!("port={port}")]);
    start_mirror(&src_sock, kit.port, &[]);
    assert_exits_zero(&mut src, "source after migrating through nbdkit", MIGRATION_TIMEOUT);
    drop(kit);
    assert_files_equal(&src_file, &dst_file);
    let (a_src, a_dst) = (allocated_bytes(&src_file), allocated_bytes(&dst_file));
    assert!(
        a_dst <= a_src + MIB,
        "destination allocates {a_dst} bytes for the source's {a_src}: holes were filled"
    );
    drop(dst);
}

#[test]
fn a_destination_that_fails_every_write_is_given_up_on_and_reported() {
    // One nbdkit thread: with several, nbdkit 1.32 can abort (`raw_send_socket: Assertion
    // sock >= 0`) when a client closes while replies are still being written, which is what
    // a source does after each refused attempt.
    let kit = Nbdkit::start(&[
        "-t",
        "1",
        "--filter=error",
        "memory",
        "16M",
        "error-pwrite=EIO",
        "error-pwrite-rate=100%",
    ]);
    let (_dir, _src_file, src_sock, mut src) = striped_source("seam-eio", 9);
    let port = kit.port.to_string();
    let out = cli(&["mirror", "-l", "127.0.0.1", "-p", &port, "-s", s(&src_sock), "--wait"]);
    assert!(out.stdout.contains("Migration started"), "no start: {}\n{}", out.stdout, out.stderr);
    out.assert_failure_with(
        "Destination refused WRITE:EIO on 3 attempts in a row",
        "mirror --wait to a failing disk",
    );
    let st = status(&src_sock);
    assert_eq!(field(&st, "is_mirroring"), "false", "{st:?}");
    assert_eq!(field(&st, "migration_gave_up"), "destination_error", "{st:?}");
    assert_eq!(field(&st, "migration_error"), "WRITE:EIO", "{st:?}");
    assert!(src.count_lines("destination answered WRITE at offset") >= 3, "{}", src.stderr_text());
    src.assert_alive("after giving up");
    drop(kit);
}

#[test]
fn a_read_only_destination_is_refused_at_once() {
    let (dir, _src_file, src_sock, mut src) = striped_source("seam-ro", 10);
    let dst_file = dir.join("dst.img");
    make_sparse_file(&dst_file, SIZE);
    let dst = Server::start(&dst_file, &["--read-only"]);
    let out = mirror(&src_sock, dst.port(), &[]);
    out.assert_failure_with("Destination is read-only", "mirror to a read-only server");
    let st = status(&src_sock);
    assert_eq!(field(&st, "migration_gave_up"), "read_only", "{st:?}");
    src.assert_alive("after a read-only destination");
}

// ---------------------------------------------------------------------------------------------
// What an original flexnbd server receives from our CLI
// ---------------------------------------------------------------------------------------------

/// A control socket that records one request's lines and answers as the original does.
fn record_request(args: &[&str]) -> Vec<String> {
    let dir = TempDir::new("seam-ctl");
    let sock = dir.join("ctl.sock");
    let l = UnixListener::bind(&sock).expect("bind control socket");
    let t = thread::spawn(move || {
        let (c, _) = l.accept().expect("accept");
        c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut r = BufReader::new(c.try_clone().expect("clone"));
        let mut lines = Vec::new();
        for _ in 0..16 {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\n" {
                break;
            }
            lines.push(line.trim_end().to_string());
        }
        let mut c = c;
        let _ = c.write_all(b"0: Mirror started\n");
        lines
    });
    let mut full: Vec<&str> = args.to_vec();
    full.extend(["-s", s(&sock)]);
    let _ = cli(&full);
    t.join().expect("control socket thread")
}

#[test]
fn the_cli_sends_only_the_mirror_slots_the_user_set() {
    let base = ["mirror", "-l", "10.0.0.2", "-p", "4000"];
    let with = |extra: &[&'static str]| -> Vec<String> {
        let mut a: Vec<&str> = base.to_vec();
        a.extend_from_slice(extra);
        record_request(&a)
    };
    assert_eq!(with(&[]), ["mirror", "10.0.0.2", "4000", "exit"]);
    assert_eq!(with(&["-b", "10.0.0.1"]), ["mirror", "10.0.0.2", "4000", "exit", "10.0.0.1"]);
    // The original reads 0 as 0 bytes/s; UINT64_MAX is its own "no limit".
    assert_eq!(
        with(&["--max-bps", "0"]),
        ["mirror", "10.0.0.2", "4000", "exit", "0.0.0.0", "18446744073709551615"]
    );
    assert_eq!(
        with(&["--max-bps", "1000", "-u"]),
        ["mirror", "10.0.0.2", "4000", "unlink", "0.0.0.0", "1000"]
    );
    assert_eq!(
        with(&["--freeze-limit", "0.5"]),
        ["mirror", "10.0.0.2", "4000", "exit", "0.0.0.0", "18446744073709551615", "freeze_limit_ms=500"]
    );
    assert_eq!(
        with(&["--mode", "active", "-w"]),
        ["mirror", "10.0.0.2", "4000", "exit", "0.0.0.0", "18446744073709551615", "wait", "mode=active"]
    );
    assert_eq!(
        record_request(&["mirror-speed", "--max-bps", "0"]),
        ["mirror_max_bps", "18446744073709551615"]
    );
}

#[test]
fn mirror_speed_zero_lifts_the_limit_on_our_server() {
    let (dir, _src_file, src_sock, mut src) = striped_source("seam-speed", 11);
    let dst_file = dir.join("dst.img");
    make_sparse_file(&dst_file, SIZE);
    let mut dst = listen(&dst_file, None, &[]);
    start_mirror(&src_sock, dst.port(), &["--max-bps", "100000"]);
    let st = status(&src_sock);
    assert_eq!(field(&st, "migration_speed_limit"), "100000", "{st:?}");
    cli(&["mirror-speed", "-s", s(&src_sock), "--max-bps", "0"]).assert_success("mirror-speed 0");
    // 16 MiB at 100 kB/s would take minutes.
    assert_migration_completes(&mut src, &mut dst);
}

// ---------------------------------------------------------------------------------------------
// A peer's last bytes and its EOF
// ---------------------------------------------------------------------------------------------

/// The hello and the close arrive in one read: the hello counts ("Migration started"), and the
/// close is a failure after it, retried. Repeated, since the two used to race.
#[test]
fn a_hello_followed_at_once_by_a_close_is_retried_not_rejected() {
    const ROUNDS: usize = 20;
    let (_dir, _src_file, src_sock, mut src) = striped_source("seam-hello-close", 12);
    for round in 0..ROUNDS {
        let (port, fake) = hello_then_close(original_hello(SIZE), 1);
        let out = mirror(&src_sock, port, &[]);
        assert!(
            out.success() && out.stdout.contains("Migration started"),
            "round {round}: {}\n{}",
            out.stdout,
            out.stderr
        );
        let st = wait_status(&src_sock, Duration::from_secs(10), |st| {
            st.get("migration_failed_attempts").is_some_and(|n| n != "0")
        });
        // Our first WRITEs may reach the closed socket before we read its EOF: a reset then.
        let why = field(&st, "migration_last_failure");
        assert!(why == "closed_by_destination" || why == "connection_error", "round {round}: {st:?}");
        cli(&["break", "-s", s(&src_sock)]).assert_success("break");
        assert_eq!(fake.join().expect("fake"), 1);
    }
    src.assert_alive("after the hello-then-close rounds");
}

/// A newstyle greeting then a close: also after a hello, so retried until `break`.
#[test]
fn a_newstyle_greeting_followed_by_a_close_is_retried() {
    let (_dir, _src_file, src_sock, mut src) = striped_source("seam-greeting-close", 13);
    let mut greeting = NBDMAGIC.to_be_bytes().to_vec();
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&3u16.to_be_bytes());
    let (port, fake) = hello_then_close(greeting, 3);
    let port = port.to_string();
    let mut waiting = Command::new(flexnbd_bin())
        .args(["mirror", "-l", "127.0.0.1", "-p", &port, "-s", s(&src_sock)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mirror");
    let st = wait_status(&src_sock, Duration::from_secs(15), |st| {
        st.get("migration_failed_attempts").and_then(|n| n.parse::<u32>().ok()).is_some_and(|n| n >= 2)
    });
    assert_eq!(field(&st, "migration_retrying"), "true", "{st:?}");
    cli(&["break", "-s", s(&src_sock)]).assert_success("break");
    let code = wait_child(&mut waiting, CLI_TIMEOUT);
    if code.is_none() {
        let _ = waiting.kill();
    }
    let _ = waiting.wait();
    assert!(code.is_some_and(|c| !c.success()), "mirror should end with the break: {code:?}");
    assert!(fake.join().expect("fake") >= 2);
    src.assert_alive("after the retries");
}

#[test]
fn a_hello_with_the_wrong_magic_is_rejected() {
    let (_dir, _src_file, src_sock, mut src) = striped_source("seam-bad-magic", 14);
    let mut hello = original_hello(SIZE);
    hello[..8].copy_from_slice(b"HTTP/1.1");
    let (port, fake) = hello_then_close(hello, 1);
    let out = mirror(&src_sock, port, &[]);
    out.assert_failure_with("Mirror was rejected", "mirror to a server with the wrong magic");
    assert_eq!(field(&status(&src_sock), "is_mirroring"), "false");
    let _ = fake.join();
    src.assert_alive("after a wrong magic");
}

// ---------------------------------------------------------------------------------------------
// A destination that cannot write
// ---------------------------------------------------------------------------------------------

/// A small tmpfs for a full-disk test, unmounted when dropped; None (the test says why and
/// returns) when this process may not mount.
struct SmallFs {
    dir: TempDir,
}

impl SmallFs {
    fn mount(tag: &str, size: &str) -> Option<SmallFs> {
        let dir = TempDir::new(tag);
        let out = run_bounded(
            Command::new("mount").args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                s(dir.path()),
            ]),
            Duration::from_secs(10),
        );
        if !out.success() {
            eprintln!("SKIPPED: cannot mount a tmpfs here (needs root): {}", out.stderr.trim());
            return None;
        }
        Some(SmallFs { dir })
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = run_bounded(Command::new("umount").args(["-l", s(self.dir.path())]), Duration::from_secs(10));
    }
}

#[test]
fn a_listen_on_a_full_filesystem_exits_and_the_source_waits_for_a_new_one() {
    let Some(small) = SmallFs::mount("seam-full", "4m") else { return };
    let (dir, src_file, src_sock, mut src) = striped_source("seam-full-src", 15);
    let full_file = small.dir.join("dst.img");
    make_sparse_file(&full_file, SIZE);
    let mut dst = listen(&full_file, None, &[]);
    let port = dst.port();
    start_mirror(&src_sock, port, &[]);
    let st = dst.wait_timeout(MIGRATION_TIMEOUT);
    assert!(st.is_some_and(|st| !st.success()), "listen on a full disk: {st:?}\n{}", dst.stderr_text());
    assert!(dst.count_lines("cannot write") >= 1, "{}", dst.stderr_text());
    let st = wait_status(&src_sock, Duration::from_secs(10), |st| {
        st.get("migration_last_failure").is_some_and(|f| f == "connect_failed")
    });
    assert_eq!(field(&st, "is_mirroring"), "true", "{st:?}");
    assert_eq!(field(&st, "migration_retrying"), "true", "{st:?}");
    assert_eq!(field(&st, "migration_last_failure"), "connect_failed", "{st:?}");

    let good_file = dir.join("dst.img");
    make_sparse_file(&good_file, SIZE);
    let mut dst2 = listen_on_port(&good_file, port, None);
    assert_migration_completes(&mut src, &mut dst2);
    assert_files_equal(&src_file, &good_file);
}

// ---------------------------------------------------------------------------------------------
// --unlink
// ---------------------------------------------------------------------------------------------

#[test]
fn unlink_keeps_a_file_renamed_over_the_served_path() {
    let (dir, src_file, src_sock, mut src) = striped_source("seam-unlink", 16);
    let dst_file = dir.join("dst.img");
    make_sparse_file(&dst_file, SIZE);
    let mut dst = listen(&dst_file, None, &[]);
    let other = dir.join("other.img");
    fs::write(&other, b"someone else's file").expect("write other");
    let served = fs::read(&src_file).expect("read source");
    fs::rename(&other, &src_file).expect("rename over the served path");
    start_mirror(&src_sock, dst.port(), &["--unlink"]);
    assert_migration_completes(&mut src, &mut dst);
    assert_eq!(fs::read(&src_file).expect("the other file"), b"someone else's file");
    assert!(fs::read(&dst_file).expect("read destination") == served, "the served data did not arrive");
    assert_eq!(src.count_lines("not unlinking"), 1, "{}", src.stderr_text());
}
