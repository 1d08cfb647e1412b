//! Client side of transmission: simple replies and structured reply chunks from a server.
//! parse_reply_header, then the chunk payload through the parser its type calls for; then the
//! same bytes as extended reply chunks (parse_ext_reply_header, BLOCK_STATUS_EXT payloads).
#![no_main]

use flexnbd::proto::transmission::{
    CHUNK_HEADER_LEN, EXT_REPLY_LEN, MAX_CHUNK_LEN, ReadChunk, ReplyHeader, SIMPLE_REPLY_LEN,
    encode_block_status, encode_block_status_ext, encode_chunk_header, encode_error_chunk, encode_ext_done,
    encode_ext_error_chunk, encode_ext_header, encode_simple_reply, parse_block_status,
    parse_block_status_ext, parse_error_chunk, parse_ext_reply_header, parse_offset_data, parse_offset_hole,
    parse_reply_header, read_chunk,
};
use flexnbd::proto::{
    CHUNK_BLOCK_STATUS, CHUNK_BLOCK_STATUS_EXT, CHUNK_ERROR, CHUNK_ERROR_OFFSET, CHUNK_NONE,
    CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE, REPLY_FLAG_DONE,
};
use libfuzzer_sys::fuzz_target;

fn check_payload(flags: u16, kind: u16, cookie: u64, frame: &[u8]) {
    let data = &frame[CHUNK_HEADER_LEN..];
    // A client's view of the chunk as part of a READ; the request's range comes from the cookie
    // so that both in- and out-of-range chunks are tried.
    let (offset, len) = (cookie >> 20, cookie & 0xf_ffff);
    match read_chunk(kind, data, offset, len) {
        Ok(ReadChunk::Data { at, data: d }) => assert!(at + d.len() <= len as usize && !d.is_empty()),
        Ok(ReadChunk::Hole { at, len: n }) => assert!(at + n <= len as usize && n > 0),
        _ => {}
    }
    match kind {
        CHUNK_ERROR | CHUNK_ERROR_OFFSET => {
            if let Ok((error, msg)) = parse_error_chunk(data) {
                assert!(6 + msg.len() <= data.len());
                assert_eq!(msg, &data[6..6 + msg.len()]);
                // encode_error_chunk writes a final ERROR chunk with nothing after the message.
                if kind == CHUNK_ERROR
                    && flags == REPLY_FLAG_DONE
                    && data.len() == 6 + msg.len()
                    && msg.len() <= 4096
                    && let Ok(text) = std::str::from_utf8(msg)
                {
                    let mut enc = Vec::new();
                    encode_error_chunk(&mut enc, cookie, error, text);
                    assert_eq!(enc, frame, "encode_error_chunk(parse_error_chunk(x)) != x");
                }
            }
        }
        CHUNK_OFFSET_DATA => {
            if let Ok((off, d)) = parse_offset_data(data) {
                assert_eq!(off.to_be_bytes(), data[..8]);
                assert_eq!(d, &data[8..]);
            }
        }
        CHUNK_OFFSET_HOLE => {
            if let Ok((off, len)) = parse_offset_hole(data) {
                assert_eq!(off.to_be_bytes(), data[..8]);
                assert_eq!(len.to_be_bytes(), data[8..12]);
            }
        }
        CHUNK_BLOCK_STATUS => {
            if let Ok((ctx, ext)) = parse_block_status(data) {
                assert_eq!(data.len(), 4 + 8 * ext.len());
                if flags == REPLY_FLAG_DONE {
                    let mut enc = Vec::new();
                    encode_block_status(&mut enc, cookie, ctx, &ext);
                    assert_eq!(enc, frame, "encode_block_status(parse_block_status(x)) != x");
                }
            }
        }
        _ => {}
    }
}

fuzz_target!(|buf: &[u8]| {
    structured(buf);
    extended(buf);
});

fn structured(buf: &[u8]) {
    let mut pos = 0;
    loop {
        let rest = &buf[pos..];
        let (h, used) = match parse_reply_header(rest) {
            Ok(Some(h)) => h,
            Ok(None) => {
                assert!(rest.len() < CHUNK_HEADER_LEN);
                break;
            }
            Err(_) => break,
        };
        match h {
            ReplyHeader::Simple { error, cookie } => {
                assert_eq!(used, SIMPLE_REPLY_LEN);
                assert_eq!(encode_simple_reply(error, cookie), rest[..used], "simple reply round-trip");
                // The length of any read data is only known to the requester; go on with the next
                // header (the captures' read replies are structured).
                pos += used;
            }
            ReplyHeader::Chunk { flags, kind, cookie, len } => {
                assert_eq!(used, CHUNK_HEADER_LEN);
                assert!(len <= MAX_CHUNK_LEN);
                assert_eq!(h.cookie(), cookie);
                assert_eq!(
                    encode_chunk_header(flags, kind, cookie, len),
                    rest[..used],
                    "chunk header round-trip"
                );
                let end = used + len as usize;
                if rest.len() < end {
                    break;
                }
                check_payload(flags, kind, cookie, &rest[..end]);
                pos += end;
            }
        }
    }
}

/// Extended chunk payloads: the compact types keep their payloads (`check_payload` on a
/// re-framed copy), plus NONE and BLOCK_STATUS_EXT.
fn check_ext_payload(flags: u16, kind: u16, cookie: u64, offset: u64, frame: &[u8]) {
    let data = &frame[EXT_REPLY_LEN..];
    match kind {
        CHUNK_NONE if flags == REPLY_FLAG_DONE && data.is_empty() => {
            assert_eq!(encode_ext_done(cookie, offset), frame, "encode_ext_done round-trip");
        }
        CHUNK_ERROR if flags == REPLY_FLAG_DONE => {
            if let Ok((error, msg)) = parse_error_chunk(data)
                && data.len() == 6 + msg.len()
                && let Ok(text) = std::str::from_utf8(msg)
            {
                let mut enc = Vec::new();
                encode_ext_error_chunk(&mut enc, cookie, offset, error, text);
                assert_eq!(enc, frame, "encode_ext_error_chunk(parse_error_chunk(x)) != x");
            }
        }
        CHUNK_BLOCK_STATUS_EXT => {
            if let Ok((ctx, ext)) = parse_block_status_ext(data) {
                assert!(!ext.is_empty());
                assert_eq!(data.len(), 8 + 16 * ext.len());
                let count = u32::from_be_bytes([data[4], data[5], data[6], data[7]]) as usize;
                let padded = data[8..].chunks_exact(16).all(|c| c[8..12] == [0; 4]);
                if flags == REPLY_FLAG_DONE && count == ext.len() && padded {
                    let mut enc = Vec::new();
                    encode_block_status_ext(&mut enc, cookie, offset, ctx, &ext);
                    assert_eq!(enc, frame, "encode_block_status_ext(parse_block_status_ext(x)) != x");
                }
            }
        }
        _ => {
            // The same payload under a compact header goes through the compact checks.
            if let Ok(len) = u32::try_from(data.len()) {
                let mut f = encode_chunk_header(flags, kind, cookie, len).to_vec();
                f.extend_from_slice(data);
                check_payload(flags, kind, cookie, &f);
            }
        }
    }
}

fn extended(buf: &[u8]) {
    let mut pos = 0;
    loop {
        let rest = &buf[pos..];
        let (h, used) = match parse_ext_reply_header(rest) {
            Ok(Some(h)) => h,
            Ok(None) => {
                assert!(rest.len() < EXT_REPLY_LEN);
                break;
            }
            Err(_) => break,
        };
        assert_eq!(used, EXT_REPLY_LEN);
        assert!(h.len <= u64::from(MAX_CHUNK_LEN));
        assert_eq!(
            encode_ext_header(h.flags, h.kind, h.cookie, h.offset, h.len),
            rest[..used],
            "extended header round-trip"
        );
        let end = used + h.len as usize;
        if rest.len() < end {
            break;
        }
        check_ext_payload(h.flags, h.kind, h.cookie, h.offset, &rest[..end]);
        pos += end;
    }
}
