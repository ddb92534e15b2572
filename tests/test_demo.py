"""The README's main command runs the whole walk-through and exits 0."""

from __future__ import annotations

from click.testing import CliRunner

from powerbox_cli import main


def test_demo_walks_through_unlock_to_receipt() -> None:
    result = CliRunner().invoke(main, ["demo", "--mtu", "23"])
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
