//! `tern-jailer`: confines tern (or a backend) the way Firecracker's jailer
//! does, then execs it. See `--help` and docs/security.md.
//!
//! Exit status: the executable's (it replaces the jailer); 1 with one line
//! on stderr if the jailer fails, leaving nothing it made behind.

mod args;
mod cgroup;
mod jail;
mod jail_dir;
mod mount_ns;
mod privileges;
mod process;
mod rlimit;

use std::process::ExitCode;

fn main() -> ExitCode {
    match args::parse(std::env::args().skip(1)) {
        Ok(args::Command::Help) => {
            print!("{}", args::USAGE);
            ExitCode::SUCCESS
        }
        Ok(args::Command::Jail(a)) => match jail::run(&a) {
            Ok(never) => match never {},
            Err(e) => {
                eprintln!("tern-jailer: error: {e}");
                ExitCode::from(1)
            }
        },
        Err(e) => {
            eprintln!("tern-jailer: error: {e}");
            ExitCode::from(1)
        }
    }
}
