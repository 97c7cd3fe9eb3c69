/* The scsi check (see README.md, "The scsi check"). */
#ifndef SCSI_TEST_H
#define SCSI_TEST_H

#include <stddef.h>

/* A scsi* key=value word of the command line: 1 if it was one (bad values
 * are CHECK FAILs), 0 if the key is not a scsi key. */
int scsi_parse_key(const char *k, size_t kn, const char *v, size_t vn);
void scsi_check(void);

#endif
