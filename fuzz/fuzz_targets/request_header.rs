//! Server side of transmission: a stream of request headers (with WRITE payloads skipped).
#![no_main]

use flexnbd::proto::Cmd;
use flexnbd::proto::transmission::{REQUEST_LEN, parse_request, request_cookie};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|buf: &[u8]| {
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
});
