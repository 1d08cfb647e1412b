//! Entry point: parse the command line, set up logging, run the command, map errors to exit codes.

use clap::Parser;
use flexnbd::budget;
use flexnbd::cli::{Cli, Command, LogOpts};
use flexnbd::deadlines::Limits;
use flexnbd::error::Error;
use flexnbd::event_loop::{self, ServeOptions};
use flexnbd::log::{self as flog, Verbosity};
use flexnbd::{fatal, remote};
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
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            fatal!("{e}");
            1
        }
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}

fn run(cli: Cli) -> Result<i32, Error> {
    match cli.command {
        Command::Serve(a) => serve(a, false),
        Command::Listen(a) => serve(a, true),
        Command::Status(a) => {
            flog::init(verbosity(&a.log));
            Ok(remote::print_reply(remote::control(&a.sock, "status", &[])?))
        }
        Command::Acl(a) => {
            flog::init(verbosity(&a.log));
            Ok(remote::print_reply(remote::control(&a.sock, "acl", &a.acl)?))
        }
        Command::Break(a) => {
            flog::init(verbosity(&a.log));
            Ok(remote::print_reply(remote::control(&a.sock, "break", &[])?))
        }
        Command::MirrorSpeed(a) => {
            flog::init(verbosity(&a.log));
            Ok(remote::print_reply(remote::control(&a.sock, "mirror_max_bps", &[a.max_bps.to_string()])?))
        }
        Command::Mirror(a) => {
            flog::init(verbosity(&a.log));
            let action = if a.unlink { "unlink" } else { "exit" };
            let mut args = vec![a.addr.clone(), a.port.to_string(), action.to_string()];
            if a.bind.is_some() || a.max_bps.is_some() || a.wait {
                // The request is positional: with no bind address, bind to the unspecified
                // address (what not binding means) and send 0 for "no speed limit".
                let unspecified = if a.addr.contains(':') { "::" } else { "0.0.0.0" };
                args.push(a.bind.clone().unwrap_or_else(|| unspecified.to_string()));
                args.push(a.max_bps.unwrap_or(0).to_string());
            }
            if a.wait {
                args.push("wait".to_string());
            }
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

fn serve(a: flexnbd::cli::ServeArgs, listen: bool) -> Result<i32, Error> {
    flog::init(verbosity(&a.log));
    event_loop::serve(ServeOptions {
        addr: a.addr,
        port: a.port,
        file: a.file,
        sock: a.sock,
        default_deny: a.default_deny,
        acl: a.acl,
        oldstyle: a.oldstyle,
        read_only: a.read_only,
        listen,
        workers: a.workers as usize,
        multi_conn: a.multi_conn,
        limits: Limits::from_secs(a.handshake_limit, a.stall_limit, a.max_clients as usize),
        payload_budget: a.payload_budget.unwrap_or_else(|| budget::default_limit(budget::host_ram())),
    })
}
