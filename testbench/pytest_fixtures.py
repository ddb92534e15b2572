"""pytest fixtures for BLE tests over the virtual radio.

Use them from a ``conftest.py``::

    from testbench.pytest_fixtures import ble_controller_pool, ble_radio, ble_testbed  # noqa: F401

``ble_radio`` is one radio process for the whole session (its controllers are leased to nodes);
``ble_testbed`` is a :class:`~testbench.testbed.BleTestbed` per test, torn down (applications
killed, nodes stopped, controllers returned) even when the test fails.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from testbench.radio.process import RadioProcess
from testbench.testbed import BleTestbed, ControllerPool

RADIO_CONTROLLERS = 32


@pytest.fixture(scope="session")
def ble_radio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RadioProcess]:
    """The session's virtual radio (a child process with RADIO_CONTROLLERS controllers)."""
    log_path = tmp_path_factory.mktemp("ble-radio") / "radio.log"
    with RadioProcess.start(controllers=RADIO_CONTROLLERS, log_path=log_path) as radio:
        yield radio


@pytest.fixture(scope="session")
def ble_controller_pool(ble_radio: RadioProcess) -> ControllerPool:
    return ControllerPool(ble_radio.endpoints)


@pytest.fixture
async def ble_testbed(ble_controller_pool: ControllerPool, tmp_path: Path) -> AsyncIterator[BleTestbed]:
    """Nodes and application processes for one test, all gone after it."""
    testbed = BleTestbed(ble_controller_pool, log_dir=tmp_path)
    try:
        yield testbed
    finally:
        await testbed.aclose()
