#!/bin/sh
# check-insns.sh ELF: fail if the unikernel contains an instruction that a
# software KVM's instruction emulator may lack, or any SIMD/x87 register use.
# Disassembles .boot32 as i386, .tramp16 as i8086 and .text as x86-64.
# Bytes under a symbol whose name ends in "_data" (data kept inside a code
# section, e.g. the AP trampoline's GDT pointer) are skipped up to the next symbol.
# Exit 0: clean; 1: forbidden instructions found (listed on stderr);
# 2: usage or tool error.
set -eu

if [ $# -ne 1 ] || [ ! -f "$1" ]; then
	echo "usage: $0 unikernel.elf" >&2
	exit 2
fi
elf=$1
OBJDUMP=${OBJDUMP:-objdump}
if ! command -v "$OBJDUMP" >/dev/null 2>&1; then
	echo "check-insns: $OBJDUMP not found (install binutils)" >&2
	exit 2
fi

dis=$(mktemp)
trap 'rm -f "$dis"' EXIT
{
	"$OBJDUMP" -d --no-show-raw-insn -j .text "$elf"
	"$OBJDUMP" -d --no-show-raw-insn -m i386 -j .boot32 "$elf"
	"$OBJDUMP" -d --no-show-raw-insn -m i8086 -j .tramp16 "$elf"
} | awk '/^[0-9a-f]+ <.*>:$/ { skip = ($2 ~ /_data>:$/) } !skip' >"$dis"

# Instruction lines look like "  100136:<TAB>mov    $0x10,%eax".
insn='^ *[0-9a-f]+:[[:space:]]'
count=$(grep -Ec "$insn" "$dis" || true)
if [ "$count" -eq 0 ]; then
	echo "check-insns: no instructions disassembled from $elf" >&2
	exit 2
fi

# Mnemonics that are not allowed (x87: every f* mnemonic).
m='popcnt|cmpxchg16b|cmpxchg8b|xsave[a-z0-9]*|xrstor[a-z0-9]*|fxsave[a-z0-9]*|fxrstor[a-z0-9]*'
m="$m|int3|int|into|int1|icebp|ud0|ud1|ud2|lfence|mfence|sfence|rdtscp|rdrand|rdseed|rdpid"
m="$m|clac|stac|rdfsbase|rdgsbase|wrfsbase|wrgsbase|swapgs|syscall|sysret[a-z]*|sysenter|sysexit"
m="$m|tzcnt|lzcnt|movbe|crc32[a-z]*|adcx|adox|andn|bextr|blsi|blsmsk|blsr|bzhi|pdep|pext|rorx|sarx|shlx|shrx"
m="$m|endbr32|endbr64|pause|monitor|mwait|clflush|clflushopt|clwb|prefetch[a-z0-9]*|emms|f[a-z0-9]+"
prefixes='((lock|rep[a-z]*|data16|addr32|cs|ds|es|ss|rex[a-zA-Z.]*)[[:space:]]+)*'

status=0
report() { # $1 what, $2 matches
	if [ -n "$2" ]; then
		echo "check-insns: $1 in $elf:" >&2
		echo "$2" >&2
		status=1
	fi
}
report "forbidden instructions" \
	"$(grep -E "$insn[[:space:]]*$prefixes($m)([[:space:]]|$)" "$dis" || true)"
report "rep string instructions" \
	"$(grep -E "$insn.*(rep[a-z]*|repn?[ez])[[:space:]]+(movs|stos|lods|scas|cmps|ins|outs)" "$dis" || true)"
report "SIMD/x87 registers" \
	"$(grep -E "$insn.*%(xmm|ymm|zmm|mm|st)[0-9(]|$insn.*%k[0-7]([^0-9]|$)" "$dis" || true)"
report "undecodable bytes" "$(grep -E "$insn.*\(bad\)" "$dis" || true)"

[ $status -eq 0 ] && echo "check-insns: $elf ok ($count instructions)"
exit $status
