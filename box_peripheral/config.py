"""The box's configuration file (box.toml) and its key and certificate files.

Paths in the file are relative to the file itself, so a box directory can be copied whole.

    [box]
    certificate = "box.cert"      # operator-signed BoxCertificate (binary, as issued)
    key = "box.key"               # Ed25519 private key, PEM (PKCS#8), mode 0600
    database = "box.sqlite"

    [operator]
    signing_keys = ["<hex of a raw Ed25519 public key>", ...]   # every key still in rotation
    encryption_key = "<hex of the raw X25519 public key>"       # ledger batches carried by phones

    [hardware]                    # see docs/hardware.md
    kind = "modbus-tcp"
    ...

    [policy]                      # optional; BoxPolicy field names
    idle_timeout_s = 600

    [uplink]                      # optional
    server = "http://127.0.0.1:8000"
    enabled = true
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from box_peripheral.controller import BoxPolicy
from box_peripheral.hardware.config import HardwareConfig, HardwareConfigError
from protocol import cose
from protocol.errors import ErrorCode, PowerboxError, TokenError
from protocol.tokens import BoxCertificate


class ConfigError(PowerboxError):
    """The configuration, key or certificate file is missing or wrong; `detail` says which and why."""

    code = ErrorCode.INTERNAL


@dataclass(frozen=True, slots=True, kw_only=True)
class UplinkConfig:
    server: str | None = None
    enabled: bool = True
    poll_seconds: int = 20


@dataclass(frozen=True, slots=True, kw_only=True)
class BoxConfig:
    path: Path
    certificate: BoxCertificate
    signed_certificate: bytes
    box_key: cose.SigningKey
    database: Path
    operator_keys: dict[bytes, Ed25519PublicKey]
    operator_encryption_key: X25519PublicKey
    hardware: HardwareConfig
    policy: BoxPolicy
    uplink: UplinkConfig


def write_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Write a PEM private key readable by its owner only."""
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)


def read_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read the box key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key")
    return key


def _hex_key(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a hex string")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise ConfigError(f"{what} is not hex") from None
    if len(raw) != 32:
        raise ConfigError(f"{what} must be 32 bytes")
    return raw


def _table(document: dict[str, Any], name: str, *, required: bool = True) -> dict[str, Any]:
    table = document.get(name, {} if not required else None)
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] is missing" if table is None else f"[{name}] must be a table")
    return table


def load_config(path: Path) -> BoxConfig:
    """Read and check box.toml and everything it points to; every problem is a ConfigError."""
    try:
        document = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    base = path.parent
    box = _table(document, "box")
    operator = _table(document, "operator")
    try:
        signing_keys = [
            Ed25519PublicKey.from_public_bytes(_hex_key(k, "operator signing key"))
            for k in operator.get("signing_keys", [])
        ]
        encryption_key = X25519PublicKey.from_public_bytes(
            _hex_key(operator.get("encryption_key"), "operator encryption key")
        )
    except ValueError as exc:
        raise ConfigError(f"bad operator key: {exc}") from None
    if not signing_keys:
        raise ConfigError("[operator] signing_keys must list at least one key")
    ring = cose.key_ring(*signing_keys)
    certificate_path = base / str(box.get("certificate", "box.cert"))
    try:
        signed_certificate = certificate_path.read_bytes()
        certificate = BoxCertificate.verify(signed_certificate, ring)
    except OSError as exc:
        raise ConfigError(f"cannot read the certificate {certificate_path}: {exc.strerror}") from None
    except TokenError as exc:
        raise ConfigError(f"the certificate {certificate_path} does not verify: {exc.detail}") from None
    box_key = cose.SigningKey.from_private_key(read_private_key(base / str(box.get("key", "box.key"))))
    if cose.public_key_bytes(box_key.public_key) != cose.public_key_bytes(certificate.box_public_key):
        raise ConfigError("the box key does not match the certificate")
    policy_table = _table(document, "policy", required=False)
    known = {f.name for f in dataclasses.fields(BoxPolicy)}
    unknown = set(policy_table) - known
    if unknown or not all(type(v) is int and v >= 0 for v in policy_table.values()):
        raise ConfigError(f"[policy] takes non-negative integers for {sorted(known)}")
    uplink_table = _table(document, "uplink", required=False)
    uplink = UplinkConfig(
        server=str(uplink_table["server"]) if "server" in uplink_table else None,
        enabled=bool(uplink_table.get("enabled", True)),
        poll_seconds=int(uplink_table.get("poll_seconds", 20)),
    )
    try:
        hardware = HardwareConfig.from_mapping(_table(document, "hardware"))
    except HardwareConfigError as exc:
        raise ConfigError(f"[hardware]: {exc.detail}") from None
    return BoxConfig(
        path=path,
        certificate=certificate,
        signed_certificate=signed_certificate,
        box_key=box_key,
        database=base / str(box.get("database", "box.sqlite")),
        operator_keys=ring,
        operator_encryption_key=encryption_key,
        hardware=hardware,
        policy=BoxPolicy(**policy_table),
        uplink=uplink,
    )
