//! Access control: IPv4/IPv6 entries with an optional /prefix, and how an empty list is read.

use std::fmt;
use std::net::IpAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    addr: IpAddr,
    prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadEntry(pub String);

impl fmt::Display for BadEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad ACL entry: {}", self.0)
    }
}

impl std::error::Error for BadEntry {}

impl Entry {
    /// `IP` or `IP/prefix`, prefix at most 32 (IPv4) or 128 (IPv6).
    pub fn parse(s: &str) -> Result<Entry, BadEntry> {
        let bad = || BadEntry(s.to_string());
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => {
                // Only plain decimal digits: "+8" or " 8" are not prefixes an operator meant.
                if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                (ip, Some(p.parse::<u8>().map_err(|_| bad())?))
            }
            None => (s, None),
        };
        let addr: IpAddr = ip.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        // Peers are matched in canonical form (mapped addresses as IPv4), so entries are too.
        if let IpAddr::V6(v6) = addr
            && let Some(v4) = v6.to_ipv4_mapped()
            && prefix >= 96
        {
            return Ok(Entry { addr: IpAddr::V4(v4), prefix: prefix - 96 });
        }
        Ok(Entry { addr, prefix })
    }

    pub fn matches(&self, peer: IpAddr) -> bool {
        match (self.addr, canonical(peer)) {
            (IpAddr::V4(a), IpAddr::V4(p)) => prefix_eq(&a.octets(), &p.octets(), self.prefix),
            (IpAddr::V6(a), IpAddr::V6(p)) => prefix_eq(&a.octets(), &p.octets(), self.prefix),
            _ => false,
        }
    }
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A peer on a dual-stack socket shows up as ::ffff:a.b.c.d; match it against IPv4 entries.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let full = (bits / 8) as usize;
    if a[..full] != b[..full] {
        return false;
    }
    let rem = bits % 8;
    if rem == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rem);
    a[full] & mask == b[full] & mask
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    entries: Vec<Entry>,
    default_deny: bool,
}

impl Acl {
    /// Parses every entry; the first bad one fails the whole list, so nothing half-applies.
    pub fn parse<S: AsRef<str>>(entries: &[S], default_deny: bool) -> Result<Acl, BadEntry> {
        let entries = entries.iter().map(|e| Entry::parse(e.as_ref())).collect::<Result<_, _>>()?;
        Ok(Acl { entries, default_deny })
    }

    pub fn default_deny(&self) -> bool {
        self.default_deny
    }

    pub fn admits(&self, peer: IpAddr) -> bool {
        if self.entries.is_empty() {
            return !self.default_deny;
        }
        self.entries.iter().any(|e| e.matches(peer))
    }

    /// Whether any client at all can get in (the `clients_allowed` status key).
    pub fn allows_any(&self) -> bool {
        !(self.entries.is_empty() && self.default_deny)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parse_good_and_bad() {
        for good in ["127.0.0.1", "10.0.0.0/8", "0.0.0.0/0", "::1", "fe80::/10", "::/0", "1.2.3.4/32"] {
            assert!(Entry::parse(good).is_ok(), "{good}");
        }
        for bad in
            ["", "300.1.2.3", "10.0.0.0/33", "::1/129", "1.2.3.4/", "1.2.3.4/+8", "x", "1.2.3.4/8/8", "/8"]
        {
            assert_eq!(Entry::parse(bad), Err(BadEntry(bad.to_string())), "{bad}");
        }
    }

    #[test]
    fn matching() {
        let acl = Acl::parse(&["10.0.0.0/8", "192.168.1.7", "2001:db8::/33"], true).unwrap();
        assert!(acl.admits(ip("10.200.3.4")));
        assert!(!acl.admits(ip("11.0.0.1")));
        assert!(acl.admits(ip("192.168.1.7")));
        assert!(!acl.admits(ip("192.168.1.8")));
        assert!(acl.admits(ip("2001:db8:7fff::1")));
        assert!(!acl.admits(ip("2001:db8:8000::1")));
        assert!(acl.admits(ip("::ffff:10.1.1.1")));
        // A mapped entry matches both spellings of the address (fuzz finding).
        let mapped = Acl::parse(&["::ffff:127.0.0.1", "::ffff:10.0.0.0/104"], true).unwrap();
        assert!(mapped.admits(ip("127.0.0.1")));
        assert!(mapped.admits(ip("::ffff:127.0.0.1")));
        assert!(mapped.admits(ip("10.9.9.9")));
    }

    #[test]
    fn empty_list_and_default_deny() {
        assert!(Acl::parse::<&str>(&[], false).unwrap().admits(ip("1.1.1.1")));
        let deny = Acl::parse::<&str>(&[], true).unwrap();
        assert!(!deny.admits(ip("127.0.0.1")));
        assert!(!deny.allows_any());
    }

    #[test]
    fn one_bad_entry_fails_all() {
        assert_eq!(Acl::parse(&["127.0.0.1", "nope"], false), Err(BadEntry("nope".into())));
    }
}
