"""BoxHardware in memory, for unit tests of the daemon logic (docs/hardware.md §7).

It models the same things as the simulated plant (the outlet circuits of `loadmodel`, the B21's
register resolution, spring-loaded doors that pop open when their lock is pulsed) and raises the
same errors as the Modbus driver, so a script gives the same readings on both. Time only moves
when a test calls `advance`; nothing here sleeps or reads a clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from protocol.errors import ErrorCode, LocalProtocolError
from protocol.tokens import Door

from .base import DoorStates, HardwareError, OutletReading
from .loadmodel import OutletCircuit
from .registermap import (
    WH_PER_ENERGY_UNIT,
    EnergyHighWater,
    MeterLimits,
    MeterRegisters,
    outlet_reading,
)

HARDWARE_CODES = frozenset({ErrorCode.METER_TIMEOUT, ErrorCode.METER_BAD_READING, ErrorCode.BUS_FAULT})


class MemoryHardware:
    """The box's meter, breakers, locks and door switches as plain state, plus test hooks."""

    def __init__(self, *, outlets: Iterable[int] = (1, 2, 3, 4), limits: MeterLimits | None = None) -> None:
        self._outlets = tuple(outlets)
        self._limits = limits or MeterLimits()
        self._circuits = {outlet: OutletCircuit(outlet=outlet) for outlet in self._outlets}
        self._clock_ms = 0
        self._metering_box_closed = True
        self._outlet_doors_closed = dict.fromkeys(self._outlets, True)
        self._lock_pulses: dict[tuple[Door, int], int] = {}
        self._failing_reads: dict[int, ErrorCode] = {}
        self._energy_setback_units = dict.fromkeys(self._outlets, 0)
        self._bus_down = False
        self._closed = False
        self._high_water = EnergyHighWater()

    # --- BoxHardware ---

    @property
    def outlets(self) -> tuple[int, ...]:
        return self._outlets

    async def connect(self) -> None:
        await self._bus_checkpoint()

    async def close(self) -> None:
        self._closed = True

    async def read_outlet(self, outlet: int) -> OutletReading:
        circuit = self._circuit(outlet)
        await self._bus_checkpoint()
        failure = self._failing_reads.pop(outlet, None)
        if failure is not None:
            raise HardwareError(f"outlet {outlet}: injected {failure.name}", code=failure, outlet=outlet)
        registers = circuit.meter_registers(self._clock_ms)
        setback = min(self._energy_setback_units[outlet], registers.energy)
        shown = MeterRegisters(
            energy=registers.energy - setback,
            voltage=registers.voltage,
            current=registers.current,
            power=registers.power,
        )
        return self._high_water.check(outlet_reading(outlet, shown, self._limits))

    async def set_breaker(self, outlet: int, closed: bool) -> None:
        circuit = self._circuit(outlet)
        await self._bus_checkpoint()
        circuit.breaker_closed = closed

    async def breaker_closed(self, outlet: int) -> bool:
        circuit = self._circuit(outlet)
        await self._bus_checkpoint()
        return circuit.breaker_closed

    async def unlock_door(self, door: Door, outlet: int) -> None:
        self._check_door(door, outlet)
        await self._bus_checkpoint()
        key = (door, outlet)
        self._lock_pulses[key] = self._lock_pulses.get(key, 0) + 1
        self._set_door(door, outlet, closed=False)  # the latch lets go and the spring opens it

    async def read_doors(self) -> DoorStates:
        await self._bus_checkpoint()
        return DoorStates(
            metering_box_closed=self._metering_box_closed,
            outlet_doors_closed=dict(self._outlet_doors_closed),
        )

    # --- test hooks ---

    def set_load(self, outlet: int, watts: int) -> None:
        """Plug a load drawing `watts` into the outlet (0 unplugs it)."""
        if not isinstance(watts, int) or watts < 0:
            raise ValueError(f"load must be a non-negative integer of watts, not {watts!r}")
        self._circuit(outlet).load_w = watts

    def unplug(self, outlet: int) -> None:
        self.set_load(outlet, 0)

    def advance(self, milliseconds: int) -> None:
        """Let simulated time pass: energy flows through every closed breaker."""
        if not isinstance(milliseconds, int) or milliseconds < 0:
            raise ValueError(f"time only moves forward, by an integer of ms, not {milliseconds!r}")
        for circuit in self._circuits.values():
            circuit.advance(milliseconds)
        self._clock_ms += milliseconds

    def open_door(self, door: Door, outlet: int) -> None:
        self._check_door(door, outlet)
        self._set_door(door, outlet, closed=False)

    def close_door(self, door: Door, outlet: int) -> None:
        self._check_door(door, outlet)
        self._set_door(door, outlet, closed=True)

    def fail_next_read(self, outlet: int, code: ErrorCode) -> None:
        """The next `read_outlet(outlet)` raises HardwareError with `code` (a 7xx code)."""
        self._circuit(outlet)
        if code not in HARDWARE_CODES:
            raise ValueError(f"{code!r} is not a hardware error code")
        self._failing_reads[outlet] = code

    def jump_energy_backwards(self, outlet: int, wh: int) -> None:
        """Make the outlet's energy register drop by `wh` (rounded up to the meter's 10 Wh)."""
        self._circuit(outlet)
        if not isinstance(wh, int) or wh < 0:
            raise ValueError(f"the step back must be a non-negative integer of Wh, not {wh!r}")
        self._energy_setback_units[outlet] += -(-wh // WH_PER_ENERGY_UNIT)

    def set_bus_down(self, down: bool) -> None:
        """While down, every operation raises BUS_FAULT for the whole bus."""
        self._bus_down = down

    def clear_faults(self) -> None:
        """Undo every injected fault: pending read failures, energy setbacks, a downed bus."""
        self._failing_reads.clear()
        self._energy_setback_units = dict.fromkeys(self._outlets, 0)
        self._bus_down = False

    def lock_pulses(self, door: Door, outlet: int) -> int:
        """How many times the lock of this door was pulsed."""
        self._check_door(door, outlet)
        return self._lock_pulses.get((door, outlet), 0)

    def delivered_mwh(self, outlet: int) -> int:
        """The true energy delivered so far, finer than the meter shows."""
        return self._circuit(outlet).delivered_mwh

    # --- internals ---

    def _circuit(self, outlet: int) -> OutletCircuit:
        circuit = self._circuits.get(outlet) if type(outlet) is int else None
        if circuit is None:
            raise LocalProtocolError(f"this box has no outlet {outlet!r}", code=ErrorCode.OUTLET_UNKNOWN)
        return circuit

    def _check_door(self, door: Door, outlet: int) -> None:
        if door is Door.METERING_BOX:
            if type(outlet) is not int or outlet != 0:
                raise LocalProtocolError("the metering-box door is outlet 0", code=ErrorCode.OUTLET_UNKNOWN)
        elif door is Door.OUTLET:
            self._circuit(outlet)
        else:
            raise LocalProtocolError(f"unknown door {door!r}", code=ErrorCode.OUTLET_UNKNOWN)

    def _set_door(self, door: Door, outlet: int, *, closed: bool) -> None:
        if door is Door.METERING_BOX:
            self._metering_box_closed = closed
        else:
            self._outlet_doors_closed[outlet] = closed

    async def _bus_checkpoint(self) -> None:
        # Yield like real I/O would, so the daemon's concurrency is exercised, deterministically.
        await asyncio.sleep(0)
        if self._closed:
            raise HardwareError("the hardware was closed", code=ErrorCode.BUS_FAULT)
        if self._bus_down:
            raise HardwareError("injected bus fault", code=ErrorCode.BUS_FAULT)
