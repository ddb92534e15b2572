"""`powerbox server ...` as an operator types it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from click.testing import CliRunner, Result

from ledger_server import keys
from ledger_server.config import ServerConfig
from ledger_server.runtime import open_context
from powerbox_cli import main
from protocol import cose, gatt, testing
from protocol.tokens import BoxCertificate

BOX_KEY = cose.public_key_bytes(testing.ed25519_key("cli box").public_key()).hex()


def run(tmp_path: Path, *arguments: str, input: str | None = None) -> Result:
    url = f"sqlite+aiosqlite:///{tmp_path / 'server.db'}"
    return CliRunner().invoke(
        main, ["server", "--database-url", url, "--keys", str(tmp_path / "keys"), *arguments], input=input
    )


def test_init_provision_tariff_revoke_reconcile_report(tmp_path: Path) -> None:
    initialised = run(tmp_path, "init", "--operator", "chief", "--password", "chief-password")
    assert initialised.exit_code == 0, initialised.output
    assert "operator chief created" in initialised.output
    assert (
        "exists already"
        in run(tmp_path, "init", "--operator", "chief", "--password", "chief-password").output
    )

    request = tmp_path / "provision-request.json"  # as `powerbox box provision` writes it
    request.write_text(json.dumps({"box_id": "SITE-1", "public_key": BOX_KEY}))
    provisioned = run(
        tmp_path,
        "box",
        "provision",
        "--request",
        str(request),
        "--out",
        str(tmp_path / "box.cert"),
        "--outlet",
        "1:3500",
        "--outlet",
        "2:7000",
        "--latitude",
        "31230416",
        "--longitude",
        "121473701",
        "--region",
        "SH-01",
    )
    assert provisioned.exit_code == 0, provisioned.output
    lines = dict(
        line.split(" ", 1) for line in provisioned.output.splitlines() if line.startswith("certificate")
    )
    ring = cose.key_ring(*(k.public_key for k in keys.load_keys(tmp_path / "keys").signing_keys.values()))
    certificate = BoxCertificate.verify(bytes.fromhex(lines["certificate"]), ring)
    assert [o.rated_power_w for o in certificate.outlets] == [3500, 7000]
    assert (tmp_path / "box.cert").read_bytes().hex() == lines["certificate"]
    assert gatt.QrLabel.decode(provisioned.output.splitlines()[-1].split(" ")[-1]).outlet == 2

    assert (
        run(tmp_path, "set-tariff", "--default", "120", "--region", "SH-01=110").output.strip()
        == "tariff table version 1"
    )
    assert run(tmp_path, "revoke", "--user", "42").output.strip() == "revocation list version 1"
    assert run(tmp_path, "set-tariff", "--default", "x").exit_code == 2

    reconciled = run(tmp_path, "reconcile")
    assert reconciled.exit_code == 0, reconciled.output
    assert "books balance" in reconciled.output
    plain = run(tmp_path, "reconcile", "--plain")
    assert "applied 0 entries" in plain.output

    report = run(tmp_path, "report", "--from", "2026-11-01", "--to", "2026-11-30", "--json")
    assert report.exit_code == 0, report.output
    assert json.loads(report.output) == []
    assert run(tmp_path, "report", "--from", "yesterday", "--to", "2026-11-30").exit_code == 2
    assert run(tmp_path, "list-anomalies").exit_code == 0

    stopped = run(tmp_path, "box", "stop", "SITE-1", "--outlet", "2")
    assert stopped.exit_code == 0, stopped.output
    assert "remote_stop outlet 2 of SITE-1" in stopped.output
    assert run(tmp_path, "box", "trip", "SITE-1", "--outlet", "9").exit_code == 1  # no such outlet
    assert "SITE-1" in run(tmp_path, "box", "list").output

    duplicate = run(
        tmp_path,
        "box",
        "provision",
        "--box-id",
        "SITE-1",
        "--public-key",
        BOX_KEY,
        "--outlet",
        "1:3500",
        "--latitude",
        "0",
        "--longitude",
        "0",
        "--region",
        "X",
    )
    assert duplicate.exit_code == 1
    assert "API_CONFLICT" in duplicate.output


def test_staff_dev_accounts_and_key_rotation(tmp_path: Path) -> None:
    assert run(tmp_path, "init", "--password", "operator-password").exit_code == 0
    added = run(
        tmp_path, "add-staff", "field.tech", "--role", "technician", input="tech-password\ntech-password\n"
    )
    assert added.exit_code == 0, added.output
    assert (
        run(tmp_path, "dev-account", "31001", "--phone", "+8613700000001", "--password", "pw").exit_code == 0
    )

    first = keys.load_keys(tmp_path / "keys").active_signing_kid
    added_key = run(tmp_path, "keys", "add-signing")
    new_kid = added_key.output.split()[2]
    assert keys.load_keys(tmp_path / "keys").active_signing_kid == first  # added, not yet signing
    assert run(tmp_path, "keys", "activate", new_kid).exit_code == 0
    loaded = keys.load_keys(tmp_path / "keys")
    assert (loaded.active_signing_kid.hex(), set(loaded.signing_keys)) == (
        new_kid,
        {first, bytes.fromhex(new_kid)},
    )
    listing = run(tmp_path, "keys", "list").output
    public = cose.public_key_bytes(loaded.signing_keys[bytes.fromhex(new_kid)].public_key).hex()
    assert f"signing {new_kid} {public} active" in listing
    assert run(tmp_path, "keys", "activate", "00000000").exit_code == 1

    async def operator_keys_still_trusted() -> int:
        config = ServerConfig(
            database_url=f"sqlite+aiosqlite:///{tmp_path / 'server.db'}", key_directory=tmp_path / "keys"
        )
        async with open_context(config) as context:
            return len(context.keys.verification_keys)

    assert asyncio.run(operator_keys_still_trusted()) == 2


def test_the_server_group_is_a_powerbox_subcommand() -> None:
    result = CliRunner().invoke(main, ["server", "--help"])
    assert result.exit_code == 0
    for command in ("init", "serve", "reconcile", "report", "box", "revoke", "set-tariff"):
        assert command in result.output
