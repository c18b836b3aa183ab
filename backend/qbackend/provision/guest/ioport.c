/* ioport: 32-bit port I/O for the test guest (busybox has none).
 *   ioport rl PORT [COUNT]   read COUNT dwords from PORT, PORT+4, ...
 *   ioport wl PORT VALUE     write one dword
 * Numbers may be decimal or 0x-prefixed hex.  Output: one 0x%08x per line.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>

int main(int argc, char **argv)
{
    if (argc < 3 || (strcmp(argv[1], "rl") && strcmp(argv[1], "wl"))) {
        fprintf(stderr, "usage: ioport rl PORT [COUNT] | ioport wl PORT VALUE\n");
        return 2;
    }
    unsigned long port = strtoul(argv[2], NULL, 0);
    if (port > 0xfffc || iopl(3) != 0) {
        perror("ioport: iopl");
        return 1;
    }
    if (!strcmp(argv[1], "wl")) {
        if (argc != 4) {
            fprintf(stderr, "ioport wl PORT VALUE\n");
            return 2;
        }
        outl((unsigned int)strtoul(argv[3], NULL, 0), (unsigned short)port);
        return 0;
    }
    unsigned long count = argc > 3 ? strtoul(argv[3], NULL, 0) : 1;
    for (unsigned long i = 0; i < count && port + 4 * i <= 0xfffc; i++)
        printf("0x%08x\n", inl((unsigned short)(port + 4 * i)));
    return 0;
}
