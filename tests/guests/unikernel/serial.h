/* COM1 16550, polled output only (no interrupts are ever enabled). */
#ifndef SERIAL_H
#define SERIAL_H

#include <stdarg.h>

#define COM1 0x3f8

void serial_init(void);
void serial_putc(char c);
void serial_puts(const char *s);
/* Tiny printf: %s %c %d %u %x with optional 0/width and l modifier, %%.
 * Lines end in a bare "\n" (no CR). */
void kprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void vkprintf(const char *fmt, va_list ap);

#endif
