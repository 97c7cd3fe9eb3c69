#!/usr/bin/env bash
# Runs every tern test: unit tests and the integration tests that boot real
# guests under /dev/kvm (the test unikernel, and kernel-only boots of the
# Linux guest kit found through TERN_GUEST_DIR). Tests that need hardware
# KVM print "NOT RUN" on other hosts.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"

if [ -z "${TERN_GUEST_DIR:-}" ]; then
	if dir=$(tools/guest-image/find-guest.sh 2>/dev/null); then
		export TERN_GUEST_DIR="$dir"
	fi
fi
echo "test: TERN_GUEST_DIR=${TERN_GUEST_DIR:-<unset: Linux boot tests will fail; run tools/guest-image/build.sh>}"
[ -e /sys/module/kvm_pvm ] && echo "test: /dev/kvm is kvm_pvm (software KVM): full-Linux tests are NOT RUN here"

cargo build --workspace --bins --tests
cargo nextest run --workspace --no-fail-fast "$@"
# A bounded schemathesis pass of the HTTP API against api-spec/tern.yaml.
bash tools/api-fuzz.sh target/debug/tern
