"""Password hashing with scrypt (RFC 7914) from the standard library, run off the event loop."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets

# n=2**14, r=8: 16 MiB and some tens of milliseconds per guess.
_N, _R, _P = 2**14, 8, 1
_LENGTH = 32


def _derive(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=64 * 1024 * 1024, dklen=_LENGTH)


def hash_password_now(password: str) -> str:
    salt = secrets.token_bytes(16)
    return f"scrypt${_N}${_R}${_P}${salt.hex()}${_derive(password, salt, _N, _R, _P).hex()}"


def verify_password_now(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, expected = stored.split("$")
        if scheme != "scrypt":
            return False
        derived = _derive(password, bytes.fromhex(salt), int(n), int(r), int(p))
    except ValueError:
        return False
    return hmac.compare_digest(derived, bytes.fromhex(expected))


async def hash_password(password: str) -> str:
    return await asyncio.to_thread(hash_password_now, password)


async def verify_password(password: str, stored: str) -> bool:
    return await asyncio.to_thread(verify_password_now, password, stored)


# Checked against when the user does not exist, so a wrong name takes as long as a wrong password.
DUMMY_HASH = hash_password_now(secrets.token_hex(16))
