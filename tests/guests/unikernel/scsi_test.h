/* The scsi check (see README.md, "The scsi check"). */
#ifndef SCSI_TEST_H
#define SCSI_TEST_H

#include <stddef.h>
#include <stdint.h>

/* A scsi* key=value word of the command line: 1 if it was one (bad values
 * are CHECK FAILs), 0 if the key is not a scsi key. */
int scsi_parse_key(const char *k, size_t kn, const char *v, size_t vn);
void scsi_check(void);
/* hotplug=1, at every beat: on the first, drive the virtio-scsi controller
 * (if any) with VIRTIO_SCSI_F_HOTPLUG and print "scsi: report luns: ...";
 * then take its events ("scsi: event transport reset lun N rescan|removed"),
 * and after scsi_hp_delay beats scan again with REPORT LUNS and write,
 * sync and read back a pattern on each LUN a rescan named
 * ("scsi: lun N write=ok sync=ok read=ok mismatches=0"). */
void scsi_hotplug_beat(void);
/* Beats between seeing a hot plug and acting on it (hpdelay=N). */
extern uint32_t scsi_hp_delay;

#endif
