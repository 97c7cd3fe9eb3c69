/*
 * Entries of the tern test unikernel.
 *
 * PVH (_start32, named by the PVH note of unikernel.elf): entered in 32-bit
 * protected mode, paging off, flat segments, %ebx = physical address of struct
 * hvm_start_info. Loads the link-time identity page tables (low 4 GiB, 2 MiB
 * pages, uncached above 2 GiB where the MMIO lives), switches to long mode,
 * zeroes .bss and calls kmain(start_info_paddr, BOOT_PVH).
 *
 * Linux 64-bit boot protocol (_start64_linux, e_entry of unikernel-linux64.elf,
 * which has no PVH note): entered in long mode with the VMM's page tables,
 * %rsi = physical address of struct boot_params. Loads our GDT, switches CR3
 * to the same page tables, zeroes .bss and calls
 * kmain(boot_params_paddr, BOOT_LINUX64). Both ELFs contain both entries.
 *
 * Also holds the AP start-up trampoline, copied to AP_TRAMPOLINE (< 1 MiB) by
 * smp.c: real mode -> 32-bit -> long mode -> ap_main(apic_id) on a per-APIC-id
 * stack.
 *
 * Plain integer instructions only (the host may run this through KVM's
 * instruction emulator).
 */

#define SEL_CODE64 0x08
#define SEL_DATA 0x10
#define SEL_CODE32 0x18

#define CR0_PE 0x00000001
#define CR0_CD_NW 0x60000000
#define CR0_PG 0x80000000
#define CR4_PAE 0x00000020
#define MSR_EFER 0xc0000080
#define EFER_LME 0x00000100

#define PTE_P_RW 0x003
#define PDE_2M 0x083 /* present, writable, page size */
#define PTE_PCD_PWT 0x018

#define BOOT_STACK_SIZE 16384
#define MAX_CPUS 64 /* kernel.h */
#define AP_STACK_SIZE 4096 /* kernel.h */
#define AP_TRAMPOLINE 0x8000 /* smp.h */
#define BOOT_PVH 0 /* kernel.h */
#define BOOT_LINUX64 1

/* ------------------------------------------------------------------ */
/* PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY (18), name "Xen".             */

	.section .note.Xen, "a", @note
	.p2align 2
	.long 4          /* namesz */
	.long 8          /* descsz */
	.long 18         /* type: XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.p2align 2
	.quad _start32   /* 32-bit physical entry (readers take the low 4 bytes) */
	.p2align 2

/* ------------------------------------------------------------------ */
/* Shared by the BSP and the APs: 32-bit protected mode -> long mode.  */

.macro ENTER_LONG_MODE target
	movl %cr4, %eax
	orl $CR4_PAE, %eax
	movl %eax, %cr4
	movl $pml4, %eax
	movl %eax, %cr3
	movl $MSR_EFER, %ecx
	rdmsr
	orl $EFER_LME, %eax
	wrmsr
	movl %cr0, %eax
	andl $~CR0_CD_NW, %eax
	orl $(CR0_PG | CR0_PE), %eax
	movl %eax, %cr0
	ljmp $SEL_CODE64, $\target
.endm

.macro LOAD_DATA_SEGMENTS
	movl $SEL_DATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs
.endm

/*
 * Zero .bss (variables only: the page tables are static data and the stacks
 * live outside .bss). Runs in 64-bit mode, where a software KVM runs most of
 * it natively; in 32-bit mode every instruction would be emulated.
 * Clobbers %rdi, %rcx.
 */
.macro ZERO_BSS
	movl $__bss_start, %edi
	movl $__bss_end, %ecx
1:	cmpq %rcx, %rdi
	jae 2f
	movq $0, (%rdi)
	addq $8, %rdi
	jmp 1b
2:
.endm

	.section .boot32, "ax"
	.code32
	.globl _start32
_start32:
	cli
	cld
	movl %ebx, %esi                  /* hvm_start_info, kept in %esi */
	movl $BOOT_PVH, %ebx             /* boot protocol, kept in %ebx */
	lgdt gdt_ptr
	LOAD_DATA_SEGMENTS
	movl $boot_stack_top, %esp
	/* The page tables are built at link time: nothing to compute here. */
	ENTER_LONG_MODE bsp_long64

/* AP, after the trampoline: 32-bit protected mode with our GDT. */
ap_start32:
	LOAD_DATA_SEGMENTS
	ENTER_LONG_MODE ap_long64

	.section .text.boot64, "ax"
	.code64
/* Linux 64-bit boot protocol entry (e_entry of unikernel-linux64.elf). */
	.globl _start64_linux
_start64_linux:
	cli
	cld
	movl %esi, %esi                  /* boot_params (below 4 GiB), kept in %esi */
	movl $BOOT_LINUX64, %ebx
	movq $boot_stack_top, %rsp
	lgdt gdt_ptr
	pushq $SEL_CODE64                /* reload %cs from our GDT */
	pushq $1f
	lretq
1:	LOAD_DATA_SEGMENTS
	movl $pml4, %eax
	movq %rax, %cr3
	/* fall through */

/* %esi = boot info (start_info or boot_params), %ebx = BOOT_PVH/BOOT_LINUX64. */
bsp_long64:
	LOAD_DATA_SEGMENTS
	movq $boot_stack_top, %rsp
	ZERO_BSS
	movl %esi, %edi                  /* kmain(info_paddr, protocol) */
	movl %ebx, %esi
	call kmain
5:	cli
	hlt
	jmp 5b

ap_long64:
	LOAD_DATA_SEGMENTS
	movl $0xfee00020, %esi           /* xAPIC ID register */
	movl (%rsi), %edi
	shrl $24, %edi                   /* ap_main(apic_id) */
	cmpl $MAX_CPUS, %edi
	jae 7f
	movl %edi, %eax
	incl %eax
	shll $12, %eax                   /* (id + 1) * AP_STACK_SIZE */
	addq $ap_stacks, %rax
	movq %rax, %rsp
	call ap_main
7:	cli
	hlt
	jmp 7b

/* ------------------------------------------------------------------ */
/* AP trampoline: copied to AP_TRAMPOLINE; the SIPI vector is its page. */

	.section .tramp16, "ax"
	.code16
	.globl ap_tramp_start, ap_tramp_end
ap_tramp_start:
	cli
	cld
	xorw %ax, %ax
	movw %ax, %ds
	lgdtl AP_TRAMPOLINE + (ap_tramp_data - ap_tramp_start)
	movl %cr0, %eax
	andl $~CR0_CD_NW, %eax
	orl $CR0_PE, %eax
	movl %eax, %cr0
	ljmpl $SEL_CODE32, $ap_start32
	.p2align 2
ap_tramp_data:
	.word gdt_end - gdt - 1
	.long gdt
ap_tramp_end:
	.code64

/* ------------------------------------------------------------------ */

	.section .data
	.p2align 3
gdt:
	.quad 0
	.quad 0x00af9b000000ffff         /* 0x08: 64-bit code, accessed */
	.quad 0x00cf93000000ffff         /* 0x10: data, accessed */
	.quad 0x00cf9b000000ffff         /* 0x18: 32-bit code, accessed */
gdt_end:
	.p2align 3
gdt_ptr:
	.word gdt_end - gdt - 1
	.quad gdt

/*
 * Identity map of the low 4 GiB with 2 MiB pages, uncached from 2 GiB up
 * (where the MMIO lives), computed by the assembler: the VMM copies it in
 * with the image, so the guest's 32-bit entry (fully emulated on a software
 * KVM) does no work for it. mem.c extends it at run time.
 */
	.section .data.pagetables, "aw"
	.p2align 12
	.globl pml4, pdpt
pml4:
	.quad pdpt + PTE_P_RW
	.fill 511, 8, 0
pdpt:
	.quad pd + PTE_P_RW, pd + 0x1000 + PTE_P_RW, pd + 0x2000 + PTE_P_RW, pd + 0x3000 + PTE_P_RW
	.fill 508, 8, 0
pd:
	.set pde_index, 0
	.rept 2048
	/* GAS comparisons give -1 for true: the mask keeps PCD|PWT from 2 GiB. */
	.quad (pde_index << 21) | PDE_2M | ((pde_index >= 1024) & PTE_PCD_PWT)
	.set pde_index, pde_index + 1
	.endr

/* Stacks are not zeroed (NOLOAD, outside .bss). */
	.section .stack, "aw", @nobits
	.p2align 12
boot_stack:
	.skip BOOT_STACK_SIZE
boot_stack_top:
	.globl ap_stacks
ap_stacks:                               /* stack of APIC id i ends at ap_stacks + (i+1)*4K */
	.skip MAX_CPUS * AP_STACK_SIZE
