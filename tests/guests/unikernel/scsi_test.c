/* The scsi check: the virtio-scsi controller on bus 0 is initialised and
 * each of its LUNs is asked what a SCSI initiator asks (INQUIRY and VPD
 * pages, REPORT LUNS, READ CAPACITY(16)), written and read with patterns,
 * synchronised, unmapped, and given commands that must fail with exact
 * sense data. Every result is printed on a "SCSI ..." line for the host
 * to compare with what it prepared (see README.md, "The scsi check"). */
#include "io.h"
#include "kernel.h"
#include "lib.h"
#include "scsi_test.h"
#include "serial.h"
#include "virtio_scsi.h"

#define KIB 1024u
#define MAX_LUNS 16   /* LUNs tested (REPORT LUNS may list more) */
#define LIST_LUNS 300 /* REPORT LUNS entries read */

/* Regions each writable LUN gets a pattern in: WRITE(10) then READ(10) of
 * 16 KiB at 64 KiB in 4 KiB descriptors (read back in 8 KiB ones), WRITE(16)
 * then READ(16) of 64 KiB at 1 MiB in 16 KiB descriptors (read back in 8 KiB
 * ones). Small: the guest's byte loops run emulated on software KVM hosts. */
#define W10_OFF (64 * KIB)
#define W10_LEN (16 * KIB)
#define W16_OFF (1024 * KIB)
#define W16_LEN (64 * KIB)
#define PATTERN_END (W16_OFF + W16_LEN)
/* UNMAP: 1 MiB at 2 MiB. */
#define UNMAP_OFF (2048 * KIB)
#define UNMAP_LEN (1024 * KIB)

static struct {
	int64_t luns;   /* scsiluns=N: REPORT LUNS must list LUNs 0..N-1; -1 not given */
	int64_t ro;     /* scsiro=L: the read-only LUN; -1 none */
	int64_t unmap;  /* scsiunmap=L: UNMAP on this LUN; -1 none */
	int64_t badlun; /* scsibadlun=L: a LUN that must not exist (default 200) */
	int pattern;    /* scsipattern=1: pattern writes and reads on the writable LUNs */
} opt = { -1, -1, -1, 200, 0 };

int scsi_parse_key(const char *k, size_t kn, const char *v, size_t vn)
{
	int64_t *slot;
	int64_t max = 16383;
	const char *name;
	if (word_eq(k, kn, "scsiluns")) {
		slot = &opt.luns;
		max = 16384;
		name = "scsiluns=";
	} else if (word_eq(k, kn, "scsiro")) {
		slot = &opt.ro;
		name = "scsiro=";
	} else if (word_eq(k, kn, "scsiunmap")) {
		slot = &opt.unmap;
		name = "scsiunmap=";
	} else if (word_eq(k, kn, "scsibadlun")) {
		slot = &opt.badlun;
		name = "scsibadlun=";
	} else if (word_eq(k, kn, "scsipattern")) {
		int64_t m = parse_num(v, vn);
		if (m < 0 || m > 1)
			check_fail("bad scsipattern= value");
		else
			opt.pattern = (int)m;
		return 1;
	} else if (word_eq(k, kn, "scsitimeout")) {
		int64_t m = parse_num(v, vn);
		if (m < 1 || m > 600000)
			check_fail("bad scsitimeout= value");
		else
			vscsi_timeout_ms = (uint32_t)m;
		return 1;
	} else {
		return 0;
	}
	int64_t m = parse_num(v, vn);
	if (m < 0 || m > max)
		check_fail("bad %s value", name);
	else
		*slot = m;
	return 1;
}

/* Data buffers: not zeroed at boot, always filled before use. */
static uint8_t wbuf[W16_LEN] __attribute__((section(".noinit.scsi"), aligned(4096)));
static uint8_t rbuf[W16_LEN] __attribute__((section(".noinit.scsi"), aligned(4096)));
static uint8_t small[4096] __attribute__((section(".noinit.scsi"), aligned(4096)));
static uint8_t luns_buf[8 + 8 * LIST_LUNS] __attribute__((section(".noinit.scsi"), aligned(64)));
static struct vscsi scsi;
static struct vscsi_result res;

/* What each LUN reported. */
static struct {
	uint16_t lun;
	uint64_t blocks;
	uint32_t block_size;
	uint32_t max_unmap_lba, max_unmap_desc;
	int lbprz;
} lu[MAX_LUNS];
static unsigned n_lu;

static void put_be16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}

static void put_be32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (24 - 8 * i));
}

static void put_be64(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (56 - 8 * i));
}

static uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

static uint32_t be32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t be64(const uint8_t *p) { return (uint64_t)be32(p) << 32 | be32(p + 4); }

/* Byte at absolute offset o of LUN lun (tests/tests/scsi.rs has the same). */
static uint8_t pattern_byte(unsigned lun, uint64_t o)
{
	return (uint8_t)(((o * 7 + 0x5a) ^ (o >> 9)) + lun * 0x1du);
}

/* One command with data in or out, split in descriptors of seg bytes.
 * Returns 0 when the command completed (its outcome in res). */
static int cmd(uint16_t lun, const uint8_t *cdb, unsigned cdb_len, void *buf, uint32_t len,
	       uint32_t seg, int data_in)
{
	struct virtq_buf data[VSCSI_MAX_BUFS];
	unsigned n = 0;
	uint8_t *p = buf;
	for (uint32_t done = 0; done < len && n < VSCSI_MAX_BUFS; n++) {
		uint32_t l = len - done < seg ? len - done : seg;
		data[n].addr = p + done;
		data[n].len = l;
		done += l;
	}
	memset(&res, 0, sizeof(res));
	int st = vscsi_cmd(&scsi, 0, lun, cdb, cdb_len, data, n, data_in, &res);
	return st;
}

/* Did the last command end with GOOD status? If not, a CHECK FAIL naming it. */
static int good(int st, uint16_t lun, const char *what)
{
	if (st != 0)
		return 0; /* the driver printed why */
	if (res.response != VIRTIO_SCSI_S_OK || res.status != SCSI_GOOD) {
		check_fail("scsi lun %u %s response=%u status=0x%x key=0x%x asc=0x%x ascq=0x%x", lun,
			   what, res.response, res.status, res.key, res.asc, res.ascq);
		return 0;
	}
	return 1;
}

/* Prints "response=R status=S key=K asc=A ascq=Q" of the last command. */
static void print_outcome(void)
{
	kprintf("response=%u status=0x%x key=0x%x asc=0x%x ascq=0x%x\n", res.response, res.status,
		res.key, res.asc, res.ascq);
}

static int inquiry(uint16_t lun, int evpd, uint8_t page, uint32_t alloc)
{
	uint8_t cdb[6] = { 0x12, (uint8_t)(evpd ? 1 : 0), page, 0, 0, 0 };
	put_be16(cdb + 3, (uint16_t)alloc);
	memset(small, 0, sizeof(small));
	return cmd(lun, cdb, 6, small, alloc, alloc, 1);
}

/* Prints n bytes at p as text, trailing spaces dropped. */
static void print_text(const uint8_t *p, unsigned n)
{
	while (n && (p[n - 1] == ' ' || p[n - 1] == 0))
		n--;
	for (unsigned i = 0; i < n; i++)
		kprintf("%c", p[i] >= ' ' && p[i] < 0x7f ? p[i] : '.');
}

static void test_tur(uint16_t lun)
{
	uint8_t cdb[6] = { 0 };
	int st = 0;
	/* A unit attention (power on, reset) is reported once; ask again. */
	for (int i = 0; i < 3; i++) {
		st = cmd(lun, cdb, 6, 0, 0, 1, 0);
		if (st != 0 || !(res.status == SCSI_CHECK_CONDITION && res.key == 6))
			break;
	}
	if (good(st, lun, "TEST UNIT READY"))
		kprintf("SCSI lun %u tur ok\n", lun);
}

static void test_inquiry(uint16_t lun, unsigned idx)
{
	if (!good(inquiry(lun, 0, 0, 96), lun, "INQUIRY"))
		return;
	kprintf("SCSI lun %u inquiry qual=%u type=%u version=%u format=%u len=%u vendor=", lun,
		small[0] >> 5, small[0] & 0x1f, small[2], small[3] & 0x0f, small[4] + 5u);
	print_text(small + 8, 8);
	kprintf(" product=");
	print_text(small + 16, 16);
	kprintf(" rev=");
	print_text(small + 32, 4);
	kprintf("\n");
	if ((small[0] & 0x1f) != 0 || (small[0] >> 5) != 0)
		check_fail("scsi lun %u is not a connected direct-access device (0x%x)", lun, small[0]);

	/* VPD 0x00: the supported pages. */
	if (!good(inquiry(lun, 1, 0x00, 255), lun, "INQUIRY VPD 0x00"))
		return;
	unsigned n = be16(small + 2);
	kprintf("SCSI lun %u vpd00 pages=", lun);
	int have80 = 0, have83 = 0, haveb0 = 0, haveb2 = 0;
	for (unsigned i = 0; i < n && i < 250; i++) {
		uint8_t pg = small[4 + i];
		kprintf("%s%02x", i ? "," : "", pg);
		have80 |= pg == 0x80;
		have83 |= pg == 0x83;
		haveb0 |= pg == 0xb0;
		haveb2 |= pg == 0xb2;
	}
	kprintf("\n");
	if (small[1] != 0x00 || !have80 || !have83 || !haveb0 || !haveb2)
		check_fail("scsi lun %u VPD 0x00 lacks one of 0x80 0x83 0xb0 0xb2", lun);

	/* VPD 0x80: the unit serial number. */
	if (good(inquiry(lun, 1, 0x80, 255), lun, "INQUIRY VPD 0x80")) {
		n = be16(small + 2);
		kprintf("SCSI lun %u serial=", lun);
		print_text(small + 4, n < 250 ? n : 250);
		kprintf("\n");
		if (small[1] != 0x80)
			check_fail("scsi lun %u VPD 0x80 has page code 0x%x", lun, small[1]);
	}

	/* VPD 0x83: the designators (type/code set/association/length). */
	if (good(inquiry(lun, 1, 0x83, 255), lun, "INQUIRY VPD 0x83")) {
		n = be16(small + 2);
		unsigned count = 0;
		kprintf("SCSI lun %u vpd83 ids=", lun);
		for (unsigned o = 4; o + 4 <= n + 4 && o < 255; count++) {
			unsigned len = small[o + 3];
			kprintf("%s%u/%u/%u/%u", count ? "," : "", small[o + 1] & 0x0f,
				small[o] & 0x0f, (small[o + 1] >> 4) & 3, len);
			o += 4 + len;
		}
		kprintf(" n=%u\n", count);
		if (small[1] != 0x83 || count == 0)
			check_fail("scsi lun %u VPD 0x83 page 0x%x with %u designators", lun, small[1],
				   count);
	}

	/* VPD 0xB0: block limits. */
	if (good(inquiry(lun, 1, 0xb0, 64), lun, "INQUIRY VPD 0xb0")) {
		lu[idx].max_unmap_lba = be32(small + 20);
		lu[idx].max_unmap_desc = be32(small + 24);
		kprintf("SCSI lun %u vpdb0 len=%u max_xfer=%u opt_xfer=%u max_unmap_lba=%u "
			"max_unmap_desc=%u max_ws=%lu\n",
			lun, be16(small + 2), be32(small + 8), be32(small + 12), lu[idx].max_unmap_lba,
			lu[idx].max_unmap_desc, be64(small + 36));
		if (small[1] != 0xb0 || be16(small + 2) < 0x3c)
			check_fail("scsi lun %u VPD 0xb0 page 0x%x length %u", lun, small[1],
				   be16(small + 2));
	}

	/* VPD 0xB2: logical block provisioning. */
	if (good(inquiry(lun, 1, 0xb2, 64), lun, "INQUIRY VPD 0xb2")) {
		kprintf("SCSI lun %u vpdb2 lbpu=%u lbpws=%u lbpws10=%u lbprz=%u type=%u\n", lun,
			small[5] >> 7, (small[5] >> 6) & 1, (small[5] >> 5) & 1, (small[5] >> 2) & 7,
			small[6] & 7);
		if (small[1] != 0xb2)
			check_fail("scsi lun %u VPD 0xb2 has page code 0x%x", lun, small[1]);
	}
}

static void test_capacity(uint16_t lun, unsigned idx)
{
	uint8_t cdb[16] = { 0x9e, 0x10 };
	put_be32(cdb + 10, 32);
	memset(small, 0, 32);
	if (!good(cmd(lun, cdb, 16, small, 32, 32, 1), lun, "READ CAPACITY(16)"))
		return;
	lu[idx].blocks = be64(small) + 1;
	lu[idx].block_size = be32(small + 8);
	lu[idx].lbprz = (small[14] >> 6) & 1;
	kprintf("SCSI lun %u capacity blocks=%lu block_size=%u lbpme=%u lbprz=%u\n", lun,
		lu[idx].blocks, lu[idx].block_size, small[14] >> 7, lu[idx].lbprz);
	if (lu[idx].block_size == 0 || lu[idx].block_size > 4096 ||
	    (lu[idx].block_size & (lu[idx].block_size - 1)))
		check_fail("scsi lun %u block size %u", lun, lu[idx].block_size);
}

/* READ/WRITE (10) or (16) of len bytes at byte offset off. */
static int rw(unsigned idx, int write, int cdb16, uint64_t off, void *buf, uint32_t len,
	      uint32_t seg)
{
	uint32_t bs = lu[idx].block_size;
	uint64_t lba = off / bs;
	uint32_t blocks = len / bs;
	uint8_t cdb[16] = { 0 };
	unsigned cdb_len;
	if (cdb16) {
		cdb[0] = write ? 0x8a : 0x88;
		put_be64(cdb + 2, lba);
		put_be32(cdb + 10, blocks);
		cdb_len = 16;
	} else {
		cdb[0] = write ? 0x2a : 0x28;
		put_be32(cdb + 2, (uint32_t)lba);
		put_be16(cdb + 7, (uint16_t)blocks);
		cdb_len = 10;
	}
	return cmd(lu[idx].lun, cdb, cdb_len, buf, len, seg, !write);
}

static void fill(unsigned lun, uint8_t *p, uint64_t off, uint32_t len)
{
	for (uint32_t i = 0; i < len; i++)
		p[i] = pattern_byte(lun, off + i);
}

static int compare(unsigned lun, const uint8_t *p, uint64_t off, uint32_t len, const char *what)
{
	for (uint32_t i = 0; i < len; i++)
		if (p[i] != pattern_byte(lun, off + i)) {
			check_fail("scsi lun %u %s: byte at 0x%lx is 0x%x, expected 0x%x", lun, what,
				   off + i, p[i], pattern_byte(lun, off + i));
			return 0;
		}
	return 1;
}

static void test_pattern(unsigned idx)
{
	uint16_t lun = lu[idx].lun;
	if ((uint64_t)lu[idx].blocks * lu[idx].block_size < PATTERN_END) {
		check_fail("scsi lun %u too small for the pattern", lun);
		return;
	}
	fill(lun, wbuf, W10_OFF, W10_LEN);
	if (!good(rw(idx, 1, 0, W10_OFF, wbuf, W10_LEN, 4 * KIB), lun, "WRITE(10)"))
		return;
	fill(lun, wbuf, W16_OFF, W16_LEN);
	if (!good(rw(idx, 1, 1, W16_OFF, wbuf, W16_LEN, 16 * KIB), lun, "WRITE(16)"))
		return;
	kprintf("SCSI lun %u write10 0x%x+0x%x write16 0x%x+0x%x ok\n", lun, W10_OFF, W10_LEN,
		W16_OFF, W16_LEN);
	memset(rbuf, 0, W10_LEN);
	if (!good(rw(idx, 0, 0, W10_OFF, rbuf, W10_LEN, 8 * KIB), lun, "READ(10)"))
		return;
	int ok = compare(lun, rbuf, W10_OFF, W10_LEN, "READ(10)");
	memset(rbuf, 0, W16_LEN);
	if (!good(rw(idx, 0, 1, W16_OFF, rbuf, W16_LEN, 8 * KIB), lun, "READ(16)"))
		return;
	ok &= compare(lun, rbuf, W16_OFF, W16_LEN, "READ(16)");
	if (ok)
		kprintf("SCSI lun %u read10 read16 ok\n", lun);
}

static void test_sync(unsigned idx, int cdb16)
{
	uint8_t cdb[16] = { (uint8_t)(cdb16 ? 0x91 : 0x35) };
	int st = cmd(lu[idx].lun, cdb, cdb16 ? 16 : 10, 0, 0, 1, 0);
	if (good(st, lu[idx].lun, cdb16 ? "SYNCHRONIZE CACHE(16)" : "SYNCHRONIZE CACHE(10)"))
		kprintf("SCSI lun %u sync%u ok\n", lu[idx].lun, cdb16 ? 16 : 10);
}

static void test_unmap(unsigned idx)
{
	uint16_t lun = lu[idx].lun;
	uint32_t bs = lu[idx].block_size;
	if ((uint64_t)lu[idx].blocks * bs < UNMAP_OFF + UNMAP_LEN) {
		check_fail("scsi lun %u too small for UNMAP", lun);
		return;
	}
	uint64_t lba = UNMAP_OFF / bs;
	uint32_t left = UNMAP_LEN / bs;
	uint32_t max = lu[idx].max_unmap_lba ? lu[idx].max_unmap_lba : left;
	/* The parameter list: header, then block descriptors of at most max blocks. */
	uint8_t *p = small;
	unsigned n = 0;
	memset(p, 0, 8);
	while (left && n < 32 && (!lu[idx].max_unmap_desc || n < lu[idx].max_unmap_desc)) {
		uint32_t c = left < max ? left : max;
		uint8_t *d = p + 8 + 16 * n;
		put_be64(d, lba);
		put_be32(d + 8, c);
		put_be32(d + 12, 0);
		lba += c;
		left -= c;
		n++;
	}
	if (left) {
		check_fail("scsi lun %u UNMAP limits too small (%u blocks, %u descriptors)", lun,
			   lu[idx].max_unmap_lba, lu[idx].max_unmap_desc);
		return;
	}
	uint16_t plen = (uint16_t)(8 + 16 * n);
	put_be16(p, (uint16_t)(plen - 2));
	put_be16(p + 2, (uint16_t)(16 * n));
	uint8_t cdb[10] = { 0x42 };
	put_be16(cdb + 7, plen);
	if (!good(cmd(lun, cdb, 10, p, plen, plen, 0), lun, "UNMAP"))
		return;
	/* Read the range back: zeros when the LUN says LBPRZ. Word loops: they
	 * run emulated on software KVM hosts. */
	uint32_t nz = 0;
	uint64_t *words = (uint64_t *)rbuf;
	for (uint32_t o = 0; o < UNMAP_LEN; o += W16_LEN) {
		for (uint32_t i = 0; i < W16_LEN / 8; i++)
			words[i] = 0xa5a5a5a5a5a5a5a5ull;
		if (!good(rw(idx, 0, 1, UNMAP_OFF + o, rbuf, W16_LEN, 16 * KIB), lun, "READ(16)"))
			return;
		for (uint32_t i = 0; i < W16_LEN / 8; i++)
			nz += words[i] != 0;
	}
	kprintf("SCSI lun %u unmap 0x%x+0x%x descriptors=%u ok nonzero_words=%u\n", lun, UNMAP_OFF,
		UNMAP_LEN, n, nz);
	if (lu[idx].lbprz && nz)
		check_fail("scsi lun %u LBPRZ but %u words of the unmapped range are not zero", lun,
			   nz);
}

/* Commands that must fail, with the sense a real disk gives. */
static void expect_sense(uint16_t lun, const char *what, uint8_t key, uint8_t asc, uint8_t ascq)
{
	kprintf("SCSI lun %u %s ", lun, what);
	print_outcome();
	if (res.response != VIRTIO_SCSI_S_OK || res.status != SCSI_CHECK_CONDITION ||
	    res.key != key || res.asc != asc || res.ascq != ascq)
		check_fail("scsi lun %u %s: expected CHECK CONDITION key=0x%x asc=0x%x ascq=0x%x", lun,
			   what, key, asc, ascq);
}

static void test_errors(unsigned idx)
{
	uint16_t lun = lu[idx].lun;
	uint8_t cdb[16] = { 0xc5 };
	if (cmd(lun, cdb, 10, 0, 0, 1, 0) == 0)
		expect_sense(lun, "opcode-c5", 5, 0x20, 0x00);

	/* One block right after the end, and a READ(10) across it. */
	uint32_t bs = lu[idx].block_size;
	memset(cdb, 0, sizeof(cdb));
	cdb[0] = 0x88;
	put_be64(cdb + 2, lu[idx].blocks);
	put_be32(cdb + 10, 1);
	if (cmd(lun, cdb, 16, rbuf, bs, bs, 1) == 0)
		expect_sense(lun, "read16-past-end", 5, 0x21, 0x00);
	memset(cdb, 0, sizeof(cdb));
	cdb[0] = 0x28;
	put_be32(cdb + 2, (uint32_t)(lu[idx].blocks - 1));
	put_be16(cdb + 7, 2);
	if (cmd(lun, cdb, 10, rbuf, 2 * bs, 2 * bs, 1) == 0)
		expect_sense(lun, "read10-across-end", 5, 0x21, 0x00);
}

static void test_write_ro(unsigned idx)
{
	uint16_t lun = lu[idx].lun;
	fill(lun, wbuf, W10_OFF, W10_LEN);
	if (rw(idx, 1, 0, W10_OFF, wbuf, W10_LEN, 4 * KIB) == 0)
		expect_sense(lun, "write10-ro", 7, 0x27, 0x00);
	fill(lun, wbuf, W16_OFF, W16_LEN);
	if (rw(idx, 1, 1, W16_OFF, wbuf, W16_LEN, 16 * KIB) == 0)
		expect_sense(lun, "write16-ro", 7, 0x27, 0x00);
	uint8_t cdb[10] = { 0x42 };
	uint8_t *p = small;
	memset(p, 0, 24);
	put_be16(p, 22);
	put_be16(p + 2, 16);
	put_be64(p + 8, UNMAP_OFF / lu[idx].block_size);
	put_be32(p + 16, 8);
	put_be16(cdb + 7, 24);
	if (cmd(lun, cdb, 10, p, 24, 24, 0) == 0)
		expect_sense(lun, "unmap-ro", 7, 0x27, 0x00);
}

/* A LUN that does not exist: the response virtio-scsi defines (BAD_TARGET),
 * or, as a SCSI target answers, INQUIRY with peripheral qualifier 3. */
static void test_bad_lun(uint16_t lun)
{
	uint8_t cdb[6] = { 0 };
	if (cmd(lun, cdb, 6, 0, 0, 1, 0) == 0) {
		kprintf("SCSI lun %u tur ", lun);
		print_outcome();
	}
	if (inquiry(lun, 0, 0, 36) == 0) {
		kprintf("SCSI lun %u inquiry qual=%u type=%u ", lun, small[0] >> 5, small[0] & 0x1f);
		print_outcome();
		int ok = res.response == VIRTIO_SCSI_S_BAD_TARGET ||
			 res.response == VIRTIO_SCSI_S_INCORRECT_LUN ||
			 (res.response == VIRTIO_SCSI_S_OK && res.status == SCSI_GOOD &&
			  (small[0] >> 5) == 3);
		if (!ok)
			check_fail("scsi lun %u should not exist", lun);
	}
}

static int report_luns(void)
{
	uint8_t cdb[12] = { 0xa0 };
	put_be32(cdb + 6, sizeof(luns_buf));
	memset(luns_buf, 0, sizeof(luns_buf));
	if (!good(cmd(0, cdb, 12, luns_buf, sizeof(luns_buf), 4096, 1), 0, "REPORT LUNS"))
		return -1;
	uint32_t n = be32(luns_buf) / 8;
	kprintf("SCSI report-luns n=%u luns=", n);
	n_lu = 0;
	for (uint32_t i = 0; i < n && i < LIST_LUNS; i++) {
		const uint8_t *e = luns_buf + 8 + 8 * i;
		uint16_t l;
		if ((e[0] >> 6) == 1)
			l = (uint16_t)((e[0] & 0x3f) << 8 | e[1]); /* flat */
		else
			l = e[1]; /* peripheral, bus 0 */
		kprintf("%s%u", i ? "," : "", l);
		if (n_lu < MAX_LUNS)
			lu[n_lu++].lun = l;
	}
	kprintf("\n");
	/* The list is in no particular order: test the LUNs in ascending order. */
	for (unsigned i = 1; i < n_lu; i++)
		for (unsigned j = i; j > 0 && lu[j - 1].lun > lu[j].lun; j--) {
			uint16_t t = lu[j].lun;
			lu[j].lun = lu[j - 1].lun;
			lu[j - 1].lun = t;
		}
	if (opt.luns >= 0) {
		int ok = n == (uint64_t)opt.luns;
		for (unsigned i = 0; ok && i < n_lu; i++)
			ok = lu[i].lun == i;
		if (!ok)
			check_fail("scsi REPORT LUNS lists %u LUNs, expected 0..%ld", n, opt.luns - 1);
	}
	return 0;
}

void scsi_check(void)
{
	static uint16_t bdfs[4];
	const struct pci_access a = { PCI_CF8, 0 };
	struct vpci_window w = { 0xc0000000ull, 0xfec00000ull, 0, 0, 0 };
	int n = vpci_find(&a, VIRTIO_SCSI_PCI_ID, VIRTIO_SCSI_PCI_TRANSITIONAL_ID, bdfs, 4);
	kprintf("SCSI controllers=%d\n", n);
	if (n != 1) {
		check_fail("scsi %d virtio-scsi controllers on bus 0, expected 1", n);
		if (n == 0)
			return;
	}
	struct vscsi *s = &scsi;
	if (vscsi_init(s, &a, bdfs[0], &w) != 0) {
		vscsi_close(s);
		return;
	}
	kprintf("SCSI %s features=0x%lx num_queues=%u seg_max=%u max_sectors=%u cmd_per_lun=%u "
		"event_info_size=%u sense_size=%u cdb_size=%u max_channel=%u max_target=%u "
		"max_lun=%u\n",
		s->name, s->pci.accepted, s->num_queues, s->seg_max, s->max_sectors, s->cmd_per_lun,
		s->event_info_size, s->sense_size, s->cdb_size, s->max_channel, s->max_target,
		s->max_lun);

	if (report_luns() == 0) {
		for (unsigned i = 0; i < n_lu; i++) {
			test_tur(lu[i].lun);
			test_inquiry(lu[i].lun, i);
			test_capacity(lu[i].lun, i);
		}
		for (unsigned i = 0; i < n_lu && !s->broken; i++) {
			if (!lu[i].block_size)
				continue;
			int ro = opt.ro >= 0 && lu[i].lun == opt.ro;
			if (ro) {
				test_write_ro(i);
				continue;
			}
			if (opt.pattern)
				test_pattern(i);
			test_sync(i, i == 0);
			if (opt.unmap >= 0 && lu[i].lun == opt.unmap)
				test_unmap(i);
		}
		if (n_lu && lu[0].block_size && !s->broken)
			test_errors(0);
		if (!s->broken)
			test_bad_lun((uint16_t)opt.badlun);
		/* Last: a LOGICAL UNIT RESET (after it a LUN may report a unit attention). */
		if (!s->broken) {
			int r = vscsi_tmf(s, VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, 0);
			kprintf("SCSI tmf lun-reset response=%d\n", r);
			if (r != VIRTIO_SCSI_S_OK && r != VIRTIO_SCSI_S_FUNCTION_SUCCEEDED)
				check_fail("scsi LOGICAL UNIT RESET response=%d", r);
		}
	}
	kprintf("SCSI done luns=%u requests=%u isr_reads=%u isr_set=%u\n", n_lu, s->requests,
		s->pci.isr_reads, s->pci.isr_set);
	vscsi_close(s);
}

/* ---- LUN hot plug (hotplug=1): see README.md, "Hot plug". ---- */

static int hp_state; /* 0 not looked, 1 driving a controller, -1 none */
static uint32_t hp_wait; /* beats left before acting on the events seen */
static uint16_t hp_rescan[8]; /* LUNs a rescan event named, to drive */
static unsigned hp_n_rescan;
static int hp_report; /* a REPORT LUNS is due */
uint32_t scsi_hp_delay; /* beats between an event and acting on it (hpdelay=) */

/* Where and what the guest writes on a hot added LUN: 64 KiB at 1 MiB, the
 * scsi check's pattern_byte (tests/tests/scsi_hotplug.rs has the same). */
#define HPL_OFF (1024 * KIB)
#define HPL_LEN (64 * KIB)

/* REPORT LUNS on LUN 0, printed as "scsi: report luns: 0 1 3". */
static void hp_report_luns(void)
{
	uint8_t cdb[12] = { 0xa0 };
	put_be32(cdb + 6, sizeof(luns_buf));
	memset(luns_buf, 0, sizeof(luns_buf));
	int st = cmd(0, cdb, 12, luns_buf, sizeof(luns_buf), 4096, 1);
	if (st != 0 || res.response != VIRTIO_SCSI_S_OK || res.status != SCSI_GOOD) {
		kprintf("scsi: report luns failed st=%d response=%u status=%u\n", st, res.response,
			res.status);
		return;
	}
	uint32_t n = be32(luns_buf) / 8;
	kprintf("scsi: report luns:");
	for (uint32_t i = 0; i < n && i < LIST_LUNS; i++) {
		const uint8_t *e = luns_buf + 8 + 8 * i;
		kprintf(" %u", (e[0] >> 6) == 1 ? (unsigned)((e[0] & 0x3f) << 8 | e[1]) : e[1]);
	}
	kprintf("\n");
}

/* WRITE(10) then READ(10) of the pattern on a new LUN, compared. */
static void hp_drive(uint16_t lun)
{
	uint8_t cdb[10];
	/* The first command, as Linux's scan sends it (INQUIRY), before the
	 * guest's (slow, emulated) byte loops: tern-bench hotplug times this. */
	uint8_t inq[6] = { 0x12, 0, 0, 0, 36, 0 };
	int is = cmd(lun, inq, 6, small, 36, 36, 1);
	kprintf("scsi: lun %u first-io %s\n", lun,
		is == 0 && res.response == VIRTIO_SCSI_S_OK && res.status == SCSI_GOOD ? "ok" : "failed");
	for (uint32_t i = 0; i < HPL_LEN; i++)
		wbuf[i] = pattern_byte(lun, HPL_OFF + i);
	memset(cdb, 0, sizeof(cdb));
	cdb[0] = 0x2a;
	put_be32(cdb + 2, HPL_OFF / 512);
	put_be16(cdb + 7, HPL_LEN / 512);
	int ws = cmd(lun, cdb, 10, wbuf, HPL_LEN, 16 * KIB, 0);
	int wok = ws == 0 && res.response == VIRTIO_SCSI_S_OK && res.status == SCSI_GOOD;
	/* SYNCHRONIZE CACHE(10): the host reads the file next. */
	uint8_t sync[10] = { 0x35 };
	int ss = cmd(lun, sync, 10, 0, 0, 4096, 0);
	int sok = ss == 0 && res.response == VIRTIO_SCSI_S_OK && res.status == SCSI_GOOD;
	memset(rbuf, 0, HPL_LEN);
	cdb[0] = 0x28;
	int rs = cmd(lun, cdb, 10, rbuf, HPL_LEN, 16 * KIB, 1);
	int rok = rs == 0 && res.response == VIRTIO_SCSI_S_OK && res.status == SCSI_GOOD;
	uint32_t bad = 0;
	for (uint32_t i = 0; i < HPL_LEN; i++)
		if (rbuf[i] != wbuf[i])
			bad++;
	kprintf("scsi: lun %u write=%s sync=%s read=%s mismatches=%u\n", lun, wok ? "ok" : "failed",
		sok ? "ok" : "failed", rok ? "ok" : "failed", bad);
}

/* First beat: drive the controller, if there is one, with hot plug on. */
static void hp_start(void)
{
	static uint16_t bdfs[4];
	const struct pci_access a = { PCI_CF8, 0 };
	struct vpci_window w = { 0xc0000000ull, 0xfec00000ull, 0, 0, 0 };
	hp_state = -1;
	if (vpci_find(&a, VIRTIO_SCSI_PCI_ID, VIRTIO_SCSI_PCI_TRANSITIONAL_ID, bdfs, 4) < 1)
		return;
	scsi.hotplug = 1;
	if (vscsi_init(&scsi, &a, bdfs[0], &w) != 0) {
		vscsi_close(&scsi);
		return;
	}
	hp_state = 1;
	kprintf("scsi: hotplug %s features=0x%lx\n", scsi.name, scsi.pci.accepted);
	hp_report_luns();
}

void scsi_hotplug_beat(void)
{
	if (hp_state == 0)
		hp_start();
	if (hp_state != 1 || scsi.broken)
		return;
	uint32_t ev, reason;
	uint16_t lun;
	while (vscsi_event(&scsi, &ev, &lun, &reason)) {
		if ((ev & ~VIRTIO_SCSI_T_EVENTS_MISSED) == VIRTIO_SCSI_T_TRANSPORT_RESET) {
			int rescan = reason == VIRTIO_SCSI_EVT_RESET_RESCAN;
			kprintf("scsi: event transport reset lun %u %s%s\n", lun,
				rescan ? "rescan" : reason == VIRTIO_SCSI_EVT_RESET_REMOVED ? "removed" : "other",
				(ev & VIRTIO_SCSI_T_EVENTS_MISSED) ? " (events missed)" : "");
			if (rescan && hp_n_rescan < 8)
				hp_rescan[hp_n_rescan++] = lun;
		} else {
			kprintf("scsi: event 0x%x lun %u reason %u\n", ev, lun, reason);
		}
		if (!hp_report)
			hp_wait = scsi_hp_delay;
		hp_report = 1;
	}
	if (!hp_report)
		return;
	if (hp_wait) {
		hp_wait--;
		return;
	}
	hp_report = 0;
	/* As Linux does on these events: scan (REPORT LUNS), then use the new units. */
	hp_report_luns();
	for (unsigned i = 0; i < hp_n_rescan; i++)
		hp_drive(hp_rescan[i]);
	hp_n_rescan = 0;
}
