//! Server side of negotiation: the bytes a client sends after our newstyle greeting.
//! parse_client_flags, then parse_option frames until the parser wants more bytes or refuses;
//! option payloads go through parse_export_request / parse_meta_request.
#![no_main]

use flexnbd::proto::OptCode;
use flexnbd::proto::handshake::{
    encode_export_request, encode_meta_request, encode_option, parse_client_flags, parse_export_request,
    parse_meta_request, parse_option,
};
use flexnbd::proto::{CLIENT_FIXED_NEWSTYLE, CLIENT_NO_ZEROES, MAX_OPTION_LEN};
use libfuzzer_sys::fuzz_target;

fn check_export_request(data: &[u8]) {
    let Ok(req) = parse_export_request(data) else { return };
    // The parser demands an exact fit, so the re-encoding is the payload itself.
    let mut enc = Vec::new();
    encode_export_request(&mut enc, req.name, &req.infos);
    assert_eq!(enc, data, "encode_export_request(parse_export_request(x)) != x");
    assert_eq!(parse_export_request(&enc).as_ref(), Ok(&req));
}

fn check_meta_request(data: &[u8]) {
    let Ok(req) = parse_meta_request(data) else { return };
    let mut enc = Vec::new();
    encode_meta_request(&mut enc, req.name, &req.queries);
    assert_eq!(enc, data, "encode_meta_request(parse_meta_request(x)) != x");
    assert_eq!(parse_meta_request(&enc).as_ref(), Ok(&req));
}

fuzz_target!(|buf: &[u8]| {
    let mut pos = match parse_client_flags(buf) {
        Ok(Some((flags, used))) => {
            assert_eq!(used, 4);
            assert_eq!(flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES), 0);
            used
        }
        Ok(None) => {
            assert!(buf.len() < 4);
            return;
        }
        Err(_) => return,
    };
    loop {
        let rest = &buf[pos..];
        let (frame, used) = match parse_option(rest) {
            Ok(Some(f)) => f,
            Ok(None) | Err(_) => break,
        };
        assert!(used >= 16 && used <= rest.len(), "consumed {used} of {}", rest.len());
        assert!(frame.data.len() <= MAX_OPTION_LEN as usize);
        let mut enc = Vec::new();
        encode_option(&mut enc, frame.code, frame.data);
        assert_eq!(enc, &rest[..used], "encode_option(parse_option(x)) != x");

        match OptCode::try_from(frame.code) {
            Ok(OptCode::Go | OptCode::Info) => check_export_request(frame.data),
            Ok(OptCode::List | OptCode::ListMetaContext | OptCode::SetMetaContext) => {
                check_meta_request(frame.data)
            }
            // The payload parsers must also survive whatever else a client puts in an option.
            _ => {
                check_export_request(frame.data);
                check_meta_request(frame.data);
            }
        }
        pos += used;
    }
});
