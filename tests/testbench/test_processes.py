"""Nodes and radios start, stop and die without leaving processes behind."""

from __future__ import annotations

import os
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
