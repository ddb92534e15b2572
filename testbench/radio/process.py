"""Start and stop the virtual radio as a child process (what tests and the node API use)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from testbench._process import ChildHandle, ManagedProcess, python_module_argv
from testbench.radio.hub import LOOPBACK, ControllerEndpoint


class RadioProcess(ChildHandle):
    """A running ``powerbox radio`` child process and the controllers it serves."""

    def __init__(
        self,
        process: ManagedProcess,
        endpoints: tuple[ControllerEndpoint, ...],
        *,
        scratch_dir: Path | None = None,
    ) -> None:
        super().__init__(process, scratch_dir=scratch_dir)
        self.endpoints = endpoints

    @classmethod
    def start(
        cls,
        *,
        controllers: int,
        base_port: int = 0,
        host: str = LOOPBACK,
        link_loss_delay: float = 0.0,
        log_path: Path | None = None,
        ready_timeout: float = 20.0,
    ) -> RadioProcess:
        """Start a radio with ``controllers`` controllers; ``base_port=0`` picks free ports.

        Without ``log_path`` the log goes to a scratch directory removed with the radio.
        """
        argv = python_module_argv(
            "testbench.radio",
            "--nodes", str(controllers),
            "--port", str(base_port),
            "--host", host,
            "--link-loss-delay", repr(link_loss_delay),
            "--json",
            "--exit-on-stdin-eof",
            "-v",
        )  # fmt: skip
        scratch_dir: Path | None = None
        if log_path is None:
            scratch_dir = Path(tempfile.mkdtemp(prefix="powerbox-radio-"))
            log_path = scratch_dir / "radio.log"
        try:
            process, ready = ManagedProcess.spawn(
                argv, name="radio", log_path=log_path, ready_timeout=ready_timeout
            )
        except BaseException:
            if scratch_dir is not None:
                shutil.rmtree(scratch_dir, ignore_errors=True)
            raise
        ready_host = str(ready.get("host", host))
        endpoints = tuple(ControllerEndpoint(host=ready_host, port=int(port)) for port in ready["ports"])
        return cls(process, endpoints, scratch_dir=scratch_dir)
