//! Builds the test guests that the integration tests boot.
//!
//! The test unikernel (`guests/unikernel/`, C and GNU assembler) is built
//! with its Makefile into two ELFs from the same objects:
//! `$OUT_DIR/guests/unikernel.elf` (PVH note, found through
//! `env!("TERN_UNIKERNEL")`) and `$OUT_DIR/guests/unikernel-linux64.elf` (no
//! PVH note, entered through the Linux 64-bit boot protocol, found through
//! `env!("TERN_UNIKERNEL_LINUX64")`). The instruction checker (which fails on
//! instructions a software KVM's emulator lacks) is
//! `env!("TERN_UNIKERNEL_CHECK_INSNS")`.
//!
//! Needs gcc, GNU as/ld and make (Debian: `build-essential`). The C compiler
//! can be overridden with `TERN_GUEST_CC` (it must understand gcc's flags).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let src = manifest_dir.join("guests").join("unikernel");
    let out = out_dir.join("guests");

    let cc = env::var("TERN_GUEST_CC").unwrap_or_else(|_| "gcc".to_string());
    require_tool(&cc, "--version", "the C compiler for the test unikernel");
    require_tool("make", "--version", "make");
    require_tool("ld", "--version", "the GNU linker (binutils)");

    println!("cargo:rerun-if-env-changed=TERN_GUEST_CC");
    rerun_if_dir_changed(&src);

    // The guest is built for itself, not for the Rust target: keep the
    // environment of an outer make or of cc-rs style variables out of it.
    let status = Command::new("make")
        .arg("-C")
        .arg(&src)
        .arg(format!("OUT={}", out.display()))
        .arg(format!("CC={cc}"))
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS")
        .env_remove("MAKELEVEL")
        .status()
        .unwrap_or_else(|e| fail(&format!("cannot run make: {e}")));
    if !status.success() {
        fail(&format!(
            "building the test unikernel failed ({status}); run `make -C {} OUT={}` to see why",
            src.display(),
            out.display()
        ));
    }

    for (var, name) in [
        ("TERN_UNIKERNEL", "unikernel.elf"),
        ("TERN_UNIKERNEL_LINUX64", "unikernel-linux64.elf"),
    ] {
        let elf = out.join(name);
        if !elf.is_file() {
            fail(&format!("make succeeded but {} is missing", elf.display()));
        }
        println!("cargo:rustc-env={var}={}", elf.display());
    }
    println!(
        "cargo:rustc-env=TERN_UNIKERNEL_CHECK_INSNS={}",
        src.join("check-insns.sh").display()
    );
}

/// Re-run when any file of the unikernel's sources changes, or one is added
/// or removed.
fn rerun_if_dir_changed(dir: &Path) {
    println!("cargo:rerun-if-changed={}", dir.display());
    let entries =
        fs::read_dir(dir).unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", dir.display())));
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths {
        if path.is_file() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}

fn require_tool(tool: &str, arg: &str, what: &str) {
    let ok = Command::new(tool)
        .arg(arg)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        fail(&format!(
            "`{tool}` ({what}) was not found or does not work. The test unikernel \
             in tests/guests/unikernel needs gcc, GNU binutils and make \
             (Debian/Ubuntu: apt-get install build-essential)."
        ));
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("error: tern-tests build script: {msg}");
    std::process::exit(1);
}
