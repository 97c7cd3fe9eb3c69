#!/usr/bin/env bash
# Sets up this machine (Debian 12), builds tern and boots a demo microVM.
#   tools/demo.sh            the default guest for this host
#   tools/demo.sh --linux    on a kvm_pvm host: the kit's Linux kernel to `Run /init`
# On hardware KVM the default guest is the Linux guest kit (busybox shell on
# the serial console; `poweroff -f` ends it). On a kvm_pvm (software KVM)
# host no Linux userspace can run (docs/pvm.md), so the default guest is the
# test unikernel, which walks PCI and ACPI, starts its vCPUs and powers off.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"

TERN="$(tools/build-release.sh | tail -n 1)/tern"
make -s -C tests/guests/unikernel OUT="$PWD/target/guests"

kit() {
	if [ -n "${TERN_GUEST_DIR:-}" ]; then echo "$TERN_GUEST_DIR"; return; fi
	if dir=$(tools/guest-image/find-guest.sh 2>/dev/null); then echo "$dir"; return; fi
	if [ -d ../shared/guest ]; then (cd ../shared/guest && pwd); return; fi
	echo "demo: building the Linux guest kit (about 10 minutes, once)" >&2
	tools/guest-image/build.sh | tail -n 1
}

if [ -e /sys/module/kvm_pvm ]; then
	echo "demo: /dev/kvm here is kvm_pvm, a software KVM that cannot run Linux userspace."
	if [ "${1:-}" = "--linux" ]; then
		dir=$(kit)
		initrd=$(mktemp --suffix=.cpio)
		trap 'rm -f "$initrd"' EXIT
		gunzip -c "$dir/initramfs.cpio.gz" >"$initrd"
		echo "demo: booting the kit's kernel to 'Run /init' (about 2-3 minutes of emulated kernel)"
		exec "$TERN" --kernel "$dir/vmlinux" --initrd "$initrd" --memory 512 --cpus 1 \
			--cmdline "console=ttyS0 panic=-1 noxsave tsc=reliable no_timer_check nopvspin clearcpuid=cx16,xsave,popcnt,smap,smep,fsgsbase,pcid,invpcid,rdrand,rdseed,lfence_rdtsc,rdtscp,rdpid"
	fi
	echo "demo: booting the test unikernel on 2 vCPUs (tools/demo.sh --linux boots the Linux kernel instead)"
	exec "$TERN" --kernel target/guests/unikernel.elf --cpus 2 --memory 64 \
		--cmdline "checks=pci,acpi,smp cpus=2 action=s5"
fi

dir=$(kit)
echo "demo: booting the Linux guest kit from $dir (type 'poweroff -f' to end)"
exec "$TERN" --kernel "$dir/vmlinux" --initrd "$dir/initramfs.cpio.gz" --memory 512 --cpus 2 \
	--cmdline "console=ttyS0 panic=-1 quiet"
