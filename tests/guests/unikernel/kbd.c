/* The heartbeat action: a polled i8042 keyboard and a periodic line, so the
 * host can tell the guest is alive and see what the keyboard sent. */
#include "io.h"
#include "hotplug.h"
#include "kbd.h"
#include "kernel.h"
#include "power.h"
#include "serial.h"
#include "snap.h"

#define I8042_DATA 0x60
#define I8042_STATUS 0x64 /* read: status; write: controller command */
#define STR_OBF 0x01
#define STR_IBF 0x02
#define CTR_KBDINT 0x01
#define CTR_AUXINT 0x02
#define CTR_KBDDIS 0x10
#define CTR_XLATE 0x40
#define WAIT_LOOPS 100000 /* bounded polls: a missing controller must not hang us */

/* Press Ctrl, Alt, Delete; release Delete, Alt, Ctrl (scancode set 1). */
static const uint8_t ctrl_alt_del[] = { 0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d };
#define CAD_LEN (sizeof(ctrl_alt_del) / sizeof(ctrl_alt_del[0]))

static void wait_ibf_clear(void)
{
	for (int i = 0; i < WAIT_LOOPS; i++)
		if (!(inb(I8042_STATUS) & STR_IBF))
			return;
}

/* The next output byte, or -1 if none comes. */
static int read_data(void)
{
	for (int i = 0; i < WAIT_LOOPS; i++)
		if (inb(I8042_STATUS) & STR_OBF)
			return inb(I8042_DATA);
	return -1;
}

static void command(uint8_t cmd)
{
	wait_ibf_clear();
	outb(I8042_STATUS, cmd);
}

static void write_data(uint8_t v)
{
	wait_ibf_clear();
	outb(I8042_DATA, v);
}

/* Drop whatever is in the output buffer (at most 32 bytes). */
static void flush(void)
{
	for (int i = 0; i < 32 && (inb(I8042_STATUS) & STR_OBF); i++)
		(void)inb(I8042_DATA);
}

/* As a driver would: returns 0 if the self-test passed. */
static int kbd_init(void)
{
	flush();
	command(0xaa); /* controller self-test */
	int selftest = read_data();
	command(0x20); /* read CTR */
	int ctr = read_data();
	if (ctr < 0)
		ctr = 0;
	ctr = (ctr & ~(CTR_KBDINT | CTR_AUXINT | CTR_KBDDIS)) | CTR_XLATE; /* polled */
	command(0x60); /* write CTR */
	write_data((uint8_t)ctr);
	command(0xae); /* enable the keyboard interface */
	command(0x20);
	int now = read_data();
	flush();
	kprintf("KBD init ctr=0x%02x selftest=0x%02x\n", now < 0 ? 0xff : now,
		selftest < 0 ? 0xff : selftest);
	return selftest == 0x55 ? 0 : -1;
}

/* Echo every byte waiting; returns 1 once the bytes seen end with Ctrl-Alt-Del. */
static int poll_kbd(void)
{
	static uint8_t last[CAD_LEN];
	static unsigned seen;
	int found = 0;
	for (int i = 0; i < 64 && (inb(I8042_STATUS) & STR_OBF); i++) {
		uint8_t b = inb(I8042_DATA);
		kprintf("KBD 0x%02x\n", b);
		for (unsigned k = 0; k + 1 < CAD_LEN; k++)
			last[k] = last[k + 1];
		last[CAD_LEN - 1] = b;
		if (seen < CAD_LEN)
			seen++;
		if (seen == CAD_LEN) {
			unsigned k = 0;
			while (k < CAD_LEN && last[k] == ctrl_alt_del[k])
				k++;
			if (k == CAD_LEN)
				found = 1;
		}
		if (found)
			break;
	}
	return found;
}

void heartbeat(uint32_t period_ms, uint32_t beats, uint8_t exit_value, uint8_t exit_value_fail)
{
	if (kbd_init() != 0) {
		kprintf("KBD self-test failed\n");
		exit_value = exit_value_fail;
	}
	int snap = snap_enabled();
	if (snap)
		snap_setup();
	for (uint32_t n = 1;; n++) {
		if (snap)
			snap_beat(n);
		else
			kprintf("HEARTBEAT %u\n", n);
		hotplug_beat();
		if (beats && n >= beats)
			power_action("exit", exit_value);
		for (uint32_t ms = 0; ms < period_ms; ms++) {
			if (poll_kbd()) {
				kprintf("KBD ctrl-alt-del\n");
				power_action("exit", exit_value);
			}
			if (snap)
				snap_tick();
			hotplug_tick();
			sleep_ms(1);
		}
	}
}
