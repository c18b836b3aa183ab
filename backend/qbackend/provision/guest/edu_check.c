/*
 * edu_check: drive an edu device (QEMU's -device edu, 1234:11e8, or a
 * reimplementation of it) from the guest through its BAR0, printing one
 * line per observation in a fixed text format, so that the outputs of two
 * devices can be compared as strings.  No physical address or timing ever
 * appears in the output.
 *
 *   edu_check DEVPATH [check]   the register, factorial, interrupt and DMA
 *                               sequence (run it with no driver handling
 *                               the device's interrupts)
 *   edu_check DEVPATH irq       steps that each raise one interrupt, for a
 *                               driver (edu_irq.ko) to count and acknowledge
 *
 * DEVPATH is the function's sysfs directory (/sys/bus/pci/devices/0000:00:04.0);
 * its resource0 is mapped, and memory decoding and bus mastering are turned on
 * in its command register if they are off.  Accesses below 0x80 are 32-bit,
 * the DMA registers (0x80..0x98) 64-bit.  DMA buffers are mlock'd pages of
 * this process below the 28-bit DMA mask, found through /proc/self/pagemap
 * (root only).
 *
 * Every line is "WORDS VALUES"; the last one is "end errors=N" (exit status 0
 * when N is 0, else 1; 2 when the device cannot be set up).  Timeouts are
 * bounded and printed as "timeout" in place of a value.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define REG_ID 0x00
#define REG_LIVENESS 0x04
#define REG_FACT 0x08
#define REG_STATUS 0x20
#define REG_IRQ_STATUS 0x24
#define REG_IRQ_RAISE 0x60
#define REG_IRQ_ACK 0x64
#define REG_DMA_SRC 0x80
#define REG_DMA_DST 0x88
#define REG_DMA_CNT 0x90
#define REG_DMA_CMD 0x98
#define STATUS_COMPUTING 0x01
#define STATUS_IRQFACT 0x80
#define DMA_RUN 0x1
#define DMA_TO_RAM 0x2
#define DMA_IRQ 0x4
#define DEV_BUF 0x40000
#define DEV_BUF_SIZE 4096
#define DMA_LIMIT (1ULL << 28)
#define PAGE 4096
#define TIMEOUT_NS 10000000000LL /* 10 s: TCG on a loaded machine */
#define NPAGES 4

static volatile uint8_t *bar;
static const char *devpath;
static int errors;
static uint8_t *page[NPAGES];
static uint64_t phys[NPAGES];

static uint32_t rd32(unsigned int off) { return *(volatile uint32_t *)(bar + off); }
static void wr32(unsigned int off, uint32_t v) { *(volatile uint32_t *)(bar + off) = v; }
static uint64_t rd64(unsigned int off) { return *(volatile uint64_t *)(bar + off); }
static void wr64(unsigned int off, uint64_t v) { *(volatile uint64_t *)(bar + off) = v; }

static long long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Poll until (reg & mask) == 0; 1 on success, 0 on timeout. */
static int wait_clear32(unsigned int off, uint32_t mask)
{
	long long deadline = now_ns() + TIMEOUT_NS;

	while (rd32(off) & mask)
		if (now_ns() > deadline)
			return 0;
	return 1;
}

static int wait_clear64(unsigned int off, uint64_t mask)
{
	long long deadline = now_ns() + TIMEOUT_NS;

	while (rd64(off) & mask)
		if (now_ns() > deadline)
			return 0;
	return 1;
}

/* -- the device's sysfs files ------------------------------------------------------ */

static int setup_device(void)
{
	char path[512];
	uint8_t cmd[2];
	int fd;

	/* Memory decoding and bus mastering (config offset 4, bits 1 and 2). */
	snprintf(path, sizeof(path), "%s/config", devpath);
	fd = open(path, O_RDWR);
	if (fd < 0 || pread(fd, cmd, 2, 4) != 2) {
		perror(path);
		return -1;
	}
	if ((cmd[0] & 0x06) != 0x06) {
		cmd[0] |= 0x06;
		if (pwrite(fd, cmd, 2, 4) != 2) {
			perror(path);
			return -1;
		}
	}
	close(fd);
	snprintf(path, sizeof(path), "%s/resource0", devpath);
	fd = open(path, O_RDWR | O_SYNC);
	if (fd < 0) {
		perror(path);
		return -1;
	}
	bar = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (bar == MAP_FAILED) {
		perror("mmap resource0");
		return -1;
	}
	close(fd);
	return 0;
}

/* A number from one of the driver's attributes (DEVPATH/NAME), -1 if absent. */
static long long read_attr(const char *name)
{
	char path[512], buf[64];
	long long v;
	FILE *f;

	snprintf(path, sizeof(path), "%s/%s", devpath, name);
	f = fopen(path, "r");
	if (!f)
		return -1;
	v = fgets(buf, sizeof(buf), f) ? strtoll(buf, NULL, 0) : -1;
	fclose(f);
	return v;
}

/* -- DMA buffers ---------------------------------------------------------------------- */

static int find_dma_pages(void)
{
	size_t chunk = 4 << 20, i;
	int found = 0, tries, fd;

	fd = open("/proc/self/pagemap", O_RDONLY);
	if (fd < 0) {
		perror("/proc/self/pagemap");
		return -1;
	}
	for (tries = 0; tries < 32 && found < NPAGES; tries++) {
		uint8_t *mem = mmap(NULL, chunk, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		if (mem == MAP_FAILED || mlock(mem, chunk)) {
			perror("mmap/mlock");
			return -1;
		}
		memset(mem, 0, chunk);
		for (i = 0; i < chunk && found < NPAGES; i += PAGE) {
			uint64_t entry, pfn;
			off_t off = (off_t)((uintptr_t)(mem + i) / PAGE) * 8;

			if (pread(fd, &entry, 8, off) != 8) {
				perror("pread pagemap");
				return -1;
			}
			pfn = entry & ((1ULL << 55) - 1);
			if (!(entry >> 63) || pfn == 0) /* not present, or PFNs hidden (not root) */
				continue;
			if ((pfn + 1) * PAGE <= DMA_LIMIT) {
				page[found] = mem + i;
				phys[found] = pfn * PAGE;
				found++;
			}
		}
	}
	close(fd);
	if (found < NPAGES) {
		fprintf(stderr, "edu_check: only %d pages below the DMA mask\n", found);
		return -1;
	}
	return 0;
}

static void fill(uint8_t *p, size_t len, unsigned int seed)
{
	size_t i;

	for (i = 0; i < len; i++)
		p[i] = (uint8_t)(i * 7 + seed + (i >> 8));
}

/* Start one transfer and wait for the start bit to clear; prints the command
 * register after it.  Returns 1 when it completed in time. */
static int dma(const char *what, uint64_t src, uint64_t dst, uint64_t cnt, uint64_t cmd)
{
	int ok;

	__sync_synchronize();
	wr64(REG_DMA_SRC, src);
	wr64(REG_DMA_DST, dst);
	wr64(REG_DMA_CNT, cnt);
	wr64(REG_DMA_CMD, cmd);
	ok = wait_clear64(REG_DMA_CMD, DMA_RUN);
	__sync_synchronize();
	if (ok) {
		printf("dma %s len %llu cmd_after 0x%016llx\n", what, (unsigned long long)cnt,
		       (unsigned long long)rd64(REG_DMA_CMD));
	} else {
		printf("dma %s len %llu cmd_after timeout\n", what, (unsigned long long)cnt);
		errors++;
	}
	return ok;
}

static void compare(const char *what, const uint8_t *got, const uint8_t *want, size_t len)
{
	size_t i, bad = 0;

	for (i = 0; i < len; i++)
		bad += got[i] != want[i];
	printf("dma compare %s len %zu mismatches %zu\n", what, len, bad);
	if (bad)
		errors++;
}

static void untouched(const char *what, const uint8_t *p, size_t len, uint8_t fill_byte)
{
	size_t i, bad = 0;

	for (i = 0; i < len; i++)
		bad += p[i] != fill_byte;
	printf("dma untouched %s len %zu changed %zu\n", what, len, bad);
	if (bad)
		errors++;
}

/* -- the check sequence ---------------------------------------------------------------- */

static void check_registers(void)
{
	static const uint32_t live[] = { 0, 1, 0x12345678, 0xffffffff, 0xdeadbeef, 0x80000000 };
	static const uint32_t stat[] = { 0x80, 0xff, 0x01, 0x00 };
	unsigned int i;

	printf("id 0x%08x\n", rd32(REG_ID));
	for (i = 0; i < sizeof(live) / sizeof(live[0]); i++) {
		wr32(REG_LIVENESS, live[i]);
		printf("liveness 0x%08x -> 0x%08x\n", live[i], rd32(REG_LIVENESS));
	}
	/* Offsets that are no register read all ones; so does an 8-byte access below 0x80. */
	printf("read32 0x0c -> 0x%08x\n", rd32(0x0c));
	printf("read32 0x28 -> 0x%08x\n", rd32(0x28));
	printf("read64 0x00 -> 0x%016llx\n", (unsigned long long)rd64(0x00));
	/* Status: only the interrupt-after-factorial bit (0x80) is writable. */
	for (i = 0; i < sizeof(stat) / sizeof(stat[0]); i++) {
		wr32(REG_STATUS, stat[i]);
		printf("status write 0x%08x -> 0x%08x\n", stat[i], rd32(REG_STATUS));
	}
}

static void check_factorial(void)
{
	static const uint32_t n[] = { 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 20, 34 };
	unsigned int i;

	for (i = 0; i < sizeof(n) / sizeof(n[0]); i++) {
		uint32_t before = rd32(REG_STATUS);

		wr32(REG_FACT, n[i]);
		if (wait_clear32(REG_STATUS, STATUS_COMPUTING)) {
			printf("fact %u status_before 0x%08x status_after 0x%08x result 0x%08x\n", n[i], before,
			       rd32(REG_STATUS), rd32(REG_FACT));
		} else {
			printf("fact %u status_before 0x%08x status_after timeout\n", n[i], before);
			errors++;
		}
	}
}

static void check_interrupts(void)
{
	static const struct { char op; uint32_t v; } seq[] = {
		{ 'r', 0x5 }, { 'r', 0x30 }, { 'a', 0x35 },
		{ 'r', 0x1 }, { 'r', 0x100 }, { 'a', 0x1 }, { 'r', 0x1 }, { 'a', 0xffffffff },
		{ 'r', 0x80000000 }, { 'r', 0x80000000 }, { 'a', 0x7fffffff }, { 'a', 0x80000000 },
		{ 'r', 0x0 }, { 'a', 0x0 }, { 'r', 0xffffffff }, { 'a', 0x0000ffff }, { 'a', 0xffff0000 },
	};
	unsigned int i;

	printf("irq initial 0x%08x\n", rd32(REG_IRQ_STATUS));
	for (i = 0; i < sizeof(seq) / sizeof(seq[0]); i++) {
		wr32(seq[i].op == 'r' ? REG_IRQ_RAISE : REG_IRQ_ACK, seq[i].v);
		printf("irq %s 0x%08x -> 0x%08x\n", seq[i].op == 'r' ? "raise" : "ack", seq[i].v,
		       rd32(REG_IRQ_STATUS));
	}
}

static void check_dma(void)
{
	uint8_t *a = page[0], *b = page[1], *c = page[2], *d = page[3];
	uint8_t want[DEV_BUF_SIZE];
	uint64_t src, dst;

	/* 1: the spec's example, 100 bytes RAM -> device buffer -> another page. */
	fill(a, PAGE, 0x5a);
	memset(b, 0xee, PAGE);
	if (dma("ram->dev", phys[0], DEV_BUF, 100, DMA_RUN) &&
	    dma("dev->ram", DEV_BUF, phys[1], 100, DMA_RUN | DMA_TO_RAM)) {
		compare("100", b, a, 100);
		untouched("100-tail", b + 100, PAGE - 100, 0xee);
	}
	src = rd64(REG_DMA_SRC);
	dst = rd64(REG_DMA_DST);
	printf("dma regs src 0x%016llx dst %s cnt 0x%016llx\n", (unsigned long long)src,
	       dst == phys[1] ? "page1" : "other", (unsigned long long)rd64(REG_DMA_CNT));

	/* 2: the whole device buffer. */
	fill(c, PAGE, 0x33);
	memset(b, 0, PAGE);
	if (dma("ram->dev", phys[2], DEV_BUF, DEV_BUF_SIZE, DMA_RUN) &&
	    dma("dev->ram", DEV_BUF, phys[1], DEV_BUF_SIZE, DMA_RUN | DMA_TO_RAM))
		compare("4096", b, c, DEV_BUF_SIZE);
	memcpy(want, c, DEV_BUF_SIZE);

	/* 3: nothing moves on a zero-length transfer; then 256 bytes from page
	 * offset 0x10 into the middle of the device buffer; read back all of it. */
	fill(d, PAGE, 0xa1);
	dma("ram->dev", phys[3], DEV_BUF, 0, DMA_RUN);
	if (dma("ram->dev", phys[3] + 0x10, DEV_BUF + 0x800, 0x100, DMA_RUN)) {
		memcpy(want + 0x800, d + 0x10, 0x100);
		memset(b, 0xee, PAGE);
		if (dma("dev->ram", DEV_BUF, phys[1], DEV_BUF_SIZE, DMA_RUN | DMA_TO_RAM))
			compare("offset", b, want, DEV_BUF_SIZE);
	}
	/* 4: device buffer tail -> middle of a page. */
	memset(b, 0xee, PAGE);
	if (dma("dev->ram", DEV_BUF + 0xf00, phys[1] + 0x200, 0x100, DMA_RUN | DMA_TO_RAM)) {
		compare("tail", b + 0x200, want + 0xf00, 0x100);
		untouched("tail-before", b, 0x200, 0xee);
		untouched("tail-after", b + 0x300, PAGE - 0x300, 0xee);
	}
}

/* -- interrupts for a driver to count ------------------------------------------------- */

/* After one interrupt-raising step: wait until the driver's irq_count has
 * risen by one and the interrupt status is clear again (acknowledged). */
static void irq_step(const char *what, long long count_before)
{
	long long deadline = now_ns() + TIMEOUT_NS, count = read_attr("irq_count");
	int counted = 0, acked = 0;

	while (now_ns() < deadline) {
		count = read_attr("irq_count");
		counted = count >= 0 && count >= count_before + 1;
		acked = rd32(REG_IRQ_STATUS) == 0;
		if (acked && (counted || count < 0))
			break;
		usleep(1000);
	}
	printf("irqstep %s counted %s acked %s last_status 0x%08llx\n", what,
	       count < 0 ? "n/a" : counted ? "yes" : "no", acked ? "yes" : "no",
	       (unsigned long long)read_attr("last_status"));
	if (!acked || (count >= 0 && !counted)) {
		errors++;
		wr32(REG_IRQ_ACK, 0xffffffff);
	}
}

static void irq_mode(void)
{
	static const uint32_t raise[] = { 0x1, 0x2, 0x40, 0x1000, 0x80000000 };
	static const uint32_t fact[] = { 5, 10 };
	char what[64];
	long long before;
	unsigned int i, steps = 0;

	printf("irq initial 0x%08x\n", rd32(REG_IRQ_STATUS));
	for (i = 0; i < sizeof(raise) / sizeof(raise[0]); i++, steps++) {
		before = read_attr("irq_count");
		wr32(REG_IRQ_RAISE, raise[i]);
		snprintf(what, sizeof(what), "raise 0x%08x", raise[i]);
		irq_step(what, before);
	}
	wr32(REG_STATUS, STATUS_IRQFACT);
	for (i = 0; i < sizeof(fact) / sizeof(fact[0]); i++, steps++) {
		before = read_attr("irq_count");
		wr32(REG_FACT, fact[i]);
		if (!wait_clear32(REG_STATUS, STATUS_COMPUTING)) {
			printf("fact %u irq status_after timeout\n", fact[i]);
			errors++;
		}
		snprintf(what, sizeof(what), "fact %u status 0x%08x result 0x%08x", fact[i], rd32(REG_STATUS),
			 rd32(REG_FACT));
		irq_step(what, before);
	}
	wr32(REG_STATUS, 0);
	fill(page[0], PAGE, 0x77);
	memset(page[1], 0, PAGE);
	before = read_attr("irq_count");
	dma("ram->dev+irq", phys[0], DEV_BUF, 64, DMA_RUN | DMA_IRQ);
	irq_step("dma ram->dev", before);
	steps++;
	before = read_attr("irq_count");
	dma("dev->ram+irq", DEV_BUF, phys[1], 64, DMA_RUN | DMA_TO_RAM | DMA_IRQ);
	irq_step("dma dev->ram", before);
	steps++;
	compare("irq", page[1], page[0], 64);
	printf("irq steps %u\n", steps);
}

int main(int argc, char **argv)
{
	const char *mode = argc > 2 ? argv[2] : "check";

	if (argc < 2 || argc > 3 || (strcmp(mode, "check") && strcmp(mode, "irq"))) {
		fprintf(stderr, "usage: edu_check /sys/bus/pci/devices/BDF [check|irq]\n");
		return 2;
	}
	devpath = argv[1];
	if (setup_device() || find_dma_pages())
		return 2;
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (!strcmp(mode, "check")) {
		check_registers();
		check_factorial();
		check_interrupts();
		check_dma();
	} else {
		irq_mode();
	}
	printf("end errors=%d\n", errors);
	return errors ? 1 : 0;
}
