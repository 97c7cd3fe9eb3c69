/*
 * tern test unikernel: one RWX PT_LOAD at 1 MiB.
 * Run through cpp (-undef -P) by the Makefile:
 *   unikernel.elf:         plus the PVH PT_NOTE, entry _start32
 *   unikernel-linux64.elf: -DLINUX64, no note (the .note.Xen input section is
 *                          discarded), e_entry _start64_linux
 */
OUTPUT_FORMAT("elf64-x86-64")
OUTPUT_ARCH(i386:x86-64)
#ifdef LINUX64
ENTRY(_start64_linux)
#else
ENTRY(_start32)
#endif

PHDRS
{
	image PT_LOAD FLAGS(7);
#ifndef LINUX64
	note PT_NOTE FLAGS(4);
#endif
}

SECTIONS
{
	. = 0x100000;
	__image_start = .;

	/* Sections by code size, so that tools disassemble each correctly. */
	.boot32 : {
		*(.boot32)
	} :image

	.text : {
		*(.text.boot64)
		*(.text .text.*)
	} :image

	.tramp16 : {
		*(.tramp16)
	} :image

#ifndef LINUX64
	.note : {
		*(.note.Xen)
	} :image :note
#endif

	.rodata : {
		*(.rodata .rodata.*)
	} :image

	.data : {
		*(.data .data.*)
	} :image

	.bss (NOLOAD) : ALIGN(4096) {
		__bss_start = .;
		*(.bss .bss.*)
		*(COMMON)
		. = ALIGN(4);
		__bss_end = .;
	} :image

	.stack (NOLOAD) : ALIGN(4096) {
		*(.stack)
		*(.noinit .noinit.*)
	} :image

	__image_end = .;

	/DISCARD/ : {
#ifdef LINUX64
		*(.note.Xen)
#endif
		*(.comment)
		*(.eh_frame .eh_frame_hdr)
		*(.note.GNU-stack)
		*(.note.gnu.*)
	}
}
