"""Pick the hardware driver once, at start-up, from configuration (bleak-style; STYLE.md).

This `match` is the only place that knows which drivers exist; the daemon holds a BoxHardware
and never asks which one it got.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from .base import BoxHardware
from .config import HardwareConfig, HardwareKind


def open_hardware(
    config: HardwareConfig | Mapping[str, Any], *, outlets: Iterable[int] | None = None
) -> BoxHardware:
    """The driver `config` asks for, not yet connected (call `connect()`, or use `connected`).

    `config` may also be the raw `[hardware]` table of box.toml; it is validated here and a bad
    one raises HardwareConfigError. `outlets`, when given, replaces the configured outlet
    numbers: the box certificate is the authority on which outlets exist.
    """
    if not isinstance(config, HardwareConfig):
        config = HardwareConfig.from_mapping(config)
    if outlets is not None:
        config = dataclasses.replace(config, outlets=tuple(outlets))
    match config.kind:
        case HardwareKind.MEMORY:
            from .memory import MemoryHardware

            return MemoryHardware(outlets=config.outlets)
        case HardwareKind.MODBUS_TCP:
            from pymodbus.client import AsyncModbusTcpClient

            from .modbus import ModbusHardware

            def tcp_client() -> AsyncModbusTcpClient:
                return AsyncModbusTcpClient(
                    config.host,
                    port=config.port,
                    name="powerbox-bus",
                    timeout=config.request_timeout_ms / 1000,
                    retries=0,  # the driver decides about retries
                    reconnect_delay=0,  # and about reconnecting
                )

            return ModbusHardware(config, tcp_client)
        case HardwareKind.MODBUS_RTU:
            from pymodbus.client import AsyncModbusSerialClient

            from .modbus import ModbusHardware

            def serial_client() -> AsyncModbusSerialClient:
                return AsyncModbusSerialClient(
                    config.serial_port,
                    name="powerbox-bus",
                    baudrate=config.baudrate,
                    bytesize=8,
                    parity=config.parity.value,
                    stopbits=config.stopbits,
                    timeout=config.request_timeout_ms / 1000,
                    retries=0,
                    reconnect_delay=0,
                )

            return ModbusHardware(config, serial_client)


@contextlib.asynccontextmanager
async def connected(hardware: BoxHardware) -> AsyncIterator[BoxHardware]:
    """`connect()` on entry, `close()` on exit, whatever happens in between."""
    try:
        await hardware.connect()
        yield hardware
    finally:
        await hardware.close()
