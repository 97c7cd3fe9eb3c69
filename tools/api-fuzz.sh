#!/usr/bin/env bash
# Fuzzes tern's HTTP API against api-spec/tern.yaml with schemathesis: every
# answer must be documented (status, schema, content type), nothing may be a
# 5xx, invalid bodies must be refused, and tern must still answer afterwards.
#
#   tools/api-fuzz.sh [TERN_BINARY]     (default target/debug/tern)
#
# FUZZ_EXAMPLES   test cases per operation (default 50)
# FUZZ_SEED       schemathesis seed, for a reproducible run
# FUZZ_STRICT=1   also fail on the known server bugs listed in hooks.py below
#
# Every check runs but positive_data_acceptance: tern answers 400 to valid
# bodies that the current state or the host refuses (PATCH /vm before boot,
# an unreadable kernel_image_path or log_path, smt: true, 2M huge pages with
# an odd mem_size_mib), Firecracker-style, which no schema can express.
# tests/tests/api_spec.rs checks instead that the request schemas accept
# exactly what the server's parser does.
#
# tern runs with --api-sock only, in an empty scratch directory; as root it
# runs as `nobody`, so generated paths (boot-source, logger) can neither
# write outside that directory nor open /dev/kvm: the VM stays pre-boot.
# schemathesis lives in a venv under ${TMPDIR:-/tmp}/tern-fuzz-venv.
set -euo pipefail
say() { echo "api-fuzz: $*" >&2; }
tern=
if [ -n "${1:-}" ]; then
	[ -x "$1" ] || { say "no tern binary at $1"; exit 2; }
	tern=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
fi
cd "$(dirname "$0")/.."
repo=$PWD
spec="$repo/api-spec/tern.yaml"
tern="${tern:-$repo/target/debug/tern}"
examples="${FUZZ_EXAMPLES:-50}"
venv="${TMPDIR:-/tmp}/tern-fuzz-venv"

[ -x "$tern" ] || { say "no tern binary at $tern (cargo build -p tern)"; exit 2; }

if [ ! -x "$venv/bin/st" ]; then
	say "installing schemathesis into $venv"
	python3 -m venv "$venv"
	"$venv/bin/pip" install -q 'schemathesis>=4.32,<5'
fi
if ! command -v socat >/dev/null; then
	say "installing socat"
	apt-get install -y -qq socat >/dev/null || { apt-get update -qq && apt-get install -y -qq socat >/dev/null; }
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/tern-fuzz.XXXXXX")
sock="$work/run/api.sock"
mkdir -p "$work/run"
tern_pid=
socat_pid=
cleanup() {
	if [ -n "$socat_pid" ]; then kill "$socat_pid" 2>/dev/null || true; fi
	if [ -n "$tern_pid" ]; then kill "$tern_pid" 2>/dev/null || true; fi
	wait 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

drop=()
if [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null; then
	chmod 711 "$work"
	chown nobody "$work/run"
	drop=(setpriv --reuid=nobody --regid="$(id -g nobody)" --clear-groups)
fi
(cd "$work/run" && exec "${drop[@]}" "$tern" --api-sock "$sock" </dev/null >"$work/tern.out" 2>"$work/tern.err") &
tern_pid=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
[ -S "$sock" ] || { say "tern did not create $sock"; cat "$work/tern.err" >&2; exit 1; }

port=$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
socat "TCP-LISTEN:$port,bind=127.0.0.1,fork,reuseaddr" "UNIX-CONNECT:$sock" 2>"$work/socat.err" &
socat_pid=$!
for _ in $(seq 100); do
	curl -sf -o /dev/null "http://127.0.0.1:$port/" && break
	sleep 0.05
done

# Known server bugs (reported), ignored unless FUZZ_STRICT=1.
cat >"$work/hooks.py" <<'PY'
import os
import schemathesis

STRICT = os.environ.get("FUZZ_STRICT") == "1"


@schemathesis.hook
def filter_failure(context, failure, case, response):
    if STRICT:
        return True
    # serde's derived Deserialize takes a JSON array as a struct's fields in
    # order, so e.g. PUT /logger [null, null] is accepted (204).
    if failure.code == "ST201" and isinstance(case.body, list) and response.status_code < 300:
        return False
    return True
PY

seed=()
[ -n "${FUZZ_SEED:-}" ] && seed=(--seed "$FUZZ_SEED")
say "schemathesis $("$venv/bin/st" --version 2>/dev/null | awk '{print $NF}'), $examples examples per operation, tern pid $tern_pid"
st_status=0
(cd "$work" && SCHEMATHESIS_HOOKS="$work/hooks.py" "$venv/bin/st" run "$spec" \
	--url "http://127.0.0.1:$port" \
	--checks all \
	--exclude-checks positive_data_acceptance \
	--max-examples "$examples" \
	--request-timeout 10 \
	--generation-database none \
	--no-color \
	"${seed[@]}") || st_status=$?

alive=no
if kill -0 "$tern_pid" 2>/dev/null &&
	[ "$(curl -s -o /dev/null -w '%{http_code}' --unix-socket "$sock" http://localhost/)" = 200 ]; then
	alive=yes
fi
if [ "$alive" = no ]; then
	say "tern died or stopped answering; its stderr:"
	tail -n 20 "$work/tern.err" >&2
fi
if [ "$st_status" = 0 ] && [ "$alive" = yes ]; then
	echo "api-fuzz: PASS ($examples examples per operation, no failures, tern alive)"
else
	echo "api-fuzz: FAIL (schemathesis exit $st_status, tern alive: $alive)"
	exit 1
fi
