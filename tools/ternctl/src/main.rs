//! ternctl: a command-line client for tern's HTTP API on a Unix socket
//! (`tern --api-sock PATH`). See docs/api.md for the API itself.

mod client;
mod commands;

use std::ffi::OsString;
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};

use crate::client::Client;
use crate::commands::CliError;

const AFTER_HELP: &str = "\
ENDPOINT may be given with or without a leading '/'. JSON is given inline,
as @FILE, or as - to read it from stdin; it is checked before it is sent.

Examples:
  ternctl --sock /tmp/tern.sock put machine-config '{\"vcpu_count\": 2, \"mem_size_mib\": 256}'
  ternctl --sock /tmp/tern.sock put boot-source @boot.json
  TERN_API_SOCK=/tmp/tern.sock ternctl start

Exit status: 0 success, 1 the VMM refused the request (4xx/5xx; its
fault_message is printed), 2 no usable answer (socket missing, refused,
timed out, malformed response) or a usage or local error.";

/// Command-line arguments.
#[derive(Parser, Debug)]
#[command(
    name = "ternctl",
    version,
    about = "Drive a tern microVM over its HTTP API socket",
    after_help = AFTER_HELP
)]
pub struct Cli {
    /// tern's API socket (the PATH given to `tern --api-sock PATH`)
    #[arg(
        long,
        short = 's',
        value_name = "PATH",
        env = "TERN_API_SOCK",
        global = true
    )]
    pub sock: Option<PathBuf>,

    /// Give up after SECS seconds (connect, send and read together)
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 10,
        global = true,
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    pub timeout: u64,

    /// Print `ok` for a success without a body
    #[arg(long, short = 'v', global = true)]
    pub verbose: bool,

    /// What to do
    #[command(subcommand)]
    pub command: Command,
}

/// The ternctl commands.
#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Show the instance: id, state, version (GET /)
    Info,
    /// Show the effective VM configuration, usable as --config-file (GET /vm/config)
    Config,
    /// List the VM's devices (GET /devices)
    Devices,
    /// Show the metrics (GET /metrics)
    Metrics,
    /// Pause the VM's vCPUs (PATCH /vm {"state":"Paused"})
    Pause,
    /// Resume a paused VM (PATCH /vm {"state":"Resumed"})
    Resume,
    /// Boot the configured VM (PUT /actions {"action_type":"InstanceStart"})
    Start,
    /// Send Ctrl+Alt+Del to the guest (PUT /actions {"action_type":"SendCtrlAltDel"})
    CtrlAltDel,
    /// Measure how fast the guest dirties memory over PERIOD seconds and
    /// print the result (PUT /dirty-rate, then GET /dirty-rate)
    DirtyRate {
        /// Seconds to measure over (1 to 60)
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=60))]
        period: u64,
    },
    /// Hot plug, hot unplug or list devices
    Device {
        /// What to do
        #[command(subcommand)]
        action: DeviceAction,
    },
    /// GET any endpoint and print its JSON
    Get {
        /// The API path, e.g. machine-config or /vm/config
        endpoint: String,
    },
    /// PUT a JSON body to an endpoint
    Put {
        /// The API path, e.g. machine-config or /boot-source
        endpoint: String,
        /// The body: inline JSON, @FILE, or - for stdin
        #[arg(value_name = "JSON", allow_hyphen_values = true)]
        body: String,
    },
    /// PATCH an endpoint with a JSON body
    Patch {
        /// The API path, e.g. machine-config or /vm
        endpoint: String,
        /// The body: inline JSON, @FILE, or - for stdin
        #[arg(value_name = "JSON", allow_hyphen_values = true)]
        body: String,
    },
}

/// `ternctl device ...`.
#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum DeviceAction {
    /// List the VM's devices (GET /devices)
    List,
    /// Add a drive or NIC; after boot it is hot plugged (PUT /drives/ID or
    /// /network-interfaces/ID)
    Add {
        /// `drive` or `net`
        #[arg(value_parser = ["drive", "net"])]
        kind: String,
        /// The drive or interface id
        id: String,
        /// The body: inline JSON, @FILE, or - for stdin
        #[arg(value_name = "JSON", allow_hyphen_values = true)]
        body: String,
    },
    /// Remove a drive or NIC; after boot it is hot unplugged once the guest
    /// lets go (DELETE /drives/ID or /network-interfaces/ID)
    Remove {
        /// `drive` or `net`
        #[arg(value_parser = ["drive", "net"])]
        kind: String,
        /// The drive or interface id
        id: String,
    },
}

/// Parses the command line; `--sock` (or `TERN_API_SOCK`) is required but may
/// stand before or after the command, so it is checked here, not by clap.
pub fn parse_args<I, T>(args: I) -> Result<(Cli, PathBuf), clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = Cli::try_parse_from(args)?;
    match cli.sock.clone().filter(|sock| !sock.as_os_str().is_empty()) {
        Some(sock) => Ok((cli, sock)),
        None => Err(Cli::command().error(
            clap::error::ErrorKind::MissingRequiredArgument,
            "the API socket is not set: give --sock PATH or set TERN_API_SOCK",
        )),
    }
}

/// Runs one command and returns what to print on stdout.
fn run(cli: &Cli, sock: PathBuf) -> Result<String, CliError> {
    let request = commands::request_for(&cli.command, io::stdin().lock())?;
    let client = Client::new(sock, Duration::from_secs(cli.timeout));
    let response = client.send(&request)?;
    let text = commands::render(&response, cli.verbose)?;
    if let Command::DirtyRate { period } = cli.command {
        return commands::wait_dirty_rate(&client, period);
    }
    Ok(text)
}

fn main() -> ExitCode {
    let (cli, sock) = match parse_args(std::env::args_os()) {
        Ok(parsed) => parsed,
        Err(err) => err.exit(),
    };
    let result = run(&cli, sock).and_then(|text| {
        let mut stdout = io::stdout().lock();
        stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush())
            .map_err(CliError::Output)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let _ = writeln!(io::stderr().lock(), "ternctl: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<(Cli, PathBuf), clap::Error> {
        parse_args(std::iter::once("ternctl").chain(args.iter().copied()))
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sock_before_or_after_the_command() {
        let (cli, sock) = parse(&["--sock", "/tmp/a.sock", "info"]).unwrap();
        assert_eq!(sock, PathBuf::from("/tmp/a.sock"));
        assert_eq!(cli.command, Command::Info);
        assert_eq!(cli.timeout, 10);
        assert!(!cli.verbose);
        let (cli, sock) = parse(&["pause", "-s", "/tmp/b.sock", "--timeout", "3", "-v"]).unwrap();
        assert_eq!(sock, PathBuf::from("/tmp/b.sock"));
        assert_eq!(cli.command, Command::Pause);
        assert_eq!(cli.timeout, 3);
        assert!(cli.verbose);
    }

    #[test]
    fn every_command_parses() {
        let cases: [(&[&str], Command); 8] = [
            (&["info"], Command::Info),
            (&["config"], Command::Config),
            (&["devices"], Command::Devices),
            (&["metrics"], Command::Metrics),
            (&["pause"], Command::Pause),
            (&["resume"], Command::Resume),
            (&["start"], Command::Start),
            (&["ctrl-alt-del"], Command::CtrlAltDel),
        ];
        for (args, expected) in cases {
            let mut all = vec!["--sock", "/s"];
            all.extend_from_slice(args);
            assert_eq!(parse(&all).unwrap().0.command, expected);
        }
    }

    #[test]
    fn get_put_patch_take_endpoint_and_body() {
        let (cli, _) = parse(&["--sock", "/s", "get", "machine-config"]).unwrap();
        assert_eq!(
            cli.command,
            Command::Get {
                endpoint: "machine-config".into()
            }
        );
        let (cli, _) = parse(&["--sock", "/s", "put", "/logger", r#"{"level":"Debug"}"#]).unwrap();
        assert_eq!(
            cli.command,
            Command::Put {
                endpoint: "/logger".into(),
                body: r#"{"level":"Debug"}"#.into()
            }
        );
        let (cli, _) = parse(&["--sock", "/s", "patch", "vm", "-"]).unwrap();
        assert_eq!(
            cli.command,
            Command::Patch {
                endpoint: "vm".into(),
                body: "-".into()
            }
        );
        let (cli, _) = parse(&["--sock", "/s", "put", "x", "-1"]).unwrap();
        assert_eq!(
            cli.command,
            Command::Put {
                endpoint: "x".into(),
                body: "-1".into()
            }
        );
    }

    #[test]
    fn usage_errors() {
        let kind = |args: &[&str]| parse(args).unwrap_err().kind();
        assert_eq!(kind(&["--sock", "/s"]), ErrorKind::MissingSubcommand);
        assert_eq!(
            kind(&["--sock", "/s", "reboot"]),
            ErrorKind::InvalidSubcommand
        );
        assert_eq!(
            kind(&["--sock", "/s", "put", "vm"]),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            kind(&["--sock", "/s", "--timeout", "0", "info"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            kind(&["--sock", "/s", "--timeout", "x", "info"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            kind(&["--sock", "/s", "info", "extra"]),
            ErrorKind::UnknownArgument
        );
        assert_eq!(kind(&["--help"]), ErrorKind::DisplayHelp);
        assert_eq!(kind(&["--version"]), ErrorKind::DisplayVersion);
        for args in [&["--sock", "/s"][..], &["--sock", "/s", "reboot"][..]] {
            assert_eq!(parse(args).unwrap_err().exit_code(), 2);
        }
    }

    #[test]
    fn missing_sock_is_a_usage_error() {
        // Only meaningful when the test runner's environment does not set it.
        if std::env::var_os("TERN_API_SOCK").is_some() {
            return;
        }
        let err = parse(&["info"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument);
        assert_eq!(err.exit_code(), 2);
        assert!(
            err.to_string().contains("--sock PATH or set TERN_API_SOCK"),
            "{err}"
        );
    }
}
