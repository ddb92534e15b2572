"""`powerbox tui`: bring the whole system up on embedded defaults, run the TUI over it, and tear
everything down when the TUI quits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import click

from testbench.system import DEFAULT_PHONES, running_system

from .app import BenchApp
from .bench import LiveBench


@click.command()
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the system's files (databases, wallets, logs) here; default: a temporary directory.",
)
@click.option(
    "--phones",
    type=click.IntRange(1, 4),
    default=DEFAULT_PHONES,
    show_default=True,
    help="How many phones, each on its own Bluetooth node with its own wallet.",
)
@click.option("--uplink/--no-uplink", default=True, show_default=True, help="Whether the box's 4G starts on.")
def tui(workdir: Path | None, phones: int, uplink: bool) -> None:
    """A test bench on one screen: drive the box, the phones and the server from the keyboard.

    Starts the virtual radio, the settlement server, the simulated plant, one box and the phones
    (as `powerbox demo` does); `q` quits and tears everything down."""
    with _workdir(workdir) as directory:
        click.echo(f"starting the system in {directory} ...")
        try:
            asyncio.run(_run(directory, phones=phones, uplink_on=uplink))
        except (RuntimeError, OSError) as exc:  # a part that would not start (its log is in the workdir)
            raise click.ClickException(f"the test bench stopped: {exc}") from None


@contextlib.contextmanager
def _workdir(given: Path | None) -> Iterator[Path]:
    if given is not None:
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="powerbox-tui-") as directory:
        yield Path(directory)


async def _run(workdir: Path, *, phones: int, uplink_on: bool) -> None:
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    async with (
        running_system(workdir, phones=phones, uplink_on=uplink_on) as system,
        LiveBench.open(system) as bench,
    ):
        with _logging_to(workdir / "tui.log"):
            await BenchApp(bench).run_async()


@contextlib.contextmanager
def _logging_to(path: Path) -> Iterator[None]:
    """Log records (uvicorn's in-process server included) go to a file while the screen is ours."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    loggers = [
        logging.getLogger(),
        *(logging.getLogger(name) for name in ("uvicorn", "uvicorn.error", "uvicorn.access")),
    ]
    saved = [(logger, logger.handlers[:], logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.handlers = [handler] if logger is loggers[0] else []
        logger.propagate = logger is not loggers[0]
    try:
        yield
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers = handlers
            logger.propagate = propagate
        handler.close()
