//! A subcommand's command line, one option at a time: `--flag value` or
//! `--flag=value`.

use std::ffi::OsString;

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
    /// argument.
    pub fn value(&mut self, flag: &str, inline: &Option<String>) -> Result<String, String> {
        match inline {
            Some(v) => Ok(v.clone()),
            None => self
                .it
                .next()
                .and_then(|v| v.into_string().ok())
                .ok_or_else(|| format!("option '{flag}' needs a value")),
        }
    }
}
