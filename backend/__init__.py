"""qbackend: external devices and disks for a real QEMU, from one Python process.

The package is layered; each subpackage imports only from the layers above
it in this list (tests/test_layers.py enforces it):

    protocol   wire formats, sans-IO (vfio-user, NBD, the ivshmem-server protocol)
    models     register files and state machines, no I/O (PCI config space,
               ACPI memory/PCI hotplug blocks, ivshmem registers, sPAPR DRC)
    plumbing   the OS: UNIX sockets, fd passing, eventfds, shared memory
    vfio       binding a model to vfio-user: the PCI function, interrupts, DMA
    devices    the PCI devices qbackend serves (ivshmem, the hotplug controller)
    ivshmem    ivshmem peer groups: doorbells, the ivshmem-server socket, host peers
    block      block files, the QED format, its check and repair, NBD exports
    servers    the socket servers: vfio-user, NBD, the control socket
    machine    QEMU itself: finding and launching it, QMP, the guest console,
               DIMM and PCI slots kept true to QEMU
    app        what a qbackend process serves, and the command line
    testing    the harness for tests against a booted guest

Errors all derive from `qbackend.errors.QbackendError`.
"""

__version__ = "0.2.0"
