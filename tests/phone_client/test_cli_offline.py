"""`powerbox phone` with no box and no server around: setting up a phone offline, and a clear,
single-line error (never a traceback) for every user mistake."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from powerbox_cli import main
from protocol import cose, testing

OPERATOR = testing.operator_key()


def phone(wallet: Path, *args: str) -> tuple[int, list[dict[str, Any]]]:
    """Run `powerbox phone --json ...`; the exit status and the JSON lines it printed."""
    result = CliRunner().invoke(main, ["phone", "--wallet", str(wallet), "--json", *args])
    assert "Traceback" not in result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return result.exit_code, lines


def test_a_phone_set_up_with_no_network(tmp_path: Path) -> None:
    wallet = tmp_path / "wallet.sqlite"
    status, (key,) = phone(wallet, "key")
    assert status == 0
    device_key = key["device_key"]
    operator_hex = cose.public_key_bytes(OPERATOR.public_key).hex()
    status, (trusted,) = phone(wallet, "trust", operator_hex)
    assert status == 0
    assert [k["public_key"] for k in trusted["operator_keys"]] == [operator_hex]

    grant_key = testing.ed25519_key("offline")  # not this phone's key
    foreign = testing.sample_grant(grant_key, grant_id=b"foreign1").sign(OPERATOR)
    status, (refused,) = phone(wallet, "grant", "import", foreign.hex())
    assert status == 1
    assert (refused["origin"], refused["name"]) == ("phone", "GRANT_WRONG_HOLDER")

    # a grant handed over as a file, for this phone's key
    mine = dataclasses.replace(
        testing.sample_grant(grant_key, grant_id=b"mine-001"),
        phone_key=Ed25519PublicKey.from_public_bytes(bytes.fromhex(device_key)),
    )
    grant_file = tmp_path / "grant.cwt"
    grant_file.write_bytes(mine.sign(OPERATOR))
    status, (imported,) = phone(wallet, "grant", "import", f"@{grant_file}")
    assert status == 0
    assert imported["grant_id"] == b"mine-001".hex()
    status, (listed,) = phone(wallet, "grants", "--all")
    assert [g["grant_id"] for g in listed["grants"]] == [b"mine-001".hex()]

    status, (overview,) = phone(wallet, "status")
    assert status == 0
    assert (overview["device_key"], overview["operator_keys"], overview["server"]) == (device_key, 1, None)


def test_user_mistakes_get_one_clear_error(tmp_path: Path) -> None:
    wallet = tmp_path / "wallet.sqlite"
    cases: list[tuple[tuple[str, ...], str, int | None]] = [
        (("grant", "request", "5"), "no server configured", None),
        (("start", "not a label"), "not a powerbox label", 517),
        (("stop",), "no running session", 511),
        (("door",), "no running session", 511),
        (("top-up",), "no running session", 511),
        (("trust", "abcd"), "not an Ed25519 public key", None),
        (("grant", "import", "%%%"), "not a token", None),
        (("grant", "import", "@" + str(tmp_path / "missing")), "cannot read", None),
        (("unlock", "BOX-1"), "never verified", None),
        (("server", "ftp://example.org"), "not an http", 803),
        (("invoice", "create", "abcd"), "no statement yet", None),
    ]
    for args, text, code in cases:
        status, (error,) = phone(wallet, *args)
        assert status == 1, args
        assert error["event"] == "error"
        assert text in error["message"], (args, error)
        assert error["code"] == code, (args, error)

    unreachable = tmp_path / "other.sqlite"
    status, (offline,) = phone(
        unreachable, "--server", "http://127.0.0.1:9", "login", "shared", "+8613800000000"
    )
    assert status == 1
    assert (offline["origin"], offline["name"]) == ("server", "API_UNAVAILABLE")


def test_bad_arguments_and_files_that_are_not_wallets(tmp_path: Path) -> None:
    runner = CliRunner()
    wallet = tmp_path / "wallet.sqlite"
    for args, text in (
        (["deposit", "twelve"], "is not an amount"),
        (["deposit", "0"], "above zero"),
        (["grant", "request", "5", "--valid", "soon"], "is not a duration"),
        (["nearby", "--lat", "north", "--lon", "1"], "is not a position"),
    ):
        result = runner.invoke(main, ["phone", "--wallet", str(wallet), *args])
        assert result.exit_code == 2, args
        assert text in " ".join(result.output.split())
        assert "Traceback" not in result.output
    result = runner.invoke(main, ["phone", "--wallet", str(tmp_path), "status"])
    assert result.exit_code == 2
    assert "is a directory" in " ".join(result.output.split())
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"\x00" * 4096 + b"garbage")
    result = runner.invoke(main, ["phone", "--wallet", str(garbage), "status"])
    assert result.exit_code == 1
    assert "not a powerbox wallet" in " ".join(result.output.split())  # wrapped to the terminal
    assert "Traceback" not in result.output
