"""BoxHardware over Modbus: RTU on RS485 in the field, TCP against the simulated plant.

A thin I/O shell (docs/hardware.md §4): the register maps and their decoding live in
`registermap`; this module only moves requests and translates failures. Every pymodbus, OS and
timeout error is turned into a HardwareError with a 7xx code at this edge (`map_exceptions`,
after httpcore), so nothing from pymodbus reaches the daemon.

Requests go one at a time, as on a half-duplex RS485 line. Each request attempt is bounded by
the configured timeout, and each public operation makes at most one retry in total (after
dropping the connection, which also flushes a late answer to the failed request).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping

from pymodbus.client import ModbusBaseClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU

from protocol.errors import ErrorCode, LocalProtocolError
from protocol.tokens import Door

from .base import DoorStates, HardwareError, OutletReading
from .config import HardwareConfig
from .registermap import (
    ACTIVE_IMPORT_ENERGY,
    ENERGY_WORDS,
    INSTANTANEOUS_START,
    INSTANTANEOUS_WORDS,
    RELAY_MODULE_CHANNELS,
    EnergyHighWater,
    MeterLimits,
    decode_meter_registers,
    outlet_reading,
)

logger = logging.getLogger(__name__)

ClientFactory = Callable[[], ModbusBaseClient]
Request = Callable[[ModbusBaseClient], Awaitable[ModbusPDU]]
# What a caught exception becomes: its code and the outlet it concerns (None: the whole bus).
Failure = tuple[ErrorCode, int | None]

# Worth one more try: the answer was lost or the link dropped.
_RETRYABLE_ERRORS = (TimeoutError, ModbusIOException, ConnectionException, OSError)
# A busy device asks to be asked again.
_RETRYABLE_EXCEPTION_CODES = frozenset({ExcCodes.DEVICE_BUSY})
# A gateway (RS485 to TCP) telling us the device behind it did not answer.
_NO_ANSWER_EXCEPTION_CODES = frozenset({ExcCodes.GATEWAY_NO_RESPONSE, ExcCodes.GATEWAY_PATH_UNAVIABLE})


@contextlib.contextmanager
def map_exceptions(mapping: Mapping[type[BaseException], Failure], what: str) -> Iterator[None]:
    """Re-raise the first matching exception type as HardwareError (mapping order matters)."""
    try:
        yield
    except HardwareError:
        raise
    except Exception as error:
        for error_type, (code, outlet) in mapping.items():
            if isinstance(error, error_type):
                raise HardwareError(
                    f"{what}: {error!s} ({type(error).__name__})", code=code, outlet=outlet
                ) from error
        raise


def device_failures(*, no_answer: ErrorCode, outlet: int | None) -> dict[type[BaseException], Failure]:
    """How errors talking to one device map to codes: silence is the device's, a dead link the bus's."""
    return {
        TimeoutError: (no_answer, outlet),
        ModbusIOException: (no_answer, outlet),  # pymodbus: no (valid) answer in time
        ConnectionException: (ErrorCode.BUS_FAULT, None),
        OSError: (ErrorCode.BUS_FAULT, None),  # after TimeoutError, which is an OSError too
        ModbusException: (ErrorCode.BUS_FAULT, outlet),
    }


BUS_FAILURES = device_failures(no_answer=ErrorCode.BUS_FAULT, outlet=None)


class _RetryBudget:
    """One public operation's retries, shared by all its requests."""

    __slots__ = ("_left",)

    def __init__(self, retries: int = 1) -> None:
        self._left = retries

    def spend(self) -> bool:
        if self._left <= 0:
            return False
        self._left -= 1
        return True


class ModbusHardware:
    """The box's meters and relay/input modules on one Modbus bus (docs/hardware.md §2-§3)."""

    def __init__(
        self,
        config: HardwareConfig,
        client_factory: ClientFactory,
        *,
        limits: MeterLimits | None = None,
    ) -> None:
        self._config = config
        self._client_factory = client_factory
        self._limits = limits or MeterLimits()
        self._client: ModbusBaseClient | None = None
        self._bus_lock = asyncio.Lock()
        self._high_water = EnergyHighWater()
        self._closed = False
        timeout_s = config.request_timeout_ms / 1000
        # pymodbus bounds connect and answer by the timeout each; this is the backstop for both.
        self._attempt_deadline_s = 2 * timeout_s + 0.05
        self._lock_pulse_s = config.lock_pulse_ms / 1000

    @property
    def outlets(self) -> tuple[int, ...]:
        return self._config.outlets

    async def connect(self) -> None:
        with map_exceptions(BUS_FAILURES, "opening the Modbus bus"):
            async with self._bus_lock, asyncio.timeout(self._attempt_deadline_s):
                await self._connected_client()

    async def close(self) -> None:
        self._closed = True
        self._drop_client()

    async def read_outlet(self, outlet: int) -> OutletReading:
        self._check_outlet(outlet)
        budget = _RetryBudget()
        what = f"outlet {outlet} meter"
        with map_exceptions(device_failures(no_answer=ErrorCode.METER_TIMEOUT, outlet=outlet), what):
            energy = await self._exchange(
                lambda client: client.read_holding_registers(
                    ACTIVE_IMPORT_ENERGY, count=ENERGY_WORDS, device_id=outlet
                ),
                budget,
            )
            self._check_registers(energy, ENERGY_WORDS, outlet=outlet, what=what)
            instantaneous = await self._exchange(
                lambda client: client.read_holding_registers(
                    INSTANTANEOUS_START, count=INSTANTANEOUS_WORDS, device_id=outlet
                ),
                budget,
            )
            self._check_registers(instantaneous, INSTANTANEOUS_WORDS, outlet=outlet, what=what)
        registers = decode_meter_registers(energy.registers, instantaneous.registers)
        return self._high_water.check(outlet_reading(outlet, registers, self._limits))

    async def set_breaker(self, outlet: int, closed: bool) -> None:
        self._check_outlet(outlet)
        await self._write_coil(
            self._config.breaker_module_unit_id,
            self._config.breaker_coil(outlet),
            closed,
            outlet=outlet,
            what=f"outlet {outlet} breaker relay",
        )

    async def breaker_closed(self, outlet: int) -> bool:
        self._check_outlet(outlet)
        unit = self._config.breaker_module_unit_id
        coil = self._config.breaker_coil(outlet)
        what = f"outlet {outlet} breaker relay"
        with map_exceptions(device_failures(no_answer=ErrorCode.BUS_FAULT, outlet=outlet), what):
            response = await self._exchange(
                lambda client: client.read_coils(coil, count=1, device_id=unit), _RetryBudget()
            )
        return self._check_bits(response, 1, outlet=outlet, what=what)[0]

    async def unlock_door(self, door: Door, outlet: int) -> None:
        self._check_door(door, outlet)
        unit = self._config.door_module_unit_id
        coil = self._config.lock_coil(door, outlet)
        affected = None if door is Door.METERING_BOX else outlet
        what = "metering-box lock" if door is Door.METERING_BOX else f"outlet {outlet} door lock"
        await self._write_coil(unit, coil, True, outlet=affected, what=what)
        try:
            await asyncio.sleep(self._lock_pulse_s)
        except BaseException:
            # Cancelled mid-pulse: still de-energize (a solenoid left on overheats and the door
            # stays unlatched), but let the cancellation be what the caller sees.
            with contextlib.suppress(HardwareError):
                await self._write_coil(unit, coil, False, outlet=affected, what=what)
            raise
        await self._write_coil(unit, coil, False, outlet=affected, what=what)

    async def read_doors(self) -> DoorStates:
        unit = self._config.door_module_unit_id
        what = "door switch inputs"
        with map_exceptions(device_failures(no_answer=ErrorCode.BUS_FAULT, outlet=None), what):
            response = await self._exchange(
                lambda client: client.read_discrete_inputs(0, count=RELAY_MODULE_CHANNELS, device_id=unit),
                _RetryBudget(),
            )
        inputs = self._check_bits(response, RELAY_MODULE_CHANNELS, outlet=None, what=what)
        # A proximity switch conducts while its magnet is near: input on means the door is shut,
        # and a cut wire reads as an open door, which is the safe side.
        return DoorStates(
            metering_box_closed=inputs[self._config.door_input(Door.METERING_BOX, 0)],
            outlet_doors_closed={
                outlet: inputs[self._config.door_input(Door.OUTLET, outlet)] for outlet in self.outlets
            },
        )

    # --- internals ---

    async def _write_coil(self, unit: int, coil: int, on: bool, *, outlet: int | None, what: str) -> None:
        with map_exceptions(device_failures(no_answer=ErrorCode.BUS_FAULT, outlet=outlet), what):
            response = await self._exchange(
                lambda client: client.write_coil(coil, on, device_id=unit), _RetryBudget()
            )
        echoed = self._check_bits(response, 1, outlet=outlet, what=what)
        if echoed[0] != on:
            raise HardwareError(
                f"{what}: module echoed {echoed[0]} for {on}", code=ErrorCode.BUS_FAULT, outlet=outlet
            )

    async def _exchange(self, request: Request, budget: _RetryBudget) -> ModbusPDU:
        """One request and its answer (possibly a Modbus exception), retried once if lost."""
        async with self._bus_lock:
            while True:
                try:
                    async with asyncio.timeout(self._attempt_deadline_s):
                        client = await self._connected_client()
                        response = await request(client)
                except _RETRYABLE_ERRORS as error:
                    self._drop_client()
                    if not budget.spend():
                        raise
                    logger.info("Modbus request failed (%s); retrying once", error)
                    continue
                except asyncio.CancelledError:
                    # The answer may still come; on RTU nothing would tell it from the next one.
                    self._drop_client()
                    raise
                if (
                    response.isError()
                    and response.exception_code in _RETRYABLE_EXCEPTION_CODES
                    and budget.spend()
                ):
                    continue
                return response

    async def _connected_client(self) -> ModbusBaseClient:
        if self._closed:
            raise HardwareError("the Modbus hardware was closed", code=ErrorCode.BUS_FAULT)
        if self._client is not None and self._client.connected:
            return self._client
        self._drop_client()
        try:
            client = self._client_factory()
        except Exception as error:  # e.g. pyserial missing: still a bus that cannot be opened
            raise ConnectionException(f"cannot set up the Modbus client: {error}") from error
        if not await client.connect():
            with contextlib.suppress(Exception):
                client.close()
            raise ConnectionException(f"cannot open {client}")
        self._client = client
        return client

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def _check_registers(self, response: ModbusPDU, count: int, *, outlet: int, what: str) -> None:
        self._check_answer(response, outlet=outlet, what=what, refused=ErrorCode.METER_BAD_READING)
        if len(response.registers) != count:
            raise HardwareError(
                f"{what}: {len(response.registers)} registers for {count}",
                code=ErrorCode.METER_BAD_READING,
                outlet=outlet,
            )

    def _check_bits(self, response: ModbusPDU, count: int, *, outlet: int | None, what: str) -> list[bool]:
        self._check_answer(response, outlet=outlet, what=what, refused=ErrorCode.BUS_FAULT)
        if len(response.bits) < count:
            raise HardwareError(
                f"{what}: {len(response.bits)} bits for {count}", code=ErrorCode.BUS_FAULT, outlet=outlet
            )
        return [bool(bit) for bit in response.bits[:count]]

    @staticmethod
    def _check_answer(response: ModbusPDU, *, outlet: int | None, what: str, refused: ErrorCode) -> None:
        if not response.isError():
            return
        exception_code = response.exception_code
        if exception_code in _NO_ANSWER_EXCEPTION_CODES:
            code = ErrorCode.METER_TIMEOUT if refused is ErrorCode.METER_BAD_READING else ErrorCode.BUS_FAULT
            raise HardwareError(
                f"{what}: gateway reports no answer ({exception_code})", code=code, outlet=outlet
            )
        raise HardwareError(f"{what}: Modbus exception {exception_code}", code=refused, outlet=outlet)

    def _check_outlet(self, outlet: int) -> None:
        if type(outlet) is not int or outlet not in self._config.outlets:
            raise LocalProtocolError(f"this box has no outlet {outlet!r}", code=ErrorCode.OUTLET_UNKNOWN)

    def _check_door(self, door: Door, outlet: int) -> None:
        if door is Door.METERING_BOX:
            if type(outlet) is not int or outlet != 0:
                raise LocalProtocolError("the metering-box door is outlet 0", code=ErrorCode.OUTLET_UNKNOWN)
        elif door is Door.OUTLET:
            self._check_outlet(outlet)
        else:
            raise LocalProtocolError(f"unknown door {door!r}", code=ErrorCode.OUTLET_UNKNOWN)
