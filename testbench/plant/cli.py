"""``powerbox plant``: run the simulated plant, or poke a running one (docs/hardware.md §6).

    powerbox plant run --port 5020 --outlets 4 --time-scale 60
    powerbox plant load 2 2000          # plug a 2 kW heater into outlet 2
    powerbox plant door open metering   # open the metering-box door by hand
    powerbox plant fault meter 3 silent # outlet 3's meter stops answering
    powerbox plant status

The poke commands find the plant at --host/--port, or POWERBOX_PLANT_HOST/POWERBOX_PLANT_PORT.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

from testbench._process import print_ready, watch_lifeline

from .client import LOOPBACK, PlantControl, PlantControlError, PlantEndpoint
from .controlmap import DeviceFault, DeviceFaultState, PlantStatus
from .model import (
    DEFAULT_RATED_W,
    MAX_LOAD_W,
    MAX_OUTLETS,
    PlantClock,
    PlantError,
    PlantModel,
    scale_to_milli,
)
from .server import PlantServer

DEFAULT_PORT = 5020  # Modbus's 502 needs root; this is the usual unprivileged stand-in
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

METER_FAULTS = {
    "none": DeviceFault.NONE,
    "silent": DeviceFault.SILENT,
    "exception": DeviceFault.EXCEPTION,
    "invalid": DeviceFault.INVALID_READINGS,
    "absurd": DeviceFault.ABSURD_READINGS,
}
MODULE_FAULTS = {"none": DeviceFault.NONE, "silent": DeviceFault.SILENT, "exception": DeviceFault.EXCEPTION}


@click.group(name="plant")
def plant() -> None:
    """The simulated plant: meters, breaker relays, door locks and switches, and loads."""


@plant.command()
@click.option("--host", default=LOOPBACK, show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65_535),
    default=DEFAULT_PORT,
    envvar="POWERBOX_PLANT_PORT",
    show_default=True,
    help="Modbus TCP port; 0 picks a free one.",
)
@click.option("--outlets", type=click.IntRange(1, MAX_OUTLETS), default=4, show_default=True)
@click.option(
    "--time-scale",
    type=click.FloatRange(0, 1_000_000),
    default=1.0,
    show_default=True,
    help="Simulated seconds per real second (60: a second counts as a minute; 0: paused).",
)
@click.option("--rated-w", type=click.IntRange(1, MAX_LOAD_W), default=DEFAULT_RATED_W, show_default=True)
@click.option("--json", "json_ready", is_flag=True, help="Print one JSON ready line (for programs).")
@click.option("--exit-on-stdin-eof", is_flag=True, hidden=True, help="Exit when stdin closes.")
@click.option("-v", "--verbose", count=True, help="More logging on stderr.")
def run(
    host: str,
    port: int,
    outlets: int,
    time_scale: float,
    rated_w: int,
    json_ready: bool,
    exit_on_stdin_eof: bool,
    verbose: int,
) -> None:
    """Serve the plant over Modbus TCP until interrupted."""
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s plant %(levelname)s %(name)s: %(message)s",
    )
    try:
        model = PlantModel(
            outlets=outlets, rated_w=rated_w, clock=PlantClock(time_scale_milli=scale_to_milli(time_scale))
        )
        asyncio.run(_serve(PlantServer(model, host=host, port=port), json_ready, exit_on_stdin_eof))
    except (OSError, PlantError) as error:
        raise click.ClickException(f"cannot run the plant: {error}") from error


async def _serve(server: PlantServer, json_ready: bool, exit_on_stdin_eof: bool) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if exit_on_stdin_eof:
        watch_lifeline(lambda: loop.call_soon_threadsafe(stop.set))
    await server.start()
    try:
        endpoint = server.endpoint
        if json_ready:
            print_ready({"host": endpoint.host, "port": endpoint.port, "outlets": len(server.model.outlets)})
        else:
            click.echo(f"plant: {len(server.model.outlets)} outlets on Modbus TCP {endpoint}")
        await stop.wait()
    finally:
        await server.stop()
    with contextlib.suppress(Exception):
        sys.stdout.flush()


def _plant_address(command: F) -> F:
    command = click.option(
        "--port",
        type=click.IntRange(1, 65_535),
        default=DEFAULT_PORT,
        envvar="POWERBOX_PLANT_PORT",
        show_default=True,
        help="The running plant's Modbus TCP port.",
    )(command)
    return click.option(
        "--host",
        default=LOOPBACK,
        envvar="POWERBOX_PLANT_HOST",
        show_default=True,
        help="The running plant's host.",
    )(command)


def _poke(host: str, port: int, action: Callable[[PlantControl], Awaitable[T]]) -> T:
    # Failures reach the user as one clean message; pymodbus's own log lines would repeat them.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

    async def poke() -> T:
        async with PlantControl.connect(PlantEndpoint(host=host, port=port)) as control:
            return await action(control)

    try:
        return asyncio.run(poke())
    except (PlantControlError, PlantError) as error:
        raise click.ClickException(str(error)) from error


def _door_number(value: str) -> int:
    if value.lower() in ("metering", "metering-box", "0"):
        return 0
    try:
        outlet = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither 'metering' nor an outlet number") from None
    if not 1 <= outlet <= MAX_OUTLETS:
        raise click.BadParameter(f"outlets are numbered 1 to {MAX_OUTLETS}")
    return outlet


@plant.command()
@click.argument("action", type=click.Choice(["open", "close"]))
@click.argument("door")
@_plant_address
def door(action: str, door: str, host: str, port: int) -> None:
    """Open or close a door by hand: DOOR is 'metering' or an outlet number."""
    number = _door_number(door)
    if action == "open":
        _poke(host, port, lambda control: control.open_door(number))
    else:
        _poke(host, port, lambda control: control.close_door(number))
    click.echo(f"{'metering-box' if number == 0 else f'outlet {number}'} door {action}ed")


@plant.command()
@click.argument("outlet", type=click.IntRange(1, MAX_OUTLETS))
@click.argument("watts", type=click.IntRange(0, MAX_LOAD_W))
@_plant_address
def load(outlet: int, watts: int, host: str, port: int) -> None:
    """Plug a load drawing WATTS into OUTLET (0 unplugs it)."""
    _poke(host, port, lambda control: control.set_load(outlet, watts))
    click.echo(f"outlet {outlet}: {watts} W load plugged in" if watts else f"outlet {outlet}: unplugged")


@plant.command()
@click.argument("outlet", type=click.IntRange(1, MAX_OUTLETS))
@_plant_address
def unplug(outlet: int, host: str, port: int) -> None:
    """Unplug whatever is plugged into OUTLET."""
    _poke(host, port, lambda control: control.unplug(outlet))
    click.echo(f"outlet {outlet}: unplugged")


@plant.command()
@click.argument("outlet", type=click.IntRange(1, MAX_OUTLETS))
@click.option(
    "--percent", type=click.IntRange(101, 1000), default=150, show_default=True, help="Of rated power."
)
@_plant_address
def overload(outlet: int, percent: int, host: str, port: int) -> None:
    """Plug a load above OUTLET's rated power into it."""
    watts = _poke(host, port, lambda control: control.overload(outlet, percent))
    click.echo(f"outlet {outlet}: {watts} W load plugged in ({percent} % of rated)")


@plant.command(name="time")
@click.option("--scale", type=click.FloatRange(0, 1_000_000), help="Simulated seconds per real second.")
@click.option(
    "--advance", type=click.FloatRange(0, 10_000_000), help="Jump the clock ahead by these seconds."
)
@_plant_address
def time_command(scale: float | None, advance: float | None, host: str, port: int) -> None:
    """Change the time scale or jump the simulated clock ahead."""

    async def change(control: PlantControl) -> PlantStatus:
        if scale is not None:
            await control.set_time_scale(scale_to_milli(scale))
        if advance is not None:
            await control.advance(round(advance * 1000))
        return await control.status()

    status = _poke(host, port, change)
    click.echo(f"clock {status.clock_ms / 1000:.3f} s, time scale {status.time_scale_milli / 1000:g}")


@plant.group()
def fault() -> None:
    """Inject faults: silent or refusing devices, bad readings, a dead bus."""


@fault.command(name="meter")
@click.argument("outlet", type=click.IntRange(1, MAX_OUTLETS))
@click.argument("kind", type=click.Choice(sorted(METER_FAULTS)))
@click.option(
    "--code", type=click.IntRange(1, 255), default=4, show_default=True, help="Modbus exception code."
)
@_plant_address
def fault_meter(outlet: int, kind: str, code: int, host: str, port: int) -> None:
    """Make OUTLET's meter misbehave (or 'none' to heal it)."""
    _poke(host, port, lambda control: control.set_fault(outlet, METER_FAULTS[kind], exception_code=code))
    click.echo(f"outlet {outlet} meter: {kind}")


@fault.command(name="module")
@click.argument("module", type=click.Choice(["breakers", "doors"]))
@click.argument("kind", type=click.Choice(sorted(MODULE_FAULTS)))
@click.option(
    "--code", type=click.IntRange(1, 255), default=4, show_default=True, help="Modbus exception code."
)
@_plant_address
def fault_module(module: str, kind: str, code: int, host: str, port: int) -> None:
    """Make the breaker or the door relay module misbehave (or 'none' to heal it)."""

    async def inject(control: PlantControl) -> None:
        status = await control.status()
        unit = status.breaker_module_unit if module == "breakers" else status.door_module_unit
        await control.set_fault(unit, MODULE_FAULTS[kind], exception_code=code)

    _poke(host, port, inject)
    click.echo(f"{module} module: {kind}")


@fault.command(name="bus")
@click.argument("state", type=click.Choice(["down", "up"]))
@_plant_address
def fault_bus(state: str, host: str, port: int) -> None:
    """'down': no field device answers (a cut RS485 cable); 'up': they answer again."""
    _poke(host, port, lambda control: control.set_bus_silent(state == "down"))
    click.echo(f"bus {state}")


@fault.command(name="backwards")
@click.argument("outlet", type=click.IntRange(1, MAX_OUTLETS))
@click.argument("wh", type=click.IntRange(1, 1_000_000))
@_plant_address
def fault_backwards(outlet: int, wh: int, host: str, port: int) -> None:
    """Make OUTLET's energy register jump back by WH."""
    _poke(host, port, lambda control: control.jump_energy_backwards(outlet, wh))
    click.echo(f"outlet {outlet} meter: energy register {wh} Wh back")


@fault.command(name="clear")
@_plant_address
def fault_clear(host: str, port: int) -> None:
    """Heal every device, bring the bus up, undo every energy setback."""
    _poke(host, port, lambda control: control.clear_faults())
    click.echo("all faults cleared")


@plant.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_plant_address
def status(as_json: bool, host: str, port: int) -> None:
    """Show the plant's true state: loads, breakers, doors, locks, energy, faults."""
    plant_status = _poke(host, port, lambda control: control.status())
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(plant_status), indent=2))
        return
    for line in _describe(plant_status):
        click.echo(line)


def _fault_text(fault_state: DeviceFaultState) -> str:
    if fault_state.kind is DeviceFault.NONE:
        return "ok"
    if fault_state.kind is DeviceFault.EXCEPTION:
        return f"exception {fault_state.exception_code}"
    return fault_state.kind.name.lower().replace("_", " ")


def _describe(status: PlantStatus) -> list[str]:
    def shut(closed: bool) -> str:
        return "closed" if closed else "OPEN"

    lines = [
        f"clock {status.clock_ms / 1000:.3f} s (time scale {status.time_scale_milli / 1000:g})"
        + ("  BUS DOWN" if status.bus_silent else ""),
        f"metering box: door {shut(status.metering_door_closed)}, lock pulses {status.metering_lock_pulses}"
        + (" (lock energized)" if status.metering_lock_energized else ""),
        f"breaker module (unit {status.breaker_module_unit}): {_fault_text(status.breaker_module_fault)}; "
        f"door module (unit {status.door_module_unit}): {_fault_text(status.door_module_fault)}",
    ]
    for outlet in status.outlets:
        lines.append(
            f"outlet {outlet.outlet}: load {outlet.load_w} W (rated {outlet.rated_w} W), "
            f"breaker {'closed' if outlet.breaker_closed else 'open'}, door {shut(outlet.door_closed)}, "
            f"lock pulses {outlet.lock_pulses}, delivered {outlet.delivered_mwh / 1000:.3f} Wh, "
            f"meter {_fault_text(outlet.meter_fault)}"
            + (f", register set back {outlet.energy_setback_wh} Wh" if outlet.energy_setback_wh else "")
        )
    return lines
