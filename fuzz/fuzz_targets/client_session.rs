//! Stateful target: arbitrary client bytes drive one real client connection state machine
//! (flexnbd::conn::sim: a socket pair, a memfd export, disk jobs run in line).
//!
//! Byte 0 picks the mode: even = oldstyle (the rest is requests from the first byte, and the
//! invariants are checked: no reply for a request never made, nothing written outside a
//! write-type request's range); odd = fixed newstyle negotiation first (no panic, bounded).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|buf: &[u8]| {
    let Some((&mode, input)) = buf.split_first() else { return };
    if mode & 1 == 0 {
        if let Err(e) = flexnbd::conn::sim::check_oldstyle(input) {
            panic!("invariant broken: {e}");
        }
    } else {
        let _ = flexnbd::conn::sim::drive(input, false);
    }
});
