/* lspci: the test guest's PCI devices, from /sys/bus/pci/devices (busybox-static
 * has no lspci).  One line per function, in bus order, as `lspci -n` prints
 * them without the revision:
 *   BB:DD.F CCSS: VVVV:DDDD      class and subclass, vendor and device, in hex
 * The domain is shown only when it is not 0000.
 */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEVICES "/sys/bus/pci/devices"

static unsigned long attr(const char *dev, const char *name)
{
    char path[512];
    unsigned long value = 0;
    snprintf(path, sizeof(path), DEVICES "/%s/%s", dev, name);
    FILE *f = fopen(path, "r");
    if (f) {
        if (fscanf(f, "%lx", &value) != 1)
            value = 0;
        fclose(f);
    }
    return value;
}

static int visible(const struct dirent *e)
{
    return e->d_name[0] != '.';
}

int main(void)
{
    struct dirent **devs;
    /* Names are DDDD:BB:DD.F in fixed-width hex, so alphabetical is bus order. */
    int n = scandir(DEVICES, &devs, visible, alphasort);
    if (n < 0) {
        perror("lspci: " DEVICES);
        return 1;
    }
    for (int i = 0; i < n; i++) {
        const char *name = devs[i]->d_name;
        const char *shown = strncmp(name, "0000:", 5) == 0 ? name + 5 : name;
        printf("%s %04lx: %04lx:%04lx\n", shown, attr(name, "class") >> 8, attr(name, "vendor"),
               attr(name, "device"));
        free(devs[i]);
    }
    free(devs);
    return 0;
}
