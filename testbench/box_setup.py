"""Write a provisioned box directory (key, certificate, box.toml) for the test bench and the demo.

In the field `powerbox box provision` writes the key and the operator returns the certificate;
here one call does both, with the operator keys it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from box_peripheral.config import write_private_key
from protocol import cose, gatt, sealing
from protocol.tokens import BoxCertificate


@dataclass(frozen=True, slots=True, kw_only=True)
class ProvisionedBox:
    config_path: Path
    certificate: BoxCertificate
    signed_certificate: bytes

    def label(self, outlet: int) -> gatt.QrLabel:
        return gatt.QrLabel(
            box_id=self.certificate.box_id,
            outlet=outlet,
            fingerprint=gatt.box_key_fingerprint(cose.public_key_bytes(self.certificate.box_public_key)),
        )


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def write_box_directory(
    directory: Path,
    *,
    box_key: Ed25519PrivateKey,
    certificate: BoxCertificate,
    operator: cose.SigningKey,
    operator_encryption_key: X25519PublicKey,
    hardware: dict[str, Any],
    policy: dict[str, int] | None = None,
    uplink: dict[str, Any] | None = None,
) -> ProvisionedBox:
    directory.mkdir(parents=True, exist_ok=True)
    write_private_key(directory / "box.key", box_key)
    signed = certificate.sign(operator)
    (directory / "box.cert").write_bytes(signed)
    tables: dict[str, dict[str, Any]] = {
        "box": {"certificate": "box.cert", "key": "box.key", "database": "box.sqlite"},
        "operator": {
            "signing_keys": [cose.public_key_bytes(operator.public_key).hex()],
            "encryption_key": sealing.x25519_public_bytes(operator_encryption_key).hex(),
        },
        "hardware": hardware,
    }
    if policy:
        tables["policy"] = policy
    if uplink:
        tables["uplink"] = uplink
    text = "\n".join(
        f"[{name}]\n" + "".join(f"{key} = {_toml_value(value)}\n" for key, value in table.items())
        for name, table in tables.items()
    )
    config_path = directory / "box.toml"
    config_path.write_text(text)
    return ProvisionedBox(config_path=config_path, certificate=certificate, signed_certificate=signed)
