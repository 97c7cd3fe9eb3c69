/* Freestanding helpers: memory, strings, number parsing. */
#ifndef LIB_H
#define LIB_H

#include <stddef.h>
#include <stdint.h>

void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);

/* Does the word [s, s+n) equal the NUL-terminated string w? */
int word_eq(const char *s, size_t n, const char *w);
/* Parse an unsigned decimal (or 0x-prefixed hex) number of n chars; -1 on error. */
int64_t parse_num(const char *s, size_t n);

#endif
