"""The Modbus register maps the box speaks (docs/hardware.md §2), as numbers and pure functions.

The energy meter is an ABB EQ B21 (single-phase DIN-rail meter, 65 A direct) on the common "EQ"
map: every quantity is an integer with a fixed resolution, big-endian, most significant word
first, read with function code 3. A quantity the meter cannot produce reads as "invalid": all
ones for unsigned registers, the largest positive value for signed ones.

The relay/input module is a Waveshare "Modbus RTU Relay (D)": relays 1-8 are coils 0-7 (function
codes 1, 5, 15) and the isolated inputs 1-8 are discrete inputs 0-7 (function code 2).

Both the Modbus driver and the simulated plant use this module, so the plant speaks exactly the
map the driver reads; the map itself is checked against docs/hardware.md in the tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from protocol.errors import ErrorCode

from .base import HardwareError, OutletReading

# --- ABB EQ meter map (B21 user manual, "mapping tables"; addresses as sent on the bus) ---
METER_FUNCTION_CODE = 3
ACTIVE_IMPORT_ENERGY = 0x5000  # U64, 0.01 kWh
ENERGY_WORDS = 4
INSTANTANEOUS_START = 0x5B00  # one read covers voltage, current and power
VOLTAGE_L1 = 0x5B00  # U32, 0.1 V (L1-N)
VOLTAGE_L2 = 0x5B02
VOLTAGE_L3 = 0x5B04
CURRENT_L1 = 0x5B0C  # U32, 0.01 A
CURRENT_L2 = 0x5B0E
CURRENT_L3 = 0x5B10
ACTIVE_POWER_TOTAL = 0x5B14  # S32, 0.01 W
INSTANTANEOUS_WORDS = ACTIVE_POWER_TOTAL + 2 - INSTANTANEOUS_START

INVALID_U64 = 0xFFFF_FFFF_FFFF_FFFF
INVALID_U32 = 0xFFFF_FFFF
INVALID_S32 = 0x7FFF_FFFF

# Register resolution as integer ratios to the units of OutletReading.
WH_PER_ENERGY_UNIT = 10  # 0.01 kWh
MA_PER_CURRENT_UNIT = 10  # 0.01 A
POWER_UNITS_PER_W = 100  # 0.01 W

# --- Waveshare Modbus RTU Relay (D) ---
RELAY_MODULE_CHANNELS = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class MeterLimits:
    """What a sound B21 on a 230 V outlet can report; anything outside is a bad reading."""

    max_voltage_dv: int = 3000  # the meter's range ends at 276 V (230 V + 20 %)
    max_current_ma: int = 80_000  # 65 A direct connection, with margin for the meter's overrange
    max_power_w: int = 20_000  # 80 A at 250 V
    # Below one watt a resistive meter reads noise either side of zero (docs/hardware.md §5).
    negative_power_noise_w: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class MeterRegisters:
    """One outlet meter's raw register values, in the meter's own units."""

    energy: int  # 0.01 kWh, unsigned 64 bit
    voltage: int  # 0.1 V, unsigned 32 bit
    current: int  # 0.01 A, unsigned 32 bit
    power: int  # 0.01 W, signed 32 bit

    @classmethod
    def from_quantities(
        cls, *, energy_mj: int, voltage_dv: int, current_ma: int, power_w: int
    ) -> MeterRegisters:
        """What a B21 shows for these physical quantities (energy in millijoules, so exactly)."""
        return cls(
            energy=energy_mj // (WH_PER_ENERGY_UNIT * 3_600_000),
            voltage=voltage_dv,
            current=current_ma // MA_PER_CURRENT_UNIT,
            power=power_w * POWER_UNITS_PER_W,
        )

    def energy_words(self) -> list[int]:
        return split_words(self.energy, 4)

    def instantaneous_words(self) -> list[int]:
        """The block read from INSTANTANEOUS_START; the phases a B21 lacks read invalid."""
        words = [0] * INSTANTANEOUS_WORDS
        _put(words, VOLTAGE_L1, split_words(self.voltage, 2))
        _put(words, VOLTAGE_L2, split_words(INVALID_U32, 2))
        _put(words, VOLTAGE_L3, split_words(INVALID_U32, 2))
        _put(words, CURRENT_L1, split_words(self.current, 2))
        _put(words, CURRENT_L2, split_words(INVALID_U32, 2))
        _put(words, CURRENT_L3, split_words(INVALID_U32, 2))
        _put(words, ACTIVE_POWER_TOTAL, split_words(self.power & 0xFFFF_FFFF, 2))
        return words


INVALID_METER_REGISTERS = MeterRegisters(
    energy=INVALID_U64, voltage=INVALID_U32, current=INVALID_U32, power=INVALID_S32
)


def split_words(value: int, count: int) -> list[int]:
    """An unsigned integer as `count` 16-bit registers, most significant first."""
    if not 0 <= value < 1 << (16 * count):
        raise ValueError(f"{value} does not fit {count} registers")
    return [(value >> (16 * (count - 1 - index))) & 0xFFFF for index in range(count)]


def join_words(words: Sequence[int]) -> int:
    """The unsigned integer held in registers, most significant first."""
    value = 0
    for word in words:
        value = (value << 16) | (word & 0xFFFF)
    return value


def signed_32(value: int) -> int:
    return value - (1 << 32) if value & 0x8000_0000 else value


def _put(words: list[int], address: int, value_words: list[int]) -> None:
    offset = address - INSTANTANEOUS_START
    words[offset : offset + len(value_words)] = value_words


def _word(words: Sequence[int], address: int, count: int) -> int:
    offset = address - INSTANTANEOUS_START
    return join_words(words[offset : offset + count])


def decode_meter_registers(energy_words: Sequence[int], instantaneous_words: Sequence[int]) -> MeterRegisters:
    """Raw values from the two reads of one meter (lengths are checked by the caller)."""
    return MeterRegisters(
        energy=join_words(energy_words),
        voltage=_word(instantaneous_words, VOLTAGE_L1, 2),
        current=_word(instantaneous_words, CURRENT_L1, 2),
        power=signed_32(_word(instantaneous_words, ACTIVE_POWER_TOTAL, 2)),
    )


def outlet_reading(outlet: int, registers: MeterRegisters, limits: MeterLimits) -> OutletReading:
    """Convert raw registers to an OutletReading, exactly, or raise METER_BAD_READING.

    Energy, voltage and current convert by integer multiplication; power is floored to whole
    watts. Invalid markers, negative power and values no B21 can measure are rejected.
    """

    def bad(what: str) -> HardwareError:
        return HardwareError(
            f"outlet {outlet} meter: {what}", code=ErrorCode.METER_BAD_READING, outlet=outlet
        )

    if registers.energy == INVALID_U64:
        raise bad("energy register reads invalid")
    if registers.voltage == INVALID_U32 or registers.current == INVALID_U32:
        raise bad("voltage or current reads invalid")
    if registers.power == INVALID_S32:
        raise bad("power reads invalid")
    voltage_dv = registers.voltage
    current_ma = registers.current * MA_PER_CURRENT_UNIT
    if registers.power < 0:
        if registers.power > -limits.negative_power_noise_w * POWER_UNITS_PER_W:
            power_w = 0
        else:
            raise bad(f"negative active power {registers.power} x 0.01 W on a load-only outlet")
    else:
        power_w = registers.power // POWER_UNITS_PER_W
    if voltage_dv > limits.max_voltage_dv:
        raise bad(f"voltage {voltage_dv} dV out of range")
    if current_ma > limits.max_current_ma:
        raise bad(f"current {current_ma} mA out of range")
    if power_w > limits.max_power_w:
        raise bad(f"power {power_w} W out of range")
    return OutletReading(
        outlet=outlet,
        energy_wh=registers.energy * WH_PER_ENERGY_UNIT,
        voltage_dv=voltage_dv,
        current_ma=current_ma,
        power_w=power_w,
    )


class EnergyHighWater:
    """The highest energy each outlet's meter has shown: a register below it is a bad reading.

    An import register never goes backwards on a sound meter; if it does, the meter was swapped,
    reset or is failing, and billing from it would refund or double-charge. The mark is not
    lowered, so the outlet stays faulted until the register is back above it.
    """

    __slots__ = ("_highest_wh",)

    def __init__(self) -> None:
        self._highest_wh: dict[int, int] = {}

    def check(self, reading: OutletReading) -> OutletReading:
        highest = self._highest_wh.get(reading.outlet, 0)
        if reading.energy_wh < highest:
            raise HardwareError(
                f"outlet {reading.outlet} meter: energy went backwards "
                f"from {highest} Wh to {reading.energy_wh} Wh",
                code=ErrorCode.METER_BAD_READING,
                outlet=reading.outlet,
            )
        self._highest_wh[reading.outlet] = reading.energy_wh
        return reading
