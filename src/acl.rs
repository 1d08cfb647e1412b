//! Access control: IPv4/IPv6 entries with an optional /prefix, and how an empty list is read.

use std::fmt;
use std::net::IpAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    addr: IpAddr,
    prefix: u8,
}

/// An entry that is not an ACL entry: the text as given, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadEntry(pub String, pub Why);

/// What is wrong with a bad entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    NotAnAddress,
    /// Empty, signed, or not decimal digits.
    PrefixNotANumber,
    PrefixTooLong {
        max: u8,
    },
}

impl fmt::Display for BadEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = &self.0;
        match self.1 {
            Why::NotAnAddress => write!(f, "bad ACL entry {e:?}: not an IPv4 or IPv6 address"),
            Why::PrefixNotANumber => {
                write!(f, "bad ACL entry {e:?}: the prefix length after / must be a decimal number")
            }
            Why::PrefixTooLong { max } => {
                let fam = if max == 32 { "IPv4" } else { "IPv6" };
                write!(
                    f,
                    "bad ACL entry {e:?}: the prefix length is over {max}, the most an {fam} address has"
                )
            }
        }
    }
}

impl std::error::Error for BadEntry {}

impl Entry {
    /// `IP` or `IP/prefix`, prefix at most 32 (IPv4) or 128 (IPv6).
    pub fn parse(s: &str) -> Result<Entry, BadEntry> {
        let bad = |why| BadEntry(s.to_string(), why);
        let (ip, prefix) = match s.split_once('/') {
            // Only plain decimal digits: "+8" or " 8" are not prefixes an operator meant.
            Some((_, p)) if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) => {
                return Err(bad(Why::PrefixNotANumber));
            }
            // Past three digits it is too long whatever it says (and u8 would overflow).
            Some((ip, p)) => (ip, Some(p.parse::<u8>().unwrap_or(u8::MAX))),
            None => (s, None),
        };
        let addr: IpAddr = ip.parse().map_err(|_| bad(Why::NotAnAddress))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad(Why::PrefixTooLong { max }));
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
        let v4_long = Why::PrefixTooLong { max: 32 };
        for (bad, why) in [
            ("", Why::NotAnAddress),
            ("300.1.2.3", Why::NotAnAddress),
            ("10.0.0.0/33", v4_long),
            ("10.0.0.0/0033", v4_long),
            ("10.0.0.0/99999999999", v4_long),
            ("::1/129", Why::PrefixTooLong { max: 128 }),
            ("1.2.3.4/", Why::PrefixNotANumber),
            ("1.2.3.4/+8", Why::PrefixNotANumber),
            ("x", Why::NotAnAddress),
            ("x/8", Why::NotAnAddress),
            ("1.2.3.4/8/8", Why::PrefixNotANumber),
            ("/8", Why::NotAnAddress),
        ] {
            assert_eq!(Entry::parse(bad), Err(BadEntry(bad.to_string(), why)), "{bad}");
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
        assert_eq!(
            Acl::parse(&["127.0.0.1", "nope"], false),
            Err(BadEntry("nope".into(), Why::NotAnAddress))
        );
    }

    #[test]
    fn errors_say_why() {
        let msg = |s| Entry::parse(s).unwrap_err().to_string();
        assert!(msg("10.0.0.0/33").contains("over 32"), "{}", msg("10.0.0.0/33"));
        assert!(msg("::/200").contains("over 128"), "{}", msg("::/200"));
        assert!(msg("example.com").contains("not an IPv4 or IPv6 address"));
        assert!(msg("1.2.3.4/x").contains("decimal number"));
    }
}
