//! The manual's log line, `<LEVEL>:<PID> <THREAD> <SOURCEFILE>:<SOURCELINE>: <MSG>`, on stderr.
//!
//! simplelog cannot produce this layout (it always adds its own level brackets and target), so
//! this small `log::Log` takes its place. Levels map D=debug, I=info, W=warn, E=error; F (fatal)
//! is an error logged with target "fatal" through [`fatal!`](crate::fatal), and is the only
//! thing `--quiet` lets through.

use log::{Level, LevelFilter, Metadata, Record};
use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};

pub const FATAL_TARGET: &str = "fatal";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verbosity {
    Quiet,
    Normal,
    Verbose,
}

struct Logger {
    max: LevelFilter,
    quiet: bool,
}

static PID: AtomicU32 = AtomicU32::new(0);

impl log::Log for Logger {
    fn enabled(&self, m: &Metadata) -> bool {
        if self.quiet {
            return m.target() == FATAL_TARGET;
        }
        m.level() <= self.max || m.target() == FATAL_TARGET
    }

    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let letter = match r.level() {
            _ if r.target() == FATAL_TARGET => 'F',
            Level::Error => 'E',
            Level::Warn => 'W',
            Level::Info => 'I',
            Level::Debug | Level::Trace => 'D',
        };
        let t = std::thread::current();
        let thread = t.name().unwrap_or("thread");
        let file = r.file().unwrap_or("?");
        let line = r.line().unwrap_or(0);
        let pid = PID.load(Ordering::Relaxed);
        // One write per line so lines from different threads never interleave mid-line.
        let s = format!("{letter}:{pid} {thread} {file}:{line}: {}\n", r.args());
        let _ = std::io::stderr().lock().write_all(s.as_bytes());
    }

    fn flush(&self) {}
}

pub fn init(v: Verbosity) {
    PID.store(std::process::id(), Ordering::Relaxed);
    let max = match v {
        Verbosity::Quiet => LevelFilter::Error,
        Verbosity::Normal => LevelFilter::Warn,
        Verbosity::Verbose if cfg!(debug_assertions) => LevelFilter::Debug,
        Verbosity::Verbose => LevelFilter::Info,
    };
    let logger = Logger { max, quiet: v == Verbosity::Quiet };
    if log::set_logger(Box::leak(Box::new(logger))).is_ok() {
        log::set_max_level(max);
    }
}

/// Log at F level: something that ends the process.
#[macro_export]
macro_rules! fatal {
    ($($arg:tt)*) => { log::error!(target: $crate::log::FATAL_TARGET, $($arg)*) };
}
