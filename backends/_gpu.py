"""What the NVIDIA and AMD platforms share because both torch builds expose their GPUs through one API.

A ROCm build of torch presents HIP devices as ``torch.cuda`` devices and maps its "nccl" backend to RCCL, so
synchronisation, IPC device ids, the socket-interface variable of the collective library, the trainer's default
dtype and kernel order (TransformerEngine where it imports, else torch SDPA) and the per-arch peak-FLOPs lookup are written once here. Everything that differs by vendor (probing, masks,
kernels, env defaults, the FLOPs table itself) stays in ``backends/cuda`` and ``backends/rocm``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import ClassVar

from portable_rl.platform import DeviceInfo, Platform, ProbeResult


class TorchGpuPlatform(Platform):
    # Dense peak FLOP/s per arch and dtype; each vendor fills its own table.
    peak_flops_table: ClassVar[dict[str, dict[str, float]]] = {}

    def _arch(self, arch: str | None) -> str | None:
        """The base arch name (``gfx942:sramecc+:xnack-`` -> ``gfx942``), defaulting to device 0's."""
        if not arch:
            arch = self.devices[0].arch if self.devices else None
        return arch.split(":")[0] if arch else None

    def peak_flops(self, dtype: str = "bf16", arch: str | None = None) -> float | None:
        return self.peak_flops_table.get(self._arch(arch) or "", {}).get(dtype)

    # Both vendors' training images ship TransformerEngine; without it the trainer uses torch SDPA, whose
    # fused flash / memory-efficient kernels come with the torch build (no flash-attn package needed).
    trainer_attention_order: ClassVar[tuple[str, ...]] = ("transformer_engine", "sdpa")
    # bf16 compute with fp32 master weights in Megatron's optimizer; train.dtype=float32 is honoured.
    default_train_dtype: ClassVar[str] = "bfloat16"

    def attention_unavailable(self, name: str) -> str | None:
        if name == "transformer_engine" and importlib.util.find_spec("transformer_engine") is None:
            return "transformer_engine does not import in this environment (install TransformerEngine)"
        return super().attention_unavailable(name)

    def network_env(self, ifname: str) -> dict[str, str]:
        env = super().network_env(ifname)
        # NCCL and RCCL both read the NCCL_ name for their bootstrap and socket transport.
        env["NCCL_SOCKET_IFNAME"] = ifname
        return env

    def synchronize(self) -> None:
        import torch

        torch.cuda.synchronize()

    def ipc_export_device(self, device_index: int) -> int | str:
        from portable_rl.backends._ipc_device import device_uuid

        return device_uuid(device_index)

    def ipc_import_device(self, carried: int | str) -> int:
        from portable_rl.backends._ipc_device import local_ordinal_of

        return local_ordinal_of(carried)


def probe_devices(
    runtime: str,
    management: tuple[str, Callable[[], list[DeviceInfo] | None]],
    fallback: tuple[str, Callable[[], list[DeviceInfo]]],
    vendor_device: str,
) -> ProbeResult:
    """Devices from the vendor management library, else from its fallback (sysfs/procfs), never the runtime.

    ``runtime`` names the torch build in the reason ("CUDA torch 13.0"); ``management`` answers None when the
    library cannot be imported or initialised, which is when the fallback is read.
    """
    source, found = management[0], management[1]()
    if found is None:
        source, found = fallback[0], fallback[1]()
    if not found:
        return ProbeResult(False, f"{runtime} but no {vendor_device} found ({source})")
    return ProbeResult(True, f"{runtime}; {len(found)} device(s) via {source}", tuple(found))
