//! Shared helpers for the black-box tests: start the real `flexnbd` binary on port 0 and wait
//! until it logs where it listens, temporary directories and files, and a raw NBD client over
//! `std::net::TcpStream` (wire layouts from NetworkBlockDevice/nbd `doc/proto.md`).
//!
//! Every wait here is bounded in time and every loop in count; sockets carry read/write timeouts.

#![allow(dead_code)]

pub mod migration;

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

// ---------------------------------------------------------------------------------------------
// NBD constants (doc/proto.md)
// ---------------------------------------------------------------------------------------------

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1;
pub const CLIENT_NO_ZEROES: u32 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

pub const REPLY_FLAG_DONE: u16 = 1;
pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_OFFSET_HOLE: u16 = 2;
pub const CHUNK_BLOCK_STATUS: u16 = 5;
pub const CHUNK_ERROR: u16 = 32769;
pub const CHUNK_ERROR_OFFSET: u16 = 32770;

pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
pub const GIB: u64 = 1024 * 1024 * 1024;

/// Default bound for socket reads/writes and for waiting on the server.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest payload this client will accept in one structured chunk or option reply.
const MAX_PEER_PAYLOAD: u32 = 64 * 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Temporary directories and files
// ---------------------------------------------------------------------------------------------

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A fresh directory under `std::env::temp_dir()`, removed (with its contents) on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let n = UNIQUE.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("flexnbd-test-{}-{}-{}-{}", tag, std::process::id(), n, nanos));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// xorshift64* — deterministic, dependency-free test data.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let v = self.next_u64().to_le_bytes();
            let n = rest.len();
            rest.copy_from_slice(&v[..n]);
        }
    }
}

/// `len` pseudo-random bytes from `seed`.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    XorShift::new(seed).fill(&mut v);
    v
}

/// Create (or truncate) `path` and fill it with `len` pseudo-random bytes from `seed`.
pub fn make_random_file(path: &Path, len: u64, seed: u64) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut rng = XorShift::new(seed);
    let mut buf = vec![0u8; MIB as usize];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        left -= n as u64;
    }
    f.sync_all().ok();
}

/// Create (or truncate) `path` as a fully sparse file of `len` bytes.
pub fn make_sparse_file(path: &Path, len: u64) {
    let f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(len).unwrap_or_else(|e| panic!("set_len {}: {e}", path.display()));
}

/// For copy-in tests: `served.img`, sparse, and `in.img`, random (seeded), both `len` bytes, in
/// `dir`.
pub fn served_and_input(dir: &TempDir, len: u64, seed: u64) -> (PathBuf, PathBuf) {
    let (served, input) = (dir.join("served.img"), dir.join("in.img"));
    make_sparse_file(&served, len);
    make_random_file(&input, len, seed);
    (served, input)
}

/// Write `data` at `offset` into an existing file (does not truncate).
pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let f =
        OpenOptions::new().write(true).open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.write_all_at(data, offset).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Read `len` bytes at `offset` from a file (short if the file ends first).
pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = f
            .read_at(&mut buf[done..], offset + done as u64)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if n == 0 {
            break;
        }
        done += n;
    }
    buf.truncate(done);
    buf
}

pub fn file_len(path: &Path) -> u64 {
    fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display())).len()
}

/// What `du` reports: allocated 512-byte blocks times 512.
pub fn allocated_bytes(path: &Path) -> u64 {
    fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display())).blocks() * 512
}

/// Panic with the first differing offset unless both files have the same length and bytes.
pub fn assert_files_equal(a: &Path, b: &Path) {
    let la = file_len(a);
    let lb = file_len(b);
    assert_eq!(la, lb, "{} is {la} bytes but {} is {lb} bytes", a.display(), b.display());
    let mut fa = BufReader::with_capacity(MIB as usize, File::open(a).expect("open a"));
    let mut fb = BufReader::with_capacity(MIB as usize, File::open(b).expect("open b"));
    let mut ba = vec![0u8; MIB as usize];
    let mut bb = vec![0u8; MIB as usize];
    let mut off = 0u64;
    while off < la {
        let n = (la - off).min(MIB) as usize;
        fa.read_exact(&mut ba[..n]).expect("read a");
        fb.read_exact(&mut bb[..n]).expect("read b");
        if ba[..n] != bb[..n] {
            let i = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y).unwrap();
            panic!(
                "{} and {} differ at byte {} ({:#04x} vs {:#04x})",
                a.display(),
                b.display(),
                off + i as u64,
                ba[i],
                bb[i]
            );
        }
        off += n as u64;
    }
}

/// Panic with the first differing offset unless the file holds `expected` at `offset`.
pub fn assert_file_range(path: &Path, offset: u64, expected: &[u8], what: &str) {
    let got = read_at(path, offset, expected.len());
    assert_eq!(got.len(), expected.len(), "{what}: file {} too short at offset {offset}", path.display());
    if got != expected {
        let i = got.iter().zip(expected).position(|(x, y)| x != y).unwrap();
        panic!(
            "{what}: file {} differs at byte {} (got {:#04x}, expected {:#04x})",
            path.display(),
            offset + i as u64,
            got[i],
            expected[i]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// External tools
// ---------------------------------------------------------------------------------------------

/// Panic with a clear message unless the external program `name` is on PATH.
pub fn require_tool(name: &str) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path).any(|dir| {
        let p = dir.join(name);
        fs::metadata(&p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
    });
    assert!(
        found,
        "required external tool `{name}` is not on PATH; install it (Debian: libnbd-bin for \
         nbdinfo/nbdcopy, qemu-utils for qemu-img/qemu-io, nbdkit) — these interop tests do not \
         skip"
    );
}

/// What a bounded external command did.
pub struct ToolOutput {
    /// None when it was killed for exceeding its time bound.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

impl ToolOutput {
    pub fn success(&self) -> bool {
        self.status.map(|s| s.success()).unwrap_or(false)
    }

    /// Panic (showing the output) unless the command exited 0 in time.
    pub fn assert_success(&self, what: &str) {
        assert!(
            self.success(),
            "{what} failed: status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
    }

    /// Panic (showing the output) unless the command failed and said `needle` on stderr.
    pub fn assert_failure_with(&self, needle: &str, what: &str) {
        assert!(
            !self.success() && self.stderr.contains(needle),
            "{what}: expected a failure saying {needle:?}; status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
    }
}

fn drain_to_string<R: Read + Send + 'static>(r: Option<R>) -> Option<JoinHandle<String>> {
    r.map(|mut r| {
        thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            String::from_utf8_lossy(&v).into_owned()
        })
    })
}

/// Spawn an already-configured command, wait at most `timeout`, kill it if it overruns.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> ToolOutput {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let out = drain_to_string(child.stdout.take());
    let err = drain_to_string(child.stderr.take());
    let status = wait_child(&mut child, timeout);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    ToolOutput {
        status,
        stdout: out.map(|h| h.join().unwrap_or_default()).unwrap_or_default(),
        stderr: err.map(|h| h.join().unwrap_or_default()).unwrap_or_default(),
    }
}

/// Poll a child until it exits or `timeout` passes.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) => {}
            Err(e) => panic!("try_wait: {e}"),
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

pub fn nbd_uri(port: u16) -> String {
    format!("nbd://127.0.0.1:{port}")
}

// ---------------------------------------------------------------------------------------------
// The server under test
// ---------------------------------------------------------------------------------------------

pub fn flexnbd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_flexnbd")
}

/// A running `flexnbd` child. Its stderr is drained continuously into `lines`; dropping the guard
/// kills the process (by its own handle) if it is still running, and prints its stderr when the
/// test is panicking.
pub struct Server {
    child: Child,
    status: Option<ExitStatus>,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
    port: u16,
    host: IpAddr,
    args: Vec<OsString>,
}

impl Server {
    /// `flexnbd serve -l 127.0.0.1 -p 0 -f FILE -v EXTRA...`, waited until it listens.
    pub fn start(file: &Path, extra: &[&str]) -> Server {
        Server::start_on("127.0.0.1", file, extra)
    }

    /// Like `start` with another listen address (e.g. `::1`).
    pub fn start_on(addr: &str, file: &Path, extra: &[&str]) -> Server {
        let mut args: Vec<OsString> = vec![
            "serve".into(),
            "-l".into(),
            addr.into(),
            "-p".into(),
            "0".into(),
            "-f".into(),
            file.into(),
            "-v".into(),
        ];
        args.extend(extra.iter().map(OsString::from));
        let mut s = Server::spawn(&args);
        s.host = addr.parse().unwrap_or_else(|e| panic!("test bug: bad listen address {addr}: {e}"));
        s.wait_ready(IO_TIMEOUT);
        s
    }

    /// Spawn `flexnbd ARGS...` without waiting for anything.
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Server {
        let mut cmd = Command::new(flexnbd_bin());
        cmd.args(args);
        Server::spawn_command(cmd)
    }

    /// Spawn a prepared command (another program that runs flexnbd, such as
    /// `systemd-socket-activate`, or flexnbd with extra environment) as the server under test.
    pub fn spawn_command(mut cmd: Command) -> Server {
        let args: Vec<OsString> = cmd.get_args().map(|a| a.to_owned()).collect();
        let spawned = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn();
        let mut child = spawned.unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr piped");
        let sink = Arc::clone(&lines);
        let reader = thread::spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut buf = Vec::new();
            // Bounded by the pipe: ends at EOF (the child exited) or on a read error.
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf).trim_end_matches(['\n', '\r']).to_owned();
                        sink.lock().unwrap().push(line);
                    }
                }
            }
        });
        Server {
            child,
            status: None,
            lines,
            reader: Some(reader),
            port: 0,
            host: IpAddr::from([127, 0, 0, 1]),
            args,
        }
    }

    /// Wait (bounded) for the `listening on ADDR:PORT` line and record the port. Panics with the
    /// server's stderr if it exits first or never says it listens.
    pub fn wait_ready(&mut self, timeout: Duration) -> u16 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(port) = self.find_listening_port() {
                self.port = port;
                return port;
            }
            if let Some(st) = self.try_wait() {
                panic!(
                    "flexnbd {:?} exited with {st} before listening; stderr:\n{}",
                    self.args,
                    self.stderr_text()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "flexnbd {:?} did not log `listening on` within {timeout:?}; stderr:\n{}",
                    self.args,
                    self.stderr_text()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn find_listening_port(&self) -> Option<u16> {
        let lines = self.lines.lock().unwrap();
        for l in lines.iter() {
            if let Some(i) = l.find("listening on ") {
                let rest = &l[i + "listening on ".len()..];
                let tok = rest.split_whitespace().next().unwrap_or("");
                if let Some((_, p)) = tok.rsplit_once(':') {
                    let digits: String = p.chars().take_while(|c| c.is_ascii_digit()).collect();
                    if let Ok(port) = digits.parse::<u16>()
                        && port != 0
                    {
                        return Some(port);
                    }
                }
            }
        }
        None
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.port)
    }

    pub fn uri(&self) -> String {
        nbd_uri(self.port)
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn stderr_text(&self) -> String {
        self.stderr_lines().join("\n")
    }

    /// Count the stderr lines containing `needle`.
    pub fn count_lines(&self, needle: &str) -> usize {
        self.lines.lock().unwrap().iter().filter(|l| l.contains(needle)).count()
    }

    /// Wait (bounded) until at least `n` stderr lines contain `needle`; returns the final count.
    pub fn wait_line_count(&self, needle: &str, n: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.count_lines(needle);
            if c >= n || Instant::now() >= deadline {
                return c;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait (bounded) until some stderr line contains `needle`.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.lines.lock().unwrap().iter().any(|l| l.contains(needle)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Send a signal to this child (only while it has not been reaped, so the PID is ours).
    pub fn signal(&mut self, sig: i32) {
        if self.try_wait().is_some() {
            return;
        }
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({}, {sig}) failed", self.child.id());
    }

    /// Non-blocking: has it exited?
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none()
            && let Ok(Some(st)) = self.child.try_wait()
        {
            self.status = Some(st);
        }
        self.status
    }

    /// Wait at most `timeout` for the process to exit; once it has, wait (bounded) for the
    /// stderr drain to reach EOF so `stderr_lines` is complete.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = wait_child(&mut self.child, timeout);
        }
        if self.status.is_some() {
            self.join_reader(Duration::from_secs(2));
        }
        self.status
    }

    fn join_reader(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while let Some(h) = &self.reader {
            if h.is_finished() {
                let _ = self.reader.take().unwrap().join();
                break;
            }
            if Instant::now() >= deadline {
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Signal and wait; panics with stderr if it does not exit in time.
    pub fn stop_with(&mut self, sig: i32, timeout: Duration) -> ExitStatus {
        self.signal(sig);
        match self.wait_timeout(timeout) {
            Some(st) => st,
            None => panic!(
                "flexnbd did not exit within {timeout:?} after signal {sig}; stderr:\n{}",
                self.stderr_text()
            ),
        }
    }

    /// Panic with stderr unless the process is still running.
    pub fn assert_alive(&mut self, what: &str) {
        if let Some(st) = self.try_wait() {
            self.join_reader(Duration::from_secs(2));
            panic!("flexnbd died ({}) {what}; stderr:\n{}", describe_status(st), self.stderr_text());
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.join_reader(Duration::from_secs(2));
        if thread::panicking() {
            eprintln!(
                "----- flexnbd {:?} stderr -----\n{}\n----- end of flexnbd stderr -----",
                self.args,
                self.stderr_text()
            );
        }
    }
}

pub fn describe_status(st: ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => format!("{st:?}"),
    }
}

/// Run `flexnbd ARGS...` expecting it to fail at startup: returns its exit status and stderr.
/// Panics (with stderr) if it is still running after `timeout`.
pub fn run_expect_exit(args: &[&str], timeout: Duration) -> (ExitStatus, Vec<String>) {
    let mut s = Server::spawn(args);
    match s.wait_timeout(timeout) {
        Some(st) => (st, s.stderr_lines()),
        None => panic!("flexnbd {args:?} was still running after {timeout:?}; stderr:\n{}", s.stderr_text()),
    }
}

/// Assert the startup-error contract: non-zero exit, exactly one non-empty stderr line that
/// contains every `needles` entry, and no panic text.
pub fn assert_startup_error(args: &[&str], needles: &[&str]) {
    let (st, lines) = run_expect_exit(args, IO_TIMEOUT);
    let text = lines.join("\n");
    assert!(!st.success(), "flexnbd {args:?} should fail but exited 0; stderr:\n{text}");
    assert!(
        st.code().is_some(),
        "flexnbd {args:?} should exit with a code, got {}; stderr:\n{text}",
        describe_status(st)
    );
    assert!(
        !text.contains("panicked") && !text.contains("RUST_BACKTRACE"),
        "flexnbd {args:?} panicked instead of reporting an error:\n{text}"
    );
    let non_empty: Vec<&String> = lines.iter().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(non_empty.len(), 1, "flexnbd {args:?} should print exactly one line on stderr, got:\n{text}");
    for n in needles {
        assert!(text.contains(n), "flexnbd {args:?} stderr should mention `{n}`, got:\n{text}");
    }
}

// ---------------------------------------------------------------------------------------------
// Sockets
// ---------------------------------------------------------------------------------------------

pub fn set_timeouts(s: &TcpStream, t: Duration) {
    s.set_read_timeout(Some(t)).expect("set_read_timeout");
    s.set_write_timeout(Some(t)).expect("set_write_timeout");
}

/// Connect with a bounded connect and I/O timeouts.
pub fn tcp_connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    set_timeouts(&s, IO_TIMEOUT);
    s.set_nodelay(true)?;
    Ok(s)
}

fn sockaddr_of(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value, and it is large and
    // aligned enough for sockaddr_in and sockaddr_in6.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(v4) => {
            let sin = unsafe { &mut *(&mut ss as *mut libc::sockaddr_storage as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr = libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = unsafe { &mut *(&mut ss as *mut libc::sockaddr_storage as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_addr = libc::in6_addr { s6_addr: v6.ip().octets() };
            sin6.sin6_scope_id = v6.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// Connect to `remote` from the local address `local` (bind before connect), for ACL tests.
pub fn tcp_connect_from(local: IpAddr, remote: SocketAddr) -> io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let family = if remote.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket(2); the fd is owned by the TcpStream right away so it is closed on
    // every path.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let (la, ll) = sockaddr_of(SocketAddr::new(local, 0));
    // SAFETY: la is a valid sockaddr of length ll.
    if unsafe { libc::bind(fd, &la as *const _ as *const libc::sockaddr, ll) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (ra, rl) = sockaddr_of(remote);
    // SAFETY: ra is a valid sockaddr of length rl; a blocking connect to loopback.
    if unsafe { libc::connect(fd, &ra as *const _ as *const libc::sockaddr, rl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    set_timeouts(&stream, IO_TIMEOUT);
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Read until the peer closes (read returns 0 or the connection is reset) or `timeout` passes.
/// Ok(n): closed after sending `n` more bytes. Err: still open at the deadline.
pub fn wait_closed(s: &mut TcpStream, timeout: Duration) -> Result<usize, String> {
    let deadline = Instant::now() + timeout;
    let mut total = 0usize;
    let mut buf = [0u8; 4096];
    // Bounded by the deadline and by the byte count.
    while total < 256 * 1024 * 1024 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("connection still open after {timeout:?} ({total} bytes received)"));
        }
        s.set_read_timeout(Some(left.max(Duration::from_millis(1)))).expect("set_read_timeout");
        match s.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n,
            Err(e) => match e.kind() {
                io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe => return Ok(total),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {}
                io::ErrorKind::Interrupted => {}
                _ => return Err(format!("unexpected read error: {e}")),
            },
        }
    }
    Err(format!("peer kept sending ({total} bytes)"))
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn read_vec(r: &mut impl Read, n: usize) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; n];
    r.read_exact(&mut v)?;
    Ok(v)
}

fn proto_err(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().unwrap())
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

// ---------------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------------

/// One option reply: magic u64, option u32, reply type u32, length u32, data.
#[derive(Debug, Clone)]
pub struct OptReply {
    pub opt: u32,
    pub typ: u32,
    pub data: Vec<u8>,
}

impl OptReply {
    pub fn is_error(&self) -> bool {
        self.typ & 0x8000_0000 != 0
    }

    /// NBD_REP_INFO carrying NBD_INFO_EXPORT: u16 type, u64 size, u16 transmission flags.
    pub fn info_export(&self) -> Option<(u64, u16)> {
        if self.typ == REP_INFO && self.data.len() >= 12 && be16(&self.data, 0) == INFO_EXPORT {
            Some((be64(&self.data, 2), be16(&self.data, 10)))
        } else {
            None
        }
    }

    /// NBD_REP_INFO carrying NBD_INFO_BLOCK_SIZE: u16 type, u32 min, u32 preferred, u32 max.
    pub fn info_block_size(&self) -> Option<(u32, u32, u32)> {
        if self.typ == REP_INFO && self.data.len() >= 14 && be16(&self.data, 0) == INFO_BLOCK_SIZE {
            Some((be32(&self.data, 2), be32(&self.data, 6), be32(&self.data, 10)))
        } else {
            None
        }
    }

    /// NBD_REP_META_CONTEXT: u32 context id, name.
    pub fn meta_context(&self) -> Option<(u32, String)> {
        if self.typ == REP_META_CONTEXT && self.data.len() >= 4 {
            Some((be32(&self.data, 0), String::from_utf8_lossy(&self.data[4..]).into_owned()))
        } else {
            None
        }
    }

    /// NBD_REP_SERVER: u32 name length, name, optional details.
    pub fn server_name(&self) -> Option<String> {
        if self.typ == REP_SERVER && self.data.len() >= 4 {
            let n = be32(&self.data, 0) as usize;
            self.data.get(4..4 + n).map(|b| String::from_utf8_lossy(b).into_owned())
        } else {
            None
        }
    }
}

/// The option haggling phase of a fixed-newstyle connection.
pub struct Negotiation {
    pub sock: TcpStream,
    /// Handshake flags from the server's greeting.
    pub server_flags: u16,
    pub client_flags: u32,
    pub structured: bool,
    pub meta_contexts: Vec<(u32, String)>,
}

impl Negotiation {
    /// Connect, read the greeting and answer with FIXED_NEWSTYLE|NO_ZEROES.
    pub fn start(addr: SocketAddr) -> io::Result<Negotiation> {
        Negotiation::start_with(addr, CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
    }

    pub fn start_with(addr: SocketAddr, client_flags: u32) -> io::Result<Negotiation> {
        Negotiation::on_stream(tcp_connect(addr)?, client_flags)
    }

    /// Greeting on an already-connected stream: NBDMAGIC u64, IHAVEOPT u64, u16 handshake flags;
    /// then the client's u32 flags.
    pub fn on_stream(mut sock: TcpStream, client_flags: u32) -> io::Result<Negotiation> {
        let server_flags = read_newstyle_greeting(&mut sock)?;
        sock.write_all(&client_flags.to_be_bytes())?;
        Ok(Negotiation { sock, server_flags, client_flags, structured: false, meta_contexts: Vec::new() })
    }

    /// Option request: IHAVEOPT u64, option u32, length u32, data.
    pub fn send_option(&mut self, opt: u32, data: &[u8]) -> io::Result<()> {
        let mut m = Vec::with_capacity(16 + data.len());
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.sock.write_all(&m)
    }

    /// Send only an option header claiming `len` bytes of data.
    pub fn send_option_header(&mut self, opt: u32, len: u32) -> io::Result<()> {
        let mut m = Vec::with_capacity(16);
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        self.sock.write_all(&m)
    }

    pub fn read_reply(&mut self) -> io::Result<OptReply> {
        let magic = read_u64(&mut self.sock)?;
        if magic != OPT_REPLY_MAGIC {
            return Err(proto_err(format!("bad option reply magic {magic:#x}")));
        }
        let opt = read_u32(&mut self.sock)?;
        let typ = read_u32(&mut self.sock)?;
        let len = read_u32(&mut self.sock)?;
        if len > MAX_PEER_PAYLOAD {
            return Err(proto_err(format!("option reply length {len} too big")));
        }
        let data = read_vec(&mut self.sock, len as usize)?;
        Ok(OptReply { opt, typ, data })
    }

    /// Send an option and collect replies up to and including the final one (ACK or an error).
    pub fn option(&mut self, opt: u32, data: &[u8]) -> io::Result<Vec<OptReply>> {
        self.send_option(opt, data)?;
        let mut out = Vec::new();
        for _ in 0..1000 {
            let r = self.read_reply()?;
            if r.opt != opt {
                return Err(proto_err(format!("reply for option {} while waiting for option {opt}", r.opt)));
            }
            let last = r.typ == REP_ACK || r.is_error();
            out.push(r);
            if last {
                return Ok(out);
            }
        }
        Err(proto_err("too many option replies".into()))
    }

    pub fn list(&mut self) -> io::Result<Vec<OptReply>> {
        self.option(OPT_LIST, &[])
    }

    pub fn structured_reply(&mut self) -> io::Result<Vec<OptReply>> {
        let r = self.option(OPT_STRUCTURED_REPLY, &[])?;
        if r.last().map(|x| x.typ) == Some(REP_ACK) {
            self.structured = true;
        }
        Ok(r)
    }

    /// SET_META_CONTEXT / LIST_META_CONTEXT data: u32 export name length, name, u32 query
    /// count, then per query u32 length and the query.
    pub fn meta_context_data(export: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    pub fn set_meta_context(&mut self, export: &str, queries: &[&str]) -> io::Result<Vec<OptReply>> {
        let r = self.option(OPT_SET_META_CONTEXT, &Negotiation::meta_context_data(export, queries))?;
        self.meta_contexts = r.iter().filter_map(|x| x.meta_context()).collect();
        Ok(r)
    }

    /// INFO/GO data: u32 name length, name, u16 number of info requests, u16 each.
    pub fn info_data(export: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    pub fn info(&mut self, export: &str, infos: &[u16]) -> io::Result<Vec<OptReply>> {
        self.option(OPT_INFO, &Negotiation::info_data(export, infos))
    }

    /// NBD_OPT_GO; on ACK enter transmission with the size and flags from INFO_EXPORT.
    pub fn go(mut self, export: &str, infos: &[u16]) -> io::Result<(Nbd, Vec<OptReply>)> {
        let replies = self.option(OPT_GO, &Negotiation::info_data(export, infos))?;
        let last = replies.last().expect("at least one reply");
        if last.typ != REP_ACK {
            return Err(proto_err(format!("GO failed with reply type {:#x}: {:?}", last.typ, replies)));
        }
        let (size, flags) = replies
            .iter()
            .find_map(|r| r.info_export())
            .ok_or_else(|| proto_err(format!("GO: no INFO_EXPORT in {replies:?}")))?;
        Ok((self.into_transmission(size, flags), replies))
    }

    /// NBD_OPT_EXPORT_NAME: no option reply; u64 size, u16 flags, then 124 zero bytes unless
    /// NO_ZEROES was agreed.
    pub fn export_name(mut self, export: &str) -> io::Result<Nbd> {
        self.send_option(OPT_EXPORT_NAME, export.as_bytes())?;
        let size = read_u64(&mut self.sock)?;
        let flags = read_u16(&mut self.sock)?;
        let no_zeroes = self.server_flags & FLAG_NO_ZEROES != 0 && self.client_flags & CLIENT_NO_ZEROES != 0;
        if !no_zeroes {
            let z = read_vec(&mut self.sock, 124)?;
            if z.iter().any(|&b| b != 0) {
                return Err(proto_err("non-zero padding after EXPORT_NAME".into()));
            }
        }
        Ok(self.into_transmission(size, flags))
    }

    fn into_transmission(self, size: u64, flags: u16) -> Nbd {
        Nbd {
            sock: self.sock,
            size,
            flags,
            structured: self.structured,
            meta_contexts: self.meta_contexts,
            next_cookie: 1,
        }
    }
}

/// Read a fixed-newstyle greeting and return the handshake flags.
pub fn read_newstyle_greeting(s: &mut TcpStream) -> io::Result<u16> {
    let m = read_u64(s)?;
    if m != NBDMAGIC {
        return Err(proto_err(format!("bad NBDMAGIC {m:#x}")));
    }
    let o = read_u64(s)?;
    if o != IHAVEOPT {
        return Err(proto_err(format!("expected IHAVEOPT (newstyle), got {o:#x}")));
    }
    read_u16(s)
}

/// The 152-byte oldstyle hello, parsed.
#[derive(Debug)]
pub struct OldstyleHello {
    pub size: u64,
    pub flags: u32,
    pub raw: Vec<u8>,
}

/// Read exactly 152 bytes: NBDMAGIC u64, 0x00420281861253 u64, u64 size, u32 flags, 124 zero.
pub fn read_oldstyle_hello(s: &mut TcpStream) -> io::Result<OldstyleHello> {
    let raw = read_vec(s, 152)?;
    let m = be64(&raw, 0);
    if m != NBDMAGIC {
        return Err(proto_err(format!("bad NBDMAGIC {m:#x}")));
    }
    let o = be64(&raw, 8);
    if o != OLDSTYLE_MAGIC {
        return Err(proto_err(format!("bad oldstyle magic {o:#x}")));
    }
    Ok(OldstyleHello { size: be64(&raw, 16), flags: be32(&raw, 24), raw })
}

// ---------------------------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------------------------

/// A reply header as read off the wire. Simple replies to READ are followed by data the caller
/// must read (its length is only known from the request); structured chunks carry their payload.
#[derive(Debug)]
pub enum Reply {
    Simple { error: u32, cookie: u64 },
    Chunk { flags: u16, typ: u16, cookie: u64, payload: Vec<u8> },
}

impl Reply {
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Chunk { cookie, .. } => *cookie,
        }
    }
}

/// Error of a structured ERROR / ERROR_OFFSET chunk payload: u32 error, u16 message length, ...
pub fn chunk_error(payload: &[u8]) -> u32 {
    if payload.len() >= 4 { be32(payload, 0) } else { u32::MAX }
}

/// A connection in the transmission phase.
pub struct Nbd {
    pub sock: TcpStream,
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    pub meta_contexts: Vec<(u32, String)>,
    next_cookie: u64,
}

impl Nbd {
    /// Fixed newstyle + NBD_OPT_GO on the default export, simple replies.
    pub fn connect(addr: SocketAddr) -> io::Result<Nbd> {
        Ok(Negotiation::start(addr)?.go("", &[])?.0)
    }

    /// Fixed newstyle + STRUCTURED_REPLY + SET_META_CONTEXT base:allocation + GO.
    pub fn connect_structured(addr: SocketAddr) -> io::Result<Nbd> {
        let mut n = Negotiation::start(addr)?;
        let r = n.structured_reply()?;
        if !n.structured {
            return Err(proto_err(format!("STRUCTURED_REPLY refused: {r:?}")));
        }
        n.set_meta_context("", &["base:allocation"])?;
        Ok(n.go("", &[])?.0)
    }

    /// Oldstyle: the 152-byte hello, then straight to transmission.
    pub fn connect_oldstyle(addr: SocketAddr) -> io::Result<Nbd> {
        let mut sock = tcp_connect(addr)?;
        let h = read_oldstyle_hello(&mut sock)?;
        Ok(Nbd::from_stream(sock, h.size, h.flags as u16))
    }

    /// A stream already in transmission (e.g. after an oldstyle hello read by the test).
    pub fn from_stream(sock: TcpStream, size: u64, flags: u16) -> Nbd {
        Nbd { sock, size, flags, structured: false, meta_contexts: Vec::new(), next_cookie: 1 }
    }

    pub fn cookie(&mut self) -> u64 {
        let c = self.next_cookie;
        self.next_cookie += 1;
        c
    }

    /// Request header: magic u32, flags u16, type u16, cookie u64, offset u64, length u32.
    pub fn request_bytes(flags: u16, typ: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
        Nbd::request_bytes_magic(REQUEST_MAGIC, flags, typ, cookie, offset, len)
    }

    pub fn request_bytes_magic(
        magic: u32,
        flags: u16,
        typ: u16,
        cookie: u64,
        offset: u64,
        len: u32,
    ) -> [u8; 28] {
        let mut b = [0u8; 28];
        b[0..4].copy_from_slice(&magic.to_be_bytes());
        b[4..6].copy_from_slice(&flags.to_be_bytes());
        b[6..8].copy_from_slice(&typ.to_be_bytes());
        b[8..16].copy_from_slice(&cookie.to_be_bytes());
        b[16..24].copy_from_slice(&offset.to_be_bytes());
        b[24..28].copy_from_slice(&len.to_be_bytes());
        b
    }

    pub fn send_request(
        &mut self,
        flags: u16,
        typ: u16,
        cookie: u64,
        offset: u64,
        len: u32,
    ) -> io::Result<()> {
        self.sock.write_all(&Nbd::request_bytes(flags, typ, cookie, offset, len))
    }

    /// WRITE header followed by its payload, in one write.
    pub fn send_write(&mut self, flags: u16, cookie: u64, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut m = Vec::with_capacity(28 + data.len());
        m.extend_from_slice(&Nbd::request_bytes(flags, CMD_WRITE, cookie, offset, data.len() as u32));
        m.extend_from_slice(data);
        self.sock.write_all(&m)
    }

    /// Read one reply header: simple (magic, u32 error, u64 cookie) or structured chunk (magic,
    /// u16 flags, u16 type, u64 cookie, u32 length, payload).
    pub fn read_reply(&mut self) -> io::Result<Reply> {
        let magic = read_u32(&mut self.sock)?;
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let error = read_u32(&mut self.sock)?;
                let cookie = read_u64(&mut self.sock)?;
                Ok(Reply::Simple { error, cookie })
            }
            STRUCTURED_REPLY_MAGIC => {
                let flags = read_u16(&mut self.sock)?;
                let typ = read_u16(&mut self.sock)?;
                let cookie = read_u64(&mut self.sock)?;
                let len = read_u32(&mut self.sock)?;
                if len > MAX_PEER_PAYLOAD {
                    return Err(proto_err(format!("chunk length {len} too big")));
                }
                let payload = read_vec(&mut self.sock, len as usize)?;
                Ok(Reply::Chunk { flags, typ, cookie, payload })
            }
            m => Err(proto_err(format!("bad reply magic {m:#x}"))),
        }
    }

    pub fn read_data(&mut self, len: usize) -> io::Result<Vec<u8>> {
        read_vec(&mut self.sock, len)
    }

    /// Read the full reply to a non-READ command with `cookie`: a simple reply, or structured
    /// chunks up to DONE. Returns the NBD error (0 = success).
    pub fn read_status(&mut self, cookie: u64) -> io::Result<u32> {
        let mut error = 0u32;
        for _ in 0..10_000 {
            let r = self.read_reply()?;
            if r.cookie() != cookie {
                return Err(proto_err(format!("reply cookie {:#x}, expected {cookie:#x}", r.cookie())));
            }
            match r {
                Reply::Simple { error, .. } => return Ok(error),
                Reply::Chunk { flags, typ, payload, .. } => {
                    if typ == CHUNK_ERROR || typ == CHUNK_ERROR_OFFSET {
                        error = chunk_error(&payload);
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        return Ok(error);
                    }
                }
            }
        }
        Err(proto_err("too many chunks".into()))
    }

    /// READ `len` bytes at `offset`. Ok(Ok(data)) or Ok(Err(nbd error)).
    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Result<Vec<u8>, u32>> {
        let cookie = self.cookie();
        self.send_request(0, CMD_READ, cookie, offset, len)?;
        self.read_read_reply(cookie, offset, len)
    }

    /// Collect the reply to a READ already sent.
    pub fn read_read_reply(
        &mut self,
        cookie: u64,
        offset: u64,
        len: u32,
    ) -> io::Result<Result<Vec<u8>, u32>> {
        let mut buf = vec![0u8; len as usize];
        let mut error = 0u32;
        for _ in 0..100_000 {
            let r = self.read_reply()?;
            if r.cookie() != cookie {
                return Err(proto_err(format!("reply cookie {:#x}, expected {cookie:#x}", r.cookie())));
            }
            match r {
                Reply::Simple { error, .. } => {
                    if error != 0 {
                        return Ok(Err(error));
                    }
                    let data = self.read_data(len as usize)?;
                    return Ok(Ok(data));
                }
                Reply::Chunk { flags, typ, payload, .. } => {
                    match typ {
                        CHUNK_OFFSET_DATA => {
                            if payload.len() < 8 {
                                return Err(proto_err("short OFFSET_DATA".into()));
                            }
                            let at = be64(&payload, 0);
                            let data = &payload[8..];
                            let rel = at
                                .checked_sub(offset)
                                .ok_or_else(|| proto_err(format!("OFFSET_DATA at {at} before {offset}")))?
                                as usize;
                            if rel + data.len() > buf.len() {
                                return Err(proto_err("OFFSET_DATA past request".into()));
                            }
                            buf[rel..rel + data.len()].copy_from_slice(data);
                        }
                        CHUNK_OFFSET_HOLE => {
                            if payload.len() < 12 {
                                return Err(proto_err("short OFFSET_HOLE".into()));
                            }
                            let at = be64(&payload, 0);
                            let n = be32(&payload, 8) as usize;
                            let rel = at
                                .checked_sub(offset)
                                .ok_or_else(|| proto_err(format!("OFFSET_HOLE at {at} before {offset}")))?
                                as usize;
                            if rel + n > buf.len() {
                                return Err(proto_err("OFFSET_HOLE past request".into()));
                            }
                            buf[rel..rel + n].fill(0);
                        }
                        CHUNK_ERROR | CHUNK_ERROR_OFFSET => error = chunk_error(&payload),
                        CHUNK_NONE => {}
                        t => return Err(proto_err(format!("unexpected chunk type {t} to READ"))),
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        return Ok(if error != 0 { Err(error) } else { Ok(buf) });
                    }
                }
            }
        }
        Err(proto_err("too many chunks".into()))
    }

    /// WRITE; returns the NBD error (0 = success).
    pub fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> io::Result<u32> {
        let cookie = self.cookie();
        self.send_write(flags, cookie, offset, data)?;
        self.read_status(cookie)
    }

    /// A command without payload (FLUSH, TRIM, WRITE_ZEROES, CACHE, unknown types...).
    pub fn command(&mut self, typ: u16, flags: u16, offset: u64, len: u32) -> io::Result<u32> {
        let cookie = self.cookie();
        self.send_request(flags, typ, cookie, offset, len)?;
        self.read_status(cookie)
    }

    pub fn flush(&mut self) -> io::Result<u32> {
        self.command(CMD_FLUSH, 0, 0, 0)
    }

    pub fn trim(&mut self, offset: u64, len: u32) -> io::Result<u32> {
        self.command(CMD_TRIM, 0, offset, len)
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u32, flags: u16) -> io::Result<u32> {
        self.command(CMD_WRITE_ZEROES, flags, offset, len)
    }

    /// BLOCK_STATUS for the first negotiated context: Ok(Ok(descriptors (length, flags))).
    pub fn block_status(
        &mut self,
        offset: u64,
        len: u32,
        flags: u16,
    ) -> io::Result<Result<Vec<(u32, u32)>, u32>> {
        let cookie = self.cookie();
        self.send_request(flags, CMD_BLOCK_STATUS, cookie, offset, len)?;
        let mut out = Vec::new();
        let mut error = 0;
        for _ in 0..10_000 {
            let r = self.read_reply()?;
            if r.cookie() != cookie {
                return Err(proto_err(format!("reply cookie {:#x}, expected {cookie:#x}", r.cookie())));
            }
            match r {
                Reply::Simple { error, .. } => return Ok(Err(error)),
                Reply::Chunk { flags, typ, payload, .. } => {
                    match typ {
                        CHUNK_BLOCK_STATUS => {
                            if payload.len() < 4 || (payload.len() - 4) % 8 != 0 {
                                return Err(proto_err(format!(
                                    "BLOCK_STATUS payload of {} bytes",
                                    payload.len()
                                )));
                            }
                            for d in payload[4..].chunks_exact(8) {
                                out.push((be32(d, 0), be32(d, 4)));
                            }
                        }
                        CHUNK_ERROR | CHUNK_ERROR_OFFSET => error = chunk_error(&payload),
                        CHUNK_NONE => {}
                        t => {
                            return Err(proto_err(format!("unexpected chunk type {t} to BLOCK_STATUS")));
                        }
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        return Ok(if error != 0 { Err(error) } else { Ok(out) });
                    }
                }
            }
        }
        Err(proto_err("too many chunks".into()))
    }

    /// NBD_CMD_DISC (no reply).
    pub fn disconnect(&mut self) -> io::Result<()> {
        let cookie = self.cookie();
        self.send_request(0, CMD_DISC, cookie, 0, 0)
    }
}

/// Parse `nbdinfo --map` lines: offset, length, type, description.
pub fn parse_nbdinfo_map(out: &str) -> Vec<(u64, u64, u32, String)> {
    out.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let off = it.next()?.parse().ok()?;
            let len = it.next()?.parse().ok()?;
            let typ = it.next()?.parse().ok()?;
            let desc = it.collect::<Vec<_>>().join(" ");
            Some((off, len, typ, desc))
        })
        .collect()
}

/// Find `"key": value` in JSON-ish text (nbdinfo --json, qemu-img map) and return the value
/// token (number, true/false, or string without quotes).
pub fn json_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("\"{key}\":");
    let i = text.find(&pat)? + pat.len();
    let rest = text[i..].trim_start();
    if let Some(s) = rest.strip_prefix('"') {
        return s.split('"').next();
    }
    let end =
        rest.find(|c: char| c == ',' || c == '}' || c == ']' || c.is_whitespace()).unwrap_or(rest.len());
    Some(&rest[..end])
}

/// One `qemu-img map --output=json` extent: (start, length, data, zero).
pub fn parse_qemu_map(out: &str) -> Vec<(u64, u64, bool, bool)> {
    out.split('{')
        .skip(1)
        .filter_map(|obj| {
            let start = json_value(obj, "start")?.parse().ok()?;
            let length = json_value(obj, "length")?.parse().ok()?;
            let data = json_value(obj, "data")? == "true";
            let zero = json_value(obj, "zero")? == "true";
            Some((start, length, data, zero))
        })
        .collect()
}

/// Map cookie -> request length, for reading simple replies to pipelined READs.
pub type PendingReads = HashMap<u64, (u64, u32)>;
