"""What one qbackend process serves: its devices, their sockets, their
peer groups, its NBD exports and its links to QEMU.  `Backend` runs under
trio; `qbackend.app.backend_thread.BackendThread` runs one in a thread of
its own so that synchronous code (pytest, scripts) can drive it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import trio

from qbackend.app.block_exports import BlockExports, BlockNode
from qbackend.block.exports import probe_format
from qbackend.devices.api import Device, function_of
from qbackend.devices.hotplug_controller import HotplugController
from qbackend.devices.ivshmem import IvshmemDevice
from qbackend.errors import ConfigError, QbackendError
from qbackend.ivshmem.group import PeerGroup
from qbackend.ivshmem.server import add_server as add_ivshmem_server
from qbackend.machine.dimm_slots import Dimm, DimmManager
from qbackend.machine.hold import ChangeHold
from qbackend.machine.pci_slots import PciSlotManager, SlotDevice
from qbackend.machine.qmp import QmpConnection, QmpError
from qbackend.machine.qmp_replies import Event, QmpReplyError
from qbackend.models.memhp import Effect, EjectRequested, MemoryHotplugBlock, Profile
from qbackend.models.pcihp import EjectSlot
from qbackend.options import DeviceOptions, DimmOptions, IvshmemOptions, NbdExportOptions, VhostUserBlkOptions
from qbackend.plumbing.shared_memory import SharedMemory
from qbackend.plumbing.threads import run_locked
from qbackend.servers.nbd import NbdServer
from qbackend.servers.qmp_monitor import QmpMonitor
from qbackend.servers.vfio_user import VfioUserServer
from qbackend.vfio.function import PciFunction

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ServedDevice:
    id: str
    device: PciFunction
    server: VfioUserServer
    scope: trio.CancelScope | None = None  # set while its server runs; cancel to stop it
    created_by_pci_add: bool = False  # a `qbackend pci add` device: freed again on removal
    # What it was made from, so that a new process can make it again (qbackend.app.upgrade).
    options: IvshmemOptions | DeviceOptions | None = None


@dataclass
class Backend:
    devices: dict[str, ServedDevice] = field(default_factory=dict)
    groups: dict[str, PeerGroup] = field(default_factory=dict)
    blocks: BlockExports = field(default_factory=BlockExports)
    nbd_listen: tuple[Path | None, tuple[str, int] | None] | None = None  # where the NBD server listens at start
    controller: ServedDevice | None = None
    dimms: DimmManager | None = None
    qmp_path: Path | None = None
    qmp: QmpConnection | None = None
    qemu_gone: str | None = None  # once the QEMU followed has gone: what the hotplug commands say
    reconcile_interval: float = 0.5
    handshake_timeout: float = 10.0  # seconds a vfio-user or NBD client has for its handshake
    monitor: QmpMonitor | None = None
    pci: PciSlotManager | None = None
    # Whether this process may hand itself over to a new one and exit (qbackend.app.upgrade):
    # only a `qbackend serve` process of its own, never a backend inside another program.
    upgradable: bool = False
    # Changes of the hotplug slots (QMP events, reconciling, hot-add and -remove, the guest's
    # ejects), held off while an upgrade pauses the backend (qbackend.machine.hold).
    hold: ChangeHold = field(default_factory=ChangeHold)
    # Ejects the guest wrote into the controller, from the moment they are written until
    # they are begun; an upgrade hands those not begun yet to the new process.
    guest_ejects: list[EjectRequested | EjectSlot] = field(default_factory=list)
    _nursery: trio.Nursery | None = None
    _token: trio.lowlevel.TrioToken | None = None
    _scope: trio.CancelScope | None = None
    _unnamed: Iterator[int] = field(default_factory=itertools.count)  # names of groups without shm=

    @property
    def nbd(self) -> NbdServer | None:
        """The NBD server, while it runs."""
        return self.blocks.server

    def group(self, shm: str | None, size: int) -> PeerGroup:
        """The peer group of a shm name; each unnamed device gets its own."""
        key = shm or f"memfd-{next(self._unnamed)}"
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = PeerGroup(SharedMemory(size, shm), name=key)
            if self.monitor is not None:
                from qbackend.app.commands.ivshmem import watch_group

                watch_group(self.monitor, group)
            if self._nursery is not None:
                self._nursery.start_soon(group.serve)
        elif group.memory.size != size:
            raise ConfigError(f"shm={shm} is {group.memory.size} bytes in another device; this one asks {size}")
        return group

    def add_ivshmem(self, opts: IvshmemOptions, *, start: bool = True) -> ServedDevice:
        dev_id = opts.id or f"ivshmem{len(self.devices)}"
        if dev_id in self.devices:
            raise ConfigError(f"device id {dev_id!r} is used twice; give each device its own id=")
        group = self.group(opts.shm, opts.size)
        if opts.server is not None:
            add_ivshmem_server(group, opts.server, max(opts.vectors, 1))
        device = IvshmemDevice(group, vectors=opts.vectors, position=opts.peer, name=dev_id)
        served = ServedDevice(dev_id, device, VfioUserServer(device, opts.socket, name=dev_id,
                                                             handshake_timeout=self.handshake_timeout),
                              options=opts)
        self.devices[dev_id] = served
        if start and self._nursery is not None:
            self._nursery.start_soon(self._serve_device, served)
        return served

    def add_device(self, opts: DeviceOptions, *, start: bool = True) -> ServedDevice:
        """A device of the user's own class (`--device socket=...,class=...`)."""
        from qbackend.app.device_loader import make_device

        device = make_device(opts)
        try:
            # The Device itself: its class names it when no id= is given (edu0, not userfunction0).
            served = self.add_served(device, opts.socket, dev_id=opts.id, start=False)
        except BaseException:
            function_of(device).close()
            raise
        served.options = opts
        if start and self._nursery is not None:
            self._nursery.start_soon(self._serve_device, served)
        return served

    def add_served(self, device: Device | PciFunction, socket_path: Path, *, dev_id: str = "",
                   start: bool = True) -> ServedDevice:
        """Serve a device object (a `qbackend.devices.Device`, or a PciFunction) on a
        vfio-user socket; for a Device, the ServedDevice's `device` is its UserFunction."""
        dev_id = dev_id or f"{type(device).__name__.lower()}{len(self.devices)}"
        function = function_of(device) if isinstance(device, Device) else device
        if dev_id in self.devices:
            raise ConfigError(f"device id {dev_id!r} is used twice; give each device its own id=")
        function.name = dev_id
        served = ServedDevice(dev_id, function, VfioUserServer(function, socket_path, name=dev_id,
                                                               handshake_timeout=self.handshake_timeout))
        self.devices[dev_id] = served
        if start and self._nursery is not None:
            self._nursery.start_soon(self._serve_device, served)
        return served

    def add_nbd(self, exports: list[NbdExportOptions], socket_path: Path | None,
                tcp: tuple[str, int] | None = None) -> None:
        """The NBD server of this process and its exports, opened now and
        served from run(); each export is also a block node of its name."""
        if self.nbd_listen is not None:
            raise ConfigError("one NBD server per process: give all --nbd exports together")
        try:
            for opts in exports:
                if opts.name in self.blocks.nodes:
                    raise ConfigError(f"NBD export name {opts.name!r} is used twice")
                fmt = opts.format or probe_format(opts)
                self.blocks.nodes[opts.name] = BlockNode(opts.name, fmt, opts.image, opts.readonly)
                self.blocks.add_at_start(opts.name, opts.name, opts.name, writable=not opts.readonly)
        except BaseException:
            self.blocks.close_pending()
            raise
        self.nbd_listen = (socket_path, tcp)

    def add_vhost_user_blk(self, opts: VhostUserBlkOptions) -> None:
        """A disk for QEMU's vhost-user-blk-pci: a block node and its export, both named opts.id."""
        if opts.id in self.blocks.nodes:
            raise ConfigError(f"block node {opts.id!r} is used twice (an NBD export or a vhost-user-blk disk "
                              "has that name)")
        fmt = opts.format or probe_format(NbdExportOptions(opts.id, opts.image, opts.readonly, opts.format))
        self.blocks.nodes[opts.id] = BlockNode(opts.id, fmt, opts.image, opts.readonly)
        self.blocks.add_vhost_user_blk(opts.id, opts.id, opts.socket, not opts.readonly, opts.num_queues,
                                       handshake_timeout=self.handshake_timeout,
                                       logical_block_size=opts.logical_block_size)

    async def start_nbd(self, socket_path: Path | None, tcp: tuple[str, int] | None, *,
                        max_connections: int | None = None, tls_creds: str | None = None,
                        handshake_timeout: float | None = None) -> NbdServer:
        """nbd-server-start: the NBD server, listening now (BlockExports.start_server)."""
        if self._nursery is None:
            raise ConfigError("nbd-server-start: the backend is not running")
        return await self.blocks.start_server(self._nursery, socket_path, tcp, max_connections=max_connections,
                                              tls_creds=tls_creds, handshake_timeout=handshake_timeout)

    def add_hotplug_controller(self, socket_path: Path, dimms: list[DimmOptions], *, machine: str,
                               ram_size: int, slots: int, profile: Profile = Profile.QEMU,
                               dev_id: str = "hotplug") -> ServedDevice:
        """The hotplug controller and the DIMM slots it shows; QMP comes with attach_qmp()."""
        if self.controller is not None:
            raise ConfigError(f"hotplug controller {dev_id!r}: one hotplug controller per process")
        block = MemoryHotplugBlock(slots, profile)
        controller = HotplugController(block, on_effect=self._controller_effect)
        self.dimms = DimmManager(dimms, machine=machine, ram_size=ram_size, slots=slots, block=block,
                                 lock=controller.lock, on_change=self._controller_changed,
                                 on_outcome=self._dimm_outcome, hold=self.hold)
        served = ServedDevice(dev_id, controller, VfioUserServer(controller, socket_path, name=dev_id,
                                                                 handshake_timeout=self.handshake_timeout))
        self.devices[dev_id] = served
        self.controller = served
        return served

    def enable_control(self, path: Path) -> QmpMonitor:
        """The QMP monitor of this process (`--control PATH`); quit stops run()."""
        from qbackend.app.commands import register_all
        from qbackend.app.commands.ivshmem import watch_group

        self.monitor = QmpMonitor(path, on_quit=self.request_stop)
        register_all(self.monitor, self)
        self.blocks.emit = self.monitor.emit
        for group in self.groups.values():
            watch_group(self.monitor, group)
        return self.monitor

    def request_stop(self) -> None:
        """End run() as Ctrl-C would: devices stopped, exports flushed, sockets removed."""
        if self._scope is not None:
            self._scope.cancel()

    def _emit(self, name: str, data: dict[str, object]) -> None:
        if self.monitor is not None:
            self.monitor.emit(name, data)

    def _dimm_outcome(self, d: Dimm) -> None:
        from qbackend.app.commands.memory import dimm_event

        self._emit(*dimm_event(d))

    def _pci_plugged(self, dev: SlotDevice) -> None:
        self._emit("PCI_DEVICE_PLUGGED", {"id": dev.qdev_id, "slot": dev.slot})

    def _pci_unplugged(self, dev: SlotDevice) -> None:
        self._emit("PCI_DEVICE_UNPLUGGED", {"id": dev.qdev_id, "slot": dev.slot})
        # A device of `pci add` is freed once QEMU has deleted it (PciSlotManager reports a
        # device gone only then), whether its DEVICE_DELETED was seen or not: it may have
        # come while an upgrade's new process was not connected.
        served = self.devices.get(dev.qdev_id)
        if served is not None and served.created_by_pci_add:
            self._free_device(served)

    def attach_qmp(self, path: Path) -> None:
        """Follow (and drive) the QEMU whose QMP monitor is at `path`."""
        self.qmp_path = path
        if self._nursery is not None:
            self._nursery.start_soon(self._qmp_task)

    def _controller_changed(self) -> None:
        """The slots changed: the controller's interrupt follows, in a worker (its lock is the device's)."""
        if self.controller is not None and self._nursery is not None:
            self.hold.claim()  # part of the change: an upgrade's pause waits for it
            self._nursery.start_soon(self._update_controller_interrupt)

    async def _update_controller_interrupt(self) -> None:
        try:
            if self.controller is not None:
                controller = self.controller.device
                assert isinstance(controller, HotplugController)
                await run_locked(controller.lock, controller.update_interrupt)
        finally:
            self.hold.release()

    def _controller_effect(self, effect: Effect | EjectSlot) -> None:
        """A guest write to the controller asked for something; runs in the
        device's connection thread (under the device's lock), so the work is handed to trio."""
        if not (self._token and self._nursery):
            return
        if isinstance(effect, (EjectRequested, EjectSlot)) and effect.device_id:
            self.guest_ejects.append(effect)
            self._token.run_sync_soon(self._start_eject, effect)

    def _start_eject(self, effect: EjectRequested | EjectSlot) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._eject, effect)

    async def _eject(self, effect: EjectRequested | EjectSlot) -> None:
        """Carry out an eject the guest wrote: device_del, then follow it to its end."""
        device_id = effect.device_id
        assert device_id is not None
        try:
            async with self.hold.change():  # while an upgrade pauses, it waits (and may go to the new process)
                if effect not in self.guest_ejects:
                    return  # begun already
                self.guest_ejects.remove(effect)
                if isinstance(effect, EjectSlot):
                    if self.pci is None:
                        return
                    await self.pci.request_remove(device_id)
                    dimm = None
                elif self.dimms is not None and device_id in self.dimms.dimms:
                    dimm = await self.dimms.request_removal(device_id)
                else:
                    if self.qmp is not None:
                        await self.qmp.execute("device_del", {"id": device_id})
                    return
            if dimm is not None:
                assert self.dimms is not None
                outcome = await self.dimms.wait_removal(dimm)
                log.info("eject of %s written by the guest: %s", device_id, outcome.value)
            else:
                assert self.pci is not None
                if await self.pci.wait_removed(device_id):
                    async with self.hold.change():
                        await self._free_pci_added(device_id)
        except (QbackendError, ValueError) as exc:
            log.warning("eject of %s written by the guest failed: %s", device_id, exc)

    async def qemu_version(self) -> tuple[int, int, int]:
        """The version of the QEMU followed (QMP query-version)."""
        if self.qmp is None:
            raise QmpError(self.qemu_gone or "not connected to QEMU's QMP monitor")
        reply = await self.qmp.execute("query-version")
        try:
            qemu = reply["qemu"]
            return int(qemu["major"]), int(qemu["minor"]), int(qemu["micro"])
        except (KeyError, TypeError, ValueError):
            raise QmpReplyError(f"query-version: not a version: {reply!r}") from None

    async def _qmp_task(self) -> None:
        assert self.qmp_path is not None
        self.qemu_gone = None
        try:
            qmp = self.qmp = await QmpConnection.open(self.qmp_path, timeout=30)
        except QmpError as exc:
            log.error("cannot reach QEMU's QMP monitor at %s: %s", self.qmp_path, exc)
            self.qemu_gone = f"QEMU is not reachable: its QMP monitor {self.qmp_path} did not answer"
            return
        try:
            async with self.hold.change():
                if self.dimms is not None:
                    await self.dimms.attach(qmp, plug_populated=True)
                if self.pci is not None:
                    await self.pci.attach(qmp)
            for effect in list(self.guest_ejects):  # handed over by the old process of an upgrade
                assert self._nursery is not None
                self._nursery.start_soon(self._eject, effect)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._qmp_events, qmp, nursery.cancel_scope)
                nursery.start_soon(self._reconcile_loop)
        except QmpError as exc:
            log.warning("QMP connection to %s ended: %s", self.qmp_path, exc)
        finally:
            self.qmp = None
            self.qemu_gone = f"QEMU is gone: its QMP monitor {self.qmp_path} closed"
            with trio.CancelScope(shield=True):
                await qmp.close()

    async def _qmp_events(self, qmp: QmpConnection, scope: trio.CancelScope) -> None:
        """Hand QMP events to the slot manager until QEMU goes away."""
        try:
            async with aclosing(qmp.events()) as events:  # closed at once on cancel, not by the GC
                async for raw in events:
                    try:
                        event = Event.parse(raw)
                        async with self.hold.change():  # held while an upgrade pauses
                            if self.dimms is not None:
                                await self.dimms.handle_event(event)
                            if self.pci is not None:
                                await self.pci.handle_event(event)
                                if event.name == "DEVICE_DELETED":
                                    await self._free_pci_added(event.data.string("device", "") or None)
                    except QmpReplyError as exc:  # QEMU said something it does not document: skip it
                        log.error("QMP event not understood (ignored): %s", exc)
        except QmpError as exc:
            log.info("QMP: %s", exc)
        scope.cancel()

    async def _reconcile_loop(self) -> None:
        # Events say most of it; polling catches what has no event (a
        # device_add typed on another monitor, before the guest answers).
        try:
            while self.dimms is not None or self.pci is not None:
                await trio.sleep(self.reconcile_interval)
                try:
                    async with self.hold.change():  # held while an upgrade pauses
                        if self.dimms is not None:
                            await self.dimms.reconcile()
                        if self.pci is not None:
                            await self.pci.reconcile()
                except QmpReplyError as exc:  # try again next time; the slots keep their last state
                    log.error("QMP reply not understood: %s", exc)
        except QmpError as exc:
            log.info("QMP: %s", exc)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve every device until cancelled; started() once all listen."""
        try:
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self._token = trio.lowlevel.current_trio_token()
                    for served in self.devices.values():
                        await nursery.start(self._serve_device, served)
                    if self.nbd_listen is not None:
                        await self.blocks.start_server(nursery, *self.nbd_listen)
                    await self.blocks.start_vhost(nursery)
                    for group in self.groups.values():
                        await nursery.start(group.serve)
                    if self.monitor is not None:
                        await nursery.start(self.monitor.serve)
                    if self.qmp_path is not None:
                        nursery.start_soon(self._qmp_task)
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            self._nursery = None
            self._scope = None
            self.close()

    async def _serve_device(self, served: ServedDevice,
                            task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            served.scope = scope
            await served.server.serve(task_status=task_status)

    # -- PCI hotplug ------------------------------------------------------------------

    def add_pci_slots(self, bus_id: str | None = None) -> PciSlotManager:
        """Keep the controller's PCI-hotplug block true to QEMU's hotplug bus
        (None: the root bus, as on pc; q35: the root port's id)."""
        if self.controller is None:
            raise ConfigError("PCI slots are shown by the hotplug controller: add it first")
        controller = self.controller.device
        assert isinstance(controller, HotplugController)
        self.pci = PciSlotManager(controller.pcihp, controller.lock, bus_id=bus_id,
                                  on_change=self._controller_changed, on_plugged=self._pci_plugged,
                                  on_unplugged=self._pci_unplugged, hold=self.hold)
        return self.pci

    async def pci_add_ivshmem(self, opts: IvshmemOptions, qdev_id: str | None = None) -> ServedDevice:
        """A new ivshmem device: its socket first, then device_add vfio-user-pci."""
        if self.pci is None or self._nursery is None:
            raise ConfigError(f"ivshmem {opts.id or opts.socket}: PCI hotplug needs the hotplug controller, "
                              "add_pci_slots() and a running backend")
        async with self.hold.change(refuse=True):
            return await self._pci_add(self.add_ivshmem(opts, start=False), qdev_id)

    async def pci_add_device(self, opts: DeviceOptions, qdev_id: str | None = None) -> ServedDevice:
        """A device of the user's own class, hot-plugged: its socket first, then device_add."""
        if self.pci is None or self._nursery is None:
            raise ConfigError(f"device {opts.id or opts.cls}: PCI hotplug needs the hotplug controller, "
                              "add_pci_slots() and a running backend")
        async with self.hold.change(refuse=True):
            return await self._pci_add(self.add_device(opts, start=False), qdev_id)

    async def _pci_add(self, served: ServedDevice, qdev_id: str | None) -> ServedDevice:
        assert self.pci is not None and self._nursery is not None
        served.created_by_pci_add = True
        try:
            await self._nursery.start(self._serve_device, served)  # listening before QEMU connects
        except BaseException:
            self._free_device(served)  # its socket could not be made: nothing of it stays
            raise
        try:
            await self.pci.add({"driver": "vfio-user-pci", "id": qdev_id or served.id,
                                "socket": {"type": "unix", "path": str(served.server.socket_path)}})
        except (QmpError, ValueError):
            self._free_device(served)
            raise
        return served

    async def pci_del(self, qdev_id: str, timeout: float = 30.0) -> bool:
        """device_del, and wait until the guest has ejected it; True when gone."""
        if self.pci is None:
            raise ConfigError(f"{qdev_id}: no PCI hotplug slots in this backend")
        gone = await self.pci.remove(qdev_id, timeout)
        if gone:
            async with self.hold.change():
                await self._free_pci_added(qdev_id)
        return gone

    async def _free_pci_added(self, qdev_id: str | None) -> None:
        served = self.devices.get(qdev_id or "")
        if served is not None and served.created_by_pci_add:
            self._free_device(served)

    def _free_device(self, served: ServedDevice) -> None:
        """Stop serving a device and release it (socket, fds, its peer id), and
        its peer group with it when nothing else uses the group."""
        self.devices.pop(served.id, None)
        if served.scope is not None:
            served.scope.cancel()
        served.device.close()
        group = getattr(served.device, "group", None)
        if isinstance(group, PeerGroup):
            self._release_group(group)

    def _release_group(self, group: PeerGroup) -> None:
        """Close a group (memory unmapped, memfd closed, watcher stopped) once
        no device, ivshmem-server socket or peer uses it.  A /dev/shm file
        given by name stays: host programs may still open it by that name."""
        if group.endpoints or group.peers:
            return
        if any(getattr(s.device, "group", None) is group for s in self.devices.values()):
            return
        for key, g in list(self.groups.items()):
            if g is group:
                del self.groups[key]
        group.close()

    def close(self) -> None:
        self.blocks.close_pending()
        for served in self.devices.values():
            served.device.close()
        for group in self.groups.values():
            group.close()
        self.groups.clear()
