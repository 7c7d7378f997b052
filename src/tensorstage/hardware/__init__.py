"""Hardware: devices (peaks, memory, links, efficiencies), systems (nodes + ASTRA-sim style network).

Every number in a preset carries its source; efficiency parameters say whether they were measured
or assumed. Nothing here knows about graphs or plans.
"""

from tensorstage.hardware.device import DTYPES, DeviceSpec
from tensorstage.hardware.presets import all_devices, device_names, load_device
from tensorstage.hardware.system import (
    NetworkDim,
    ScaleOutFabric,
    SystemSpec,
    all_systems,
    load_system,
    system_names,
    write_system_yaml,
)

__all__ = [
    "DTYPES",
    "DeviceSpec",
    "NetworkDim",
    "ScaleOutFabric",
    "SystemSpec",
    "all_devices",
    "all_systems",
    "device_names",
    "load_device",
    "load_system",
    "system_names",
    "write_system_yaml",
]
