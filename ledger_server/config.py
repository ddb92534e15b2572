"""Server configuration: one frozen record, read once at start-up (from the CLI or the environment)."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Clock = Callable[[], int]

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///powerbox-server.db"
DEFAULT_KEY_DIRECTORY = "server-keys"
DATABASE_URL_VARIABLE = "POWERBOX_SERVER_DATABASE_URL"
KEY_DIRECTORY_VARIABLE = "POWERBOX_SERVER_KEYS"


def system_clock() -> int:
    """Seconds since 1970, UTC: the only place the server reads the wall clock."""
    return int(time.time())


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    database_url: str = DEFAULT_DATABASE_URL
    key_directory: Path = Path(DEFAULT_KEY_DIRECTORY)
    access_token_seconds: int = 900
    one_time_code_seconds: int = 300
    one_time_code_attempts: int = 5
    one_time_codes_per_hour: int = 5
    long_poll_max_seconds: int = 30
    # A waiting poll is woken at once by changes made in its own process; changes made by another
    # process are found by looking at the database this often.
    long_poll_interval_ms: int = 2000
    max_batch_entries: int = 2000
    max_request_bytes: int = 2 * 1024 * 1024
    max_grant_fen: int = 100_000
    max_grant_seconds: int = 30 * 86_400
    # An open grant nobody has reported using is released this long after it expires, so a box
    # that was offline when the grant ran out has a moment to report first.
    release_grace_seconds: int = 3600
    certificate_validity_seconds: int = 5 * 365 * 86_400
    settle_after_ingest: bool = True
    settle_chunk_entries: int = 1000
    # The development SMS provider also appends every message here (a test or a developer reads codes).
    dev_sms_log: Path | None = None
    verify_threads: int = max(1, os.cpu_count() or 1)
    # Batches of at least `process_batch_threshold` entries are decoded and verified in
    # `verify_processes` worker processes (0: none); smaller ones on the event loop and threads,
    # which costs no process start-up.
    verify_processes: int = max(1, os.cpu_count() or 1)
    process_batch_threshold: int = 256

    @classmethod
    def from_environment(cls, **overrides: Any) -> ServerConfig:
        """Database and key directory from the environment, anything else from `overrides` (None: default)."""
        config = cls(
            database_url=os.environ.get(DATABASE_URL_VARIABLE, DEFAULT_DATABASE_URL),
            key_directory=Path(os.environ.get(KEY_DIRECTORY_VARIABLE, DEFAULT_KEY_DIRECTORY)),
        )
        return dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
