/* Ring 3 for the test unikernel; see user.h. */
#include "io.h"
#include "kernel.h"
#include "lib.h"
#include "power.h"
#include "serial.h"
#include "user.h"

#define SEL_KCODE 0x08
#define SEL_TSS 0x30
#define USER_STACK_SIZE 65536
#define PTE_P 0x1ull
#define PTE_US 0x4ull
#define PTE_PS 0x80ull
#define PTE_ADDR 0x000ffffffffff000ull

int user_enabled = 1;
uint64_t user_port_traps;
uint64_t tsc_per_ms;

struct tss64 {
	uint32_t reserved0;
	uint64_t rsp[3];
	uint64_t reserved1;
	uint64_t ist[7];
	uint64_t reserved2;
	uint16_t reserved3;
	uint16_t iomap_base;
} __attribute__((packed));

struct user_frame {
	uint64_t r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
	uint64_t vec, err, rip, cs, rflags, rsp, ss;
};

struct idt_gate {
	uint16_t off0, sel;
	uint8_t ist, type;
	uint16_t off1;
	uint32_t off2, reserved;
} __attribute__((packed));

struct tss64 user_tss __attribute__((aligned(16)));
uint64_t user_kstack; /* kernel %rsp saved by user_enter */

/* The boot GDT's entries (same selectors), plus DPL-3 data (0x20) and 64-bit
 * code (0x28), and the TSS (0x30, two slots). */
static uint64_t gdt[8] __attribute__((aligned(16))) = {
	0,
	0x00af9b000000ffffull, /* 0x08: 64-bit code */
	0x00cf93000000ffffull, /* 0x10: data */
	0x00cf9b000000ffffull, /* 0x18: 32-bit code */
	0x00cff3000000ffffull, /* 0x20: user data, DPL 3 */
	0x00affb000000ffffull, /* 0x28: user 64-bit code, DPL 3 */
	0,
	0,
};
/* 0-31: the exception stubs; 32-255: irq_wake (an interrupt only ends a
 * `hlt`, see timer.c's idle=hlt). */
static struct idt_gate idt[256] __attribute__((aligned(16)));
static uint8_t user_stack[USER_STACK_SIZE] __attribute__((section(".noinit.user"), aligned(4096)));
static int ready;

extern const uint64_t user_stub_table[32];
extern char irq_wake[];
extern uint64_t pml4[512];
extern char user_tramp_hlt[];
long user_enter(long (*fn)(long), long arg, uint64_t user_rsp);
__attribute__((noreturn)) void user_leave(long ret);

int user_mode(void)
{
	uint16_t cs;
	__asm__ volatile("movw %%cs, %0" : "=r"(cs));
	return (cs & 3) == 3;
}

/* The PIT wait can only overshoot (each poll of it is an exit, and so is each
 * PIT set-up): one 50 ms wait, the shorter of two. */
static void calibrate_tsc(void)
{
	uint64_t best = 0;
	for (int i = 0; i < 2; i++) {
		uint64_t t0 = rdtsc();
		delay_us(50000);
		uint64_t t1 = rdtsc();
		if (t1 > t0 && (!best || t1 - t0 < best))
			best = t1 - t0;
	}
	tsc_per_ms = best / 50;
}

void tsc_clock_start(struct tsc_clock *c)
{
	c->last = rdtsc();
	c->frac = 0;
	c->ms = 0;
}

uint32_t tsc_clock_ms(struct tsc_clock *c)
{
	uint64_t now = rdtsc(), prev = c->last;
	c->last = now;
	if (!tsc_per_ms || now < prev || now - prev > 100 * tsc_per_ms)
		return c->ms; /* no time base, or a jump: this step does not count */
	c->frac += now - prev;
	while (c->frac >= tsc_per_ms) {
		c->frac -= tsc_per_ms;
		c->ms++;
	}
	return c->ms;
}

/* U/S on every present entry of the identity map (mem.c may have added some). */
static void set_user_bits(void)
{
	for (unsigned i = 0; i < 512; i++) {
		if (!(pml4[i] & PTE_P))
			continue;
		pml4[i] |= PTE_US;
		uint64_t *pdpt = (uint64_t *)(uintptr_t)(pml4[i] & PTE_ADDR);
		for (unsigned j = 0; j < 512; j++) {
			if (!(pdpt[j] & PTE_P))
				continue;
			pdpt[j] |= PTE_US;
			if (pdpt[j] & PTE_PS)
				continue;
			uint64_t *pd = (uint64_t *)(uintptr_t)(pdpt[j] & PTE_ADDR);
			for (unsigned k = 0; k < 512; k++) {
				if (!(pd[k] & PTE_P))
					continue;
				pd[k] |= PTE_US;
				if (pd[k] & PTE_PS)
					continue;
				uint64_t *pt = (uint64_t *)(uintptr_t)(pd[k] & PTE_ADDR);
				for (unsigned l = 0; l < 512; l++)
					if (pt[l] & PTE_P)
						pt[l] |= PTE_US;
			}
		}
	}
	uint64_t cr3;
	__asm__ volatile("movq %%cr3, %0" : "=r"(cr3));
	__asm__ volatile("movq %0, %%cr3" : : "r"(cr3) : "memory");
}

static void set_gate(unsigned v, uint64_t h)
{
	idt[v].off0 = (uint16_t)h;
	idt[v].sel = SEL_KCODE;
	idt[v].ist = 0;
	idt[v].type = 0x8e; /* present, DPL 0, 64-bit interrupt gate */
	idt[v].off1 = (uint16_t)(h >> 16);
	idt[v].off2 = (uint32_t)(h >> 32);
	idt[v].reserved = 0;
}

void cpu_tables_load(void)
{
	static int loaded;
	if (loaded)
		return;
	uint64_t base = (uint64_t)(uintptr_t)&user_tss, limit = sizeof(user_tss) - 1;
	memset(&user_tss, 0, sizeof(user_tss));
	user_tss.iomap_base = sizeof(user_tss); /* no I/O bitmap: IOPL decides */
	gdt[6] = (limit & 0xffff) | (base & 0xffffff) << 16 | 0x89ull << 40 |
		 ((limit >> 16) & 0xf) << 48 | ((base >> 24) & 0xff) << 56;
	gdt[7] = base >> 32;
	for (unsigned v = 0; v < 256; v++)
		set_gate(v, v < 32 ? user_stub_table[v] : (uint64_t)(uintptr_t)irq_wake);
	struct {
		uint16_t limit;
		uint64_t base;
	} __attribute__((packed)) gp = { sizeof(gdt) - 1, (uint64_t)(uintptr_t)gdt },
				  ip = { sizeof(idt) - 1, (uint64_t)(uintptr_t)idt };
	__asm__ volatile("lgdt %0" : : "m"(gp) : "memory");
	__asm__ volatile("lidt %0" : : "m"(ip) : "memory");
	__asm__ volatile("ltr %w0" : : "r"((uint16_t)SEL_TSS) : "memory");
	loaded = 1;
}

int user_init(void)
{
	if (!ready) {
		cpu_tables_load();
		calibrate_tsc();
		ready = 1;
	}
	set_user_bits();
	return 0;
}

long user_call(long (*fn)(long), long arg)
{
	if (!user_enabled || user_mode())
		return fn(arg);
	if (user_init() != 0)
		return fn(arg);
	return user_enter(fn, arg, (uint64_t)(uintptr_t)(user_stack + USER_STACK_SIZE));
}

static void dump(const char *who, const struct user_frame *f)
{
	uint64_t cr2;
	__asm__ volatile("movq %%cr2, %0" : "=r"(cr2));
	kprintf("%s exception vector=%lu error=0x%lx rip=0x%lx cs=0x%lx rflags=0x%lx rsp=0x%lx "
		"cr2=0x%lx\n",
		who, f->vec, f->err, f->rip, f->cs, f->rflags, f->rsp, cr2);
}

/* A software KVM may run ring 3 with IOPL 0 whatever RFLAGS says, so port
 * I/O there raises #GP: do the in/out here for it (E4-E7, EC-EF, 66 prefix).
 * 1 if it was one. */
static int emulate_port_io(struct user_frame *f)
{
	const uint8_t *p = (const uint8_t *)(uintptr_t)f->rip;
	unsigned len = 0, size = 4;
	if (p[len] == 0x66) {
		size = 2;
		len++;
	}
	uint8_t op = p[len++];
	uint16_t port;
	if (op >= 0xe4 && op <= 0xe7)
		port = p[len++];
	else if (op >= 0xec && op <= 0xef)
		port = (uint16_t)f->rdx;
	else
		return 0;
	if (!(op & 1))
		size = 1;
	if (op & 2) { /* out */
		if (size == 1)
			outb(port, (uint8_t)f->rax);
		else if (size == 2)
			outw(port, (uint16_t)f->rax);
		else
			outl(port, (uint32_t)f->rax);
	} else if (size == 1) {
		f->rax = (f->rax & ~0xffull) | inb(port);
	} else if (size == 2) {
		f->rax = (f->rax & ~0xffffull) | inw(port);
	} else {
		f->rax = inl(port);
	}
	f->rip += len;
	user_port_traps++;
	return 1;
}

/* Called by the exception stubs on the kernel stack. */
struct user_frame *user_trap(struct user_frame *f)
{
	if ((f->cs & 3) == 3) {
		if (f->vec == 13 && emulate_port_io(f))
			return f;
		if (f->vec == 13 && f->rip == (uint64_t)(uintptr_t)user_tramp_hlt)
			user_leave((long)f->rax);
		serial_puts("CHECK FAIL ");
		dump("user", f);
		check_failures++;
		user_leave(-1);
	}
	dump("KERNEL", f);
	kprintf("RESULT fail failures=%u\n", check_failures + 1);
	outb(DEBUG_EXIT_PORT, 0x7e);
	halt_forever();
}

/* ---- user=0|1, userbench=1 ---- */

static int bench;

int user_parse_key(const char *k, size_t kn, const char *v, size_t vn)
{
	int64_t m = parse_num(v, vn);
	if (word_eq(k, kn, "user")) {
		if (m < 0 || m > 1)
			check_fail("bad user= value");
		else
			user_enabled = (int)m;
	} else if (word_eq(k, kn, "userbench")) {
		bench = m > 0;
	} else {
		return 0;
	}
	return 1;
}

static long spin(long n)
{
	volatile uint32_t h = 0x811c9dc5u;
	for (long i = 0; i < n; i++)
		h = (h ^ (uint32_t)i) * 0x01000193u;
	return (long)h;
}

static long bench_user(long n)
{
	kprintf("USER cpl3=%d\n", user_mode());
	uint64_t t0 = rdtsc();
	spin(n);
	uint64_t t1 = rdtsc();
	kprintf("USER ring3 %ld iterations: %lu tsc\n", n, t1 - t0);
	return 42;
}

/* userbench=1: the same loop in ring 0 and in ring 3, timed by the TSC. */
void user_bench(void)
{
	if (!bench)
		return;
	user_init();
	long n = 200000;
	uint64_t t0 = rdtsc();
	spin(n);
	uint64_t t1 = rdtsc();
	kprintf("USER tsc_per_ms=%lu ring0 %ld iterations: %lu tsc\n", tsc_per_ms, n, t1 - t0);
	long r = user_call(bench_user, n);
	kprintf("USER returned %ld cpl3=%d\n", r, user_mode());
	r = user_call(bench_user, n * 100);
	kprintf("USER returned %ld\n", r);
}
