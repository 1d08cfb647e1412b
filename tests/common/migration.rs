//! Migration helpers shared by the black-box tests: a source `serve` and a destination
//! `listen` on loopback, the `mirror` and `status` commands, and waits for both ends to exit.

use super::*;
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

/// Bound for one CLI invocation against a local server.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound for a whole migration to finish once started.
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(40);

pub fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Run `flexnbd ARGS...` (stdin empty), bounded.
pub fn cli(args: &[&str]) -> ToolOutput {
    let out = run_bounded(Command::new(flexnbd_bin()).args(args), CLI_TIMEOUT);
    assert!(out.status.is_some(), "flexnbd {args:?} did not finish within {CLI_TIMEOUT:?}");
    assert!(!out.stderr.contains("panicked"), "flexnbd {args:?} panicked:\n{}", out.stderr);
    out
}

/// The source: `flexnbd serve -l 127.0.0.1 -p 0 -f FILE -v --sock SOCK`.
pub fn serve(file: &Path, sock: &Path) -> Server {
    Server::start(file, &["--sock", s(sock)])
}

pub fn listen_args(file: &Path, port: u16, sock: Option<&Path>, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> =
        ["listen", "-l", "127.0.0.1", "-p", &port.to_string(), "-f", s(file), "-v"].map(String::from).into();
    if let Some(sock) = sock {
        args.push("--sock".into());
        args.push(s(sock).into());
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// The destination: `flexnbd listen -l 127.0.0.1 -p 0 -f FILE -v [--sock SOCK] EXTRA...`.
pub fn listen(file: &Path, sock: Option<&Path>, extra: &[&str]) -> Server {
    let mut l = Server::spawn(&listen_args(file, 0, sock, extra));
    l.wait_ready(IO_TIMEOUT);
    l
}

/// Declares a raw connection a migration sender, the way our mirror does: FlexnbdSender with
/// the migration's id, then FlexnbdMigrate; then GO.
pub fn declare_sender(addr: SocketAddr, id: u64) -> Nbd {
    declare_sender_with_features(addr, id).0
}

/// Bit 0 of the feature bits a listen server's ACK to FlexnbdSender carries: it counts FUA
/// writes as durable for the handover.
pub const SENDER_FEATURE_FUA_HANDOVER: u64 = 1;

/// `declare_sender`, also returning the feature bits in the ACK to FlexnbdSender (a big-endian
/// u64; None if the ACK carried no 8 bytes).
pub fn declare_sender_with_features(addr: SocketAddr, id: u64) -> (Nbd, Option<u64>) {
    const OPT_FLEXNBD_MIGRATE: u32 = 0x4658_0001;
    const OPT_FLEXNBD_SENDER: u32 = 0x4658_0002;
    let mut n = Negotiation::start(addr).expect("sender: greeting");
    let r = n.option(OPT_FLEXNBD_SENDER, &id.to_be_bytes()).expect("sender: id option");
    assert!(r.last().is_some_and(|r| r.typ == REP_ACK), "sender id refused: {r:?}");
    let features = r.last().and_then(|r| r.data.as_slice().try_into().ok()).map(u64::from_be_bytes);
    let r = n.option(OPT_FLEXNBD_MIGRATE, &[]).expect("sender: migrate option");
    assert!(r.last().is_some_and(|r| r.typ == REP_ACK), "sender refused: {r:?}");
    (n.go("", &[]).expect("sender: GO").0, features)
}

/// A source alone (for refusals): its directory, file, control socket and process.
pub fn source(tag: &str, size: u64, seed: u64) -> (TempDir, PathBuf, PathBuf, Server) {
    let dir = TempDir::new(tag);
    let (src_file, src_sock) = (dir.join("src.img"), dir.join("src.sock"));
    make_random_file(&src_file, size, seed);
    let src = serve(&src_file, &src_sock);
    (dir, src_file, src_sock, src)
}

/// The usual start of a migration test: a source serving `size` random bytes (seeded) with a
/// control socket, and an empty sparse destination of the same size listening for it.
pub struct Pair {
    /// Owns the files; removed when the test ends.
    pub dir: TempDir,
    pub src_file: PathBuf,
    pub dst_file: PathBuf,
    pub src_sock: PathBuf,
    /// Given to the destination only by `pair_with_sockets`.
    pub dst_sock: PathBuf,
    pub src: Server,
    pub dst: Server,
}

/// A `Pair` whose destination has no control socket and gets `dst_extra` on its command line.
pub fn pair(tag: &str, size: u64, seed: u64, dst_extra: &[&str]) -> Pair {
    start_pair(tag, size, seed, false, dst_extra)
}

/// A `Pair` whose destination has a control socket too.
pub fn pair_with_sockets(tag: &str, size: u64, seed: u64) -> Pair {
    start_pair(tag, size, seed, true, &[])
}

pub fn start_pair(tag: &str, size: u64, seed: u64, dst_has_sock: bool, dst_extra: &[&str]) -> Pair {
    let dir = TempDir::new(tag);
    let (src_file, dst_file) = (dir.join("src.img"), dir.join("dst.img"));
    let (src_sock, dst_sock) = (dir.join("src.sock"), dir.join("dst.sock"));
    make_random_file(&src_file, size, seed);
    make_sparse_file(&dst_file, size);
    let src = serve(&src_file, &src_sock);
    let dst = listen(&dst_file, dst_has_sock.then_some(dst_sock.as_path()), dst_extra);
    Pair { dir, src_file, dst_file, src_sock, dst_sock, src, dst }
}

/// A destination on a given port, retried (bounded) while the port is still being released.
pub fn listen_on_port(file: &Path, port: u16, sock: Option<&Path>) -> Server {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = String::new();
    while Instant::now() < deadline {
        let mut l = Server::spawn(&listen_args(file, port, sock, &[]));
        let until = Instant::now() + IO_TIMEOUT;
        while Instant::now() < until {
            if l.wait_for_line("listening on", Duration::from_millis(20)) {
                assert_eq!(l.wait_ready(IO_TIMEOUT), port, "restarted listen is on another port");
                return l;
            }
            if l.try_wait().is_some() {
                break;
            }
        }
        l.wait_timeout(Duration::from_secs(2));
        last = l.stderr_text();
        thread::sleep(Duration::from_millis(100));
    }
    panic!("could not restart listen on port {port} within 10 s; last stderr:\n{last}");
}

/// `flexnbd mirror -l 127.0.0.1 -p PORT -s SOCK EXTRA...`.
pub fn mirror(sock: &Path, port: u16, extra: &[&str]) -> ToolOutput {
    let port = port.to_string();
    let mut args = vec!["mirror", "-l", "127.0.0.1", "-p", &port, "-s", s(sock)];
    args.extend_from_slice(extra);
    cli(&args)
}

/// `mirror` that must print "Migration started" and exit 0.
pub fn start_mirror(sock: &Path, port: u16, extra: &[&str]) {
    let out = mirror(sock, port, extra);
    out.assert_success("flexnbd mirror");
    assert!(
        out.stdout.contains("Migration started"),
        "flexnbd mirror should print `Migration started`, got stdout {:?} stderr {:?}",
        out.stdout,
        out.stderr
    );
}

/// `flexnbd status -s SOCK` as key -> value.
pub fn status(sock: &Path) -> HashMap<String, String> {
    let out = cli(&["status", "-s", s(sock)]);
    out.assert_success("flexnbd status");
    out.stdout
        .trim_end()
        .split(' ')
        .filter_map(|t| t.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

pub fn field<'a>(st: &'a HashMap<String, String>, key: &str) -> &'a str {
    st.get(key).map(String::as_str).unwrap_or_else(|| panic!("status has no `{key}`: {st:?}"))
}

pub fn int_field(st: &HashMap<String, String>, key: &str) -> u64 {
    let v = field(st, key);
    v.parse().unwrap_or_else(|_| panic!("status `{key}={v}` is not a non-negative integer: {st:?}"))
}

/// Wait (bounded) for `process` to exit 0; panics with its stderr otherwise. The other
/// server's stderr is printed too when its guard is dropped during the unwind.
pub fn assert_exits_zero(process: &mut Server, what: &str, timeout: Duration) {
    match process.wait_timeout(timeout) {
        Some(st) if st.success() => {}
        Some(st) => panic!("{what} exited with {}; stderr:\n{}", describe_status(st), process.stderr_text()),
        None => panic!("{what} still running {timeout:?} later; stderr:\n{}", process.stderr_text()),
    }
}

/// Wait for both ends of a migration to finish with status 0.
pub fn assert_migration_completes(src: &mut Server, dst: &mut Server) {
    assert_exits_zero(src, "source (serve) after the migration", MIGRATION_TIMEOUT);
    assert_exits_zero(dst, "destination (listen) after the migration", Duration::from_secs(10));
}

/// A port on 127.0.0.1 with (very likely) nothing listening on it.
pub fn unused_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("local_addr").port()
}

/// Connections the listener logged as accepted (`-v` logs `<id> <peer>: connected`).
pub fn connections_logged(server: &Server) -> usize {
    server.stderr_lines().iter().filter(|l| l.ends_with(": connected")).count()
}

/// An nbdkit process on 127.0.0.1 (a real NBD server with the behaviours its filters give it),
/// killed by PID when dropped.
pub struct Nbdkit {
    child: std::process::Child,
    pub port: u16,
    args: Vec<String>,
}

impl Nbdkit {
    /// `nbdkit -f -i 127.0.0.1 -p PORT -P PIDFILE ARGS...` on a free port, once it is ready.
    /// nbdkit writes its pid file only after it has bound the port, so a port taken meanwhile
    /// by someone else (and answered by them) is never mistaken for ours.
    pub fn start(args: &[&str]) -> Nbdkit {
        require_tool("nbdkit");
        let dir = TempDir::new("nbdkit");
        let pidfile = dir.join("nbdkit.pid");
        let mut last = String::new();
        for _ in 0..5 {
            let port = unused_port();
            let mut full: Vec<String> = ["-f", "-i", "127.0.0.1", "-p", &port.to_string(), "-P", s(&pidfile)]
                .map(String::from)
                .into();
            full.extend(args.iter().map(|a| a.to_string()));
            let _ = std::fs::remove_file(&pidfile);
            let child = Command::new("nbdkit")
                .args(&full)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("spawn nbdkit {full:?}: {e}"));
            let mut k = Nbdkit { child, port, args: full };
            let deadline = Instant::now() + IO_TIMEOUT;
            while Instant::now() < deadline {
                let ours = k.child.id().to_string();
                if std::fs::read_to_string(&pidfile).is_ok_and(|p| p.trim() == ours) {
                    return k;
                }
                if let Ok(Some(st)) = k.child.try_wait() {
                    last = format!("nbdkit {:?} exited with {st}", k.args);
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            drop(k);
        }
        panic!("nbdkit {args:?} did not start: {last}");
    }

    pub fn uri(&self) -> String {
        nbd_uri(self.port)
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `nbdcopy URI FILE`: the whole export, read back with a client other than ours.
pub fn copy_out(uri: &str, to: &Path) {
    require_tool("nbdcopy");
    let out = run_bounded(Command::new("nbdcopy").args([uri, s(to)]), Duration::from_secs(60));
    out.assert_success(&format!("nbdcopy {uri} {}", to.display()));
}

/// Random data in 1 MiB pieces at every other MiB from `first` on; holes elsewhere.
pub fn make_striped_file(path: &Path, len: u64, seed: u64) {
    make_sparse_file(path, len);
    let mut off = 0;
    let mut i = 0;
    while off + MIB <= len {
        if i % 2 == 1 {
            write_at(path, off, &random_bytes(MIB as usize, seed + i));
        }
        off += MIB;
        i += 1;
    }
}

/// A fake destination for what no NBD server does: accepts up to `conns` connections and
/// answers each with `hello` (then closes at once, so the bytes and the EOF arrive together).
pub fn hello_then_close(hello: Vec<u8>, conns: usize) -> (u16, thread::JoinHandle<usize>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind fake destination");
    let port = l.local_addr().expect("local_addr").port();
    l.set_nonblocking(true).expect("nonblocking");
    let h = thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut served = 0;
        while served < conns && Instant::now() < deadline {
            match l.accept() {
                Ok((mut c, _)) => {
                    use std::io::Write;
                    let _ = c.set_nonblocking(false);
                    let _ = c.write_all(&hello);
                    served += 1;
                }
                Err(_) => thread::sleep(Duration::from_millis(2)),
            }
        }
        served
    });
    (port, h)
}

/// An oldstyle hello as the original flexnbd sends it (flags HAS_FLAGS|SEND_FLUSH|SEND_FUA).
pub fn original_hello(size: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(152);
    h.extend_from_slice(&NBDMAGIC.to_be_bytes());
    h.extend_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
    h.extend_from_slice(&size.to_be_bytes());
    h.extend_from_slice(&0x0000_000du32.to_be_bytes());
    h.resize(152, 0);
    h
}

/// Polls `status` (bounded) until `pred` holds; returns the last status seen.
pub fn wait_status(
    sock: &Path,
    within: Duration,
    pred: impl Fn(&HashMap<String, String>) -> bool,
) -> HashMap<String, String> {
    let deadline = Instant::now() + within;
    loop {
        let st = status(sock);
        if pred(&st) || Instant::now() >= deadline {
            return st;
        }
        thread::sleep(Duration::from_millis(20));
    }
}
