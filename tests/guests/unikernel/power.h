/* The final actions: every one of them is meant to end the VM. */
#ifndef POWER_H
#define POWER_H

#include <stdint.h>

#define DEBUG_EXIT_PORT 0x501

/* Run the action named `name` (exit, i8042, cf9, acpi-reset, s5, halt,
 * triple-fault). If the VM survives, prints "ACTION <name> did not end the VM"
 * and halts forever. `exit_value` is the byte written for "exit". */
void power_action(const char *name, uint8_t exit_value) __attribute__((noreturn));

/* Is `name` an action? Includes "heartbeat", which kmain runs itself (kbd.h). */
int power_action_known(const char *name);

#endif
