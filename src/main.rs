//! Entry point: parse the command line, set up logging, run the command, map errors to exit codes.
//!
//! A person at a prompt gets `flexnbd: <sentence>` on stderr and status 2 for a bad command line
//! (1 for anything else); the manual's log format is for what a running server logs.

use clap::Parser;
use flexnbd::budget;
use flexnbd::cli::{Cli, Command, LogOpts, MirrorArgs, ServeArgs};
use flexnbd::conn::control::{MirrorRequest, speed_slot};
use flexnbd::deadlines::Limits;
use flexnbd::error::Error;
use flexnbd::event_loop::{self, ServeOptions};
use flexnbd::listener::{self, DEFAULT_UNIX_MODE, Endpoint};
use flexnbd::log::{self as flog, Verbosity};
use flexnbd::{remote, systemd};
use std::net::SocketAddr;
use std::process::ExitCode;

fn verbosity(l: &LogOpts) -> Verbosity {
    if l.verbose {
        Verbosity::Verbose
    } else if l.quiet {
        Verbosity::Quiet
    } else {
        Verbosity::Normal
    }
}

fn main() -> ExitCode {
    // Before anything else (and before any thread): the sockets systemd may have passed.
    let inherited = systemd::listen_fds();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    match run(cli, inherited) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("flexnbd: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// clap's own messages, as `flexnbd: ...` followed by its usage hint; help and version as clap
/// prints them.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        // clap would name a subcommand's version `flexnbd-serve`: one program, one version.
        ErrorKind::DisplayVersion => {
            println!("flexnbd {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        ErrorKind::DisplayHelp => e.exit(),
        _ => {}
    }
    let text = e.render().to_string();
    let text = text.strip_prefix("error: ").unwrap_or(&text);
    eprint!("flexnbd: {text}");
    ExitCode::from(2)
}

fn run(cli: Cli, inherited: Vec<std::os::fd::OwnedFd>) -> Result<i32, Error> {
    match cli.command {
        Command::Serve(a) => serve(a, false, inherited),
        Command::Listen(a) => serve(a, true, inherited),
        Command::Status(a) => {
            flog::init(verbosity(&a.log));
            Ok(remote::print_reply(remote::control(&a.sock, "status", &[])?))
        }
        Command::Acl(a) => {
            flog::init(verbosity(&a.log));
            // Checked here too, so a typo is a command-line error that says what is wrong.
            flexnbd::acl::Acl::parse(&a.acl, false)?;
            Ok(remote::print_reply(remote::control(&a.sock, "acl", &a.acl)?))
        }
        Command::Break(a) => {
            flog::init(verbosity(&a.log));
            Ok(remote::print_reply(remote::control(&a.sock, "break", &[])?))
        }
        Command::MirrorSpeed(a) => {
            flog::init(verbosity(&a.log));
            Ok(remote::print_reply(remote::control(&a.sock, "mirror_max_bps", &[speed_slot(a.max_bps)])?))
        }
        Command::Mirror(a) => {
            flog::init(verbosity(&a.log));
            let args = mirror_request(&a)?;
            remote::mirror_cmd(&a.sock, &args, a.wait)
        }
        Command::Read(a) => {
            flog::init(verbosity(&a.log));
            remote::read_cmd(&a.addr, a.port, a.from, a.size, a.bind.as_deref()).map(|_| 0)
        }
        Command::Write(a) => {
            flog::init(verbosity(&a.log));
            remote::write_cmd(&a.addr, a.port, a.from, a.size, a.bind.as_deref()).map(|_| 0)
        }
    }
}

/// The control socket's `mirror` request lines. Host names are resolved here: the request
/// carries addresses, as the original's did. A Unix destination goes as `unix:PATH` (absolute,
/// since the server's working directory is not ours) with port 0.
fn mirror_request(a: &MirrorArgs) -> Result<Vec<String>, Error> {
    let bind = match a.bind.as_deref() {
        Some(b) => Some(listener::resolve(b, 0)?),
        None => None,
    };
    let (addr, port) = match (&a.unix, &a.addr, a.port) {
        (Some(p), _, _) => {
            let abs = std::path::absolute(p)
                .map_err(|e| Error::Usage(format!("cannot make {} absolute: {e}", p.display())))?;
            (format!("{}{}", flexnbd::net::UNIX_PREFIX, abs.display()), 0)
        }
        (None, Some(addr), Some(port)) => {
            let all = listener::resolve_all(addr, port)?;
            // Behind a bind address only its family can be reached.
            let pick = all.iter().find(|t| bind.is_none_or(|b: SocketAddr| b.is_ipv4() == t.is_ipv4()));
            let t = pick
                .ok_or_else(|| Error::Usage(format!("{addr} has no address of the bind address's family")))?;
            (t.ip().to_string(), port)
        }
        _ => return Err(Error::Usage("mirror needs --addr and --port, or --unix".into())),
    };
    let req = MirrorRequest {
        addr,
        port,
        unlink: a.unlink,
        bind: bind.map(|b| b.ip().to_string()),
        max_bps: a.max_bps,
        wait: a.wait,
        freeze_limit: a.freeze_limit,
        mode: a.mode,
    };
    Ok(req.slots())
}

/// Where `serve`/`listen` listens: `--addr/--port`, `--unix`, or the socket systemd passed.
fn endpoint(a: &ServeArgs, mut inherited: Vec<std::os::fd::OwnedFd>) -> Result<Endpoint, Error> {
    let given = a.addr.is_some() || a.unix.is_some();
    match inherited.len() {
        0 => {}
        1 if given => {
            return Err(Error::Usage(
                "systemd passed a listening socket: leave out --addr/--port and --unix".into(),
            ));
        }
        1 => return Ok(Endpoint::Inherited(inherited.remove(0))),
        n => {
            return Err(Error::Usage(format!(
                "systemd passed {n} sockets; flexnbd listens on one (give the socket unit a single ListenStream=)"
            )));
        }
    }
    match (&a.addr, a.port, &a.unix) {
        (_, _, Some(path)) => {
            Ok(Endpoint::Unix { path: path.clone(), mode: a.unix_mode.unwrap_or(DEFAULT_UNIX_MODE) })
        }
        (Some(addr), Some(port), None) => Ok(Endpoint::Tcp(listener::resolve(addr, port)?)),
        _ => Err(Error::Usage(
            "nowhere to listen: give --addr and --port, or --unix PATH (or start it with systemd socket activation)"
                .into(),
        )),
    }
}

fn serve(a: ServeArgs, listen: bool, inherited: Vec<std::os::fd::OwnedFd>) -> Result<i32, Error> {
    flexnbd::acl::Acl::parse(&a.acl, a.default_deny)?;
    let endpoint = endpoint(&a, inherited)?;
    flog::init(verbosity(&a.log));
    let server = event_loop::Server::new(ServeOptions {
        endpoint,
        file: a.file,
        sock: a.sock,
        default_deny: a.default_deny,
        acl: a.acl,
        oldstyle: a.oldstyle,
        read_only: a.read_only,
        listen,
        workers: a.workers as usize,
        multi_conn: a.multi_conn.choice(),
        limits: Limits::from_secs(a.handshake_limit, a.stall_limit, a.max_clients as usize),
        payload_budget: a.payload_budget.unwrap_or_else(|| budget::default_limit(budget::host_ram())),
    })?;
    // Once it runs, what ends it is the daemon's business: its log, in the manual's format.
    server.run().or_else(|e| {
        flexnbd::fatal!("{e}");
        Ok(1)
    })
}
