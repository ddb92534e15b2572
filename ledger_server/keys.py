"""The operator's keys on disk: Ed25519 signing keys (one active signer, all still trusted for
verification, so keys can rotate) and X25519 keys that phone-carried ledger batches are sealed to.

    <key directory>/signing/<kid hex>.pem        PKCS#8, mode 0600
    <key directory>/encryption/<kid hex>.pem
    <key directory>/active-signing               kid hex of the key that signs from now on
    <key directory>/active-encryption            kid hex of the key boxes should seal to

Rotation is two steps: `add_signing_key` (boxes and phones learn the new public key from
`GET /v1/operator-keys` and at provisioning), later `activate_signing_key`. Every process of one
deployment reads the same directory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from ledger_server.errors import ServerError
from protocol import cose, sealing

SIGNING = "signing"
ENCRYPTION = "encryption"


class KeyStoreError(ServerError):
    """The key directory is missing, incomplete or unreadable (a start-up problem, not a request's)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OperatorKeys:
    signing_keys: Mapping[bytes, cose.SigningKey]
    active_signing_kid: bytes
    encryption_keys: Mapping[bytes, X25519PrivateKey]
    active_encryption_kid: bytes

    @property
    def signer(self) -> cose.SigningKey:
        return self.signing_keys[self.active_signing_kid]

    @property
    def verification_keys(self) -> dict[bytes, Ed25519PublicKey]:
        return {kid: key.public_key for kid, key in self.signing_keys.items()}

    @property
    def encryption_public_key(self) -> X25519PublicKey:
        return self.encryption_keys[self.active_encryption_kid].public_key()


def _write_private(path: Path, key: Ed25519PrivateKey | X25519PrivateKey) -> None:
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(pem)


def _read_private(path: Path) -> Ed25519PrivateKey | X25519PrivateKey:
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyStoreError(f"cannot read {path.name}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey | X25519PrivateKey):
        raise KeyStoreError(f"{path.name} is neither an Ed25519 nor an X25519 key")
    return key


def _read_active(directory: Path, kind: str) -> bytes:
    try:
        return bytes.fromhex((directory / f"active-{kind}").read_text().strip())
    except (OSError, ValueError) as exc:
        raise KeyStoreError(f"no active {kind} key: {exc}") from None


def _set_active(directory: Path, kind: str, kid: bytes) -> None:
    temporary = directory / f".active-{kind}.tmp"
    temporary.write_text(kid.hex() + "\n")
    temporary.replace(directory / f"active-{kind}")


def add_signing_key(directory: Path, *, activate: bool = False) -> bytes:
    key = Ed25519PrivateKey.generate()
    kid = cose.key_id_for(key.public_key())
    _write_private(directory / SIGNING / f"{kid.hex()}.pem", key)
    if activate:
        _set_active(directory, SIGNING, kid)
    return kid


def add_encryption_key(directory: Path, *, activate: bool = False) -> bytes:
    key = X25519PrivateKey.generate()
    kid = sealing.encryption_key_id(key.public_key())
    _write_private(directory / ENCRYPTION / f"{kid.hex()}.pem", key)
    if activate:
        _set_active(directory, ENCRYPTION, kid)
    return kid


def activate_signing_key(directory: Path, kid: bytes) -> None:
    if kid not in load_keys(directory).signing_keys:
        raise KeyStoreError(f"no signing key {kid.hex()}")
    _set_active(directory, SIGNING, kid)


def create_keys(directory: Path) -> OperatorKeys:
    """A first signing and encryption key, unless the directory already has keys (then: those)."""
    if not (directory / f"active-{SIGNING}").exists():
        add_signing_key(directory, activate=True)
    if not (directory / f"active-{ENCRYPTION}").exists():
        add_encryption_key(directory, activate=True)
    return load_keys(directory)


def load_keys(directory: Path) -> OperatorKeys:
    signing: dict[bytes, cose.SigningKey] = {}
    encryption: dict[bytes, X25519PrivateKey] = {}
    for path in sorted((directory / SIGNING).glob("*.pem")):
        key = _read_private(path)
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyStoreError(f"{path.name} is not an Ed25519 key")
        signing_key = cose.SigningKey.from_private_key(key)
        signing[signing_key.key_id] = signing_key
    for path in sorted((directory / ENCRYPTION).glob("*.pem")):
        key = _read_private(path)
        if not isinstance(key, X25519PrivateKey):
            raise KeyStoreError(f"{path.name} is not an X25519 key")
        encryption[sealing.encryption_key_id(key.public_key())] = key
    keys = OperatorKeys(
        signing_keys=signing,
        active_signing_kid=_read_active(directory, SIGNING),
        encryption_keys=encryption,
        active_encryption_kid=_read_active(directory, ENCRYPTION),
    )
    if keys.active_signing_kid not in signing or keys.active_encryption_kid not in encryption:
        raise KeyStoreError(f"the active keys named in {directory} are missing")
    return keys
