"""Command-line device options in QEMU's own style: `key=value,key=value`,
with `,,` for a literal comma, and sizes such as `4M` or `1G`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qbackend.errors import UsageError
from qbackend.sizes import parse_size


class OptionError(UsageError, ValueError):
    """A device option that cannot be used; the message says how to fix it."""


def parse_keyval(text: str, option: str) -> dict[str, str]:
    result: dict[str, str] = {}
    items: list[str] = []
    current = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if text[i + 1:i + 2] == ",":
                current += ","
                i += 2
                continue
            items.append(current)
            current = ""
        else:
            current += ch
        i += 1
    items.append(current)
    for item in items:
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise OptionError(f"{option}: '{item}' is not key=value (example: {option} socket=/tmp/iv.sock,size=4M)")
        if key in result:
            raise OptionError(f"{option}: '{key}' is given twice")
        result[key] = value
    return result


def parse_int(text: str, what: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise OptionError(f"{what}: '{text}' is not a number") from None


@dataclass(frozen=True)
class IvshmemOptions:
    """`--ivshmem socket=PATH,size=SIZE[,shm=NAME][,vectors=N][,id=ID][,peer=N][,server=PATH]`

    `server=PATH`: the device's peer group also listens there as an
    ivshmem-server (stock QEMU ivshmem-doorbell devices and host programs
    join through it), handing out `vectors` (at least 1) eventfds per peer.
    """

    socket: Path
    size: int = 4 << 20
    shm: str | None = None
    vectors: int = 1
    id: str = ""
    peer: int | None = None
    server: Path | None = None

    KEYS = ("socket", "size", "shm", "vectors", "id", "peer", "server")

    @classmethod
    def parse(cls, text: str) -> IvshmemOptions:
        kv = parse_keyval(text, "--ivshmem")
        _known_keys(kv, cls.KEYS, "--ivshmem")
        if "socket" not in kv:
            raise OptionError("--ivshmem: socket=PATH is required (the UNIX socket QEMU connects to)")
        size = parse_size(kv.get("size", "4M"), "--ivshmem size", default_unit="B")
        if size < 4096 or size & (size - 1):
            raise OptionError(f"--ivshmem size={kv.get('size')}: must be a power of two of at least 4K "
                              "(QEMU refuses other BAR sizes)")
        vectors = parse_int(kv.get("vectors", "1"), "--ivshmem vectors")
        if not 0 <= vectors <= 64:
            raise OptionError(f"--ivshmem vectors={vectors}: must be 0..64 (0: no MSI-X, INTx only)")
        peer = parse_int(kv["peer"], "--ivshmem peer") if "peer" in kv else None
        if peer is not None and not 0 <= peer <= 0xFFFF:
            raise OptionError(f"--ivshmem peer={peer}: must be 0..65535")
        shm = kv.get("shm") or None
        if shm is not None and "/" in shm:
            raise OptionError(f"--ivshmem shm={shm}: a name in /dev/shm, without '/'")
        return cls(socket=Path(kv["socket"]), size=size, shm=shm, vectors=vectors,
                   id=kv.get("id", ""), peer=peer, server=Path(kv["server"]) if kv.get("server") else None)


def _image_format(kv: dict[str, str], option: str) -> str:
    fmt = kv.get("format", "")
    if fmt not in ("", "raw", "qed"):
        raise OptionError(f"{option} format={fmt}: raw or qed")
    return fmt


def _known_keys(kv: dict[str, str], keys: tuple[str, ...], option: str) -> None:
    unknown = sorted(set(kv) - set(keys))
    if unknown:
        raise OptionError(f"{option}: unknown key(s) {', '.join(unknown)}; known: {', '.join(keys)}")


_BOOL = {"on": True, "yes": True, "true": True, "1": True, "off": False, "no": False, "false": False, "0": False}


def _parse_bool(text: str, what: str) -> bool:
    try:
        return _BOOL[text.lower()]
    except KeyError:
        raise OptionError(f"{what}: '{text}' is not on/off") from None


@dataclass(frozen=True)
class NbdExportOptions:
    """`--export name=NAME,image=PATH[,readonly=on][,format=raw|qed]`"""

    name: str
    image: Path
    readonly: bool = False
    format: str = ""  # raw or qed; empty: probed, which only a read-only export allows

    KEYS = ("name", "image", "readonly", "format")

    @classmethod
    def parse(cls, text: str) -> NbdExportOptions:
        kv = parse_keyval(text, "--export")
        _known_keys(kv, cls.KEYS, "--export")
        if "image" not in kv:
            raise OptionError("--export: image=PATH is required (example: --export name=disk,image=disk.qed)")
        fmt = _image_format(kv, "--export")
        image = Path(kv["image"])
        return cls(name=kv.get("name", image.stem), image=image,
                   readonly=_parse_bool(kv.get("readonly", "off"), "--export readonly"), format=fmt)


@dataclass(frozen=True)
class VhostUserBlkOptions:
    """`--vhost-user-blk socket=PATH,image=PATH,format=raw|qed[,readonly=on][,num-queues=N][,id=ID]
    [,logical-block-size=512|4096]` (the guest's logical block size, as qemu-storage-daemon's option)"""

    socket: Path
    image: Path
    format: str = ""
    readonly: bool = False
    num_queues: int = 1  # at most, as qemu-storage-daemon; QEMU's device asks one per vCPU unless told
    id: str = "vub0"
    logical_block_size: int = 512

    KEYS = ("socket", "image", "format", "readonly", "num-queues", "id", "logical-block-size")

    @classmethod
    def parse(cls, text: str) -> VhostUserBlkOptions:
        kv = parse_keyval(text, "--vhost-user-blk")
        _known_keys(kv, cls.KEYS, "--vhost-user-blk")
        if "socket" not in kv or "image" not in kv:
            raise OptionError("--vhost-user-blk: socket=PATH and image=PATH are required (example: "
                              "--vhost-user-blk socket=/tmp/vub.sock,image=disk.qed,format=qed)")
        queues = parse_int(kv.get("num-queues", "1"), "--vhost-user-blk num-queues")
        if not 1 <= queues <= 64:
            raise OptionError(f"--vhost-user-blk num-queues={queues}: 1..64 (QEMU's device asks for one per "
                              "vCPU unless told num-queues=)")
        block = parse_int(kv.get("logical-block-size", "512"), "--vhost-user-blk logical-block-size")
        if block not in (512, 4096):
            raise OptionError(f"--vhost-user-blk logical-block-size={block}: 512 or 4096")
        return cls(socket=Path(kv["socket"]), image=Path(kv["image"]), format=_image_format(kv, "--vhost-user-blk"),
                   readonly=_parse_bool(kv.get("readonly", "off"), "--vhost-user-blk readonly"),
                   num_queues=queues, id=kv.get("id", "") or "vub0", logical_block_size=block)


def parse_tcp(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise OptionError(f"--tcp {text}: HOST:PORT expected (example: --tcp 127.0.0.1:10809)")
    return host or "127.0.0.1", int(port)


@dataclass(frozen=True)
class DimmOptions:
    """`--dimm id=ID,size=SIZE[,node=N][,populated=on|off]` (a DIMM slot and what it holds)."""

    id: str
    size: int
    node: int = 0
    populated: bool = False

    KEYS = ("id", "size", "node", "populated")

    @classmethod
    def parse(cls, text: str) -> DimmOptions:
        kv = parse_keyval(text, "--dimm")
        _known_keys(kv, cls.KEYS, "--dimm")
        if "id" not in kv or "size" not in kv:
            raise OptionError("--dimm: id= and size= are required (example: --dimm id=hot1,size=512M,node=0)")
        size = parse_size(kv["size"], "--dimm size", default_unit="M")
        if size <= 0 or size % (128 << 20):
            raise OptionError(f"--dimm size={kv['size']}: a multiple of 128M (the guest's memory block size)")
        return cls(id=kv["id"], size=size, node=parse_int(kv.get("node", "0"), "--dimm node"),
                   populated=_parse_bool(kv.get("populated", "off"), "--dimm populated"))


@dataclass(frozen=True)
class DeviceOptions:
    """`--device socket=PATH,class=MODULE:CLASS[,id=ID][,KEY=VALUE...]`: a device of your own.

    `class=package.module:ClassName` imports a module; `class=path/to/file.py:ClassName`
    loads a file.  The other keys reach the class's constructor as strings, but
    ``stall=SECONDS`` (default 1): how long one of the device's callbacks may run
    before its stack is logged (qbackend.devices.faults).
    """

    socket: Path
    cls: str
    id: str = ""
    kwargs: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> DeviceOptions:
        kv = parse_keyval(text, "--device")
        if "socket" not in kv or "class" not in kv:
            raise OptionError("--device: socket=PATH and class=MODULE:CLASS are required "
                              "(example: --device socket=/tmp/edu.sock,class=examples/edu.py:Edu)")
        if ":" not in kv["class"]:
            raise OptionError(f"--device class={kv['class']}: MODULE:CLASS or path/to/file.py:CLASS")
        extra = tuple((k, v) for k, v in kv.items() if k not in ("socket", "class", "id"))
        return cls(socket=Path(kv["socket"]), cls=kv["class"], id=kv.get("id", ""), kwargs=extra)


@dataclass(frozen=True)
class DiskOptions:
    """`--disk image=PATH[,format=qed|raw][,readonly=on][,via=nbd|vhost-user]` of `qbackend run`:
    a disk the guest sees as virtio-blk, served by qbackend over NBD (QEMU's NBD client
    under a virtio-blk-pci) or over vhost-user (a vhost-user-blk-pci)."""

    image: Path
    format: str = ""
    readonly: bool = False
    via: str = "nbd"

    KEYS = ("image", "format", "readonly", "via")

    @classmethod
    def parse(cls, text: str) -> DiskOptions:
        kv = parse_keyval(text, "--disk")
        _known_keys(kv, cls.KEYS, "--disk")
        if "image" not in kv:
            raise OptionError("--disk: image=PATH is required (example: --disk image=disk.qed,format=qed)")
        via = kv.get("via", "nbd")
        if via not in ("nbd", "vhost-user"):
            raise OptionError(f"--disk via={via}: nbd or vhost-user")
        return cls(image=Path(kv["image"]), format=_image_format(kv, "--disk"),
                   readonly=_parse_bool(kv.get("readonly", "off"), "--disk readonly"), via=via)


Options = IvshmemOptions | NbdExportOptions | VhostUserBlkOptions | DimmOptions | DeviceOptions


def options_to_json(opts: Options) -> dict[str, object]:
    """Options as JSON values (paths as strings, pairs as lists), for options_from_json."""
    out: dict[str, object] = {}
    for name in opts.__dataclass_fields__:
        value = getattr(opts, name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = [list(pair) for pair in value]
        out[name] = value
    return out


def options_from_json(cls: type[Options], data: dict[str, object]) -> Options:
    """The options options_to_json described (a field of another type: OptionError)."""
    import typing

    hints = typing.get_type_hints(cls)
    values: dict[str, object] = {}
    for name, value in data.items():
        hint = hints.get(name)
        if hint is None:
            raise OptionError(f"{cls.__name__}: no option {name!r}")
        if value is not None and hint in (Path, Path | None):
            value = Path(str(value))
        elif isinstance(value, list):
            value = tuple(tuple(str(x) for x in pair) for pair in value)
        values[name] = value
    try:
        return cls(**values)  # type: ignore[arg-type]
    except TypeError as exc:
        raise OptionError(f"{cls.__name__}: {exc}") from None
