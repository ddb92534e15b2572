"""The simulated plant: its Modbus devices seen by a plain pymodbus client, its physics, its
control channel, the child-process runner and the `powerbox plant` commands (docs/hardware.md §6).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import pytest
from click.testing import CliRunner
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusIOException

from box_peripheral.hardware import registermap as rm
from powerbox_cli import main
from testbench.plant import (
    CONTROL_UNIT_ID,
    DeviceFault,
    Plant,
    PlantClock,
    PlantControl,
    PlantControlError,
    PlantError,
    PlantModel,
    plant_process,
    running_plant,
)
from testbench.plant import controlmap as cm

pytestmark = pytest.mark.timeout(60)

BREAKERS, DOORS = 100, 101


@pytest.fixture
async def plant() -> AsyncIterator[Plant]:
    async with running_plant(outlets=3, time_scale=0, rated_w=2000) as plant:
        yield plant


@pytest.fixture
async def client(plant: Plant) -> AsyncIterator[AsyncModbusTcpClient]:
    """A box's-eye view: a bare pymodbus client on the plant's bus."""
    client = AsyncModbusTcpClient(
        plant.endpoint.host, port=plant.endpoint.port, timeout=0.2, retries=0, reconnect_delay=0
    )
    assert await client.connect()
    yield client
    client.close()


async def meter_energy(client: AsyncModbusTcpClient, outlet: int) -> int:
    response = await client.read_holding_registers(rm.ACTIVE_IMPORT_ENERGY, count=4, device_id=outlet)
    assert not response.isError()
    return rm.join_words(response.registers)


async def test_the_meter_speaks_the_abb_eq_map(plant: Plant, client: AsyncModbusTcpClient) -> None:
    await plant.control.set_load(1, 2300)
    await client.write_coil(0, True, device_id=BREAKERS)
    await plant.control.advance(36_000)  # 23 Wh
    assert await meter_energy(client, 1) == 2
    block = await client.read_holding_registers(
        rm.INSTANTANEOUS_START, count=rm.INSTANTANEOUS_WORDS, device_id=1
    )
    registers = rm.decode_meter_registers([0, 0, 0, 2], block.registers)
    assert registers.power == 230_000  # 0.01 W
    assert 2200 < registers.voltage < 2400
    assert registers.current * 10 == pytest.approx(2300 * 10_000 // registers.voltage, abs=10)
    # Other function codes and addresses are refused as a B21 would.
    assert (await client.read_input_registers(0, count=2, device_id=1)).isError()
    assert (await client.read_holding_registers(0x6000, count=2, device_id=1)).exception_code == 2


async def test_breaker_relays_really_cut_the_load(plant: Plant, client: AsyncModbusTcpClient) -> None:
    await plant.control.set_load(2, 3600)
    await plant.control.advance(100_000)
    assert await meter_energy(client, 2) == 0
    await client.write_coil(1, True, device_id=BREAKERS)
    assert (await client.read_coils(0, count=8, device_id=BREAKERS)).bits[:3] == [False, True, False]
    await plant.control.advance(100_000)
    assert await meter_energy(client, 2) == 10  # 100 Wh
    await client.write_coils(0, [False] * 3, device_id=BREAKERS)
    await plant.control.advance(100_000)
    assert await meter_energy(client, 2) == 10
    assert (await plant.control.status()).outlet(2).delivered_mwh == 100_000


async def test_lock_coils_open_the_door_they_pulse(plant: Plant, client: AsyncModbusTcpClient) -> None:
    inputs = await client.read_discrete_inputs(0, count=8, device_id=DOORS)
    assert inputs.bits[:8] == [True, True, True, False, False, False, False, True]  # 3 doors, metering on 7
    await client.write_coil(2, True, device_id=DOORS)
    await client.write_coil(2, False, device_id=DOORS)
    await client.write_coil(7, True, device_id=DOORS)
    status = await plant.control.status()
    assert (status.outlet(3).door_closed, status.outlet(3).lock_pulses) == (False, 1)
    assert (status.metering_door_closed, status.metering_lock_energized, status.metering_lock_pulses) == (
        False,
        True,
        1,
    )
    inputs = await client.read_discrete_inputs(0, count=8, device_id=DOORS)
    assert inputs.bits[:8] == [True, True, False, False, False, False, False, False]
    await plant.control.close_door(3)
    await plant.control.close_door(0)
    assert (await client.read_discrete_inputs(0, count=8, device_id=DOORS)).bits[2] is True
    assert (await client.write_coil(9, True, device_id=DOORS)).exception_code == 2


async def test_faults_as_the_bus_sees_them(plant: Plant, client: AsyncModbusTcpClient) -> None:
    await plant.control.set_fault(2, DeviceFault.EXCEPTION, exception_code=6)
    assert (
        await client.read_holding_registers(rm.ACTIVE_IMPORT_ENERGY, count=4, device_id=2)
    ).exception_code == 6
    await plant.control.set_fault(2, DeviceFault.INVALID_READINGS)
    assert await meter_energy(client, 2) == rm.INVALID_U64
    await plant.control.set_fault(DOORS, DeviceFault.SILENT)
    with pytest.raises(ModbusIOException):
        await client.read_discrete_inputs(0, count=8, device_id=DOORS)
    client.close()
    assert await client.connect()
    with pytest.raises(ModbusIOException):
        await client.read_holding_registers(0, count=1, device_id=42)  # nobody at unit 42
    await plant.control.clear_faults()
    client.close()
    assert await client.connect()
    assert (await client.read_discrete_inputs(0, count=8, device_id=DOORS)).bits[0] is True


async def test_energy_setback_and_clearing_it(plant: Plant, client: AsyncModbusTcpClient) -> None:
    await plant.control.set_load(1, 3600)
    await client.write_coil(0, True, device_id=BREAKERS)
    await plant.control.advance(200_000)
    assert await meter_energy(client, 1) == 20
    await plant.control.jump_energy_backwards(1, 15)
    assert await meter_energy(client, 1) == 18  # rounded up to the meter's 10 Wh
    await plant.control.jump_energy_backwards(1, 1000)
    assert await meter_energy(client, 1) == 0  # never below zero
    assert (await plant.control.status()).outlet(1).energy_setback_wh == 1015
    await plant.control.clear_faults()
    assert await meter_energy(client, 1) == 20


async def test_the_control_channel_refuses_what_it_cannot_do(
    plant: Plant, client: AsyncModbusTcpClient
) -> None:
    read_only = cm.RATED_W.address(1)
    refused = await client.write_registers(read_only, [0, 1], device_id=CONTROL_UNIT_ID)
    assert refused.exception_code == 2
    half_a_load = await client.write_registers(cm.LOAD_W.address(1), [5], device_id=CONTROL_UNIT_ID)
    assert half_a_load.exception_code == 2
    bad_fault = await client.write_registers(cm.FAULT_KIND.address(1), [99], device_id=CONTROL_UNIT_ID)
    assert bad_fault.exception_code == 3
    no_device = await client.write_registers(cm.FAULT_KIND.address(42), [1], device_id=CONTROL_UNIT_ID)
    assert no_device.exception_code == 2
    with pytest.raises(PlantControlError, match="refused"):
        await plant.control.set_load(1, 2_000_000)  # beyond any load
    with pytest.raises(PlantControlError, match="does not fit"):
        await plant.control.set_load(1, -1)
    assert (await plant.control.status()).outlet(1).load_w == 0


async def test_status_round_trips_the_model(plant: Plant) -> None:
    await plant.control.set_load(3, 1234)
    assert await plant.control.overload(2) == 3000  # 150 % of 2000 W
    await plant.control.set_fault(BREAKERS, DeviceFault.EXCEPTION, exception_code=11)
    await plant.control.set_bus_silent(True)
    await plant.control.open_door(0)
    await plant.control.advance(5_000)
    status = await plant.control.status()
    assert status == plant.model.status()
    assert status.clock_ms == 5_000
    assert status.bus_silent
    assert not status.metering_door_closed
    assert status.breaker_module_fault == cm.DeviceFaultState(kind=DeviceFault.EXCEPTION, exception_code=11)
    assert [outlet.load_w for outlet in status.outlets] == [0, 3000, 1234]


async def test_time_scale_makes_simulated_time_run(plant: Plant, client: AsyncModbusTcpClient) -> None:
    await plant.control.set_load(1, 3600)
    await client.write_coil(0, True, device_id=BREAKERS)
    await plant.control.set_time_scale(3_600_000)  # a real second is a simulated hour
    for _ in range(1000):  # until energy shows; a hang guard, not a timing assertion
        if await meter_energy(client, 1) > 0:
            break
        await asyncio.sleep(0.01)
    assert await meter_energy(client, 1) > 0
    await plant.control.set_time_scale(0)
    paused = await plant.control.status()
    assert paused.time_scale_milli == 0
    await asyncio.sleep(0.02)
    assert (await plant.control.status()).clock_ms == paused.clock_ms


def test_the_clock_scales_and_jumps_exactly() -> None:
    now = [0]
    clock = PlantClock(time_scale_milli=60_000, monotonic_ns=lambda: now[0])
    now[0] = 1_500_000_000  # 1.5 real seconds
    assert clock.now_ms() == 90_000
    clock.set_time_scale(500)
    now[0] += 4_000_000_000
    assert clock.now_ms() == 92_000
    clock.advance(8_000)
    assert clock.now_ms() == 100_000
    model = PlantModel(outlets=1, clock=clock)
    model.set_load(1, 1000)
    model.set_breaker_relay(0, True)
    now[0] += 7_200_000_000  # 3.6 simulated seconds at half speed
    assert model.status().outlet(1).delivered_mwh == 1000


@pytest.mark.parametrize(
    "poke",
    [
        lambda model: PlantModel(outlets=8),
        lambda model: PlantModel(rated_w=0),
        lambda model: model.set_load(5, 100),
        lambda model: model.set_load(1, -1),
        lambda model: model.set_fault(42, DeviceFault.SILENT),
        lambda model: model.set_fault(1, 7),
        lambda model: model.set_fault(1, DeviceFault.EXCEPTION, 0),
        lambda model: model.advance(-1),
        lambda model: model.set_time_scale(-1),
        lambda model: model.set_energy_setback(1, -5),
        lambda model: model.set_breaker_relay(8, True),
    ],
)
def test_the_model_refuses_nonsense(poke: Callable[[PlantModel], object]) -> None:
    model = PlantModel(outlets=2)
    with pytest.raises(PlantError):
        poke(model)


async def test_the_control_client_survives_a_plant_restart(plant: Plant) -> None:
    async with plant.offline():
        with pytest.raises(PlantControlError, match="plant"):
            await plant.control.status()
    assert (await plant.control.status()).outlet(1).outlet == 1


async def test_a_control_client_for_a_missing_plant_fails_cleanly(plant: Plant) -> None:
    await plant.server.stop()
    with pytest.raises(PlantControlError):
        async with PlantControl.connect(plant.endpoint, timeout_s=0.2):
            pass


# --- the child process and the CLI ---------------------------------------------------------


def invoke(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


async def test_a_plant_process_is_poked_through_the_cli_and_goes_away() -> None:
    async with plant_process(outlets=2, time_scale=0) as plant:
        port = str(plant.endpoint.port)
        assert "2000 W" in await asyncio.to_thread(invoke, "plant", "load", "2", "2000", "--port", port)
        await asyncio.to_thread(invoke, "plant", "door", "open", "metering", "--port", port)
        await asyncio.to_thread(invoke, "plant", "door", "open", "1", "--port", port)
        await asyncio.to_thread(
            invoke, "plant", "fault", "meter", "2", "exception", "--code", "6", "--port", port
        )
        await asyncio.to_thread(invoke, "plant", "fault", "module", "doors", "silent", "--port", port)
        await asyncio.to_thread(invoke, "plant", "fault", "bus", "down", "--port", port)
        await asyncio.to_thread(invoke, "plant", "fault", "backwards", "1", "20", "--port", port)
        await asyncio.to_thread(invoke, "plant", "overload", "1", "--port", port)
        assert "12.000 s" in await asyncio.to_thread(
            invoke, "plant", "time", "--advance", "12", "--port", port
        )
        text = await asyncio.to_thread(invoke, "plant", "status", "--port", port)
        assert "BUS DOWN" in text
        assert "exception 6" in text
        status = json.loads(await asyncio.to_thread(invoke, "plant", "status", "--json", "--port", port))
        assert status["outlets"][1]["load_w"] == 2000
        assert status["outlets"][0]["load_w"] == 5250
        assert status["outlets"][1]["meter_fault"] == {"kind": 2, "exception_code": 6}
        assert status["door_module_fault"]["kind"] == 1
        assert not status["metering_door_closed"]
        assert not status["outlets"][0]["door_closed"]
        assert status["outlets"][0]["energy_setback_wh"] == 20
        assert status["clock_ms"] == 12_000
        await asyncio.to_thread(invoke, "plant", "fault", "clear", "--port", port)
        await asyncio.to_thread(invoke, "plant", "unplug", "2", "--port", port)
        final = await plant.control.status()
        assert final.outlet(2).load_w == 0
        assert not final.bus_silent
        process = plant.process
    assert not process.alive


def test_poking_a_plant_that_is_not_there_is_a_clean_error() -> None:
    result = CliRunner().invoke(main, ["plant", "status", "--port", "1"])
    assert result.exit_code == 1
    assert "plant at 127.0.0.1:1" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["plant", "run", "--outlets", "8"],
        ["plant", "load", "9", "100"],
        ["plant", "door", "ajar", "1"],
        ["plant", "door", "open", "lobby"],
        ["plant", "fault", "meter", "1", "melted"],
    ],
)
def test_bad_plant_commands_are_usage_errors(args: list[str]) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output


def test_the_plant_is_a_powerbox_subcommand() -> None:
    assert "simulated plant" in invoke("--help")
    for command in ("run", "door", "load", "unplug", "fault", "status", "time", "overload"):
        assert command in invoke("plant", "--help")
