/* The net check (see README.md, "The net check"). */
#ifndef NET_TEST_H
#define NET_TEST_H

#include <stddef.h>

/* A net* key=value word of the command line: 1 if it was one (bad values
 * are CHECK FAILs), 0 if the key is not a net key. */
int net_parse_key(const char *k, size_t kn, const char *v, size_t vn);
void net_check(void);

/* netserve=1 with the heartbeat: bring every virtio-net function up (netip/
 * netgw as for the check, one queue pair) and print "NETSERVE <bdf> mac=..
 * ip=.."; net_serve_poll answers ARP and pings (called every millisecond
 * between beats); net_serve_answered counts the pings answered. */
int net_serve_init(void);
void net_serve_poll(void);
/* Hot plug: serve a NIC plugged at bdf (index, or -1); stop serving one. */
int net_serve_add(uint16_t bdf);
/* Sends a gratuitous ARP on served NIC i (net_serve_add's index) and waits
 * up to a second for the device to take it: 0 when it did. */
int net_serve_announce(int i);
void net_serve_remove(uint16_t bdf);
unsigned net_serve_answered(void);

#endif
