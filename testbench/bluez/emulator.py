"""The org.bluez emulator: one bus connection, one adapter per controller of the radio."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dbus_fast import Message, MessageType, RequestNameReply
from dbus_fast.aio import MessageBus

from testbench.bluez.adapter import Adapter
from testbench.bluez.dbus_service import ObjectTree
from testbench.radio.hub import ControllerEndpoint

logger = logging.getLogger(__name__)

BLUEZ_SERVICE = "org.bluez"


@dataclass(frozen=True, slots=True, kw_only=True)
class EmulatorSettings:
    """Knobs that real BlueZ takes from main.conf, the kernel or the controller."""

    att_mtu: int = 247
    """ATT MTU both roles offer (a controller with LE Data Length Extension)."""
    advertising_interval_ms: float = 20.0
    """Every advertisement uses this interval (BlueZ ignores the experimental Min/MaxInterval)."""
    connect_timeout_s: float = 20.0
    """How long Device1.Connect waits for the peripheral (the kernel's LE connection timeout)."""
    disconnect_delay_s: float = 0.0
    """Delay before Device1.Disconnect drops the link (BlueZ's DISCONNECT_TIMER is 2 s)."""
    temporary_device_timeout_s: float = 30.0
    """How long an unconnected device outlives the discovery that found it (TemporaryTimeout)."""
    max_advertisements: int = 5
    adapter_name: str = "powerbox-testbench"

    def __post_init__(self) -> None:
        if not 23 <= self.att_mtu <= 517:
            raise ValueError("att_mtu must be between 23 and 517")
        if self.advertising_interval_ms < 20:
            raise ValueError("advertising_interval_ms must be at least 20")
        if self.connect_timeout_s <= 0 or self.disconnect_delay_s < 0 or self.temporary_device_timeout_s < 0:
            raise ValueError("timeouts must be positive")
        if not 1 <= self.max_advertisements <= 255:
            raise ValueError("max_advertisements must be between 1 and 255")


class NameWatcher:
    """Tells interested parties when a D-Bus client leaves the bus (BlueZ's disconnect watches)."""

    def __init__(self, tree: ObjectTree) -> None:
        self._tree = tree
        self._callbacks: dict[str, dict[int, Callable[[], None]]] = {}
        self._next_id = 0
        tree.add_signal_handler(self._on_signal)

    async def start(self) -> None:
        reply = await self._tree.bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="AddMatch",
                signature="s",
                body=[
                    "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
                    "member='NameOwnerChanged'"
                ],
            )
        )
        if reply is None or reply.message_type != MessageType.METHOD_RETURN:
            raise RuntimeError("cannot watch NameOwnerChanged on the bus")

    def watch(self, name: str, on_gone: Callable[[], None]) -> Callable[[], None]:
        """Call ``on_gone`` once ``name`` leaves the bus; returns a function that stops watching."""
        self._next_id += 1
        watch_id = self._next_id
        self._callbacks.setdefault(name, {})[watch_id] = on_gone

        def unwatch() -> None:
            callbacks = self._callbacks.get(name)
            if callbacks is not None:
                callbacks.pop(watch_id, None)
                if not callbacks:
                    del self._callbacks[name]

        # The client may have left before the watch existed.
        self._tree.run_soon(self._check_still_there(name), what=f"check {name}")
        return unwatch

    async def _check_still_there(self, name: str) -> None:
        reply = await self._tree.bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="NameHasOwner",
                signature="s",
                body=[name],
            )
        )
        if reply is not None and reply.message_type == MessageType.METHOD_RETURN and not reply.body[0]:
            self._gone(name)

    def _on_signal(self, message: Message) -> None:
        if (
            message.member == "NameOwnerChanged"
            and message.sender == "org.freedesktop.DBus"
            and message.signature == "sss"
            and not message.body[2]
        ):
            self._gone(message.body[0])

    def _gone(self, name: str) -> None:
        for callback in list(self._callbacks.pop(name, {}).values()):
            try:
                callback()
            except Exception:
                logger.exception("clean-up after %s left the bus failed", name)


class Emulator:
    """Owns ``org.bluez`` on a bus and serves one adapter per controller endpoint."""

    def __init__(
        self,
        *,
        bus_address: str,
        controllers: Sequence[ControllerEndpoint],
        settings: EmulatorSettings | None = None,
    ) -> None:
        if not controllers:
            raise ValueError("the emulator needs at least one controller")
        self._bus_address = bus_address
        self._controllers = tuple(controllers)
        self.settings = settings or EmulatorSettings()
        self.adapters: list[Adapter] = []
        self._bus: MessageBus | None = None
        self._tree: ObjectTree | None = None

    async def start(self) -> None:
        bus = await MessageBus(bus_address=self._bus_address, negotiate_unix_fd=True).connect()
        self._bus = bus
        tree = ObjectTree(bus)
        self._tree = tree
        names = NameWatcher(tree)
        await names.start()
        for index, endpoint in enumerate(self._controllers):
            adapter = Adapter(index=index, endpoint=endpoint, settings=self.settings, tree=tree, names=names)
            await adapter.start()
            self.adapters.append(adapter)
        reply = await bus.request_name(BLUEZ_SERVICE)
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            raise RuntimeError(f"{BLUEZ_SERVICE} is already owned on this bus ({reply.name})")

    async def wait_closed(self) -> str:
        """Wait until the bus or a controller link goes away; return what happened."""
        assert self._bus is not None
        waits: dict[asyncio.Future[object], str] = {
            asyncio.ensure_future(self._bus.wait_for_disconnect()): "the D-Bus connection closed"  # type: ignore[no-untyped-call]
        }
        for adapter in self.adapters:
            waits[asyncio.ensure_future(adapter.link_lost)] = f"{adapter.name} lost its controller"
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            return waits[next(iter(done))]
        finally:
            for future in waits:
                if future.done():
                    if not future.cancelled():
                        future.exception()  # retrieved: a closed bus ends with EOFError
                else:
                    future.cancel()

    async def close(self) -> None:
        if self._tree is not None:
            self._tree.closing = True
        # Requests still in flight when the links close are expected to fail now: bumble
        # reports each one at error level, which would only bury real problems in the log.
        logging.getLogger("bumble").setLevel(logging.CRITICAL)
        for adapter in self.adapters:
            adapter.close()
        if self._tree is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._tree.close(), 1.0)
        if self._bus is not None:
            self._bus.disconnect()
