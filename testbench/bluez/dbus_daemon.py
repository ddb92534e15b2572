"""A private dbus-daemon standing in for the system bus of one test-bench node."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from testbench._process import die_with_parent

_CONFIG_RESOURCE = "private-bus.conf"


class DBusDaemonError(RuntimeError):
    """dbus-daemon is missing or did not start."""


def find_dbus_daemon() -> str:
    path = shutil.which("dbus-daemon") or (
        "/usr/bin/dbus-daemon" if os.access("/usr/bin/dbus-daemon", os.X_OK) else None
    )
    if path is None:
        raise DBusDaemonError("dbus-daemon not found (install the dbus package)")
    return path


def config_text(listen_address: str) -> str:
    template = resources.files("testbench.bluez").joinpath("data", _CONFIG_RESOURCE).read_text()
    return template.replace("@LISTEN_ADDRESS@", listen_address)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunningBus:
    """A started dbus-daemon: its address (with guid) and process."""

    address: str
    pid: int


class PrivateBus:
    """Start and stop a dbus-daemon listening on a unix socket in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> RunningBus:
        config = self._directory / "bus.conf"
        config.write_text(config_text(f"unix:path={self._directory / 'bus'}"))
        # Never started from a multithreaded process (the node starts it first), so preexec_fn is safe.
        process = subprocess.Popen(  # noqa: S603 - fixed argv
            [find_dbus_daemon(), f"--config-file={config}", "--nofork", "--print-address=1"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=die_with_parent,
        )
        self._process = process
        assert process.stdout is not None
        address = process.stdout.readline().decode().strip()
        if not address:
            error = process.stderr.read().decode(errors="replace") if process.stderr else ""
            self.stop()
            raise DBusDaemonError(f"dbus-daemon did not start: {error.strip()}")
        return RunningBus(address=address, pid=process.pid)

    def stop(self) -> None:
        process = self._process
        if process is None:
            return
        self._process = None
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
