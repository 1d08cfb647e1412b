//! Server side of transmission: a stream of request headers (with payloads skipped), read once
//! as compact headers and once as extended ones (NBD_OPT_EXTENDED_HEADERS).
#![no_main]

use flexnbd::proto::transmission::{
    EXT_REQUEST_LEN, ExtRequest, REQUEST_LEN, parse_any_request, parse_ext_request, parse_request, request_cookie,
};
use flexnbd::proto::{CMD_FLAG_PAYLOAD_LEN, Cmd};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|buf: &[u8]| {
    compact(buf);
    extended(buf);
});

fn compact(buf: &[u8]) {
    let mut pos = 0;
    loop {
        let rest = &buf[pos..];
        let (req, used) = match parse_request(rest) {
            Ok(Some(r)) => r,
            Ok(None) => {
                assert!(rest.len() < REQUEST_LEN);
                break;
            }
            Err(_) => {
                // A bad magic is answered with the cookie at its place in the header.
                assert!(rest.len() >= REQUEST_LEN);
                let cookie = request_cookie(rest).expect("a whole header has a cookie");
                assert_eq!(cookie.to_be_bytes(), rest[8..16]);
                break;
            }
        };
        assert_eq!(used, REQUEST_LEN);
        assert_eq!(req.encode(), rest[..used], "Request::encode(parse_request(x)) != x");
        assert_eq!(parse_request(&req.encode()), Ok(Some((req, REQUEST_LEN))));
        match req.cmd() {
            Some(c) => assert_eq!(c as u16, req.kind),
            None => assert!(Cmd::try_from(req.kind).is_err()),
        }
        pos += used;
        if req.has_payload() {
            assert_eq!(req.cmd(), Some(Cmd::Write));
            let len = req.len as usize;
            if buf.len() - pos < len {
                break;
            }
            pos += len;
        }
    }
}

fn extended(buf: &[u8]) {
    let mut pos = 0;
    loop {
        let rest = &buf[pos..];
        let (req, used) = match parse_ext_request(rest) {
            Ok(Some(r)) => r,
            Ok(None) => {
                assert!(rest.len() < EXT_REQUEST_LEN);
                break;
            }
            Err(_) => break,
        };
        assert_eq!(used, EXT_REQUEST_LEN);
        assert_eq!(req.encode(), rest[..used], "ExtRequest::encode(parse_ext_request(x)) != x");
        assert_eq!(parse_any_request(rest, true), Ok(Some((req, EXT_REQUEST_LEN))));
        // The compact parser reads the same bytes as a compact header only if the magic says so.
        assert!(parse_any_request(rest, false).is_err());
        match req.cmd() {
            Some(c) => assert_eq!(c as u16, req.kind),
            None => assert!(Cmd::try_from(req.kind).is_err()),
        }
        let payload = req.kind == Cmd::Write as u16 || req.flags & CMD_FLAG_PAYLOAD_LEN != 0;
        assert_eq!(req.has_payload(true), payload);
        pos += used;
        if payload {
            let Ok(len) = usize::try_from(req.len) else { break };
            if buf.len() - pos < len {
                break;
            }
            pos += len;
        }
    }
    // A compact header widens to the same fields.
    if let Ok(Some((r, used))) = parse_request(buf) {
        let w: ExtRequest = r.into();
        assert_eq!(parse_any_request(buf, false), Ok(Some((w, used))));
        assert_eq!(
            (w.flags, w.kind, w.cookie, w.offset, w.len),
            (r.flags, r.kind, r.cookie, r.offset, r.len.into())
        );
    }
}
