"""The commands of `qbackend`, in the order its --help lists them, with their summaries.

Each command is the module of its name in this package.  Only the module of the
command being run is imported (the others stand in `qbackend --help` with these
summaries), so that a command's start-up costs only what it uses.
"""

SUMMARIES: dict[str, str] = {
    "setup": "provision QEMU 11.1 and the test guest into the data directory",
    "serve": 'serve devices (and NBD exports, a QMP monitor) until Ctrl-C or quit',
    "nbd": 'serve disk images (QED or raw) over NBD until Ctrl-C',
    "run": 'start the devices, QEMU and a booted guest together',
    "pci": 'hot-add, hot-remove and list PCI devices of a running qbackend',
    "dimm": 'hot-add, hot-remove and list DIMMs of a running qbackend',
    "device": 'trace or reload a device of a running qbackend',
    "upgrade": 'hand a running qbackend over to a new process, QEMU and the guest going on',
    "replay": 'replay a device trace against a device class, without QEMU',
    "console": "attach the terminal to a guest's serial console",
    "qemu": 'run the provisioned QEMU, or print the pieces of a command line of your own',
    "drc": 'pseries DRC model: device-tree properties, RTAS state machine',
    "qed": 'create, inspect, check and convert QED images (like qemu-img)',
    "ivshmem": 'ivshmem peer groups: peers, doorbells, memory; a standalone ivshmem-server',
}

# Commands not listed by --help: started by qbackend itself.
HIDDEN = ("takeover",)
