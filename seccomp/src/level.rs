//! `--seccomp-level`: how strict the filters are.

use std::fmt;
use std::str::FromStr;

/// How strict the filters are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Level {
    /// 0: no filter.
    Off,
    /// 1: only the listed syscalls, whatever their arguments.
    Syscalls,
    /// 2 (the default): the listed syscalls, with argument conditions
    /// where they matter (ioctl numbers, socket families, mapping flags).
    #[default]
    Args,
}

/// A `--seccomp-level` value that is not 0, 1 or 2.
#[derive(Debug, thiserror::Error)]
#[error("invalid seccomp level '{0}': use 0 (off), 1 (syscalls) or 2 (syscalls and arguments)")]
pub struct LevelError(pub String);

impl Level {
    /// The number on the command line.
    pub fn number(self) -> u8 {
        match self {
            Level::Off => 0,
            Level::Syscalls => 1,
            Level::Args => 2,
        }
    }
}

impl FromStr for Level {
    type Err = LevelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "0" => Ok(Level::Off),
            "1" => Ok(Level::Syscalls),
            "2" => Ok(Level::Args),
            _ => Err(LevelError(s.to_string())),
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.number())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_levels_only() {
        assert_eq!("0".parse::<Level>().unwrap(), Level::Off);
        assert_eq!("1".parse::<Level>().unwrap(), Level::Syscalls);
        assert_eq!("2".parse::<Level>().unwrap(), Level::Args);
        assert!("3".parse::<Level>().is_err());
        assert!("".parse::<Level>().is_err());
        assert_eq!(Level::default().to_string(), "2");
    }
}
