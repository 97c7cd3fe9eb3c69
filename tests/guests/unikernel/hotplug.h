/* ACPI PCI hot plug, seen the way a guest without an AML interpreter can:
 * poll the VMM's hot plug registers (PCIU, PCID, B0EJ at 0xae00) at every
 * heartbeat, report what changed, and eject slots the VMM asks back. */
#ifndef HOTPLUG_H
#define HOTPLUG_H

#include <stddef.h>

/* hotplug=1: poll at every beat (up to 3 plugged disks driven at once);
 * hpcheck=N: every N beats read each plugged disk's pattern back
 * ("HOTPLUG check slot=S read=0 mismatches=0"); hpdelay=N: drive a plugged disk (and act
 * on a virtio-scsi event) only N beats after seeing it, printing
 * "HOTPLUG enabling slot=S" first. Returns 1 if the key was ours. */
int hotplug_parse_key(const char *k, size_t kn, const char *v, size_t vn);
/* One poll: prints "HOTPLUG up slot=N vendor=V device=D" for each new
 * device and, for each removal request, ejects the slot and prints
 * "HOTPLUG ejected slot=N". */
void hotplug_beat(void);
/* Between beats (every millisecond): serve hot-plugged NICs. */
void hotplug_tick(void);

#endif
