//! Unix-socket exports (`serve --unix`/`listen --unix`), black-box: nbdinfo and nbdcopy over
//! `nbd+unix://`, qemu-img over `nbd:unix:`, the socket file's mode (0600, `--unix-mode`), its
//! removal at exit, a stale one replaced and a live one refused, ACL entries not applying, and
//! a migration between two processes over a Unix socket (`mirror --unix`).

mod common;

use common::*;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

fn uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", s(sock))
}

/// `flexnbd serve|listen --unix SOCK -f FILE -v EXTRA...`, waited until it listens.
fn start_unix(cmd: &str, sock: &Path, file: &Path, extra: &[&str]) -> Server {
    let mut args = vec![cmd, "--unix", s(sock), "-f", s(file), "-v"];
    args.extend(extra);
    let server = Server::spawn(&args);
    let line = format!("listening on unix:{}", s(sock));
    assert!(server.wait_for_line(&line, IO_TIMEOUT), "no `{line}`; stderr:\n{}", server.stderr_text());
    server
}

fn mode_of(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display())).permissions().mode()
        & 0o7777
}

fn nbdinfo_size(target: &str) -> ToolOutput {
    run_bounded(Command::new("nbdinfo").args(["--size", target]), IO_TIMEOUT)
}

#[test]
fn nbdinfo_nbdcopy_and_qemu_img_work_over_the_unix_socket() {
    for t in ["nbdinfo", "nbdcopy", "qemu-img"] {
        require_tool(t);
    }
    let dir = TempDir::new("unix-tools");
    let (served, input) = served_and_input(&dir, 8 * MIB, 21);
    let sock = dir.join("nbd.sock");
    let mut server = start_unix("serve", &sock, &served, &[]);
    assert!(std::fs::symlink_metadata(&sock).expect("stat").file_type().is_socket());
    assert_eq!(mode_of(&sock), 0o600, "default mode of the export socket");

    let info = nbdinfo_size(&uri(&sock));
    info.assert_success("nbdinfo --size over nbd+unix");
    assert_eq!(info.stdout.trim(), (8 * MIB).to_string());

    run_bounded(Command::new("nbdcopy").args([s(&input), &uri(&sock)]), IO_TIMEOUT)
        .assert_success("nbdcopy into nbd+unix");
    assert_files_equal(&input, &served);

    let out = dir.join("out.img");
    run_bounded(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &format!("nbd:unix:{}", s(&sock))])
            .arg(&out),
        IO_TIMEOUT,
    )
    .assert_success("qemu-img convert from nbd:unix:");
    assert_files_equal(&input, &out);

    let st = server.stop_with(libc::SIGTERM, IO_TIMEOUT);
    assert_eq!(st.code(), Some(0), "exit after SIGTERM: {}", describe_status(st));
    assert!(!sock.exists(), "the export socket must be removed at exit");
}

#[test]
fn unix_mode_sets_the_socket_files_mode() {
    let dir = TempDir::new("unix-mode");
    let file = dir.join("disk.img");
    make_sparse_file(&file, MIB);
    let sock = dir.join("nbd.sock");
    let mut server = start_unix("serve", &sock, &file, &["--unix-mode", "0660"]);
    assert_eq!(mode_of(&sock), 0o660);
    nbdinfo_size(&uri(&sock)).assert_success("nbdinfo with --unix-mode 0660");
    server.stop_with(libc::SIGTERM, IO_TIMEOUT);
    assert!(!sock.exists());
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_refused() {
    let dir = TempDir::new("unix-stale");
    let file = dir.join("disk.img");
    make_sparse_file(&file, MIB);
    let sock = dir.join("nbd.sock");
    // A socket file whose server is gone.
    drop(std::os::unix::net::UnixListener::bind(&sock).expect("bind a stale socket"));
    assert!(sock.exists());
    let mut server = start_unix("serve", &sock, &file, &[]);
    nbdinfo_size(&uri(&sock)).assert_success("nbdinfo on the replaced socket");

    // A second server on the same path must not take it from the first.
    assert_startup_error(&["serve", "--unix", s(&sock), "-f", s(&file)], &[s(&sock), "running server"]);
    nbdinfo_size(&uri(&sock)).assert_success("nbdinfo after the refused second server");
    server.assert_alive("after a second server tried its socket");

    // A path that is not a socket is never removed.
    let plain = dir.join("plain");
    std::fs::write(&plain, b"keep").expect("write");
    assert_startup_error(&["serve", "--unix", s(&plain), "-f", s(&file)], &["not a socket"]);
    assert_eq!(std::fs::read(&plain).expect("read"), b"keep");
}

#[test]
fn acl_entries_do_not_apply_to_unix_clients() {
    let dir = TempDir::new("unix-acl");
    let file = dir.join("disk.img");
    make_sparse_file(&file, MIB);
    let sock = dir.join("nbd.sock");
    let ctl = dir.join("ctl.sock");
    let _server = start_unix("serve", &sock, &file, &["--default-deny", "192.0.2.1", "-s", s(&ctl)]);
    nbdinfo_size(&uri(&sock)).assert_success("a Unix client with an ACL that names only 192.0.2.1");
    // Even an empty default-deny ACL leaves the Unix socket open, and status says so.
    let acl = run_bounded(Command::new(flexnbd_bin()).args(["acl", "-s", s(&ctl)]), IO_TIMEOUT);
    acl.assert_success("acl with no entries");
    nbdinfo_size(&uri(&sock)).assert_success("a Unix client with an empty default-deny ACL");
    let st = run_bounded(Command::new(flexnbd_bin()).args(["status", "-s", s(&ctl)]), IO_TIMEOUT);
    st.assert_success("status");
    assert!(st.stdout.contains("clients_allowed=true"), "status: {}", st.stdout);
}

#[test]
fn migration_over_a_unix_socket_between_two_processes() {
    let dir = TempDir::new("unix-mirror");
    let src_file = dir.join("src.img");
    let dst_file = dir.join("dst.img");
    make_random_file(&src_file, 16 * MIB, 5);
    make_sparse_file(&dst_file, 16 * MIB);
    let (src_sock, dst_sock) = (dir.join("src.sock"), dir.join("dst.sock"));
    let src_ctl = dir.join("src.ctl");
    let mut src = start_unix("serve", &src_sock, &src_file, &["-s", s(&src_ctl)]);
    let mut dst = start_unix("listen", &dst_sock, &dst_file, &[]);

    // A relative --unix path is the caller's: run from the directory holding the socket.
    let out = run_bounded(
        Command::new(flexnbd_bin()).current_dir(dir.path()).args([
            "mirror",
            "--unix",
            "dst.sock",
            "-s",
            s(&src_ctl),
        ]),
        MIGRATION_TIMEOUT,
    );
    out.assert_success("mirror --unix");
    assert!(out.stdout.contains("Migration started"), "stdout: {}", out.stdout);
    for (p, what) in [(&mut src, "source"), (&mut dst, "destination")] {
        let st = p.wait_timeout(MIGRATION_TIMEOUT).unwrap_or_else(|| panic!("{what} did not exit"));
        assert_eq!(st.code(), Some(0), "{what}: {}; stderr:\n{}", describe_status(st), p.stderr_text());
    }
    assert_files_equal(&src_file, &dst_file);
    assert!(!src_sock.exists() && !dst_sock.exists(), "both export sockets removed at exit");
}

#[test]
fn mirror_unix_to_nowhere_fails_and_the_source_keeps_serving() {
    let dir = TempDir::new("unix-mirror-none");
    let file = dir.join("disk.img");
    make_sparse_file(&file, MIB);
    let sock = dir.join("nbd.sock");
    let ctl = dir.join("ctl.sock");
    let mut server = start_unix("serve", &sock, &file, &["-s", s(&ctl)]);
    let missing = dir.join("missing.sock");
    let out = run_bounded(
        Command::new(flexnbd_bin()).args(["mirror", "-U", s(&missing), "-s", s(&ctl)]),
        IO_TIMEOUT,
    );
    out.assert_failure_with("Mirror failed to connect", "mirror to a Unix socket nobody listens on");
    assert_eq!(out.status.and_then(|s| s.code()), Some(1), "a refused request is not a command-line error");
    nbdinfo_size(&uri(&sock)).assert_success("nbdinfo after the failed mirror");
    server.assert_alive("after a failed mirror --unix");
}
