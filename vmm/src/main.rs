//! The `tern` binary.

use std::process::ExitCode;

use tern::cli::{self, Command};
use tern::exit::ERROR_STATUS;

fn main() -> ExitCode {
    tern::logger::init();
    let config = match cli::parse(std::env::args().skip(1)) {
        Ok(Command::Help) => {
            print!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("tern {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Ok(Command::Run(config)) => config,
        Err(e) => {
            eprintln!("tern: error: {e}");
            return ExitCode::from(ERROR_STATUS as u8);
        }
    };
    match tern::vmm::run(&config) {
        Ok(reason) => {
            eprintln!("tern: {reason}");
            let status = reason.status();
            // Other threads may still be inside KVM_RUN; exit the process
            // directly rather than waiting for them.
            std::process::exit(status);
        }
        Err(e) => {
            eprintln!("tern: error: {e}");
            ExitCode::from(ERROR_STATUS as u8)
        }
    }
}
