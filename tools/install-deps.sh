#!/usr/bin/env bash
# Installs what building and testing tern needs on Debian 12: a C toolchain
# and make (the test unikernel), Rust with cargo-nextest. Idempotent.
set -euo pipefail

# gcc, make, binutils: the test unikernel. curl: the API tests use a client
# tern did not write. socat, python3 with venv: the schemathesis API fuzz.
# iasl: a unit test decompiles the DSDT's hot plug AML.
need=()
for tool in gcc make ld objdump gunzip curl socat python3 qemu-img ip ping iasl; do
	command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
	echo "install-deps: installing packages (missing: ${need[*]})"
	SUDO=""
	[ "$(id -u)" -eq 0 ] || SUDO=sudo
	$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
	$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
		build-essential binutils gzip curl socat python3 python3-venv qemu-utils \
		iproute2 iputils-ping acpica-tools
fi

if ! command -v cargo >/dev/null 2>&1; then
	if [ -x "$HOME/.cargo/bin/cargo" ]; then
		export PATH="$HOME/.cargo/bin:$PATH"
	else
		echo "install-deps: installing Rust with rustup"
		command -v curl >/dev/null 2>&1 || { SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo; $SUDO apt-get install -y -q curl; }
		curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
		export PATH="$HOME/.cargo/bin:$PATH"
	fi
fi
if ! cargo nextest --version >/dev/null 2>&1; then
	echo "install-deps: installing cargo-nextest"
	cargo install --locked cargo-nextest
fi
