"""`powerbox box run`: wire hardware, store, controller, GATT server, poll loop and uplink together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable

from box_peripheral.clock import BoxClock
from box_peripheral.config import BoxConfig
from box_peripheral.controller import BoxController
from box_peripheral.gatt_server import BoxGattServer
from box_peripheral.hardware import open_hardware
from box_peripheral.hardware.base import HardwareError
from box_peripheral.store import BoxStore
from box_peripheral.uplink import Uplink, off_switch_path

log = logging.getLogger("powerbox.box")


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


async def _poll_forever(controller: BoxController) -> None:
    """Poll about once a second, and wake early when a balance runs out before the next poll."""
    interval = controller.policy.poll_interval_ms
    while True:
        started = monotonic_ms()
        try:
            await controller.poll_once()
        except Exception:  # one bad cycle must not stop fee control; the next one retries
            log.exception("poll cycle failed")
        wake = started + interval
        trip = controller.next_wakeup_ms()
        if trip is not None:
            wake = min(wake, trip)
        await asyncio.sleep(max(0, wake - monotonic_ms()) / 1000)


async def run_box(
    config: BoxConfig,
    *,
    stop: asyncio.Event,
    ready: Callable[[BoxController], None] | None = None,
    wall_clock: Callable[[], int] = lambda: int(time.time()),
) -> None:
    """Run the box until `stop` is set; every task and the hardware bus are closed on the way out."""
    hardware = open_hardware(config.hardware, outlets=tuple(o.number for o in config.certificate.outlets))
    try:
        await hardware.connect()
    except HardwareError as exc:
        log.error("hardware not reachable at start-up (%s); running with every outlet off", exc.detail)
    async with BoxStore.open(
        config.database, box_id=config.certificate.box_id, box_key=config.box_key
    ) as store:
        high_water, last_sync = await store.clock_state()
        clock = BoxClock(wall=wall_clock, high_water=high_water, last_sync=last_sync)
        controller = BoxController(
            certificate=config.certificate,
            signed_certificate=config.signed_certificate,
            box_key=config.box_key,
            operator_keys=config.operator_keys,
            operator_encryption_key=config.operator_encryption_key,
            hardware=hardware,
            store=store,
            clock=clock,
            policy=config.policy,
            random_bytes=secrets.token_bytes,
            monotonic_ms=monotonic_ms,
        )
        await controller.start()
        gatt_server = BoxGattServer(controller)
        tasks: list[asyncio.Task[None]] = []
        try:
            await gatt_server.start()
            tasks.append(asyncio.create_task(_poll_forever(controller)))
            if config.uplink.server is not None:
                uplink = Uplink(
                    controller,
                    server=config.uplink.server,
                    box_key=config.box_key,
                    off_switch=off_switch_path(config.database),
                    long_poll_s=config.uplink.poll_seconds,
                    enabled=config.uplink.enabled,
                )
                tasks.append(asyncio.create_task(uplink.run()))
            if ready is not None:
                ready(controller)
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await gatt_server.stop()
            await controller.settle()
            await hardware.close()
