#!/usr/bin/env bash
# build.sh - build tern's Linux test guest (kernel, initramfs, ext4 root) on
# Debian 12 x86_64, as root, and cache the result.
#
#   tools/guest-image/build.sh [--out DIR] [--force] [--dry-run]
#
#   --out DIR   write the guest into DIR instead of the cache directory
#   --force     rebuild even if the output directory is up to date
#   --dry-run   print the cache key, its inputs and the output directory, and
#               whether it is up to date; change nothing (no root needed)
#
# Default output: ${XDG_CACHE_HOME:-$HOME/.cache}/tern/guest/<key>, where <key>
# is a short hash of this script, microvm.config, patches/*.patch and the
# version of the Debian kernel source package. A run whose output directory
# is already complete for that key does nothing. After a build into the cache,
# the `current` symlink next to the key directories points at it. Run with
# sudo, the cache is the invoking user's and the output is chowned to them.
#
# The last line on stdout is the output directory; everything else goes to
# stderr:   TERN_GUEST_DIR=$(sudo tools/guest-image/build.sh | tail -1)
#
# Writes into the output directory:
#   vmlinux            stripped ELF kernel with the PVH entry note
#   bzImage            the same kernel in bzImage format
#   kernel.config      the full .config the kernel was built with
#   initramfs.cpio     busybox + fio + iperf3 userland with /init (newc cpio)
#   initramfs.cpio.gz  the same, gzip -9
#   rootfs.ext4        64 MiB ext4 image with the same userland (/sbin/init -> /init)
#   microvm.config, patches/   the inputs, for reference
#   BUILD-INFO         cache key and package versions
#   SHA256SUMS
#
# Environment: TERN_GUEST_WORK_DIR (scratch: kernel tree, fio, staging tree;
#   default /var/tmp/tern-guest-build), JOBS (make -j, default 2), SKIP_APT=1
#   (do not run apt-get; the packages must be installed), SOURCE_DATE_EPOCH
#   (fixed timestamps, default 1700000000), KBUILD_BUILD_USER/KBUILD_BUILD_HOST
#   (shown in /proc/version, default tern).
# See README.md next to this script.
set -euo pipefail

# The whole script is one { ... } block: bash parses it completely before it
# runs anything, so editing this file (or a git checkout) during a build does
# not derail the running build.
{
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FRAGMENT=$HERE/microvm.config
KPKG=linux-source-6.1
ROOTFS_MIB=64
ARTIFACTS=(vmlinux bzImage initramfs.cpio.gz initramfs.cpio rootfs.ext4 kernel.config)
export LC_ALL=C
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000}

# Only the final output directory goes to stdout (fd 3); make, apt and the
# progress messages all go to stderr.
exec 3>&1 1>&2

log() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'build.sh: error: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}" >&2; exit "${1:-0}"; }

OUT='' FORCE=0 DRY_RUN=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out)      [ $# -ge 2 ] || die "--out needs a directory"; OUT=$2; shift 2 ;;
        --out=*)    OUT=${1#--out=}; shift ;;
        --force)    FORCE=1; shift ;;
        --dry-run)  DRY_RUN=1; shift ;;
        -h|--help)  usage 0 ;;
        *)          die "unknown argument: $1 (see --help)" ;;
    esac
done
[ -z "$OUT" ] || OUT=$(realpath -m "$OUT")

WORK=${TERN_GUEST_WORK_DIR:-/var/tmp/tern-guest-build}
JOBS=${JOBS:-2}

# ---------------------------------------------------------------------------
# Cache location. Under sudo (XDG_CACHE_HOME is not passed through and HOME is
# root's), use the invoking user's cache so that find-guest.sh, run as that
# user, finds the build.
# ---------------------------------------------------------------------------
OWNER=
if [ -z "${XDG_CACHE_HOME:-}" ] && [ "$(id -u)" = 0 ] && [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
    user_home=$(getent passwd "$SUDO_USER" | cut -d: -f6)
    [ -n "$user_home" ] || die "cannot find the home directory of $SUDO_USER"
    CACHE_ROOT=$user_home/.cache/tern/guest
    OWNER=$(id -u "$SUDO_USER"):$(id -g "$SUDO_USER")
else
    CACHE_ROOT=${XDG_CACHE_HOME:-$HOME/.cache}/tern/guest
fi

# ---------------------------------------------------------------------------
# Cache key: this script, the config fragment, the patches and the version of
# the Debian kernel source package (an upgrade of it means a rebuild).
# ---------------------------------------------------------------------------
kernel_pkg_version() {   # the installed version of $KPKG, or nothing
    dpkg-query -W -f='${Status}\t${Version}\n' "$KPKG" 2>/dev/null |
        awk -F'\t' '$1 == "install ok installed" {print $2}' || true
}

key_inputs() {           # key_inputs KERNEL_PKG_VERSION
    (cd "$HERE" && sha256sum build.sh microvm.config patches/*.patch)
    printf '%s %s\n' "$KPKG" "$1"
}

compute_key() {          # compute_key KERNEL_PKG_VERSION
    key_inputs "$1" | sha256sum | cut -c1-12
}

# An output directory is up to date when its BUILD-INFO names the key and every
# artifact is there with the checksum SHA256SUMS records.
up_to_date() {           # up_to_date DIR KEY
    [ -f "$1/BUILD-INFO" ] && grep -qxF "key=$2" "$1/BUILD-INFO" || return 1
    local f
    for f in "${ARTIFACTS[@]}"; do [ -s "$1/$f" ] || return 1; done
    (cd "$1" && sha256sum --quiet --strict -c SHA256SUMS) >/dev/null 2>&1
}

set_current() {          # point $CACHE_ROOT/current at $CACHE_ROOT/$1 (relative link)
    [ "$(readlink "$CACHE_ROOT/current" 2>/dev/null)" != "$1" ] || return 0
    if ! { ln -sfn "$1" "$CACHE_ROOT/.current.$$" &&
           mv -T "$CACHE_ROOT/.current.$$" "$CACHE_ROOT/current"; } 2>/dev/null; then
        rm -f "$CACHE_ROOT/.current.$$" 2>/dev/null || true
        log "warning: could not point $CACHE_ROOT/current at $1"
        return 0
    fi
    [ -z "$OWNER" ] || chown -h "$OWNER" "$CACHE_ROOT/current"
}

KVER=$(kernel_pkg_version)

if [ "$DRY_RUN" = 1 ]; then
    note=
    if [ -z "$KVER" ]; then
        KVER=$(apt-cache policy "$KPKG" 2>/dev/null | awk '$1 == "Candidate:" {print $2}')
        note=" ($KPKG not installed; key uses the apt candidate, apt-get may install a newer one)"
    fi
    KEY=$(compute_key "$KVER")
    [ -n "$OUT" ] || OUT=$CACHE_ROOT/$KEY
    {
        echo "key inputs:"
        key_inputs "$KVER" | sed 's/^/  /'
        echo "key: $KEY$note"
        echo "cache: $CACHE_ROOT"
        if up_to_date "$OUT" "$KEY"; then echo "status: up to date"; else echo "status: would build"; fi
    } >&2
    printf '%s\n' "$OUT" >&3
    exit 0
fi

# Prints the output directory and exits if it is up to date for KEY.
finish_if_cached() {
    [ "$FORCE" = 0 ] && up_to_date "$OUT" "$KEY" || return 0
    log "up to date: $OUT"
    [ "$OUT" != "$CACHE_ROOT/$KEY" ] || set_current "$KEY"
    printf '%s\n' "$OUT" >&3
    exit 0
}

OUT_GIVEN=$OUT
choose_out() {           # (re)compute KEY and the output directory from KVER
    KEY=$(compute_key "$KVER")
    OUT=${OUT_GIVEN:-$CACHE_ROOT/$KEY}
}

if [ -n "$KVER" ]; then
    choose_out
    finish_if_cached
fi

[ "$(id -u)" = 0 ] || die "run as root (apt-get, mknod): sudo $0"
[ -f "$FRAGMENT" ] || die "missing $FRAGMENT"
mkdir -p "$WORK"

# One build at a time per work directory; another run may have finished the
# same build while this one waited.
exec 9>"$WORK/.lock"
flock -n 9 || { log "waiting for another build.sh using $WORK"; flock 9; }
[ -z "$KVER" ] || finish_if_cached

# ---------------------------------------------------------------------------
# 1. Packages. fio is rebuilt from its Debian source package without the
#    optional engines: Debian's binary links ~80 MB of libraries (ceph, gluster,
#    rdma, ...) which would dwarf the rest of the initramfs. That needs deb-src.
# ---------------------------------------------------------------------------
if [ "${SKIP_APT:-0}" != 1 ]; then
    log "installing build dependencies"
    if ! grep -rqsE '^(Types:.*deb-src|deb-src )' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        cat > /etc/apt/sources.list.d/tern-guest-src.sources <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends \
        "$KPKG" build-essential flex bison bc libelf-dev libssl-dev \
        busybox-static cpio e2fsprogs xz-utils gzip kmod binutils patch \
        dpkg-dev libaio-dev zlib1g-dev iperf3 >/dev/null
fi
KVER_BEFORE=$KVER
KVER=$(kernel_pkg_version)
[ -n "$KVER" ] || die "$KPKG is not installed (run without SKIP_APT=1)"
if [ "$KVER" != "$KVER_BEFORE" ]; then
    [ -z "$KVER_BEFORE" ] || log "$KPKG changed: $KVER_BEFORE -> $KVER"
    choose_out
    finish_if_cached
fi
log "output: $OUT (key $KEY, $KPKG $KVER)"

# Not complete until BUILD-INFO (with the key) is written at the very end.
mkdir -p "$OUT"
rm -f "$OUT/BUILD-INFO" "$OUT/SHA256SUMS"

# ---------------------------------------------------------------------------
# 2. Kernel: tinyconfig + microvm.config + patches, everything built in.
# ---------------------------------------------------------------------------
KTAR=/usr/src/$KPKG.tar.xz
KSRC=$WORK/$KPKG
[ -f "$KTAR" ] || die "missing $KTAR"
# The tree is unpacked once per package version (the stamp also marks a
# complete unpack); patches are applied once.
if [ "$(cat "$KSRC/.tern-source-version" 2>/dev/null)" != "$KVER" ]; then
    log "unpacking $KTAR ($KVER)"
    rm -rf "$KSRC"
    tar -C "$WORK" -xf "$KTAR"
    echo "$KVER" > "$KSRC/.tern-source-version"
fi

for p in "$HERE"/patches/*.patch; do
    [ -e "$p" ] || continue
    if patch -d "$KSRC" -p1 -R --dry-run -s -f < "$p" >/dev/null 2>&1; then
        continue                                    # already applied
    fi
    log "applying $(basename "$p")"
    patch -d "$KSRC" -p1 -s -f --no-backup-if-mismatch < "$p" || die "patch $(basename "$p") does not apply"
done

# Reproducible kernel: fixed build user, host, number and timestamp.
export KBUILD_BUILD_USER=${KBUILD_BUILD_USER:-tern} KBUILD_BUILD_HOST=${KBUILD_BUILD_HOST:-tern}
export KBUILD_BUILD_VERSION=1
KBUILD_BUILD_TIMESTAMP="$(date -u -d "@$SOURCE_DATE_EPOCH")"
export KBUILD_BUILD_TIMESTAMP

log "configuring kernel ($(make -s -C "$KSRC" kernelversion))"
make -s -C "$KSRC" tinyconfig >/dev/null
(cd "$KSRC" && scripts/kconfig/merge_config.sh -m .config "$FRAGMENT" >/dev/null)
make -s -C "$KSRC" olddefconfig

# tinyconfig silently drops options whose dependencies are not met: check
# that every line of the fragment made it into the final .config.
bad=0
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*)
            grep -qxF -- "$line" "$KSRC/.config" || { echo "  not set: $line" >&2; bad=1; } ;;
        "# CONFIG_"*" is not set")
            sym=${line#\# }; sym=${sym%% *}
            ! grep -q "^$sym=" "$KSRC/.config" || { echo "  not unset: $sym" >&2; bad=1; } ;;
    esac
done < "$FRAGMENT"
[ "$bad" = 0 ] || die "kernel .config does not match microvm.config"

log "building kernel (make -j$JOBS)"
make -s -C "$KSRC" -j"$JOBS" vmlinux bzImage

cp "$KSRC/.config" "$OUT/kernel.config"
strip --strip-all -o "$OUT/vmlinux" "$KSRC/vmlinux"     # no debug info; drop .symtab too
cp "$KSRC/arch/x86/boot/bzImage" "$OUT/bzImage"
# PVH entry = ELF note of type XEN_ELFNOTE_PHYS32_ENTRY (0x12) in the Xen namespace.
readelf -n "$OUT/vmlinux" | grep -q 'Xen.*0x00000012' || die "vmlinux has no PVH (XEN_ELFNOTE_PHYS32_ENTRY) note"

# ---------------------------------------------------------------------------
# 3. fio from the Debian source package, only libc/libm/libaio/zlib needed.
# ---------------------------------------------------------------------------
FIO_DIR=$(find "$WORK/src" -mindepth 1 -maxdepth 1 -type d -name 'fio-*' 2>/dev/null | sort | head -n1 || true)
if [ -z "$FIO_DIR" ]; then
    log "fetching fio source"
    mkdir -p "$WORK/src"
    (cd "$WORK/src" && apt-get source -qq fio)
    FIO_DIR=$(find "$WORK/src" -mindepth 1 -maxdepth 1 -type d -name 'fio-*' | sort | head -n1)
    [ -n "$FIO_DIR" ] || die "apt-get source fio left no fio-* directory in $WORK/src"
fi
if [ ! -x "$FIO_DIR/fio" ]; then
    log "building fio"
    (cd "$FIO_DIR" && ./configure --disable-native --disable-numa --disable-rdma \
        --disable-rados --disable-rbd --disable-http --disable-gfapi --disable-pmem \
        --disable-xnvme --disable-libzbc --disable-tcmalloc --disable-dfs --disable-lex \
        >/dev/null && make -s -j"$JOBS" fio)
fi

# ---------------------------------------------------------------------------
# 4. Userland staging tree (shared by the initramfs and the ext4 image).
# ---------------------------------------------------------------------------
STAGE=$WORK/rootfs
log "assembling userland in $STAGE"
rm -rf "$STAGE"
mkdir -p "$STAGE"/{bin,sbin,usr/bin,usr/sbin,lib64,etc,proc,sys,dev,tmp,run,mnt,root}
chmod 1777 "$STAGE/tmp"

# busybox with one symlink per applet; /sbin/init is our /init, not busybox init.
install -m 0755 /bin/busybox "$STAGE/bin/busybox"
for applet in $("$STAGE/bin/busybox" --list-full); do
    case "$applet" in bin/busybox|sbin/init|linuxrc) continue ;; esac
    ln -sf /bin/busybox "$STAGE/$applet"
done
ln -sf /init "$STAGE/sbin/init"

# A dynamic binary plus its shared libraries and the loader, at their host paths.
copy_with_libs() {   # copy_with_libs SRC DEST-IN-STAGE
    install -D -m 0755 "$1" "$STAGE/$2"
    strip --strip-unneeded "$STAGE/$2"
    ldd "$1" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' |
    while read -r lib; do
        [ -e "$STAGE$lib" ] && continue
        install -D -m 0755 "$(readlink -f "$lib")" "$STAGE$lib"
        strip --strip-unneeded "$STAGE$lib"
    done
}
copy_with_libs "$FIO_DIR/fio" usr/bin/fio
copy_with_libs /usr/bin/iperf3 usr/bin/iperf3

# Device nodes the kernel needs before /init mounts devtmpfs.
mknod -m 0600 "$STAGE/dev/console" c 5 1
mknod -m 0666 "$STAGE/dev/null" c 1 3

cat > "$STAGE/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
EOF
cat > "$STAGE/etc/group" <<'EOF'
root:x:0:
EOF
cat > "$STAGE/etc/hosts" <<'EOF'
127.0.0.1 localhost
::1 localhost
EOF
echo guest > "$STAGE/etc/hostname"

# The init protocol is documented in README.md ("Init protocol").
cat > "$STAGE/init" <<'EOF'
#!/bin/sh
# tern test guest /init. Kernel command line (tools/guest-image/README.md):
#   run="<cmd>" | run64=<base64 cmd> | -- <cmd>   command to run (sh -c)
#   halt=poweroff|reboot|shell                   what to do afterwards
#   exit_port=<ioport>                           also write the status byte to this port
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=${TERM:-linux}

mount -t proc proc /proc
read -r up _ < /proc/uptime
echo "GUEST-READY uptime=$up"

mount -t sysfs sysfs /sys
grep -qs "^devtmpfs /dev " /proc/mounts || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
ip link set lo up

# The command: run64= (base64) wins over run= (kernel-quoted) over "-- rest".
cmd=
if [ -n "${run64:-}" ]; then
    cmd=$(echo "$run64" | base64 -d) || cmd="echo 'init: bad run64=' >&2; false"
elif [ -n "${run:-}" ]; then
    cmd=$run
else
    line=$(cat /proc/cmdline)
    case "$line" in *" -- "*) cmd=${line#* -- } ;; esac
fi

if [ -z "$cmd" ]; then
    halt=${halt:-shell}
else
    sh -c "$cmd"
    status=$?
    echo "GUEST-EXIT $status"
    if [ -n "${exit_port:-}" ] && [ -e /dev/port ]; then
        printf "\\$(printf '%03o' $((status & 255)))" |
            dd of=/dev/port bs=1 count=1 seek=$((exit_port)) 2>/dev/null
    fi
fi

case "${halt:-poweroff}" in
    shell)
        echo "init: shell on console; exit it to power off"
        setsid cttyhack sh -l
        ;;
esac
sync
case "${halt:-poweroff}" in
    reboot) reboot -f ;;
    *)      poweroff -f ;;
esac
sleep 5   # poweroff -f returns only if the platform has no way to power off
echo "init: power off failed" >&2
EOF
chmod 0755 "$STAGE/init"

# Fixed timestamps for reproducible images.
find "$STAGE" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

# ---------------------------------------------------------------------------
# 5. Images. The uncompressed initramfs.cpio is for software KVM hosts, where
#    the guest kernel's gunzip of 13 MB runs emulated and takes long.
# ---------------------------------------------------------------------------
log "writing initramfs.cpio and initramfs.cpio.gz"
(cd "$STAGE" && find . -mindepth 1 | sort |
    cpio --quiet -o -H newc -R 0:0 --reproducible) > "$OUT/initramfs.cpio"
gzip -9 -n < "$OUT/initramfs.cpio" > "$OUT/initramfs.cpio.gz"

log "writing rootfs.ext4 ($ROOTFS_MIB MiB)"
rm -f "$OUT/rootfs.ext4"
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH mke2fs -q -t ext4 -L guestroot \
    -U 2f2d8c6e-6d8a-4d5b-9a49-6b7e0c1e0001 -E hash_seed=2f2d8c6e-6d8a-4d5b-9a49-6b7e0c1e0002 \
    -d "$STAGE" "$OUT/rootfs.ext4" "${ROOTFS_MIB}M"

# The inputs, for reference.
install -m 0644 "$FRAGMENT" "$OUT/microvm.config"
rm -rf "$OUT/patches"
mkdir -p "$OUT/patches"
for p in "$HERE"/patches/*.patch; do
    [ -e "$p" ] && install -m 0644 "$p" "$OUT/patches/"
done

(cd "$OUT" && sha256sum "${ARTIFACTS[@]}" > SHA256SUMS)
pkgver() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo unknown; }
# Written last: its key line marks the directory as complete.
cat > "$OUT/BUILD-INFO" <<EOF
key=$KEY
$KPKG=$KVER
kernel=$(make -s -C "$KSRC" kernelrelease)
busybox-static=$(pkgver busybox-static)
iperf3=$(pkgver iperf3)
fio=$(basename "$FIO_DIR")
SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
EOF

if [ "$OUT" = "$CACHE_ROOT/$KEY" ]; then
    set_current "$KEY"
    if [ -n "$OWNER" ]; then
        chown "$OWNER" "$(dirname "$(dirname "$CACHE_ROOT")")" "$(dirname "$CACHE_ROOT")" "$CACHE_ROOT" 2>/dev/null || true
        chown -R "$OWNER" "$OUT"
    fi
fi

log "done: $OUT"
ls -l "$OUT"/vmlinux "$OUT"/bzImage "$OUT"/initramfs.cpio "$OUT"/initramfs.cpio.gz "$OUT"/rootfs.ext4 >&2
printf '%s\n' "$OUT" >&3
exit 0
}
