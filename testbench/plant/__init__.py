"""The simulated plant: a real Modbus TCP server standing in for the box's meters, relays and doors.

docs/hardware.md §6. In tests::

    async with running_plant(outlets=2, time_scale=0) as plant:  # in this event loop
        await plant.control.set_load(2, 2000)
        await plant.control.advance(60_000)

    async with plant_process(outlets=4, time_scale=60) as plant:  # as a child process
        status = await plant.control.status()

From a shell: `powerbox plant run --port 5020`, then `powerbox plant load 2 2000` and friends.
"""

from .client import LOOPBACK, PlantControl, PlantControlError, PlantEndpoint
from .controlmap import CONTROL_UNIT_ID, DeviceFault, DeviceFaultState, OutletStatus, PlantStatus
from .model import PlantClock, PlantError, PlantModel
from .process import PlantProcess, plant_process
from .server import Plant, PlantServer, running_plant

__all__ = [
    "CONTROL_UNIT_ID",
    "LOOPBACK",
    "DeviceFault",
    "DeviceFaultState",
    "OutletStatus",
    "Plant",
    "PlantClock",
    "PlantControl",
    "PlantControlError",
    "PlantEndpoint",
    "PlantError",
    "PlantModel",
    "PlantProcess",
    "PlantServer",
    "PlantStatus",
    "plant_process",
    "running_plant",
]
