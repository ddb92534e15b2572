"""What the box daemon needs from its hardware (DESIGN §4), and nothing more.

Every driver (Modbus RTU in the field, Modbus TCP against the simulated plant, in-memory for unit
tests) implements `BoxHardware`. Readings are integers in the units the protocol uses. Any failure
of the meter or the bus is raised as `HardwareError` with a 7xx code; the daemon then puts the
affected outlets into the safe state (breaker open), logs it and records it in the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from protocol.errors import ErrorCode, PowerboxError
from protocol.tokens import Door


class HardwareError(PowerboxError):
    """The meter or the bus failed. `outlet` is None when the whole bus is affected."""

    code = ErrorCode.BUS_FAULT

    def __init__(self, detail: str = "", *, code: ErrorCode | None = None, outlet: int | None = None) -> None:
        super().__init__(detail, code=code)
        self.outlet = outlet


@dataclass(frozen=True, slots=True, kw_only=True)
class OutletReading:
    """One outlet's meter at one moment."""

    outlet: int
    energy_wh: int  # the meter's import energy register: never goes backwards on a sound meter
    voltage_dv: int  # 0.1 V
    current_ma: int
    power_w: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DoorStates:
    """Proximity switches: True means the door is closed."""

    metering_box_closed: bool
    outlet_doors_closed: dict[int, bool]


class BoxHardware(Protocol):
    """The meter, the outlet breakers, the electric locks and the door switches of one box."""

    @property
    def outlets(self) -> tuple[int, ...]:
        """Outlet numbers this hardware serves, from 1."""

    async def connect(self) -> None:
        """Open the bus. Raises HardwareError if it cannot."""

    async def close(self) -> None:
        """Release the bus. Never raises."""

    async def read_outlet(self, outlet: int) -> OutletReading:
        """Read one outlet's meter. Raises HardwareError (METER_TIMEOUT, METER_BAD_READING, BUS_FAULT)."""

    async def set_breaker(self, outlet: int, closed: bool) -> None:
        """Close (power on) or open (power off) an outlet's breaker. Raises HardwareError."""

    async def breaker_closed(self, outlet: int) -> bool:
        """The breaker's state as the relay module reports it. Raises HardwareError."""

    async def unlock_door(self, door: Door, outlet: int) -> None:
        """Pulse an electric lock (outlet 0 for the metering-box door). Raises HardwareError."""

    async def read_doors(self) -> DoorStates:
        """Read every door's proximity switch. Raises HardwareError."""
