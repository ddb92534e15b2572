"""The box's hardware behind one small interface; drivers are chosen once, at start-up.

`open_hardware(config)` returns a `BoxHardware`: the Modbus driver (RTU in the field, TCP against
the simulated plant) or the in-memory one for unit tests. docs/hardware.md has the register maps.
"""

from .base import BoxHardware, DoorStates, HardwareError, OutletReading
from .config import HardwareConfig, HardwareConfigError, HardwareKind, Parity
from .factory import connected, open_hardware

__all__ = [
    "BoxHardware",
    "DoorStates",
    "HardwareConfig",
    "HardwareConfigError",
    "HardwareError",
    "HardwareKind",
    "OutletReading",
    "Parity",
    "connected",
    "open_hardware",
]
