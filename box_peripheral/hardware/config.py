"""How the box reaches its hardware: which driver, which bus, which unit ids and channels.

One frozen record, validated at construction, from which `open_hardware` picks the driver once
(docs/hardware.md §1 and §4). The default channel layout is the wiring of docs/hardware.md §3:
one energy meter per outlet at unit id = outlet number, a breaker relay module and a door
relay/input module on the same RS485 bus.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from protocol.errors import ErrorCode, PowerboxError
from protocol.tokens import Door

# Modbus RTU addresses 1..247 are for devices; 0 is broadcast and 248..255 are reserved.
MAX_UNIT_ID = 247
# Outlet numbers travel in ledger entries, which allow up to 99.
MAX_OUTLET = 99
# The relay/input module has eight relays and eight inputs (docs/hardware.md §2.2).
MODULE_CHANNELS = 8


class HardwareConfigError(PowerboxError, ValueError):
    """The hardware section of the configuration is unusable; the message says which field."""

    code = ErrorCode.INTERNAL


class HardwareKind(enum.StrEnum):
    MODBUS_RTU = "modbus-rtu"  # in the field: RS485 through a serial adapter
    MODBUS_TCP = "modbus-tcp"  # the test bench: the simulated plant, or an RS485/TCP gateway
    MEMORY = "memory"  # unit tests of the daemon logic


class Parity(enum.StrEnum):
    NONE = "N"
    EVEN = "E"
    ODD = "O"


@dataclass(frozen=True, slots=True, kw_only=True)
class HardwareConfig:
    """The `[hardware]` section of box.toml.

    Meters answer at unit id = outlet number. Coil and input addresses are the module's
    0-based channel numbers; outlet n uses channel `base + n - 1`.
    """

    kind: HardwareKind
    outlets: tuple[int, ...] = (1, 2, 3, 4)

    # modbus-rtu
    serial_port: str = ""
    baudrate: int = 9600
    parity: Parity = Parity.NONE
    stopbits: int = 1

    # modbus-tcp
    host: str = "127.0.0.1"
    port: int = 502

    # The relay/input modules (docs/hardware.md §2.2, §3).
    breaker_module_unit_id: int = 100
    door_module_unit_id: int = 101
    breaker_coil_base: int = 0
    outlet_lock_coil_base: int = 0
    metering_lock_coil: int = 7
    outlet_door_input_base: int = 0
    metering_door_input: int = 7

    # Per request on the bus; a read makes at most one retry, so it is bounded by a few of these.
    request_timeout_ms: int = 300
    # How long a lock coil stays energized to release the latch.
    lock_pulse_ms: int = 500

    def __post_init__(self) -> None:
        _check_int("request_timeout_ms", self.request_timeout_ms, 10, 10_000)
        _check_int("lock_pulse_ms", self.lock_pulse_ms, 1, 10_000)
        if not isinstance(self.outlets, tuple) or not self.outlets:
            raise HardwareConfigError("outlets must be a non-empty tuple of outlet numbers")
        for outlet in self.outlets:
            _check_int("outlet", outlet, 1, MAX_OUTLET)
        if len(set(self.outlets)) != len(self.outlets):
            raise HardwareConfigError(f"outlets repeat a number: {self.outlets}")
        match self.kind:
            case HardwareKind.MODBUS_RTU:
                if not isinstance(self.serial_port, str) or not self.serial_port:
                    raise HardwareConfigError("modbus-rtu needs serial_port")
                _check_int("baudrate", self.baudrate, 1200, 921_600)
                _check_int("stopbits", self.stopbits, 1, 2)
                if not isinstance(self.parity, Parity):
                    raise HardwareConfigError(f"parity must be N, E or O, not {self.parity!r}")
            case HardwareKind.MODBUS_TCP:
                if not isinstance(self.host, str) or not self.host:
                    raise HardwareConfigError("modbus-tcp needs host")
                _check_int("port", self.port, 1, 65_535)
            case HardwareKind.MEMORY:
                return  # no bus, so no channel layout to check
            case _:
                raise HardwareConfigError(f"unknown hardware kind {self.kind!r}")
        self._check_bus_layout()

    def _check_bus_layout(self) -> None:
        _check_int("breaker_module_unit_id", self.breaker_module_unit_id, 1, MAX_UNIT_ID)
        _check_int("door_module_unit_id", self.door_module_unit_id, 1, MAX_UNIT_ID)
        module_ids = {self.breaker_module_unit_id, self.door_module_unit_id}
        if len(module_ids) != 2 or module_ids & set(self.outlets):
            raise HardwareConfigError(
                "the meters (unit id = outlet number) and the two modules need distinct unit ids"
            )
        for name in ("breaker_coil_base", "outlet_lock_coil_base", "outlet_door_input_base"):
            _check_int(name, getattr(self, name), 0, MODULE_CHANNELS - 1)
        _check_int("metering_lock_coil", self.metering_lock_coil, 0, MODULE_CHANNELS - 1)
        _check_int("metering_door_input", self.metering_door_input, 0, MODULE_CHANNELS - 1)
        breakers = [self.breaker_coil(outlet) for outlet in self.outlets]
        locks = [self.lock_coil(Door.OUTLET, outlet) for outlet in self.outlets]
        locks.append(self.metering_lock_coil)
        inputs = [self.door_input(Door.OUTLET, outlet) for outlet in self.outlets]
        inputs.append(self.metering_door_input)
        for name, channels in (("breaker coils", breakers), ("lock coils", locks), ("door inputs", inputs)):
            if max(channels) >= MODULE_CHANNELS:
                raise HardwareConfigError(f"{name} run past channel {MODULE_CHANNELS - 1}: {channels}")
            if len(set(channels)) != len(channels):
                raise HardwareConfigError(f"{name} share a channel: {channels}")

    def breaker_coil(self, outlet: int) -> int:
        return self.breaker_coil_base + outlet - 1

    def lock_coil(self, door: Door, outlet: int) -> int:
        if door is Door.METERING_BOX:
            return self.metering_lock_coil
        return self.outlet_lock_coil_base + outlet - 1

    def door_input(self, door: Door, outlet: int) -> int:
        if door is Door.METERING_BOX:
            return self.metering_door_input
        return self.outlet_door_input_base + outlet - 1

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any]) -> HardwareConfig:
        """Build from a parsed TOML table; unknown keys and wrong types are errors, never crashes."""
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(table) - known)
        if unknown:
            raise HardwareConfigError(f"unknown hardware settings: {', '.join(unknown)}")
        values: dict[str, Any] = dict(table)
        try:
            values["kind"] = HardwareKind(table["kind"])
        except KeyError:
            raise HardwareConfigError("hardware kind is missing") from None
        except ValueError:
            choices = ", ".join(kind.value for kind in HardwareKind)
            raise HardwareConfigError(f"hardware kind must be one of {choices}") from None
        if "parity" in table:
            try:
                values["parity"] = Parity(table["parity"])
            except ValueError:
                raise HardwareConfigError("parity must be N, E or O") from None
        if "outlets" in table:
            outlets = table["outlets"]
            if not isinstance(outlets, list | tuple):
                raise HardwareConfigError("outlets must be a list of outlet numbers")
            values["outlets"] = tuple(outlets)
        for name in ("serial_port", "host"):
            if name in values and not isinstance(values[name], str):
                raise HardwareConfigError(f"{name} must be a string")
        return cls(**values)


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise HardwareConfigError(f"{name} must be an integer from {low} to {high}, not {value!r}")
