"""``python -m testbench.bluez``: the same as ``powerbox bluez``."""

from testbench.bluez.cli import bluez

bluez(prog_name="python -m testbench.bluez")
