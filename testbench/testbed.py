"""A BLE test bed: a radio, the nodes on it and the application processes on those nodes.

Whatever a :class:`BleTestbed` starts, :meth:`BleTestbed.aclose` stops, whatever happened in
between (the pytest fixtures call it in their teardown). Controllers of a shared radio are leased
to nodes and handed back at the end, so one radio process can serve a whole test session.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from testbench.app_process import AppProcess
from testbench.ble_demo.control import DemoBoxProcess, DemoPhoneProcess, box_argv, phone_argv
from testbench.bluez.emulator import EmulatorSettings
from testbench.bluez.node import BleNode
from testbench.radio.hub import ControllerEndpoint

logger = logging.getLogger(__name__)


class RadioExhaustedError(RuntimeError):
    """Every controller of the radio is leased."""


class ControllerPool:
    """The radio's controllers, lent to nodes (a controller is free again once its node is gone)."""

    def __init__(self, endpoints: Sequence[ControllerEndpoint]) -> None:
        self._free = list(endpoints)

    def take(self, count: int) -> list[ControllerEndpoint]:
        if count > len(self._free):
            raise RadioExhaustedError(f"asked for {count} controllers, {len(self._free)} free")
        taken, self._free = self._free[:count], self._free[count:]
        return taken

    def give_back(self, endpoints: Sequence[ControllerEndpoint]) -> None:
        self._free.extend(endpoints)


class BleTestbed:
    """Nodes and application processes for one test (see the module docstring)."""

    def __init__(
        self, pool: ControllerPool, *, log_dir: Path, settings: EmulatorSettings | None = None
    ) -> None:
        self._pool = pool
        self.log_dir = log_dir
        self.settings = settings or EmulatorSettings()
        self._nodes: list[BleNode] = []
        self._leases: list[ControllerEndpoint] = []
        self._processes: list[AppProcess] = []
        self._counter = itertools.count(1)

    # ------------------------------------------------------------------ nodes

    async def start_node(
        self, *, adapters: int = 1, settings: EmulatorSettings | None = None, name: str = "node"
    ) -> BleNode:
        """A node with ``adapters`` adapters (hci0, hci1...) on fresh controllers of the radio."""
        controllers = self._pool.take(adapters)
        self._leases.extend(controllers)
        return await self._start_node(controllers, settings, name)

    async def restart_node(self, node: BleNode, *, name: str = "node") -> BleNode:
        """A new node on the same controllers (same addresses) after ``node`` was killed or stopped."""
        if node.alive:
            await asyncio.to_thread(node.stop)
        return await self._start_node(node.controllers, node.settings, name)

    async def _start_node(
        self, controllers: Sequence[ControllerEndpoint], settings: EmulatorSettings | None, name: str
    ) -> BleNode:
        label = f"{name}-{next(self._counter)}"
        node = await asyncio.to_thread(
            BleNode.start,
            controllers,
            settings=settings or self.settings,
            log_path=self.log_dir / f"{label}.log",
            name=label,
        )
        self._nodes.append(node)
        return node

    async def kill_node(self, node: BleNode) -> None:
        """Power cut: the emulator and the dbus-daemon of ``node`` die at once."""
        await asyncio.to_thread(node.kill)

    # ------------------------------------------------------------------ applications

    async def spawn(
        self, node: BleNode, argv: Sequence[str], *, name: str, env: Mapping[str, str] | None = None
    ) -> AppProcess:
        """Run ``argv`` as an application on ``node`` (with its DBUS_SYSTEM_BUS_ADDRESS)."""
        label = f"{name}-{next(self._counter)}"
        process = await AppProcess.start(
            argv, name=label, env=node.env(env), log_path=self.log_dir / f"{label}.log"
        )
        self._processes.append(process)
        return process

    async def start_demo_box(
        self, node: BleNode, name: str, *, adapter: str = "hci0", quiet: bool = False
    ) -> DemoBoxProcess:
        process = await self.spawn(node, box_argv(name, adapter=adapter, quiet=quiet), name=f"box-{name}")
        return await DemoBoxProcess.attach(process)

    async def start_demo_phone(
        self, node: BleNode, *, adapter: str = "hci0", name: str = "phone"
    ) -> DemoPhoneProcess:
        process = await self.spawn(node, phone_argv(adapter=adapter), name=name)
        return await DemoPhoneProcess.attach(process)

    # ------------------------------------------------------------------ teardown

    async def aclose(self) -> None:
        """Kill every application, stop every node, hand the controllers back."""
        await asyncio.gather(*(process.stop() for process in self._processes), return_exceptions=True)
        self._processes.clear()
        for node in self._nodes:
            try:
                await asyncio.to_thread(node.stop)
            except Exception:
                logger.exception("could not stop %s", node.log_path)
        self._nodes.clear()
        self._pool.give_back(self._leases)
        self._leases.clear()
