/* rtas: RTAS calls from the ppc64le test guest's user space (sys_rtas).
 *   rtas call NAME NRET [ARG...]   one call; prints "RTAS NAME STATUS [RET...]"
 *   rtas cc INDEX                  walks ibm,configure-connector in the RMO
 *                                  buffer (the only memory sys_rtas accepts for
 *                                  it); prints "CC RC [NAME [HEX]]" per step
 * Numbers take 0x.  Tokens come from /proc/device-tree/rtas. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

struct rtas_args {
    uint32_t token, nargs, nret, args[16];
    uint32_t *rets;
};

static uint32_t be(uint32_t v) { return __builtin_bswap32(v); }

static uint32_t token(const char *name)
{
    char path[256];
    uint32_t t;
    snprintf(path, sizeof path, "/proc/device-tree/rtas/%s", name);
    int fd = open(path, O_RDONLY);
    if (fd < 0 || read(fd, &t, 4) != 4) {
        fprintf(stderr, "rtas: no token for %s\n", name);
        exit(2);
    }
    close(fd);
    return be(t);
}

static int call(const char *name, int nargs, int nret, const uint32_t *in, uint32_t *out)
{
    struct rtas_args a;
    memset(&a, 0, sizeof a);
    a.token = be(token(name));
    a.nargs = be(nargs);
    a.nret = be(nret);
    for (int i = 0; i < nargs; i++)
        a.args[i] = be(in[i]);
    if (syscall(SYS_rtas, &a) < 0) {
        perror("sys_rtas");
        exit(3);
    }
    for (int i = 0; i < nret; i++)
        out[i] = be(a.args[nargs + i]);
    return (int32_t)out[0];
}

int main(int argc, char **argv)
{
    uint32_t in[16], out[16];
    if (argc >= 4 && !strcmp(argv[1], "call")) {
        int nret = strtol(argv[3], 0, 0), nargs = argc - 4;
        for (int i = 0; i < nargs; i++)
            in[i] = strtoul(argv[4 + i], 0, 0);
        call(argv[2], nargs, nret, in, out);
        printf("RTAS %s", argv[2]);
        for (int i = 0; i < nret; i++)
            printf(" %d", (int32_t)out[i]);
        printf("\n");
        return 0;
    }
    if (argc == 3 && !strcmp(argv[1], "cc")) {
        unsigned long addr;
        unsigned size;
        FILE *f = fopen("/proc/powerpc/rtas/rmo_buffer", "r");
        if (!f || fscanf(f, "%lx %x", &addr, &size) != 2) {
            fprintf(stderr, "rtas: no rmo_buffer\n");
            return 2;
        }
        int fd = open("/dev/mem", O_RDWR | O_SYNC);
        uint8_t *wa = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, addr);
        if (fd < 0 || wa == MAP_FAILED) {
            perror("rtas: /dev/mem");
            return 2;
        }
        uint32_t *cell = (uint32_t *)wa;
        memset(wa, 0, 4096);
        cell[0] = be(strtoul(argv[2], 0, 0));
        for (int step = 0; step < 10000; step++) {
            in[0] = addr;
            in[1] = 0;
            int rc = call("ibm,configure-connector", 2, 1, in, out);
            printf("CC %d", rc);
            if (rc == 2 || rc == 3) {
                uint32_t off = be(cell[2]);
                printf(" %s", (char *)wa + off);
                if (rc == 3) {
                    uint32_t len = be(cell[3]), data = be(cell[4]);
                    printf(" ");
                    for (uint32_t i = 0; i < len && data + i < 4096; i++)
                        printf("%02x", wa[data + i]);
                }
            }
            printf("\n");
            if (rc != 2 && rc != 3 && rc != 4)
                return 0;
        }
        return 1;
    }
    fprintf(stderr, "usage: rtas call NAME NRET [ARG...] | rtas cc INDEX\n");
    return 2;
}
