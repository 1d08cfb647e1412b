//! Negotiation over a raw socket: the oldstyle hello, the fixed-newstyle greeting and options
//! (LIST, INFO, GO, EXPORT_NAME, STRUCTURED_REPLY, SET_META_CONTEXT, unknown and oversized ones).

mod common;

use common::*;
use std::io::Write;
use std::time::Duration;

fn served_random(tag: &str, size: u64, seed: u64) -> (TempDir, std::path::PathBuf) {
    let dir = TempDir::new(tag);
    let file = dir.join("disk.img");
    make_random_file(&file, size, seed);
    (dir, file)
}

#[test]
fn oldstyle_hello_is_152_bytes_then_transmission() {
    let size = MIB + 512;
    let (_dir, file) = served_random("oldstyle", size, 11);
    let server = Server::start(&file, &["--oldstyle"]);

    let mut s = tcp_connect(server.addr()).expect("connect");
    let hello = read_oldstyle_hello(&mut s).expect("152-byte oldstyle hello");
    assert_eq!(hello.raw.len(), 152);
    assert_eq!(hello.size, size, "oldstyle hello size");
    assert!(hello.flags & u32::from(TF_HAS_FLAGS) != 0, "flags {:#x} lack HAS_FLAGS", hello.flags);
    assert!(
        hello.raw[28..].iter().all(|&b| b == 0),
        "the last 124 bytes of the hello are not zero: {:?}",
        &hello.raw[28..]
    );

    // No option haggling: requests go straight after the hello.
    let mut c = Nbd::from_stream(s, hello.size, hello.flags as u16);
    let got = c.read(4096, 8192).expect("io").expect("read ok");
    assert_eq!(got, read_at(&file, 4096, 8192));
}

#[test]
fn newstyle_greeting_is_fixed_newstyle_with_no_zeroes() {
    let (_dir, file) = served_random("greeting", MIB, 12);
    let server = Server::start(&file, &[]);
    let n = Negotiation::start(server.addr()).expect("greeting");
    assert_eq!(
        n.server_flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES),
        FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
        "handshake flags {:#x}",
        n.server_flags
    );
}

#[test]
fn opt_list_lists_exactly_one_export() {
    let (_dir, file) = served_random("list", MIB, 13);
    let server = Server::start(&file, &[]);
    let mut n = Negotiation::start(server.addr()).expect("greeting");
    let replies = n.list().expect("LIST");
    let servers: Vec<_> = replies.iter().filter(|r| r.typ == REP_SERVER).collect();
    assert_eq!(servers.len(), 1, "LIST replies: {replies:?}");
    assert!(servers[0].server_name().is_some(), "malformed SERVER reply");
    assert_eq!(replies.last().unwrap().typ, REP_ACK, "LIST replies: {replies:?}");
    // Still negotiating: GO works afterwards.
    let (mut c, _) = n.go("", &[]).expect("GO after LIST");
    assert_eq!(c.size, MIB);
    assert!(c.read(0, 512).expect("io").is_ok());
}

#[test]
fn opt_info_then_go_return_info_export_with_right_size() {
    let size = 3 * MIB + 4096;
    let (_dir, file) = served_random("info-go", size, 14);
    let server = Server::start(&file, &[]);
    let mut n = Negotiation::start(server.addr()).expect("greeting");

    let info = n.info("", &[INFO_BLOCK_SIZE]).expect("INFO");
    assert_eq!(info.last().unwrap().typ, REP_ACK, "INFO replies: {info:?}");
    let (isize, iflags) = info
        .iter()
        .find_map(|r| r.info_export())
        .unwrap_or_else(|| panic!("INFO without INFO_EXPORT: {info:?}"));
    assert_eq!(isize, size);
    assert!(iflags & TF_HAS_FLAGS != 0, "flags {iflags:#x}");
    assert!(iflags & TF_READ_ONLY == 0, "flags {iflags:#x}");
    if let Some((min, pref, max)) = info.iter().find_map(|r| r.info_block_size()) {
        assert!(min >= 1 && min <= pref && pref <= max, "block sizes {min} {pref} {max}");
    }

    // INFO leaves us negotiating; GO gives the same answer and enters transmission.
    let (mut c, go) = n.go("", &[]).expect("GO");
    let (gsize, gflags) = go.iter().find_map(|r| r.info_export()).unwrap();
    assert_eq!((gsize, gflags), (isize, iflags));
    let got = c.read(size - 4096, 4096).expect("io").expect("read ok");
    assert_eq!(got, read_at(&file, size - 4096, 4096));
}

#[test]
fn opt_export_name_enters_transmission_without_zero_padding() {
    let size = 2 * MIB;
    let (_dir, file) = served_random("export-name", size, 15);
    let server = Server::start(&file, &[]);
    let n = Negotiation::start(server.addr()).expect("greeting");
    // NO_ZEROES agreed: if the server still sent 124 zero bytes, the next reply would not parse.
    let mut c = n.export_name("").expect("EXPORT_NAME");
    assert_eq!(c.size, size);
    assert!(c.flags & TF_HAS_FLAGS != 0);
    let got = c.read(0, 4096).expect("io").expect("read ok");
    assert_eq!(got, read_at(&file, 0, 4096));
}

#[test]
fn opt_export_name_without_no_zeroes_pads_124_bytes() {
    let size = MIB;
    let (_dir, file) = served_random("export-name-zeroes", size, 16);
    let server = Server::start(&file, &[]);
    let n = Negotiation::start_with(server.addr(), CLIENT_FIXED_NEWSTYLE).expect("greeting");
    let mut c = n.export_name("").expect("EXPORT_NAME with padding");
    assert_eq!(c.size, size);
    let got = c.read(0, 512).expect("io").expect("read ok");
    assert_eq!(got, read_at(&file, 0, 512));
}

#[test]
fn unknown_option_gets_err_unsup_and_negotiation_continues() {
    let (_dir, file) = served_random("unknown-opt", MIB, 17);
    let server = Server::start(&file, &[]);
    let mut n = Negotiation::start(server.addr()).expect("greeting");
    let r = n.option(0x00de_ad42, b"whatever").expect("reply to unknown option");
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].typ, REP_ERR_UNSUP, "reply type {:#x}", r[0].typ);
    // STARTTLS is unsupported too, until TLS exists.
    let r = n.option(OPT_STARTTLS, &[]).expect("reply to STARTTLS");
    assert_eq!(r.last().unwrap().typ, REP_ERR_UNSUP, "{r:?}");
    let (mut c, _) = n.go("", &[]).expect("GO after unsupported options");
    assert!(c.read(0, 512).expect("io").is_ok());
}

#[test]
fn option_with_huge_length_is_refused_and_server_survives() {
    let (_dir, file) = served_random("huge-opt", MIB, 18);
    let mut server = Server::start(&file, &[]);
    let mut n = Negotiation::start(server.addr()).expect("greeting");
    n.send_option_header(OPT_GO, 0xFFFF_FFFF).expect("send");
    // Some bytes of "data" follow, as a real peer would start sending them.
    let _ = n.sock.write_all(&[0u8; 4096]);
    // Either an error reply (then usually a close) or a close; never a success.
    match n.read_reply() {
        Ok(r) => assert!(r.is_error(), "huge option got a non-error reply {r:?}"),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            ),
            "neither an error reply nor a close: {e}"
        ),
    }
    server.assert_alive("after a 4 GiB option length");
    let mut c = Nbd::connect(server.addr()).expect("a new client after the huge option");
    assert!(c.read(0, 512).expect("io").is_ok());
}

#[test]
fn structured_reply_and_base_allocation_block_status() {
    let dir = TempDir::new("structured");
    let file = dir.join("sparse.img");
    let size = 4 * MIB;
    make_sparse_file(&file, size);
    let data = random_bytes(64 * KIB as usize, 19);
    write_at(&file, MIB, &data);
    let server = Server::start(&file, &[]);

    let mut n = Negotiation::start(server.addr()).expect("greeting");
    let r = n.structured_reply().expect("STRUCTURED_REPLY");
    assert_eq!(r.last().unwrap().typ, REP_ACK, "{r:?}");
    let r = n.set_meta_context("", &["base:allocation"]).expect("SET_META_CONTEXT");
    assert_eq!(r.last().unwrap().typ, REP_ACK, "{r:?}");
    assert_eq!(n.meta_contexts.len(), 1, "{r:?}");
    assert_eq!(n.meta_contexts[0].1, "base:allocation");
    let (mut c, _) = n.go("", &[]).expect("GO");

    // A structured READ: never a simple reply, data identical.
    let cookie = c.cookie();
    c.send_request(0, CMD_READ, cookie, MIB - 4096, 64 * 1024).expect("send");
    // Every reply to it is a chunk, up to one flagged DONE.
    let mut done = false;
    for _ in 0..1000 {
        match c.read_reply().expect("reply to structured READ") {
            Reply::Simple { .. } => panic!("simple reply to READ after STRUCTURED_REPLY"),
            Reply::Chunk { flags, cookie: k, .. } => {
                assert_eq!(k, cookie);
                if flags & REPLY_FLAG_DONE != 0 {
                    done = true;
                    break;
                }
            }
        }
    }
    assert!(done, "no DONE chunk");
    // The same read reassembled by the helper (OFFSET_DATA and OFFSET_HOLE chunks).
    let mut expected = vec![0u8; 4096];
    expected.extend_from_slice(&data[..60 * 1024]);
    let got = c.read(MIB - 4096, 64 * 1024).expect("io").expect("read ok");
    assert_eq!(got, expected);

    // BLOCK_STATUS over the whole export: hole+zero, data, hole+zero.
    let ext = c.block_status(0, size as u32, 0).expect("io").expect("block status ok");
    let total: u64 = ext.iter().map(|e| u64::from(e.0)).sum();
    assert!(total > 0 && total <= size, "extents {ext:?}");
    let state_at = |at: u64| -> Option<u32> {
        let mut pos = 0u64;
        for (len, st) in &ext {
            if at < pos + u64::from(*len) {
                return Some(*st);
            }
            pos += u64::from(*len);
        }
        None
    };
    assert_eq!(state_at(0), Some(STATE_HOLE | STATE_ZERO), "{ext:?}");
    assert_eq!(state_at(MIB), Some(0), "{ext:?}");
    assert_eq!(state_at(MIB + 64 * KIB - 1), Some(0), "{ext:?}");
    if total > 2 * MIB {
        assert_eq!(state_at(2 * MIB), Some(STATE_HOLE | STATE_ZERO), "{ext:?}");
    }
}

#[test]
fn opt_abort_is_acknowledged_or_closed() {
    let (_dir, file) = served_random("abort", MIB, 20);
    let mut server = Server::start(&file, &[]);
    let mut n = Negotiation::start(server.addr()).expect("greeting");
    n.send_option(OPT_ABORT, &[]).expect("send ABORT");
    if let Ok(r) = n.read_reply() {
        assert_eq!(r.typ, REP_ACK, "ABORT reply {r:?}");
    }
    wait_closed(&mut n.sock, Duration::from_secs(5)).expect("closed after ABORT");
    server.assert_alive("after ABORT");
}

#[test]
fn df_is_offered_only_with_structured_replies() {
    let (_dir, file) = served_random("df-flag", MIB, 21);
    let server = Server::start(&file, &[]);
    let simple = Nbd::connect(server.addr()).expect("connect");
    assert_eq!(simple.flags & TF_SEND_DF, 0, "DF without structured replies: flags {:#x}", simple.flags);
    let n = Negotiation::start(server.addr()).expect("greeting");
    let c = n.export_name("").expect("EXPORT_NAME");
    assert_eq!(c.flags & TF_SEND_DF, 0, "DF after a plain EXPORT_NAME: flags {:#x}", c.flags);
    let structured = Nbd::connect_structured(server.addr()).expect("connect with structured replies");
    assert_ne!(
        structured.flags & TF_SEND_DF,
        0,
        "no DF with structured replies: flags {:#x}",
        structured.flags
    );
}

#[test]
fn export_names_longer_than_4096_bytes_are_refused() {
    let (_dir, file) = served_random("long-name", MIB, 22);
    let mut server = Server::start(&file, &[]);
    let long = "x".repeat(4097);
    let mut n = Negotiation::start(server.addr()).expect("greeting");
    let r = n.option(OPT_GO, &Negotiation::info_data(&long, &[])).expect("reply to GO");
    assert!(r.len() == 1 && r[0].typ == REP_ERR_TOO_BIG, "GO with a 4097-byte name: {r:?}");
    // Negotiation goes on; the longest legal name is still fine.
    let (mut c, _) = n.go(&"y".repeat(4096), &[]).expect("GO with a 4096-byte name");
    assert_eq!(c.read(0, 512).expect("io").expect("read"), read_at(&file, 0, 512));

    // EXPORT_NAME cannot be answered with an error: the server hangs up.
    let mut n = Negotiation::start(server.addr()).expect("greeting");
    n.send_option(OPT_EXPORT_NAME, long.as_bytes()).expect("send EXPORT_NAME");
    wait_closed(&mut n.sock, Duration::from_secs(5)).expect("closed after a too-long EXPORT_NAME");
    server.assert_alive("after a too-long export name");
}

#[test]
fn structured_reply_with_data_is_invalid_and_changes_nothing() {
    let (_dir, file) = served_random("sr-data", MIB, 23);
    let server = Server::start(&file, &[]);
    let mut n = Negotiation::start(server.addr()).expect("greeting");
    let r = n.option(OPT_STRUCTURED_REPLY, b"x").expect("reply to STRUCTURED_REPLY with data");
    assert!(r.len() == 1 && r[0].typ == REP_ERR_INVALID, "STRUCTURED_REPLY with data: {r:?}");
    let (mut c, _) = n.go("", &[]).expect("GO");
    assert_eq!(c.flags & TF_SEND_DF, 0, "structured replies are off: flags {:#x}", c.flags);
    assert_eq!(c.read(0, 512).expect("io").expect("simple read"), read_at(&file, 0, 512));
}

/// Option order (doc/proto.md): LIST_META_CONTEXT and SET_META_CONTEXT come after
/// STRUCTURED_REPLY, and earlier ones are answered ERR_INVALID; a SET replaces the selection
/// even when it fails, so BLOCK_STATUS is refused after a failed SET.
#[test]
fn meta_context_options_need_structured_replies_first() {
    let dir = TempDir::new("meta-order");
    let file = dir.join("disk.img");
    make_sparse_file(&file, MIB);
    let server = Server::start(&file, &[]);

    let mut n = Negotiation::start(server.addr()).expect("greeting");
    let meta = Negotiation::meta_context_data("", &["base:allocation"]);
    for opt in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
        let r = n.option(opt, &meta).expect("meta context option before STRUCTURED_REPLY");
        assert_eq!(r.len(), 1, "no context listed before the error: {r:?}");
        assert_eq!(r[0].typ, REP_ERR_INVALID, "option {opt} before STRUCTURED_REPLY: {r:?}");
    }
    assert_eq!(n.structured_reply().expect("STRUCTURED_REPLY").last().unwrap().typ, REP_ACK);
    let r = n.option(OPT_LIST_META_CONTEXT, &meta).expect("LIST_META_CONTEXT");
    assert_eq!(r.last().unwrap().typ, REP_ACK, "{r:?}");
    assert_eq!(r[0].meta_context().map(|m| m.1).as_deref(), Some("base:allocation"), "{r:?}");
    let r = n.set_meta_context("", &["base:allocation"]).expect("SET_META_CONTEXT");
    assert_eq!(r.last().unwrap().typ, REP_ACK, "{r:?}");
    // A malformed SET (a query length beyond the data) fails and clears the selection.
    let mut bad = Negotiation::meta_context_data("", &["base:allocation"]);
    bad.truncate(bad.len() - 3);
    let r = n.option(OPT_SET_META_CONTEXT, &bad).expect("malformed SET_META_CONTEXT");
    assert_eq!(r.last().unwrap().typ, REP_ERR_INVALID, "{r:?}");
    let (mut c, _) = n.go("", &[]).expect("GO");
    assert_eq!(
        c.block_status(0, 4096, 0).expect("io"),
        Err(EINVAL),
        "BLOCK_STATUS after the failed SET that cleared base:allocation"
    );
}
