"""The README's main command runs the whole walk-through and exits 0."""

from __future__ import annotations

from click.testing import CliRunner

from powerbox_cli import main


def test_demo_walks_through_unlock_to_receipt() -> None:
    result = CliRunner().invoke(main, ["demo", "--walkthrough", "--mtu", "23"])
    assert result.exit_code == 0, result.output
    steps = ("EDHOC message_1", "StartSession", "SessionStarted", "MeterReading", "ToppedUp", "SessionEnded")
    for step in steps:
        assert step in result.output
    assert "2 ATT round trips" in result.output
    assert "ended by USER_STOP" in result.output


def test_every_subcommand_is_listed() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "demo" in result.output


def test_the_main_command_tells_the_whole_offline_story_and_exits_zero() -> None:
    result = CliRunner().invoke(main, ["demo"])
    assert result.exit_code == 0, result.output
    for step in (
        "4G goes down",
        "phone 1 unlocks outlet 1",
        "the balance runs out",
        "phone 2 syncs",
        "4G returns",
    ):
        assert f"ok {step}" in result.output
    assert "scan-to-power offline" in result.output
    assert "the money journal balances: True" in result.output
