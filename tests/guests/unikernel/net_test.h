/* The net check (see README.md, "The net check"). */
#ifndef NET_TEST_H
#define NET_TEST_H

#include <stddef.h>

/* A net* key=value word of the command line: 1 if it was one (bad values
 * are CHECK FAILs), 0 if the key is not a net key. */
int net_parse_key(const char *k, size_t kn, const char *v, size_t vn);
void net_check(void);

#endif
