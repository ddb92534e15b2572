"""``org.bluez.LEAdvertisingManager1``: applications' advertisements on one adapter.

As in BlueZ src/advertising.c: ``RegisterAdvertisement`` reads the ``LEAdvertisement1``
properties from the caller, refuses a second registration of the same object and more than
``SupportedInstances``, removes an advertisement whose owner leaves the bus, and calls
``Release`` when its ``Timeout`` expires. The controller advertises one instance at a time; with
several registered, they take turns (the kernel's software rotation). After a central connects
the adapter advertises again, so a box keeps accepting phones.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from bumble.device import AdvertisingType
from dbus_fast import Message, MessageType, Variant

from testbench.bluez import errors
from testbench.bluez.advertising_data import (
    AdvertisementError,
    AdvertisementSpec,
    AdvertisingPayload,
    build_payload,
    spec_from_properties,
)
from testbench.bluez.dbus_service import EMPTY_RESULT, DBusInterface, Method, MethodCall, MethodResult

if TYPE_CHECKING:
    from testbench.bluez.adapter import Adapter

logger = logging.getLogger(__name__)

MANAGER_INTERFACE = "org.bluez.LEAdvertisingManager1"
ADVERTISEMENT_INTERFACE = "org.bluez.LEAdvertisement1"

# How long each instance is on air when several take turns (kernel default duration: 2 s).
_ROTATION_PERIOD_S = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Registration:
    """One registered advertisement."""

    owner: str
    path: str
    spec: AdvertisementSpec
    unwatch: Callable[[], None]


class AdvertisingManager:
    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        self.interface = LEAdvertisingManager1Interface(self)
        self.registrations: list[Registration] = []
        self._lock = asyncio.Lock()
        self._turn = 0
        self._rotation: asyncio.TimerHandle | None = None
        self._timeouts: dict[tuple[str, str], asyncio.TimerHandle] = {}

    @property
    def max_instances(self) -> int:
        return self.adapter.settings.max_advertisements

    def _find(self, owner: str, path: str) -> Registration | None:
        return next((r for r in self.registrations if r.owner == owner and r.path == path), None)

    async def register(self, owner: str, path: str) -> None:
        if not path.startswith("/"):
            raise errors.invalid_arguments()
        if self._find(owner, path) is not None:
            raise errors.already_exists()
        if len(self.registrations) >= self.max_instances:
            raise errors.not_permitted("Maximum advertisements reached")
        reply = await self.adapter.tree.bus.call(
            Message(
                destination=owner,
                path=path,
                interface="org.freedesktop.DBus.Properties",
                member="GetAll",
                signature="s",
                body=[ADVERTISEMENT_INTERFACE],
            )
        )
        if reply is None or reply.message_type != MessageType.METHOD_RETURN or reply.signature != "a{sv}":
            raise errors.failed("Failed to register advertisement")
        try:
            spec = spec_from_properties(reply.body[0])
        except AdvertisementError as error:
            logger.info("%s: advertisement %s refused: %s", self.adapter.name, path, error)
            raise errors.failed("Failed to parse advertisement.") from None
        try:
            self._payload(spec)  # refuse what cannot go on air now, not at the next rotation
        except AdvertisementError as error:
            logger.info("%s: advertisement %s refused: %s", self.adapter.name, path, error)
            raise errors.failed("Failed to register advertisement") from None
        # Found again after the awaits: two concurrent registrations of one object.
        if self._find(owner, path) is not None:
            raise errors.already_exists()
        unwatch = self.adapter.names.watch(owner, lambda: self._drop_owner(owner))
        self.registrations.append(Registration(owner=owner, path=path, spec=spec, unwatch=unwatch))
        if spec.timeout_s:
            self._timeouts[(owner, path)] = asyncio.get_running_loop().call_later(
                spec.timeout_s, self._expire, owner, path
            )
        self._announce_instances()
        await self.refresh()

    async def unregister(self, owner: str, path: str) -> None:
        registration = self._find(owner, path)
        if registration is None:
            raise errors.does_not_exist()
        self._remove(registration)
        await self.refresh()

    def _remove(self, registration: Registration) -> None:
        registration.unwatch()
        self.registrations.remove(registration)
        timer = self._timeouts.pop((registration.owner, registration.path), None)
        if timer is not None:
            timer.cancel()
        self._announce_instances()

    def _drop_owner(self, owner: str) -> None:
        for registration in [r for r in self.registrations if r.owner == owner]:
            self._remove(registration)
        self.adapter.tree.run_soon(self.refresh(), what=f"{self.adapter.name}: advertising update")

    def _expire(self, owner: str, path: str) -> None:
        registration = self._find(owner, path)
        if registration is None:
            return
        self._remove(registration)
        self.adapter.tree.bus.send(
            Message(destination=owner, path=path, interface=ADVERTISEMENT_INTERFACE, member="Release")
        )
        self.adapter.tree.run_soon(self.refresh(), what=f"{self.adapter.name}: advertising update")

    def _announce_instances(self) -> None:
        self.interface.emit_properties_changed(
            {
                "ActiveInstances": Variant("y", len(self.registrations)),
                "SupportedInstances": Variant("y", self.max_instances - len(self.registrations)),
            }
        )

    def _payload(self, spec: AdvertisementSpec) -> AdvertisingPayload:
        return build_payload(
            spec, adapter_discoverable=self.adapter.discoverable, fallback_name=self.adapter.alias_or_name
        )

    def _rotate(self) -> None:
        self._rotation = None
        self._turn += 1
        self.adapter.tree.run_soon(self.refresh(), what=f"{self.adapter.name}: advertising rotation")

    async def refresh(self) -> None:
        """Put the right advertisement on air (or none), e.g. after a central connected."""
        async with self._lock:
            device = self.adapter.device
            registrations = self.registrations if self.adapter.powered else []
            if not registrations:
                if device.is_advertising:
                    await device.stop_advertising()
                return
            registration = registrations[self._turn % len(registrations)]
            try:
                payload = self._payload(registration.spec)
            except AdvertisementError as error:
                logger.warning("%s: cannot advertise %s: %s", self.adapter.name, registration.path, error)
                return
            if payload.connectable:
                advertising_type = AdvertisingType.UNDIRECTED_CONNECTABLE_SCANNABLE
            elif payload.scan_response_data:
                advertising_type = AdvertisingType.UNDIRECTED_SCANNABLE
            else:
                advertising_type = AdvertisingType.UNDIRECTED
            interval = self.adapter.settings.advertising_interval_ms
            await device.start_advertising(
                advertising_type=advertising_type,
                advertising_data=payload.advertising_data,
                scan_response_data=payload.scan_response_data,
                advertising_interval_min=interval,
                advertising_interval_max=interval,
            )
            if len(registrations) > 1 and self._rotation is None:
                self._rotation = asyncio.get_running_loop().call_later(_ROTATION_PERIOD_S, self._rotate)


class LEAdvertisingManager1Interface(DBusInterface):
    NAME = MANAGER_INTERFACE
    METHODS: ClassVar[Mapping[str, Method]] = {
        "RegisterAdvertisement": Method((("advertisement", "o"), ("options", "a{sv}"))),
        "UnregisterAdvertisement": Method((("service", "o"),)),
    }

    def __init__(self, manager: AdvertisingManager) -> None:
        super().__init__()
        self.manager = manager

    def properties(self) -> dict[str, Variant]:
        active = len(self.manager.registrations)
        return {
            "ActiveInstances": Variant("y", active),
            "SupportedInstances": Variant("y", self.manager.max_instances - active),
            "SupportedIncludes": Variant("as", ["tx-power", "appearance", "local-name"]),
            "SupportedSecondaryChannels": Variant("as", []),
            "SupportedFeatures": Variant("as", []),
            "SupportedCapabilities": Variant(
                "a{sv}", {"MaxAdvLen": Variant("y", 31), "MaxScnRspLen": Variant("y", 31)}
            ),
        }

    async def call(self, call: MethodCall) -> MethodResult:
        match call.member:
            case "RegisterAdvertisement":
                await self.manager.register(call.sender, str(call.args[0]))
                return EMPTY_RESULT
            case "UnregisterAdvertisement":
                await self.manager.unregister(call.sender, str(call.args[0]))
                return EMPTY_RESULT
        return await super().call(call)
