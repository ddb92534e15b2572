"""The hardware layer: the Modbus driver against the simulated plant over TCP on loopback, the
in-memory driver, and one contract script both must pass with the same readings (docs/hardware.md).

The plant's clock is paused in these tests and moved by hand, so every number is exact. Calls that
are expected to fail run under `bounded`, which turns a hang into a failure; nothing here asserts
on durations.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

from box_peripheral.hardware import (
    BoxHardware,
    DoorStates,
    HardwareConfig,
    HardwareConfigError,
    HardwareError,
    HardwareKind,
    OutletReading,
    Parity,
    connected,
    open_hardware,
)
from box_peripheral.hardware import registermap as rm
from box_peripheral.hardware.memory import MemoryHardware
from box_peripheral.hardware.modbus import ModbusHardware
from protocol.errors import ErrorCode, LocalProtocolError
from protocol.tokens import Door
from testbench.plant import DeviceFault, Plant, running_plant

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")
REQUEST_TIMEOUT_MS = 100
DOCS = Path(__file__).resolve().parents[2] / "docs" / "hardware.md"


async def bounded(call: Awaitable[T]) -> T:
    """Fail the test instead of hanging; a generous bound, not a timing assertion."""
    async with asyncio.timeout(10):
        return await call


def tcp_config(plant: Plant, **overrides: Any) -> HardwareConfig:
    settings: dict[str, Any] = {
        "kind": HardwareKind.MODBUS_TCP,
        "host": plant.endpoint.host,
        "port": plant.endpoint.port,
        "request_timeout_ms": REQUEST_TIMEOUT_MS,
        "lock_pulse_ms": 10,
    }
    settings.update(overrides)
    return HardwareConfig(**settings)


@pytest.fixture
async def plant() -> AsyncIterator[Plant]:
    async with running_plant(outlets=4, time_scale=0) as plant:
        yield plant


@pytest.fixture
async def modbus(plant: Plant) -> AsyncIterator[BoxHardware]:
    async with connected(open_hardware(tcp_config(plant))) as hardware:
        yield hardware


async def expect_failure(call: Awaitable[Any], code: ErrorCode, outlet: int | None) -> HardwareError:
    with pytest.raises(HardwareError) as caught:
        await bounded(call)
    assert (caught.value.code, caught.value.outlet) == (code, outlet), caught.value.detail
    return caught.value


# --- the contract: one script, two drivers --------------------------------------------------


class Rig(Protocol):
    """What the contract script does to the world around a driver."""

    @property
    def hardware(self) -> BoxHardware: ...

    async def set_load(self, outlet: int, watts: int) -> None: ...
    async def advance(self, milliseconds: int) -> None: ...
    async def set_door(self, outlet: int, closed: bool) -> None: ...
    async def break_meter(self, outlet: int, code: ErrorCode) -> None: ...
    async def jump_energy_backwards(self, outlet: int, wh: int) -> None: ...
    async def heal(self) -> None: ...
    async def set_bus_down(self, down: bool) -> None: ...


@dataclass
class MemoryRig:
    hardware: MemoryHardware

    async def set_load(self, outlet: int, watts: int) -> None:
        self.hardware.set_load(outlet, watts)

    async def advance(self, milliseconds: int) -> None:
        self.hardware.advance(milliseconds)

    async def set_door(self, outlet: int, closed: bool) -> None:
        door = Door.METERING_BOX if outlet == 0 else Door.OUTLET
        if closed:
            self.hardware.close_door(door, outlet)
        else:
            self.hardware.open_door(door, outlet)

    async def break_meter(self, outlet: int, code: ErrorCode) -> None:
        self.hardware.fail_next_read(outlet, code)

    async def jump_energy_backwards(self, outlet: int, wh: int) -> None:
        self.hardware.jump_energy_backwards(outlet, wh)

    async def heal(self) -> None:
        self.hardware.clear_faults()

    async def set_bus_down(self, down: bool) -> None:
        self.hardware.set_bus_down(down)


@dataclass
class PlantRig:
    hardware: BoxHardware
    plant: Plant

    async def set_load(self, outlet: int, watts: int) -> None:
        await self.plant.control.set_load(outlet, watts)

    async def advance(self, milliseconds: int) -> None:
        await self.plant.control.advance(milliseconds)

    async def set_door(self, outlet: int, closed: bool) -> None:
        if closed:
            await self.plant.control.close_door(outlet)
        else:
            await self.plant.control.open_door(outlet)

    async def break_meter(self, outlet: int, code: ErrorCode) -> None:
        fault = {
            ErrorCode.METER_TIMEOUT: DeviceFault.SILENT,
            ErrorCode.METER_BAD_READING: DeviceFault.EXCEPTION,
        }
        await self.plant.control.set_fault(outlet, fault[code])

    async def jump_energy_backwards(self, outlet: int, wh: int) -> None:
        await self.plant.control.jump_energy_backwards(outlet, wh)

    async def heal(self) -> None:
        await self.plant.control.clear_faults()

    async def set_bus_down(self, down: bool) -> None:
        # The whole bus unreachable: the TCP listener goes away and comes back on the same port.
        if down:
            await self.plant.server.stop()
        else:
            await self.plant.server.start()


async def contract_script(rig: Rig) -> list[object]:
    """Everything the daemon relies on; returns what it saw, to compare the drivers."""
    hardware = rig.hardware
    seen: list[object] = []
    assert hardware.outlets == (1, 2, 3, 4)

    doors = await hardware.read_doors()
    assert doors == DoorStates(
        metering_box_closed=True, outlet_doors_closed={1: True, 2: True, 3: True, 4: True}
    )
    seen.append(doors)

    # A heater plugged in behind an open breaker draws nothing and counts nothing.
    await rig.set_load(2, 2000)
    await rig.advance(60_000)
    idle = await hardware.read_outlet(2)
    assert (idle.energy_wh, idle.power_w, idle.current_ma) == (0, 0, 0)
    assert 2200 < idle.voltage_dv < 2400  # the meter sits upstream of the breaker
    seen.append(idle)
    assert not await hardware.breaker_closed(2)

    # Breaker closed: power flows and a minute at 2 kW is 33.3 Wh, shown in the meter's 10 Wh steps.
    await hardware.set_breaker(2, True)
    assert await hardware.breaker_closed(2)
    flowing = await hardware.read_outlet(2)
    assert flowing.power_w == 2000
    assert flowing.current_ma == pytest.approx(2000 * 10_000 // flowing.voltage_dv, abs=10)
    seen.append(flowing)
    await rig.advance(60_000)
    after_a_minute = await hardware.read_outlet(2)
    assert after_a_minute.energy_wh == 30
    seen.append(after_a_minute)
    assert (await hardware.read_outlet(1)).energy_wh == 0  # only outlet 2's breaker is closed

    # An overload is simply visible as power above the rating; acting on it is the daemon's job.
    await rig.set_load(2, 5000)
    overloaded = await hardware.read_outlet(2)
    assert overloaded.power_w == 5000
    seen.append(overloaded)

    # Breaker open again: the energy stays where it was.
    await hardware.set_breaker(2, False)
    await rig.advance(600_000)
    stopped = await hardware.read_outlet(2)
    assert (stopped.energy_wh, stopped.power_w) == (30, 0)
    seen.append(stopped)

    # A lock pulse lets the door spring open; a person closes it again.
    await hardware.unlock_door(Door.OUTLET, 2)
    doors = await hardware.read_doors()
    assert doors.outlet_doors_closed == {1: True, 2: False, 3: True, 4: True}
    assert doors.metering_box_closed
    seen.append(doors)
    await rig.set_door(2, closed=True)
    await hardware.unlock_door(Door.METERING_BOX, 0)
    assert not (await hardware.read_doors()).metering_box_closed
    await rig.set_door(0, closed=True)
    await rig.set_door(4, closed=False)  # forced open, by hand
    doors = await hardware.read_doors()
    assert doors.outlet_doors_closed[4] is False
    assert doors.metering_box_closed
    seen.append(doors)
    await rig.set_door(4, closed=True)

    # Meter faults carry their code and outlet, and heal.
    for code in (ErrorCode.METER_TIMEOUT, ErrorCode.METER_BAD_READING):
        await rig.break_meter(3, code)
        error = await expect_failure(hardware.read_outlet(3), code, 3)
        seen.append((error.code, error.outlet))
        await rig.heal()
        assert (await hardware.read_outlet(3)).outlet == 3

    # An energy register that goes backwards is a bad reading until it is back above its best.
    await hardware.set_breaker(1, True)
    await rig.set_load(1, 3600)
    await rig.advance(100_000)  # 100 Wh
    assert (await hardware.read_outlet(1)).energy_wh == 100
    await rig.jump_energy_backwards(1, 25)
    error = await expect_failure(hardware.read_outlet(1), ErrorCode.METER_BAD_READING, 1)
    seen.append((error.code, error.outlet))
    await rig.heal()
    assert (await hardware.read_outlet(1)).energy_wh == 100
    await hardware.set_breaker(1, False)

    # The whole bus down: every call is a bus fault for no outlet in particular, then it recovers.
    await rig.set_bus_down(True)
    for call in (hardware.read_outlet(1), hardware.read_doors(), hardware.set_breaker(3, False)):
        error = await expect_failure(call, ErrorCode.BUS_FAULT, None)
        seen.append((error.code, error.outlet))
    await rig.set_bus_down(False)
    seen.append(await hardware.read_outlet(2))

    # Misuse is the caller's bug, not a hardware fault.
    for misuse in (
        hardware.read_outlet(9),
        hardware.set_breaker(0, True),
        hardware.unlock_door(Door.METERING_BOX, 2),
        hardware.unlock_door(Door.OUTLET, 0),
    ):
        with pytest.raises(LocalProtocolError) as caught:
            await bounded(misuse)
        assert caught.value.code is ErrorCode.OUTLET_UNKNOWN

    await hardware.close()
    await hardware.close()  # closing twice is harmless
    error = await expect_failure(hardware.read_outlet(2), ErrorCode.BUS_FAULT, None)
    seen.append((error.code, error.outlet))
    return seen


async def test_contract_memory() -> None:
    await contract_script(MemoryRig(MemoryHardware()))


async def test_contract_modbus(plant: Plant, modbus: BoxHardware) -> None:
    await contract_script(PlantRig(modbus, plant))


async def test_memory_and_modbus_drivers_see_the_same_readings() -> None:
    memory_saw = await contract_script(MemoryRig(MemoryHardware()))
    async with (
        running_plant(outlets=4, time_scale=0) as plant,
        connected(open_hardware(tcp_config(plant))) as modbus,
    ):
        modbus_saw = await contract_script(PlantRig(modbus, plant))
    assert modbus_saw == memory_saw
    assert any(isinstance(item, OutletReading) and item.power_w == 5000 for item in memory_saw)


# --- the Modbus driver against the plant ------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "exception_code", "expected"),
    [
        (DeviceFault.SILENT, 4, ErrorCode.METER_TIMEOUT),
        (DeviceFault.EXCEPTION, 4, ErrorCode.METER_BAD_READING),  # server device failure
        (DeviceFault.EXCEPTION, 2, ErrorCode.METER_BAD_READING),  # illegal address
        (DeviceFault.EXCEPTION, 6, ErrorCode.METER_BAD_READING),  # busy: retried once, then given up
        (DeviceFault.EXCEPTION, 11, ErrorCode.METER_TIMEOUT),  # a gateway says the meter is silent
        (DeviceFault.INVALID_READINGS, 4, ErrorCode.METER_BAD_READING),
        (DeviceFault.ABSURD_READINGS, 4, ErrorCode.METER_BAD_READING),
    ],
)
async def test_every_meter_fault_maps_to_its_code(
    plant: Plant, modbus: BoxHardware, fault: DeviceFault, exception_code: int, expected: ErrorCode
) -> None:
    await plant.control.set_fault(3, fault, exception_code=exception_code)
    await expect_failure(modbus.read_outlet(3), expected, 3)
    assert (await modbus.read_outlet(2)).outlet == 2  # the other meters are unaffected
    await plant.control.set_fault(3, DeviceFault.NONE)
    assert (await bounded(modbus.read_outlet(3))).outlet == 3


@pytest.mark.parametrize("fault", [DeviceFault.SILENT, DeviceFault.EXCEPTION])
async def test_relay_module_faults_are_bus_faults_for_the_outlet_concerned(
    plant: Plant, modbus: BoxHardware, fault: DeviceFault
) -> None:
    status = await plant.control.status()
    await plant.control.set_fault(status.breaker_module_unit, fault)
    await expect_failure(modbus.set_breaker(2, True), ErrorCode.BUS_FAULT, 2)
    await expect_failure(modbus.breaker_closed(3), ErrorCode.BUS_FAULT, 3)
    await plant.control.set_fault(status.door_module_unit, fault)
    await expect_failure(modbus.read_doors(), ErrorCode.BUS_FAULT, None)
    await expect_failure(modbus.unlock_door(Door.OUTLET, 4), ErrorCode.BUS_FAULT, 4)
    await expect_failure(modbus.unlock_door(Door.METERING_BOX, 0), ErrorCode.BUS_FAULT, None)
    await plant.control.clear_faults()
    await modbus.set_breaker(2, True)
    assert (await plant.control.status()).outlet(2).breaker_closed


async def test_a_silent_bus_times_out_each_device(plant: Plant, modbus: BoxHardware) -> None:
    await plant.control.set_bus_silent(True)
    await expect_failure(modbus.read_outlet(1), ErrorCode.METER_TIMEOUT, 1)
    await expect_failure(modbus.set_breaker(1, True), ErrorCode.BUS_FAULT, 1)
    await plant.control.set_bus_silent(False)
    assert (await bounded(modbus.read_outlet(1))).outlet == 1


async def test_the_driver_reconnects_after_the_plant_restarts(plant: Plant, modbus: BoxHardware) -> None:
    assert (await modbus.read_outlet(1)).outlet == 1
    async with plant.offline():
        await expect_failure(modbus.read_outlet(1), ErrorCode.BUS_FAULT, None)
        await expect_failure(modbus.unlock_door(Door.OUTLET, 1), ErrorCode.BUS_FAULT, None)
    assert (await bounded(modbus.read_outlet(1))).outlet == 1


async def test_connecting_to_nothing_is_a_bus_fault(plant: Plant) -> None:
    config = tcp_config(plant)
    await plant.server.stop()
    hardware = open_hardware(config)
    await expect_failure(hardware.connect(), ErrorCode.BUS_FAULT, None)
    await hardware.close()


async def test_a_missing_serial_port_is_a_bus_fault_not_a_crash(tmp_path: Path) -> None:
    config = HardwareConfig(
        kind=HardwareKind.MODBUS_RTU,
        serial_port=str(tmp_path / "no-such-tty"),
        baudrate=19_200,
        parity=Parity.EVEN,
        request_timeout_ms=REQUEST_TIMEOUT_MS,
    )
    hardware = open_hardware(config)
    assert isinstance(hardware, ModbusHardware)
    await expect_failure(hardware.connect(), ErrorCode.BUS_FAULT, None)
    await expect_failure(hardware.read_outlet(1), ErrorCode.BUS_FAULT, None)
    await hardware.close()


async def test_concurrent_calls_share_the_bus_one_request_at_a_time(
    plant: Plant, modbus: BoxHardware
) -> None:
    for outlet in (1, 2, 3, 4):
        await plant.control.set_load(outlet, 1000 * outlet)
    await asyncio.gather(*(modbus.set_breaker(outlet, True) for outlet in (1, 2, 3, 4)))
    readings = await asyncio.gather(
        *(modbus.read_outlet(outlet) for outlet in (1, 2, 3, 4)), modbus.read_doors()
    )
    assert [reading.power_w for reading in readings[:4] if isinstance(reading, OutletReading)] == [
        1000,
        2000,
        3000,
        4000,
    ]


async def test_a_cancelled_unlock_still_releases_the_lock(plant: Plant) -> None:
    async with connected(open_hardware(tcp_config(plant, lock_pulse_ms=10_000))) as hardware:
        unlocking = asyncio.create_task(hardware.unlock_door(Door.OUTLET, 3))
        for _ in range(2000):  # until the lock is energized; a hang guard, not a timing assertion
            if plant.model.status().outlet(3).lock_energized:
                break
            await asyncio.sleep(0.005)
        assert plant.model.status().outlet(3).lock_energized
        unlocking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await unlocking
        status = plant.model.status().outlet(3)
        assert not status.lock_energized
        assert (status.lock_pulses, status.door_closed) == (1, False)


async def test_readings_follow_the_plant_exactly(plant: Plant, modbus: BoxHardware) -> None:
    await plant.control.set_load(4, 3500)
    await modbus.set_breaker(4, True)
    await plant.control.advance(3_600_000)  # an hour at 3.5 kW
    reading = await modbus.read_outlet(4)
    circuit_registers = plant.model.meter_registers(4)
    assert reading == rm.outlet_reading(4, circuit_registers, rm.MeterLimits())
    assert reading.energy_wh == 3500
    assert (await plant.control.status()).outlet(4).delivered_mwh == 3_500_000


# --- the in-memory driver ---------------------------------------------------------------------


async def test_memory_failures_are_one_shot_and_hooks_check_their_input() -> None:
    hardware = MemoryHardware(outlets=(1, 2))
    hardware.fail_next_read(1, ErrorCode.METER_TIMEOUT)
    await expect_failure(hardware.read_outlet(1), ErrorCode.METER_TIMEOUT, 1)
    assert (await hardware.read_outlet(1)).outlet == 1
    bad_hooks: list[Callable[[], object]] = [
        lambda: hardware.set_load(1, -5),
        lambda: hardware.advance(-1),
        lambda: hardware.fail_next_read(1, ErrorCode.GRANT_SPENT),
        lambda: hardware.jump_energy_backwards(2, -10),
    ]
    for bad_hook in bad_hooks:
        with pytest.raises(ValueError, match=r"."):
            bad_hook()
    with pytest.raises(LocalProtocolError):
        hardware.set_load(3, 100)


async def test_memory_time_only_moves_when_told() -> None:
    hardware = MemoryHardware(outlets=(1,))
    hardware.set_load(1, 1000)
    await hardware.set_breaker(1, True)
    assert (await hardware.read_outlet(1)).energy_wh == 0
    hardware.advance(365 * 24 * 3_600_000)  # a year, instantly
    assert (await hardware.read_outlet(1)).energy_wh == 8_760_000
    assert hardware.delivered_mwh(1) == 8_760_000_000
    await hardware.unlock_door(Door.OUTLET, 1)
    assert hardware.lock_pulses(Door.OUTLET, 1) == 1


# --- register map, conversions and plausibility ----------------------------------------------


def test_meter_registers_convert_exactly() -> None:
    registers = rm.MeterRegisters.from_quantities(
        energy_mj=123 * 36_000_000 + 35_999_999, voltage_dv=2301, current_ma=15_679, power_w=3600
    )
    assert (registers.energy, registers.voltage, registers.current, registers.power) == (
        123,
        2301,
        1567,
        360_000,
    )
    decoded = rm.decode_meter_registers(registers.energy_words(), registers.instantaneous_words())
    assert decoded == registers
    reading = rm.outlet_reading(5, decoded, rm.MeterLimits())
    assert reading == OutletReading(
        outlet=5, energy_wh=1230, voltage_dv=2301, current_ma=15_670, power_w=3600
    )


@pytest.mark.parametrize(
    ("changes", "matches"),
    [
        ({"energy": rm.INVALID_U64}, "energy register reads invalid"),
        ({"voltage": rm.INVALID_U32}, "invalid"),
        ({"current": rm.INVALID_U32}, "invalid"),
        ({"power": rm.INVALID_S32}, "power reads invalid"),
        ({"power": -100}, "negative"),
        ({"voltage": 3001}, "voltage"),
        ({"current": 8001}, "current"),
        ({"power": 2_000_100 * 100}, "power"),
    ],
)
def test_absurd_registers_are_bad_readings(changes: dict[str, int], matches: str) -> None:
    fields = {"energy": 10, "voltage": 2300, "current": 100, "power": 23_000} | changes
    with pytest.raises(HardwareError, match=matches) as caught:
        rm.outlet_reading(2, rm.MeterRegisters(**fields), rm.MeterLimits())
    assert (caught.value.code, caught.value.outlet) == (ErrorCode.METER_BAD_READING, 2)


def test_noise_below_one_watt_reads_as_zero() -> None:
    registers = rm.MeterRegisters(energy=0, voltage=2300, current=0, power=-99)
    assert rm.outlet_reading(1, registers, rm.MeterLimits()).power_w == 0


def test_signed_power_survives_the_wire() -> None:
    registers = rm.MeterRegisters(energy=0, voltage=2300, current=0, power=-123_456)
    words = registers.instantaneous_words()
    assert rm.decode_meter_registers(registers.energy_words(), words).power == -123_456
    offset = rm.VOLTAGE_L2 - rm.INSTANTANEOUS_START
    assert rm.join_words(words[offset : offset + 2]) == rm.INVALID_U32  # a B21 has no L2
    with pytest.raises(ValueError, match="does not fit"):
        rm.split_words(1 << 32, 2)


def test_the_documented_meter_map_is_the_one_in_the_code() -> None:
    """docs/hardware.md §2.1 and registermap.py must not drift apart."""
    rows = re.findall(r"^\| `0x([0-9A-F]{4})` \| (\d) \| ([US]\d\d) \| ([^|]+) \|", DOCS.read_text(), re.M)
    documented = {
        int(address, 16): (int(words), kind, resolution.strip()) for address, words, kind, resolution in rows
    }
    assert documented[rm.ACTIVE_IMPORT_ENERGY] == (rm.ENERGY_WORDS, "U64", "0.01 kWh")
    assert documented[rm.VOLTAGE_L1] == (2, "U32", "0.1 V")
    assert documented[rm.CURRENT_L1] == (2, "U32", "0.01 A")
    assert documented[rm.ACTIVE_POWER_TOTAL] == (2, "S32", "0.01 W")
    assert (rm.WH_PER_ENERGY_UNIT, rm.MA_PER_CURRENT_UNIT, rm.POWER_UNITS_PER_W) == (10, 10, 100)
    last = max(documented)
    assert last + documented[last][0] - rm.INSTANTANEOUS_START == rm.INSTANTANEOUS_WORDS


# --- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "table",
    [
        {},
        {"kind": "zigbee"},
        {"kind": ["modbus-tcp"]},
        {"kind": "modbus-rtu"},
        {"kind": "modbus-rtu", "serial_port": 7},
        {"kind": "modbus-rtu", "serial_port": "tty", "parity": "X"},
        {"kind": "modbus-rtu", "serial_port": "tty", "baudrate": "fast"},
        {"kind": "modbus-tcp", "port": 70_000},
        {"kind": "modbus-tcp", "host": ""},
        {"kind": "modbus-tcp", "outlets": "1,2"},
        {"kind": "modbus-tcp", "outlets": [1, 1]},
        {"kind": "modbus-tcp", "outlets": [1, 2, 3, 4, 5, 6, 7, 8]},  # eight locks plus the metering box
        {"kind": "modbus-tcp", "outlets": [True]},
        {"kind": "modbus-tcp", "breaker_module_unit_id": 2},  # a meter's unit id
        {"kind": "modbus-tcp", "metering_lock_coil": 1},  # outlet 2's lock
        {"kind": "modbus-tcp", "request_timeout_ms": 0},
        {"kind": "memory", "colour": "red"},
    ],
)
def test_bad_hardware_tables_are_refused_with_a_reason(table: dict[str, Any]) -> None:
    with pytest.raises(HardwareConfigError) as caught:
        open_hardware(table)
    assert caught.value.detail


def test_a_toml_table_and_the_certificate_outlets_choose_the_driver() -> None:
    memory = open_hardware({"kind": "memory"}, outlets=[1, 2, 12])
    assert isinstance(memory, MemoryHardware)
    assert memory.outlets == (1, 2, 12)
    modbus = open_hardware(
        {"kind": "modbus-rtu", "serial_port": "tty", "parity": "E", "outlets": [1, 2]}, outlets=(1, 2, 3)
    )
    assert isinstance(modbus, ModbusHardware)
    assert modbus.outlets == (1, 2, 3)
    with pytest.raises(HardwareConfigError):
        open_hardware({"kind": "modbus-tcp"}, outlets=range(1, 9))
