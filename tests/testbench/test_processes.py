"""Nodes and radios start, stop and die without leaving processes behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from powerbox_cli import main as powerbox
from testbench._process import ProcessStartError
from testbench.bluez import BleNode
from testbench.radio import ControllerEndpoint, RadioProcess

pytestmark = pytest.mark.timeout(60)


def running(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_node_stop_and_kill_leave_nothing_behind(tmp_path: Path) -> None:
    with RadioProcess.start(controllers=2, log_path=tmp_path / "radio.log") as radio:
        stopped = BleNode.start(radio.endpoints[:1], log_path=tmp_path / "a.log")
        killed = BleNode.start(radio.endpoints[1:], log_path=tmp_path / "b.log")
        pids = [stopped.pid, stopped.dbus_daemon_pid, killed.pid, killed.dbus_daemon_pid]
        assert all(running(pid) for pid in pids)
        assert stopped.stop().returncode == 0
        killed.kill()
        assert not any(running(pid) for pid in pids)
        assert not (stopped.work_dir / "bus").exists()
    assert not running(radio.pid)


def test_node_without_a_radio_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(ProcessStartError, match="did not start"):
        BleNode.start([ControllerEndpoint(host="127.0.0.1", port=1)], log_path=tmp_path / "node.log")


def test_cli_commands_are_wired() -> None:
    runner = CliRunner()
    radio_help = runner.invoke(powerbox, ["radio", "--help"])
    assert radio_help.exit_code == 0
    assert "--nodes" in radio_help.output
    node_help = runner.invoke(powerbox, ["bluez", "node", "--help"])
    assert node_help.exit_code == 0
    assert "--controller" in node_help.output
    no_bus = {"DBUS_SYSTEM_BUS_ADDRESS": ""}
    missing_bus = runner.invoke(powerbox, ["bluez", "emulator", "--controller", "7000"], env=no_bus)
    assert missing_bus.exit_code != 0
    assert "DBUS_SYSTEM_BUS_ADDRESS" in missing_bus.output


def test_environment_for_applications(tmp_path: Path) -> None:
    with (
        RadioProcess.start(controllers=1, log_path=tmp_path / "radio.log") as radio,
        BleNode.start(radio.endpoints, log_path=tmp_path / "node.log") as node,
    ):
        env = node.env({"PATH": os.environ.get("PATH", "")})
        assert env["DBUS_SYSTEM_BUS_ADDRESS"] == node.bus_address
        assert node.adapters[0].name == "hci0"
        assert node.adapters[0].controller == radio.endpoints[0]


PARENT = """
import asyncio, sys
from pathlib import Path
from testbench.app_process import AppProcess

async def main() -> None:
    argv = [sys.executable, "-m", "powerbox_cli", "plant", "run", "--port", "0", "--json"]
    child = await AppProcess.start(argv, name="plant", env={}, log_path=Path(sys.argv[1]))
    await child.wait_for(lambda message: "ready" in message, within=30)
    print(child.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_an_application_stops_when_the_program_that_started_it_is_killed(tmp_path: Path) -> None:
    """A demo or TUI killed outright (SIGKILL, a closed terminal) must not leave its boxes and
    phones running: they are in sessions of their own, so only the parent's death tells them."""
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path / "plant.log")],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path.cwd())},
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert running(child)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 20
        while running(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not running(child)
    finally:
        parent.kill()
