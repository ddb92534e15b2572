"""EDHOC (RFC 9528) method 0 with cipher suite 0, as two sans-IO state machines.

Method 0: both sides authenticate with signature keys (Ed25519). Cipher suite 0: EDHOC AEAD
AES-CCM-16-64-128, hash SHA-256, MAC length 8 (unused by method 0, whose MACs are hash-length),
key exchange X25519, signatures EdDSA/Ed25519, application AEAD AES-CCM-16-64-128 / SHA-256.

`EdhocInitiator` and `EdhocResponder` take and return bytes; they never read a clock, a random
source or a socket. The caller supplies the ephemeral X25519 key, the connection identifier and
the long-term credential, and looks up the peer's credential between `receive_message_N` and
`verify_message_N` (RFC 9528 §5.3.3, §5.4.3: "when and how to perform authentication is up to
the application").

Not implemented: methods 1-3, other cipher suites, message_4, PLAINTEXT_2 above 8160 bytes
(RFC 9528 Appendix G) and EDHOC_KeyUpdate. Errors split h11-style: `LocalProtocolError` for API
misuse (wrong order, bad arguments), `EdhocError` with an EDHOC_* `ErrorCode` for anything the
peer sent. The first `EdhocError` moves a machine to the terminal `EdhocState.FAILED`.
"""

from __future__ import annotations

import enum
import hashlib
import io
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Final

import cbor2
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESCCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from protocol.errors import EdhocError, ErrorCode, LocalProtocolError

__all__ = [
    "ERR_UNKNOWN_CREDENTIAL",
    "ERR_UNSPECIFIED",
    "ERR_WRONG_SELECTED_CIPHER_SUITE",
    "METHOD_SIGNATURE_SIGNATURE",
    "SUPPORTED_SUITES",
    "CredentialKind",
    "EadItem",
    "EdhocCredential",
    "EdhocInitiator",
    "EdhocPeerAbortedError",
    "EdhocPeerError",
    "EdhocResponder",
    "EdhocState",
    "EdhocTranscript",
    "Message1Received",
    "Message2Received",
    "Message3Received",
    "ccs_credential_for_public_key",
    "ccs_public_key",
    "connection_id_raw",
    "cwt_credential",
    "decode_error",
    "encode_ead",
    "encode_error",
    "is_error_message",
    "parse_ead",
    "parse_id_cred_by_value",
]

# RFC 9528 §3.2: method 0 = signature key for both Initiator and Responder.
METHOD_SIGNATURE_SIGNATURE: Final = 0
# RFC 9528 §3.6, §10.2: the only cipher suite this module implements.
SUPPORTED_SUITES: Final[tuple[int, ...]] = (0,)

# Cipher suite 0 parameters (RFC 9528 §3.6).
_HASH_LENGTH: Final = 32  # SHA-256
_KEY_LENGTH: Final = 16  # AES-CCM-16-64-128
_IV_LENGTH: Final = 13
_TAG_LENGTH: Final = 8
_ECDH_LENGTH: Final = 32  # X25519
_SIGNATURE_LENGTH: Final = 64  # Ed25519
# Method 0 authenticates with signatures, so mac_length_2 = mac_length_3 = hash_length (§5.3.2).
_MAC_LENGTH: Final = _HASH_LENGTH
# HKDF-Expand yields at most 255 hash blocks; longer PLAINTEXT_2 needs Appendix G (not supported).
_MAX_KDF_LENGTH: Final = 255 * _HASH_LENGTH
# AES-CCM with a 13-byte nonce encodes the length in 2 bytes.
_MAX_AEAD_PLAINTEXT: Final = 0xFFFF
# Encoded length of a bstr holding an Ed25519 signature: 0x58 0x40 + 64 bytes.
_ENCODED_SIGNATURE_LENGTH: Final = 2 + _SIGNATURE_LENGTH

# RFC 9528 §6.2-§6.4.
ERR_UNSPECIFIED: Final = 1
ERR_WRONG_SELECTED_CIPHER_SUITE: Final = 2
ERR_UNKNOWN_CREDENTIAL: Final = 3

# COSE header parameters for credentials by value (RFC 9528 §3.5.3.1, §10.6) and 'kid' (RFC 9052).
_KID: Final = 4
_KCWT: Final = 13
_KCCS: Final = 14
# CBOR tags a CWT may carry; CRED_x is the untagged CWT (RFC 9528 §3.5.2, RFC 8392 §6).
_CWT_TAG_PREFIXES: Final = (b"\xd8\x3d", b"\xd2")  # tag 61 (CWT), tag 18 (COSE_Sign1)

_MAJOR_UINT: Final = 0
_MAJOR_NINT: Final = 1
_MAJOR_BSTR: Final = 2
_MAJOR_TSTR: Final = 3
_MAJOR_ARRAY: Final = 4
_MAJOR_MAP: Final = 5


class EdhocState(enum.Enum):
    """Where a machine stands; each state names what the caller may do next (RFC 9528 Appendix I)."""

    START = "start"
    # Initiator
    WAIT_MESSAGE_2 = "wait_message_2"
    RECEIVED_MESSAGE_2 = "received_message_2"  # decrypted; caller must look up CRED_R and verify
    VERIFIED_MESSAGE_2 = "verified_message_2"  # may send message_3
    # Responder
    RECEIVED_MESSAGE_1 = "received_message_1"  # may send message_2
    WAIT_MESSAGE_3 = "wait_message_3"
    RECEIVED_MESSAGE_3 = "received_message_3"  # decrypted; caller must look up CRED_I and verify
    # Both
    COMPLETED = "completed"
    FAILED = "failed"


class _Step(enum.Enum):
    SEND_MESSAGE_1 = "message_1"
    RECEIVE_MESSAGE_2 = "receive_message_2"
    VERIFY_MESSAGE_2 = "verify_message_2"
    SEND_MESSAGE_3 = "message_3"
    RECEIVE_MESSAGE_1 = "receive_message_1"
    SEND_MESSAGE_2 = "message_2"
    RECEIVE_MESSAGE_3 = "receive_message_3"
    VERIFY_MESSAGE_3 = "verify_message_3"


# Every legal transition of both roles, in one place (h11's EVENT_TRIGGERED_TRANSITIONS).
_TRANSITIONS: Final[dict[tuple[EdhocState, _Step], EdhocState]] = {
    (EdhocState.START, _Step.SEND_MESSAGE_1): EdhocState.WAIT_MESSAGE_2,
    (EdhocState.WAIT_MESSAGE_2, _Step.RECEIVE_MESSAGE_2): EdhocState.RECEIVED_MESSAGE_2,
    (EdhocState.RECEIVED_MESSAGE_2, _Step.VERIFY_MESSAGE_2): EdhocState.VERIFIED_MESSAGE_2,
    (EdhocState.VERIFIED_MESSAGE_2, _Step.SEND_MESSAGE_3): EdhocState.COMPLETED,
    (EdhocState.START, _Step.RECEIVE_MESSAGE_1): EdhocState.RECEIVED_MESSAGE_1,
    (EdhocState.RECEIVED_MESSAGE_1, _Step.SEND_MESSAGE_2): EdhocState.WAIT_MESSAGE_3,
    (EdhocState.WAIT_MESSAGE_3, _Step.RECEIVE_MESSAGE_3): EdhocState.RECEIVED_MESSAGE_3,
    (EdhocState.RECEIVED_MESSAGE_3, _Step.VERIFY_MESSAGE_3): EdhocState.COMPLETED,
}


class CredentialKind(enum.Enum):
    """Credential types carried by value in ID_CRED_x (RFC 9528 §3.5.3.1)."""

    CCS = "kccs"
    CWT = "kcwt"


# --------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True, slots=True, kw_only=True)
class EdhocCredential:
    """Our own authentication credential (RFC 9528 §3.5.2, §3.5.3).

    `id_cred` is the CBOR map ID_CRED_x exactly as it enters context_x and the COSE protected
    header; a map that is exactly {4: kid} is sent in compact form (§3.5.3.2). `cred` is CRED_x
    exactly as it enters context_x and the transcript (a CBOR item, e.g. a CCS map, an untagged
    CWT, or a bstr-wrapped X.509 certificate), treated as opaque bytes.
    """

    id_cred: bytes
    cred: bytes
    private_key: Ed25519PrivateKey


@dataclass(frozen=True, slots=True, kw_only=True)
class EadItem:
    """One External Authorization Data item (RFC 9528 §3.8); label 0 is padding (§3.8.1)."""

    label: int
    value: bytes | None = None

    @property
    def critical(self) -> bool:
        """Negative labels are critical: an unrecognised one must abort the session (§3.8)."""
        return self.label < 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Message1Received:
    """What the Responder learns from message_1 (RFC 9528 §5.2.3)."""

    method: int
    suites_i: tuple[int, ...]
    g_x: bytes
    connection_id_i: int | bytes  # as on the wire: int for one-byte-int identifiers (§3.3.2)
    ead_1: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Message2Received:
    """What the Initiator learns from message_2 before authenticating it (RFC 9528 §5.3.3)."""

    connection_id_r: int | bytes
    id_cred_r: bytes  # CBOR map; a compact kid is expanded back to {4: kid}
    ead_2: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Message3Received:
    """What the Responder learns from message_3 before authenticating it (RFC 9528 §5.4.3)."""

    id_cred_i: bytes
    ead_3: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class EdhocPeerError:
    """A decoded EDHOC error message (RFC 9528 §6).

    `err_info` is a str for ERR_CODE 1, a tuple of suites (SUITES_R) for 2, True for 3, and
    the decoded CBOR value for any other code.
    """

    err_code: int
    err_info: object


@dataclass(frozen=True, slots=True, kw_only=True)
class EdhocTranscript:
    """Every intermediate value of one session, under RFC 9529's names, filled as computed.

    For known-answer tests and debugging only. It holds secrets (PRKs, keys); never log it.
    """

    message_1: bytes | None = None
    h_message_1: bytes | None = None
    g_xy: bytes | None = None
    th_2: bytes | None = None
    prk_2e: bytes | None = None
    prk_3e2m: bytes | None = None
    context_2: bytes | None = None
    mac_2: bytes | None = None
    message_to_be_signed_2: bytes | None = None
    signature_or_mac_2: bytes | None = None
    plaintext_2: bytes | None = None
    keystream_2: bytes | None = None
    ciphertext_2: bytes | None = None
    message_2: bytes | None = None
    th_3: bytes | None = None
    prk_4e3m: bytes | None = None
    k_3: bytes | None = None
    iv_3: bytes | None = None
    a_3: bytes | None = None
    context_3: bytes | None = None
    mac_3: bytes | None = None
    message_to_be_signed_3: bytes | None = None
    signature_or_mac_3: bytes | None = None
    plaintext_3: bytes | None = None
    ciphertext_3: bytes | None = None
    message_3: bytes | None = None
    th_4: bytes | None = None
    prk_out: bytes | None = None
    prk_exporter: bytes | None = None


class EdhocPeerAbortedError(EdhocError):
    """The peer answered with an EDHOC error message instead of the expected message (§6)."""

    code = ErrorCode.EDHOC_PEER_ERROR

    def __init__(self, peer_error: EdhocPeerError) -> None:
        super().__init__(f"peer sent EDHOC error {peer_error.err_code}")
        self.peer_error = peer_error


# --------------------------------------------------------------------------------------------
# CBOR helpers: items keep their exact wire bytes, because transcript hashes and MAC contexts
# are computed over what was received, never over a re-encoding.


@dataclass(frozen=True, slots=True)
class _Item:
    raw: bytes
    value: object

    @property
    def major(self) -> int:
        return self.raw[0] >> 5


def _malformed(detail: str) -> EdhocError:
    return EdhocError(detail, code=ErrorCode.EDHOC_MALFORMED)


def _read_sequence(data: bytes, what: str) -> list[_Item]:
    """Split a CBOR sequence (RFC 8742) into items, each with its exact encoding."""
    stream = io.BytesIO(data)
    decoder = cbor2.CBORDecoder(stream)
    items: list[_Item] = []
    try:
        while stream.tell() < len(data):
            start = stream.tell()
            value = decoder.decode()
            items.append(_Item(data[start : stream.tell()], value))
    except Exception as exc:  # cbor2 raises many unrelated types on garbage; all mean "malformed"
        raise _malformed(f"{what}: invalid CBOR ({exc.__class__.__name__})") from None
    return items


def _as_int(item: _Item, what: str) -> int:
    # RFC 9528 §3.1, §9.8: messages are deterministic CBOR, so re-encoding gives the same bytes.
    if (
        item.major in (_MAJOR_UINT, _MAJOR_NINT)
        and isinstance(item.value, int)
        and cbor2.dumps(item.value) == item.raw
    ):
        return item.value
    raise _malformed(f"{what}: expected a deterministically encoded int")


def _as_bstr(item: _Item, what: str) -> bytes:
    if item.major == _MAJOR_BSTR and isinstance(item.value, bytes) and cbor2.dumps(item.value) == item.raw:
        return item.value
    raise _malformed(f"{what}: expected a deterministically encoded bstr")


def _as_suites(item: _Item, what: str) -> tuple[int, ...]:
    """suites = [2* int] / int (RFC 9528 §5.2.1)."""
    if item.major in (_MAJOR_UINT, _MAJOR_NINT):
        return (_as_int(item, what),)
    value = item.value
    if (
        item.major == _MAJOR_ARRAY
        and isinstance(value, list)
        and len(value) >= 2
        and all(type(suite) is int for suite in value)
        and cbor2.dumps(value) == item.raw
    ):
        return tuple(value)
    raise _malformed(f"{what}: expected an int or an array of at least two ints")


def _check_bytes(data: object, what: str) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    raise LocalProtocolError(f"{what} must be bytes, not {type(data).__name__}")


# --------------------------------------------------------------------------------------------
# Identifiers: connection identifiers and compact 'kid' share one byte-string representation.


def _is_one_byte_int(raw: bytes) -> bool:
    """True if `raw` is the one-byte CBOR encoding of an int in -24..23 (RFC 9528 §3.3.2)."""
    return len(raw) == 1 and (raw[0] <= 0x17 or 0x20 <= raw[0] <= 0x37)


def connection_id_raw(connection_id: int | bytes) -> bytes:
    """The byte string a connection identifier stands for (RFC 9528 §3.3.2).

    An int (-24..23) is shorthand for the byte string of its one-byte CBOR encoding, so
    -14 and b"\\x2d" name the same identifier. This is also the OSCORE Sender/Recipient ID
    (§3.3.3): the Initiator's Sender ID is C_R, the Responder's is C_I.
    """
    if isinstance(connection_id, bool) or not isinstance(connection_id, int | bytes):
        raise LocalProtocolError("connection identifier must be an int in -24..23 or bytes")
    if isinstance(connection_id, int):
        if not -24 <= connection_id <= 23:
            raise LocalProtocolError("an int connection identifier must be in -24..23")
        return cbor2.dumps(connection_id)
    return bytes(connection_id)


def _encode_identifier(raw: bytes) -> bytes:
    """RFC 9528 §3.3.2: a byte string that is a one-byte CBOR int travels as that int."""
    return raw if _is_one_byte_int(raw) else cbor2.dumps(raw)


def _decode_identifier(item: _Item, what: str) -> tuple[int | bytes, bytes]:
    """Return (the identifier as on the wire, the byte string it stands for)."""
    if item.major in (_MAJOR_UINT, _MAJOR_NINT):
        value = _as_int(item, what)
        if not -24 <= value <= 23:
            raise _malformed(f"{what}: int identifiers must be in -24..23")
        return value, item.raw
    raw = _as_bstr(item, what)
    if _is_one_byte_int(raw):
        raise _malformed(f"{what}: byte string {raw.hex()} must be sent as a CBOR int")
    return raw, raw


def _compact_id_cred(id_cred: bytes) -> bytes:
    """ID_CRED_x as it travels in PLAINTEXT_2/3 (RFC 9528 §3.5.3.2).

    {4: kid} becomes kid under the §3.3.2 representation; any other map is sent unchanged.
    Raises EdhocError if `id_cred` is not a single non-empty CBOR map.
    """
    items = _read_sequence(id_cred, "ID_CRED")
    if len(items) != 1 or items[0].major != _MAJOR_MAP or not isinstance(items[0].value, dict):
        raise _malformed("ID_CRED must be a single CBOR map")
    header_map = items[0].value
    if not header_map:
        raise _malformed("ID_CRED must hold at least one header parameter")
    if len(header_map) == 1:
        ((key, value),) = header_map.items()
        # Compare bytes, not Python values: {4.0: ...} or a non-canonical map is not "{4: kid}".
        if (
            type(key) is int
            and key == _KID
            and isinstance(value, bytes)
            and cbor2.dumps({_KID: value}) == id_cred
        ):
            return _encode_identifier(value)
    return id_cred


def _received_id_cred(item: _Item, what: str) -> bytes:
    """Inverse of `_compact_id_cred`: the full ID_CRED map for a PLAINTEXT_2/3 item."""
    if item.major == _MAJOR_MAP:
        if not isinstance(item.value, dict) or not item.value:
            raise _malformed(f"{what}: empty header map")
        return item.raw
    if item.major in (_MAJOR_UINT, _MAJOR_NINT, _MAJOR_BSTR):
        _, kid = _decode_identifier(item, f"{what} kid")
        return cbor2.dumps({_KID: kid})
    raise _malformed(f"{what}: expected a map, a bstr or an int")


# --------------------------------------------------------------------------------------------
# EAD


def _parse_ead_items(items: Sequence[_Item], what: str) -> tuple[EadItem, ...]:
    """EAD_x = 1* (ead_label: int, ? ead_value: bstr) (RFC 9528 §3.8)."""
    parsed: list[EadItem] = []
    index = 0
    while index < len(items):
        label = _as_int(items[index], f"{what} label")
        index += 1
        value = None
        if index < len(items) and items[index].major == _MAJOR_BSTR:
            value = _as_bstr(items[index], f"{what} value")
            index += 1
        parsed.append(EadItem(label=label, value=value))
    return tuple(parsed)


def parse_ead(data: bytes) -> tuple[EadItem, ...]:
    """Parse an EAD field (RFC 9528 §3.8); b"" means absent. Raises EdhocError if malformed."""
    data = _check_bytes(data, "EAD")
    return _parse_ead_items(_read_sequence(data, "EAD"), "EAD")


def encode_ead(items: Iterable[EadItem]) -> bytes:
    """Encode EAD items as the CBOR sequence an EAD field carries (RFC 9528 §3.8)."""
    out = bytearray()
    for item in items:
        out += cbor2.dumps(item.label)
        if item.value is not None:
            out += cbor2.dumps(item.value)
    return bytes(out)


def _check_outgoing_ead(ead: bytes, what: str) -> bytes:
    ead = _check_bytes(ead, what)
    try:
        parse_ead(ead)
    except EdhocError as exc:
        raise LocalProtocolError(f"{what} is not a valid EAD sequence: {exc.detail}") from None
    return ead


# --------------------------------------------------------------------------------------------
# Error messages (RFC 9528 §6)


def _encode_suites(suites: Sequence[int]) -> bytes:
    """suites = [2* int] / int: a single suite is a bare int (RFC 9528 §5.2.1, §6.3)."""
    return cbor2.dumps(suites[0]) if len(suites) == 1 else cbor2.dumps(list(suites))


def _suites_r_argument(err_info: object) -> list[int]:
    """SUITES_R given to `encode_error`: an int or a non-empty sequence of ints."""
    candidates: Sequence[object]
    if isinstance(err_info, Sequence) and not isinstance(err_info, str | bytes):
        candidates = err_info
    else:
        candidates = (err_info,)
    suites = [suite for suite in candidates if isinstance(suite, int) and not isinstance(suite, bool)]
    if not suites or len(suites) != len(candidates):
        raise LocalProtocolError("ERR_CODE 2 takes SUITES_R: an int or a sequence of ints")
    return suites


def encode_error(err_code: int, err_info: object) -> bytes:
    """Encode an EDHOC error message (ERR_CODE, ERR_INFO) (RFC 9528 §6).

    ERR_CODE 1 takes a str, 2 takes SUITES_R (an int or a non-empty sequence of ints), 3 takes
    True; other codes take any CBOR-encodable value. ERR_CODE 0 must not be sent (§6.1).
    """
    if isinstance(err_code, bool) or not isinstance(err_code, int) or err_code == 0:
        raise LocalProtocolError("ERR_CODE must be a non-zero int")
    if err_code == ERR_UNSPECIFIED:
        if not isinstance(err_info, str):
            raise LocalProtocolError("ERR_CODE 1 takes a text string")
        info = cbor2.dumps(err_info)
    elif err_code == ERR_WRONG_SELECTED_CIPHER_SUITE:
        info = _encode_suites(_suites_r_argument(err_info))
    elif err_code == ERR_UNKNOWN_CREDENTIAL:
        if err_info is not True:
            raise LocalProtocolError("ERR_CODE 3 takes True")
        info = cbor2.dumps(True)
    else:
        try:
            info = cbor2.dumps(err_info)
        except Exception as exc:  # cbor2 raises several types for unencodable values
            raise LocalProtocolError(f"ERR_INFO is not CBOR-encodable: {exc}") from None
    return cbor2.dumps(err_code) + info


def decode_error(data: bytes) -> EdhocPeerError:
    """Decode an EDHOC error message (RFC 9528 §6); raises EdhocError(EDHOC_MALFORMED)."""
    data = _check_bytes(data, "error message")
    items = _read_sequence(data, "error message")
    if len(items) != 2:
        raise _malformed("error message must be exactly (ERR_CODE, ERR_INFO)")
    code_item, info_item = items
    err_code = _as_int(code_item, "ERR_CODE")
    err_info: object = info_item.value
    if err_code == ERR_UNSPECIFIED:
        if info_item.major != _MAJOR_TSTR or not isinstance(err_info, str):
            raise _malformed("ERR_CODE 1 requires a text string")
    elif err_code == ERR_WRONG_SELECTED_CIPHER_SUITE:
        err_info = _as_suites(info_item, "SUITES_R")
    elif err_code == ERR_UNKNOWN_CREDENTIAL and err_info is not True:
        raise _malformed("ERR_CODE 3 requires true")
    return EdhocPeerError(err_code=err_code, err_info=err_info)


def is_error_message(data: bytes) -> bool:
    """True if `data` is shaped like an EDHOC error message: its first CBOR item is an int.

    The rule (RFC 9528 §5.1, §6): message_2, message_3 and message_4 start with a bstr, an
    error starts with ERR_CODE, an int. It cannot tell an error from message_1, which starts
    with METHOD (also an int, and ERR_CODEs 1-3 coincide with METHODs 1-3), so use it only
    where message_2 or later is expected. Never raises; undecodable input is not an error
    message (it is garbage, which the receiving machine rejects on its own).
    """
    if not isinstance(data, bytes | bytearray | memoryview) or not data:
        return False
    try:
        first = cbor2.CBORDecoder(io.BytesIO(bytes(data))).decode()
    except Exception:  # garbage: let the state machine report it as malformed
        return False
    return data[0] >> 5 in (_MAJOR_UINT, _MAJOR_NINT) and isinstance(first, int)


def _peer_error(data: bytes) -> EdhocPeerAbortedError:
    return EdhocPeerAbortedError(decode_error(data))


# --------------------------------------------------------------------------------------------
# Credentials by value (RFC 9528 §3.5.2, §3.5.3.1)


def ccs_credential_for_public_key(public_key: Ed25519PublicKey, subject: str) -> tuple[bytes, bytes]:
    """(ID_CRED, CRED) for an Ed25519 raw public key sent by value in a CCS (RFC 9528 §3.5.2).

    CRED is the deterministic CBOR of {2: subject, 8: {1: COSE_Key}} (RFC 8392 'sub', RFC 8747
    'cnf'), ID_CRED is {14: CCS} ('kccs'); the CCS inside ID_CRED is byte-identical to CRED.
    """
    if not isinstance(public_key, Ed25519PublicKey) or not isinstance(subject, str):
        raise LocalProtocolError("need an Ed25519PublicKey and a str subject")
    cose_key = {1: 1, -1: 6, -2: public_key.public_bytes_raw()}  # kty OKP, crv Ed25519, x
    ccs = {2: subject, 8: {1: cose_key}}
    return cbor2.dumps({_KCCS: ccs}, canonical=True), cbor2.dumps(ccs, canonical=True)


def _strip_cwt_tags(cwt: bytes) -> bytes:
    while True:
        for prefix in _CWT_TAG_PREFIXES:
            if cwt.startswith(prefix):
                cwt = cwt[len(prefix) :]
                break
        else:
            return cwt


def cwt_credential(cwt_bytes: bytes) -> tuple[bytes, bytes]:
    """(ID_CRED, CRED) for a CWT sent by value ('kcwt', RFC 9528 §3.5.3.1).

    RFC 9528 §10.6 registers kcwt's value as COSE_Messages, so the CWT is embedded as a CBOR
    item, not wrapped in a bstr: ID_CRED = {13: CWT}. CRED is the untagged CWT (§3.5.2), so CBOR
    tags 61 (CWT) and 18 (COSE_Sign1) in front of `cwt_bytes` are dropped.
    """
    cwt_bytes = _check_bytes(cwt_bytes, "CWT")
    try:
        items = _read_sequence(cwt_bytes, "CWT")
    except EdhocError as exc:
        raise LocalProtocolError(exc.detail) from None
    if len(items) != 1:
        raise LocalProtocolError("CWT must be exactly one CBOR item")
    cred = _strip_cwt_tags(cwt_bytes)
    # The CWT is opaque signed bytes: splice it in rather than re-encode it (a1 = map(1), 0d = 13).
    return b"\xa1" + cbor2.dumps(_KCWT) + cred, cred


def _map_entries(raw: bytes, what: str) -> list[tuple[_Item, _Item]]:
    """The (key, value) items of one definite-length CBOR map, each with its exact bytes."""
    info = raw[0] & 0x1F
    if raw[0] >> 5 != _MAJOR_MAP or info > 27:
        raise _malformed(f"{what}: expected a definite-length map")
    if info < 24:
        count, offset = info, 1
    else:
        width = 1 << (info - 24)
        count, offset = int.from_bytes(raw[1 : 1 + width], "big"), 1 + width
    items = _read_sequence(raw[offset:], what)
    if len(items) != 2 * count:
        raise _malformed(f"{what}: map length mismatch")
    return list(zip(items[0::2], items[1::2], strict=True))


def parse_id_cred_by_value(id_cred: bytes) -> tuple[CredentialKind, bytes]:
    """The credential carried by value in a received ID_CRED (RFC 9528 §3.5.3.1).

    Returns (CCS, the CCS map's exact bytes) for 'kccs' or (CWT, the untagged CWT) for 'kcwt';
    either is the peer's CRED_x. A bstr-wrapped kcwt value is accepted too. Raises
    EdhocError(EDHOC_BAD_CREDENTIAL) if ID_CRED holds no credential by value, or holds both.
    """
    id_cred = _check_bytes(id_cred, "ID_CRED")
    items = _read_sequence(id_cred, "ID_CRED")
    if len(items) != 1 or items[0].major != _MAJOR_MAP:
        raise _malformed("ID_CRED must be a single CBOR map")
    found: list[tuple[CredentialKind, bytes]] = []
    for key, value in _map_entries(items[0].raw, "ID_CRED"):
        if key.major != _MAJOR_UINT or key.value not in (_KCWT, _KCCS):
            continue
        if key.value == _KCCS:
            if value.major != _MAJOR_MAP:
                raise EdhocError("kccs must hold a CCS map", code=ErrorCode.EDHOC_BAD_CREDENTIAL)
            found.append((CredentialKind.CCS, value.raw))
        elif value.major == _MAJOR_BSTR and isinstance(value.value, bytes):
            found.append((CredentialKind.CWT, _strip_cwt_tags(value.value)))
        else:
            found.append((CredentialKind.CWT, _strip_cwt_tags(value.raw)))
    if len(found) != 1:
        raise EdhocError("ID_CRED needs exactly one of kccs, kcwt", code=ErrorCode.EDHOC_BAD_CREDENTIAL)
    return found[0]


def ccs_public_key(ccs: bytes) -> Ed25519PublicKey:
    """The Ed25519 key in a CCS's 'cnf' COSE_Key (RFC 8747 §3.2, RFC 9053 §7.2)."""
    ccs = _check_bytes(ccs, "CCS")
    items = _read_sequence(ccs, "CCS")
    bad = EdhocError("CCS has no Ed25519 COSE_Key in cnf", code=ErrorCode.EDHOC_BAD_CREDENTIAL)
    if len(items) != 1 or not isinstance(items[0].value, dict):
        raise bad
    cnf = items[0].value.get(8)
    cose_key = cnf.get(1) if isinstance(cnf, dict) else None
    if not isinstance(cose_key, dict) or cose_key.get(1) != 1 or cose_key.get(-1) != 6:
        raise bad
    x = cose_key.get(-2)
    if not isinstance(x, bytes) or len(x) != 32:
        raise bad
    return Ed25519PublicKey.from_public_bytes(x)


# --------------------------------------------------------------------------------------------
# Key schedule (RFC 9528 §4)


def _hash(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _extract(salt: bytes, ikm: bytes) -> bytes:
    """EDHOC_Extract = HKDF-Extract = HMAC-SHA-256(salt, IKM) (RFC 9528 §4.1.1)."""
    mac = hmac.HMAC(salt, hashes.SHA256())
    mac.update(ikm)
    return mac.finalize()


def _kdf(prk: bytes, info_label: int, context: bytes, length: int) -> bytes:
    """EDHOC_KDF = HKDF-Expand(PRK, info = (info_label, context: bstr, length)) (RFC 9528 §4.1.2)."""
    info = cbor2.dumps(info_label) + cbor2.dumps(context) + cbor2.dumps(length)
    return HKDFExpand(hashes.SHA256(), length, info).derive(prk)


def _xor(data: bytes, keystream: bytes) -> bytes:
    return (int.from_bytes(data, "big") ^ int.from_bytes(keystream, "big")).to_bytes(len(data), "big")


def _sig_structure(id_cred: bytes, external_aad: bytes, mac: bytes) -> bytes:
    """COSE Sig_structure for Signature_or_MAC_2/3 (RFC 9528 §5.3.2, RFC 9052 §4.4)."""
    return cbor2.dumps(["Signature1", id_cred, external_aad, mac])


def _enc_structure(th: bytes) -> bytes:
    """COSE Enc_structure for CIPHERTEXT_3: protected h'', external_aad TH_3 (RFC 9528 §5.4.2)."""
    return cbor2.dumps(["Encrypt0", b"", th])


# --------------------------------------------------------------------------------------------
# State machines


def _check_credential(credential: EdhocCredential) -> bytes:
    """Validate our own credential; return ID_CRED in its PLAINTEXT form."""
    if not isinstance(credential, EdhocCredential):
        raise LocalProtocolError("credential must be an EdhocCredential")
    if not isinstance(credential.private_key, Ed25519PrivateKey):
        raise LocalProtocolError("method 0 / suite 0 needs an Ed25519 private key")
    _check_bytes(credential.cred, "CRED")
    try:
        return _compact_id_cred(_check_bytes(credential.id_cred, "ID_CRED"))
    except EdhocError as exc:
        raise LocalProtocolError(exc.detail) from None


def _check_suites(suites: Sequence[int]) -> tuple[int, ...]:
    if isinstance(suites, str | bytes) or not suites:
        raise LocalProtocolError("suites must be a non-empty sequence of cipher suite numbers")
    checked = tuple(suites)
    if any(type(suite) is not int or suite not in SUPPORTED_SUITES for suite in checked):
        raise LocalProtocolError(f"suites must be members of {SUPPORTED_SUITES}")
    if len(set(checked)) != len(checked):
        raise LocalProtocolError("suites must not repeat")
    return checked


class _EdhocParty:
    """What both roles share: the state table, failure handling, exporter and transcript."""

    def __init__(
        self,
        *,
        credential: EdhocCredential,
        ephemeral_key: X25519PrivateKey,
        connection_id: int | bytes,
        suites: Sequence[int],
    ) -> None:
        self._plaintext_id_cred = _check_credential(credential)
        if not isinstance(ephemeral_key, X25519PrivateKey):
            raise LocalProtocolError("ephemeral_key must be an X25519PrivateKey")
        self._credential = credential
        self._ephemeral_key = ephemeral_key
        self._connection_id = connection_id_raw(connection_id)
        self._suites = _check_suites(suites)
        self._state = EdhocState.START
        self._failure: ErrorCode | None = None
        self._transcript = EdhocTranscript()
        self._prk_out = b""
        self._prk_exporter = b""

    @property
    def state(self) -> EdhocState:
        return self._state

    @property
    def transcript(self) -> EdhocTranscript:
        """Intermediate values computed so far; for tests and debugging (holds secrets)."""
        return self._transcript

    @property
    def prk_out(self) -> bytes:
        """PRK_out, the session key of a completed session (RFC 9528 §4.1.3)."""
        self._require_completed()
        return self._prk_out

    def exporter(self, label: int, context: bytes, length: int) -> bytes:
        """EDHOC_Exporter(label, context, length) (RFC 9528 §4.2.1).

        OSCORE (Appendix A.1): master secret = exporter(0, b"", 16), master salt =
        exporter(1, b"", 8) for cipher suite 0.
        """
        self._require_completed()
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise LocalProtocolError("exporter label must be a uint")
        context = _check_bytes(context, "exporter context")
        if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= _MAX_KDF_LENGTH:
            raise LocalProtocolError(f"exporter length must be in 1..{_MAX_KDF_LENGTH}")
        return _kdf(self._prk_exporter, label, context, length)

    def _require_completed(self) -> None:
        if self._state is not EdhocState.COMPLETED:
            raise LocalProtocolError(
                f"session not completed (state {self._state.name})", code=ErrorCode.EDHOC_UNEXPECTED_MESSAGE
            )

    @contextmanager
    def _step(self, step: _Step) -> Iterator[None]:
        """Run one transition: refuse it if illegal now, FAILED if it raises, advance if not."""
        target = _TRANSITIONS.get((self._state, step))
        if target is None:
            raise LocalProtocolError(
                f"{step.value} is not allowed in state {self._state.name}",
                code=ErrorCode.EDHOC_UNEXPECTED_MESSAGE,
            )
        try:
            yield
        except EdhocError as exc:
            self._state = EdhocState.FAILED
            self._failure = exc.code
            raise
        except BaseException:
            # A bug on our side also ends the session: half-applied steps must not be retried.
            self._state = EdhocState.FAILED
            raise
        self._state = target

    def _check_plaintext_length(self, prefix_length: int, ead: bytes, limit: int) -> None:
        length = prefix_length + len(self._plaintext_id_cred) + _ENCODED_SIGNATURE_LENGTH + len(ead)
        if length > limit:
            raise LocalProtocolError(f"plaintext of {length} bytes exceeds {limit}; shorten ID_CRED or EAD")


class EdhocInitiator(_EdhocParty):
    """The Initiator of RFC 9528 §5: message_1 → message_2 → message_3."""

    def __init__(
        self,
        *,
        credential: EdhocCredential,
        ephemeral_key: X25519PrivateKey,
        connection_id: int | bytes,
        suites: Sequence[int] = SUPPORTED_SUITES,
    ) -> None:
        """`suites` is SUITES_I in order of preference; the last one is selected (§5.2.2)."""
        super().__init__(
            credential=credential, ephemeral_key=ephemeral_key, connection_id=connection_id, suites=suites
        )
        self._message_1 = b""
        self._g_x = ephemeral_key.public_key().public_bytes_raw()
        self._th_2 = b""
        self._prk_3e2m = b""
        self._th_3 = b""
        self._c_r_encoded = b""
        self._id_cred_r = b""
        self._signature_2 = b""
        self._ead_2 = b""
        self._plaintext_2 = b""

    def message_1(self, ead_1: bytes = b"") -> bytes:
        """Compose message_1 = (METHOD, SUITES_I, G_X, C_I, ? EAD_1) (RFC 9528 §5.2.1-§5.2.2)."""
        ead_1 = _check_outgoing_ead(ead_1, "EAD_1")
        with self._step(_Step.SEND_MESSAGE_1):
            message_1 = (
                cbor2.dumps(METHOD_SIGNATURE_SIGNATURE)
                + _encode_suites(self._suites)
                + cbor2.dumps(self._g_x)
                + _encode_identifier(self._connection_id)
                + ead_1
            )
            self._message_1 = message_1
            self._transcript = replace(self._transcript, message_1=message_1)
            return message_1

    def receive_message_2(self, data: bytes) -> Message2Received:
        """Decrypt message_2 and return what the caller needs to find CRED_R (RFC 9528 §5.3.3).

        Nothing here is authenticated yet; call `verify_message_2` next. An error message from
        the Responder raises EdhocPeerAbortedError (EDHOC_PEER_ERROR).
        """
        data = _check_bytes(data, "message_2")
        with self._step(_Step.RECEIVE_MESSAGE_2):
            items = _read_sequence(data, "message_2")
            if items and items[0].major in (_MAJOR_UINT, _MAJOR_NINT):
                raise _peer_error(data)
            if len(items) != 1:
                raise _malformed("message_2 must be a single bstr")
            g_y_ciphertext_2 = _as_bstr(items[0], "G_Y_CIPHERTEXT_2")
            g_y, ciphertext_2 = g_y_ciphertext_2[:_ECDH_LENGTH], g_y_ciphertext_2[_ECDH_LENGTH:]
            if not ciphertext_2:
                raise _malformed("message_2 too short")
            if len(ciphertext_2) > _MAX_KDF_LENGTH:
                raise _malformed("PLAINTEXT_2 longer than 8160 bytes is not supported")
            try:
                g_xy = self._ephemeral_key.exchange(X25519PublicKey.from_public_bytes(g_y))
            except ValueError:  # low-order point: the shared secret would be all zeros
                raise _malformed("invalid G_Y") from None

            # RFC 9528 §5.3.2: TH_2 = H(G_Y, H(message_1)); PRK_2e = Extract(TH_2, G_XY).
            h_message_1 = _hash(self._message_1)
            th_2 = _hash(cbor2.dumps(g_y) + cbor2.dumps(h_message_1))
            prk_2e = _extract(th_2, g_xy)
            keystream_2 = _kdf(prk_2e, 0, th_2, len(ciphertext_2))
            plaintext_2 = _xor(ciphertext_2, keystream_2)
            self._transcript = replace(
                self._transcript,
                h_message_1=h_message_1,
                g_xy=g_xy,
                th_2=th_2,
                prk_2e=prk_2e,
                prk_3e2m=prk_2e,
                keystream_2=keystream_2,
                ciphertext_2=ciphertext_2,
                plaintext_2=plaintext_2,
                message_2=data,
            )

            # PLAINTEXT_2 = (C_R, ID_CRED_R / bstr / -24..23, Signature_or_MAC_2, ? EAD_2)
            fields = _read_sequence(plaintext_2, "PLAINTEXT_2")
            if len(fields) < 3:
                raise _malformed("PLAINTEXT_2 needs C_R, ID_CRED_R and Signature_or_MAC_2")
            connection_id_r, _ = _decode_identifier(fields[0], "C_R")
            id_cred_r = _received_id_cred(fields[1], "ID_CRED_R")
            signature_2 = _as_bstr(fields[2], "Signature_or_MAC_2")
            if len(signature_2) != _SIGNATURE_LENGTH:
                raise _malformed("Signature_or_MAC_2 has the wrong length")
            _parse_ead_items(fields[3:], "EAD_2")
            ead_2 = b"".join(field.raw for field in fields[3:])

            self._th_2 = th_2
            self._prk_3e2m = prk_2e  # method 0: no static DH, so PRK_3e2m = PRK_2e (§4.1.1.2)
            self._c_r_encoded = fields[0].raw
            self._id_cred_r = id_cred_r
            self._signature_2 = signature_2
            self._ead_2 = ead_2
            self._plaintext_2 = plaintext_2
            self._transcript = replace(self._transcript, signature_or_mac_2=signature_2)
            return Message2Received(connection_id_r=connection_id_r, id_cred_r=id_cred_r, ead_2=ead_2)

    def verify_message_2(self, *, cred_r: bytes, public_key: Ed25519PublicKey) -> None:
        """Check Signature_or_MAC_2 against CRED_R and its key (RFC 9528 §5.3.3).

        The caller vouches that `public_key` is the key inside `cred_r` and that `cred_r` is
        acceptable for this peer (Appendix D). Raises EdhocError(EDHOC_BAD_SIGNATURE).
        """
        cred_r = _check_bytes(cred_r, "CRED_R")
        if not isinstance(public_key, Ed25519PublicKey):
            raise LocalProtocolError("public_key must be an Ed25519PublicKey")
        with self._step(_Step.VERIFY_MESSAGE_2):
            th_2_item = cbor2.dumps(self._th_2)
            # context_2 = << C_R, ID_CRED_R, TH_2, CRED_R, ? EAD_2 >> (§5.3.2)
            context_2 = self._c_r_encoded + self._id_cred_r + th_2_item + cred_r + self._ead_2
            mac_2 = _kdf(self._prk_3e2m, 2, context_2, _MAC_LENGTH)
            to_be_signed = _sig_structure(self._id_cred_r, th_2_item + cred_r + self._ead_2, mac_2)
            self._transcript = replace(
                self._transcript, context_2=context_2, mac_2=mac_2, message_to_be_signed_2=to_be_signed
            )
            try:
                public_key.verify(self._signature_2, to_be_signed)
            except InvalidSignature:
                raise EdhocError(
                    "Signature_or_MAC_2 does not verify", code=ErrorCode.EDHOC_BAD_SIGNATURE
                ) from None
            # TH_3 = H(TH_2, PLAINTEXT_2, CRED_R) (§5.4.2)
            self._th_3 = _hash(th_2_item + self._plaintext_2 + cred_r)
            self._transcript = replace(self._transcript, th_3=self._th_3)

    def message_3(self, ead_3: bytes = b"") -> bytes:
        """Compose message_3 and complete the session (RFC 9528 §5.4.2).

        After this, `prk_out` and `exporter` are available; per §5.4.2 the caller should not
        persist them or send protected data before the peer has been authenticated.
        """
        ead_3 = _check_outgoing_ead(ead_3, "EAD_3")
        self._check_plaintext_length(0, ead_3, _MAX_AEAD_PLAINTEXT)
        with self._step(_Step.SEND_MESSAGE_3):
            th_3, prk_3e2m = self._th_3, self._prk_3e2m
            prk_4e3m = prk_3e2m  # method 0: the Initiator has no static DH key (§4.1.1.3)
            k_3 = _kdf(prk_3e2m, 3, th_3, _KEY_LENGTH)
            iv_3 = _kdf(prk_3e2m, 4, th_3, _IV_LENGTH)
            id_cred_i, cred_i = self._credential.id_cred, self._credential.cred
            th_3_item = cbor2.dumps(th_3)
            # context_3 = << ID_CRED_I, TH_3, CRED_I, ? EAD_3 >>
            context_3 = id_cred_i + th_3_item + cred_i + ead_3
            mac_3 = _kdf(prk_4e3m, 6, context_3, _MAC_LENGTH)
            to_be_signed = _sig_structure(id_cred_i, th_3_item + cred_i + ead_3, mac_3)
            signature_3 = self._credential.private_key.sign(to_be_signed)
            plaintext_3 = self._plaintext_id_cred + cbor2.dumps(signature_3) + ead_3
            a_3 = _enc_structure(th_3)
            ciphertext_3 = AESCCM(k_3, tag_length=_TAG_LENGTH).encrypt(iv_3, plaintext_3, a_3)
            message_3 = cbor2.dumps(ciphertext_3)
            # TH_4 = H(TH_3, PLAINTEXT_3, CRED_I); PRK_out, PRK_exporter (§4.1.3, §5.4.2)
            th_4 = _hash(th_3_item + plaintext_3 + cred_i)
            self._prk_out = _kdf(prk_4e3m, 7, th_4, _HASH_LENGTH)
            self._prk_exporter = _kdf(self._prk_out, 10, b"", _HASH_LENGTH)
            self._transcript = replace(
                self._transcript,
                prk_4e3m=prk_4e3m,
                k_3=k_3,
                iv_3=iv_3,
                a_3=a_3,
                context_3=context_3,
                mac_3=mac_3,
                message_to_be_signed_3=to_be_signed,
                signature_or_mac_3=signature_3,
                plaintext_3=plaintext_3,
                ciphertext_3=ciphertext_3,
                message_3=message_3,
                th_4=th_4,
                prk_out=self._prk_out,
                prk_exporter=self._prk_exporter,
            )
            return message_3


class EdhocResponder(_EdhocParty):
    """The Responder of RFC 9528 §5: message_1 → message_2 → message_3."""

    def __init__(
        self,
        *,
        credential: EdhocCredential,
        ephemeral_key: X25519PrivateKey,
        connection_id: int | bytes,
        suites: Sequence[int] = SUPPORTED_SUITES,
    ) -> None:
        """`suites` are the cipher suites we accept; they make up SUITES_R (§6.3)."""
        super().__init__(
            credential=credential, ephemeral_key=ephemeral_key, connection_id=connection_id, suites=suites
        )
        self._g_y = ephemeral_key.public_key().public_bytes_raw()
        self._h_message_1 = b""
        self._g_xy = b""
        self._th_3 = b""
        self._prk_3e2m = b""
        self._plaintext_3 = b""
        self._id_cred_i = b""
        self._signature_3 = b""
        self._ead_3 = b""

    def receive_message_1(self, data: bytes) -> Message1Received:
        """Parse and check message_1 (RFC 9528 §5.2.3).

        Raises EdhocError with EDHOC_MALFORMED, EDHOC_UNSUPPORTED_METHOD, or
        EDHOC_UNSUPPORTED_CIPHER_SUITE; in the last case answer with `error_for_wrong_suite()`.
        The caller must also make sure C_I differs from our C_R if they key OSCORE (§3.3.3).
        """
        data = _check_bytes(data, "message_1")
        with self._step(_Step.RECEIVE_MESSAGE_1):
            items = _read_sequence(data, "message_1")
            if len(items) < 4:
                raise _malformed("message_1 needs METHOD, SUITES_I, G_X and C_I")
            method = _as_int(items[0], "METHOD")
            suites_i = _as_suites(items[1], "SUITES_I")
            g_x = _as_bstr(items[2], "G_X")
            connection_id_i, _ = _decode_identifier(items[3], "C_I")
            _parse_ead_items(items[4:], "EAD_1")
            ead_1 = b"".join(item.raw for item in items[4:])

            if method != METHOD_SIGNATURE_SIGNATURE:
                raise EdhocError(f"method {method} not supported", code=ErrorCode.EDHOC_UNSUPPORTED_METHOD)
            # §5.2.3, §6.3.1: accept only if the selected (last) suite is the first one in SUITES_I we
            # support, so a downgrade by rewriting SUITES_I cannot go unnoticed.
            first_supported = next((suite for suite in suites_i if suite in self._suites), None)
            if first_supported is None or first_supported != suites_i[-1]:
                raise EdhocError(
                    f"selected cipher suite {suites_i[-1]} rejected",
                    code=ErrorCode.EDHOC_UNSUPPORTED_CIPHER_SUITE,
                )
            if len(g_x) != _ECDH_LENGTH:
                raise _malformed("G_X has the wrong length")
            try:
                self._g_xy = self._ephemeral_key.exchange(X25519PublicKey.from_public_bytes(g_x))
            except ValueError:  # low-order point: the shared secret would be all zeros
                raise _malformed("invalid G_X") from None
            self._h_message_1 = _hash(data)
            self._transcript = replace(
                self._transcript, message_1=data, h_message_1=self._h_message_1, g_xy=self._g_xy
            )
            return Message1Received(
                method=method, suites_i=suites_i, g_x=g_x, connection_id_i=connection_id_i, ead_1=ead_1
            )

    def error_for_wrong_suite(self) -> bytes:
        """The error message (ERR_CODE 2, SUITES_R) answering a rejected message_1 (RFC 9528 §6.3).

        SUITES_R lists every suite we support, which includes the Initiator's most preferred one
        we support, as §6.3 requires. Only valid after EDHOC_UNSUPPORTED_CIPHER_SUITE.
        """
        if self._failure is not ErrorCode.EDHOC_UNSUPPORTED_CIPHER_SUITE:
            raise LocalProtocolError("error code 2 only answers a message_1 with a rejected cipher suite")
        return encode_error(ERR_WRONG_SELECTED_CIPHER_SUITE, self._suites)

    def message_2(self, ead_2: bytes = b"") -> bytes:
        """Compose message_2 = bstr(G_Y || CIPHERTEXT_2) (RFC 9528 §5.3.1-§5.3.2)."""
        ead_2 = _check_outgoing_ead(ead_2, "EAD_2")
        c_r = _encode_identifier(self._connection_id)
        self._check_plaintext_length(len(c_r), ead_2, _MAX_KDF_LENGTH)
        with self._step(_Step.SEND_MESSAGE_2):
            g_y = self._g_y
            th_2 = _hash(cbor2.dumps(g_y) + cbor2.dumps(self._h_message_1))
            th_2_item = cbor2.dumps(th_2)
            prk_2e = _extract(th_2, self._g_xy)
            prk_3e2m = prk_2e  # method 0: no static DH, so PRK_3e2m = PRK_2e (§4.1.1.2)
            id_cred_r, cred_r = self._credential.id_cred, self._credential.cred
            # context_2 = << C_R, ID_CRED_R, TH_2, CRED_R, ? EAD_2 >>
            context_2 = c_r + id_cred_r + th_2_item + cred_r + ead_2
            mac_2 = _kdf(prk_3e2m, 2, context_2, _MAC_LENGTH)
            to_be_signed = _sig_structure(id_cred_r, th_2_item + cred_r + ead_2, mac_2)
            signature_2 = self._credential.private_key.sign(to_be_signed)
            plaintext_2 = c_r + self._plaintext_id_cred + cbor2.dumps(signature_2) + ead_2
            keystream_2 = _kdf(prk_2e, 0, th_2, len(plaintext_2))
            ciphertext_2 = _xor(plaintext_2, keystream_2)
            message_2 = cbor2.dumps(g_y + ciphertext_2)
            # TH_3 = H(TH_2, PLAINTEXT_2, CRED_R), needed for K_3/IV_3 when message_3 arrives.
            self._th_3 = _hash(th_2_item + plaintext_2 + cred_r)
            self._prk_3e2m = prk_3e2m
            self._transcript = replace(
                self._transcript,
                th_2=th_2,
                prk_2e=prk_2e,
                prk_3e2m=prk_3e2m,
                context_2=context_2,
                mac_2=mac_2,
                message_to_be_signed_2=to_be_signed,
                signature_or_mac_2=signature_2,
                plaintext_2=plaintext_2,
                keystream_2=keystream_2,
                ciphertext_2=ciphertext_2,
                message_2=message_2,
                th_3=self._th_3,
            )
            return message_2

    def receive_message_3(self, data: bytes) -> Message3Received:
        """Decrypt message_3 and return what the caller needs to find CRED_I (RFC 9528 §5.4.3).

        The AEAD authenticates the plaintext under the session keys, but not the Initiator's
        identity: call `verify_message_3` next. Raises EDHOC_DECRYPTION_FAILED on a bad tag.
        """
        data = _check_bytes(data, "message_3")
        with self._step(_Step.RECEIVE_MESSAGE_3):
            items = _read_sequence(data, "message_3")
            if items and items[0].major in (_MAJOR_UINT, _MAJOR_NINT):
                raise _peer_error(data)
            if len(items) != 1:
                raise _malformed("message_3 must be a single bstr")
            ciphertext_3 = _as_bstr(items[0], "CIPHERTEXT_3")
            if len(ciphertext_3) <= _TAG_LENGTH:
                raise _malformed("CIPHERTEXT_3 too short")
            if len(ciphertext_3) > _MAX_AEAD_PLAINTEXT + _TAG_LENGTH:
                raise _malformed("CIPHERTEXT_3 too long for AES-CCM-16-64-128")
            th_3, prk_3e2m = self._th_3, self._prk_3e2m
            k_3 = _kdf(prk_3e2m, 3, th_3, _KEY_LENGTH)
            iv_3 = _kdf(prk_3e2m, 4, th_3, _IV_LENGTH)
            a_3 = _enc_structure(th_3)
            self._transcript = replace(
                self._transcript,
                message_3=data,
                ciphertext_3=ciphertext_3,
                prk_4e3m=prk_3e2m,
                k_3=k_3,
                iv_3=iv_3,
                a_3=a_3,
            )
            try:
                plaintext_3 = AESCCM(k_3, tag_length=_TAG_LENGTH).decrypt(iv_3, ciphertext_3, a_3)
            except InvalidTag:
                raise EdhocError(
                    "message_3 does not decrypt", code=ErrorCode.EDHOC_DECRYPTION_FAILED
                ) from None

            # PLAINTEXT_3 = (ID_CRED_I / bstr / -24..23, Signature_or_MAC_3, ? EAD_3)
            fields = _read_sequence(plaintext_3, "PLAINTEXT_3")
            if len(fields) < 2:
                raise _malformed("PLAINTEXT_3 needs ID_CRED_I and Signature_or_MAC_3")
            id_cred_i = _received_id_cred(fields[0], "ID_CRED_I")
            signature_3 = _as_bstr(fields[1], "Signature_or_MAC_3")
            if len(signature_3) != _SIGNATURE_LENGTH:
                raise _malformed("Signature_or_MAC_3 has the wrong length")
            _parse_ead_items(fields[2:], "EAD_3")
            ead_3 = b"".join(field.raw for field in fields[2:])

            self._plaintext_3 = plaintext_3
            self._id_cred_i = id_cred_i
            self._signature_3 = signature_3
            self._ead_3 = ead_3
            self._transcript = replace(
                self._transcript, plaintext_3=plaintext_3, signature_or_mac_3=signature_3
            )
            return Message3Received(id_cred_i=id_cred_i, ead_3=ead_3)

    def verify_message_3(self, *, cred_i: bytes, public_key: Ed25519PublicKey) -> None:
        """Check Signature_or_MAC_3 against CRED_I and complete the session (RFC 9528 §5.4.3).

        The caller vouches that `public_key` is the key inside `cred_i` and that `cred_i` is
        acceptable for this peer. Raises EdhocError(EDHOC_BAD_SIGNATURE).
        """
        cred_i = _check_bytes(cred_i, "CRED_I")
        if not isinstance(public_key, Ed25519PublicKey):
            raise LocalProtocolError("public_key must be an Ed25519PublicKey")
        with self._step(_Step.VERIFY_MESSAGE_3):
            prk_4e3m = self._prk_3e2m  # method 0: the Initiator has no static DH key (§4.1.1.3)
            th_3_item = cbor2.dumps(self._th_3)
            context_3 = self._id_cred_i + th_3_item + cred_i + self._ead_3
            mac_3 = _kdf(prk_4e3m, 6, context_3, _MAC_LENGTH)
            to_be_signed = _sig_structure(self._id_cred_i, th_3_item + cred_i + self._ead_3, mac_3)
            self._transcript = replace(
                self._transcript, context_3=context_3, mac_3=mac_3, message_to_be_signed_3=to_be_signed
            )
            try:
                public_key.verify(self._signature_3, to_be_signed)
            except InvalidSignature:
                raise EdhocError(
                    "Signature_or_MAC_3 does not verify", code=ErrorCode.EDHOC_BAD_SIGNATURE
                ) from None
            th_4 = _hash(th_3_item + self._plaintext_3 + cred_i)
            self._prk_out = _kdf(prk_4e3m, 7, th_4, _HASH_LENGTH)
            self._prk_exporter = _kdf(self._prk_out, 10, b"", _HASH_LENGTH)
            self._transcript = replace(
                self._transcript, th_4=th_4, prk_out=self._prk_out, prk_exporter=self._prk_exporter
            )
