/*
 * memwrite: write throughput into a mapping, for qbackend's benchmark.
 *
 *   memwrite TARGET MIB [PASSES]
 *
 * TARGET is a file to mmap shared (a PCI BAR: /sys/bus/pci/devices/BDF/resource2;
 * or a tmpfs file) or "ram" for anonymous memory.  After one warm-up pass,
 * copies MIB MiB into the mapping PASSES times (default 5) and prints one
 * line per pass: "pass N: BYTES bytes in NS ns, MB/s".  The same loop runs
 * on every target, so only the memory behind the mapping differs.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
	size_t len, chunk = 64 << 10, off;
	int passes = 5, fd = -1, p;
	char *dst, *src;

	if (argc < 3) {
		fprintf(stderr, "usage: memwrite TARGET|ram MIB [PASSES]\n");
		return 2;
	}
	len = (size_t)atol(argv[2]) << 20;
	if (argc > 3)
		passes = atoi(argv[3]);
	if (strcmp(argv[1], "ram") == 0) {
		dst = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	} else {
		fd = open(argv[1], O_RDWR | O_SYNC);
		if (fd < 0) {
			perror(argv[1]);
			return 1;
		}
		dst = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	}
	if (dst == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	src = malloc(chunk);
	if (!src)
		return 1;
	for (off = 0; off < chunk; off++)
		src[off] = (char)(off * 7 + 1);
	for (p = -1; p < passes; p++) {
		long long t0 = now_ns(), dt;

		for (off = 0; off < len; off += chunk)
			memcpy(dst + off, src, chunk);
		dt = now_ns() - t0;
		if (p >= 0)
			printf("pass %d: %zu bytes in %lld ns, %.1f MB/s\n", p, len, dt, len * 1e3 / dt);
	}
	return 0;
}
