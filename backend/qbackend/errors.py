"""qbackend's error tree.

Every error qbackend raises on purpose derives from `QbackendError`, which
carries the exit code the command line ends with and, where a peer or the
OS should see one, an errno.  The command line catches the root and prints
its message as one line; the message says what is wrong and what to do.

    QbackendError                      exit 1 unless the subclass says otherwise
    +-- UsageError                     exit 2: a bad option or argument (qemu-img's usage code)
    |   +-- OptionError                   a device/export option (qbackend.options)
    |   +-- SizeError                     a size that does not parse (qbackend.sizes)
    |   +-- ConfigError                   devices and exports that do not fit together (an id twice)
    +-- ImageError                     a disk image that cannot be used (QED errors, exports)
    +-- QemuError                      QEMU is missing, failed, or answered QMP wrongly
    +-- DeviceError                    a device or its peer group refused a request (DMA, doorbells)
    +-- ControlError                   the control socket refused a command, or is unreachable
    +-- SocketPathError                a socket cannot be made where asked (in use, no folder)
    +-- ModelError                     a register model or state machine refused (sPAPR DRC)

Wire errors are the exception: the sans-IO codecs in `qbackend.protocol`
import nothing of qbackend, so their errors (vfio-user's `VfioUserError`,
`NbdProtocolError`, the ivshmem-server `ProtocolError`) have roots of their
own.  They carry the reply code the peer gets, and the servers answer them
within the connection: they never reach the command line.
"""

from __future__ import annotations

import errno as E


class QbackendError(Exception):
    """The root of qbackend's errors."""

    exit_code: int = 1
    """What `qbackend` exits with when this error ends a command."""
    errno: int | None = None
    """The errno a peer should see (NBD, vfio-user replies), if any."""

    def __init__(self, message: str = "", *, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class UsageError(QbackendError):
    """The command line asked for something that cannot be done as written."""

    exit_code = 2
    errno = E.EINVAL


class ConfigError(UsageError, ValueError):
    """The devices, exports and servers asked of one backend do not fit together: an id
    given twice, two sizes for one shared memory, a second NBD server, a PCI hot-plug
    without the controller that shows the slots.  A ValueError too, as OptionError."""


class ImageError(QbackendError):
    """A disk image that cannot be opened, read or written as asked."""

    errno = E.EIO


class QemuError(QbackendError):
    """QEMU is missing or failed, or a QMP reply was not what QEMU documents."""


class DeviceError(QbackendError):
    """A device refused a request (a DMA access, a doorbell, a peer)."""

    errno = E.EINVAL


class ControlError(QbackendError):
    """A control-socket command failed, or the socket cannot be reached."""


class SocketPathError(QbackendError, OSError):
    """A UNIX socket cannot be made at the path asked for: another process serves it,
    its folder does not exist, or another kind of file is there."""

    errno = E.EADDRINUSE


class ModelError(QbackendError, ValueError):
    """A register model or state machine refused an operation."""
