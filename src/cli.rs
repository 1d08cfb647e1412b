//! Command-line grammar: the original flexnbd manual's commands and options (long and short),
//! plus our additions (`--oldstyle`, `--read-only`, `--workers`, `--multi-conn`, `--unix`,
//! `mirror --wait/--max-bps`, `mirror-speed`).

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "flexnbd",
    version,
    about = "A fast NBD server that can live-migrate the file it serves",
    propagate_version = true,
    disable_help_subcommand = false
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Logging options every command accepts; the last of -v/-q on the line wins.
#[derive(Args, Debug, Clone, Copy, Default)]
pub struct LogOpts {
    /// Log everything from I upwards (D too in debug builds) to stderr
    #[arg(short, long, global = true, overrides_with = "quiet")]
    pub verbose: bool,
    /// Log only fatal (F) lines to stderr
    #[arg(short, long, global = true, overrides_with = "verbose")]
    pub quiet: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve a file over NBD until a signal or a completed migration
    Serve(ServeArgs),
    /// Serve a file as the destination of an inbound migration; exit 0 once it completes
    Listen(ServeArgs),
    /// Ask the server behind SOCK to migrate its file to ADDR:PORT
    Mirror(MirrorArgs),
    /// Change the speed limit of a running migration
    MirrorSpeed(MirrorSpeedArgs),
    /// Stop a running migration
    Break(SockArgs),
    /// Replace the access control list of the server behind SOCK
    Acl(AclArgs),
    /// Print the status line of the server behind SOCK
    Status(SockArgs),
    /// Read SIZE bytes at OFFSET from an NBD server and write them to stdout
    Read(RemoteIoArgs),
    /// Read SIZE bytes from stdin and write them at OFFSET on an NBD server
    Write(RemoteIoArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on (IPv4, IPv6 or a host name)
    #[arg(short = 'l', long = "addr", value_name = "ADDR", requires = "port", conflicts_with = "unix")]
    pub addr: Option<String>,
    /// TCP port to listen on (0 picks a free one, logged at I level)
    #[arg(short = 'p', long = "port", value_name = "PORT", requires = "addr", conflicts_with = "unix")]
    pub port: Option<u16>,
    /// Listen on a Unix socket at PATH instead of TCP (ACL entries do not apply to it)
    #[arg(short = 'U', long = "unix", value_name = "PATH")]
    pub unix: Option<PathBuf>,
    /// File mode of the --unix socket, in octal
    #[arg(long = "unix-mode", value_name = "MODE", requires = "unix", value_parser = parse_mode)]
    pub unix_mode: Option<u32>,
    /// The file to serve; it must already exist
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: PathBuf,
    /// Path of the control socket to create
    #[arg(short = 's', long = "sock", value_name = "SOCK")]
    pub sock: Option<PathBuf>,
    /// With an empty ACL, admit no client (default: an empty ACL admits everyone)
    #[arg(short = 'd', long = "default-deny")]
    pub default_deny: bool,
    /// Send the original 152-byte oldstyle hello instead of fixed newstyle negotiation
    #[arg(long)]
    pub oldstyle: bool,
    /// Refuse writes (EPERM) and advertise a read-only export
    #[arg(long = "read-only")]
    pub read_only: bool,
    /// Disk worker threads
    #[arg(long = "workers", value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub workers: u16,
    /// Advertise multi-conn (CAN_MULTI_CONN); auto: only on hosts with more than 2 CPUs
    #[arg(long = "multi-conn", value_name = "WHEN", value_enum, default_value_t = MultiConn::Auto)]
    pub multi_conn: MultiConn,
    /// Close a client that has not finished negotiating within SECS seconds (0: no limit)
    #[arg(long = "handshake-limit", value_name = "SECS", default_value_t = 10)]
    pub handshake_limit: u64,
    /// Most NBD clients connected at once; further connections are closed at once
    #[arg(long = "max-clients", value_name = "N", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_clients: u32,
    /// Memory for the WRITE payloads of all clients together, e.g. 256M [default: 256M, or a
    /// quarter of the RAM if that is less]
    #[arg(long = "payload-budget", value_name = "SIZE", value_parser = crate::budget::parse_size)]
    pub payload_budget: Option<usize>,
    /// Close a client that stops for SECS seconds in the middle of a WRITE payload (0: no limit)
    #[arg(long = "stall-limit", value_name = "SECS", default_value_t = 60)]
    pub stall_limit: u64,
    /// ACL entries: IP addresses with an optional /prefix
    #[arg(value_name = "ACL_ENTRY")]
    pub acl: Vec<String>,
    #[command(flatten)]
    pub log: LogOpts,
}

/// Whether clients are told they may open several connections to the export.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum MultiConn {
    Auto,
    On,
    Off,
}

impl MultiConn {
    /// What the server is told: `None` leaves it to the CPU count (see
    /// `event_loop::advertise_multi_conn`).
    pub fn choice(self) -> Option<bool> {
        match self {
            MultiConn::On => Some(true),
            MultiConn::Off => Some(false),
            MultiConn::Auto => None,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct MirrorArgs {
    /// Address of the destination server (IPv4, IPv6 or a host name)
    #[arg(
        short = 'l',
        long = "addr",
        value_name = "ADDR",
        required_unless_present = "unix",
        conflicts_with = "unix"
    )]
    pub addr: Option<String>,
    /// Port of the destination server
    #[arg(
        short = 'p',
        long = "port",
        value_name = "PORT",
        required_unless_present = "unix",
        conflicts_with = "unix"
    )]
    pub port: Option<u16>,
    /// Unix socket of a destination on this host (`listen --unix`), instead of --addr/--port
    #[arg(short = 'U', long = "unix", value_name = "PATH", conflicts_with = "bind")]
    pub unix: Option<PathBuf>,
    /// Control socket of the local (source) server
    #[arg(short = 's', long = "sock", value_name = "SOCK")]
    pub sock: PathBuf,
    /// Unlink the served file once all data has reached the destination
    #[arg(short = 'u', long = "unlink")]
    pub unlink: bool,
    /// Local address the source binds to before connecting
    #[arg(short = 'b', long = "bind", value_name = "BIND_ADDR")]
    pub bind: Option<String>,
    /// Limit the migration to N bytes per second
    #[arg(long = "max-bps", value_name = "N")]
    pub max_bps: Option<u64>,
    /// Stay until the migration finishes, showing progress; exit 0 only on a completed handover
    #[arg(short = 'w', long = "wait")]
    pub wait: bool,
    /// Longest time clients may be held at the handover before the attempt is abandoned and
    /// retried (seconds, fractions allowed; default 2)
    #[arg(long = "freeze-limit", value_name = "SECS", value_parser = parse_freeze_limit)]
    pub freeze_limit: Option<std::time::Duration>,
    /// How client writes reach the destination: auto (background passes, then active once
    /// they stop shrinking), background, or active (each write also goes to the destination
    /// and is acknowledged once it has it)
    #[arg(long = "mode", value_name = "MODE", value_parser = parse_mode_arg)]
    pub mode: Option<crate::migration::Mode>,
    #[command(flatten)]
    pub log: LogOpts,
}

fn parse_mode_arg(s: &str) -> Result<crate::migration::Mode, String> {
    crate::migration::Mode::parse(s).ok_or_else(|| format!("{s:?} is not one of auto, background, active"))
}

/// Seconds as a positive decimal, at most an hour, to whole milliseconds.
fn parse_freeze_limit(s: &str) -> Result<std::time::Duration, String> {
    match s.parse::<f64>() {
        Ok(secs) if secs.is_finite() && (0.001..=3600.0).contains(&secs) => {
            Ok(std::time::Duration::from_millis((secs * 1000.0).round() as u64))
        }
        _ => Err(format!("{s:?} is not a number of seconds between 0.001 and 3600")),
    }
}

#[derive(Args, Debug, Clone)]
pub struct MirrorSpeedArgs {
    /// Control socket of the migrating server
    #[arg(short = 's', long = "sock", value_name = "SOCK")]
    pub sock: PathBuf,
    /// New limit in bytes per second (0 removes the limit)
    #[arg(long = "max-bps", value_name = "N")]
    pub max_bps: u64,
    #[command(flatten)]
    pub log: LogOpts,
}

#[derive(Args, Debug, Clone)]
pub struct SockArgs {
    /// Control socket of the server
    #[arg(short = 's', long = "sock", value_name = "SOCK")]
    pub sock: PathBuf,
    #[command(flatten)]
    pub log: LogOpts,
}

#[derive(Args, Debug, Clone)]
pub struct AclArgs {
    /// Control socket of the server
    #[arg(short = 's', long = "sock", value_name = "SOCK")]
    pub sock: PathBuf,
    /// The new ACL entries (none: an empty ACL)
    #[arg(value_name = "ACL_ENTRY")]
    pub acl: Vec<String>,
    #[command(flatten)]
    pub log: LogOpts,
}

#[derive(Args, Debug, Clone)]
pub struct RemoteIoArgs {
    /// Address of the NBD server (IPv4, IPv6 or a host name)
    #[arg(short = 'l', long = "addr", value_name = "ADDR")]
    pub addr: String,
    /// Port of the NBD server
    #[arg(short = 'p', long = "port", value_name = "PORT")]
    pub port: u16,
    /// Byte offset (at most 2^62)
    #[arg(short = 'F', long = "from", value_name = "OFFSET")]
    pub from: u64,
    /// Number of bytes (at most 2^30)
    #[arg(short = 'S', long = "size", value_name = "SIZE")]
    pub size: u64,
    /// Local address to bind to (for servers with an ACL)
    #[arg(short = 'b', long = "bind", value_name = "BIND_ADDR")]
    pub bind: Option<String>,
    #[command(flatten)]
    pub log: LogOpts,
}

/// An octal file mode such as 600 or 0660.
fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s, 8) {
        Ok(m) if m <= 0o777 && !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => Ok(m),
        _ => Err("expected an octal file mode from 0 to 777, such as 600 or 0660".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_modes_are_octal() {
        assert_eq!(parse_mode("600"), Ok(0o600));
        assert_eq!(parse_mode("0660"), Ok(0o660));
        for bad in ["", "8", "1000", "+600", "rw"] {
            assert!(parse_mode(bad).is_err(), "{bad}");
        }
    }
}
