//! A subcommand's command line, one option at a time: `--flag value` or
//! `--flag=value`.

use std::ffi::{OsStr, OsString};

/// The arguments after the subcommand's name.
pub struct Flags<I> {
    it: I,
}

impl<I: Iterator<Item = OsString>> Flags<I> {
    /// Reads options from `it`.
    pub fn new(it: I) -> Self {
        Self { it }
    }

    /// The next argument: the flag, its value when written `--flag=value`,
    /// and the argument as given.
    #[allow(clippy::should_implement_trait, clippy::type_complexity)]
    pub fn next(&mut self) -> Result<Option<(String, Option<String>, String)>, String> {
        let Some(arg) = self.it.next() else {
            return Ok(None);
        };
        let arg = arg
            .into_string()
            .map_err(|a| format!("bad argument {a:?}"))?;
        Ok(Some(match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string()), arg),
            _ => (arg.clone(), None, arg),
        }))
    }

    /// The value of `flag`: `inline` (from `--flag=value`), else the next
    /// argument (one that is not UTF-8 counts as missing).
    pub fn value(&mut self, flag: &str, inline: &Option<String>) -> Result<String, String> {
        self.value_os(flag, inline)?
            .into_string()
            .map_err(|_| format!("option '{flag}' needs a value"))
    }

    /// The value of `flag` as given: `inline` (from `--flag=value`), else
    /// the next argument, which need not be UTF-8 (a path).
    pub fn value_os(&mut self, flag: &str, inline: &Option<String>) -> Result<OsString, String> {
        match inline {
            Some(v) => Ok(v.into()),
            None => self
                .it
                .next()
                .ok_or_else(|| format!("option '{flag}' needs a value")),
        }
    }
}

/// `v`, the value of `flag`, as a number of at least `min` (a `v` that is
/// not UTF-8 is shown lossily in the message).
pub fn number(flag: &str, v: impl AsRef<OsStr>, min: u64) -> Result<u64, String> {
    let s = v.as_ref().to_string_lossy();
    let n: u64 = s
        .parse()
        .map_err(|_| format!("{flag}: '{s}' is not a number"))?;
    if n < min {
        return Err(format!("{flag} must be at least {min}"));
    }
    Ok(n)
}
