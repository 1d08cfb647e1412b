//! The command-line clients, black-box: `read`/`write` against ACL'd (with `--bind`), oldstyle
//! and large exports; their failures (short stdin, out-of-range, refused); `help` and `--help`
//! for every command; bad command lines and a missing control socket never panic; and the man
//! page renders and names every command.

mod common;

use common::*;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::Duration;

const CLI_TIMEOUT: Duration = Duration::from_secs(30);
const BIG_TIMEOUT: Duration = Duration::from_secs(180);

const COMMANDS: [&str; 9] =
    ["serve", "listen", "mirror", "mirror-speed", "break", "acl", "status", "read", "write"];

/// What a bounded `flexnbd` run did, with stdout as bytes (read prints raw data).
struct Run {
    args: Vec<String>,
    status: Option<ExitStatus>,
    stdout: Vec<u8>,
    stderr: String,
}

impl Run {
    fn success(&self) -> bool {
        self.status.map(|s| s.success()).unwrap_or(false)
    }

    fn describe(&self) -> String {
        format!(
            "flexnbd {:?}: status {:?}\n--- stdout ({} bytes) ---\n{}\n--- stderr ---\n{}",
            self.args,
            self.status,
            self.stdout.len(),
            String::from_utf8_lossy(&self.stdout[..self.stdout.len().min(2000)]),
            self.stderr
        )
    }

    fn assert_success(&self) {
        assert!(self.success(), "expected success: {}", self.describe());
    }

    /// Non-zero exit with a code (not a signal), a message on stderr, and no panic.
    fn assert_clean_failure(&self) {
        let st = self.status.unwrap_or_else(|| panic!("did not finish: {}", self.describe()));
        assert!(!st.success(), "expected failure: {}", self.describe());
        assert!(st.code().is_some(), "killed by a signal instead of exiting: {}", self.describe());
        assert!(!self.stderr.contains("panicked"), "panicked: {}", self.describe());
        assert!(!self.stderr.trim().is_empty(), "failed without a message: {}", self.describe());
    }

    fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Run `flexnbd ARGS...` with `stdin` fed from a thread (None: /dev/null), bounded by `timeout`
/// (the child, which we spawned, is killed by its handle if it overruns).
fn run(args: &[&str], stdin: Option<Vec<u8>>, timeout: Duration) -> Run {
    let mut child = Command::new(flexnbd_bin())
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn flexnbd {args:?}: {e}"));
    let feeder = stdin.map(|data| {
        let mut w = child.stdin.take().expect("stdin piped");
        // Ends when all is written, or with EPIPE once the child exits or is killed.
        thread::spawn(move || {
            let _ = w.write_all(&data);
        })
    });
    let mut out_pipe = child.stdout.take().expect("stdout piped");
    let out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let mut err_pipe = child.stderr.take().expect("stderr piped");
    let err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    });
    let status = wait_child(&mut child, timeout);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    if let Some(f) = feeder {
        let _ = f.join();
    }
    let r = Run {
        args: args.iter().map(|a| a.to_string()).collect(),
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    };
    assert!(r.status.is_some(), "flexnbd {args:?} did not finish within {timeout:?}: {}", r.describe());
    r
}

fn cli(args: &[&str]) -> Run {
    run(args, None, CLI_TIMEOUT)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

fn setup(tag: &str, size: u64) -> (TempDir, PathBuf) {
    let dir = TempDir::new(tag);
    let file = dir.join("disk.img");
    make_random_file(&file, size, 99);
    (dir, file)
}

/// `flexnbd read -l 127.0.0.1 -p PORT -F FROM -S SIZE [--bind B]`.
fn read_args(port: &str, from: u64, size: u64, bind: Option<&str>) -> Vec<String> {
    let mut v: Vec<String> =
        ["read", "-l", "127.0.0.1", "-p", port, "-F", &from.to_string(), "-S", &size.to_string()]
            .iter()
            .map(|x| x.to_string())
            .collect();
    if let Some(b) = bind {
        v.extend(["--bind".to_string(), b.to_string()]);
    }
    v
}

fn write_args(port: &str, from: u64, size: u64, bind: Option<&str>) -> Vec<String> {
    let mut v = read_args(port, from, size, bind);
    v[0] = "write".into();
    v
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

// ---------------------------------------------------------------------------------------------
// read / write
// ---------------------------------------------------------------------------------------------

#[test]
fn read_write_round_trip_with_bind_against_an_acl() {
    let (_dir, file) = setup("rw-bind", 2 * MIB);
    let mut server = Server::start(&file, &["127.0.0.2"]);
    let port = server.port().to_string();

    let data = random_bytes(100_000, 5);
    let w = run(
        &refs(&write_args(&port, 12_345, data.len() as u64, Some("127.0.0.2"))),
        Some(data.clone()),
        CLI_TIMEOUT,
    );
    w.assert_success();
    assert!(w.stdout.is_empty(), "write printed to stdout: {}", w.describe());
    assert_file_range(&file, 12_345, &data, "after flexnbd write --bind 127.0.0.2");

    let r = cli(&refs(&read_args(&port, 12_345, data.len() as u64, Some("127.0.0.2"))));
    r.assert_success();
    assert_eq!(r.stdout.len(), data.len(), "read output length");
    assert!(r.stdout == data, "read returned other bytes than were written");

    // Without --bind the client comes from 127.0.0.1, which the ACL refuses: a clean failure.
    let r = cli(&refs(&read_args(&port, 0, 4096, None)));
    r.assert_clean_failure();
    assert!(r.stdout.is_empty(), "a refused read printed data: {}", r.describe());
    let w = run(&refs(&write_args(&port, 0, 4096, None)), Some(vec![0xAB; 4096]), CLI_TIMEOUT);
    w.assert_clean_failure();
    assert_file_range(&file, 12_345, &data, "after a refused write");
    server.assert_alive("after the CLI clients");
}

#[test]
fn read_output_is_exactly_size_bytes() {
    let (_dir, file) = setup("rw-exact", MIB);
    let server = Server::start(&file, &[]);
    let port = server.port().to_string();
    for (from, size) in [(0u64, 1u64), (777, 12_345), (MIB - 4096, 4096), (0, MIB), (MIB - 1, 1), (MIB, 0)] {
        let r = cli(&refs(&read_args(&port, from, size, None)));
        r.assert_success();
        assert_eq!(r.stdout.len() as u64, size, "read -F {from} -S {size}: {}", r.describe());
        assert!(r.stdout == read_at(&file, from, size as usize), "read -F {from} -S {size}: wrong bytes");
    }
}

#[test]
fn write_with_short_stdin_fails_and_changes_nothing() {
    let (_dir, file) = setup("rw-short", MIB);
    let server = Server::start(&file, &[]);
    let port = server.port().to_string();
    let before = read_at(&file, 0, MIB as usize);
    for (given, size) in [(0usize, 4096u64), (1000, 4096), (4095, 4096), (MIB as usize / 2, MIB)] {
        let w = run(&refs(&write_args(&port, 0, size, None)), Some(vec![0x5A; given]), CLI_TIMEOUT);
        w.assert_clean_failure();
        assert!(
            read_at(&file, 0, MIB as usize) == before,
            "write of {given}/{size} stdin bytes changed the file"
        );
    }
}

#[test]
fn ranges_beyond_the_end_fail_with_a_message() {
    let (_dir, file) = setup("rw-range", MIB);
    let server = Server::start(&file, &[]);
    let port = server.port().to_string();
    let before = read_at(&file, 0, MIB as usize);
    for (from, size) in [(MIB, 1u64), (MIB - 10, 11), (2 * MIB, 4096), (1 << 61, 4096), (0, MIB + 1)] {
        let r = cli(&refs(&read_args(&port, from, size, None)));
        r.assert_clean_failure();
        assert!(r.stdout.is_empty(), "out-of-range read printed data: {}", r.describe());
        let msg = r.stderr.to_lowercase();
        assert!(
            ["end", "beyond", "range", "size", &MIB.to_string()].iter().any(|w| msg.contains(w)),
            "the message should say the range is past the end: {}",
            r.describe()
        );
        let w = run(&refs(&write_args(&port, from, size, None)), Some(vec![1; size as usize]), CLI_TIMEOUT);
        w.assert_clean_failure();
    }
    // Over the documented limits: 2^62 offset, 2^30 size.
    let r = cli(&refs(&read_args(&port, (1 << 62) + 1, 1, None)));
    r.assert_clean_failure();
    let r = cli(&refs(&read_args(&port, 0, (1 << 30) + 1, None)));
    r.assert_clean_failure();
    assert!(read_at(&file, 0, MIB as usize) == before, "out-of-range writes changed the file");
    assert_eq!(file_len(&file), MIB, "out-of-range writes grew the file");
}

#[test]
fn forty_mib_write_and_read_round_trip() {
    // Bigger than the 32 MiB largest request, so the clients must split it.
    let dir = TempDir::new("rw-40m");
    let file = dir.join("disk.img");
    make_sparse_file(&file, 48 * MIB);
    let server = Server::start(&file, &[]);
    let port = server.port().to_string();
    let len = 40 * MIB;
    let from = 3 * MIB + 512;
    let data = random_bytes(len as usize, 40);

    let w = run(&refs(&write_args(&port, from, len, None)), Some(data.clone()), BIG_TIMEOUT);
    w.assert_success();
    assert_file_range(&file, from, &data, "after a 40 MiB flexnbd write");
    assert!(read_at(&file, 0, from as usize).iter().all(|&b| b == 0), "bytes before the write changed");
    let end = from + len;
    assert!(
        read_at(&file, end, (48 * MIB - end) as usize).iter().all(|&b| b == 0),
        "bytes after the write changed"
    );

    let r = run(&refs(&read_args(&port, from, len, None)), None, BIG_TIMEOUT);
    r.assert_success();
    assert_eq!(r.stdout.len() as u64, len, "40 MiB read output length");
    if r.stdout != data {
        let i = r.stdout.iter().zip(&data).position(|(a, b)| a != b).unwrap();
        panic!("40 MiB read differs at byte {i} of the range");
    }
}

#[test]
fn read_write_against_an_oldstyle_server() {
    let (_dir, file) = setup("rw-old", MIB);
    let server = Server::start(&file, &["--oldstyle"]);
    let port = server.port().to_string();
    let data = random_bytes(65_536 + 3, 8);
    let w = run(&refs(&write_args(&port, 4099, data.len() as u64, None)), Some(data.clone()), CLI_TIMEOUT);
    w.assert_success();
    assert_file_range(&file, 4099, &data, "after a write to an oldstyle server");
    let r = cli(&refs(&read_args(&port, 4099, data.len() as u64, None)));
    r.assert_success();
    assert!(r.stdout == data, "oldstyle read returned other bytes ({} bytes)", r.stdout.len());
    let r = cli(&refs(&read_args(&port, MIB - 1, 2, None)));
    r.assert_clean_failure();
}

#[test]
fn write_takes_exactly_size_bytes_of_stdin() {
    let (_dir, file) = setup("rw-long", MIB);
    let server = Server::start(&file, &[]);
    let port = server.port().to_string();
    let before = read_at(&file, 0, MIB as usize);
    let data = random_bytes(10_000, 3);
    let w = run(&refs(&write_args(&port, 8192, 6000, None)), Some(data.clone()), CLI_TIMEOUT);
    w.assert_success();
    let mut expect = before.clone();
    expect[8192..8192 + 6000].copy_from_slice(&data[..6000]);
    assert!(read_at(&file, 0, MIB as usize) == expect, "write -S 6000 wrote other than the first 6000 bytes");
}

#[test]
fn write_to_a_read_only_server_fails_and_changes_nothing() {
    let (_dir, file) = setup("rw-ro", MIB);
    let server = Server::start(&file, &["--read-only"]);
    let port = server.port().to_string();
    let before = read_at(&file, 0, MIB as usize);
    let w = run(&refs(&write_args(&port, 0, 4096, None)), Some(vec![0xEE; 4096]), CLI_TIMEOUT);
    w.assert_clean_failure();
    assert!(read_at(&file, 0, MIB as usize) == before, "a refused write changed the file");
    let r = cli(&refs(&read_args(&port, 0, 4096, None)));
    r.assert_success();
    assert!(r.stdout == before[..4096], "read from a read-only server");
}

#[test]
fn read_from_a_closed_port_fails_cleanly() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let r = cli(&refs(&read_args(&port.to_string(), 0, 512, None)));
    r.assert_clean_failure();
    let r = cli(&["read", "-l", "not-an-ip", "-p", "1", "-F", "0", "-S", "1"]);
    r.assert_clean_failure();
    assert!(r.stderr.contains("not-an-ip"), "the bad address should be named: {}", r.describe());
}

// ---------------------------------------------------------------------------------------------
// help, bad command lines, missing control socket
// ---------------------------------------------------------------------------------------------

#[test]
fn help_for_everything_exits_zero_with_output() {
    let mut cases: Vec<Vec<&str>> = vec![vec!["help"], vec!["--help"], vec!["-h"], vec!["--version"]];
    for c in COMMANDS {
        cases.push(vec!["help", c]);
        cases.push(vec![c, "--help"]);
        cases.push(vec![c, "-h"]);
    }
    for args in &cases {
        let r = cli(args);
        r.assert_success();
        assert!(!r.stdout_text().trim().is_empty(), "no help text: {}", r.describe());
        assert!(!r.stderr.contains("panicked"), "{}", r.describe());
    }
    let top = cli(&["help"]).stdout_text();
    for c in COMMANDS {
        assert!(top.split_whitespace().any(|w| w == c), "`flexnbd help` does not list `{c}`:\n{top}");
    }
    let serve = cli(&["help", "serve"]).stdout_text();
    for opt in ["--addr", "--port", "--file", "--sock", "--default-deny"] {
        assert!(serve.contains(opt), "`flexnbd help serve` does not mention {opt}:\n{serve}");
    }
}

#[test]
fn bad_command_lines_fail_without_panicking() {
    let dir = TempDir::new("cli-bad");
    let file = dir.join("disk.img");
    make_sparse_file(&file, MIB);
    let f = s(&file);
    let cases: Vec<Vec<&str>> = vec![
        vec![],
        vec!["frobnicate"],
        vec!["help", "frobnicate"],
        vec!["serve"],
        vec!["serve", "-l", "127.0.0.1", "-p", "0"],
        vec!["serve", "-l", "127.0.0.1", "-p", "notaport", "-f", f],
        vec!["serve", "-l", "127.0.0.1", "-p", "70000", "-f", f],
        vec!["serve", "-l", "127.0.0.1", "-p", "0", "-f", f, "--workers", "0"],
        vec!["serve", "-l", "127.0.0.1", "-p", "0", "-f", f, "--multi-conn", "maybe"],
        vec!["serve", "-l", "127.0.0.1", "-p", "0", "-f", f, "--no-such-option"],
        vec!["listen", "-p", "0", "-f", f],
        vec!["status"],
        vec!["acl"],
        vec!["break"],
        vec!["mirror", "--sock", "/nonexistent"],
        vec!["mirror", "-l", "127.0.0.1", "-p", "1", "--sock", "/nonexistent", "--mode", "fast"],
        vec!["mirror-speed", "--sock", "/nonexistent"],
        vec!["mirror-speed", "--sock", "/nonexistent", "--max-bps", "-5"],
        vec!["read", "-l", "127.0.0.1", "-p", "1", "-F", "-5", "-S", "1"],
        vec!["read", "-l", "127.0.0.1", "-p", "1", "-F", "0"],
        vec!["write", "-l", "127.0.0.1", "-p", "1", "-S", "1"],
        vec!["read", "-l", "127.0.0.1", "-p", "1", "-F", "0", "-S", "lots"],
    ];
    for args in &cases {
        let r = cli(args);
        r.assert_clean_failure();
        assert_eq!(r.status.and_then(|s| s.code()), Some(2), "a bad command line exits 2: {}", r.describe());
    }
}

#[test]
fn version_names_the_program_and_its_version() {
    let want = format!("flexnbd {}", env!("CARGO_PKG_VERSION"));
    for args in [vec!["--version"], vec!["-V"], vec!["serve", "--version"]] {
        let r = cli(&args);
        r.assert_success();
        assert_eq!(r.stdout_text().trim(), want, "{}", r.describe());
    }
}

/// Each a command-line error: exit status 2 and one sentence `flexnbd: ...` naming the problem
/// (clap's usage hint may follow), never the daemon's log format.
#[test]
fn command_line_errors_exit_2_with_a_sentence() {
    let dir = TempDir::new("cli-exit2");
    let file = dir.join("disk.img");
    make_sparse_file(&file, MIB);
    let f = s(&file);
    let sock = dir.join("ctl.sock");
    let serve = |extra: &[&'static str]| -> Vec<String> {
        let mut v: Vec<String> =
            ["serve", "-l", "127.0.0.1", "-p", "0", "-f", f].iter().map(|a| a.to_string()).collect();
        v.extend(extra.iter().map(|a| a.to_string()));
        v
    };
    let too_far = (u64::pow(2, 62) + 1).to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (serve(&["10.0.0.0/33"]), "the prefix length is over 32"),
        (serve(&["::/129"]), "the prefix length is over 128"),
        (serve(&["bogus"]), "\"bogus\": not an IPv4 or IPv6 address"),
        (serve(&["1.2.3.4/x"]), "must be a decimal number"),
        (serve(&["--no-such-option"]), "unexpected argument"),
        (
            vec![
                "serve".into(),
                "-l".into(),
                "no-such-host.invalid".into(),
                "-p".into(),
                "0".into(),
                "-f".into(),
                f.into(),
            ],
            "no-such-host.invalid",
        ),
        (vec!["listen".into(), "-f".into(), f.into()], "nowhere to listen"),
        (
            vec![
                "serve".into(),
                "-U".into(),
                "x.sock".into(),
                "--unix-mode".into(),
                "999".into(),
                "-f".into(),
                f.into(),
            ],
            "octal file mode",
        ),
        (
            vec![
                "serve".into(),
                "-U".into(),
                "x.sock".into(),
                "-p".into(),
                "1".into(),
                "-f".into(),
                f.into(),
            ],
            "cannot be used with",
        ),
        (
            read_args("1", 0, 1, None)
                .into_iter()
                .map(|a| if a == "127.0.0.1" { "no-such-host.invalid".into() } else { a })
                .collect(),
            "no-such-host.invalid",
        ),
        (read_args("1", 0, 1, Some("bind-host.invalid")), "bind-host.invalid"),
        (write_args("1", 0, 1, Some("bind-host.invalid")), "bind-host.invalid"),
        (
            vec![
                "read".into(),
                "-l".into(),
                "127.0.0.1".into(),
                "-p".into(),
                "1".into(),
                "-F".into(),
                too_far,
                "-S".into(),
                "1".into(),
            ],
            "at most 2^62",
        ),
        (
            vec![
                "mirror".into(),
                "-l".into(),
                "no-such-host.invalid".into(),
                "-p".into(),
                "1".into(),
                "-s".into(),
                s(&sock).into(),
            ],
            "no-such-host.invalid",
        ),
        (
            vec![
                "mirror".into(),
                "-U".into(),
                "x.sock".into(),
                "-b".into(),
                "127.0.0.1".into(),
                "-s".into(),
                s(&sock).into(),
            ],
            "cannot be used with",
        ),
        (vec!["acl".into(), "-s".into(), s(&sock).into(), "10.0.0.0/40".into()], "over 32"),
        (vec!["frobnicate".into()], "unrecognized subcommand"),
    ];
    for (args, needle) in &cases {
        let r = cli(&refs(args));
        assert_eq!(r.status.and_then(|s| s.code()), Some(2), "expected exit status 2: {}", r.describe());
        assert!(r.stderr.starts_with("flexnbd: "), "expected `flexnbd: <sentence>`: {}", r.describe());
        assert!(r.stderr.contains(needle), "expected {needle:?} on stderr: {}", r.describe());
        assert!(r.stdout.is_empty(), "nothing on stdout: {}", r.describe());
    }
    // Not a command-line error, but still a sentence for a person: status 1.
    let missing = dir.join("missing.img");
    let r = cli(&["serve", "-l", "127.0.0.1", "-p", "0", "-f", s(&missing)]);
    assert_eq!(r.status.and_then(|s| s.code()), Some(1), "{}", r.describe());
    assert!(r.stderr.starts_with("flexnbd: cannot open "), "{}", r.describe());
}

#[test]
fn host_names_work_in_serve_read_write_and_mirror() {
    let (dir, file) = setup("cli-hostname", MIB);
    let ctl = dir.join("src.ctl");
    let mut src =
        Server::spawn(&["serve", "-l", "localhost", "-p", "0", "-f", s(&file), "-s", s(&ctl), "-v"]);
    let port = src.wait_ready(IO_TIMEOUT).to_string();
    let data = random_bytes(4096, 77);
    let mut w = write_args(&port, 8192, 4096, None);
    w[2] = "localhost".into();
    run(&refs(&w), Some(data.clone()), CLI_TIMEOUT).assert_success();
    let mut r = read_args(&port, 8192, 4096, None);
    r[2] = "localhost".into();
    let out = cli(&refs(&r));
    out.assert_success();
    assert!(out.stdout == data, "read -l localhost returned other bytes than write -l localhost wrote");

    // Both ends take the host name's first address, so they agree on where to meet.
    let dst_file = dir.join("dst.img");
    make_sparse_file(&dst_file, MIB);
    let mut dst = Server::spawn(&["listen", "-l", "localhost", "-p", "0", "-f", s(&dst_file), "-v"]);
    let dport = dst.wait_ready(IO_TIMEOUT).to_string();
    let m = cli(&["mirror", "-l", "localhost", "-p", &dport, "-s", s(&ctl)]);
    m.assert_success();
    assert!(m.stdout_text().contains("Migration started"), "{}", m.describe());
    for (p, what) in [(&mut src, "source"), (&mut dst, "destination")] {
        let st =
            p.wait_timeout(BIG_TIMEOUT).unwrap_or_else(|| panic!("{what} did not exit after the migration"));
        assert_eq!(st.code(), Some(0), "{what}: {}; stderr:\n{}", describe_status(st), p.stderr_text());
    }
    assert_files_equal(&file, &dst_file);
}

#[test]
fn missing_control_socket_fails_with_one_line() {
    let dir = TempDir::new("cli-nosock");
    let missing = dir.join("no-such.sock");
    let regular = dir.join("regular-file.sock");
    std::fs::write(&regular, b"not a socket").unwrap();
    for sock in [&missing, &regular] {
        let p = s(sock);
        let cases: Vec<Vec<&str>> = vec![
            vec!["status", "--sock", p],
            vec!["acl", "--sock", p, "127.0.0.1"],
            vec!["break", "--sock", p],
            vec!["mirror-speed", "--sock", p, "--max-bps", "100"],
            vec!["mirror", "--sock", p, "-l", "127.0.0.1", "-p", "4000"],
        ];
        for args in &cases {
            let r = cli(args);
            r.assert_clean_failure();
            let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            assert_eq!(lines.len(), 1, "expected one line on stderr: {}", r.describe());
            assert!(r.stdout.is_empty(), "printed to stdout: {}", r.describe());
            assert!(
                lines[0].contains(sock.file_name().unwrap().to_str().unwrap()),
                "the message should name the socket: {}",
                r.describe()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Man page
// ---------------------------------------------------------------------------------------------

/// Remove overstrikes (`X\bX`, `_\bX`) and ANSI SGR sequences: what `col -b` would leave.
fn plain(text: &str) -> String {
    let mut out: Vec<char> = Vec::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{8}' => {
                out.pop();
            }
            '\u{1b}' => {
                // ESC [ params letter
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for d in chars.by_ref() {
                        if d.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
            }
            c => out.push(c),
        }
    }
    out.into_iter().collect()
}

#[test]
fn man_page_renders_and_names_every_command() {
    require_tool("man");
    let page = Path::new(env!("CARGO_MANIFEST_DIR")).join("man").join("flexnbd.1");
    assert!(page.is_file(), "{} is missing", page.display());
    let out = run_bounded(
        Command::new("man")
            .arg("-l")
            .arg(&page)
            .env("MANWIDTH", "80")
            .env("MANPAGER", "cat")
            .env("PAGER", "cat")
            .env_remove("MAN_KEEP_FORMATTING"),
        Duration::from_secs(60),
    );
    out.assert_success("man -l man/flexnbd.1");
    let text = plain(&out.stdout);
    assert!(text.lines().count() > 50, "the rendered page is suspiciously short:\n{text}");
    let lower_err = out.stderr.to_lowercase();
    assert!(
        !lower_err.contains("warning") && !lower_err.contains("error"),
        "man/groff complained while rendering:\n{}",
        out.stderr
    );
    let words: Vec<&str> =
        text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_')).collect();
    for c in COMMANDS.iter().chain(&["help"]) {
        assert!(words.contains(c), "the man page does not mention `{c}`");
    }
    let wide: Vec<&str> = text.lines().filter(|l| l.chars().count() > 80).collect();
    assert!(wide.is_empty(), "lines wider than MANWIDTH=80:\n{}", wide.join("\n"));
}
