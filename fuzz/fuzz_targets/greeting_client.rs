//! Client side of negotiation (our read/write/mirror clients): what a server sends us.
//! parse_greeting, then option replies (parse_option_reply, parse_info_export) until a frame is
//! not an option reply, which is then read as an NBD_OPT_EXPORT_NAME reply.
#![no_main]

use flexnbd::proto::handshake::{
    Greeting, encode_export_name_reply, encode_newstyle_greeting, encode_oldstyle_hello, encode_option_reply,
    info_export, parse_export_name_reply, parse_greeting, parse_info_export, parse_option_reply,
};
use flexnbd::proto::{FLAG_NO_ZEROES, MAX_OPTION_LEN, OLDSTYLE_HELLO_LEN, RepType};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|buf: &[u8]| {
    let (greeting, mut pos) = match parse_greeting(buf) {
        Ok(Some(g)) => g,
        Ok(None) => {
            assert!(buf.len() < OLDSTYLE_HELLO_LEN);
            return;
        }
        Err(_) => return,
    };
    assert!(pos <= buf.len());
    let mut enc = Vec::new();
    let no_zeroes = match greeting {
        Greeting::Newstyle { flags } => {
            encode_newstyle_greeting(&mut enc, flags);
            assert_eq!(enc, &buf[..pos], "newstyle greeting round-trip");
            flags & FLAG_NO_ZEROES != 0
        }
        Greeting::Oldstyle { size, flags } => {
            assert_eq!(pos, OLDSTYLE_HELLO_LEN);
            encode_oldstyle_hello(&mut enc, size, flags);
            // The parser does not look at the 124 reserved bytes; everything else must match.
            assert_eq!(enc[..28], buf[..28], "oldstyle hello round-trip");
            if buf[28..pos].iter().all(|&b| b == 0) {
                assert_eq!(enc, &buf[..pos]);
            }
            return;
        }
    };

    loop {
        let rest = &buf[pos..];
        match parse_option_reply(rest) {
            Ok(Some((r, used))) => {
                assert!(used >= 20 && used <= rest.len());
                assert!(r.data.len() <= MAX_OPTION_LEN as usize);
                if let Ok(rep) = RepType::try_from(r.rep) {
                    let mut enc = Vec::new();
                    encode_option_reply(&mut enc, r.opt, rep, r.data);
                    assert_eq!(enc, &rest[..used], "encode_option_reply(parse_option_reply(x)) != x");
                }
                if let Ok(Some((size, flags))) = parse_info_export(r.data) {
                    assert_eq!(info_export(size, flags), r.data, "info_export round-trip");
                }
                pos += used;
            }
            Ok(None) => return,
            Err(_) => break,
        }
    }

    // Not an option reply: what follows NBD_OPT_EXPORT_NAME. Whether the 124 zeroes are there
    // depends on the client flags we sent, so read it both ways (server's offer first).
    let rest = &buf[pos..];
    for no_zeroes in [no_zeroes, !no_zeroes] {
        match parse_export_name_reply(rest, no_zeroes) {
            Ok(Some(((size, flags), used))) => {
                assert_eq!(used, if no_zeroes { 10 } else { 134 });
                assert!(used <= rest.len());
                let mut enc = Vec::new();
                encode_export_name_reply(&mut enc, size, flags, no_zeroes);
                assert_eq!(enc[..10], rest[..10]);
                if rest[10..used].iter().all(|&b| b == 0) {
                    assert_eq!(enc, &rest[..used], "export name reply round-trip");
                }
            }
            Ok(None) => assert!(rest.len() < if no_zeroes { 10 } else { 134 }),
            Err(_) => {}
        }
    }
});
