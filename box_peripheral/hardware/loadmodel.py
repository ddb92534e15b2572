"""A physical model of one outlet circuit, in integers, with time passed in.

Shared by the in-memory driver and the simulated plant so that both show the same readings for
the same script (docs/hardware.md §6.1, §7). No clock or I/O here: callers say how many milliseconds
passed. Loads are resistive and draw constant power while the breaker is closed.
"""

from __future__ import annotations

from dataclasses import dataclass

from .registermap import MeterRegisters

NOMINAL_VOLTAGE_DV = 2300
# The supply wanders a little (a triangle wave, one period per simulated minute) and sags under
# load, so readings look alive while staying exactly reproducible.
VOLTAGE_WOBBLE_DV = 20
VOLTAGE_WOBBLE_PERIOD_MS = 60_000
VOLTAGE_SAG_W_PER_DV = 200
# Each outlet's wobble starts at a different point of the wave.
OUTLET_PHASE_MS = 7_000

MJ_PER_WH = 3_600_000


def supply_voltage_dv(*, clock_ms: int, outlet: int, flowing_w: int) -> int:
    """The outlet's L-N voltage at `clock_ms`, in 0.1 V."""
    position = (clock_ms + outlet * OUTLET_PHASE_MS) % VOLTAGE_WOBBLE_PERIOD_MS
    half = VOLTAGE_WOBBLE_PERIOD_MS // 2
    rising = position if position < half else VOLTAGE_WOBBLE_PERIOD_MS - position
    wobble = rising * 2 * VOLTAGE_WOBBLE_DV // half - VOLTAGE_WOBBLE_DV
    return NOMINAL_VOLTAGE_DV + wobble - flowing_w // VOLTAGE_SAG_W_PER_DV


def load_current_ma(*, power_w: int, voltage_dv: int) -> int:
    """I = P / U for a resistive load, in mA (U in 0.1 V)."""
    if voltage_dv <= 0:
        return 0
    return power_w * 10_000 // voltage_dv


@dataclass(slots=True, kw_only=True)
class OutletCircuit:
    """Supply, meter, breaker (a contactor) and whatever is plugged into one outlet.

    The meter sits upstream of the breaker: it shows the supply voltage with the breaker open,
    but current, power and energy only flow through a closed breaker.
    """

    outlet: int
    load_w: int = 0  # what the plugged load draws; 0 means nothing plugged in
    breaker_closed: bool = False
    energy_mj: int = 0  # everything that ever flowed, in millijoules (W x ms), so integers are exact

    @property
    def flowing_w(self) -> int:
        return self.load_w if self.breaker_closed else 0

    def advance(self, elapsed_ms: int) -> None:
        """Let `elapsed_ms` pass at the present load and breaker state."""
        if elapsed_ms > 0:
            self.energy_mj += self.flowing_w * elapsed_ms

    def meter_registers(self, clock_ms: int) -> MeterRegisters:
        flowing = self.flowing_w
        voltage_dv = supply_voltage_dv(clock_ms=clock_ms, outlet=self.outlet, flowing_w=flowing)
        return MeterRegisters.from_quantities(
            energy_mj=self.energy_mj,
            voltage_dv=voltage_dv,
            current_ma=load_current_ma(power_w=flowing, voltage_dv=voltage_dv),
            power_w=flowing,
        )

    @property
    def delivered_mwh(self) -> int:
        """The true energy delivered, in mWh (what a bench compares the box's billing against)."""
        return self.energy_mj * 1000 // MJ_PER_WH
