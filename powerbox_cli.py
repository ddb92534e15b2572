"""The `powerbox` command: one entry point, a subcommand group per part."""

from __future__ import annotations

import importlib

import click

# (subcommand, module, attribute): each part owns its CLI; imported lazily so that
# `powerbox phone` never pays for the server's imports.
_SUBCOMMANDS: tuple[tuple[str, str, str], ...] = (
    ("box", "box_peripheral.cli", "box"),
    ("phone", "phone_client.cli", "phone"),
    ("demo", "testbench.demo", "demo"),
    ("radio", "testbench.radio.cli", "radio"),
    ("bluez", "testbench.bluez.cli", "bluez"),
    ("server", "ledger_server.cli", "server"),
    ("plant", "testbench.plant.cli", "plant"),
    ("tui", "testbench.tui.cli", "tui"),
)


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name, _, _ in _SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        for name, module_name, attribute in _SUBCOMMANDS:
            if name == cmd_name:
                command = getattr(importlib.import_module(module_name), attribute)
                assert isinstance(command, click.Command)
                return command
        return None


@click.group(cls=_LazyGroup)
@click.version_option(package_name="powerbox")
def main() -> None:
    """powerbox: offline pay-as-you-go electricity outlets over Bluetooth LE."""
    from testbench._process import stop_with_parent_from_environment  # stdlib only: cheap

    stop_with_parent_from_environment()


if __name__ == "__main__":
    main()
