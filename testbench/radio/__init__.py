"""The virtual radio: linked bumble controllers served as HCI over TCP (docs/testbench.md)."""

from testbench.radio.hub import ControllerEndpoint, VirtualRadio
from testbench.radio.process import RadioProcess

__all__ = ["ControllerEndpoint", "RadioProcess", "VirtualRadio"]
