//! Pure parse/encode of NBD negotiation: greetings (oldstyle and fixed newstyle), client options
//! and option replies, for both the server side and our own client side (read/write/mirror).
//!
//! Parsers follow one shape: `parse(&[u8]) -> Result<Option<(Frame, used)>, ParseError>`, where
//! `Ok(None)` means "need more bytes" and every length a peer sends is checked before use.

use super::*;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    BadMagic { expected: u64, got: u64 },
    TooLong { len: u64, max: u64 },
    Malformed(&'static str),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::BadMagic { expected, got } => {
                write!(f, "bad magic {got:#x} (expected {expected:#x})")
            }
            ParseError::TooLong { len, max } => write!(f, "length {len} over the limit of {max}"),
            ParseError::Malformed(what) => write!(f, "malformed {what}"),
        }
    }
}

impl std::error::Error for ParseError {}

// ---------------------------------------------------------------------------------------------
// Server side: what the client sends.

/// The client's 32-bit flags word that follows a newstyle greeting.
pub fn parse_client_flags(buf: &[u8]) -> Result<Option<(u32, usize)>, ParseError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let flags = be32(buf);
    if flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(ParseError::Malformed("client flags"));
    }
    Ok(Some((flags, 4)))
}

/// One client option: the raw code (unknown codes must still be answered) and its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionFrame<'a> {
    pub code: u32,
    pub data: &'a [u8],
}

/// Option header: u64 IHAVEOPT, u32 option, u32 length, then `length` bytes of data.
pub fn parse_option(buf: &[u8]) -> Result<Option<(OptionFrame<'_>, usize)>, ParseError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let magic = be64(buf);
    if magic != IHAVEOPT {
        return Err(ParseError::BadMagic { expected: IHAVEOPT, got: magic });
    }
    let code = be32(&buf[8..]);
    let len = be32(&buf[12..]);
    if len > MAX_OPTION_LEN {
        return Err(ParseError::TooLong { len: len.into(), max: MAX_OPTION_LEN.into() });
    }
    let end = 16 + len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some((OptionFrame { code, data: &buf[16..end] }, end)))
}

pub fn encode_option(out: &mut Vec<u8>, code: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Payload of NBD_OPT_INFO / NBD_OPT_GO: u32 name length, name, u16 count, count x u16 info type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequest<'a> {
    pub name: &'a [u8],
    pub infos: Vec<u16>,
}

pub fn parse_export_request(data: &[u8]) -> Result<ExportRequest<'_>, ParseError> {
    let (name, rest) = take_string(data, "export name")?;
    if rest.len() < 2 {
        return Err(ParseError::Malformed("info request count"));
    }
    let n = be16(rest) as usize;
    let rest = &rest[2..];
    if rest.len() != n * 2 {
        return Err(ParseError::Malformed("info request list"));
    }
    let infos = rest.chunks_exact(2).map(be16).collect();
    Ok(ExportRequest { name, infos })
}

pub fn encode_export_request(out: &mut Vec<u8>, name: &[u8], infos: &[u16]) {
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name);
    out.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        out.extend_from_slice(&i.to_be_bytes());
    }
}

/// Payload of LIST/SET_META_CONTEXT: u32 name length, name, u32 query count, each query as
/// u32 length + bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest<'a> {
    pub name: &'a [u8],
    pub queries: Vec<&'a [u8]>,
}

pub fn parse_meta_request(data: &[u8]) -> Result<MetaRequest<'_>, ParseError> {
    let (name, rest) = take_string(data, "export name")?;
    if rest.len() < 4 {
        return Err(ParseError::Malformed("query count"));
    }
    let n = be32(rest) as usize;
    let mut rest = &rest[4..];
    // Each query takes at least its 4-byte length, so a count beyond that is a lie.
    if n > rest.len() / 4 {
        return Err(ParseError::Malformed("query count"));
    }
    let mut queries = Vec::with_capacity(n);
    for _ in 0..n {
        let (q, r) = take_string(rest, "query")?;
        queries.push(q);
        rest = r;
    }
    if !rest.is_empty() {
        return Err(ParseError::Malformed("trailing bytes after queries"));
    }
    Ok(MetaRequest { name, queries })
}

pub fn encode_meta_request(out: &mut Vec<u8>, name: &[u8], queries: &[&[u8]]) {
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name);
    out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        out.extend_from_slice(&(q.len() as u32).to_be_bytes());
        out.extend_from_slice(q);
    }
}

/// u32 length then that many bytes.
fn take_string<'a>(b: &'a [u8], what: &'static str) -> Result<(&'a [u8], &'a [u8]), ParseError> {
    if b.len() < 4 {
        return Err(ParseError::Malformed(what));
    }
    let len = be32(b) as usize;
    let b = &b[4..];
    if len > MAX_STRING_LEN {
        return Err(ParseError::TooLong { len: len as u64, max: MAX_STRING_LEN as u64 });
    }
    if b.len() < len {
        return Err(ParseError::Malformed(what));
    }
    Ok(b.split_at(len))
}

// ---------------------------------------------------------------------------------------------
// Server side: what the server sends.

/// Fixed newstyle greeting: NBDMAGIC, IHAVEOPT, u16 handshake flags.
pub fn encode_newstyle_greeting(out: &mut Vec<u8>, flags: u16) {
    out.extend_from_slice(&NBDMAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
}

/// Oldstyle hello: NBDMAGIC, 0x00420281861253, u64 size, u32 flags, 124 zero bytes.
pub fn encode_oldstyle_hello(out: &mut Vec<u8>, size: u64, flags: u32) {
    out.extend_from_slice(&NBDMAGIC.to_be_bytes());
    out.extend_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0u8; 124]);
}

/// Option reply: u64 magic, u32 option, u32 reply type, u32 length, data.
pub fn encode_option_reply(out: &mut Vec<u8>, opt: u32, rep: RepType, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&(rep as u32).to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// NBD_INFO_EXPORT: u16 type 0, u64 size, u16 transmission flags.
pub fn info_export(size: u64, flags: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..2].copy_from_slice(&(InfoType::Export as u16).to_be_bytes());
    b[2..10].copy_from_slice(&size.to_be_bytes());
    b[10..12].copy_from_slice(&flags.to_be_bytes());
    b
}

/// NBD_INFO_BLOCK_SIZE: u16 type 3, u32 minimum, u32 preferred, u32 maximum.
pub fn info_block_size(min: u32, pref: u32, max: u32) -> [u8; 14] {
    let mut b = [0u8; 14];
    b[0..2].copy_from_slice(&(InfoType::BlockSize as u16).to_be_bytes());
    b[2..6].copy_from_slice(&min.to_be_bytes());
    b[6..10].copy_from_slice(&pref.to_be_bytes());
    b[10..14].copy_from_slice(&max.to_be_bytes());
    b
}

/// Reply to NBD_OPT_EXPORT_NAME: u64 size, u16 flags, then 124 zeroes unless NO_ZEROES.
pub fn encode_export_name_reply(out: &mut Vec<u8>, size: u64, flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

// ---------------------------------------------------------------------------------------------
// Client side: what a server sends us (used by read/write and the mirror).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Greeting {
    Oldstyle { size: u64, flags: u32 },
    Newstyle { flags: u16 },
}

pub fn parse_greeting(buf: &[u8]) -> Result<Option<(Greeting, usize)>, ParseError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let magic = be64(buf);
    if magic != NBDMAGIC {
        return Err(ParseError::BadMagic { expected: NBDMAGIC, got: magic });
    }
    match be64(&buf[8..]) {
        IHAVEOPT if buf.len() < 18 => Ok(None),
        IHAVEOPT => Ok(Some((Greeting::Newstyle { flags: be16(&buf[16..]) }, 18))),
        OLDSTYLE_MAGIC if buf.len() < OLDSTYLE_HELLO_LEN => Ok(None),
        OLDSTYLE_MAGIC => {
            let size = be64(&buf[16..]);
            let flags = be32(&buf[24..]);
            Ok(Some((Greeting::Oldstyle { size, flags }, OLDSTYLE_HELLO_LEN)))
        }
        other => Err(ParseError::BadMagic { expected: IHAVEOPT, got: other }),
    }
}

/// One option reply as seen by a client; `rep` is raw so unknown reply types can be reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptReply<'a> {
    pub opt: u32,
    pub rep: u32,
    pub data: &'a [u8],
}

pub fn parse_option_reply(buf: &[u8]) -> Result<Option<(OptReply<'_>, usize)>, ParseError> {
    if buf.len() < 20 {
        return Ok(None);
    }
    let magic = be64(buf);
    if magic != OPT_REPLY_MAGIC {
        return Err(ParseError::BadMagic { expected: OPT_REPLY_MAGIC, got: magic });
    }
    let opt = be32(&buf[8..]);
    let rep = be32(&buf[12..]);
    let len = be32(&buf[16..]);
    if len > MAX_OPTION_LEN {
        return Err(ParseError::TooLong { len: len.into(), max: MAX_OPTION_LEN.into() });
    }
    let end = 20 + len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some((OptReply { opt, rep, data: &buf[20..end] }, end)))
}

/// (export size, transmission flags)
pub type ExportInfo = (u64, u16);

/// Reply to NBD_OPT_EXPORT_NAME as a client sees it.
pub fn parse_export_name_reply(
    buf: &[u8],
    no_zeroes: bool,
) -> Result<Option<(ExportInfo, usize)>, ParseError> {
    let need = if no_zeroes { 10 } else { 134 };
    if buf.len() < need {
        return Ok(None);
    }
    Ok(Some(((be64(buf), be16(&buf[8..])), need)))
}

/// The NBD_INFO_EXPORT payload inside an NBD_REP_INFO reply, if that is what `data` holds.
pub fn parse_info_export(data: &[u8]) -> Result<Option<(u64, u16)>, ParseError> {
    if data.len() < 2 {
        return Err(ParseError::Malformed("info reply"));
    }
    if be16(data) != InfoType::Export as u16 {
        return Ok(None);
    }
    if data.len() != 12 {
        return Err(ParseError::Malformed("info export"));
    }
    Ok(Some((be64(&data[2..]), be16(&data[10..]))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt(code: u32, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_option(&mut v, code, data);
        v
    }

    #[test]
    fn option_complete_incomplete_trailing() {
        let b = opt(7, b"abc");
        assert_eq!(parse_option(&b).unwrap(), Some((OptionFrame { code: 7, data: b"abc" }, 19)));
        for cut in 0..b.len() {
            assert_eq!(parse_option(&b[..cut]).unwrap(), None, "cut at {cut}");
        }
        let mut t = b.clone();
        t.extend_from_slice(b"zz");
        assert_eq!(parse_option(&t).unwrap().unwrap().1, 19);
    }

    #[test]
    fn option_bad_magic_and_too_long() {
        let mut b = opt(7, b"");
        b[0] ^= 1;
        assert!(matches!(parse_option(&b), Err(ParseError::BadMagic { .. })));
        let mut b = opt(7, b"");
        b[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(parse_option(&b), Err(ParseError::TooLong { .. })));
    }

    #[test]
    fn unknown_option_code_is_a_frame() {
        let b = opt(0xdead, b"");
        let (f, _) = parse_option(&b).unwrap().unwrap();
        assert_eq!(f.code, 0xdead);
        assert!(OptCode::try_from(f.code).is_err());
    }

    #[test]
    fn export_request_roundtrip_and_errors() {
        let mut d = Vec::new();
        encode_export_request(&mut d, b"name", &[3, 1]);
        let r = parse_export_request(&d).unwrap();
        assert_eq!(r.name, b"name");
        assert_eq!(r.infos, vec![3, 1]);
        assert!(parse_export_request(&d[..d.len() - 1]).is_err());
        d.push(0);
        assert!(parse_export_request(&d).is_err());
        assert!(parse_export_request(&[0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn meta_request_roundtrip_and_lying_count() {
        let mut d = Vec::new();
        encode_meta_request(&mut d, b"", &[b"base:allocation", b"qemu:"]);
        let r = parse_meta_request(&d).unwrap();
        assert_eq!(r.queries, vec![&b"base:allocation"[..], &b"qemu:"[..]]);
        let mut lie = Vec::new();
        encode_meta_request(&mut lie, b"", &[]);
        let n = lie.len();
        lie[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_request(&lie).is_err());
    }

    #[test]
    fn greetings() {
        let mut n = Vec::new();
        encode_newstyle_greeting(&mut n, 3);
        assert_eq!(parse_greeting(&n).unwrap(), Some((Greeting::Newstyle { flags: 3 }, 18)));
        assert_eq!(parse_greeting(&n[..17]).unwrap(), None);
        let mut o = Vec::new();
        encode_oldstyle_hello(&mut o, 4096, 1);
        assert_eq!(o.len(), OLDSTYLE_HELLO_LEN);
        assert_eq!(parse_greeting(&o).unwrap(), Some((Greeting::Oldstyle { size: 4096, flags: 1 }, 152)));
        assert_eq!(parse_greeting(&o[..151]).unwrap(), None);
        o[3] = 0;
        assert!(parse_greeting(&o).is_err());
    }

    #[test]
    fn option_reply_roundtrip() {
        let mut b = Vec::new();
        encode_option_reply(&mut b, 7, RepType::Info, &info_export(1 << 20, 1));
        let (r, used) = parse_option_reply(&b).unwrap().unwrap();
        assert_eq!(used, b.len());
        assert_eq!(r.rep, RepType::Info as u32);
        assert_eq!(parse_info_export(r.data).unwrap(), Some((1 << 20, 1)));
        assert_eq!(parse_option_reply(&b[..b.len() - 1]).unwrap(), None);
    }

    #[test]
    fn export_name_reply() {
        let mut b = Vec::new();
        encode_export_name_reply(&mut b, 99, 5, false);
        assert_eq!(parse_export_name_reply(&b, false).unwrap(), Some(((99, 5), 134)));
        assert_eq!(parse_export_name_reply(&b[..133], false).unwrap(), None);
        assert_eq!(parse_export_name_reply(&b[..10], true).unwrap(), Some(((99, 5), 10)));
    }
}
