"""Application processes on a node (a bless box, a bleak phone...), driven from asyncio.

An :class:`AppProcess` runs in its own process group with the node's environment; its stderr goes
to a log file and its stdout is read line by line. Lines that are JSON objects are kept as
messages (events and replies); anything else is only logged, since libraries print too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbench._process import PARENT_PID_VARIABLE

logger = logging.getLogger(__name__)

Message = dict[str, Any]
MessagePredicate = Callable[[Message], bool]


class AppProcessError(RuntimeError):
    """The process ended, or did not say what was expected in time."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ExitStatus:
    pid: int
    returncode: int


class AppProcess:
    """One child process with a JSON-lines conversation on stdin/stdout."""

    def __init__(self, process: asyncio.subprocess.Process, *, name: str, log_path: Path) -> None:
        self._process = process
        self.name = name
        self.log_path = log_path
        self._messages: list[Message] = []
        self._new_message = asyncio.Condition()
        self._next_request_id = 0
        self._reader = asyncio.get_running_loop().create_task(self._read_stdout())

    @classmethod
    async def start(
        cls, argv: Sequence[str], *, name: str, env: Mapping[str, str], log_path: Path
    ) -> AppProcess:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log_file:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                env={**env, PARENT_PID_VARIABLE: str(os.getpid())},
                start_new_session=True,
            )
        return cls(process, name=name, log_path=log_path)

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    async def _read_stdout(self) -> None:
        stdout = self._process.stdout
        assert stdout is not None
        while line := await stdout.readline():
            text = line.decode(errors="replace").strip()
            try:
                message = json.loads(text)
            except ValueError:
                message = None
            if not isinstance(message, dict):
                logger.debug("%s: %s", self.name, text)
                continue
            async with self._new_message:
                self._messages.append(message)
                self._new_message.notify_all()
        async with self._new_message:
            self._new_message.notify_all()

    # ------------------------------------------------------------------ conversation

    def send(self, message: Mapping[str, Any]) -> None:
        stdin = self._process.stdin
        if stdin is None or stdin.is_closing():
            raise AppProcessError(f"{self.name} is not accepting input")
        stdin.write((json.dumps(dict(message)) + "\n").encode())

    async def wait_for(
        self, predicate: MessagePredicate, *, within: float, what: str = "a message"
    ) -> Message:
        """The first message (already received or coming) that satisfies ``predicate``; it is consumed."""

        def find() -> Message | None:
            for index, message in enumerate(self._messages):
                if predicate(message):
                    return self._messages.pop(index)
            return None

        try:
            async with asyncio.timeout(within), self._new_message:
                while (found := find()) is None:
                    if self._reader.done():
                        raise AppProcessError(
                            f"{self.name} ended (status {self.returncode}) before {what}{self._last_said()}"
                        )
                    await self._new_message.wait()
                return found
        except TimeoutError:
            raise AppProcessError(f"{self.name}: no {what} within {within} s{self._last_said()}") from None

    def _last_said(self) -> str:
        """For a failed wait: the process's last unclaimed message (often its error event)."""
        return f"; its last message: {self._messages[-1]}" if self._messages else ""

    async def wait_event(self, event: str, *, within: float, **fields: Any) -> Message:
        """The next ``{"event": event, ...}`` message whose fields include ``fields``."""
        return await self.wait_for(
            lambda m: m.get("event") == event and all(m.get(k) == v for k, v in fields.items()),
            within=within,
            what=f"{event!r} event",
        )

    async def request(
        self, command: str, arguments: Mapping[str, Any] | None = None, *, within: float
    ) -> Message:
        """Send ``{"cmd": command, "id": n, **arguments}`` and wait for ``{"reply": n, ...}``."""
        self._next_request_id += 1
        request_id = self._next_request_id
        self.send({**(arguments or {}), "cmd": command, "id": request_id})
        return await self.wait_for(
            lambda m: m.get("reply") == request_id, within=within, what=f"reply to {command}"
        )

    # ------------------------------------------------------------------ lifecycle

    def kill(self) -> None:
        """SIGKILL the process group: the application dies without any clean-up."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, signal.SIGKILL)

    async def wait(self, within: float = 10.0) -> ExitStatus:
        returncode = await asyncio.wait_for(self._process.wait(), within)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._reader, 1.0)
        return ExitStatus(pid=self.pid, returncode=returncode)

    async def stop(self, grace: float = 3.0) -> ExitStatus:
        """Close stdin and SIGTERM; SIGKILL the group if it is still there after ``grace``."""
        if self._process.returncode is None:
            stdin = self._process.stdin
            if stdin is not None and not stdin.is_closing():
                stdin.close()
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._process.wait(), grace)
        self.kill()
        status = await self.wait()
        self._reader.cancel()
        return status
