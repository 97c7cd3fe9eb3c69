#!/usr/bin/env bash
# find-guest.sh - print the directory of the Linux test guest that tern's tests
# should use, or fail with a hint.
#
#   dir=$(tools/guest-image/find-guest.sh) || exit 1
#
# 1. $TERN_GUEST_DIR, if set and valid;
# 2. else ${XDG_CACHE_HOME:-$HOME/.cache}/tern/guest/current (the latest
#    tools/guest-image/build.sh run into the cache), if valid;
# 3. else prints nothing, explains on stderr and exits 1.
# Valid means the directory holds vmlinux, bzImage and initramfs.cpio.gz.
# The printed path is absolute and has no symlinks.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

valid() {
    [ -s "$1/vmlinux" ] && [ -s "$1/bzImage" ] && [ -s "$1/initramfs.cpio.gz" ]
}

# Same cache location as build.sh (which, under sudo, uses the invoking user's).
if [ -z "${XDG_CACHE_HOME:-}" ] && [ "$(id -u)" = 0 ] && [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
    CACHE_ROOT=$(getent passwd "$SUDO_USER" | cut -d: -f6)/.cache/tern/guest
else
    CACHE_ROOT=${XDG_CACHE_HOME:-$HOME/.cache}/tern/guest
fi

if [ -n "${TERN_GUEST_DIR:-}" ]; then
    if valid "$TERN_GUEST_DIR"; then
        realpath "$TERN_GUEST_DIR"
        exit 0
    fi
    echo "find-guest.sh: TERN_GUEST_DIR=$TERN_GUEST_DIR has no vmlinux, bzImage and initramfs.cpio.gz; ignoring it" >&2
fi

if valid "$CACHE_ROOT/current"; then
    realpath "$CACHE_ROOT/current"
    exit 0
fi

cat >&2 <<EOF
find-guest.sh: no Linux test guest found (looked at \$TERN_GUEST_DIR and $CACHE_ROOT/current).
Build one (Debian 12, as root, about 10 minutes and 2 GB of scratch space):
    sudo $HERE/build.sh
or point TERN_GUEST_DIR at an existing guest kit, e.g.
    export TERN_GUEST_DIR=../shared/guest
EOF
exit 1
