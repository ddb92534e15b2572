"""BLE test-bench fixtures: a session radio and a per-test testbed (see testbench.pytest_fixtures)."""

from testbench.pytest_fixtures import ble_controller_pool, ble_radio, ble_testbed

__all__ = ["ble_controller_pool", "ble_radio", "ble_testbed"]
