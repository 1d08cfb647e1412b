//! ACL entries as an operator (command line or control socket `acl`) writes them.
//!
//! Input layout: byte 0 = mode (bit 0 default-deny, bits 1-2 how the peer address is built),
//! bytes 1..17 = peer address material, the rest = entries, one per line (lossy UTF-8).
#![no_main]

use flexnbd::acl::{Acl, Entry};
use libfuzzer_sys::fuzz_target;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const HEADER: usize = 17;

fn peer_from(mode: u8, b: &[u8; 16]) -> IpAddr {
    let v4 = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    match (mode >> 1) & 3 {
        0 => IpAddr::V4(v4),
        2 => IpAddr::V6(v4.to_ipv6_mapped()),
        _ => IpAddr::V6(Ipv6Addr::from(*b)),
    }
}

/// Independent model of Entry::matches: IPv4-mapped peers compare as IPv4; families must agree;
/// the first `prefix` bits must be equal.
fn model_matches(net: IpAddr, prefix: u8, peer: IpAddr) -> bool {
    let peer = match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(peer),
        p => p,
    };
    match (net, peer) {
        (IpAddr::V4(a), IpAddr::V4(p)) => {
            let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix as u32) };
            u32::from(a) & mask == u32::from(p) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(p)) => {
            let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - prefix as u32) };
            u128::from(a) & mask == u128::from(p) & mask
        }
        _ => false,
    }
}

/// Entry's fields are private: take them back from its Display form, `addr/prefix`.
fn fields(e: &Entry) -> (IpAddr, u8) {
    let s = e.to_string();
    let (a, p) = s.rsplit_once('/').expect("Display is addr/prefix");
    (a.parse().expect("Display address parses"), p.parse().expect("Display prefix parses"))
}

fn flip_host_bits(net: IpAddr, prefix: u8, noise: &[u8; 16]) -> IpAddr {
    match net {
        IpAddr::V4(a) => {
            let host = if prefix >= 32 { 0 } else { u32::MAX >> prefix };
            let n = u32::from_be_bytes([noise[0], noise[1], noise[2], noise[3]]);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) ^ (n & host)))
        }
        IpAddr::V6(a) => {
            let host = if prefix >= 128 { 0 } else { u128::MAX >> prefix };
            IpAddr::V6(Ipv6Addr::from(u128::from(a) ^ (u128::from_be_bytes(*noise) & host)))
        }
    }
}

fn check_entry(s: &str, peer: IpAddr, noise: &[u8; 16]) -> Option<Entry> {
    let e = Entry::parse(s).ok()?;
    let shown = e.to_string();
    assert_eq!(Entry::parse(&shown), Ok(e), "Entry::parse(Display) != entry for {s:?} -> {shown:?}");
    let (net, prefix) = fields(&e);
    assert!(prefix <= if net.is_ipv4() { 32 } else { 128 });
    assert_eq!(e.matches(peer), model_matches(net, prefix, peer), "{s:?} vs {peer}");
    let inside = flip_host_bits(net, prefix, noise);
    assert_eq!(e.matches(inside), model_matches(net, prefix, inside), "{s:?} vs {inside}");
    Some(e)
}

fuzz_target!(|buf: &[u8]| {
    let mode = buf.first().copied().unwrap_or(0);
    let mut raw = [0u8; 16];
    let addr = buf.get(1..HEADER.min(buf.len())).unwrap_or(&[]);
    raw[..addr.len()].copy_from_slice(addr);
    let peer = peer_from(mode, &raw);
    let default_deny = mode & 1 != 0;
    let text = String::from_utf8_lossy(buf.get(HEADER..).unwrap_or(&[]));

    // The whole text as one entry, then line by line as a list.
    check_entry(&text, peer, &raw);
    let lines: Vec<&str> = text.lines().take(64).collect();
    let parsed: Vec<Option<Entry>> = lines.iter().map(|l| check_entry(l, peer, &raw)).collect();
    match Acl::parse(&lines, default_deny) {
        Ok(acl) => {
            assert!(parsed.iter().all(Option::is_some), "Acl::parse accepted a bad entry");
            let entries: Vec<Entry> = parsed.into_iter().flatten().collect();
            assert_eq!(acl.default_deny(), default_deny);
            let expect =
                if entries.is_empty() { !default_deny } else { entries.iter().any(|e| e.matches(peer)) };
            assert_eq!(acl.admits(peer), expect);
            assert_eq!(acl.allows_any(), !(entries.is_empty() && default_deny));
        }
        Err(bad) => {
            let first_bad = lines.iter().zip(&parsed).find(|(_, p)| p.is_none()).map(|(l, _)| *l);
            assert_eq!(Some(bad.0.as_str()), first_bad, "Acl::parse must name the first bad entry");
        }
    }
});
