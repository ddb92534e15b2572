"""``org.bluez.Error.*`` replies and the ATT error mapping, as BlueZ does them.

References: BlueZ src/error.c (names and texts), src/gatt-client.c ``create_gatt_dbus_error``
(ATT error at a remote server -> D-Bus error for the local client) and src/gatt-database.c
``dbus_error_to_att_ecode`` (D-Bus error from a local application -> ATT error for the remote
client).
"""

from __future__ import annotations

import enum

ERROR_PREFIX = "org.bluez.Error."

# Standard D-Bus errors the emulator also uses where libdbus/BlueZ would.
UNKNOWN_OBJECT = "org.freedesktop.DBus.Error.UnknownObject"
UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"
UNKNOWN_INTERFACE = "org.freedesktop.DBus.Error.UnknownInterface"
INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
PROPERTY_READ_ONLY = "org.freedesktop.DBus.Error.PropertyReadOnly"


class AttErrorCode(enum.IntEnum):
    """ATT error codes (Core Vol 3, Part F §3.4.1.1; 0xFD/0xFE from CSS Part B §1.2)."""

    INVALID_HANDLE = 0x01
    READ_NOT_PERMITTED = 0x02
    WRITE_NOT_PERMITTED = 0x03
    INVALID_PDU = 0x04
    INSUFFICIENT_AUTHENTICATION = 0x05
    REQUEST_NOT_SUPPORTED = 0x06
    INVALID_OFFSET = 0x07
    INSUFFICIENT_AUTHORIZATION = 0x08
    PREPARE_QUEUE_FULL = 0x09
    ATTRIBUTE_NOT_FOUND = 0x0A
    ATTRIBUTE_NOT_LONG = 0x0B
    INSUFFICIENT_ENCRYPTION_KEY_SIZE = 0x0C
    INVALID_ATTRIBUTE_VALUE_LENGTH = 0x0D
    UNLIKELY_ERROR = 0x0E
    INSUFFICIENT_ENCRYPTION = 0x0F
    UNSUPPORTED_GROUP_TYPE = 0x10
    INSUFFICIENT_RESOURCES = 0x11
    CCC_IMPROPERLY_CONFIGURED = 0xFD
    ALREADY_IN_PROGRESS = 0xFE


# Application error codes an app may return as the text of org.bluez.Error.Failed.
_APPLICATION_ERROR_RANGE = range(0x80, 0xA0)


class BluezError(Exception):
    """A D-Bus error reply: ``name`` is the error name, ``text`` its message."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}")
        self.name = name
        self.text = text


def failed(text: str) -> BluezError:
    return BluezError(ERROR_PREFIX + "Failed", text)


def invalid_arguments(text: str = "Invalid arguments in method call") -> BluezError:
    return BluezError(ERROR_PREFIX + "InvalidArguments", text)


def in_progress(text: str = "In Progress") -> BluezError:
    return BluezError(ERROR_PREFIX + "InProgress", text)


def busy() -> BluezError:
    return BluezError(ERROR_PREFIX + "InProgress", "Operation already in progress")


def already_exists() -> BluezError:
    return BluezError(ERROR_PREFIX + "AlreadyExists", "Already Exists")


def does_not_exist() -> BluezError:
    return BluezError(ERROR_PREFIX + "DoesNotExist", "Does Not Exist")


def not_supported() -> BluezError:
    return BluezError(ERROR_PREFIX + "NotSupported", "Operation is not supported")


def not_connected() -> BluezError:
    return BluezError(ERROR_PREFIX + "NotConnected", "Not Connected")


def not_ready() -> BluezError:
    return BluezError(ERROR_PREFIX + "NotReady", "Resource Not Ready")


def not_permitted(text: str) -> BluezError:
    return BluezError(ERROR_PREFIX + "NotPermitted", text)


def not_authorized() -> BluezError:
    return BluezError(ERROR_PREFIX + "NotAuthorized", "Operation Not Authorized")


def gatt_error(att_code: int) -> BluezError:
    """The error a local client gets when the remote GATT server answered ``att_code``.

    ``att_code`` 0 means the operation failed without an ATT error (link lost, timeout).
    """
    match att_code:
        case AttErrorCode.READ_NOT_PERMITTED:
            return not_permitted("Read not permitted")
        case AttErrorCode.WRITE_NOT_PERMITTED:
            return not_permitted("Write not permitted")
        case (
            AttErrorCode.INSUFFICIENT_AUTHENTICATION
            | AttErrorCode.INSUFFICIENT_ENCRYPTION
            | AttErrorCode.INSUFFICIENT_ENCRYPTION_KEY_SIZE
        ):
            return not_permitted("Not paired")
        case AttErrorCode.INVALID_OFFSET:
            return invalid_arguments("Invalid offset")
        case AttErrorCode.INVALID_ATTRIBUTE_VALUE_LENGTH:
            return invalid_arguments("Invalid Length")
        case AttErrorCode.INSUFFICIENT_AUTHORIZATION:
            return not_authorized()
        case AttErrorCode.REQUEST_NOT_SUPPORTED:
            return not_supported()
        case 0:
            return failed("Operation failed")
        case _:
            return failed(f"Operation failed with ATT error: 0x{att_code:02x}")


def att_code_for_application_error(error_name: str, error_text: str, permission_error: int) -> int:
    """The ATT error a remote client gets when a local GATT application answers with an error.

    ``permission_error`` is READ_NOT_PERMITTED or WRITE_NOT_PERMITTED, used for NotPermitted.
    Anything BlueZ does not recognise (a Python exception in the application, for instance)
    becomes "unlikely error".
    """
    match error_name.removeprefix(ERROR_PREFIX) if error_name.startswith(ERROR_PREFIX) else None:
        case "Failed":
            # strtol(text, &end, 0) in BlueZ: a bare number; an empty text reads as 0.
            number = error_text.lstrip()
            try:
                code = int(number, 0) if number else 0
            except ValueError:
                return 0x80
            return code if code in _APPLICATION_ERROR_RANGE else AttErrorCode.UNLIKELY_ERROR
        case "NotSupported":
            return AttErrorCode.REQUEST_NOT_SUPPORTED
        case "NotAuthorized":
            return AttErrorCode.INSUFFICIENT_AUTHORIZATION
        case "InvalidValueLength":
            return AttErrorCode.INVALID_ATTRIBUTE_VALUE_LENGTH
        case "InvalidOffset":
            return AttErrorCode.INVALID_OFFSET
        case "InProgress":
            return AttErrorCode.ALREADY_IN_PROGRESS
        case "ImproperlyConfigured":
            return AttErrorCode.CCC_IMPROPERLY_CONFIGURED
        case "NotPermitted":
            return permission_error
        case _:
            return AttErrorCode.UNLIKELY_ERROR
