"""Fixtures shared by every test package: the BLE test bench (virtual radio, nodes, processes)."""

from testbench.pytest_fixtures import ble_controller_pool, ble_radio, ble_testbed

__all__ = ["ble_controller_pool", "ble_radio", "ble_testbed"]
