/* The i8042 keyboard controller, polled: the heartbeat action. */
#ifndef KBD_H
#define KBD_H

#include <stdint.h>

/* Initialise the i8042 (self-test, CTR with translation on and interrupts
 * off, keyboard enabled), then print "HEARTBEAT n" every period_ms ms while
 * echoing every byte from port 0x60 as "KBD 0x..". Ends through debug-exit
 * with `exit_value` after `beats` beats (0: never) or when the bytes end with
 * the scancode set 1 Ctrl-Alt-Del sequence. exit_value_fail replaces it if the
 * controller self-test failed. */
void heartbeat(uint32_t period_ms, uint32_t beats, uint8_t exit_value,
	       uint8_t exit_value_fail) __attribute__((noreturn));

#endif
