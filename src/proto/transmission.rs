//! Pure parse/encode of the NBD transmission phase: request headers, simple replies and
//! structured reply chunks (block status, errors, data), for the server and our clients; and
//! their extended forms (NBD_OPT_EXTENDED_HEADERS): 32-byte requests and reply chunks with
//! 64-bit lengths, and BLOCK_STATUS_EXT.

use super::handshake::ParseError;
use super::*;

pub const REQUEST_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const CHUNK_HEADER_LEN: usize = 20;
pub const EXT_REQUEST_LEN: usize = 32;
pub const EXT_REPLY_LEN: usize = 32;
/// Largest structured chunk payload a client of ours accepts: a full read plus its offset, or a
/// block-status list; anything bigger is a broken or hostile server.
pub const MAX_CHUNK_LEN: u32 = MAX_REQUEST_LEN + 4096;

/// A request header. `kind` stays raw: an unknown command must be answered with EINVAL, not
/// treated as a framing error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    pub fn cmd(&self) -> Option<Cmd> {
        Cmd::try_from(self.kind).ok()
    }

    /// Whether a payload of `len` bytes follows this header on the wire.
    pub fn has_payload(&self) -> bool {
        self.kind == Cmd::Write as u16
    }

    /// u32 magic, u16 flags, u16 type, u64 cookie, u64 offset, u32 length.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// Whether a request's flags, all of them known, suit its command. FUA goes with any command
/// (the spec has servers accept it everywhere once SEND_FUA is advertised); the others belong to
/// one command each, and DF only once structured replies are on, as it is about their chunks.
pub fn flags_fit(cmd: Cmd, flags: u16, structured: bool) -> bool {
    let allowed = CMD_FLAG_FUA
        | match cmd {
            Cmd::WriteZeroes => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            Cmd::Read if structured => CMD_FLAG_DF,
            Cmd::BlockStatus => CMD_FLAG_REQ_ONE,
            _ => 0,
        };
    flags & !allowed == 0
}

/// Commands whose length is a range of the export: a zero-length one names no bytes, which the
/// spec leaves undefined (a READ would even need a data chunk shorter than its minimum).
pub fn needs_length(cmd: Cmd) -> bool {
    matches!(cmd, Cmd::Read | Cmd::Write | Cmd::Trim | Cmd::WriteZeroes | Cmd::Cache | Cmd::BlockStatus)
}

pub fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, ParseError> {
    if buf.len() < REQUEST_LEN {
        return Ok(None);
    }
    let magic = be32(buf);
    if magic != REQUEST_MAGIC {
        return Err(ParseError::BadMagic { expected: REQUEST_MAGIC.into(), got: magic.into() });
    }
    let req = Request {
        flags: be16(&buf[4..]),
        kind: be16(&buf[6..]),
        cookie: be64(&buf[8..]),
        offset: be64(&buf[16..]),
        len: be32(&buf[24..]),
    };
    Ok(Some((req, REQUEST_LEN)))
}

/// A request with a 64-bit length: what an extended header carries, and what a compact one
/// widens to, so the server handles both alike. `kind` stays raw, as in `Request`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtRequest {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u64,
}

impl From<Request> for ExtRequest {
    fn from(r: Request) -> ExtRequest {
        ExtRequest { flags: r.flags, kind: r.kind, cookie: r.cookie, offset: r.offset, len: r.len.into() }
    }
}

impl ExtRequest {
    pub fn cmd(&self) -> Option<Cmd> {
        Cmd::try_from(self.kind).ok()
    }

    /// Whether `len` bytes of payload follow the header. A WRITE always has one; with extended
    /// headers any command flagged PAYLOAD_LEN has one too (and must be read past even when it
    /// is refused, or the stream loses its framing).
    pub fn has_payload(&self, extended: bool) -> bool {
        self.kind == Cmd::Write as u16 || (extended && self.flags & CMD_FLAG_PAYLOAD_LEN != 0)
    }

    /// u32 magic, u16 flags, u16 type, u64 cookie, u64 offset, u64 length.
    pub fn encode(&self) -> [u8; EXT_REQUEST_LEN] {
        let mut b = [0u8; EXT_REQUEST_LEN];
        b[0..4].copy_from_slice(&EXT_REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..32].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// An extended request header. A compact magic here is a framing error like any other: once
/// extended headers are agreed the client must use them for every request.
pub fn parse_ext_request(buf: &[u8]) -> Result<Option<(ExtRequest, usize)>, ParseError> {
    if buf.len() < EXT_REQUEST_LEN {
        return Ok(None);
    }
    let magic = be32(buf);
    if magic != EXT_REQUEST_MAGIC {
        return Err(ParseError::BadMagic { expected: EXT_REQUEST_MAGIC.into(), got: magic.into() });
    }
    let req = ExtRequest {
        flags: be16(&buf[4..]),
        kind: be16(&buf[6..]),
        cookie: be64(&buf[8..]),
        offset: be64(&buf[16..]),
        len: be64(&buf[24..]),
    };
    Ok(Some((req, EXT_REQUEST_LEN)))
}

/// The request header of whichever layout the connection agreed on.
pub fn parse_any_request(buf: &[u8], extended: bool) -> Result<Option<(ExtRequest, usize)>, ParseError> {
    if extended { parse_ext_request(buf) } else { Ok(parse_request(buf)?.map(|(r, used)| (r.into(), used))) }
}

/// Length of a request header in the agreed layout.
pub fn request_len(extended: bool) -> usize {
    if extended { EXT_REQUEST_LEN } else { REQUEST_LEN }
}

/// Simple reply: u32 magic, u32 error, u64 cookie.
pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Structured chunk header: u32 magic, u16 flags, u16 type, u64 cookie, u32 payload length.
pub fn encode_chunk_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut b = [0u8; CHUNK_HEADER_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// A final NBD_REPLY_TYPE_ERROR chunk: header, u32 error, u16 message length, message.
pub fn encode_error_chunk(out: &mut Vec<u8>, cookie: u64, error: u32, msg: &str) {
    let msg = &msg.as_bytes()[..msg.len().min(4096)];
    out.extend_from_slice(&encode_chunk_header(REPLY_FLAG_DONE, CHUNK_ERROR, cookie, 6 + msg.len() as u32));
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

/// A final NBD_REPLY_TYPE_BLOCK_STATUS chunk: header, u32 context id, then (u32 length,
/// u32 flags) descriptors.
pub fn encode_block_status(out: &mut Vec<u8>, cookie: u64, context: u32, extents: &[(u32, u32)]) {
    let len = 4 + 8 * extents.len() as u32;
    out.extend_from_slice(&encode_chunk_header(REPLY_FLAG_DONE, CHUNK_BLOCK_STATUS, cookie, len));
    out.extend_from_slice(&context.to_be_bytes());
    for (l, f) in extents {
        out.extend_from_slice(&l.to_be_bytes());
        out.extend_from_slice(&f.to_be_bytes());
    }
}

/// Extended reply chunk header: u32 magic, u16 flags, u16 type, u64 cookie, u64 offset (the
/// request's), u64 payload length.
pub fn encode_ext_header(flags: u16, kind: u16, cookie: u64, offset: u64, len: u64) -> [u8; EXT_REPLY_LEN] {
    let mut b = [0u8; EXT_REPLY_LEN];
    b[0..4].copy_from_slice(&EXT_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..32].copy_from_slice(&len.to_be_bytes());
    b
}

/// The success reply to a command without data under extended headers, where simple replies are
/// not allowed: a final NBD_REPLY_TYPE_NONE chunk with no payload.
pub fn encode_ext_done(cookie: u64, offset: u64) -> [u8; EXT_REPLY_LEN] {
    encode_ext_header(REPLY_FLAG_DONE, CHUNK_NONE, cookie, offset, 0)
}

/// A final NBD_REPLY_TYPE_ERROR chunk with an extended header (same payload as
/// `encode_error_chunk`).
pub fn encode_ext_error_chunk(out: &mut Vec<u8>, cookie: u64, offset: u64, error: u32, msg: &str) {
    let msg = &msg.as_bytes()[..msg.len().min(4096)];
    out.extend_from_slice(&encode_ext_header(
        REPLY_FLAG_DONE,
        CHUNK_ERROR,
        cookie,
        offset,
        6 + msg.len() as u64,
    ));
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

/// A final NBD_REPLY_TYPE_BLOCK_STATUS_EXT chunk: extended header, u32 context id, u32
/// descriptor count, then (u64 length, u32 padding 0, u32 flags) descriptors.
pub fn encode_block_status_ext(
    out: &mut Vec<u8>,
    cookie: u64,
    offset: u64,
    context: u32,
    extents: &[(u64, u32)],
) {
    let len = 8 + 16 * extents.len() as u64;
    out.extend_from_slice(&encode_ext_header(REPLY_FLAG_DONE, CHUNK_BLOCK_STATUS_EXT, cookie, offset, len));
    out.extend_from_slice(&context.to_be_bytes());
    out.extend_from_slice(&(extents.len() as u32).to_be_bytes());
    for (l, f) in extents {
        out.extend_from_slice(&l.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&f.to_be_bytes());
    }
}

/// A reply header as a client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple { error: u32, cookie: u64 },
    Chunk { flags: u16, kind: u16, cookie: u64, len: u32 },
}

impl ReplyHeader {
    pub fn cookie(&self) -> u64 {
        match *self {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. } => cookie,
        }
    }
}

pub fn parse_reply_header(buf: &[u8]) -> Result<Option<(ReplyHeader, usize)>, ParseError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    match be32(buf) {
        SIMPLE_REPLY_MAGIC if buf.len() < SIMPLE_REPLY_LEN => Ok(None),
        SIMPLE_REPLY_MAGIC => Ok(Some((
            ReplyHeader::Simple { error: be32(&buf[4..]), cookie: be64(&buf[8..]) },
            SIMPLE_REPLY_LEN,
        ))),
        STRUCTURED_REPLY_MAGIC if buf.len() < CHUNK_HEADER_LEN => Ok(None),
        STRUCTURED_REPLY_MAGIC => {
            let len = be32(&buf[16..]);
            if len > MAX_CHUNK_LEN {
                return Err(ParseError::TooLong { len: len.into(), max: MAX_CHUNK_LEN.into() });
            }
            let h = ReplyHeader::Chunk {
                flags: be16(&buf[4..]),
                kind: be16(&buf[6..]),
                cookie: be64(&buf[8..]),
                len,
            };
            Ok(Some((h, CHUNK_HEADER_LEN)))
        }
        other => Err(ParseError::BadMagic { expected: SIMPLE_REPLY_MAGIC.into(), got: other.into() }),
    }
}

/// An extended reply chunk header as a client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtReplyHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u64,
}

/// Only the extended magic is valid once extended headers are agreed (no simple replies).
/// Payloads are bounded as for structured chunks: a reply length is never more than a 32-bit
/// payload in practice, and the spec lets a client hang up on one that is.
pub fn parse_ext_reply_header(buf: &[u8]) -> Result<Option<(ExtReplyHeader, usize)>, ParseError> {
    if buf.len() < EXT_REPLY_LEN {
        return Ok(None);
    }
    let magic = be32(buf);
    if magic != EXT_REPLY_MAGIC {
        return Err(ParseError::BadMagic { expected: EXT_REPLY_MAGIC.into(), got: magic.into() });
    }
    let len = be64(&buf[24..]);
    if len > u64::from(MAX_CHUNK_LEN) {
        return Err(ParseError::TooLong { len, max: MAX_CHUNK_LEN.into() });
    }
    let h = ExtReplyHeader {
        flags: be16(&buf[4..]),
        kind: be16(&buf[6..]),
        cookie: be64(&buf[8..]),
        offset: be64(&buf[16..]),
        len,
    };
    Ok(Some((h, EXT_REPLY_LEN)))
}

/// Payload of a BLOCK_STATUS_EXT chunk: context id and (length, flags) descriptors. A nonzero
/// descriptor count must match the payload; zero means "count them".
pub fn parse_block_status_ext(data: &[u8]) -> Result<(u32, Vec<(u64, u32)>), ParseError> {
    if data.len() < 8 + 16 || !(data.len() - 8).is_multiple_of(16) {
        return Err(ParseError::Malformed("block status ext chunk"));
    }
    let count = be32(&data[4..]) as usize;
    let ext: Vec<(u64, u32)> = data[8..].chunks_exact(16).map(|c| (be64(c), be32(&c[12..]))).collect();
    if count != 0 && count != ext.len() {
        return Err(ParseError::Malformed("block status ext descriptor count"));
    }
    Ok((be32(data), ext))
}

/// What one chunk of the reply to a READ of `len` bytes at `offset` holds, positioned in the
/// read buffer. Chunks that point outside the request are malformed: a client must not write
/// where it did not ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadChunk<'a> {
    Data { at: usize, data: &'a [u8] },
    Hole { at: usize, len: usize },
    Error { error: u32, msg: &'a [u8] },
    None,
}

pub fn read_chunk(kind: u16, payload: &[u8], offset: u64, len: u64) -> Result<ReadChunk<'_>, ParseError> {
    let place = |at: u64, n: u64| -> Result<usize, ParseError> {
        let rel = at.checked_sub(offset).ok_or(ParseError::Malformed("chunk before the read"))?;
        match rel.checked_add(n) {
            Some(end) if end <= len && n > 0 => Ok(rel as usize),
            _ => Err(ParseError::Malformed("chunk past the read")),
        }
    };
    match kind {
        CHUNK_NONE if payload.is_empty() => Ok(ReadChunk::None),
        CHUNK_OFFSET_DATA => {
            let (at, data) = parse_offset_data(payload)?;
            Ok(ReadChunk::Data { at: place(at, data.len() as u64)?, data })
        }
        CHUNK_OFFSET_HOLE => {
            let (at, n) = parse_offset_hole(payload)?;
            Ok(ReadChunk::Hole { at: place(at, n.into())?, len: n as usize })
        }
        k if k & 0x8000 != 0 => {
            let (error, msg) = parse_error_chunk(payload)?;
            Ok(ReadChunk::Error { error, msg })
        }
        _ => Err(ParseError::Malformed("chunk type in a read reply")),
    }
}

/// Payload of an error chunk: (error, message).
pub fn parse_error_chunk(data: &[u8]) -> Result<(u32, &[u8]), ParseError> {
    if data.len() < 6 {
        return Err(ParseError::Malformed("error chunk"));
    }
    let n = be16(&data[4..]) as usize;
    // ERROR_OFFSET chunks carry 8 more bytes after the message.
    if data.len() < 6 + n {
        return Err(ParseError::Malformed("error chunk message"));
    }
    Ok((be32(data), &data[6..6 + n]))
}

/// Payload of an OFFSET_DATA chunk: (offset, data).
pub fn parse_offset_data(data: &[u8]) -> Result<(u64, &[u8]), ParseError> {
    if data.len() < 8 {
        return Err(ParseError::Malformed("offset data chunk"));
    }
    Ok((be64(data), &data[8..]))
}

/// Payload of an OFFSET_HOLE chunk: (offset, hole length).
pub fn parse_offset_hole(data: &[u8]) -> Result<(u64, u32), ParseError> {
    if data.len() != 12 {
        return Err(ParseError::Malformed("offset hole chunk"));
    }
    Ok((be64(data), be32(&data[8..])))
}

/// Payload of a BLOCK_STATUS chunk: context id and descriptors.
pub fn parse_block_status(data: &[u8]) -> Result<(u32, Vec<(u32, u32)>), ParseError> {
    if data.len() < 4 || !(data.len() - 4).is_multiple_of(8) {
        return Err(ParseError::Malformed("block status chunk"));
    }
    let ext = data[4..].chunks_exact(8).map(|c| (be32(c), be32(&c[4..]))).collect();
    Ok((be32(data), ext))
}

/// The cookie of a request header whose magic is wrong, so that the error reply before the
/// close still names the request: bytes 8..16, where every request header form keeps it.
/// None while fewer bytes than a whole header have arrived.
pub fn request_cookie(buf: &[u8]) -> Option<u64> {
    (buf.len() >= REQUEST_LEN).then(|| be64(&buf[8..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_fit_their_commands_only() {
        for cmd in
            [Cmd::Read, Cmd::Write, Cmd::Flush, Cmd::Trim, Cmd::WriteZeroes, Cmd::Cache, Cmd::BlockStatus]
        {
            assert!(flags_fit(cmd, 0, false), "{cmd:?} without flags");
            assert!(flags_fit(cmd, CMD_FLAG_FUA, true), "{cmd:?} with FUA");
        }
        assert!(flags_fit(Cmd::WriteZeroes, CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO | CMD_FLAG_FUA, false));
        assert!(flags_fit(Cmd::Read, CMD_FLAG_DF, true));
        assert!(!flags_fit(Cmd::Read, CMD_FLAG_DF, false), "DF without structured replies");
        assert!(flags_fit(Cmd::BlockStatus, CMD_FLAG_REQ_ONE, true));
        assert!(!flags_fit(Cmd::Read, CMD_FLAG_REQ_ONE, true));
        assert!(!flags_fit(Cmd::Write, CMD_FLAG_NO_HOLE, true));
        assert!(!flags_fit(Cmd::Write, CMD_FLAG_DF, true));
        assert!(!flags_fit(Cmd::Trim, CMD_FLAG_FAST_ZERO, true));
        assert!(!flags_fit(Cmd::BlockStatus, CMD_FLAG_DF, true));
    }

    #[test]
    fn only_range_commands_need_a_length() {
        assert!(needs_length(Cmd::Read) && needs_length(Cmd::Write) && needs_length(Cmd::Trim));
        assert!(needs_length(Cmd::WriteZeroes) && needs_length(Cmd::Cache) && needs_length(Cmd::BlockStatus));
        assert!(!needs_length(Cmd::Flush) && !needs_length(Cmd::Disc));
    }

    fn req() -> Request {
        Request { flags: 1, kind: 1, cookie: 0xabcdef, offset: 4096, len: 512 }
    }

    #[test]
    fn request_complete_incomplete_trailing() {
        let b = req().encode();
        assert_eq!(parse_request(&b).unwrap(), Some((req(), REQUEST_LEN)));
        for cut in 0..REQUEST_LEN {
            assert_eq!(parse_request(&b[..cut]).unwrap(), None);
        }
        let mut t = b.to_vec();
        t.extend_from_slice(&[1, 2, 3]);
        assert_eq!(parse_request(&t).unwrap(), Some((req(), REQUEST_LEN)));
    }

    #[test]
    fn request_bad_magic_and_unknown_cmd() {
        let mut b = req().encode();
        b[0] = 0;
        assert!(matches!(parse_request(&b), Err(ParseError::BadMagic { .. })));
        assert_eq!(request_cookie(&b), Some(0xabcdef), "the error reply still names the request");
        assert_eq!(request_cookie(&b[..REQUEST_LEN - 1]), None);
        let r = Request { kind: 99, ..req() };
        let (p, _) = parse_request(&r.encode()).unwrap().unwrap();
        assert_eq!(p.cmd(), None);
    }

    #[test]
    fn replies_roundtrip() {
        let s = encode_simple_reply(22, 7);
        assert_eq!(parse_reply_header(&s).unwrap(), Some((ReplyHeader::Simple { error: 22, cookie: 7 }, 16)));
        assert_eq!(parse_reply_header(&s[..15]).unwrap(), None);
        let mut e = Vec::new();
        encode_error_chunk(&mut e, 9, 5, "boom");
        let (h, used) = parse_reply_header(&e).unwrap().unwrap();
        assert_eq!(h, ReplyHeader::Chunk { flags: 1, kind: CHUNK_ERROR, cookie: 9, len: 10 });
        assert_eq!(parse_error_chunk(&e[used..]).unwrap(), (5, &b"boom"[..]));
        let mut bs = Vec::new();
        encode_block_status(&mut bs, 3, 1, &[(4096, 0), (8192, 3)]);
        let (_, used) = parse_reply_header(&bs).unwrap().unwrap();
        assert_eq!(parse_block_status(&bs[used..]).unwrap(), (1, vec![(4096, 0), (8192, 3)]));
    }

    fn ext() -> ExtRequest {
        ExtRequest {
            flags: CMD_FLAG_PAYLOAD_LEN,
            kind: 1,
            cookie: 0x1122_3344_5566_7788,
            offset: 1 << 40,
            len: 5 << 32,
        }
    }

    #[test]
    fn ext_request_complete_incomplete_trailing() {
        let b = ext().encode();
        assert_eq!(&b[..4], &[0x21, 0xe4, 0x1c, 0x71]);
        assert_eq!(parse_ext_request(&b).unwrap(), Some((ext(), EXT_REQUEST_LEN)));
        for cut in 0..EXT_REQUEST_LEN {
            assert_eq!(parse_ext_request(&b[..cut]).unwrap(), None, "cut at {cut}");
        }
        let mut t = b.to_vec();
        t.extend_from_slice(&[9; 7]);
        assert_eq!(parse_ext_request(&t).unwrap(), Some((ext(), EXT_REQUEST_LEN)));
        assert_eq!(parse_any_request(&t, true).unwrap(), Some((ext(), EXT_REQUEST_LEN)));
    }

    #[test]
    fn ext_request_bad_magic_and_unknown_cmd() {
        // A compact header where an extended one is due is a framing error, and the other way
        // round too.
        let mut compact = req().encode().to_vec();
        compact.extend_from_slice(&[0; 4]);
        assert!(matches!(parse_ext_request(&compact), Err(ParseError::BadMagic { .. })));
        assert!(matches!(parse_any_request(&ext().encode(), false), Err(ParseError::BadMagic { .. })));
        let r = ExtRequest { kind: 99, ..ext() };
        let (p, _) = parse_ext_request(&r.encode()).unwrap().unwrap();
        assert_eq!(p.cmd(), None);
    }

    #[test]
    fn compact_request_widens() {
        let (w, used) = parse_any_request(&req().encode(), false).unwrap().unwrap();
        assert_eq!(used, REQUEST_LEN);
        assert_eq!(w, ExtRequest { flags: 1, kind: 1, cookie: 0xabcdef, offset: 4096, len: 512 });
        assert_eq!(request_len(false), REQUEST_LEN);
        assert_eq!(request_len(true), EXT_REQUEST_LEN);
    }

    #[test]
    fn which_requests_carry_a_payload() {
        let write = ExtRequest { flags: 0, kind: Cmd::Write as u16, ..ext() };
        assert!(write.has_payload(false) && write.has_payload(true));
        let trim = ExtRequest { flags: CMD_FLAG_PAYLOAD_LEN, kind: Cmd::Trim as u16, ..ext() };
        // PAYLOAD_LEN means nothing in compact mode (where it is refused as a bad flag).
        assert!(!trim.has_payload(false) && trim.has_payload(true));
        let zero = ExtRequest { flags: 0, kind: Cmd::WriteZeroes as u16, ..ext() };
        assert!(!zero.has_payload(true));
    }

    #[test]
    fn ext_replies_roundtrip() {
        let d = encode_ext_done(7, 4096);
        assert_eq!(&d[..4], &[0x6e, 0x8a, 0x27, 0x8c]);
        let (h, used) = parse_ext_reply_header(&d).unwrap().unwrap();
        assert_eq!(used, EXT_REPLY_LEN);
        assert_eq!(
            h,
            ExtReplyHeader { flags: REPLY_FLAG_DONE, kind: CHUNK_NONE, cookie: 7, offset: 4096, len: 0 }
        );
        for cut in 0..EXT_REPLY_LEN {
            assert_eq!(parse_ext_reply_header(&d[..cut]).unwrap(), None);
        }
        let mut e = Vec::new();
        encode_ext_error_chunk(&mut e, 9, 1 << 33, 22, "bad");
        let (h, used) = parse_ext_reply_header(&e).unwrap().unwrap();
        assert_eq!((h.kind, h.offset, h.len), (CHUNK_ERROR, 1 << 33, 9));
        assert_eq!(parse_error_chunk(&e[used..]).unwrap(), (22, &b"bad"[..]));
        let mut bs = Vec::new();
        let ext = [(6u64 << 30, 3), (4096, 0)];
        encode_block_status_ext(&mut bs, 3, 0, 1, &ext);
        let (h, used) = parse_ext_reply_header(&bs).unwrap().unwrap();
        assert_eq!((h.kind, h.len as usize), (CHUNK_BLOCK_STATUS_EXT, bs.len() - used));
        assert_eq!(parse_block_status_ext(&bs[used..]).unwrap(), (1, ext.to_vec()));
    }

    #[test]
    fn ext_reply_errors() {
        let s = encode_simple_reply(0, 1);
        let mut padded = s.to_vec();
        padded.resize(EXT_REPLY_LEN, 0);
        assert!(matches!(parse_ext_reply_header(&padded), Err(ParseError::BadMagic { .. })));
        let h = encode_ext_header(0, CHUNK_OFFSET_DATA, 1, 0, u64::MAX);
        assert!(matches!(parse_ext_reply_header(&h), Err(ParseError::TooLong { .. })));
        let mut bs = Vec::new();
        encode_block_status_ext(&mut bs, 3, 0, 1, &[(1, 0), (2, 0)]);
        let mut p = bs[EXT_REPLY_LEN..].to_vec();
        // A count that disagrees with the length, an empty list, a ragged list.
        p[7] = 3;
        assert!(parse_block_status_ext(&p).is_err());
        p[7] = 0;
        assert_eq!(parse_block_status_ext(&p).unwrap().1.len(), 2);
        assert!(parse_block_status_ext(&p[..8]).is_err());
        assert!(parse_block_status_ext(&p[..p.len() - 1]).is_err());
    }

    #[test]
    fn read_chunks_stay_inside_the_read() {
        let mut d = 4096u64.to_be_bytes().to_vec();
        d.extend_from_slice(b"abcd");
        assert_eq!(
            read_chunk(CHUNK_OFFSET_DATA, &d, 4000, 100),
            Ok(ReadChunk::Data { at: 96, data: b"abcd" })
        );
        assert!(read_chunk(CHUNK_OFFSET_DATA, &d, 4000, 99).is_err(), "past the end");
        assert!(read_chunk(CHUNK_OFFSET_DATA, &d, 4097, 100).is_err(), "before the start");
        let mut h = 8192u64.to_be_bytes().to_vec();
        h.extend_from_slice(&512u32.to_be_bytes());
        assert_eq!(read_chunk(CHUNK_OFFSET_HOLE, &h, 8192, 512), Ok(ReadChunk::Hole { at: 0, len: 512 }));
        h[11] = 0;
        h[10] = 0;
        assert!(read_chunk(CHUNK_OFFSET_HOLE, &h, 8192, 512).is_err(), "empty hole");
        let mut e = Vec::new();
        encode_error_chunk(&mut e, 1, 5, "io");
        let got = read_chunk(CHUNK_ERROR, &e[CHUNK_HEADER_LEN..], 0, 1);
        assert_eq!(got, Ok(ReadChunk::Error { error: 5, msg: b"io" }));
        assert_eq!(read_chunk(CHUNK_NONE, &[], 0, 1), Ok(ReadChunk::None));
        assert!(read_chunk(CHUNK_BLOCK_STATUS, &[0; 12], 0, 1).is_err());
    }

    #[test]
    fn reply_bad_magic_and_huge_chunk() {
        assert!(parse_reply_header(&[0, 0, 0, 0]).is_err());
        let h = encode_chunk_header(0, 1, 1, u32::MAX);
        assert!(matches!(parse_reply_header(&h), Err(ParseError::TooLong { .. })));
    }
}
