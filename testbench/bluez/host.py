"""The bumble host stack under one emulated adapter, attached to a controller of the radio."""

from __future__ import annotations

import asyncio
import logging

from bumble import gatt_server, hci
from bumble.device import Device, DeviceConfiguration
from bumble.gatt import Service
from bumble.host import Host
from bumble.transport.common import StreamPacketSink, StreamPacketSource

from testbench.radio.hub import ControllerEndpoint

logger = logging.getLogger(__name__)


class StableHandleGattServer(gatt_server.Server):
    """A GATT server that can remove a service without renumbering the others.

    BlueZ keeps handles stable when an application unregisters; bumble numbers attributes by
    their count, which would give a new service the handles of an existing one.
    """

    def next_handle(self) -> int:
        return 1 + max((attribute.handle for attribute in self.attributes), default=0)

    def remove_service(self, service: Service) -> None:
        first, last = service.handle, service.end_group_handle
        self.attributes = [a for a in self.attributes if not first <= a.handle <= last]
        self.attributes_by_handle.clear()
        if service in self.services:
            self.services.remove(service)
        for cccds in self.subscribers.values():
            for handle in [h for h in cccds if first <= h <= last]:
                del cccds[handle]


class EmulatedDevice(Device):
    """A bumble ``Device`` with the stable-handle GATT server and a fixed ATT MTU."""

    def __init__(self, *, name: str, address: hci.Address, host: Host, att_mtu: int) -> None:
        config = DeviceConfiguration()
        config.name = name
        config.le_enabled = True
        config.classic_enabled = False
        super().__init__(name=name, address=address, config=config, host=host)
        self.gatt_server = StableHandleGattServer(self)
        self.gatt_server.max_mtu = att_mtu
        self.add_default_services(
            add_gap_service=config.gap_service_enabled, add_gatt_service=config.gatt_service_enabled
        )
        self.gatt_server.on(
            "characteristic_subscription",
            lambda *args: self.emit("characteristic_subscription", *args),
        )

    @property
    def stable_gatt_server(self) -> StableHandleGattServer:
        server = self.gatt_server
        assert isinstance(server, StableHandleGattServer)
        return server


class _ControllerSource(StreamPacketSource):
    """Packets from the controller; ``terminated`` completes when the radio closes the socket."""

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_transport_lost()


class ControllerLink:
    """HCI over TCP to one controller of the virtual radio."""

    def __init__(self, source: StreamPacketSource, sink: StreamPacketSink) -> None:
        self.source = source
        self.sink = sink

    @classmethod
    async def open(cls, endpoint: ControllerEndpoint) -> ControllerLink:
        loop = asyncio.get_running_loop()
        transport, source = await loop.create_connection(
            _ControllerSource, host=endpoint.host, port=endpoint.port
        )
        return cls(source, StreamPacketSink(transport))

    @property
    def lost(self) -> asyncio.Future[None]:
        """Done when the radio closed the connection."""
        return self.source.terminated

    def close(self) -> None:
        self.sink.close()
