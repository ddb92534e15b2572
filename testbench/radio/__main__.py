"""``python -m testbench.radio``: the same as ``powerbox radio``."""

from testbench.radio.cli import radio

radio(prog_name="python -m testbench.radio")
