//! Error enums with context. Messages are lowercase and say what was being done to what.

use std::fmt;
use std::io;
use std::path::PathBuf;

#[derive(Debug)]
pub enum Error {
    File { path: PathBuf, source: io::Error },
    NotAFile(PathBuf),
    BadAddress(String),
    Listen { addr: String, source: io::Error },
    Acl(crate::acl::BadEntry),
    ControlSocket { path: PathBuf, source: io::Error },
    ControlSocketInUse(PathBuf),
    Setup { what: &'static str, source: io::Error },
    Remote(String),
    Io { what: String, source: io::Error },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::File { path, source } => write!(f, "cannot open {}: {source}", path.display()),
            Error::NotAFile(p) => write!(f, "{} is not a regular file or block device", p.display()),
            Error::BadAddress(a) => write!(f, "bad address: {a}"),
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

impl From<crate::acl::BadEntry> for Error {
    fn from(e: crate::acl::BadEntry) -> Self {
        Error::Acl(e)
    }
}
