//! Control socket requests: parse_lines (with and without EOF), parse_command, and the CLI's
//! encode_request / reply helpers.
#![no_main]

use flexnbd::conn::control::{
    Command, MAX_LINE, MAX_LINES, encode_reply, encode_request, parse_command, parse_lines, parse_reply,
};
use flexnbd::net::Target;
use libfuzzer_sys::fuzz_target;

/// What encode_request can carry: each line non-empty, no LF, within the line limit, and not
/// ending in CR (parse_lines strips one CR before an LF, so "x\r" comes back as "x"; our CLI's
/// remote::check_args refuses such arguments).
fn encodable(lines: &[String]) -> bool {
    !lines.is_empty()
        && lines.len() <= MAX_LINES
        && lines
            .iter()
            .all(|l| !l.is_empty() && !l.contains('\n') && l.len() <= MAX_LINE && !l.ends_with('\r'))
}

fn check_lines(buf: &[u8], eof: bool) {
    let (lines, used) = match parse_lines(buf, eof) {
        Ok(Some(r)) => r,
        Ok(None) => {
            assert!(!eof, "parse_lines wanted more bytes at EOF");
            return;
        }
        Err(_) => return,
    };
    assert!(used <= buf.len(), "consumed {used} of {}", buf.len());
    // Finding 1 (regress-eof-too-many-lines): the limit holds at EOF too.
    assert!(lines.len() <= MAX_LINES, "{} lines accepted", lines.len());
    for l in &lines {
        assert!(!l.is_empty() && !l.contains('\n'));
        assert!(l.len() <= MAX_LINE, "line of {} bytes accepted", l.len());
    }
    if !eof {
        // Without EOF a request ends only at its blank line.
        assert_eq!(buf[used - 1], b'\n');
    }

    if let Ok(cmd) = parse_command(&lines) {
        match cmd {
            Command::Acl(args) => assert_eq!(args, lines[1..]),
            // A TCP destination has a port; a Unix socket one a path and no bind address.
            Command::Mirror { target, bind, .. } => match target {
                Target::Tcp(a) => assert!(a.port() > 0),
                Target::Unix(p) => assert!(!p.as_os_str().is_empty() && bind.is_none()),
            },
            _ => {}
        }
    }

    if encodable(&lines) {
        let enc = encode_request(&lines[0], &lines[1..]);
        assert_eq!(
            parse_lines(&enc, false),
            Ok(Some((lines.clone(), enc.len()))),
            "parse_lines(encode_request(lines)) != lines"
        );
        assert_eq!(parse_command(&lines), parse_command(&parse_lines(&enc, true).unwrap().unwrap().0));
    }
}

fuzz_target!(|buf: &[u8]| {
    check_lines(buf, false);
    check_lines(buf, true);

    // The reply side: whatever parse_reply accepts, encode_reply writes back the same way.
    let text = String::from_utf8_lossy(buf);
    for line in text.split_inclusive('\n').take(16) {
        if let Some((code, msg)) = parse_reply(line) {
            let enc = String::from_utf8(encode_reply(code, msg)).unwrap();
            assert_eq!(parse_reply(&enc), Some((code, msg)), "parse_reply(encode_reply(..)) round-trip");
        }
    }
});
