"""Device ids inside CUDA/HIP IPC handles (both torch builds expose them through the torch.cuda API).

torch's tensor reduction stores the exporter's device *ordinal* in the handle; an importer whose device mask
differs (a co-located engine on GPU != 0) would open the memory on the wrong device. SGLang replaces the
ordinal by the device UUID on export and maps the UUID back on import; these helpers do the same so handles
are understood by SGLang and by portable_rl's own importer.
"""

from __future__ import annotations


def device_uuid(device_index: int) -> str:
    import torch

    return str(torch.cuda.get_device_properties(device_index).uuid)


def local_ordinal_of(carried: int | str) -> int:
    import torch

    if isinstance(carried, int):
        return carried
    for index in range(torch.cuda.device_count()):
        if device_uuid(index) == carried:
            return index
    raise ValueError(
        f"shared-tensor handle names device {carried!r}, which is not visible in this process; "
        "co-locate the engine on the trainer's devices or use weight_sync.strategy=broadcast"
    )
