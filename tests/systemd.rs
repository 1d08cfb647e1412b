//! systemd integration, black-box: the units in contrib/systemd run under
//! `systemd-socket-activate` (the socket unit's ListenStream= and the service's ExecStart=) and
//! serve nbdinfo; socket activation over TCP; `READY=1`, `STATUS=` (also during a migration)
//! and `STOPPING=1` read from a NOTIFY_SOCKET the test created; and `--addr` with an inherited
//! socket is a command-line error.

mod common;

use common::*;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

fn unit(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd").join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// The value of the last `KEY=` line of a unit file.
fn unit_value(text: &str, key: &str) -> String {
    let prefix = format!("{key}=");
    text.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {key}= in unit:\n{text}"))
        .to_string()
}

/// What systemd would do with the unit's paths, moved under `root`: `%i` is the instance,
/// /run and /var/lib are directories of the test, the binary is the one under test.
fn instantiate(v: &str, root: &Path, instance: &str) -> String {
    v.replace("%i", instance)
        .replace("/usr/bin/flexnbd", flexnbd_bin())
        .replace("/run/flexnbd", s(&root.join("run")))
        .replace("/var/lib/flexnbd", s(&root.join("lib")))
}

/// `systemd-socket-activate -l LISTEN -- ARGV...`: it binds LISTEN, and at the first connection
/// becomes ARGV (exec, same PID) with the socket as descriptor 3.
fn socket_activate(listen: &str, argv: &[String]) -> Server {
    require_tool("systemd-socket-activate");
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.args(["-l", listen, "--"]).args(argv);
    let server = Server::spawn_command(cmd);
    assert!(
        server.wait_for_line("Listening on", IO_TIMEOUT),
        "systemd-socket-activate did not listen on {listen}; stderr:\n{}",
        server.stderr_text()
    );
    server
}

fn nbdinfo_size(target: &str) -> ToolOutput {
    run_bounded(Command::new("nbdinfo").args(["--size", target]), IO_TIMEOUT)
}

#[test]
fn the_units_serve_nbdinfo_under_systemd_socket_activate() {
    require_tool("nbdinfo");
    let root = TempDir::new("units");
    for d in ["run", "lib"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    make_random_file(&root.join("lib").join("disk0.img"), 4 * MIB, 3);

    let listen = instantiate(&unit_value(&unit("flexnbd@.socket"), "ListenStream"), root.path(), "disk0");
    let exec = instantiate(&unit_value(&unit("flexnbd@.service"), "ExecStart"), root.path(), "disk0");
    let argv: Vec<String> = exec.split_whitespace().map(String::from).collect();
    let mut server = socket_activate(&listen, &argv);

    let info = nbdinfo_size(&format!("nbd+unix:///?socket={listen}"));
    info.assert_success("nbdinfo through the socket unit's socket");
    assert_eq!(info.stdout.trim(), (4 * MIB).to_string());

    // The service's control socket works, and it is the activated process (exec, same PID).
    let ctl = root.join("run").join("disk0.ctl");
    let st = run_bounded(Command::new(flexnbd_bin()).args(["status", "-s", s(&ctl)]), IO_TIMEOUT);
    st.assert_success("status through the service's control socket");
    assert!(st.stdout.contains(&format!("pid={}", server.pid())), "status: {}", st.stdout);

    let code = server.stop_with(libc::SIGTERM, IO_TIMEOUT);
    assert_eq!(code.code(), Some(0), "{}; stderr:\n{}", describe_status(code), server.stderr_text());
    assert!(Path::new(&listen).exists(), "the socket belongs to systemd: flexnbd must not remove it");
    assert!(!ctl.exists(), "the control socket is flexnbd's own and goes at exit");
}

#[test]
fn socket_activation_over_tcp_serves_nbdinfo() {
    require_tool("nbdinfo");
    let dir = TempDir::new("activate-tcp");
    let file = dir.join("disk.img");
    make_sparse_file(&file, 3 * MIB);
    let argv: Vec<String> =
        [flexnbd_bin(), "serve", "-f", s(&file), "-v"].iter().map(|a| a.to_string()).collect();
    // A free port, found by binding port 0: another process may take it before
    // systemd-socket-activate binds it, so a few tries.
    for attempt in 0..5 {
        let port =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let listen = format!("127.0.0.1:{port}");
        let mut cmd = Command::new("systemd-socket-activate");
        cmd.args(["-l", &listen, "--"]).args(&argv);
        let mut server = Server::spawn_command(cmd);
        if !server.wait_for_line("Listening on", IO_TIMEOUT) {
            assert!(attempt < 4, "systemd-socket-activate never listened; stderr:\n{}", server.stderr_text());
            continue;
        }
        let info = nbdinfo_size(&format!("nbd://{listen}"));
        info.assert_success("nbdinfo over a socket-activated TCP listener");
        assert_eq!(info.stdout.trim(), (3 * MIB).to_string());
        assert!(
            server.wait_for_line(&format!("listening on {listen}"), IO_TIMEOUT),
            "flexnbd should log the inherited address; stderr:\n{}",
            server.stderr_text()
        );
        let st = server.stop_with(libc::SIGTERM, IO_TIMEOUT);
        assert_eq!(st.code(), Some(0), "{}", describe_status(st));
        return;
    }
}

#[test]
fn an_address_with_an_inherited_socket_is_a_command_line_error() {
    let dir = TempDir::new("activate-conflict");
    let file = dir.join("disk.img");
    make_sparse_file(&file, MIB);
    let sock = dir.join("nbd.sock");
    let argv: Vec<String> = [flexnbd_bin(), "serve", "-l", "127.0.0.1", "-p", "0", "-f", s(&file)]
        .iter()
        .map(|a| a.to_string())
        .collect();
    let mut server = socket_activate(s(&sock), &argv);
    // The first connection makes systemd-socket-activate start flexnbd.
    let _c = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
    let st = server.wait_timeout(IO_TIMEOUT).expect("flexnbd should exit at once");
    assert_eq!(st.code(), Some(2), "{}; stderr:\n{}", describe_status(st), server.stderr_text());
    assert!(
        server.stderr_text().contains("flexnbd: systemd passed a listening socket"),
        "stderr:\n{}",
        server.stderr_text()
    );
}

/// Datagrams from the server under test, read (bounded) from a NOTIFY_SOCKET we bound.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(dir: &TempDir) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind NOTIFY_SOCKET");
        sock.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
        NotifySocket { sock, path, seen: Vec::new() }
    }

    /// Waits (bounded) for a message containing `needle`; returns it.
    fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(m.clone());
                if m.contains(needle) {
                    return m;
                }
            }
        }
        panic!("no notification containing {needle:?} within {timeout:?}; got {:?}", self.seen);
    }
}

#[test]
fn ready_status_and_stopping_reach_a_notify_socket() {
    let dir = TempDir::new("notify");
    let src_file = dir.join("src.img");
    let dst_file = dir.join("dst.img");
    make_random_file(&src_file, 8 * MIB, 9);
    make_sparse_file(&dst_file, 8 * MIB);
    let ctl = dir.join("src.ctl");
    let mut notify = NotifySocket::bind(&dir);

    let mut cmd = Command::new(flexnbd_bin());
    cmd.args(["serve", "-l", "127.0.0.1", "-p", "0", "-f", s(&src_file), "-s", s(&ctl), "-v"])
        .env("NOTIFY_SOCKET", &notify.path);
    let mut src = Server::spawn_command(cmd);
    src.wait_ready(IO_TIMEOUT);

    let ready = notify.wait_for("READY=1", IO_TIMEOUT);
    assert!(ready.contains(&format!("MAINPID={}", src.pid())), "{ready:?}");
    assert!(
        ready.contains(&format!("STATUS=serving {} on 127.0.0.1:{}", s(&src_file), src.port())),
        "{ready:?}"
    );

    // A migration slow enough to be seen, then stopped: STATUS= follows it.
    let mut dst = Server::spawn(&["listen", "-l", "127.0.0.1", "-p", "0", "-f", s(&dst_file), "-v"]);
    let port = dst.wait_ready(IO_TIMEOUT).to_string();
    let m = run_bounded(
        Command::new(flexnbd_bin()).args([
            "mirror",
            "-l",
            "127.0.0.1",
            "-p",
            &port,
            "-s",
            s(&ctl),
            "--max-bps",
            "1000000",
        ]),
        IO_TIMEOUT,
    );
    m.assert_success("throttled mirror");
    let status = notify.wait_for("STATUS=migrating to 127.0.0.1:", IO_TIMEOUT);
    assert!(status.contains("% done") && status.contains("bytes left"), "{status:?}");
    run_bounded(Command::new(flexnbd_bin()).args(["break", "-s", s(&ctl)]), IO_TIMEOUT)
        .assert_success("break");
    notify.wait_for("STATUS=serving", IO_TIMEOUT);

    src.signal(libc::SIGTERM);
    notify.wait_for("STOPPING=1", IO_TIMEOUT);
    let st = src.wait_timeout(IO_TIMEOUT).expect("exit after SIGTERM");
    assert_eq!(st.code(), Some(0), "{}", describe_status(st));
    dst.signal(libc::SIGTERM);
}
