//! Startup errors: a missing file, a bad listen address and a port already in use each give one
//! line on stderr and a non-zero exit, never a panic.

mod common;

use common::*;
use std::net::TcpListener;

#[test]
fn missing_file_fails_with_one_line() {
    let dir = TempDir::new("missing");
    let missing = dir.join("does-not-exist.img");
    let m = missing.to_str().unwrap();
    assert_startup_error(&["serve", "-l", "127.0.0.1", "-p", "0", "-f", m], &["does-not-exist.img"]);
}

#[test]
fn bad_address_fails_with_one_line() {
    let dir = TempDir::new("bad-addr");
    let file = dir.join("disk.img");
    make_sparse_file(&file, MIB);
    let f = file.to_str().unwrap();
    for bad in ["not-an-address", "999.1.2.3"] {
        assert_startup_error(&["serve", "-l", bad, "-p", "0", "-f", f], &[bad]);
    }
}

#[test]
fn port_in_use_fails_with_one_line() {
    let dir = TempDir::new("port-in-use");
    let file = dir.join("disk.img");
    make_sparse_file(&file, MIB);
    let holder = TcpListener::bind("127.0.0.1:0").expect("bind a port to hold");
    let port = holder.local_addr().unwrap().port().to_string();
    assert_startup_error(&["serve", "-l", "127.0.0.1", "-p", &port, "-f", file.to_str().unwrap()], &[&port]);
    drop(holder);
}

#[test]
fn verbose_start_logs_in_the_manual_format() {
    let dir = TempDir::new("log-format");
    let file = dir.join("disk.img");
    make_sparse_file(&file, MIB);
    let server = Server::start(&file, &[]);
    let line =
        server.stderr_lines().into_iter().find(|l| l.contains("listening on ")).expect("listening line");
    // <LEVEL>:<PID> <THREAD> <SOURCEFILE>:<SOURCELINE>: <MSG>
    let (level, rest) = line.split_once(':').expect("level");
    assert_eq!(level, "I", "listening line should be at I level: {line}");
    let mut parts = rest.splitn(3, ' ');
    let pid = parts.next().unwrap();
    assert_eq!(pid, server.pid().to_string(), "pid field in {line}");
    let _thread = parts.next().expect("thread field");
    let loc_msg = parts.next().expect("location and message");
    let (loc, msg) = loc_msg.split_once(": ").expect("`FILE:LINE: MSG`");
    let (src, lineno) = loc.rsplit_once(':').expect("FILE:LINE");
    assert!(src.ends_with(".rs"), "source file in {line}");
    assert!(lineno.parse::<u32>().is_ok(), "source line in {line}");
    assert!(msg.contains(&format!("127.0.0.1:{}", server.port())), "{line}");
}
