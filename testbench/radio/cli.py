"""``powerbox radio``: run the virtual radio in the foreground."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

import click

from testbench._process import print_ready, watch_lifeline
from testbench.radio.hub import LOOPBACK, VirtualRadio


@click.command(name="radio")
@click.option(
    "--nodes",
    "controllers",
    type=click.IntRange(1, 1024),
    default=2,
    show_default=True,
    help="Number of linked virtual controllers (one per BLE adapter).",
)
@click.option(
    "--port",
    "base_port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="TCP port of the first controller (the rest follow); 0 picks free ports.",
)
@click.option("--host", default=LOOPBACK, show_default=True, help="Address to listen on.")
@click.option(
    "--link-loss-delay",
    type=click.FloatRange(0, 60),
    default=0.0,
    show_default=True,
    help="Seconds before peers see the links of a dead host drop (supervision timeout).",
)
@click.option(
    "--json",
    "json_ready",
    is_flag=True,
    help="Print one JSON ready line on stdout (for programs that start the radio).",
)
@click.option(
    "--exit-on-stdin-eof",
    is_flag=True,
    hidden=True,
    help="Exit when stdin closes (the parent process is gone).",
)
@click.option("-v", "--verbose", count=True, help="More logging on stderr.")
def radio(
    controllers: int,
    base_port: int,
    host: str,
    link_loss_delay: float,
    json_ready: bool,
    exit_on_stdin_eof: bool,
    verbose: int,
) -> None:
    """Host N linked bumble virtual controllers, each as HCI over TCP on its own port."""
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s radio %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(_serve(controllers, base_port, host, link_loss_delay, json_ready, exit_on_stdin_eof))
    except OSError as error:
        raise click.ClickException(f"cannot start the radio: {error}") from error


async def _serve(
    controllers: int,
    base_port: int,
    host: str,
    link_loss_delay: float,
    json_ready: bool,
    exit_on_stdin_eof: bool,
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if exit_on_stdin_eof:
        watch_lifeline(lambda: loop.call_soon_threadsafe(stop.set))
    async with VirtualRadio(
        controllers=controllers, host=host, base_port=base_port, link_loss_delay=link_loss_delay
    ) as virtual_radio:
        ports = [endpoint.port for endpoint in virtual_radio.endpoints]
        if json_ready:
            print_ready({"host": host, "ports": ports})
        else:
            click.echo(f"radio: {controllers} controllers on {host} ports {', '.join(map(str, ports))}")
            click.echo("radio: hosts connect with HCI over TCP (bumble transport tcp-client:HOST:PORT)")
        await stop.wait()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
