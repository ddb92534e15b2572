"""The virtual radio: N linked controllers, each served as HCI over TCP on a loopback port.

A host stack (our org.bluez emulator, or any bumble ``tcp-client`` transport) connects to a port
and owns that controller until it disconnects. When its TCP connection drops, the controller is
torn down (:meth:`RadioController.drop_host`): peers see their links time out and the dead host
stops advertising and scanning.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from dataclasses import dataclass
from types import TracebackType

from bumble.link import LocalLink
from bumble.transport.common import PacketParser

from testbench.radio.controller import RadioController

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True, slots=True, kw_only=True)
class ControllerEndpoint:
    """Where a host reaches one virtual controller (HCI H4 packets over TCP)."""

    host: str
    port: int

    @property
    def spec(self) -> str:
        """``host:port``, as the emulator's ``--controller`` option and bumble's tcp-client take it."""
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, spec: str) -> ControllerEndpoint:
        """Read ``host:port`` (or a bare port on the loopback address)."""
        host, separator, port_text = spec.rpartition(":")
        if not separator:
            host, port_text = LOOPBACK, spec
        try:
            port = int(port_text)
        except ValueError:
            raise ValueError(f"not a controller endpoint (host:port): {spec!r}") from None
        if not 0 < port < 65536:
            raise ValueError(f"port out of range in {spec!r}")
        return cls(host=host or LOOPBACK, port=port)


class _HostConnection(asyncio.Protocol):
    """One TCP connection from a host stack to a controller."""

    def __init__(self, radio_port: _RadioPort) -> None:
        self._port = radio_port
        self._transport: asyncio.Transport | None = None
        self._parser = PacketParser(radio_port.controller)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._port.attach(self)

    def data_received(self, data: bytes) -> None:
        self._parser.feed_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._port.detach(self)

    def on_packet(self, packet: bytes) -> None:
        """Controller to host."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(packet)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class _RadioPort:
    """A controller and the TCP server its host connects to."""

    def __init__(self, controller: RadioController) -> None:
        self.controller = controller
        self.server: asyncio.Server | None = None
        self._host: _HostConnection | None = None
        self.host_gone = asyncio.Event()
        self.host_gone.set()

    def attach(self, host: _HostConnection) -> None:
        if self._host is not None:
            # A new host replaces the old one, like a dongle re-plugged into another machine.
            logger.info("%s: new host replaces the previous one", self.controller.name)
            old, self._host = self._host, None
            old.close()
        self._host = host
        self.host_gone.clear()
        self.controller.attach_host(host)
        logger.info("%s: host connected", self.controller.name)

    def detach(self, host: _HostConnection) -> None:
        if self._host is not host:
            return
        self._host = None
        self.controller.drop_host()
        self.host_gone.set()
        logger.info("%s: host disconnected; controller torn down", self.controller.name)

    def close(self) -> None:
        if self._host is not None:
            self._host.close()


class VirtualRadio:
    """N linked :class:`RadioController` instances served on loopback TCP ports.

    ``base_port=0`` lets the OS pick a free port for each controller; otherwise controller ``i``
    listens on ``base_port + i``. ``link_loss_delay`` is how long peers wait before they see a
    dead host's links drop (0: at once; a real radio waits for its supervision timeout).
    """

    def __init__(
        self,
        *,
        controllers: int,
        host: str = LOOPBACK,
        base_port: int = 0,
        link_loss_delay: float = 0.0,
    ) -> None:
        if controllers < 1:
            raise ValueError("a radio needs at least one controller")
        if base_port and not 0 < base_port + controllers - 1 < 65536:
            raise ValueError("controller ports out of range")
        if link_loss_delay < 0:
            raise ValueError("link_loss_delay must not be negative")
        self._controller_count = controllers
        self._host = host
        self._base_port = base_port
        self._link_loss_delay = link_loss_delay
        self._ports: list[_RadioPort] = []
        self._endpoints: tuple[ControllerEndpoint, ...] = ()

    @property
    def endpoints(self) -> tuple[ControllerEndpoint, ...]:
        """One endpoint per controller, in order; empty until :meth:`start`."""
        return self._endpoints

    @property
    def controllers(self) -> tuple[RadioController, ...]:
        return tuple(port.controller for port in self._ports)

    async def wait_host_gone(self, index: int) -> None:
        """Wait until controller ``index`` has no host (it was torn down)."""
        await self._ports[index].host_gone.wait()

    async def start(self) -> None:
        link = LocalLink()  # type: ignore[no-untyped-call]
        loop = asyncio.get_running_loop()
        try:
            for index in range(self._controller_count):
                controller = RadioController(
                    f"C{index}",
                    link=link,
                    public_address=f"F0:00:00:00:{index >> 8:02X}:{index & 0xFF:02X}",
                    link_loss_delay=self._link_loss_delay,
                )
                radio_port = _RadioPort(controller)
                port_number = self._base_port + index if self._base_port else 0
                radio_port.server = await loop.create_server(
                    functools.partial(_HostConnection, radio_port),
                    host=self._host,
                    port=port_number,
                )
                self._ports.append(radio_port)
        except BaseException:
            await self.close()
            raise
        self._endpoints = tuple(
            ControllerEndpoint(host=self._host, port=_bound_port(radio_port)) for radio_port in self._ports
        )

    async def close(self) -> None:
        for radio_port in self._ports:
            radio_port.close()
            if radio_port.server is not None:
                radio_port.server.close()
                with contextlib.suppress(Exception):
                    await radio_port.server.wait_closed()
        self._ports.clear()
        self._endpoints = ()

    async def __aenter__(self) -> VirtualRadio:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


def _bound_port(radio_port: _RadioPort) -> int:
    assert radio_port.server is not None
    port: int = radio_port.server.sockets[0].getsockname()[1]
    return port
