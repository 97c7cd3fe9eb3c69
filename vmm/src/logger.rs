//! A minimal `log` backend: one line per record, prefixed with `tern:` and
//! the level, on stderr or appended to a file chosen with `PUT /logger`.
//! Level from `TERN_LOG` (error, warn, info, debug, trace; default info).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

struct Logger {
    file: Mutex<Option<File>>,
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = record.level().as_str().to_ascii_lowercase();
        let line = format!("tern: {level}: {}\n", record.args());
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        match file.as_mut() {
            Some(f) => {
                let _ = f.write_all(line.as_bytes());
            }
            None => {
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger {
    file: Mutex::new(None),
};

/// Installs the logger. Safe to call more than once.
pub fn init() {
    let level = std::env::var("TERN_LOG")
        .ok()
        .and_then(|v| v.parse::<log::LevelFilter>().ok())
        .unwrap_or(log::LevelFilter::Info);
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

/// Changes the level and/or sends log lines to `path` (appended).
pub fn configure(level: Option<log::LevelFilter>, path: Option<&Path>) -> std::io::Result<()> {
    if let Some(path) = path {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot open log_path {}: {e}", path.display()),
                )
            })?;
        *LOGGER.file.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }
    if let Some(level) = level {
        log::set_max_level(level);
    }
    Ok(())
}
