//! Access control: default-deny, entries that admit or refuse by source address (binding the
//! client to 127.0.0.2 before connecting), prefixes, malformed entries, and IPv6 on ::1.

mod common;

use common::*;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

const LOCAL1: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const LOCAL2: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

fn served(tag: &str) -> (TempDir, std::path::PathBuf) {
    let dir = TempDir::new(tag);
    let file = dir.join("disk.img");
    make_random_file(&file, MIB, 40);
    (dir, file)
}

/// Refused: the server closes the connection before sending a single hello byte.
fn assert_refused(server: &mut Server, from: IpAddr) {
    let mut s = tcp_connect_from(from, server.addr())
        .unwrap_or_else(|e| panic!("connect from {from}: {e} (a refusal must come after accept)"));
    match wait_closed(&mut s, Duration::from_secs(5)) {
        Ok(0) => {}
        Ok(n) => panic!("client from {from} should be refused but got {n} bytes before the close"),
        Err(e) => panic!("client from {from} should be refused: {e}"),
    }
    server.assert_alive(&format!("after refusing {from}"));
}

/// Admitted: a full newstyle handshake and a read work.
fn assert_admitted(server: &Server, from: IpAddr, file: &std::path::Path) {
    let s = tcp_connect_from(from, server.addr()).unwrap_or_else(|e| panic!("connect from {from}: {e}"));
    let n = Negotiation::on_stream(s, CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
        .unwrap_or_else(|e| panic!("client from {from} should be admitted: {e}"));
    let (mut c, _) = n.go("", &[]).unwrap_or_else(|e| panic!("GO from {from}: {e}"));
    let got = c.read(0, 4096).expect("io").expect("read");
    assert_eq!(got, read_at(file, 0, 4096));
}

#[test]
fn default_deny_with_no_entries_refuses_everyone() {
    let (_dir, file) = served("acl-deny");
    let mut server = Server::start(&file, &["-d"]);
    assert_refused(&mut server, LOCAL1);
    assert_refused(&mut server, LOCAL2);
}

#[test]
fn empty_acl_without_default_deny_admits_everyone() {
    let (_dir, file) = served("acl-open");
    let server = Server::start(&file, &[]);
    assert_admitted(&server, LOCAL1, &file);
    assert_admitted(&server, LOCAL2, &file);
}

#[test]
fn entry_127_0_0_1_admits_that_client() {
    let (_dir, file) = served("acl-one");
    let server = Server::start(&file, &["127.0.0.1"]);
    assert_admitted(&server, LOCAL1, &file);
}

#[test]
fn entry_127_0_0_2_refuses_127_0_0_1_and_admits_127_0_0_2() {
    let (_dir, file) = served("acl-two");
    let mut server = Server::start(&file, &["127.0.0.2"]);
    assert_refused(&mut server, LOCAL1);
    assert_admitted(&server, LOCAL2, &file);
    // A refusal does not disturb later admitted clients, and vice versa.
    assert_refused(&mut server, LOCAL1);
}

#[test]
fn prefix_entry_admits_the_whole_range() {
    let (_dir, file) = served("acl-prefix");
    let mut server = Server::start(&file, &["127.0.0.0/30"]);
    assert_admitted(&server, LOCAL1, &file);
    assert_admitted(&server, LOCAL2, &file);
    assert_refused(&mut server, IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9)));
}

#[test]
fn malformed_entries_fail_startup_naming_the_entry() {
    let (_dir, file) = served("acl-bad");
    let f = file.to_str().unwrap();
    for bad in ["300.1.2.3", "10.0.0.0/99", "not-an-address", "::1/129"] {
        assert_startup_error(&["serve", "-l", "127.0.0.1", "-p", "0", "-f", f, "127.0.0.1", bad], &[bad]);
    }
}

#[test]
fn ipv6_loopback_serve_works_with_raw_client() {
    let (_dir, file) = served("ipv6");
    let server = Server::start_on("::1", &file, &[]);
    assert!(server.addr().is_ipv6());
    assert!(
        server.stderr_text().contains(&format!("listening on [::1]:{}", server.port())),
        "IPv6 listen line not in the `[::1]:PORT` form:\n{}",
        server.stderr_text()
    );
    let mut c = Nbd::connect(server.addr()).expect("connect over IPv6");
    assert_eq!(c.size, MIB);
    assert_eq!(c.read(0, 4096).expect("io").expect("read"), read_at(&file, 0, 4096));
}

#[test]
fn ipv6_acl_entry_admits_and_ipv4_entry_refuses_ipv6_client() {
    let (_dir, file) = served("ipv6-acl");
    let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
    let server = Server::start_on("::1", &file, &["::1"]);
    assert_admitted(&server, v6, &file);
    drop(server);
    let mut server = Server::start_on("::1", &file, &["127.0.0.1"]);
    assert_refused(&mut server, v6);
}
