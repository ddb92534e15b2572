"""The simulated plant's physics and devices, without any Modbus (docs/hardware.md §6).

A box's worth of hardware: per outlet a supply, an ABB B21 meter, a contactor driven by the
breaker relay module and a user-box door with an electric lock and a proximity switch; plus the
metering-box door and its lock. Energy accumulates in millijoules between events, at a simulated
time that runs `time_scale` times real time and can be advanced by hand.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from box_peripheral.hardware.config import HardwareConfig, HardwareKind
from box_peripheral.hardware.loadmodel import OutletCircuit
from box_peripheral.hardware.registermap import (
    INVALID_METER_REGISTERS,
    RELAY_MODULE_CHANNELS,
    WH_PER_ENERGY_UNIT,
    MeterRegisters,
)
from protocol.tokens import Door

from .controlmap import DeviceFault, DeviceFaultState, OutletStatus, PlantStatus

DEFAULT_RATED_W = 3500  # a 16 A outlet at 230 V, rounded down
MAX_TIME_SCALE_MILLI = 1_000_000_000  # a million times real time
# What ABSURD_READINGS shows: power flowing backwards into the grid and a 600 V supply.
ABSURD_POWER = -123_456  # 0.01 W
ABSURD_VOLTAGE_DV = 6000
MAX_LOAD_W = 1_000_000
# The door module has eight relays: one lock per outlet and the metering-box lock.
MAX_OUTLETS = RELAY_MODULE_CHANNELS - 1


class PlantError(ValueError):
    """A poke the plant cannot carry out (no such outlet, a negative load, ...)."""


class PlantClock:
    """Simulated milliseconds: real monotonic time times a scale, plus jumps made by hand."""

    def __init__(self, *, time_scale_milli: int, monotonic_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self._monotonic_ns = monotonic_ns
        self._scale_milli = _check_scale(time_scale_milli)
        self._base_real_ns = monotonic_ns()
        self._base_ms = 0

    @property
    def time_scale_milli(self) -> int:
        return self._scale_milli

    def now_ms(self) -> int:
        elapsed_ns = self._monotonic_ns() - self._base_real_ns
        return self._base_ms + elapsed_ns * self._scale_milli // 1_000_000_000

    def set_time_scale(self, time_scale_milli: int) -> None:
        scale = _check_scale(time_scale_milli)
        self._base_ms = self.now_ms()
        self._base_real_ns = self._monotonic_ns()
        self._scale_milli = scale

    def advance(self, milliseconds: int) -> None:
        self._base_ms += milliseconds


def scale_to_milli(time_scale: float) -> int:
    """A time scale factor (60: a real second counts as a minute) in thousandths."""
    if not isinstance(time_scale, int | float) or not math.isfinite(time_scale) or time_scale < 0:
        raise PlantError(f"time scale must be a finite number from 0, not {time_scale!r}")
    return _check_scale(round(time_scale * 1000))


def _check_scale(time_scale_milli: int) -> int:
    if not isinstance(time_scale_milli, int) or not 0 <= time_scale_milli <= MAX_TIME_SCALE_MILLI:
        raise PlantError(
            f"time scale must be 0 to {MAX_TIME_SCALE_MILLI} thousandths, not {time_scale_milli!r}"
        )
    return time_scale_milli


class PlantModel:
    """Everything behind the Modbus devices of one simulated box.

    The wiring is the default layout of docs/hardware.md §3 (HardwareConfig's defaults), so a box
    configured with defaults drives this plant correctly.
    """

    def __init__(
        self,
        *,
        outlets: int = 4,
        rated_w: int = DEFAULT_RATED_W,
        clock: PlantClock | None = None,
    ) -> None:
        if not isinstance(outlets, int) or not 1 <= outlets <= MAX_OUTLETS:
            raise PlantError(f"the plant has 1 to {MAX_OUTLETS} outlets, not {outlets!r}")
        if not isinstance(rated_w, int) or not 1 <= rated_w <= MAX_LOAD_W:
            raise PlantError(f"rated power is 1 to {MAX_LOAD_W} W, not {rated_w!r}")
        self.wiring = HardwareConfig(kind=HardwareKind.MODBUS_TCP, outlets=tuple(range(1, outlets + 1)))
        self.clock = clock or PlantClock(time_scale_milli=1000)
        self._circuits = {outlet: OutletCircuit(outlet=outlet) for outlet in self.outlets}
        self._rated_w = dict.fromkeys(self.outlets, rated_w)
        self._synced_ms = self.clock.now_ms()
        self._breaker_relays = [False] * RELAY_MODULE_CHANNELS
        self._door_module_relays = [False] * RELAY_MODULE_CHANNELS
        self._metering_door_closed = True
        self._outlet_doors_closed = dict.fromkeys(self.outlets, True)
        self._lock_pulses: dict[int, int] = {}  # by outlet, 0 for the metering box
        self._energy_setback_wh = dict.fromkeys(self.outlets, 0)
        self._faults: dict[int, DeviceFaultState] = {}
        self.bus_silent = False

    @property
    def outlets(self) -> tuple[int, ...]:
        return self.wiring.outlets

    @property
    def field_units(self) -> tuple[int, ...]:
        """The unit ids of every simulated field device: meters, then the two modules."""
        return (*self.outlets, self.wiring.breaker_module_unit_id, self.wiring.door_module_unit_id)

    # --- time ---

    def sync(self) -> int:
        """Bring the physics up to the clock; every event calls this first, so state changes
        take effect at the moment they happen."""
        now = self.clock.now_ms()
        elapsed = now - self._synced_ms
        for circuit in self._circuits.values():
            circuit.advance(elapsed)
        self._synced_ms = now
        return now

    def advance(self, milliseconds: int) -> None:
        if not isinstance(milliseconds, int) or milliseconds < 0:
            raise PlantError(f"time only moves forward, by an integer of ms, not {milliseconds!r}")
        self.sync()
        self.clock.advance(milliseconds)
        self.sync()

    def set_time_scale(self, time_scale_milli: int) -> None:
        self.sync()
        self.clock.set_time_scale(time_scale_milli)

    # --- loads and doors (what people do) ---

    def set_load(self, outlet: int, watts: int) -> None:
        circuit = self._circuit(outlet)
        if not isinstance(watts, int) or not 0 <= watts <= MAX_LOAD_W:
            raise PlantError(f"a load draws 0 to {MAX_LOAD_W} W, not {watts!r}")
        self.sync()
        circuit.load_w = watts

    def set_door(self, outlet: int, closed: bool) -> None:
        """Open or shut a door by hand: outlet 0 is the metering box."""
        if outlet == 0:
            self._metering_door_closed = closed
        else:
            self._circuit(outlet)
            self._outlet_doors_closed[outlet] = closed

    # --- faults ---

    def set_fault(self, unit: int, kind: DeviceFault | int, exception_code: int = 4) -> None:
        if unit not in self.field_units:
            raise PlantError(f"no field device at unit id {unit}")
        if not isinstance(exception_code, int) or not 1 <= exception_code <= 0xFF:
            raise PlantError(f"a Modbus exception code is 1 to 255, not {exception_code!r}")
        try:
            fault = DeviceFault(kind)
        except ValueError:
            raise PlantError(f"unknown fault {kind!r}") from None
        self._faults[unit] = DeviceFaultState(kind=fault, exception_code=exception_code)

    def fault(self, unit: int) -> DeviceFaultState:
        """What the device at `unit` does now (a silent bus silences every field device)."""
        state = self._faults.get(unit, DeviceFaultState())
        if self.bus_silent and unit in self.field_units:
            return DeviceFaultState(kind=DeviceFault.SILENT, exception_code=state.exception_code)
        return state

    def set_energy_setback(self, outlet: int, wh: int) -> None:
        """The outlet's meter shows `wh` less than it counted (a register that jumped backwards)."""
        self._circuit(outlet)
        if not isinstance(wh, int) or wh < 0:
            raise PlantError(f"a setback is a non-negative integer of Wh, not {wh!r}")
        self._energy_setback_wh[outlet] = wh

    def clear_faults(self) -> None:
        self._faults.clear()
        self.bus_silent = False
        self._energy_setback_wh = dict.fromkeys(self.outlets, 0)

    # --- what the Modbus devices see ---

    def meter_registers(self, outlet: int) -> MeterRegisters:
        circuit = self._circuit(outlet)
        now = self.sync()
        match self.fault(outlet).kind:
            case DeviceFault.INVALID_READINGS:
                return INVALID_METER_REGISTERS
            case DeviceFault.ABSURD_READINGS:
                shown = circuit.meter_registers(now)
                return MeterRegisters(
                    energy=shown.energy, voltage=ABSURD_VOLTAGE_DV, current=shown.current, power=ABSURD_POWER
                )
        shown = circuit.meter_registers(now)
        setback_units = -(-self._energy_setback_wh[outlet] // WH_PER_ENERGY_UNIT)
        return MeterRegisters(
            energy=max(0, shown.energy - setback_units),
            voltage=shown.voltage,
            current=shown.current,
            power=shown.power,
        )

    def breaker_relays(self) -> list[bool]:
        return list(self._breaker_relays)

    def door_module_relays(self) -> list[bool]:
        return list(self._door_module_relays)

    def door_module_inputs(self) -> list[bool]:
        """Proximity switches: an input is on while its door is shut; unwired inputs read off."""
        inputs = [False] * RELAY_MODULE_CHANNELS
        inputs[self.wiring.door_input(Door.METERING_BOX, 0)] = self._metering_door_closed
        for outlet in self.outlets:
            inputs[self.wiring.door_input(Door.OUTLET, outlet)] = self._outlet_doors_closed[outlet]
        return inputs

    def set_breaker_relay(self, channel: int, on: bool) -> None:
        """A relay of the breaker module; a wired one drives its outlet's contactor."""
        self._check_channel(channel)
        self.sync()
        self._breaker_relays[channel] = on
        for outlet in self.outlets:
            if self.wiring.breaker_coil(outlet) == channel:
                self._circuits[outlet].breaker_closed = on

    def set_door_module_relay(self, channel: int, on: bool) -> None:
        """A relay of the door module; energizing a lock lets its door spring open."""
        self._check_channel(channel)
        was_on = self._door_module_relays[channel]
        self._door_module_relays[channel] = on
        if not on or was_on:
            return
        for door, outlet in self._locks():
            if self.wiring.lock_coil(door, outlet) == channel:
                self._lock_pulses[outlet] = self._lock_pulses.get(outlet, 0) + 1
                self.set_door(outlet, closed=False)

    # --- reporting ---

    def status(self) -> PlantStatus:
        now = self.sync()
        metering_lock = self.wiring.lock_coil(Door.METERING_BOX, 0)
        return PlantStatus(
            clock_ms=now,
            time_scale_milli=self.clock.time_scale_milli,
            bus_silent=self.bus_silent,
            metering_door_closed=self._metering_door_closed,
            metering_lock_energized=self._door_module_relays[metering_lock],
            metering_lock_pulses=self._lock_pulses.get(0, 0),
            breaker_module_unit=self.wiring.breaker_module_unit_id,
            door_module_unit=self.wiring.door_module_unit_id,
            breaker_module_fault=self._faults.get(self.wiring.breaker_module_unit_id, DeviceFaultState()),
            door_module_fault=self._faults.get(self.wiring.door_module_unit_id, DeviceFaultState()),
            outlets=tuple(self._outlet_status(outlet) for outlet in self.outlets),
        )

    def _outlet_status(self, outlet: int) -> OutletStatus:
        circuit = self._circuits[outlet]
        return OutletStatus(
            outlet=outlet,
            load_w=circuit.load_w,
            rated_w=self._rated_w[outlet],
            door_closed=self._outlet_doors_closed[outlet],
            breaker_closed=circuit.breaker_closed,
            lock_energized=self._door_module_relays[self.wiring.lock_coil(Door.OUTLET, outlet)],
            lock_pulses=self._lock_pulses.get(outlet, 0),
            delivered_mwh=circuit.delivered_mwh,
            energy_setback_wh=self._energy_setback_wh[outlet],
            meter_fault=self._faults.get(outlet, DeviceFaultState()),
        )

    def _locks(self) -> list[tuple[Door, int]]:
        return [(Door.METERING_BOX, 0), *((Door.OUTLET, outlet) for outlet in self.outlets)]

    def _circuit(self, outlet: int) -> OutletCircuit:
        circuit = self._circuits.get(outlet) if type(outlet) is int else None
        if circuit is None:
            raise PlantError(f"the plant has no outlet {outlet!r}")
        return circuit

    @staticmethod
    def _check_channel(channel: int) -> None:
        if not 0 <= channel < RELAY_MODULE_CHANNELS:
            raise PlantError(f"the module has channels 0 to {RELAY_MODULE_CHANNELS - 1}, not {channel}")
