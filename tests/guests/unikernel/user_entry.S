/*
 * Ring 3 entry and exception stubs of the test unikernel; see user.h.
 * Plain integer instructions only.
 */
#define SEL_UDATA 0x23 /* user.c's GDT, RPL 3 */
#define SEL_UCODE 0x2b
#define SEL_DATA 0x10
#define RFLAGS_USER 0x3002 /* IOPL 3, IF 0, bit 1 */

	.text
	.code64

/*
 * long user_enter(long (*fn)(long), long arg, uint64_t user_rsp)
 * Saves the callee-saved registers and the stack in user_kstack (TSS.RSP0 is
 * set from it by the caller's next step), then iretq to user_tramp at CPL 3.
 */
	.globl user_enter
user_enter:
	pushq %rbp
	pushq %rbx
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	movq %rsp, user_kstack(%rip)
	movq %rsp, user_tss+4(%rip)      /* TSS.RSP0: traps from ring 3 land below */
	pushq $SEL_UDATA                 /* ss */
	pushq %rdx                       /* rsp */
	pushq $RFLAGS_USER               /* rflags */
	pushq $SEL_UCODE                 /* cs */
	leaq user_tramp(%rip), %rax
	pushq %rax                       /* rip */
	iretq

/* long user_leave(long ret): back on the kernel stack of user_enter's caller. */
	.globl user_leave
user_leave:
	movq %rdi, %rax
	movq user_kstack(%rip), %rsp
	movl $SEL_DATA, %ecx
	movl %ecx, %ds
	movl %ecx, %es
	movl %ecx, %ss
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %rbx
	popq %rbp
	ret

/* Ring 3: fn(arg), then hlt (#GP at CPL 3) with the result in %rax. */
	.globl user_tramp
user_tramp:
	movq %rdi, %rax
	movq %rsi, %rdi
	callq *%rax
	.globl user_tramp_hlt
user_tramp_hlt:
	hlt
	jmp user_tramp_hlt

/* Exception stubs: vector, error code (0 if the CPU pushes none), then the
 * general registers; user_trap(struct user_frame *). */
.macro STUB vec, has_err
	.p2align 3
	.if \has_err == 0
	pushq $0
	.endif
	pushq $\vec
	jmp user_trap_common
.endm

/* Built in order so that stub i is at user_stub_table[i]. */
	.section .rodata
	.p2align 3
	.globl user_stub_table
user_stub_table:
	.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.quad user_stub_\v
	.endr
	.text

.macro DEFSTUB vec, has_err
user_stub_\vec:
	STUB \vec, \has_err
.endm
	DEFSTUB 0, 0
	DEFSTUB 1, 0
	DEFSTUB 2, 0
	DEFSTUB 3, 0
	DEFSTUB 4, 0
	DEFSTUB 5, 0
	DEFSTUB 6, 0
	DEFSTUB 7, 0
	DEFSTUB 8, 1
	DEFSTUB 9, 0
	DEFSTUB 10, 1
	DEFSTUB 11, 1
	DEFSTUB 12, 1
	DEFSTUB 13, 1
	DEFSTUB 14, 1
	DEFSTUB 15, 0
	DEFSTUB 16, 0
	DEFSTUB 17, 1
	DEFSTUB 18, 0
	DEFSTUB 19, 0
	DEFSTUB 20, 0
	DEFSTUB 21, 1
	DEFSTUB 22, 0
	DEFSTUB 23, 0
	DEFSTUB 24, 0
	DEFSTUB 25, 0
	DEFSTUB 26, 0
	DEFSTUB 27, 0
	DEFSTUB 28, 0
	DEFSTUB 29, 1
	DEFSTUB 30, 1
	DEFSTUB 31, 0

/* Vectors 32-255 (interrupts): end of interrupt to the local APIC (xAPIC
 * at its reset address), nothing else; the `hlt` they interrupted returns. */
	.globl irq_wake
irq_wake:
	pushq %rax
	movq $0xfee000b0, %rax
	movl $0, (%rax)
	popq %rax
	iretq

user_trap_common:
	pushq %rax
	pushq %rbx
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %rbp
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	movq %rsp, %rdi
	andq $-16, %rsp
	call user_trap
	/* user_trap returns only for a trap it resolved in place. */
	movq %rax, %rsp
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rbp
	popq %rdi
	popq %rsi
	popq %rdx
	popq %rcx
	popq %rbx
	popq %rax
	addq $16, %rsp
	iretq
