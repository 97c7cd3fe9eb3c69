#!/usr/bin/env bash
# Collects the syscalls each tern and backend thread kind makes, to write or
# check resources/seccomp/*.json (docs/security.md, "Regenerating the
# filters"). Runs the given integration tests (nextest filter arguments)
# with tern, tern-blk and tern-net wrapped in `strace -f -ff` at
# --seccomp-level 0, then prints, per binary and thread kind, every syscall
# made after the thread's filter point, with the arguments the filters
# condition on.
#   tools/seccomp-trace.sh --test boot_unikernel --test blk
set -euo pipefail
cd "$(dirname "$0")/.."
command -v strace >/dev/null || { echo "seccomp-trace: strace is needed (apt-get install strace)" >&2; exit 1; }
cargo build -p tern -p tern-blk -p tern-net -p tern-scsi
real="${CARGO_TARGET_DIR:-$(pwd)/target}/debug"
work="$(mktemp -d /tmp/tern-seccomp-trace.XXXXXX)"
mkdir -p "$work/bin" "$work/trace"
for b in tern tern-blk tern-net tern-scsi; do
	cat >"$work/bin/$b" <<WRAP
#!/bin/sh
exec strace -f -ff -qq -X raw -s 64 -o "$work/trace/$b.\$\$" "$real/$b" --seccomp-level 0 "\$@"
WRAP
	chmod +x "$work/bin/$b"
done
TERN_BIN="$work/bin/tern" cargo nextest run -p tern-tests --no-fail-fast "$@" || true
python3 tools/seccomp-trace.py "$work/trace"
echo "seccomp-trace: raw traces in $work/trace"
