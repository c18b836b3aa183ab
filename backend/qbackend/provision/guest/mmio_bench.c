/*
 * mmio_bench: trapped-register round trips from a guest, for qbackend's benchmark.
 *
 *   mmio_bench DEVICE BAR OFFSET COUNT read|write
 *
 * DEVICE is a PCI device's sysfs folder (/sys/bus/pci/devices/BDF).  Finds
 * BAR's address in DEVICE/resource, maps its page through /dev/mem (BARs
 * smaller than a page cannot be mapped through resourceN; /dev/mem reaches
 * any BAR), and does COUNT 4-byte volatile reads (or writes of 0) of the
 * register at OFFSET, then prints "COUNT accesses in NS ns".  Every access
 * of a trapped BAR is one exit to QEMU and, for a vfio-user device, one
 * round trip to its server: this is what a guest driver feels.  An I/O
 * port BAR (libvfio-user's gpio sample has one) is read with inl/outl.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
	volatile uint32_t *reg;
	long count, i;
	long long t0, t1;
	unsigned long long start = 0, end, flags, addr;
	unsigned long offset;
	uint32_t sink = 0;
	int fd, write_it, bar, n;
	char path[512];
	FILE *res;
	void *map;

	if (argc != 6) {
		fprintf(stderr, "usage: mmio_bench DEVICE BAR OFFSET COUNT read|write\n");
		return 2;
	}
	bar = atoi(argv[2]);
	offset = strtoul(argv[3], NULL, 0);
	count = atol(argv[4]);
	write_it = strcmp(argv[5], "write") == 0;
	if (bar < 0 || bar > 5 || offset % 4 || count <= 0) {
		fprintf(stderr, "mmio_bench: BAR 0..5, OFFSET 4-byte aligned, COUNT > 0\n");
		return 2;
	}
	snprintf(path, sizeof(path), "%s/resource", argv[1]);
	res = fopen(path, "r");
	if (!res) {
		perror(path);
		return 1;
	}
	for (n = 0; n <= bar; n++)
		if (fscanf(res, "%llx %llx %llx", &start, &end, &flags) != 3) {
			fprintf(stderr, "mmio_bench: %s has no line for BAR %d\n", path, bar);
			return 1;
		}
	fclose(res);
	if (!start || offset + 4 > end - start + 1) {
		fprintf(stderr, "mmio_bench: BAR %d is not assigned, or OFFSET is past its end\n", bar);
		return 1;
	}
	addr = start + offset;
	if (flags & 0x100) {	/* IORESOURCE_IO: a port BAR */
		if (iopl(3) < 0) {
			perror("iopl");
			return 1;
		}
		t0 = now_ns();
		if (write_it)
			for (i = 0; i < count; i++)
				outl(0, (unsigned short)addr);
		else
			for (i = 0; i < count; i++)
				sink += inl((unsigned short)addr);
		t1 = now_ns();
		printf("%ld accesses in %lld ns (last %#x)\n", count, t1 - t0, sink);
		return 0;
	}
	fd = open("/dev/mem", O_RDWR | O_SYNC);
	if (fd < 0) {
		perror("/dev/mem");
		return 1;
	}
	map = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)(addr & ~4095ULL));
	if (map == MAP_FAILED) {
		perror("mmap /dev/mem");
		return 1;
	}
	reg = (volatile uint32_t *)((char *)map + (addr & 4095));
	t0 = now_ns();
	if (write_it)
		for (i = 0; i < count; i++)
			*reg = 0;
	else
		for (i = 0; i < count; i++)
			sink += *reg;
	t1 = now_ns();
	printf("%ld accesses in %lld ns (last %#x)\n", count, t1 - t0, sink);
	return 0;
}
