/* The net check: every virtio-net function on bus 0 is initialised and a
 * tiny polled IPv4 stack (ARP, ICMP echo, UDP) runs over it. See README.md,
 * "The net check". */
#include "io.h"
#include "kernel.h"
#include "lib.h"
#include "net_test.h"
#include "serial.h"
#include "user.h"
#include "virtio_net.h"

#define MAX_NICS 4
#define POLL_SPINS 100000
#define ETH_HLEN 14
#define IP_HLEN 20
#define UDP_HLEN 8
#define ICMP_HLEN 8
#define ETH_ARP 0x0806
#define ETH_IP 0x0800
#define IPPROTO_ICMP 1
#define IPPROTO_UDP 17
#define PING_ID 0x7e57
#define PING_COUNT 5
#define PING_DATA 56
#define UDP_DGRAM 1472 /* payload bytes per datagram: 1500 - 20 - 8 */
#define UDP_WINDOW 32  /* datagrams sent but not yet echoed, at most */
#define UDP_RTO_MS 200 /* no echo in order for this long: send the window again */
#define UDP_MAX_MIB 256

static struct {
	uint32_t ip[MAX_NICS], gw[MAX_NICS];
	unsigned queues[MAX_NICS];
	int n_ip, n_gw, n_queues;
	uint32_t udp_mib, wait_s;
	uint16_t port;
} opt = { .port = 7777 };

struct nic {
	struct vnet v;
	int up;
	uint32_t ip, gw;
	uint8_t gw_mac[6];
	int gw_known;
	uint16_t ip_id;
	unsigned answered;
	/* ICMP echo replies to our requests: seq of the last one, rx queue */
	int got_seq, got_rxq;
	unsigned bad_csum;
};

static struct nic nics[MAX_NICS];

/* ---- options ---- */

static int parse_ip(const char *s, size_t n, uint32_t *ip)
{
	uint32_t v = 0;
	unsigned parts = 0;
	size_t i = 0;
	while (parts < 4) {
		size_t j = i;
		while (j < n && s[j] != '.')
			j++;
		int64_t b = parse_num(s + i, j - i);
		if (j == i || j - i > 3 || b < 0 || b > 255)
			return -1;
		v = v << 8 | (uint32_t)b;
		parts++;
		if (j == n)
			break;
		i = j + 1;
	}
	if (parts != 4 || i > n)
		return -1;
	*ip = v;
	return 0;
}

/* Comma-separated list; kind 0: IPv4 addresses, 1: numbers 1..VNET_MAX_QP. */
static int parse_list(const char *v, size_t vn, uint32_t *out, int kind)
{
	int cnt = 0;
	size_t i = 0;
	while (i <= vn && cnt < MAX_NICS) {
		size_t j = i;
		while (j < vn && v[j] != ',')
			j++;
		if (kind == 0) {
			if (parse_ip(v + i, j - i, &out[cnt]) != 0)
				return -1;
		} else {
			int64_t q = parse_num(v + i, j - i);
			if (q < 1 || q > VNET_MAX_QP)
				return -1;
			out[cnt] = (uint32_t)q;
		}
		cnt++;
		if (j >= vn)
			break;
		i = j + 1;
	}
	return cnt;
}

int net_parse_key(const char *k, size_t kn, const char *v, size_t vn)
{
	if (word_eq(k, kn, "netip") || word_eq(k, kn, "netgw")) {
		int gw = word_eq(k, kn, "netgw");
		int c = parse_list(v, vn, gw ? opt.gw : opt.ip, 0);
		if (c < 0)
			check_fail("bad %s value", gw ? "netgw=" : "netip=");
		else if (gw)
			opt.n_gw = c;
		else
			opt.n_ip = c;
	} else if (word_eq(k, kn, "netqueues")) {
		uint32_t q[MAX_NICS];
		int c = parse_list(v, vn, q, 1);
		if (c < 0)
			check_fail("bad netqueues= value");
		for (int i = 0; i < c; i++)
			opt.queues[i] = q[i];
		opt.n_queues = c < 0 ? 0 : c;
	} else if (word_eq(k, kn, "netudp")) {
		int64_t m = parse_num(v, vn);
		if (m < 0 || m > UDP_MAX_MIB)
			check_fail("bad netudp= value");
		else
			opt.udp_mib = (uint32_t)m;
	} else if (word_eq(k, kn, "netport")) {
		int64_t m = parse_num(v, vn);
		if (m < 1 || m > 65535)
			check_fail("bad netport= value");
		else
			opt.port = (uint16_t)m;
	} else if (word_eq(k, kn, "netwait")) {
		int64_t m = parse_num(v, vn);
		if (m < 0 || m > 86400)
			check_fail("bad netwait= value");
		else
			opt.wait_s = (uint32_t)m;
	} else if (word_eq(k, kn, "nettimeout")) {
		int64_t m = parse_num(v, vn);
		if (m < 1 || m > 600000)
			check_fail("bad nettimeout= value");
		else
			vnet_timeout_ms = (uint32_t)m;
	} else {
		return 0;
	}
	return 1;
}

/* ---- byte order, checksums ---- */

static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t get32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static void put16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}
static void put32(uint8_t *p, uint32_t v)
{
	put16(p, (uint16_t)(v >> 16));
	put16(p + 2, (uint16_t)v);
}

/* One's-complement sum of big-endian 16-bit words (odd byte padded). */
static uint32_t csum_add(uint32_t sum, const uint8_t *p, uint32_t len)
{
	uint32_t i = 0;
	for (; i + 1 < len; i += 2)
		sum += (uint32_t)(p[i] << 8 | p[i + 1]);
	if (i < len)
		sum += (uint32_t)p[i] << 8;
	return sum;
}

static uint16_t csum_fold(uint32_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

/* UDP checksum (pseudo header + UDP header + data, checksum field as is). */
static uint16_t udp_csum(uint32_t src, uint32_t dst, const uint8_t *udp, uint32_t len)
{
	uint8_t ph[12];
	put32(ph, src);
	put32(ph + 4, dst);
	ph[8] = 0;
	ph[9] = IPPROTO_UDP;
	put16(ph + 10, (uint16_t)len);
	return csum_fold(csum_add(csum_add(0, ph, 12), udp, len));
}

static uint32_t fnv1a(uint32_t h, const uint8_t *p, uint32_t len)
{
	for (uint32_t i = 0; i < len; i++) {
		h ^= p[i];
		h *= 0x01000193u;
	}
	return h;
}

static void print_ip(uint32_t ip)
{
	kprintf("%u.%u.%u.%u", ip >> 24, (ip >> 16) & 255, (ip >> 8) & 255, ip & 255);
}

static void print_mac(const uint8_t *m)
{
	kprintf("%02x:%02x:%02x:%02x:%02x:%02x", m[0], m[1], m[2], m[3], m[4], m[5]);
}

/* ---- sending ---- */

static const uint8_t bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };

static uint8_t *eth_begin(struct nic *n, unsigned qi, const uint8_t *dst, uint16_t type)
{
	uint8_t *f = vnet_tx_begin(&n->v, qi);
	if (!f)
		return 0;
	memcpy(f, dst, 6);
	memcpy(f + 6, n->v.mac, 6);
	put16(f + 12, type);
	return f;
}

static int send_arp(struct nic *n, unsigned qi, uint16_t op, const uint8_t *tha, uint32_t tpa)
{
	uint8_t *f = eth_begin(n, qi, op == 1 ? bcast : tha, ETH_ARP);
	if (!f)
		return -1;
	uint8_t *a = f + ETH_HLEN;
	put16(a, 1);
	put16(a + 2, ETH_IP);
	a[4] = 6;
	a[5] = 4;
	put16(a + 6, op);
	memcpy(a + 8, n->v.mac, 6);
	put32(a + 14, n->ip);
	if (op == 1)
		memset(a + 18, 0, 6);
	else
		memcpy(a + 18, tha, 6);
	put32(a + 24, tpa);
	memset(a + 28, 0, 18); /* pad to the 60-byte minimum */
	return vnet_tx_commit(&n->v, qi, 60);
}

/* Ethernet + IPv4 header for `plen` payload bytes; returns the payload. */
static uint8_t *ip_begin(struct nic *n, unsigned qi, const uint8_t *dmac, uint32_t dst,
			 uint8_t proto, uint32_t plen, uint8_t **frame)
{
	uint8_t *f = eth_begin(n, qi, dmac, ETH_IP);
	if (!f)
		return 0;
	uint8_t *ip = f + ETH_HLEN;
	ip[0] = 0x45;
	ip[1] = 0;
	put16(ip + 2, (uint16_t)(IP_HLEN + plen));
	put16(ip + 4, n->ip_id++);
	put16(ip + 6, 0x4000); /* DF */
	ip[8] = 64;
	ip[9] = proto;
	put16(ip + 10, 0);
	put32(ip + 12, n->ip);
	put32(ip + 16, dst);
	put16(ip + 10, csum_fold(csum_add(0, ip, IP_HLEN)));
	*frame = f;
	return ip + IP_HLEN;
}

static int ip_commit(struct nic *n, unsigned qi, uint32_t plen)
{
	uint32_t len = ETH_HLEN + IP_HLEN + plen;
	return vnet_tx_commit(&n->v, qi, len < 60 ? 60 : len);
}

static int send_ping(struct nic *n, unsigned qi, uint16_t seq)
{
	uint8_t *f;
	uint8_t *p = ip_begin(n, qi, n->gw_mac, n->gw, IPPROTO_ICMP, ICMP_HLEN + PING_DATA, &f);
	if (!p)
		return -1;
	p[0] = 8;
	p[1] = 0;
	put16(p + 2, 0);
	put16(p + 4, PING_ID);
	put16(p + 6, seq);
	for (unsigned i = 0; i < PING_DATA; i++)
		p[ICMP_HLEN + i] = (uint8_t)(seq + i);
	put16(p + 2, csum_fold(csum_add(0, p, ICMP_HLEN + PING_DATA)));
	return ip_commit(n, qi, ICMP_HLEN + PING_DATA);
}

/* ---- UDP exchange state ---- */

/* Go-back-N: datagrams [rx_next, next) are in flight; echoes are taken in
 * sequence order only (others are dropped and come again), so both FNVs are
 * over the stream in sequence order whatever was lost and resent. */
static struct {
	struct nic *nic;          /* exchange running on this NIC, 0: none */
	uint32_t total, dgrams;   /* bytes, datagrams */
	uint32_t next, hi;        /* next seq to send; 1 + highest seq sent so far */
	uint32_t rx_next;         /* next seq whose echo is taken */
	uint64_t tx_bytes, rx_bytes;
	uint32_t fnv_tx, fnv_rx;
	unsigned bad, dup, ooo, resent, rounds, fast;
	uint32_t fast_for;        /* 1 + rx_next of the last fast go-back, 0: none */
	int progress;
} udp;

static uint32_t dgram_len(uint32_t seq)
{
	uint32_t off = seq * UDP_DGRAM;
	return udp.total - off < UDP_DGRAM ? udp.total - off : UDP_DGRAM;
}

/* Datagram payload: seq (big-endian u32), then byte k (k >= 4) = (seq*31 + k) & 0xff. */
static void dgram_fill(uint8_t *p, uint32_t seq, uint32_t len)
{
	put32(p, seq);
	for (uint32_t k = 4; k < len; k++)
		p[k] = (uint8_t)(seq * 31 + k);
}

static int dgram_ok(const uint8_t *p, uint32_t seq, uint32_t len)
{
	for (uint32_t k = 4; k < len; k++)
		if (p[k] != (uint8_t)(seq * 31 + k))
			return 0;
	return 1;
}

static int send_dgram(struct nic *n, uint32_t seq, int first)
{
	uint32_t len = dgram_len(seq);
	uint8_t *f;
	uint8_t *u = ip_begin(n, 0, n->gw_mac, n->gw, IPPROTO_UDP, UDP_HLEN + len, &f);
	if (!u)
		return -1;
	put16(u, opt.port);
	put16(u + 2, opt.port);
	put16(u + 4, (uint16_t)(UDP_HLEN + len));
	put16(u + 6, 0);
	dgram_fill(u + UDP_HLEN, seq, len);
	uint16_t c = udp_csum(n->ip, n->gw, u, UDP_HLEN + len);
	put16(u + 6, c ? c : 0xffff);
	if (first) {
		udp.fnv_tx = fnv1a(udp.fnv_tx, u + UDP_HLEN, len);
		udp.tx_bytes += len;
	} else {
		udp.resent++;
	}
	return ip_commit(n, 0, UDP_HLEN + len);
}

static void udp_input(struct nic *n, uint32_t src, const uint8_t *u, uint32_t len)
{
	if (udp.nic != n || src != n->gw || get16(u) != opt.port || get16(u + 2) != opt.port ||
	    len < UDP_HLEN + 4)
		return;
	const uint8_t *p = u + UDP_HLEN;
	uint32_t plen = len - UDP_HLEN, seq = get32(p);
	if (seq >= udp.hi || plen != dgram_len(seq) || !dgram_ok(p, seq, plen)) {
		if (udp.bad++ < 4)
			check_fail("net %s udp echo seq=%u len=%u is not what was sent", n->v.name, seq,
				   plen);
		return;
	}
	if (seq < udp.rx_next) { /* an echo of a resent datagram */
		udp.dup++;
		return;
	}
	if (seq > udp.rx_next) { /* rx_next was lost: go back now, once per gap */
		udp.ooo++;
		if (udp.fast_for != udp.rx_next + 1) {
			udp.fast_for = udp.rx_next + 1;
			udp.next = udp.rx_next;
			udp.fast++;
		}
		return;
	}
	udp.fnv_rx = fnv1a(udp.fnv_rx, p, plen);
	udp.rx_bytes += plen;
	udp.rx_next++;
	udp.progress = 1;
}

/* ---- receiving ---- */

static void bad_csum(struct nic *n, const char *what)
{
	if (n->bad_csum++ < 4)
		check_fail("net %s received %s with a bad checksum", n->v.name, what);
}

static void icmp_input(struct nic *n, unsigned qi, const uint8_t *f, const uint8_t *ip,
		       const uint8_t *p, uint32_t len)
{
	if (len < ICMP_HLEN)
		return;
	if (csum_fold(csum_add(0, p, len)) != 0) {
		bad_csum(n, "ICMP");
		return;
	}
	if (p[0] == 8 && p[1] == 0) { /* echo request: answer */
		if (ETH_HLEN + IP_HLEN + len > VNET_TX_MAX)
			return;
		uint8_t *rf;
		uint8_t *r = ip_begin(n, qi, f + 6, get32(ip + 12), IPPROTO_ICMP, len, &rf);
		if (!r)
			return;
		memcpy(r, p, len);
		r[0] = 0;
		put16(r + 2, 0);
		put16(r + 2, csum_fold(csum_add(0, r, len)));
		if (ip_commit(n, qi, len) == 0)
			n->answered++;
	} else if (p[0] == 0 && get16(p + 4) == PING_ID && get32(ip + 12) == n->gw) {
		n->got_seq = get16(p + 6);
		n->got_rxq = (int)qi;
	}
}

static void frame_input(struct nic *n, unsigned qi, const uint8_t *f, uint32_t len)
{
	if (len < ETH_HLEN)
		return;
	uint16_t type = get16(f + 12);
	if (memcmp(f, n->v.mac, 6) != 0 && memcmp(f, bcast, 6) != 0)
		return;
	if (type == ETH_ARP && len >= ETH_HLEN + 28) {
		const uint8_t *a = f + ETH_HLEN;
		if (get16(a) != 1 || get16(a + 2) != ETH_IP || a[4] != 6 || a[5] != 4)
			return;
		uint16_t op = get16(a + 6);
		uint32_t spa = get32(a + 14), tpa = get32(a + 24);
		if (spa == n->gw && spa) {
			memcpy(n->gw_mac, a + 8, 6);
			n->gw_known = 1;
		}
		if (op == 1 && tpa == n->ip)
			send_arp(n, qi, 2, a + 8, spa);
		return;
	}
	if (type != ETH_IP || len < ETH_HLEN + IP_HLEN)
		return;
	const uint8_t *ip = f + ETH_HLEN;
	uint32_t ihl = (ip[0] & 15u) * 4, tot = get16(ip + 2);
	if ((ip[0] >> 4) != 4 || ihl < IP_HLEN || tot < ihl || ETH_HLEN + tot > len)
		return;
	if (csum_fold(csum_add(0, ip, ihl)) != 0) {
		bad_csum(n, "an IPv4 header");
		return;
	}
	if (get32(ip + 16) != n->ip || (get16(ip + 6) & 0x3fff)) /* not ours, or a fragment */
		return;
	const uint8_t *p = ip + ihl;
	uint32_t plen = tot - ihl;
	if (ip[9] == IPPROTO_ICMP) {
		icmp_input(n, qi, f, ip, p, plen);
	} else if (ip[9] == IPPROTO_UDP && plen >= UDP_HLEN) {
		uint32_t ulen = get16(p + 4);
		if (ulen < UDP_HLEN || ulen > plen)
			return;
		if (get16(p + 6) && udp_csum(get32(ip + 12), n->ip, p, ulen) != 0) {
			bad_csum(n, "UDP");
			return;
		}
		udp_input(n, get32(ip + 12), p, ulen);
	}
}

/* Everything the device has for us, on every rx queue; frames handled. */
static unsigned poll_nic(struct nic *n)
{
	unsigned got = 0;
	if (!n->up)
		return 0;
	vnet_tx_reclaim(&n->v);
	for (unsigned qi = 0; qi < n->v.pairs; qi++) {
		const uint8_t *f;
		int len;
		while ((len = vnet_rx(&n->v, qi, &f)) >= 0) {
			frame_input(n, qi, f, (uint32_t)len);
			got++;
		}
		vnet_rx_kick(&n->v, qi);
	}
	if (n->v.broken)
		n->up = 0;
	return got;
}

/* Real-time waiting. In ring 3 with a TSC time base: polls timed by the TSC
 * (no exit). Otherwise POLL_SPINS polls first, then a 1 ms PIT step per poll. */
struct waiter {
	uint32_t spins, ms;
	int tsc;
	struct tsc_clock c;
};

static void wait_start(struct waiter *w)
{
	w->spins = w->ms = 0;
	w->tsc = tsc_per_ms && user_mode();
	if (w->tsc)
		tsc_clock_start(&w->c);
}

static uint32_t waited(struct waiter *w)
{
	if (w->tsc)
		w->ms = tsc_clock_ms(&w->c);
	else if (w->spins < POLL_SPINS)
		w->spins++;
	else {
		delay_ms(1);
		w->ms++;
	}
	return w->ms;
}

/* ---- the steps ---- */

static int arp_resolve(struct nic *n)
{
	struct waiter w;
	wait_start(&w);
	uint32_t next_req = 0;
	while (!n->gw_known) {
		if (w.ms >= next_req) {
			if (send_arp(n, 0, 1, 0, n->gw) != 0)
				return -1;
			next_req = w.ms + 1000;
		}
		poll_nic(n);
		if (n->gw_known || !n->up)
			break;
		if (waited(&w) >= vnet_timeout_ms)
			break;
	}
	if (!n->gw_known) {
		check_fail("net %s arp no reply from %u.%u.%u.%u", n->v.name, n->gw >> 24,
			   (n->gw >> 16) & 255, (n->gw >> 8) & 255, n->gw & 255);
		return -1;
	}
	kprintf("NET arp ");
	print_ip(n->gw);
	kprintf(" is ");
	print_mac(n->gw_mac);
	kprintf("\n");
	return 0;
}

/* One echo request on tx queue qi; the rx queue of the reply, or -1. */
static int ping_once(struct nic *n, unsigned qi, uint16_t seq)
{
	n->got_seq = -1;
	if (send_ping(n, qi, seq) != 0)
		return -1;
	struct waiter w;
	wait_start(&w);
	while (n->got_seq != seq) {
		poll_nic(n);
		if (n->got_seq == seq || !n->up)
			break;
		if (waited(&w) >= vnet_timeout_ms)
			break;
	}
	return n->got_seq == seq ? n->got_rxq : -1;
}

static void udp_exchange(struct nic *n)
{
	memset(&udp, 0, sizeof(udp));
	udp.nic = n;
	udp.total = opt.udp_mib * 1048576u;
	udp.dgrams = (udp.total + UDP_DGRAM - 1) / UDP_DGRAM;
	udp.fnv_tx = udp.fnv_rx = 0x811c9dc5u;
	struct waiter w;
	wait_start(&w);
	uint64_t t0 = rdtsc();
	uint32_t rto_at = UDP_RTO_MS;
	n->v.tx_defer = 1; /* one notify per burst */
	while (udp.rx_next < udp.dgrams && n->up) {
		while (udp.next < udp.dgrams && udp.next - udp.rx_next < UDP_WINDOW) {
			if (send_dgram(n, udp.next, udp.next >= udp.hi) != 0)
				break;
			udp.next++;
			if (udp.next > udp.hi)
				udp.hi = udp.next;
		}
		vnet_tx_flush(&n->v, 0);
		if (!n->up || n->v.broken)
			break;
		udp.progress = 0;
		poll_nic(n);
		if (udp.progress) {
			wait_start(&w);
			rto_at = UDP_RTO_MS;
			continue;
		}
		uint32_t ms = waited(&w);
		if (ms >= vnet_timeout_ms) {
			check_fail("net %s udp timeout: sent %u datagrams, %u echoed in order", n->v.name,
				   udp.hi, udp.rx_next);
			break;
		}
		if (ms >= rto_at) { /* go back: send [rx_next, ...) again */
			udp.next = udp.rx_next;
			udp.rounds++;
			rto_at = ms + UDP_RTO_MS;
		}
	}
	vnet_tx_flush(&n->v, 0);
	n->v.tx_defer = 0;
	uint64_t t1 = rdtsc();
	uint32_t ms = w.tsc && t1 > t0 ? (uint32_t)((t1 - t0) / tsc_per_ms) : 0;
	udp.nic = 0;
	kprintf("NET udp sent=%lu fnv=%08x\n", udp.tx_bytes, udp.fnv_tx);
	kprintf("NET udp received=%lu fnv=%08x\n", udp.rx_bytes, udp.fnv_rx);
	kprintf("NET udp datagrams=%u resent=%u timeouts=%u fast-resends=%u out-of-order=%u "
		"duplicates=%u ring3=%d ms=%u\n",
		udp.dgrams, udp.resent, udp.rounds, udp.fast, udp.ooo, udp.dup, user_mode(), ms);
	if (udp.rx_next == udp.dgrams && udp.fnv_rx != udp.fnv_tx)
		check_fail("net %s udp echoes differ from what was sent (fnv)", n->v.name);
}

static void test_nic(struct nic *n)
{
	if (!(n->v.status & 1))
		check_fail("net %s link is down (status=%u)", n->v.name, n->v.status);
	if (arp_resolve(n) != 0)
		return;

	unsigned replies = 0;
	for (uint16_t s = 1; s <= PING_COUNT && n->up; s++)
		if (ping_once(n, 0, s) >= 0)
			replies++;
	kprintf("NET ping ");
	print_ip(n->gw);
	kprintf(" replies=%u\n", replies);
	if (replies != PING_COUNT)
		check_fail("net %s ping replies=%u, expected %u", n->v.name, replies, PING_COUNT);

	if (n->v.pairs > 1) {
		for (unsigned q = 0; q < n->v.pairs && n->up; q++) {
			int rq = ping_once(n, q, (uint16_t)(0x100 + q));
			if (rq < 0)
				check_fail("net %s queue %u: no echo reply", n->v.name, q);
			else
				kprintf("NET queue %u ok\n", q);
		}
		kprintf("NET %s rx frames per queue:", n->v.name);
		for (unsigned q = 0; q < n->v.pairs; q++)
			kprintf(" %u", n->v.rx_frames[q]);
		kprintf("\n");
	}

	if (opt.udp_mib && n->up)
		udp_exchange(n);
}

static long net_check_body(long unused)
{
	(void)unused;
	static uint16_t bdfs[MAX_NICS];
	const struct pci_access a = { PCI_CF8, 0 };
	struct vpci_window w = { 0xc0000000ull, 0xfec00000ull, 0, 0, 0 };
	vnet_pool_reset();
	int cnt = vpci_find(&a, VIRTIO_NET_PCI_ID, VIRTIO_NET_PCI_TRANSITIONAL_ID, bdfs, MAX_NICS);
	for (int i = 0; i < cnt; i++) {
		struct nic *n = &nics[i];
		unsigned want = i < opt.n_queues ? opt.queues[i] : 1;
		n->up = 0;
		if (vnet_init(&n->v, &a, bdfs[i], &w, want) != 0)
			continue;
		n->up = 1;
		n->ip = i < opt.n_ip ? opt.ip[i] : (10u << 24 | (77u + (uint32_t)i) << 16 | 2);
		n->gw = i < opt.n_gw ? opt.gw[i] : (10u << 24 | (77u + (uint32_t)i) << 16 | 1);
		n->gw_known = 0;
		n->answered = 0;
		n->bad_csum = 0;
		n->ip_id = 1;
		kprintf("NET %s mac=", n->v.name);
		print_mac(n->v.mac);
		kprintf(" features=0x%lx queues=%u mtu=%u status=%u\n", n->v.pci.accepted, n->v.pairs,
			n->v.mtu, n->v.status);
		if (want > n->v.pairs)
			check_fail("net %s netqueues=%u but only %u queue pairs (max_virtqueue_pairs=%u)",
				   n->v.name, want, n->v.pairs, n->v.max_pairs);
	}
	for (int i = 0; i < cnt; i++)
		if (nics[i].up)
			test_nic(&nics[i]);

	/* netwait: answer ARP and pings on every NIC for a while. */
	struct waiter ww;
	wait_start(&ww);
	for (uint32_t ms = 0; ms < opt.wait_s * 1000u;) {
		for (int i = 0; i < cnt; i++)
			poll_nic(&nics[i]);
		if (ww.tsc) {
			ms = waited(&ww);
		} else {
			delay_ms(1);
			ms++;
		}
	}
	unsigned answered = 0;
	for (int i = 0; i < cnt; i++) {
		answered += nics[i].answered;
		if (nics[i].v.pci.common) {
			unsigned rx = 0;
			for (unsigned q = 0; q < nics[i].v.pairs; q++)
				rx += nics[i].v.rx_frames[q];
			kprintf("NET %s done tx=%u rx=%u dropped=%u merged=%u\n", nics[i].v.name,
				nics[i].v.tx_frames, rx, nics[i].v.rx_dropped, nics[i].v.rx_merged);
		}
		vnet_close(&nics[i].v);
		nics[i].up = 0;
	}
	kprintf("NET answered pings=%u\n", answered);
	kprintf("NET devices=%d\n", cnt);
	if (cnt == 0)
		check_fail("net no virtio-net device on bus 0");
	return 0;
}

/* The whole check runs in ring 3 (user=0: ring 0), where a software KVM runs
 * the data path natively instead of emulating it. */
void net_check(void)
{
	user_call(net_check_body, 0);
	if (user_enabled)
		kprintf("NET ring3 port traps=%lu\n", user_port_traps);
}

/* ---- netserve: answer ARP and pings between heartbeats ---- */

static int serve_cnt;

int net_serve_init(void)
{
	static uint16_t bdfs[MAX_NICS];
	const struct pci_access a = { PCI_CF8, 0 };
	struct vpci_window w = { 0xc0000000ull, 0xfec00000ull, 0, 0, 0 };
	vnet_pool_reset();
	serve_cnt = vpci_find(&a, VIRTIO_NET_PCI_ID, VIRTIO_NET_PCI_TRANSITIONAL_ID, bdfs, MAX_NICS);
	for (int i = 0; i < serve_cnt; i++) {
		struct nic *n = &nics[i];
		n->up = 0;
		if (vnet_init(&n->v, &a, bdfs[i], &w, 1) != 0)
			continue;
		n->up = 1;
		n->ip = i < opt.n_ip ? opt.ip[i] : (10u << 24 | (77u + (uint32_t)i) << 16 | 2);
		n->gw = i < opt.n_gw ? opt.gw[i] : (10u << 24 | (77u + (uint32_t)i) << 16 | 1);
		n->gw_known = 0;
		n->answered = 0;
		n->bad_csum = 0;
		n->ip_id = 1;
		kprintf("NETSERVE %s mac=", n->v.name);
		print_mac(n->v.mac);
		kprintf(" ip=");
		print_ip(n->ip);
		kprintf("\n");
	}
	if (serve_cnt == 0)
		check_fail("netserve no virtio-net device on bus 0");
	return serve_cnt;
}

/* A NIC hot plugged at bdf: bring it up like net_serve_init does for the
 * NICs present at boot (its address: netip= by position, else 10.(77+i).0.2),
 * and answer ARP and pings on it from net_serve_poll. */
int net_serve_add(uint16_t bdf)
{
	const struct pci_access a = { PCI_CF8, 0 };
	struct vpci_window w = { 0xc0000000ull, 0xfec00000ull, 0, 0, 0 };
	int i = 0, any_up = 0;
	while (i < serve_cnt && nics[i].up)
		i++;
	if (i >= MAX_NICS)
		return -1;
	for (int k = 0; k < serve_cnt; k++)
		any_up |= nics[k].up;
	/* The ring and buffer pool is never freed piecemeal: with no NIC left
	 * (all unplugged), it starts over, so plug/unplug cycles do not run
	 * out of it. */
	if (!any_up)
		vnet_pool_reset();
	struct nic *n = &nics[i];
	n->up = 0;
	if (vnet_init(&n->v, &a, bdf, &w, 1) != 0)
		return -1;
	n->up = 1;
	n->ip = i < opt.n_ip ? opt.ip[i] : (10u << 24 | (77u + (uint32_t)i) << 16 | 2);
	n->gw = i < opt.n_gw ? opt.gw[i] : (10u << 24 | (77u + (uint32_t)i) << 16 | 1);
	n->gw_known = 0;
	n->answered = 0;
	n->bad_csum = 0;
	n->ip_id = 1;
	if (i >= serve_cnt)
		serve_cnt = i + 1;
	kprintf("NETSERVE %s mac=", n->v.name);
	print_mac(n->v.mac);
	kprintf(" ip=");
	print_ip(n->ip);
	kprintf("\n");
	return i;
}

int net_serve_announce(int i)
{
	if (i < 0 || i >= serve_cnt || !nics[i].up)
		return -1;
	struct nic *n = &nics[i];
	struct virtq *q = &n->v.txq[0];
	uint16_t before = q->used[1];
	if (send_arp(n, 0, 1, bcast, n->ip) != 0)
		return -1;
	/* Spin a little (the backend answers in microseconds), then 1 ms steps. */
	for (uint32_t t = 0; t < 1000 + 1000; t++) {
		barrier();
		if (q->used[1] != before) {
			vnet_tx_reclaim(&n->v);
			return 0;
		}
		if (t >= 1000)
			delay_ms(1);
	}
	return -1;
}

/* The NIC at bdf is going away: reset it and stop serving it. */
void net_serve_remove(uint16_t bdf)
{
	for (int i = 0; i < serve_cnt; i++) {
		if (nics[i].up && nics[i].v.pci.bdf == bdf) {
			vnet_close(&nics[i].v);
			nics[i].up = 0;
		}
	}
}

void net_serve_poll(void)
{
	for (int i = 0; i < serve_cnt; i++)
		poll_nic(&nics[i]);
}

unsigned net_serve_answered(void)
{
	unsigned answered = 0;
	for (int i = 0; i < serve_cnt; i++)
		answered += nics[i].answered;
	return answered;
}
