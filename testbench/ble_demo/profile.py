"""The demo echo service: what the demo box serves and the demo phone uses."""

from __future__ import annotations

import enum

SERVICE_UUID = "8f2c0001-5b8a-4d2f-9e7b-3c1a2d4e6f70"


class DemoCharacteristic(enum.Enum):
    """The characteristics of the demo service, by role."""

    ECHO = "8f2c0002-5b8a-4d2f-9e7b-3c1a2d4e6f70"
    """write + write-without-response: echoed back on TX. With BlueZ, a characteristic that has
    write-without-response answers write requests before the application runs, so application
    errors never reach the phone here."""
    STRICT = "8f2c0003-5b8a-4d2f-9e7b-3c1a2d4e6f70"
    """write only: echoed like ECHO, but a value starting with ``fail`` makes the handler raise,
    which the phone sees as an ATT error."""
    TX = "8f2c0004-5b8a-4d2f-9e7b-3c1a2d4e6f70"
    """read + notify: the echoes."""
    INFO = "8f2c0005-5b8a-4d2f-9e7b-3c1a2d4e6f70"
    """read: ``<box name>;writes=<count>``."""

    @classmethod
    def by_name(cls, name: str) -> DemoCharacteristic:
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"no demo characteristic {name!r}") from None


FAIL_PREFIX = b"fail"
DEFAULT_CHUNK = 244  # MTU 247 - 3: the most a notification carries
