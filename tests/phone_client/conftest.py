"""The phone against the real box daemon on the virtual radio (bless box, simulated Modbus plant),
and against the real settlement server on loopback.

The phone runs either in this process (bleak on the phone node's D-Bus: `phone_node` points
DBUS_SYSTEM_BUS_ADDRESS at it) or as `python -m powerbox_cli phone ...` processes on that node.
"""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from phone_client.wallet import Wallet
from protocol import cose, testing
from protocol.tokens import BoxCertificate
from testbench.app_process import AppProcess
from testbench.bluez import BleNode
from testbench.box_setup import ProvisionedBox, write_box_directory
from testbench.plant import Plant, running_plant
from testbench.testbed import BleTestbed

# the settlement server's fixtures, for the tests that bring it up
from tests.ledger_server.conftest import key_directory, sqlite_template, sqlite_url

__all__ = ["key_directory", "sqlite_template", "sqlite_url"]

OPERATOR = testing.operator_key()
ENCRYPTION = testing.x25519_key("operator encryption")
BOX_KEY = testing.ed25519_key("phone test box")
TIMEOUT = 20.0
POLICY = {"idle_timeout_s": 120, "poll_interval_ms": 250}


def now() -> int:
    return int(time.time())


@dataclass
class BoxOnRadio:
    box: ProvisionedBox
    process: AppProcess
    node: BleNode
    plant: Plant | None

    @property
    def box_id(self) -> str:
        return self.box.certificate.box_id


async def start_box(
    testbed: BleTestbed,
    directory: Path,
    *,
    box_key: Ed25519PrivateKey,
    certificate: BoxCertificate,
    operator: cose.SigningKey,
    hardware: dict[str, Any],
    plant: Plant | None,
    encryption_key: X25519PublicKey | None = None,
) -> BoxOnRadio:
    """A provisioned box daemon (`powerbox box run`) advertising on its own node."""
    box = write_box_directory(
        directory,
        box_key=box_key,
        certificate=certificate,
        operator=operator,
        operator_encryption_key=encryption_key or ENCRYPTION.public_key(),
        hardware=hardware,
        policy=POLICY,
    )
    node = await testbed.start_node(name="box")
    process = await testbed.spawn(
        node,
        [sys.executable, "-m", "powerbox_cli", "box", "run", "--config", str(box.config_path)],
        name="box",
    )
    await process.wait_event("ready", within=TIMEOUT)
    return BoxOnRadio(box=box, process=process, node=node, plant=plant)


class PhoneCli:
    """Runs `python -m powerbox_cli phone --wallet W ...` on the phone's node."""

    def __init__(
        self, testbed: BleTestbed, node: BleNode, wallet_path: Path, server: str | None = None
    ) -> None:
        self.testbed = testbed
        self.node = node
        self.wallet_path = wallet_path
        self.server = server

    async def spawn(self, *args: str, json_output: bool = True) -> AppProcess:
        argv = [sys.executable, "-m", "powerbox_cli", "phone", "--wallet", str(self.wallet_path)]
        if self.server is not None:
            argv += ["--server", self.server]
        return await self.testbed.spawn(
            self.node, [*argv, *(["--json"] if json_output else []), *args], name="phone-cli"
        )

    async def run(self, *args: str, expect: str) -> dict[str, Any]:
        """Run a command to its end; its `expect` event (exit 0), or the error it printed."""
        process = await self.spawn(*args)
        event = await process.wait_for(
            lambda m: m.get("event") in (expect, "error"), within=TIMEOUT, what=f"{expect!r} or an error"
        )
        status = await process.wait(within=TIMEOUT)
        assert event["event"] == expect, f"{args}: {event.get('message')}"
        assert status.returncode == 0
        return event

    async def fails(self, *args: str) -> dict[str, Any]:
        process = await self.spawn(*args)
        error = await process.wait_event("error", within=TIMEOUT)
        assert (await process.wait(within=TIMEOUT)).returncode == 1
        return error


@pytest.fixture
async def box_on_radio(ble_testbed: BleTestbed, tmp_path: Path) -> AsyncIterator[BoxOnRadio]:
    async with running_plant(outlets=4, time_scale=1.0) as plant:
        yield await start_box(
            ble_testbed,
            tmp_path / "box",
            box_key=BOX_KEY,
            certificate=testing.sample_certificate(BOX_KEY),
            operator=OPERATOR,
            hardware={"kind": "modbus-tcp", "host": plant.endpoint.host, "port": plant.endpoint.port},
            plant=plant,
        )


@pytest.fixture
async def phone_node(ble_testbed: BleTestbed, monkeypatch: pytest.MonkeyPatch) -> BleNode:
    """A phone's Bluetooth: this process's bleak talks to the node's org.bluez."""
    node = await ble_testbed.start_node(name="phone")
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", node.bus_address)
    return node


@pytest.fixture
async def wallet(tmp_path: Path) -> AsyncIterator[Wallet]:
    """A phone's wallet that trusts the test operator (set up offline, as a technician would)."""
    async with Wallet.open(tmp_path / "phone" / "wallet.sqlite") as opened:
        await opened.trust_operator_key(OPERATOR.public_key, source="test")
        yield opened


async def signed_grant(
    wallet: Wallet,
    name: str,
    *,
    amount_fen: int = 500,
    box_id: str | None = None,
    expires_in: int = 86_400,
    operator: cose.SigningKey = OPERATOR,
) -> bytes:
    """An operator-signed grant for this wallet's phone key."""
    issued = now() - 60
    return testing.sample_grant(
        await wallet.device_key(),
        grant_id=testing.seed(f"grant {name}")[:8],
        amount_fen=amount_fen,
        box_id=box_id,
        issued_at=min(issued, now() + expires_in - 1),
        expires_at=now() + expires_in,
    ).sign(operator)
