//! The control socket, black-box: the `status` line and its live counters, `acl` replacing the
//! access list (and disconnecting clients it no longer admits), `break` without a migration,
//! robustness against garbage, over-long lines, unknown commands and idle sessions, and the
//! socket file's life cycle (stale file replaced, live one refused, mode 0600, removed on exit).

mod common;

use common::*;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

const LOCAL1: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const LOCAL2: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// Bound for one CLI invocation against a local server.
const CLI_TIMEOUT: Duration = Duration::from_secs(20);

/// The served file's size: not a power of two, so `size=` cannot be right by accident.
const FILE_SIZE: u64 = MIB + 12 * KIB;

/// A temp dir holding `disk.img` (random data) and the path for a control socket `ctl.sock`.
fn setup(tag: &str) -> (TempDir, PathBuf, PathBuf) {
    let dir = TempDir::new(tag);
    let file = dir.join("disk.img");
    make_random_file(&file, FILE_SIZE, 77);
    let sock = dir.join("ctl.sock");
    (dir, file, sock)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// `flexnbd serve ... -v --sock SOCK EXTRA...`, waited until it listens.
fn serve(file: &Path, sock: &Path, extra: &[&str]) -> Server {
    let mut args = vec!["--sock", s(sock)];
    args.extend_from_slice(extra);
    Server::start(file, &args)
}

/// Run `flexnbd ARGS...` (stdin empty), bounded.
fn cli(args: &[&str]) -> ToolOutput {
    let out = run_bounded(Command::new(flexnbd_bin()).args(args), CLI_TIMEOUT);
    assert!(out.status.is_some(), "flexnbd {args:?} did not finish within {CLI_TIMEOUT:?}");
    assert!(!out.stderr.contains("panicked"), "flexnbd {args:?} panicked:\n--- stderr ---\n{}", out.stderr);
    out
}

/// `flexnbd status --sock SOCK`, checked for the one-line, `key=value`, no-spaces format;
/// returns the fields in order.
fn status(sock: &Path) -> Vec<(String, String)> {
    let out = cli(&["status", "--sock", s(sock)]);
    out.assert_success("flexnbd status");
    let text = &out.stdout;
    assert!(text.ends_with('\n'), "status output must end with a newline: {text:?}");
    let line = &text[..text.len() - 1];
    assert!(!line.contains('\n') && !line.contains('\r'), "status must print exactly one line, got {text:?}");
    assert!(out.stderr.trim().is_empty(), "status wrote to stderr on success: {:?}", out.stderr);
    parse_status(line)
}

/// Split a status line into (key, value) pairs, asserting the format: tokens separated by
/// single spaces, each exactly `key=value` with non-empty key and value and no spaces.
fn parse_status(line: &str) -> Vec<(String, String)> {
    assert!(!line.is_empty(), "empty status line");
    line.split(' ')
        .map(|tok| {
            assert!(!tok.is_empty(), "status line has a doubled, leading or trailing space: {line:?}");
            let (k, v) =
                tok.split_once('=').unwrap_or_else(|| panic!("`{tok}` is not key=value in {line:?}"));
            assert!(!k.is_empty() && !v.is_empty(), "empty key or value in `{tok}` ({line:?})");
            assert!(!v.contains('='), "value of `{k}` contains `=`: {line:?}");
            assert!(
                k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "odd key `{k}` in status line {line:?}"
            );
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn field<'a>(fields: &'a [(String, String)], key: &str) -> &'a str {
    fields
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("status has no `{key}`: {fields:?}"))
}

/// Poll `status` until `key` has the value `want`; panics with the last line after the bound.
fn wait_status(sock: &Path, key: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = Vec::new();
    for _ in 0..500 {
        last = status(sock);
        if field(&last, key) == want {
            return;
        }
        if Instant::now() >= deadline {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    panic!("status never showed {key}={want}; last: {last:?}");
}

/// One raw control session: send `request` (optionally half-closing afterwards), then read the
/// reply until the server closes. Write errors (the server may close early) are ignored; a
/// reset after the reply counts as the close. Returns the reply text ("" = closed silently).
fn control_raw(sock: &Path, request: &[u8], half_close: bool) -> String {
    let mut c = UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    c.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let _ = c.write_all(request);
    if half_close {
        let _ = c.shutdown(Shutdown::Write);
    }
    read_reply(&mut c)
}

/// Read until EOF/reset (bounded by the socket timeout and 64 KiB).
fn read_reply(c: &mut UnixStream) -> String {
    let mut v = Vec::new();
    let mut buf = [0u8; 4096];
    while v.len() < 64 * 1024 {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => v.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe) => break,
            Err(e) => panic!("reading a control reply: {e} (after {} bytes: {:?})", v.len(), lossy(&v)),
        }
    }
    lossy(&v)
}

fn lossy(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

/// An error reply is one line `1: text`; a silent close is also acceptable when `may_close`.
fn assert_error_reply(reply: &str, what: &str, may_close: bool) {
    if reply.is_empty() && may_close {
        return;
    }
    assert!(reply.starts_with("1:"), "{what}: expected a `1: ...` reply, got {reply:?}");
    assert!(
        reply.ends_with('\n') && reply.matches('\n').count() == 1,
        "{what}: the reply must be exactly one line, got {reply:?}"
    );
}

/// The server still answers `status` and serves an NBD read with the file's bytes.
fn assert_still_serving(server: &mut Server, sock: &Path, file: &Path, what: &str) {
    server.assert_alive(what);
    let st = status(sock);
    assert_eq!(field(&st, "pid"), server.pid().to_string(), "{what}: pid");
    let mut c = Nbd::connect(server.addr()).unwrap_or_else(|e| panic!("{what}: NBD connect: {e}"));
    let got = c.read(4096, 8192).expect("NBD read io").expect("NBD read status");
    assert_eq!(got, read_at(file, 4096, 8192), "{what}: NBD read returned the wrong bytes");
    let _ = c.disconnect();
}

/// A client from `from` that completes the handshake (GO) and can read.
fn admitted_client(server: &Server, from: IpAddr) -> Nbd {
    let sock = tcp_connect_from(from, server.addr()).unwrap_or_else(|e| panic!("connect from {from}: {e}"));
    let n = Negotiation::on_stream(sock, CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
        .unwrap_or_else(|e| panic!("client from {from} should be admitted: {e}"));
    n.go("", &[]).unwrap_or_else(|e| panic!("GO from {from}: {e}")).0
}

/// A connection from `from` is refused: closed before any hello byte.
fn assert_refused(server: &Server, from: IpAddr) {
    let mut s = tcp_connect_from(from, server.addr()).unwrap_or_else(|e| panic!("connect from {from}: {e}"));
    match wait_closed(&mut s, Duration::from_secs(5)) {
        Ok(0) => {}
        Ok(n) => panic!("client from {from} should be refused but got {n} bytes before the close"),
        Err(e) => panic!("client from {from} should be refused: {e}"),
    }
}

fn assert_reads_file(c: &mut Nbd, file: &Path, what: &str) {
    let got = c
        .read(0, 4096)
        .unwrap_or_else(|e| panic!("{what}: read failed at the socket level: {e}"))
        .unwrap_or_else(|e| panic!("{what}: read failed with NBD error {e}"));
    assert_eq!(got, read_at(file, 0, 4096), "{what}: wrong bytes");
}

// ---------------------------------------------------------------------------------------------
// status
// ---------------------------------------------------------------------------------------------

#[test]
fn status_prints_one_line_with_pid_and_size() {
    let (_dir, file, sock) = setup("st-fmt");
    let server = serve(&file, &sock, &[]);
    let st = status(&sock);
    let keys: Vec<&str> = st.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        ["pid", "size", "is_mirroring", "clients_allowed", "num_clients", "has_control"],
        "status keys (no migration running): {st:?}"
    );
    assert_eq!(field(&st, "pid"), server.pid().to_string(), "pid must be the server's");
    assert_eq!(field(&st, "size"), FILE_SIZE.to_string(), "size must be the file's size");
    assert_eq!(field(&st, "is_mirroring"), "false");
    assert_eq!(field(&st, "clients_allowed"), "true");
    assert_eq!(field(&st, "num_clients"), "0");
    assert_eq!(field(&st, "has_control"), "true");
}

#[test]
fn status_over_the_raw_socket_is_a_0_reply_line() {
    let (_dir, file, sock) = setup("st-raw");
    let server = serve(&file, &sock, &[]);
    // Blank-line terminated, EOF terminated (no blank line, no final LF) and CRLF forms.
    for (req, half) in [(&b"status\n\n"[..], false), (b"status", true), (b"status\r\n\r\n", false)] {
        let reply = control_raw(&sock, req, half);
        let what = format!("request {:?}", lossy(req));
        assert!(reply.starts_with("0: pid="), "{what}: got {reply:?}");
        assert!(reply.ends_with('\n') && reply.matches('\n').count() == 1, "{what}: one line: {reply:?}");
        let st = parse_status(reply.trim_end_matches('\n').strip_prefix("0: ").unwrap());
        assert_eq!(field(&st, "pid"), server.pid().to_string(), "{what}");
    }
}

#[test]
fn status_num_clients_follows_connected_clients() {
    let (_dir, file, sock) = setup("st-num");
    let server = serve(&file, &sock, &[]);
    assert_eq!(field(&status(&sock), "num_clients"), "0");

    let mut a = Nbd::connect(server.addr()).expect("client a");
    let mut b = Nbd::connect(server.addr()).expect("client b");
    assert_reads_file(&mut a, &file, "client a");
    assert_reads_file(&mut b, &file, "client b");
    wait_status(&sock, "num_clients", "2");

    // One leaves politely (NBD_CMD_DISC), the other just closes its socket.
    a.disconnect().expect("send DISC");
    drop(a);
    wait_status(&sock, "num_clients", "1");
    drop(b);
    wait_status(&sock, "num_clients", "0");
}

#[test]
fn status_in_listen_mode_has_no_control() {
    let (_dir, file, sock) = setup("st-listen");
    let mut server =
        Server::spawn(&["listen", "-l", "127.0.0.1", "-p", "0", "-f", s(&file), "-v", "--sock", s(&sock)]);
    server.wait_ready(IO_TIMEOUT);
    let st = status(&sock);
    assert_eq!(field(&st, "pid"), server.pid().to_string());
    assert_eq!(field(&st, "size"), FILE_SIZE.to_string());
    assert_eq!(field(&st, "has_control"), "false", "listen mode: {st:?}");
    assert_eq!(field(&st, "is_mirroring"), "false");
}

#[test]
fn status_default_deny_without_acl_allows_no_clients() {
    let (_dir, file, sock) = setup("st-deny");
    let server = serve(&file, &sock, &["-d"]);
    assert_eq!(field(&status(&sock), "clients_allowed"), "false", "-d with an empty ACL");
    assert_refused(&server, LOCAL1);

    // An entry makes clients possible again; an empty list under -d takes that back.
    let out = cli(&["acl", "--sock", s(&sock), "127.0.0.1"]);
    out.assert_success("acl 127.0.0.1");
    assert_eq!(field(&status(&sock), "clients_allowed"), "true", "-d with an ACL entry");
    let mut c = admitted_client(&server, LOCAL1);
    assert_reads_file(&mut c, &file, "127.0.0.1 after acl");
    drop(c);

    let out = cli(&["acl", "--sock", s(&sock)]);
    out.assert_success("acl with no entries");
    assert_eq!(field(&status(&sock), "clients_allowed"), "false", "-d after emptying the ACL");
    assert_refused(&server, LOCAL1);
}

// ---------------------------------------------------------------------------------------------
// acl
// ---------------------------------------------------------------------------------------------

#[test]
fn acl_replacement_disconnects_clients_no_longer_admitted() {
    let (_dir, file, sock) = setup("acl-repl");
    let mut server = serve(&file, &sock, &[]);

    // From 127.0.0.1: one in transmission, one still in option negotiation.
    let mut gone = admitted_client(&server, LOCAL1);
    assert_reads_file(&mut gone, &file, "127.0.0.1 before the change");
    let negotiating = Negotiation::on_stream(
        tcp_connect_from(LOCAL1, server.addr()).expect("connect from 127.0.0.1"),
        CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES,
    )
    .expect("greeting for the negotiating client");
    let mut negotiating_sock = negotiating.sock;
    // From 127.0.0.2: stays.
    let mut stays = admitted_client(&server, LOCAL2);
    assert_reads_file(&mut stays, &file, "127.0.0.2 before the change");
    wait_status(&sock, "num_clients", "3");

    let out = cli(&["acl", "--sock", s(&sock), "127.0.0.2"]);
    out.assert_success("acl 127.0.0.2");
    assert_eq!(out.stdout, "updated\n", "acl success text");

    let t0 = Instant::now();
    if let Err(e) = wait_closed(&mut gone.sock, Duration::from_secs(5)) {
        panic!("the 127.0.0.1 client in transmission was not disconnected by the new ACL: {e}");
    }
    if let Err(e) = wait_closed(&mut negotiating_sock, Duration::from_secs(5)) {
        panic!("the 127.0.0.1 client in negotiation was not disconnected by the new ACL: {e}");
    }
    assert!(t0.elapsed() < Duration::from_secs(5), "disconnects took {:?}", t0.elapsed());

    assert_reads_file(&mut stays, &file, "127.0.0.2 after the change");
    wait_status(&sock, "num_clients", "1");
    assert_refused(&server, LOCAL1);
    let mut again = admitted_client(&server, LOCAL2);
    assert_reads_file(&mut again, &file, "new 127.0.0.2 client");
    drop(again);

    // An empty ACL (no -d) admits everyone again.
    cli(&["acl", "--sock", s(&sock)]).assert_success("acl with no entries");
    let mut back = admitted_client(&server, LOCAL1);
    assert_reads_file(&mut back, &file, "127.0.0.1 after emptying the ACL");
    assert_reads_file(&mut stays, &file, "127.0.0.2 after emptying the ACL");
    server.assert_alive("after the ACL changes");
}

#[test]
fn acl_with_a_bad_entry_fails_and_keeps_the_old_list() {
    let (_dir, file, sock) = setup("acl-bad");
    let server = serve(&file, &sock, &["127.0.0.2"]);
    let mut stays = admitted_client(&server, LOCAL2);

    let out = cli(&["acl", "--sock", s(&sock), "1.2.3.4", "bogus"]);
    out.assert_failure_with("bogus", "acl with a bad entry");
    assert!(out.stdout.trim().is_empty(), "nothing on stdout on failure: {:?}", out.stdout);

    // Over the raw socket: `1: bad spec: bogus`.
    let reply = control_raw(&sock, b"acl\n1.2.3.4\nbogus\n\n", false);
    assert_error_reply(&reply, "raw acl with a bad entry", false);
    assert!(reply.contains("bogus"), "raw reply must name the bad entry: {reply:?}");

    // Still the old list: 127.0.0.2 admitted (1.2.3.4 alone would refuse it), 127.0.0.1 not.
    assert_reads_file(&mut stays, &file, "existing 127.0.0.2 client");
    let mut fresh = admitted_client(&server, LOCAL2);
    assert_reads_file(&mut fresh, &file, "new 127.0.0.2 client");
    assert_refused(&server, LOCAL1);
    assert_eq!(field(&status(&sock), "clients_allowed"), "true");
}

#[test]
fn acl_with_an_empty_entry_fails_and_keeps_the_old_list() {
    // The request is one entry per line ended by a blank line, so an empty argument must not be
    // sent as-is: it would end the request early and silently drop the entries after it.
    let (_dir, file, sock) = setup("acl-empty");
    let server = serve(&file, &sock, &["127.0.0.2"]);
    for args in [vec!["127.0.0.3", "", "bogus"], vec!["127.0.0.3\n\nbogus"], vec![""]] {
        let mut argv = vec!["acl", "--sock", s(&sock)];
        argv.extend(&args);
        let out = cli(&argv);
        assert!(
            !out.success(),
            "acl {args:?} must fail (an empty or multi-line entry is not an address), but it exited 0 \
             with stdout {:?}",
            out.stdout
        );
        let mut stays = admitted_client(&server, LOCAL2);
        assert_reads_file(&mut stays, &file, &format!("127.0.0.2 after the refused acl {args:?}"));
        assert_refused(&server, LOCAL1);
    }
}

// ---------------------------------------------------------------------------------------------
// break / mirror-speed without a migration
// ---------------------------------------------------------------------------------------------

#[test]
fn break_without_a_migration_says_not_mirroring() {
    let (_dir, file, sock) = setup("break");
    let mut server = serve(&file, &sock, &[]);
    let out = cli(&["break", "--sock", s(&sock)]);
    out.assert_failure_with("not mirroring", "break with no migration");
    assert!(out.stdout.trim().is_empty(), "stdout: {:?}", out.stdout);

    let out = cli(&["mirror-speed", "--sock", s(&sock), "--max-bps", "1000"]);
    out.assert_failure_with("not mirroring", "mirror-speed with no migration");
    assert_still_serving(&mut server, &sock, &file, "after break");
}

// ---------------------------------------------------------------------------------------------
// Robustness
// ---------------------------------------------------------------------------------------------

#[test]
fn garbage_on_the_control_socket_gets_an_error_and_the_server_keeps_serving() {
    let (_dir, file, sock) = setup("ctl-junk");
    let mut server = serve(&file, &sock, &[]);
    let cases: Vec<(String, Vec<u8>, bool)> = vec![
        ("binary line".into(), b"\x00\x01\x02\xff\xfe\xfd\n\n".to_vec(), true),
        ("binary then EOF".into(), b"\xde\xad\xbe\xef".to_vec(), true),
        ("blank request".into(), b"\n".to_vec(), true),
        ("random 4 KiB".into(), random_bytes(4096, 1), true),
        ("random 64 KiB".into(), random_bytes(64 * 1024, 2), true),
        (
            "NBD hello bytes".into(),
            NBDMAGIC.to_be_bytes().iter().chain(&IHAVEOPT.to_be_bytes()).copied().collect(),
            true,
        ),
        ("300-byte line".into(), [vec![b'x'; 300], b"\n\n".to_vec()].concat(), false),
    ];
    for (what, req, half) in &cases {
        let reply = control_raw(&sock, req, *half);
        assert!(!reply.starts_with("0:"), "{what}: garbage must not succeed, got {reply:?}");
        assert_error_reply(&reply, what, true);
        assert_still_serving(&mut server, &sock, &file, &format!("after {what}"));
    }
    // Connect and leave without a byte.
    drop(UnixStream::connect(&sock).expect("connect"));
    assert_still_serving(&mut server, &sock, &file, "after an empty session");
}

#[test]
fn a_one_mib_line_without_newline_is_refused_and_the_server_keeps_serving() {
    let (_dir, file, sock) = setup("ctl-long");
    let mut server = serve(&file, &sock, &[]);
    // Not half-closed: the server must decide from the length alone, not wait for the end.
    let reply = control_raw(&sock, &vec![b'a'; MIB as usize], false);
    assert_error_reply(&reply, "1 MiB line", true);
    assert_still_serving(&mut server, &sock, &file, "after a 1 MiB line");
    // Also when the line is `status` padded with spaces.
    let mut long = b"status".to_vec();
    long.resize(MIB as usize, b' ');
    let reply = control_raw(&sock, &long, true);
    assert_error_reply(&reply, "1 MiB `status   ...` line", true);
    assert_still_serving(&mut server, &sock, &file, "after a padded 1 MiB line");
}

#[test]
fn unknown_command_gets_an_error_reply() {
    let (_dir, file, sock) = setup("ctl-unknown");
    let mut server = serve(&file, &sock, &[]);
    for req in [&b"frobnicate\n\n"[..], b"STATUS\n\n", b"status-please\n\n", b"frobnicate\narg1\narg2\n\n"] {
        let what = format!("request {:?}", lossy(req));
        let reply = control_raw(&sock, req, false);
        assert_error_reply(&reply, &what, false);
        assert_still_serving(&mut server, &sock, &file, &format!("after {what}"));
    }
}

#[test]
fn idle_control_sessions_do_not_block_others() {
    let (_dir, file, sock) = setup("ctl-idle");
    let mut server = serve(&file, &sock, &[]);
    let mut idle: Vec<UnixStream> =
        (0..20).map(|_| UnixStream::connect(&sock).expect("idle session")).collect();
    let mut partial = UnixStream::connect(&sock).expect("partial session");
    partial.write_all(b"sta").unwrap();
    let mut unfinished = UnixStream::connect(&sock).expect("unfinished session");
    unfinished.write_all(b"status\n").unwrap(); // no blank line yet
    // An NBD client mid-handshake as well.
    let nbd_idle = tcp_connect(server.addr()).expect("idle NBD connection");

    let t0 = Instant::now();
    let st = status(&sock);
    assert!(t0.elapsed() < Duration::from_secs(5), "status took {:?} with idle sessions open", t0.elapsed());
    assert_eq!(field(&st, "pid"), server.pid().to_string());
    assert_still_serving(&mut server, &sock, &file, "with idle control sessions open");

    // The partial sessions still complete when their requests do.
    partial.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    partial.write_all(b"tus\n\n").unwrap();
    let reply = read_reply(&mut partial);
    assert!(reply.starts_with("0: pid="), "completed partial request: {reply:?}");
    unfinished.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    unfinished.write_all(b"\n").unwrap();
    let reply = read_reply(&mut unfinished);
    assert!(reply.starts_with("0: pid="), "completed unfinished request: {reply:?}");

    // The idle ones are still open (no reply, no close) and the server is fine after they go.
    let probe = &mut idle[0];
    probe.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut b = [0u8; 16];
    match probe.read(&mut b) {
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
        other => panic!("an idle control session got {other:?} without sending anything"),
    }
    drop(idle);
    let _ = nbd_idle.shutdown(Shutdown::Both);
    drop(nbd_idle);
    assert_still_serving(&mut server, &sock, &file, "after the idle sessions left");
}

// ---------------------------------------------------------------------------------------------
// The socket file
// ---------------------------------------------------------------------------------------------

#[test]
fn control_socket_is_mode_0600() {
    let (_dir, file, sock) = setup("ctl-mode");
    let _server = serve(&file, &sock, &[]);
    let meta = fs::symlink_metadata(&sock).expect("the control socket exists");
    assert!(meta.file_type().is_socket(), "{} is not a socket", sock.display());
    let mode = meta.permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600, "control socket mode is {mode:o}");
}

#[test]
fn stale_socket_file_is_replaced_at_startup() {
    let (_dir, file, sock) = setup("ctl-stale");
    drop(UnixListener::bind(&sock).expect("bind a socket to leave behind"));
    assert!(fs::symlink_metadata(&sock).expect("stale file").file_type().is_socket());
    assert!(UnixStream::connect(&sock).is_err(), "test bug: the stale socket is still live");

    let mut server = serve(&file, &sock, &[]);
    assert_still_serving(&mut server, &sock, &file, "on a replaced stale socket");
    let mode = fs::symlink_metadata(&sock).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600, "replaced control socket mode is {mode:o}");
}

#[test]
fn a_regular_file_at_the_socket_path_is_not_deleted() {
    let (_dir, file, sock) = setup("ctl-regular");
    fs::write(&sock, b"precious").unwrap();
    let (st, lines) = run_expect_exit(
        &["serve", "-l", "127.0.0.1", "-p", "0", "-f", s(&file), "--sock", s(&sock)],
        IO_TIMEOUT,
    );
    let text = lines.join("\n");
    assert!(!st.success(), "serve on a regular file as --sock must fail; stderr:\n{text}");
    assert!(!text.contains("panicked"), "panicked:\n{text}");
    assert!(text.contains(s(&sock)), "the error should name the socket path:\n{text}");
    assert_eq!(fs::read(&sock).expect("the file must survive"), b"precious");
}

#[test]
fn second_server_on_a_live_socket_fails_and_the_first_keeps_working() {
    let (dir, file, sock) = setup("ctl-live");
    let mut first = serve(&file, &sock, &[]);
    let other = dir.join("other.img");
    make_sparse_file(&other, MIB);
    let args = ["serve", "-l", "127.0.0.1", "-p", "0", "-f", s(&other), "--sock", s(&sock)];
    assert_startup_error(&args, &[s(&sock)]);
    let (_, lines) = run_expect_exit(&args, IO_TIMEOUT);
    let text = lines.join("\n").to_lowercase();
    assert!(
        text.contains("in use") || text.contains("running") || text.contains("already"),
        "the error should say the socket is in use:\n{text}"
    );

    assert!(
        fs::symlink_metadata(&sock).map(|m| m.file_type().is_socket()).unwrap_or(false),
        "the failed second server removed the first one's control socket"
    );
    assert_still_serving(&mut first, &sock, &file, "after a second server tried its socket");
}

#[test]
fn sigterm_removes_the_socket_file() {
    let (_dir, file, sock) = setup("ctl-term");
    let mut server = serve(&file, &sock, &[]);
    assert!(sock.exists(), "control socket missing while running");
    let st = server.stop_with(libc::SIGTERM, Duration::from_secs(15));
    assert!(st.success(), "SIGTERM exit: {}; stderr:\n{}", describe_status(st), server.stderr_text());
    assert!(
        fs::symlink_metadata(&sock).is_err(),
        "control socket {} still exists after SIGTERM",
        sock.display()
    );
    // And a CLI aimed at it now fails cleanly.
    let out = cli(&["status", "--sock", s(&sock)]);
    assert!(!out.success(), "status after the server exited must fail");
}

#[test]
fn control_and_nbd_clients_work_together_on_one_server() {
    // A status and an NBD read interleaved many times: the control path does not disturb the
    // data path.
    let (_dir, file, sock) = setup("ctl-mixed");
    let server = serve(&file, &sock, &[]);
    let mut c = Nbd::connect(server.addr()).expect("client");
    for i in 0..20u64 {
        let st = status(&sock);
        assert_eq!(field(&st, "num_clients"), "1", "round {i}: {st:?}");
        let off = (i * 4096) % (FILE_SIZE - 4096);
        let got = c.read(off, 4096).expect("io").expect("read");
        assert_eq!(got, read_at(&file, off, 4096), "round {i}");
    }
}
