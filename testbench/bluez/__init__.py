"""The org.bluez emulator and BLE nodes (docs/testbench.md)."""

from testbench.bluez.emulator import Emulator, EmulatorSettings
from testbench.bluez.node import BUS_ADDRESS_VARIABLE, AdapterInfo, BleNode

__all__ = ["BUS_ADDRESS_VARIABLE", "AdapterInfo", "BleNode", "Emulator", "EmulatorSettings"]
