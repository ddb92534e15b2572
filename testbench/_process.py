"""Child processes of the test bench: started in their own process group, ready when they say so,
and never left behind.

A child announces readiness by printing one JSON object on its stdout (``{"ready": {...}}``) and
writes its log to stderr, which goes to a file. Python children also get a *lifeline*: their stdin
is a pipe from the parent, and they exit when it reaches end of file, so a parent killed with
SIGKILL still takes its children with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TextIO

# prctl(2) option: deliver a signal to this process when its parent thread exits.
_PR_SET_PDEATHSIG = 1

READY_KEY = "ready"


class ProcessStartError(RuntimeError):
    """A child process exited or stayed silent before saying it was ready."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessExit:
    """How a child process ended."""

    pid: int
    returncode: int


def python_module_argv(module: str, *args: str) -> list[str]:
    """The command line that runs ``module`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def die_with_parent() -> None:
    """``preexec_fn`` for non-Python children: the kernel sends SIGTERM when the parent dies.

    Only safe where the parent has no other threads when it forks (our node supervisor starts its
    dbus-daemon before it starts any).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


PARENT_PID_VARIABLE = "POWERBOX_PARENT_PID"


def stop_with_parent_from_environment() -> None:
    """In a Python child the test bench started (it sets POWERBOX_PARENT_PID): SIGTERM when that
    parent dies, however it dies (SIGKILL, a closed terminal), so nothing is left running.

    Done in the child, not as a ``preexec_fn``: the parent is an asyncio program with threads."""
    parent = os.environ.pop(PARENT_PID_VARIABLE, None)  # not for this process's own children
    if parent is None or not parent.isdigit() or sys.platform != "linux":
        return
    die_with_parent()
    if os.getppid() != int(parent):  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def log_tail(path: Path, max_chars: int = 4000) -> str:
    """The end of a child's log, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return text[-max_chars:] if text else "(empty log)"


class ManagedProcess:
    """A child process in its own process group, with its stderr in a log file."""

    def __init__(self, popen: subprocess.Popen[bytes], *, name: str, log_path: Path) -> None:
        self._popen = popen
        self.name = name
        self.log_path = log_path

    @classmethod
    def spawn(
        cls,
        argv: Sequence[str],
        *,
        name: str,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        ready_timeout: float = 20.0,
    ) -> tuple[ManagedProcess, dict[str, Any]]:
        """Start ``argv`` and wait until it prints its ready line; return it and the ready data."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log_file:
            popen = subprocess.Popen(  # noqa: S603 - argv is built by the test bench itself
                list(argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                env=dict(env) if env is not None else None,
                start_new_session=True,
            )
        process = cls(popen, name=name, log_path=log_path)
        try:
            ready = process._wait_ready(ready_timeout)
        except BaseException:
            process.kill()
            raise
        return process, ready

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def alive(self) -> bool:
        return self._popen.poll() is None

    def _wait_ready(self, timeout: float) -> dict[str, Any]:
        stdout = self._popen.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout
        buffer = b""
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            while b"\n" not in buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ProcessStartError(
                        f"{self.name} not ready after {timeout:.0f} s; log:\n{log_tail(self.log_path)}"
                    )
                if not selector.select(remaining):
                    continue
                chunk = os.read(stdout.fileno(), 65536)
                if not chunk:
                    code = self._popen.wait()
                    raise ProcessStartError(
                        f"{self.name} exited with status {code} before it was ready; "
                        f"log:\n{log_tail(self.log_path)}"
                    )
                buffer += chunk
        line = buffer.split(b"\n", 1)[0]
        try:
            message = json.loads(line)
        except ValueError as error:
            raise ProcessStartError(f"{self.name} printed {line!r} instead of its ready line") from error
        if not isinstance(message, dict) or not isinstance(message.get(READY_KEY), dict):
            raise ProcessStartError(f"{self.name} printed {line!r} instead of its ready line")
        ready: dict[str, Any] = message[READY_KEY]
        return ready

    def terminate(self, grace: float = 5.0) -> ProcessExit:
        """SIGTERM the child (it stops its own children), then SIGKILL the group after ``grace``."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self._popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(grace)
        return self.kill()

    def kill(self) -> ProcessExit:
        """SIGKILL the whole process group at once (a power cut) and reap the child."""
        self._signal_group(signal.SIGKILL)
        returncode = self._popen.wait()
        self._close_pipes()
        return ProcessExit(pid=self.pid, returncode=returncode)

    def _signal_group(self, signum: int) -> None:
        # The group outlives its leader when grandchildren remain, so signal it even after
        # the leader has been reaped.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._popen.pid, signum)

    def _close_pipes(self) -> None:
        for pipe in (self._popen.stdin, self._popen.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def print_ready(data: Mapping[str, Any], stream: TextIO | None = None) -> None:
    """The child side of the handshake: announce readiness with ``data``."""
    out = stream if stream is not None else sys.stdout
    out.write(json.dumps({READY_KEY: dict(data)}) + "\n")
    out.flush()


def watch_lifeline(on_parent_gone: Callable[[], object]) -> None:
    """The child side of the lifeline: call ``on_parent_gone`` (from a thread) when stdin closes."""

    # The raw descriptor, not sys.stdin: a thread blocked in a buffered read holds its lock
    # and makes interpreter shutdown abort.
    def wait_for_eof() -> None:
        with contextlib.suppress(OSError, ValueError):
            while os.read(0, 65536):
                pass
        on_parent_gone()

    threading.Thread(target=wait_for_eof, name="lifeline", daemon=True).start()


class ChildHandle:
    """A test-bench part running as a ManagedProcess, with a scratch directory that goes with it:
    `stop()` (SIGTERM, then SIGKILL), `kill()` (a power cut), and use as a context manager."""

    def __init__(self, process: ManagedProcess, *, scratch_dir: Path | None) -> None:
        self._process = process
        self._scratch_dir = scratch_dir

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def alive(self) -> bool:
        return self._process.alive

    @property
    def log_path(self) -> Path:
        return self._process.log_path

    def stop(self) -> ProcessExit:
        """Shut it down cleanly (SIGTERM, then SIGKILL after a grace period)."""
        try:
            return self._process.terminate()
        finally:
            self._remove_scratch_dir()

    def kill(self) -> ProcessExit:
        """Power cut: SIGKILL its whole process group at once."""
        try:
            return self._process.kill()
        finally:
            self._remove_scratch_dir()

    def _remove_scratch_dir(self) -> None:
        # a log kept in the scratch directory (no log path given) goes with it
        if self._scratch_dir is not None:
            shutil.rmtree(self._scratch_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
