"""A BLE node: a private dbus-daemon plus the org.bluez emulator on one or more radio controllers.

The node runs as one child process (``python -m testbench.bluez node``) that starts its
dbus-daemon first, then the emulator, then prints a JSON ready line with the bus address and its
adapters. Applications (bless, bleak) on the node only need ``DBUS_SYSTEM_BUS_ADDRESS`` from
:meth:`BleNode.env`. Killing the node's process group is a power cut: the emulator and its
dbus-daemon go at once, the radio tears the controllers down and peers see their links drop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbench._process import ChildHandle, ManagedProcess, print_ready, python_module_argv, watch_lifeline
from testbench.bluez.dbus_daemon import PrivateBus
from testbench.bluez.device import address_text
from testbench.bluez.emulator import Emulator, EmulatorSettings
from testbench.radio.hub import ControllerEndpoint

logger = logging.getLogger(__name__)

BUS_ADDRESS_VARIABLE = "DBUS_SYSTEM_BUS_ADDRESS"


@dataclass(frozen=True, slots=True, kw_only=True)
class AdapterInfo:
    """One adapter of a node, as applications address it."""

    name: str
    """``hci0``, ``hci1``...: bless's ``adapter=`` and bleak's ``bluez={"adapter": ...}``."""
    path: str
    address: str
    controller: ControllerEndpoint


class BleNode(ChildHandle):
    """A running node child process (see the module docstring); `stop()` shuts it down cleanly,
    `kill()` is a power cut: the emulator and its dbus-daemon die at once."""

    def __init__(
        self,
        process: ManagedProcess,
        *,
        bus_address: str,
        adapters: tuple[AdapterInfo, ...],
        dbus_daemon_pid: int,
        work_dir: Path,
        settings: EmulatorSettings,
    ) -> None:
        super().__init__(process, scratch_dir=work_dir)
        self.bus_address = bus_address
        self.adapters = adapters
        self.dbus_daemon_pid = dbus_daemon_pid
        self.work_dir = work_dir
        self.settings = settings

    @classmethod
    def start(
        cls,
        controllers: Sequence[ControllerEndpoint],
        *,
        settings: EmulatorSettings | None = None,
        log_path: Path | None = None,
        name: str = "node",
        ready_timeout: float = 30.0,
    ) -> BleNode:
        """Start a node with one adapter per controller (hci0 on the first)."""
        if not controllers:
            raise ValueError("a node needs at least one controller")
        settings = settings or EmulatorSettings()
        work_dir = Path(tempfile.mkdtemp(prefix="powerbox-node-"))
        argv = python_module_argv(
            "testbench.bluez",
            "node",
            *(arg for endpoint in controllers for arg in ("--controller", endpoint.spec)),
            *settings_arguments(settings),
            "--work-dir", str(work_dir),
            "--json",
            "--exit-on-stdin-eof",
            "-v",
        )  # fmt: skip
        try:
            process, ready = ManagedProcess.spawn(
                argv, name=name, log_path=log_path or work_dir / "node.log", ready_timeout=ready_timeout
            )
        except BaseException:
            shutil.rmtree(work_dir, ignore_errors=True)
            raise
        adapters = tuple(
            AdapterInfo(
                name=str(entry["name"]),
                path=str(entry["path"]),
                address=str(entry["address"]),
                controller=ControllerEndpoint.parse(str(entry["controller"])),
            )
            for entry in ready["adapters"]
        )
        return cls(
            process,
            bus_address=str(ready["bus_address"]),
            adapters=adapters,
            dbus_daemon_pid=int(ready["dbus_daemon_pid"]),
            work_dir=work_dir,
            settings=settings,
        )

    @property
    def controllers(self) -> tuple[ControllerEndpoint, ...]:
        return tuple(adapter.controller for adapter in self.adapters)

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment a bless or bleak process on this node needs."""
        env = dict(os.environ if base is None else base)
        env[BUS_ADDRESS_VARIABLE] = self.bus_address
        return env


def settings_arguments(settings: EmulatorSettings) -> list[str]:
    return [
        "--att-mtu", str(settings.att_mtu),
        "--advertising-interval", repr(settings.advertising_interval_ms),
        "--connect-timeout", repr(settings.connect_timeout_s),
        "--disconnect-delay", repr(settings.disconnect_delay_s),
        "--temporary-device-timeout", repr(settings.temporary_device_timeout_s),
        "--max-advertisements", str(settings.max_advertisements),
        "--adapter-name", settings.adapter_name,
    ]  # fmt: skip


# ---------------------------------------------------------------------- the node process itself


def run_node(
    controllers: Sequence[ControllerEndpoint],
    *,
    settings: EmulatorSettings,
    work_dir: Path | None,
    json_ready: bool,
    exit_on_stdin_eof: bool,
) -> int:
    """Main of the node process: dbus-daemon, emulator, wait for a signal; returns an exit status."""
    own_work_dir = work_dir is None
    directory = Path(tempfile.mkdtemp(prefix="powerbox-node-")) if work_dir is None else work_dir
    directory.mkdir(parents=True, exist_ok=True)
    bus = PrivateBus(directory)
    try:
        # Before any thread exists: the daemon is started with a parent-death signal.
        running = bus.start()
        return asyncio.run(
            _serve(running.address, running.pid, controllers, settings, json_ready, exit_on_stdin_eof)
        )
    finally:
        bus.stop()
        if own_work_dir:
            shutil.rmtree(directory, ignore_errors=True)


async def _serve(
    bus_address: str,
    dbus_daemon_pid: int,
    controllers: Sequence[ControllerEndpoint],
    settings: EmulatorSettings,
    json_ready: bool,
    exit_on_stdin_eof: bool,
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if exit_on_stdin_eof:
        watch_lifeline(lambda: loop.call_soon_threadsafe(stop.set))
    emulator = Emulator(bus_address=bus_address, controllers=controllers, settings=settings)
    try:
        await emulator.start()
    except Exception as error:
        logger.error("the emulator did not start: %s", error)
        await emulator.close()
        return 1
    adapters: list[dict[str, Any]] = [
        {
            "name": adapter.name,
            "path": adapter.path,
            "address": address_text(adapter.address),
            "controller": adapter.endpoint.spec,
        }
        for adapter in emulator.adapters
    ]
    ready = {"bus_address": bus_address, "dbus_daemon_pid": dbus_daemon_pid, "adapters": adapters}
    if json_ready:
        print_ready(ready)
    else:
        print(f"export {BUS_ADDRESS_VARIABLE}='{bus_address}'", flush=True)
        for entry in adapters:
            print(f"# {entry['name']} {entry['address']} on controller {entry['controller']}", flush=True)
    closed = asyncio.ensure_future(emulator.wait_closed())
    stopped = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({closed, stopped}, return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if closed in done:
        logger.error("node stopping: %s", closed.result())
        status = 1
    else:
        closed.cancel()
    stopped.cancel()
    await emulator.close()
    sys.stdout.flush()
    return status
