"""The technician's box commands: provision, label, status, ledger, and clear errors."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import zxingcpp
from click.testing import CliRunner
from PIL import Image

from box_peripheral.config import load_config, write_private_key
from powerbox_cli import main
from protocol import cose, gatt, sealing, testing


def make_box_dir(directory: Path) -> Path:
    """A provisioned box directory: key, certificate and box.toml, as the operations guide writes them."""
    box_key = testing.ed25519_key("cli box")
    operator = testing.operator_key()
    write_private_key(directory / "box.key", box_key)
    (directory / "box.cert").write_bytes(testing.sample_certificate(box_key).sign(operator))
    encryption = sealing.x25519_public_bytes(testing.x25519_key("operator encryption").public_key())
    (directory / "box.toml").write_text(
        f"""
[box]
certificate = "box.cert"
key = "box.key"
database = "box.sqlite"

[operator]
signing_keys = ["{cose.public_key_bytes(operator.public_key).hex()}"]
encryption_key = "{encryption.hex()}"

[hardware]
kind = "memory"
"""
    )
    return directory / "box.toml"


def test_provision_writes_a_private_key_and_a_request(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["box", "provision", "--box-id", "BOX-42", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    key = tmp_path / "box.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    request = json.loads((tmp_path / "provision-request.json").read_text())
    assert request["box_id"] == "BOX-42"
    assert len(bytes.fromhex(request["public_key"])) == 32
    again = CliRunner().invoke(main, ["box", "provision", "--box-id", "BOX-42", "--dir", str(tmp_path)])
    assert again.exit_code != 0
    assert "never overwritten" in again.output


def test_provision_refuses_a_bad_box_id(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["box", "provision", "--box-id", "box 42!", "--dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "A-Z" in result.output


def test_labels_scan_back_to_the_qr_payload(tmp_path: Path) -> None:
    config_path = make_box_dir(tmp_path)
    out = tmp_path / "labels"
    result = CliRunner().invoke(main, ["box", "label", "--config", str(config_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    config = load_config(config_path)
    fingerprint = gatt.box_key_fingerprint(cose.public_key_bytes(config.certificate.box_public_key))
    for outlet in (1, 2, 3, 4):
        png = out / f"{testing.SAMPLE_BOX_ID}-outlet-{outlet}.png"
        decoded = zxingcpp.read_barcodes(Image.open(png))
        assert [code.text for code in decoded] == [
            gatt.QrLabel(box_id=testing.SAMPLE_BOX_ID, outlet=outlet, fingerprint=fingerprint).encode()
        ]
        svg = (out / f"{testing.SAMPLE_BOX_ID}-outlet-{outlet}.svg").read_text()
        assert f"Outlet {outlet}" in svg


def test_status_and_ledger_of_a_fresh_box(tmp_path: Path) -> None:
    config_path = make_box_dir(tmp_path)
    status = CliRunner().invoke(main, ["box", "status", "--config", str(config_path), "--json"])
    assert status.exit_code == 0, status.output
    assert json.loads(status.output)["running_sessions"] == []
    ledger = CliRunner().invoke(main, ["box", "ledger", "--config", str(config_path), "--json"])
    assert ledger.exit_code == 0, ledger.output
    assert json.loads(ledger.output) == {"entries": [], "problems": []}


def test_bad_configuration_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    config_path = make_box_dir(tmp_path)
    (tmp_path / "box.cert").write_bytes(b"\xd2\x84not a certificate")
    result = CliRunner().invoke(main, ["box", "status", "--config", str(config_path)])
    assert result.exit_code == 1
    assert "does not verify" in result.output
    assert "Traceback" not in result.output
    missing = CliRunner().invoke(main, ["box", "status", "--config", str(tmp_path / "nope.toml")])
    assert missing.exit_code == 1
    assert "cannot read" in missing.output
