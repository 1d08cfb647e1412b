//! Transmission over a raw socket: reads and writes land in the file, errors per the NBD spec's
//! SHOULDs (EINVAL, ENOSPC, EPERM) leave the connection usable, hostile requests (bad magic, 2 GiB
//! lengths, truncated payloads) never hurt the server, zero writes keep files sparse, pipelining
//! and many idle connections are handled.

mod common;

use common::*;
use std::collections::HashSet;
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

fn served_random(tag: &str, size: u64, seed: u64) -> (TempDir, std::path::PathBuf) {
    let dir = TempDir::new(tag);
    let file = dir.join("disk.img");
    make_random_file(&file, size, seed);
    (dir, file)
}

#[test]
fn reads_return_file_contents() {
    let size = 4 * MIB + 123;
    let (_dir, file) = served_random("read", size, 21);
    let server = Server::start(&file, &[]);
    let mut c = Nbd::connect(server.addr()).expect("connect");
    assert_eq!(c.size, size);
    for (off, len) in [(0u64, 1u32), (0, 4096), (777, 10_000), (MIB - 1, 2), (size - 123, 123)] {
        let got = c.read(off, len).expect("io").unwrap_or_else(|e| panic!("read {off}+{len}: error {e}"));
        assert_eq!(got, read_at(&file, off, len as usize), "read {off}+{len}");
    }
    // A 32 MiB read (the advertised maximum) is served in full on a larger file.
    drop(c);
    let (_dir2, big) = served_random("read-big", 40 * MIB, 22);
    let server2 = Server::start(&big, &[]);
    let mut c2 = Nbd::connect(server2.addr()).expect("connect");
    let got = c2.read(MIB, 32 * MIB as u32).expect("io").expect("32 MiB read");
    assert_eq!(got, read_at(&big, MIB, 32 * MIB as usize));
}

/// Drops the file's clean pages from the page cache (ext4 and most disk filesystems; a no-op on
/// tmpfs), so the next read of it must come from the disk.
fn evict_from_cache(path: &std::path::Path) {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::File::open(path).expect("open");
    f.sync_all().expect("fsync");
    // SAFETY: plain syscall on a descriptor we own.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise");
}

/// Big reads of cached data are sent straight from the file (sendfile), others are read by a
/// disk worker: both must return the file's bytes, and a later read must see an acknowledged
/// write, whichever way it goes.
#[test]
fn big_reads_are_right_from_disk_from_cache_and_after_writes() {
    let size = 8 * MIB;
    let (_dir, file) = served_random("bigread", size, 41);
    evict_from_cache(&file);
    let server = Server::start(&file, &[]);
    let mut c = Nbd::connect(server.addr()).expect("connect");
    let (off, len) = (MIB + 4096 * 3 + 17, 2 * MIB as u32);
    let want = read_at(&file, off, len as usize);
    let cold = c.read(off, len).expect("io").expect("read from disk");
    assert!(cold == want, "read of uncached data differs from the file");
    let warm = c.read(off, len).expect("io").expect("read from cache");
    assert!(warm == want, "read of cached data differs from the file");

    // A write, then overlapping reads sent after its reply.
    let data = random_bytes(256 * 1024, 42);
    assert_eq!(c.write(off + 1000, &data, 0).expect("io"), 0);
    let mut expected = want.clone();
    expected[1000..1000 + data.len()].copy_from_slice(&data);
    for round in 0..3 {
        let got = c.read(off, len).expect("io").expect("read after write");
        assert!(got == expected, "round {round}: read after an acknowledged write misses it");
    }
    drop(c);
    assert_file_range(&file, off, &expected, "file after the write");
}

#[test]
fn writes_land_in_file_and_read_back() {
    let size = 4 * MIB;
    let (_dir, file) = served_random("write", size, 23);
    let original = read_at(&file, 0, size as usize);
    let server = Server::start(&file, &[]);
    let mut c = Nbd::connect(server.addr()).expect("connect");

    let a = random_bytes(100_000, 24);
    assert_eq!(c.write(12_345, &a, 0).expect("io"), 0);
    let b = random_bytes(64 * 1024, 25);
    assert_eq!(c.write(2 * MIB, &b, CMD_FLAG_FUA).expect("io"), 0, "FUA write");
    assert_eq!(c.flush().expect("io"), 0, "flush");
    assert_eq!(c.read(12_345, a.len() as u32).expect("io").expect("read"), a);

    let mut expected = original.clone();
    expected[12_345..12_345 + a.len()].copy_from_slice(&a);
    expected[2 * MIB as usize..2 * MIB as usize + b.len()].copy_from_slice(&b);
    assert_file_range(&file, 0, &expected, "after two writes");
    assert_eq!(file_len(&file), size, "writes changed the file size");
}

#[test]
fn trim_and_write_zeroes_read_back_zero_and_trim_punches() {
    let size = 4 * MIB;
    let (_dir, file) = served_random("trim", size, 26);
    let server = Server::start(&file, &[]);
    let mut c = Nbd::connect(server.addr()).expect("connect");
    assert!(c.flags & TF_SEND_TRIM != 0 && c.flags & TF_SEND_WRITE_ZEROES != 0, "flags {:#x}", c.flags);
    let before = allocated_bytes(&file);

    assert_eq!(c.trim(MIB, MIB as u32).expect("io"), 0, "trim");
    assert_eq!(c.write_zeroes(2 * MIB, 64 * 1024, 0).expect("io"), 0, "write_zeroes");
    assert_eq!(c.write_zeroes(3 * MIB, 64 * 1024, CMD_FLAG_NO_HOLE).expect("io"), 0, "write_zeroes NO_HOLE");
    assert_eq!(c.flush().expect("io"), 0);

    assert_eq!(c.read(MIB, MIB as u32).expect("io").expect("read"), vec![0u8; MIB as usize]);
    assert_file_range(&file, MIB, &vec![0u8; MIB as usize], "trimmed range");
    assert_file_range(&file, 2 * MIB, &[0u8; 64 * 1024], "write_zeroes range");
    assert_file_range(&file, 3 * MIB, &[0u8; 64 * 1024], "write_zeroes NO_HOLE range");
    let after = allocated_bytes(&file);
    assert!(
        after + MIB - 64 * KIB <= before,
        "TRIM of 1 MiB did not punch a hole: allocated {before} -> {after}"
    );
}

#[test]
fn out_of_range_read_is_einval_and_connection_still_works() {
    let size = MIB;
    let (_dir, file) = served_random("oob-read", size, 27);
    let server = Server::start(&file, &[]);
    let mut c = Nbd::connect(server.addr()).expect("connect");

    assert_eq!(c.read(size, 512).expect("io"), Err(EINVAL), "read at the end");
    assert_eq!(c.read(size - 256, 512).expect("io"), Err(EINVAL), "read straddling the end");
    assert_eq!(c.read(u64::MAX - 100, 512).expect("io"), Err(EINVAL), "read with offset overflow");
    let got = c.read(0, 4096).expect("io").expect("read after errors");
    assert_eq!(got, read_at(&file, 0, 4096));
}

#[test]
fn write_past_end_is_enospc_and_connection_still_works() {
    let size = MIB;
    let (_dir, file) = served_random("oob-write", size, 28);
    let original = read_at(&file, 0, size as usize);
    let server = Server::start(&file, &[]);
    let mut c = Nbd::connect(server.addr()).expect("connect");

    let payload = random_bytes(4096, 29);
    assert_eq!(c.write(size, &payload, 0).expect("io"), ENOSPC, "write at the end");
    assert_eq!(c.write(size - 2048, &payload, 0).expect("io"), ENOSPC, "write straddling the end");
    assert_eq!(c.write(10 * size, &payload, 0).expect("io"), ENOSPC, "write far past the end");
    assert_eq!(c.write_zeroes(size, 4096, 0).expect("io"), ENOSPC, "write_zeroes past the end");
    // The payloads were consumed: the stream is still in sync.
    let got = c.read(0, 4096).expect("io").expect("read after ENOSPC");
    assert_eq!(got, original[..4096]);
    assert_eq!(c.write(0, &payload, 0).expect("io"), 0, "in-range write after ENOSPC");
    assert_eq!(file_len(&file), size, "file grew");
    assert_file_range(&file, size - 2048, &original[size as usize - 2048..], "tail");
}

#[test]
fn unknown_command_is_einval_and_connection_still_works() {
    let (_dir, file) = served_random("unknown-cmd", MIB, 30);
    let server = Server::start(&file, &[]);
    let mut c = Nbd::connect(server.addr()).expect("connect");
    assert_eq!(c.command(99, 0, 0, 0).expect("io"), EINVAL, "command type 99");
    assert_eq!(c.command(99, 0, 4096, 512).expect("io"), EINVAL, "command type 99 with a length");
    let got = c.read(0, 512).expect("io").expect("read after unknown command");
    assert_eq!(got, read_at(&file, 0, 512));
}

#[test]
fn two_gib_read_is_refused_and_server_survives() {
    let (_dir, file) = served_random("huge-read", MIB, 31);
    let mut server = Server::start(&file, &[]);
    let mut c = Nbd::connect(server.addr()).expect("connect");
    let cookie = c.cookie();
    c.send_request(0, CMD_READ, cookie, 0, 0x8000_0000).expect("send");
    match c.read_reply() {
        Ok(Reply::Simple { error, cookie: k }) => {
            assert_eq!(k, cookie);
            assert_ne!(error, 0, "a 2 GiB read on a 1 MiB export succeeded");
            // An error reply leaves the connection usable.
            let got = c.read(0, 512).expect("io").expect("read after refused 2 GiB read");
            assert_eq!(got, read_at(&file, 0, 512));
        }
        Ok(other) => panic!("unexpected reply {other:?}"),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
            ),
            "neither an error reply nor a close: {e}"
        ),
    }
    server.assert_alive("after a 2 GiB read request");
    let mut c2 = Nbd::connect(server.addr()).expect("new connection");
    assert!(c2.read(0, 512).expect("io").is_ok());
}

#[test]
fn oversized_write_header_never_buffers_whole_and_server_survives() {
    let (_dir, file) = served_random("huge-write", MIB, 32);
    let original = read_at(&file, 0, MIB as usize);
    let mut server = Server::start(&file, &[]);
    let mut c = Nbd::connect(server.addr()).expect("connect");
    let cookie = c.cookie();
    c.send_request(0, CMD_WRITE, cookie, 0, 0xFFFF_FFF0).expect("send");
    let _ = c.sock.write_all(&vec![0x5a; MIB as usize]);
    let _ = c.sock.shutdown(Shutdown::Write);
    // Whatever it answered (an error, or nothing before closing), it must close the stream.
    let closed = wait_closed(&mut c.sock, IO_TIMEOUT);
    assert!(closed.is_ok(), "connection not closed after a 4 GiB write header and EOF: {closed:?}");
    server.assert_alive("after a 4 GiB write header");
    let mut c2 = Nbd::connect(server.addr()).expect("new connection");
    assert_eq!(c2.read(0, 4096).expect("io").expect("read"), original[..4096]);
    assert_file_range(&file, 0, &original, "file after refused oversized write");
}

/// As the original flexnbd (and its acceptance tests): EINVAL with the request's cookie, then
/// the close, also with structured replies on (the reply is simple: the command is unknown).
#[test]
fn bad_request_magic_gets_einval_with_its_cookie_then_closes() {
    let (_dir, file) = served_random("bad-magic", MIB, 33);
    let mut server = Server::start(&file, &[]);
    for structured in [false, true] {
        let mut c =
            if structured { Nbd::connect_structured(server.addr()) } else { Nbd::connect(server.addr()) }
                .expect("connect");
        let req = Nbd::request_bytes_magic(0x1234_5678, 0, CMD_READ, 0xc0ffee, 0, 512);
        c.sock.write_all(&req).expect("send");
        match c.read_reply() {
            Ok(Reply::Simple { error, cookie }) => {
                assert_eq!((error, cookie), (EINVAL, 0xc0ffee), "structured={structured}")
            }
            other => panic!("structured={structured}: no EINVAL reply to a bad magic: {other:?}"),
        }
        let got = wait_closed(&mut c.sock, Duration::from_secs(5));
        assert_eq!(got, Ok(0), "structured={structured}: nothing more, then the close");
    }
    let mut c = Nbd::connect(server.addr()).expect("connect");
    let req = Nbd::request_bytes_magic(0x1234_5678, 0, CMD_READ, 1, 0, 512);
    c.sock.write_all(&req).expect("send");
    let got = wait_closed(&mut c.sock, Duration::from_secs(5));
    assert!(got.is_ok(), "bad magic did not close the connection: {got:?}");
    server.assert_alive("after a bad request magic");
    let mut c2 = Nbd::connect(server.addr()).expect("new connection");
    assert!(c2.read(0, 512).expect("io").is_ok());
}

#[test]
fn write_cut_mid_payload_changes_nothing() {
    let size = MIB;
    let (_dir, file) = served_random("cut-write", size, 34);
    let original = read_at(&file, 0, size as usize);
    let mut server = Server::start(&file, &[]);
    {
        let mut c = Nbd::connect(server.addr()).expect("connect");
        let cookie = c.cookie();
        c.send_request(0, CMD_WRITE, cookie, 0, 64 * 1024).expect("header");
        c.sock.write_all(&[0xee; 32 * 1024]).expect("half the payload");
        c.sock.flush().ok();
        let _ = c.sock.shutdown(Shutdown::Both);
    }
    // The server must notice the close and drop the partial request; poll the file for a while
    // (a partial write would show up within this bound) and read it back over a new connection.
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        assert_file_range(&file, 0, &original[..64 * 1024], "after a cut write");
        std::thread::sleep(Duration::from_millis(50));
    }
    server.assert_alive("after a cut write");
    let mut c2 = Nbd::connect(server.addr()).expect("new connection");
    assert_eq!(c2.read(0, 64 * 1024).expect("io").expect("read"), original[..64 * 1024]);
    assert_file_range(&file, 0, &original, "whole file after a cut write");
}

#[test]
fn idle_half_open_connections_do_not_delay_a_real_client() {
    let (_dir, file) = served_random("idle", MIB, 35);
    let mut server = Server::start(&file, &[]);
    let mut idle: Vec<TcpStream> = Vec::with_capacity(300);
    for i in 0..300 {
        let s = TcpStream::connect_timeout(&server.addr(), Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("idle connection {i}: {e}"));
        idle.push(s);
    }
    let t0 = Instant::now();
    let mut c = Nbd::connect(server.addr()).expect("real client handshake");
    let got = c.read(0, 4096).expect("io").expect("read");
    let took = t0.elapsed();
    assert_eq!(got, read_at(&file, 0, 4096));
    assert!(took < Duration::from_secs(2), "handshake + read took {took:?} with 300 idle connections");
    server.assert_alive("with 300 idle connections");
    drop(idle);
}

#[test]
fn sixty_four_pipelined_reads_get_matching_cookies() {
    let size = 4 * MIB;
    let (_dir, file) = served_random("pipeline", size, 36);
    let content = read_at(&file, 0, size as usize);
    let server = Server::start(&file, &[]);
    let mut c = Nbd::connect(server.addr()).expect("connect");

    let mut pending = PendingReads::new();
    let mut batch = Vec::new();
    for i in 0..64u64 {
        // Distinct, full-width cookies; lengths vary so a mixed-up reply shows.
        let cookie = 0xC0DE_0000_0000_0000 | (i * 0x0101_0101 + 7);
        let off = i * 64 * KIB + i;
        let len = (32 * 1024 + i * 100) as u32;
        pending.insert(cookie, (off, len));
        batch.extend_from_slice(&Nbd::request_bytes(0, CMD_READ, cookie, off, len));
    }
    c.sock.write_all(&batch).expect("send 64 requests at once");

    let mut seen = HashSet::new();
    for _ in 0..64 {
        match c.read_reply().expect("reply") {
            Reply::Simple { error, cookie } => {
                assert_eq!(error, 0, "cookie {cookie:#x}");
                let (off, len) =
                    *pending.get(&cookie).unwrap_or_else(|| panic!("unknown cookie {cookie:#x}"));
                assert!(seen.insert(cookie), "cookie {cookie:#x} answered twice");
                let data = c.read_data(len as usize).expect("data");
                assert_eq!(data, content[off as usize..(off + len as u64) as usize], "cookie {cookie:#x}");
            }
            other => panic!("structured reply without STRUCTURED_REPLY: {other:?}"),
        }
    }
    assert_eq!(seen.len(), 64);
}

#[test]
fn write_to_read_only_export_is_eperm() {
    let size = MIB;
    let (_dir, file) = served_random("ro", size, 37);
    let original = read_at(&file, 0, size as usize);
    let server = Server::start(&file, &["--read-only"]);
    let mut c = Nbd::connect(server.addr()).expect("connect");
    assert!(c.flags & TF_READ_ONLY != 0, "READ_ONLY not advertised: {:#x}", c.flags);

    assert_eq!(c.write(0, &[1u8; 4096], 0).expect("io"), EPERM, "write");
    assert_eq!(c.trim(0, 4096).expect("io"), EPERM, "trim");
    assert_eq!(c.write_zeroes(0, 4096, 0).expect("io"), EPERM, "write_zeroes");
    let got = c.read(0, 4096).expect("io").expect("read still works");
    assert_eq!(got, original[..4096]);
    assert_file_range(&file, 0, &original, "read-only file");
}

#[test]
fn zero_writes_keep_1gib_sparse_file_sparse() {
    let dir = TempDir::new("zero-sparse");
    let file = dir.join("big.img");
    make_sparse_file(&file, GIB);
    let server = Server::start(&file, &[]);
    let mut c = Nbd::connect(server.addr()).expect("connect");
    let zeros = vec![0u8; MIB as usize];
    // 64 MiB of plain WRITEs whose payload is all zero, spread over the export.
    for i in 0..64u64 {
        let off = i * 16 * MIB;
        assert_eq!(c.write(off, &zeros, 0).expect("io"), 0, "zero write at {off}");
    }
    assert_eq!(c.flush().expect("io"), 0);
    let used = allocated_bytes(&file);
    assert!(used <= 256 * KIB, "zero writes allocated {used} bytes in a sparse 1 GiB file");
    assert_eq!(file_len(&file), GIB);
    assert_eq!(c.read(16 * MIB, 4096).expect("io").expect("read"), vec![0u8; 4096]);
}

#[test]
fn disc_closes_connection_after_in_flight_requests() {
    let (_dir, file) = served_random("disc", MIB, 38);
    let mut server = Server::start(&file, &[]);
    let mut c = Nbd::connect(server.addr()).expect("connect");
    let data = random_bytes(8192, 39);
    let cookie = c.cookie();
    c.send_write(0, cookie, 4096, &data).expect("write");
    c.disconnect().expect("DISC");
    // The write in flight before DISC is answered, then the server closes.
    assert_eq!(c.read_status(cookie).expect("reply to the write before DISC"), 0);
    wait_closed(&mut c.sock, Duration::from_secs(5)).expect("closed after DISC");
    assert_file_range(&file, 4096, &data, "write before DISC");
    server.assert_alive("after DISC");
}

#[test]
fn structured_out_of_range_read_and_block_status_get_einval_and_connection_still_works() {
    let size = MIB;
    let (_dir, file) = served_random("structured-oob", size, 41);
    let server = Server::start(&file, &[]);
    let mut c = Nbd::connect_structured(server.addr()).expect("connect with structured replies");
    assert_eq!(c.read(size - 256, 512).expect("io"), Err(EINVAL), "structured read past the end");
    assert_eq!(c.block_status(size, 4096, 0).expect("io"), Err(EINVAL), "block status past the end");
    let got = c.read(0, 8192).expect("io").expect("structured read after errors");
    assert_eq!(got, read_at(&file, 0, 8192));
}

#[test]
fn write_over_the_maximum_is_refused_without_touching_the_file() {
    let size = 40 * MIB;
    let dir = TempDir::new("over-max-write");
    let file = dir.join("disk.img");
    make_sparse_file(&file, size);
    let mut server = Server::start(&file, &[]);
    let mut c = Nbd::connect(server.addr()).expect("connect");
    // 33 MiB: over the advertised 32 MiB maximum. Either an error reply once the payload has
    // been drained (then the stream is still in sync), or a close.
    let payload = vec![0x77u8; 33 * MIB as usize];
    let cookie = c.cookie();
    let sent = c.send_write(0, cookie, 0, &payload);
    match sent.and_then(|_| c.read_status(cookie)) {
        Ok(error) => {
            assert_ne!(error, 0, "a 33 MiB write was accepted although the maximum is 32 MiB");
            let got = c.read(0, 4096).expect("io").expect("read after the refused write");
            assert_eq!(got, vec![0u8; 4096]);
        }
        Err(e) => eprintln!("connection closed on an oversized write: {e}"),
    }
    server.assert_alive("after a 33 MiB write");
    assert_eq!(allocated_bytes(&file), 0, "the refused write allocated data");
    assert_file_range(&file, 0, &vec![0u8; MIB as usize], "file after a refused write");
}

/// A client that streams big reads faster than it takes the replies keeps its socket full:
/// the server then sends from a disk worker while it goes on reading requests (the offload in
/// `sender`). Replies must still come whole, in a consistent stream, with the right data,
/// while new requests keep arriving as old replies are read.
#[test]
fn streamed_big_reads_behind_a_full_socket_come_back_whole() {
    let size = 24 * MIB;
    let (_dir, file) = served_random("stream", size, 43);
    let content = read_at(&file, 0, size as usize);
    let server = Server::start(&file, &[]);
    let mut c = Nbd::connect(server.addr()).expect("connect");
    let req = |i: u64| {
        let len = MIB + (i % 7) * 4096;
        let off = (i * 3 * MIB / 2) % (size - len);
        (0xABCD_0000 + i, off, len as u32)
    };
    let mut pending = PendingReads::new();
    let mut batch = Vec::new();
    for i in 0..16 {
        let (cookie, off, len) = req(i);
        pending.insert(cookie, (off, len));
        batch.extend_from_slice(&Nbd::request_bytes(0, CMD_READ, cookie, off, len));
    }
    c.sock.write_all(&batch).expect("send reads");
    // Let the socket fill before reading anything.
    std::thread::sleep(Duration::from_millis(300));
    let total = 64;
    let mut next = 16;
    for _ in 0..total {
        match c.read_reply().expect("reply") {
            Reply::Simple { error, cookie } => {
                assert_eq!(error, 0, "cookie {cookie:#x}");
                let (off, len) =
                    pending.remove(&cookie).unwrap_or_else(|| panic!("unexpected cookie {cookie:#x}"));
                let data = c.read_data(len as usize).expect("data");
                assert!(
                    data == content[off as usize..(off + len as u64) as usize],
                    "data of cookie {cookie:#x}"
                );
            }
            other => panic!("structured reply without STRUCTURED_REPLY: {other:?}"),
        }
        if next < total {
            let (cookie, off, len) = req(next);
            pending.insert(cookie, (off, len));
            c.sock.write_all(&Nbd::request_bytes(0, CMD_READ, cookie, off, len)).expect("send read");
            next += 1;
        }
    }
    assert!(pending.is_empty());
    // The connection is still in step: a small read after the stream.
    assert_eq!(c.read(5, 100).expect("io").expect("read"), content[5..105]);
}

#[test]
fn clients_that_never_read_their_replies_do_not_delay_others() {
    let size = 32 * MIB;
    let (_dir, file) = served_random("stuck-readers", size, 42);
    let mut server = Server::start(&file, &[]);
    // Eight clients each ask for 8 x 4 MiB and never read a byte of the answers, so the server's
    // sends to them block on full socket buffers.
    let mut stuck = Vec::new();
    for k in 0..8u64 {
        let mut c = Nbd::connect(server.addr()).expect("connect");
        let mut batch = Vec::new();
        for i in 0..8u64 {
            batch.extend_from_slice(&Nbd::request_bytes(
                0,
                CMD_READ,
                k * 100 + i,
                i * 4 * MIB,
                4 * MIB as u32,
            ));
        }
        c.sock.write_all(&batch).expect("send reads");
        stuck.push(c);
    }
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    let mut c = Nbd::connect(server.addr()).expect("handshake next to stuck readers");
    let got = c.read(MIB, 64 * 1024).expect("io").expect("read");
    let took = t0.elapsed();
    assert_eq!(got, read_at(&file, MIB, 64 * 1024));
    assert!(took < Duration::from_secs(2), "handshake + read took {took:?} next to clients that never read");
    server.assert_alive("next to clients that never read");
    drop(stuck);
}

#[test]
fn zero_length_requests_are_einval_and_leave_hole_punching_on() {
    let size = 4 * MIB;
    let (_dir, file) = served_random("zero-length", size, 43);
    let server = Server::start(&file, &[]);
    let mut c = Nbd::connect(server.addr()).expect("connect");
    // The kernel refuses a zero-length fallocate with EINVAL; that must not read as "this
    // filesystem cannot punch holes" and turn TRIM into a no-op for everyone.
    assert_eq!(c.trim(0, 0).expect("io"), EINVAL, "zero-length trim");
    assert_eq!(c.write_zeroes(0, 0, 0).expect("io"), EINVAL, "zero-length write_zeroes");
    assert_eq!(c.write(0, &[], 0).expect("io"), EINVAL, "zero-length write");
    assert_eq!(c.command(CMD_CACHE, 0, 0, 0).expect("io"), EINVAL, "zero-length cache");
    assert_eq!(c.read(0, 0).expect("io"), Err(EINVAL), "zero-length read");

    let before = allocated_bytes(&file);
    assert_eq!(c.trim(MIB, MIB as u32).expect("io"), 0, "trim");
    assert_eq!(c.flush().expect("io"), 0);
    let after = allocated_bytes(&file);
    assert!(
        after + MIB - 64 * KIB <= before,
        "TRIM after zero-length requests did not punch: {before} -> {after}"
    );

    // With structured replies a zero-length READ would need a data chunk shorter than allowed.
    let mut s = Nbd::connect_structured(server.addr()).expect("connect with structured replies");
    assert_eq!(s.read(0, 0).expect("io"), Err(EINVAL), "structured zero-length read");
    assert_eq!(s.read(0, 4096).expect("io").expect("read after"), read_at(&file, 0, 4096));
}

#[test]
fn flags_that_do_not_belong_to_a_command_are_einval() {
    let (_dir, file) = served_random("cmd-flags", MIB, 44);
    let server = Server::start(&file, &[]);
    let mut c = Nbd::connect(server.addr()).expect("connect");
    assert_eq!(c.command(CMD_READ, CMD_FLAG_REQ_ONE, 0, 512).expect("io"), EINVAL, "READ with REQ_ONE");
    assert_eq!(
        c.command(CMD_READ, CMD_FLAG_DF, 0, 512).expect("io"),
        EINVAL,
        "DF without structured replies"
    );
    assert_eq!(c.write(0, &[1u8; 512], CMD_FLAG_NO_HOLE).expect("io"), EINVAL, "WRITE with NO_HOLE");
    assert_eq!(c.command(CMD_TRIM, CMD_FLAG_FAST_ZERO, 0, 4096).expect("io"), EINVAL, "TRIM with FAST_ZERO");
    assert_eq!(c.command(CMD_FLUSH, CMD_FLAG_NO_HOLE, 0, 0).expect("io"), EINVAL, "FLUSH with NO_HOLE");
    // FUA goes with anything; the refused WRITE's payload was skipped and changed nothing.
    assert_eq!(c.command(CMD_FLUSH, CMD_FLAG_FUA, 0, 0).expect("io"), 0, "FLUSH with FUA");
    assert_eq!(
        c.write_zeroes(8192, 4096, CMD_FLAG_NO_HOLE | CMD_FLAG_FUA).expect("io"),
        0,
        "WRITE_ZEROES flags"
    );
    let original = read_at(&file, 0, 512);
    assert_ne!(original, vec![1u8; 512]);
    assert_eq!(c.read(0, 512).expect("io").expect("read after"), original, "the refused WRITE landed");
    let mut s = Nbd::connect_structured(server.addr()).expect("connect with structured replies");
    let cookie = s.cookie();
    s.send_request(CMD_FLAG_DF, CMD_READ, cookie, 0, 4096).expect("send READ with DF");
    let got = s.read_read_reply(cookie, 0, 4096).expect("io").expect("structured READ with DF");
    assert_eq!(got, read_at(&file, 0, 4096), "structured READ with DF");
}
