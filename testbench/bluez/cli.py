"""``powerbox bluez``: the org.bluez emulator and BLE nodes from the command line."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from testbench.bluez.emulator import Emulator, EmulatorSettings
from testbench.bluez.node import BUS_ADDRESS_VARIABLE, run_node
from testbench.radio.hub import ControllerEndpoint

_F = TypeVar("_F", bound=Callable[..., Any])


def _controllers(values: Sequence[str]) -> list[ControllerEndpoint]:
    try:
        return [ControllerEndpoint.parse(value) for value in values]
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--controller") from None


def _settings(**options: Any) -> EmulatorSettings:
    try:
        return EmulatorSettings(
            att_mtu=options["att_mtu"],
            advertising_interval_ms=options["advertising_interval"],
            connect_timeout_s=options["connect_timeout"],
            disconnect_delay_s=options["disconnect_delay"],
            temporary_device_timeout_s=options["temporary_device_timeout"],
            max_advertisements=options["max_advertisements"],
            adapter_name=options["adapter_name"],
        )
    except ValueError as error:
        raise click.UsageError(str(error)) from None


def _emulator_options(command: _F) -> _F:
    defaults = EmulatorSettings()
    options = [
        click.option("--controller", "controllers", multiple=True, required=True, metavar="HOST:PORT",
                     help="A radio controller; repeat for hci1, hci2..."),
        click.option("--att-mtu", type=int, default=defaults.att_mtu, show_default=True),
        click.option("--advertising-interval", type=float, default=defaults.advertising_interval_ms,
                     show_default=True, help="Milliseconds between advertisements."),
        click.option("--connect-timeout", type=float, default=defaults.connect_timeout_s, show_default=True),
        click.option("--disconnect-delay", type=float, default=defaults.disconnect_delay_s, show_default=True,
                     help="Seconds Device1.Disconnect waits before dropping the link (BlueZ: 2)."),
        click.option("--temporary-device-timeout", type=float, default=defaults.temporary_device_timeout_s,
                     show_default=True),
        click.option("--max-advertisements", type=int, default=defaults.max_advertisements,
                     show_default=True),
        click.option("--adapter-name", default=defaults.adapter_name, show_default=True),
        click.option("-v", "--verbose", count=True, help="More logging on stderr."),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


def _setup_logging(verbose: int, what: str) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format=f"%(asctime)s {what} %(levelname)s %(name)s: %(message)s",
    )
    if verbose < 3:
        # bumble is very chatty at INFO and DEBUG.
        logging.getLogger("bumble").setLevel(logging.WARNING)


@click.group(name="bluez")
def bluez() -> None:
    """The org.bluez emulator: unmodified bless and bleak over the virtual radio."""


@bluez.command(name="node")
@_emulator_options
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the bus socket and config go (default: a new temporary directory).",
)
@click.option("--json", "json_ready", is_flag=True, help="Print one JSON ready line on stdout.")
@click.option("--exit-on-stdin-eof", is_flag=True, hidden=True)
def node(
    controllers: tuple[str, ...],
    work_dir: Path | None,
    json_ready: bool,
    exit_on_stdin_eof: bool,
    verbose: int,
    **options: Any,
) -> None:
    """Bring up a BLE node: a private dbus-daemon and the emulator, one adapter per controller.

    Prints the DBUS_SYSTEM_BUS_ADDRESS that bless and bleak processes must use; runs until
    interrupted.
    """
    _setup_logging(verbose, "node")
    status = run_node(
        _controllers(controllers),
        settings=_settings(**options),
        work_dir=work_dir,
        json_ready=json_ready,
        exit_on_stdin_eof=exit_on_stdin_eof,
    )
    sys.exit(status)


@bluez.command(name="emulator")
@_emulator_options
def emulator(controllers: tuple[str, ...], verbose: int, **options: Any) -> None:
    """Run only the emulator, on the bus named by DBUS_SYSTEM_BUS_ADDRESS."""
    _setup_logging(verbose, "emulator")
    bus_address = os.environ.get(BUS_ADDRESS_VARIABLE)
    if not bus_address:
        raise click.UsageError(f"{BUS_ADDRESS_VARIABLE} is not set")
    sys.exit(asyncio.run(_run_emulator(bus_address, _controllers(controllers), _settings(**options))))


async def _run_emulator(
    bus_address: str, controllers: list[ControllerEndpoint], settings: EmulatorSettings
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    instance = Emulator(bus_address=bus_address, controllers=controllers, settings=settings)
    try:
        await instance.start()
    except Exception as error:
        await instance.close()
        raise click.ClickException(f"the emulator did not start: {error}") from None
    click.echo(f"org.bluez up on {bus_address}: {', '.join(a.name for a in instance.adapters)}")
    closed = asyncio.ensure_future(instance.wait_closed())
    stopped = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({closed, stopped}, return_when=asyncio.FIRST_COMPLETED)
    for future in (closed, stopped):
        if future not in done:
            future.cancel()
    await instance.close()
    if closed in done:
        click.echo(f"emulator stopping: {closed.result()}", err=True)
        return 1
    return 0
