//! Extended headers (NBD_OPT_EXTENDED_HEADERS): qemu-io and qemu-img (which ask for them) against
//! the real binary, and raw sockets checking the wire: 32-byte requests, 32-byte reply chunks
//! echoing cookie and offset, 64-bit effect lengths, BLOCK_STATUS_EXT, and the option rules.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

const OPT_EXTENDED_HEADERS: u32 = 11;
const REP_ERR_EXT_HEADER_REQD: u32 = 0x8000_000a;
const EXT_REQUEST_MAGIC: u32 = 0x21e4_1c71;
const EXT_REPLY_MAGIC: u32 = 0x6e8a_278c;
const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;
const CHUNK_BLOCK_STATUS_EXT: u16 = 6;
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// One extended reply chunk as read off the wire.
#[derive(Debug)]
struct Chunk {
    flags: u16,
    typ: u16,
    cookie: u64,
    offset: u64,
    payload: Vec<u8>,
}

impl Chunk {
    /// The NBD error of an error chunk (0 for any other type).
    fn error(&self) -> u32 {
        if self.typ & 0x8000 != 0 { chunk_error(&self.payload) } else { 0 }
    }
}

/// A connection in transmission with extended headers agreed.
struct Ext {
    sock: TcpStream,
    size: u64,
}

impl Ext {
    /// EXTENDED_HEADERS (must be acknowledged), optionally SET_META_CONTEXT base:allocation, GO.
    fn connect(addr: SocketAddr, meta: bool) -> Ext {
        let mut n = Negotiation::start(addr).expect("greeting");
        let r = n.option(OPT_EXTENDED_HEADERS, &[]).expect("EXTENDED_HEADERS");
        assert_eq!(r.last().map(|x| x.typ), Some(REP_ACK), "EXTENDED_HEADERS: {r:?}");
        if meta {
            n.set_meta_context("", &["base:allocation"]).expect("SET_META_CONTEXT");
            assert_eq!(n.meta_contexts, vec![(1, "base:allocation".to_string())]);
        }
        Ext::go(n)
    }

    fn go(mut n: Negotiation) -> Ext {
        let r = n.option(OPT_GO, &Negotiation::info_data("", &[])).expect("GO");
        assert_eq!(r.last().map(|x| x.typ), Some(REP_ACK), "GO: {r:?}");
        let (size, _) = r.iter().find_map(|x| x.info_export()).expect("INFO_EXPORT");
        Ext { sock: n.sock, size }
    }

    /// Extended request: u32 magic, u16 flags, u16 type, u64 cookie, u64 offset, u64 length.
    fn send(&mut self, flags: u16, typ: u16, cookie: u64, offset: u64, len: u64, payload: &[u8]) {
        let mut m = Vec::with_capacity(32 + payload.len());
        m.extend_from_slice(&EXT_REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&typ.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(payload);
        self.sock.write_all(&m).expect("send request");
    }

    /// Raw 32-byte header and its payload. Anything but the extended magic (a 16-byte simple
    /// reply, a 20-byte structured chunk) fails here.
    fn read_raw(&mut self) -> ([u8; 32], Vec<u8>) {
        let mut h = [0u8; 32];
        self.sock.read_exact(&mut h).expect("read a 32-byte reply header");
        assert_eq!(be32(&h), EXT_REPLY_MAGIC, "reply header is not an extended one: {h:02x?}");
        let len = be64(&h[24..]);
        assert!(len <= 64 * MIB, "reply payload of {len} bytes");
        let mut p = vec![0u8; len as usize];
        self.sock.read_exact(&mut p).expect("read the reply payload");
        (h, p)
    }

    fn read_chunk(&mut self) -> Chunk {
        let (h, payload) = self.read_raw();
        Chunk {
            flags: u16::from_be_bytes([h[4], h[5]]),
            typ: u16::from_be_bytes([h[6], h[7]]),
            cookie: be64(&h[8..]),
            offset: be64(&h[16..]),
            payload,
        }
    }

    /// The one final chunk answering (cookie, offset); returns it after checking the echo.
    fn reply(&mut self, cookie: u64, offset: u64) -> Chunk {
        let c = self.read_chunk();
        assert_eq!((c.cookie, c.offset), (cookie, offset), "cookie/offset echo in {c:?}");
        assert_eq!(c.flags, REPLY_FLAG_DONE, "expected one final chunk: {c:?}");
        c
    }

    /// A command without payload; its NBD error (0 = success, which must be a NONE chunk).
    fn command(&mut self, flags: u16, typ: u16, cookie: u64, offset: u64, len: u64) -> u32 {
        self.send(flags, typ, cookie, offset, len, &[]);
        let c = self.reply(cookie, offset);
        if c.error() == 0 {
            assert_eq!((c.typ, c.payload.len()), (CHUNK_NONE, 0), "success of command {typ}: {c:?}");
        }
        c.error()
    }

    /// BLOCK_STATUS: descriptors (length, flags) of a BLOCK_STATUS_EXT chunk.
    fn block_status(&mut self, cookie: u64, offset: u64, len: u64) -> Vec<(u64, u32)> {
        self.send(0, CMD_BLOCK_STATUS, cookie, offset, len, &[]);
        let c = self.reply(cookie, offset);
        assert_eq!(c.typ, CHUNK_BLOCK_STATUS_EXT, "block status reply {c:?}");
        let p = &c.payload;
        assert!(
            p.len() >= 24 && (p.len() - 8).is_multiple_of(16),
            "BLOCK_STATUS_EXT payload of {} bytes",
            p.len()
        );
        assert_eq!(be32(p), 1, "context id");
        let d: Vec<(u64, u32)> = p[8..].chunks_exact(16).map(|c| (be64(c), be32(&c[12..]))).collect();
        assert_eq!(be32(&p[4..]) as usize, d.len(), "descriptor count");
        assert!(p[8..].chunks_exact(16).all(|c| be32(&c[8..]) == 0), "descriptor padding not zero");
        d
    }
}

/// qemu-io 10 asks for extended headers first; every command it has works over them.
#[test]
fn qemu_io_uses_extended_headers_for_every_command() {
    require_tool("qemu-io");
    let dir = TempDir::new("ext-qemu-io");
    let file = dir.join("disk.img");
    let size = 16 * MIB;
    make_random_file(&file, size, 31);
    let original = read_at(&file, 0, size as usize);
    let mut server = Server::start(&file, &[]);

    let out = run_bounded(
        Command::new("qemu-io")
            .args(["--trace", "nbd_receive_option_reply", "-f", "raw"])
            .args(["-c", "write -P 0xab 0 64k"])
            .args(["-c", "write -P 0xcd -f 4M 5M"])
            .args(["-c", "read -P 0xab 0 64k"])
            .args(["-c", "read -P 0xcd 4M 5M"])
            .args(["-c", "discard 1M 1M"])
            .args(["-c", "write -z 2M 64k"])
            .args(["-c", "write -z -u 3M 128k"])
            .args(["-c", "read -P 0 1M 1M"])
            .args(["-c", "flush"])
            .args(["-c", "map"])
            .arg(server.uri()),
        TOOL_TIMEOUT,
    );
    out.assert_success("qemu-io");
    assert!(
        out.stderr.contains("Received option reply 11 (extended headers), type 1 (ack)"),
        "qemu-io did not get extended headers:\n{}",
        out.stderr
    );
    assert!(
        !out.stdout.contains("failed") && !out.stdout.contains("Pattern verification"),
        "qemu-io reported a failure:\n{}\n{}",
        out.stdout,
        out.stderr
    );
    assert_file_range(&file, 0, &[0xab; 64 * 1024], "write -P 0xab");
    assert_file_range(&file, 4 * MIB, &vec![0xcd; 5 * MIB as usize], "FUA write -P 0xcd");
    assert_file_range(&file, MIB, &vec![0u8; MIB as usize], "discard");
    assert_file_range(&file, 2 * MIB, &[0u8; 64 * 1024], "write -z");
    assert_file_range(&file, 3 * MIB, &[0u8; 128 * 1024], "write -z -u");
    for (from, to) in
        [(64 * KIB, MIB), (2 * MIB + 64 * KIB, 3 * MIB), (3 * MIB + 128 * KIB, 4 * MIB), (9 * MIB, size)]
    {
        assert_file_range(&file, from, &original[from as usize..to as usize], "bytes not written");
    }
    server.assert_alive("after qemu-io");
}

/// qemu-img convert into and out of the server, and compare, over extended headers; the copy
/// out stays sparse (block status answered with BLOCK_STATUS_EXT).
#[test]
fn qemu_img_convert_and_compare_over_extended_headers() {
    require_tool("qemu-img");
    let dir = TempDir::new("ext-qemu-img");
    let size = 48 * MIB;
    let src = dir.join("src.img");
    make_sparse_file(&src, size);
    for (i, off) in [0, 7 * MIB + 512, 30 * MIB].into_iter().enumerate() {
        write_at(&src, off, &random_bytes(3 * MIB as usize, 40 + i as u64));
    }
    let served = dir.join("served.img");
    make_sparse_file(&served, size);
    let server = Server::start(&served, &[]);

    let out = run_bounded(
        Command::new("qemu-img")
            .args(["--trace", "nbd_receive_option_reply", "convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(server.uri()),
        TOOL_TIMEOUT,
    );
    out.assert_success("qemu-img convert into the server");
    assert!(
        out.stderr.contains("Received option reply 11 (extended headers), type 1 (ack)"),
        "qemu-img did not get extended headers:\n{}",
        out.stderr
    );
    assert_files_equal(&src, &served);

    let out = run_bounded(
        Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&src).arg(server.uri()),
        TOOL_TIMEOUT,
    );
    out.assert_success("qemu-img compare");

    let copy = dir.join("copy.img");
    let out = run_bounded(
        Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(server.uri()).arg(&copy),
        TOOL_TIMEOUT,
    );
    out.assert_success("qemu-img convert out of the server");
    assert_files_equal(&src, &copy);
    let (a, b) = (allocated_bytes(&src), allocated_bytes(&copy));
    assert!(b <= a + MIB, "copy not sparse: {b} bytes allocated vs {a}");
}

/// Every command over a raw socket: each reply is one 32-byte extended header with the
/// request's cookie and offset (checked byte for byte once), never a simple reply.
#[test]
fn raw_replies_are_32_byte_extended_chunks() {
    let dir = TempDir::new("ext-raw");
    let file = dir.join("disk.img");
    let size = 4 * MIB;
    make_random_file(&file, 2 * MIB, 32);
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(size).unwrap();
    let server = Server::start(&file, &[]);
    let mut c = Ext::connect(server.addr(), true);
    assert_eq!(c.size, size);

    // WRITE with PAYLOAD_LEN (as the spec has it), then one without (as some clients send it).
    let cookie = 0xfeed_face_0000_0001;
    let data = random_bytes(8192, 33);
    c.send(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, cookie, 4096, 8192, &data);
    let (h, p) = c.read_raw();
    let mut want = Vec::new();
    want.extend_from_slice(&EXT_REPLY_MAGIC.to_be_bytes());
    want.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    want.extend_from_slice(&CHUNK_NONE.to_be_bytes());
    want.extend_from_slice(&cookie.to_be_bytes());
    want.extend_from_slice(&4096u64.to_be_bytes());
    want.extend_from_slice(&0u64.to_be_bytes());
    assert_eq!(h.to_vec(), want, "the reply to a WRITE, byte for byte");
    assert!(p.is_empty());
    assert_file_range(&file, 4096, &data, "extended WRITE");
    c.send(0, CMD_WRITE, 2, 3 * MIB, 4096, &[0x5a; 4096]);
    assert_eq!(c.reply(2, 3 * MIB).error(), 0);
    assert_file_range(&file, 3 * MIB, &[0x5a; 4096], "WRITE without PAYLOAD_LEN");

    // READ: one OFFSET_DATA chunk; the header and the payload both carry the offset.
    c.send(0, CMD_READ, 3, 4096, 8192, &[]);
    let r = c.reply(3, 4096);
    assert_eq!(r.typ, CHUNK_OFFSET_DATA, "{r:?}");
    assert_eq!(be64(&r.payload), 4096);
    assert_eq!(&r.payload[8..], &data[..]);

    assert_eq!(c.command(0, CMD_FLUSH, 4, 0, 0), 0, "FLUSH");
    assert_eq!(c.command(CMD_FLAG_FUA, CMD_TRIM, 5, MIB, 64 * KIB), 0, "TRIM");
    assert_eq!(c.command(0, CMD_WRITE_ZEROES, 6, MIB + 128 * KIB, 64 * KIB), 0, "WRITE_ZEROES");
    assert_eq!(c.command(0, CMD_CACHE, 7, 0, MIB), 0, "CACHE");
    assert_file_range(&file, MIB, &[0u8; 64 * 1024], "TRIM");
    assert_file_range(&file, MIB + 128 * KIB, &[0u8; 64 * 1024], "WRITE_ZEROES");

    // BLOCK_STATUS: BLOCK_STATUS_EXT: data, the trimmed range, data, the hole past 2 MiB with
    // the page written at 3 MiB in it.
    let d = c.block_status(8, 0, size);
    assert_eq!(d.iter().map(|e| e.0).sum::<u64>(), size, "descriptors {d:?}");
    let flags_at = |x: u64| {
        let mut end = 0;
        d.iter()
            .find(|e| {
                end += e.0;
                end > x
            })
            .map(|e| e.1)
    };
    let hole = Some(STATE_HOLE | STATE_ZERO);
    assert_eq!(flags_at(0), Some(0), "{d:?}");
    assert_eq!(flags_at(MIB), hole, "{d:?}");
    assert_eq!(flags_at(2 * MIB + 8192), hole, "{d:?}");
    assert_eq!(flags_at(3 * MIB), Some(0), "{d:?}");
    assert_eq!(flags_at(3 * MIB + 8192), hole, "{d:?}");

    // Errors are chunks too, for every command, echoing the request's offset.
    c.send(0, CMD_READ, 9, size, 4096, &[]);
    let e = c.reply(9, size);
    assert_eq!((e.typ, e.error()), (CHUNK_ERROR, EINVAL), "{e:?}");
    assert_eq!(c.command(0, 99, 10, 512, 512), EINVAL, "unknown command");
    assert_eq!(c.command(0, CMD_TRIM, 11, size, 4096), EINVAL, "TRIM past the end");
    assert_eq!(c.command(0, CMD_FLUSH, 12, 4096, 0), EINVAL, "FLUSH with an offset");

    // DISC: no reply, the server closes.
    c.send(0, CMD_DISC, 13, 0, 0, &[]);
    wait_closed(&mut c.sock, IO_TIMEOUT).expect("closed after DISC");
}

/// 64-bit effect lengths: TRIM, WRITE_ZEROES and CACHE over more than 4 GiB in one request;
/// BLOCK_STATUS over 6 GiB answers with some prefix. READ over the maximum payload is refused.
#[test]
fn raw_64_bit_effect_lengths() {
    let dir = TempDir::new("ext-64");
    let file = dir.join("big.img");
    let size = 6 * GIB;
    make_sparse_file(&file, size);
    write_at(&file, 5 * GIB, &[7u8; 4096]);
    let server = Server::start(&file, &[]);
    let mut c = Ext::connect(server.addr(), true);
    assert_eq!(c.size, size);

    let d = c.block_status(1, 0, size);
    assert_eq!(d[0].1, STATE_HOLE | STATE_ZERO, "{d:?}");
    let total: u64 = d.iter().map(|e| e.0).sum();
    assert!(total > 0 && total <= size, "{d:?}");

    assert_eq!(c.command(0, CMD_WRITE_ZEROES, 2, 0, 5 * GIB), 0, "WRITE_ZEROES of 5 GiB");
    assert_eq!(c.command(0, CMD_CACHE, 3, 0, 5 * GIB), 0, "CACHE of 5 GiB");
    assert_eq!(read_at(&file, 5 * GIB, 4096), vec![7u8; 4096], "bytes past the zeroed range");
    assert_eq!(c.command(0, CMD_TRIM, 4, GIB, 5 * GIB), 0, "TRIM of 5 GiB");
    assert_eq!(read_at(&file, 5 * GIB, 4096), vec![0u8; 4096], "trimmed");
    assert_eq!(c.command(0, CMD_TRIM, 5, GIB, 5 * GIB + 1), EINVAL, "TRIM past the end");
    assert!(allocated_bytes(&file) <= MIB, "the file got allocated");

    c.send(0, CMD_READ, 6, 0, 64 * MIB, &[]);
    let e = c.reply(6, 0);
    assert_eq!((e.typ, e.error()), (CHUNK_ERROR, EINVAL), "READ of 64 MiB: {e:?}");
    c.send(0, CMD_READ, 7, 5 * GIB, 4096, &[]);
    assert_eq!(c.reply(7, 5 * GIB).typ, CHUNK_OFFSET_DATA);
}

/// A payload over the maximum block size, or on a command that takes none, is read past and
/// refused with EINVAL; the connection stays in step. A payload claiming 2^40 bytes costs the
/// server nothing but the bytes actually sent.
#[test]
fn raw_refused_payloads_are_drained_not_buffered() {
    let dir = TempDir::new("ext-payload");
    let file = dir.join("disk.img");
    make_random_file(&file, 64 * MIB, 34);
    let server = Server::start(&file, &[]);
    let mut c = Ext::connect(server.addr(), false);

    let big = 32 * MIB + 1;
    c.send(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 1, 0, big, &vec![0xee; big as usize]);
    assert_eq!(c.reply(1, 0).error(), EINVAL, "WRITE over the maximum");
    c.send(CMD_FLAG_PAYLOAD_LEN, CMD_TRIM, 2, 4096, 4096, &[0xee; 4096]);
    assert_eq!(c.reply(2, 4096).error(), EINVAL, "TRIM with a payload");
    c.send(0, CMD_READ, 3, 0, 4096, &[]);
    let r = c.reply(3, 0);
    assert_eq!(&r.payload[8..], &read_at(&file, 0, 4096)[..], "READ after the refused payloads");
    assert!(read_at(&file, 0, 64 * MIB as usize).iter().any(|&b| b != 0xee), "refused payload was written");

    let mut c2 = Ext::connect(server.addr(), false);
    c2.send(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 1, 0, 1 << 40, &vec![0; MIB as usize]);
    drop(c2);
    let mut c3 = Ext::connect(server.addr(), false);
    c3.send(0, CMD_READ, 1, 0, 512, &[]);
    assert_eq!(c3.reply(1, 0).typ, CHUNK_OFFSET_DATA);
}

/// Option rules: data or a repeat is ERR_INVALID; STRUCTURED_REPLY after it is
/// ERR_EXT_HEADER_REQD; STRUCTURED_REPLY and a meta context before it carry over; EXPORT_NAME
/// after it, or a compact request after GO, ends the connection.
#[test]
fn raw_option_order_rules() {
    let dir = TempDir::new("ext-opts");
    let file = dir.join("disk.img");
    make_random_file(&file, MIB, 35);
    let server = Server::start(&file, &[]);

    let mut n = Negotiation::start(server.addr()).expect("greeting");
    let r = n.option(OPT_EXTENDED_HEADERS, &[0]).expect("with data");
    assert_eq!(r.last().map(|x| x.typ), Some(REP_ERR_INVALID), "{r:?}");
    let r = n.option(OPT_EXTENDED_HEADERS, &[]).expect("first");
    assert_eq!(r.last().map(|x| x.typ), Some(REP_ACK), "{r:?}");
    let r = n.option(OPT_EXTENDED_HEADERS, &[]).expect("repeat");
    assert_eq!(r.last().map(|x| x.typ), Some(REP_ERR_INVALID), "{r:?}");
    let r = n.option(OPT_STRUCTURED_REPLY, &[]).expect("structured after extended");
    assert_eq!(r.last().map(|x| x.typ), Some(REP_ERR_EXT_HEADER_REQD), "{r:?}");
    // Still extended: a block status without a context is an error chunk, a READ works.
    let mut c = Ext::go(n);
    assert_eq!(c.command(0, CMD_BLOCK_STATUS, 1, 0, 4096), EINVAL, "no context negotiated");
    c.send(0, CMD_READ, 2, 512, 512, &[]);
    assert_eq!(c.reply(2, 512).typ, CHUNK_OFFSET_DATA);
    // A compact request now is a framing error: the server hangs up.
    c.sock.write_all(&Nbd::request_bytes(0, CMD_READ, 3, 0, 512)).expect("compact request");
    c.sock.write_all(&[0; 4]).expect("pad to 32 bytes");
    wait_closed(&mut c.sock, IO_TIMEOUT).expect("closed after a compact request");

    // STRUCTURED_REPLY and SET_META_CONTEXT first, then EXTENDED_HEADERS: the context stays.
    let mut n = Negotiation::start(server.addr()).expect("greeting");
    n.structured_reply().expect("STRUCTURED_REPLY");
    n.set_meta_context("", &["base:allocation"]).expect("SET_META_CONTEXT");
    let r = n.option(OPT_EXTENDED_HEADERS, &[]).expect("extended after structured");
    assert_eq!(r.last().map(|x| x.typ), Some(REP_ACK), "{r:?}");
    let mut c = Ext::go(n);
    assert_eq!(c.block_status(1, 0, MIB), vec![(MIB, 0)]);

    // EXPORT_NAME is not allowed after EXTENDED_HEADERS and cannot be refused: hang up.
    let mut n = Negotiation::start(server.addr()).expect("greeting");
    n.option(OPT_EXTENDED_HEADERS, &[]).expect("EXTENDED_HEADERS");
    n.send_option(OPT_EXPORT_NAME, b"").expect("EXPORT_NAME");
    wait_closed(&mut n.sock, IO_TIMEOUT).expect("closed after EXPORT_NAME");

    // Without extended headers PAYLOAD_LEN is just an unknown flag: EINVAL, compact replies.
    let mut c = Nbd::connect(server.addr()).expect("compact connection");
    assert_eq!(c.command(CMD_TRIM, CMD_FLAG_PAYLOAD_LEN, 0, 4096).expect("io"), EINVAL);
    assert_eq!(c.read(0, 512).expect("io").expect("read"), read_at(&file, 0, 512));
}

/// A qemu-nbd child on 127.0.0.1, killed (by its own handle) on drop; its stderr (traces) goes
/// to a file.
struct QemuNbd {
    child: std::process::Child,
    port: u16,
    log: std::path::PathBuf,
}

impl QemuNbd {
    /// qemu-nbd tracing which options it checks and the hole chunks it sends.
    fn start(file: &std::path::Path, log: std::path::PathBuf) -> QemuNbd {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("qemu-nbd")
            .args(["-f", "raw", "-b", "127.0.0.1", "-p", &port.to_string(), "-t"])
            .args(["--trace", "nbd_negotiate_options_check_option", "--trace", "nbd_co_send_chunk_read_hole"])
            .arg(file)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn qemu-nbd");
        let q = QemuNbd { child, port, log };
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        // Bounded: up to 10 s for qemu-nbd to listen.
        for _ in 0..200 {
            if TcpStream::connect(addr).is_ok() {
                return q;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("qemu-nbd not listening on {port}: {}", std::fs::read_to_string(&q.log).unwrap_or_default());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `flexnbd read`/`write` with stdin or stdout on files, bounded in time; the exit status.
fn flexnbd_io(args: &[&str], stdin: Option<&std::path::Path>, stdout: Option<&std::path::Path>) -> bool {
    let mut cmd = Command::new(flexnbd_bin());
    cmd.args(args).stderr(std::process::Stdio::inherit());
    cmd.stdin(stdin.map_or_else(std::process::Stdio::null, |p| std::fs::File::open(p).unwrap().into()));
    cmd.stdout(stdout.map_or_else(std::process::Stdio::null, |p| std::fs::File::create(p).unwrap().into()));
    let mut child = cmd.spawn().expect("spawn flexnbd");
    match wait_child(&mut child, TOOL_TIMEOUT) {
        Some(st) => st.success(),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("flexnbd {args:?} still running after {TOOL_TIMEOUT:?}");
        }
    }
}

/// Our own `read` and `write` ask for extended headers: against qemu-nbd, which then answers
/// reads in several chunks with holes among them, and against flexnbd itself.
#[test]
fn cli_read_and_write_use_extended_headers() {
    require_tool("qemu-nbd");
    let dir = TempDir::new("ext-cli");
    let file = dir.join("disk.img");
    let size = 8 * MIB;
    make_sparse_file(&file, size);
    write_at(&file, 2 * MIB + 4096, &random_bytes(MIB as usize, 36));
    let input = dir.join("in.bin");
    std::fs::write(&input, random_bytes(300_000, 37)).unwrap();
    let out = dir.join("out.bin");

    let q = QemuNbd::start(&file, dir.join("qemu-nbd.log"));
    let port = q.port.to_string();
    let (p, s) = (port.as_str(), size.to_string());
    assert!(flexnbd_io(
        &["write", "-l", "127.0.0.1", "-p", p, "-F", "5000", "-S", "300000"],
        Some(&input),
        None
    ));
    assert_file_range(&file, 5000, &std::fs::read(&input).unwrap(), "flexnbd write to qemu-nbd");
    assert!(flexnbd_io(&["read", "-l", "127.0.0.1", "-p", p, "-F", "0", "-S", &s], None, Some(&out)));
    assert_files_equal(&file, &out);
    let log = q.log();
    assert!(log.contains("Checking option 11 (extended headers)"), "qemu-nbd trace:\n{log}");
    assert!(log.contains("nbd_co_send_chunk_read_hole"), "no hole chunks were sent:\n{log}");
    drop(q);

    let server = Server::start(&file, &[]);
    let port = server.port().to_string();
    let p = port.as_str();
    assert!(flexnbd_io(
        &["write", "-l", "127.0.0.1", "-p", p, "-F", "3000000", "-S", "300000"],
        Some(&input),
        None
    ));
    assert_file_range(&file, 3_000_000, &std::fs::read(&input).unwrap(), "flexnbd write to flexnbd");
    assert!(flexnbd_io(&["read", "-l", "127.0.0.1", "-p", p, "-F", "0", "-S", &s], None, Some(&out)));
    assert_files_equal(&file, &out);
    // The server logs what was negotiated at D level, which only debug builds have.
    if cfg!(debug_assertions) {
        assert!(server.wait_for_line("extended=true", IO_TIMEOUT), "{}", server.stderr_text());
    }
    // Past the end: refused by the client before any request.
    assert!(!flexnbd_io(&["read", "-l", "127.0.0.1", "-p", p, "-F", &s, "-S", "1"], None, None));
}
