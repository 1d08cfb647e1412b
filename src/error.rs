//! Error enums with context. Messages are lowercase and say what was being done to what.

use std::fmt;
use std::io;
use std::path::PathBuf;

#[derive(Debug)]
pub enum Error {
    /// A command line that parsed but makes no sense (exit status 2).
    Usage(String),
    File {
        path: PathBuf,
        source: io::Error,
    },
    NotAFile(PathBuf),
    BadAddress(String),
    Listen {
        addr: String,
        source: io::Error,
    },
    Acl(crate::acl::BadEntry),
    ControlSocket {
        path: PathBuf,
        source: io::Error,
    },
    ControlSocketInUse(PathBuf),
    Setup {
        what: &'static str,
        source: io::Error,
    },
    Remote(String),
    Io {
        what: String,
        source: io::Error,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(msg) => write!(f, "{msg}"),
            Error::File { path, source } => write!(f, "cannot open {}: {source}", path.display()),
            Error::NotAFile(p) => write!(f, "{} is not a regular file or block device", p.display()),
            Error::BadAddress(a) => {
                write!(f, "bad address {a:?}: not an IP address or a host name that resolves")
            }
            Error::Listen { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            Error::Acl(e) => write!(f, "{e}"),
            Error::ControlSocket { path, source } => {
                write!(f, "control socket {}: {source}", path.display())
            }
            Error::ControlSocketInUse(p) => {
                write!(f, "control socket {} is in use by a running server", p.display())
            }
            Error::Setup { what, source } => write!(f, "{what}: {source}"),
            Error::Remote(msg) => write!(f, "{msg}"),
            Error::Io { what, source } => write!(f, "{what}: {source}"),
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    /// The exit status: 2 for a bad command line (including an address or ACL entry given on
    /// it), 1 for anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) | Error::BadAddress(_) | Error::Acl(_) => 2,
            _ => 1,
        }
    }
}

impl From<crate::acl::BadEntry> for Error {
    fn from(e: crate::acl::BadEntry) -> Self {
        Error::Acl(e)
    }
}
