"""The plant's simulation-only control registers (docs/hardware.md §6), shared by server and client.

They sit on their own unit id, CONTROL_UNIT_ID, as holding registers (read with function code
3, written with 16), and belong to no real device: a box never talks to that unit id. Through
them a test tool plugs loads, opens doors, moves the simulated clock and injects faults, and
reads the plant's true state back (for instance the energy really delivered, finer than the
meter shows).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from box_peripheral.hardware.registermap import join_words, split_words

CONTROL_UNIT_ID = 247  # the highest valid RS485 address; field devices stay well below it
MAGIC = 0x5042  # "PB": tells a control client it reached a powerbox plant
MAP_VERSION = 1
OUTLET_BLOCK_START = 0x0100
OUTLET_BLOCK_STRIDE = 0x0020
FAULT_KIND_START = 0x0400  # + unit id
FAULT_EXCEPTION_CODE_START = 0x0500  # + unit id
CONTROL_REGISTER_COUNT = 0x0600
MAX_READ_WORDS = 125  # Modbus limit for one read of holding registers


class DeviceFault(enum.IntEnum):
    """What a simulated field device does wrong (docs/hardware.md §6.3)."""

    NONE = 0
    SILENT = 1  # never answers: the master times out
    EXCEPTION = 2  # answers every request with a Modbus exception response
    INVALID_READINGS = 3  # meters: every quantity reads the meter's "invalid" marker
    ABSURD_READINGS = 4  # meters: negative power and a voltage no mains can have


class Scope(enum.Enum):
    PLANT = "plant"
    OUTLET = "outlet"  # one block per outlet, index = outlet number
    UNIT = "unit"  # one register per Modbus unit id, index = unit id


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlRegister:
    name: str
    scope: Scope
    offset: int
    words: int = 1
    writable: bool = False

    def address(self, index: int = 0) -> int:
        match self.scope:
            case Scope.PLANT:
                return self.offset
            case Scope.OUTLET:
                return OUTLET_BLOCK_START + (index - 1) * OUTLET_BLOCK_STRIDE + self.offset
            case Scope.UNIT:
                return self.offset + index


def _plant(name: str, offset: int, words: int = 1, *, writable: bool = False) -> ControlRegister:
    return ControlRegister(name=name, scope=Scope.PLANT, offset=offset, words=words, writable=writable)


def _outlet(name: str, offset: int, words: int = 1, *, writable: bool = False) -> ControlRegister:
    return ControlRegister(name=name, scope=Scope.OUTLET, offset=offset, words=words, writable=writable)


MAGIC_REGISTER = _plant("magic", 0x00)
MAP_VERSION_REGISTER = _plant("map_version", 0x01)
OUTLET_COUNT = _plant("outlet_count", 0x02)
BREAKER_MODULE_UNIT = _plant("breaker_module_unit", 0x03)
DOOR_MODULE_UNIT = _plant("door_module_unit", 0x04)
TIME_SCALE_MILLI = _plant("time_scale_milli", 0x05, 2, writable=True)  # 1000 = real time, 0 = paused
ADVANCE_MS = _plant("advance_ms", 0x07, 2, writable=True)  # write: the clock jumps ahead; reads 0
CLOCK_MS = _plant("clock_ms", 0x09, 4)
BUS_SILENT = _plant("bus_silent", 0x0D, writable=True)  # 1: no field device answers (a cut bus)
METERING_DOOR_CLOSED = _plant("metering_door_closed", 0x0E, writable=True)
METERING_LOCK_ENERGIZED = _plant("metering_lock_energized", 0x0F)
METERING_LOCK_PULSES = _plant("metering_lock_pulses", 0x10)
CLEAR_FAULTS = _plant("clear_faults", 0x11, writable=True)  # write 1: every fault and setback off
PLANT_WORDS = 0x12

LOAD_W = _outlet("load_w", 0x00, 2, writable=True)  # 0: nothing plugged in
RATED_W = _outlet("rated_w", 0x02, 2)
DOOR_CLOSED = _outlet("door_closed", 0x04, writable=True)
BREAKER_CLOSED = _outlet("breaker_closed", 0x05)
LOCK_ENERGIZED = _outlet("lock_energized", 0x06)
LOCK_PULSES = _outlet("lock_pulses", 0x07)
DELIVERED_MWH = _outlet("delivered_mwh", 0x08, 4)  # true energy through the breaker, mWh
ENERGY_SETBACK_WH = _outlet("energy_setback_wh", 0x0C, 2, writable=True)  # meter shows this much less
OUTLET_WORDS = 0x0E

FAULT_KIND = ControlRegister(name="fault", scope=Scope.UNIT, offset=FAULT_KIND_START, writable=True)
FAULT_EXCEPTION_CODE = ControlRegister(
    name="fault_exception_code", scope=Scope.UNIT, offset=FAULT_EXCEPTION_CODE_START, writable=True
)

PLANT_REGISTERS = (
    MAGIC_REGISTER,
    MAP_VERSION_REGISTER,
    OUTLET_COUNT,
    BREAKER_MODULE_UNIT,
    DOOR_MODULE_UNIT,
    TIME_SCALE_MILLI,
    ADVANCE_MS,
    CLOCK_MS,
    BUS_SILENT,
    METERING_DOOR_CLOSED,
    METERING_LOCK_ENERGIZED,
    METERING_LOCK_PULSES,
    CLEAR_FAULTS,
)
OUTLET_REGISTERS = (
    LOAD_W,
    RATED_W,
    DOOR_CLOSED,
    BREAKER_CLOSED,
    LOCK_ENERGIZED,
    LOCK_PULSES,
    DELIVERED_MWH,
    ENERGY_SETBACK_WH,
)
UNIT_REGISTERS = (FAULT_KIND, FAULT_EXCEPTION_CODE)


@dataclass(frozen=True, slots=True, kw_only=True)
class RegisterSlot:
    """Where one address falls: which register, for which outlet or unit."""

    register: ControlRegister
    index: int


def register_layout(outlets: Iterable[int], units: Iterable[int]) -> dict[int, RegisterSlot]:
    """Every control register of a plant, by its first address."""
    layout = {register.address(): RegisterSlot(register=register, index=0) for register in PLANT_REGISTERS}
    for outlet in outlets:
        for register in OUTLET_REGISTERS:
            layout[register.address(outlet)] = RegisterSlot(register=register, index=outlet)
    for unit in units:
        for register in UNIT_REGISTERS:
            layout[register.address(unit)] = RegisterSlot(register=register, index=unit)
    return layout


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceFaultState:
    kind: DeviceFault = DeviceFault.NONE
    exception_code: int = 4  # Modbus "server device failure"


@dataclass(frozen=True, slots=True, kw_only=True)
class OutletStatus:
    outlet: int
    load_w: int
    rated_w: int
    door_closed: bool
    breaker_closed: bool
    lock_energized: bool
    lock_pulses: int
    delivered_mwh: int
    energy_setback_wh: int
    meter_fault: DeviceFaultState


@dataclass(frozen=True, slots=True, kw_only=True)
class PlantStatus:
    """The plant's true state, as `powerbox plant status` shows it."""

    clock_ms: int
    time_scale_milli: int
    bus_silent: bool
    metering_door_closed: bool
    metering_lock_energized: bool
    metering_lock_pulses: int
    breaker_module_unit: int
    door_module_unit: int
    breaker_module_fault: DeviceFaultState
    door_module_fault: DeviceFaultState
    outlets: tuple[OutletStatus, ...]

    def outlet(self, number: int) -> OutletStatus:
        for status in self.outlets:
            if status.outlet == number:
                return status
        raise KeyError(f"the plant has no outlet {number}")


def encode_status(status: PlantStatus) -> dict[int, int]:
    """Register address to 16-bit word, for every readable control register."""
    words: dict[int, int] = {}

    def put(register: ControlRegister, value: int, index: int = 0) -> None:
        for offset, word in enumerate(split_words(value, register.words)):
            words[register.address(index) + offset] = word

    put(MAGIC_REGISTER, MAGIC)
    put(MAP_VERSION_REGISTER, MAP_VERSION)
    put(OUTLET_COUNT, len(status.outlets))
    put(BREAKER_MODULE_UNIT, status.breaker_module_unit)
    put(DOOR_MODULE_UNIT, status.door_module_unit)
    put(TIME_SCALE_MILLI, status.time_scale_milli)
    put(ADVANCE_MS, 0)
    put(CLOCK_MS, status.clock_ms)
    put(BUS_SILENT, int(status.bus_silent))
    put(METERING_DOOR_CLOSED, int(status.metering_door_closed))
    put(METERING_LOCK_ENERGIZED, int(status.metering_lock_energized))
    put(METERING_LOCK_PULSES, status.metering_lock_pulses & 0xFFFF)
    put(CLEAR_FAULTS, 0)
    faults = {
        status.breaker_module_unit: status.breaker_module_fault,
        status.door_module_unit: status.door_module_fault,
    }
    for outlet in status.outlets:
        n = outlet.outlet
        put(LOAD_W, outlet.load_w, n)
        put(RATED_W, outlet.rated_w, n)
        put(DOOR_CLOSED, int(outlet.door_closed), n)
        put(BREAKER_CLOSED, int(outlet.breaker_closed), n)
        put(LOCK_ENERGIZED, int(outlet.lock_energized), n)
        put(LOCK_PULSES, outlet.lock_pulses & 0xFFFF, n)
        put(DELIVERED_MWH, outlet.delivered_mwh, n)
        put(ENERGY_SETBACK_WH, outlet.energy_setback_wh, n)
        faults[n] = outlet.meter_fault
    for unit, fault in faults.items():
        put(FAULT_KIND, fault.kind, unit)
        put(FAULT_EXCEPTION_CODE, fault.exception_code, unit)
    return words


def decode_status(words: Mapping[int, int]) -> PlantStatus:
    """The inverse of encode_status; `words` must hold every readable register of the plant."""

    def get(register: ControlRegister, index: int = 0) -> int:
        address = register.address(index)
        return join_words([words[address + offset] for offset in range(register.words)])

    def fault(unit: int) -> DeviceFaultState:
        return DeviceFaultState(
            kind=DeviceFault(get(FAULT_KIND, unit)), exception_code=get(FAULT_EXCEPTION_CODE, unit)
        )

    outlets = tuple(
        OutletStatus(
            outlet=n,
            load_w=get(LOAD_W, n),
            rated_w=get(RATED_W, n),
            door_closed=bool(get(DOOR_CLOSED, n)),
            breaker_closed=bool(get(BREAKER_CLOSED, n)),
            lock_energized=bool(get(LOCK_ENERGIZED, n)),
            lock_pulses=get(LOCK_PULSES, n),
            delivered_mwh=get(DELIVERED_MWH, n),
            energy_setback_wh=get(ENERGY_SETBACK_WH, n),
            meter_fault=fault(n),
        )
        for n in range(1, get(OUTLET_COUNT) + 1)
    )
    breaker_unit = get(BREAKER_MODULE_UNIT)
    door_unit = get(DOOR_MODULE_UNIT)
    return PlantStatus(
        clock_ms=get(CLOCK_MS),
        time_scale_milli=get(TIME_SCALE_MILLI),
        bus_silent=bool(get(BUS_SILENT)),
        metering_door_closed=bool(get(METERING_DOOR_CLOSED)),
        metering_lock_energized=bool(get(METERING_LOCK_ENERGIZED)),
        metering_lock_pulses=get(METERING_LOCK_PULSES),
        breaker_module_unit=breaker_unit,
        door_module_unit=door_unit,
        breaker_module_fault=fault(breaker_unit),
        door_module_fault=fault(door_unit),
        outlets=outlets,
    )


def read_ranges(outlet_count: int, units: Iterable[int]) -> list[tuple[int, int]]:
    """The (address, count) reads that fetch every readable register, each within one read."""
    ranges = [(0, PLANT_WORDS)]
    ranges += [(LOAD_W.address(n), OUTLET_WORDS) for n in range(1, outlet_count + 1)]
    for unit in sorted(set(units)):
        ranges += [(FAULT_KIND.address(unit), 1), (FAULT_EXCEPTION_CODE.address(unit), 1)]
    return ranges
