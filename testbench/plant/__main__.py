"""``python -m testbench.plant``: the same as ``powerbox plant``."""

from testbench.plant.cli import plant

plant(prog_name="python -m testbench.plant")
