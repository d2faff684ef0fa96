"""What the NVIDIA and AMD platforms share because both torch builds expose their GPUs through one API.

A ROCm build of torch presents HIP devices as ``torch.cuda`` devices and maps its "nccl" backend to RCCL, so
synchronisation, IPC device ids, the socket-interface variable of the collective library, Megatron's dtype and
the per-arch peak-FLOPs lookup are written once here. Everything that differs by vendor (probing, masks,
kernels, env defaults, the FLOPs table itself) stays in ``backends/cuda`` and ``backends/rocm``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from portable_rl.platform import Platform


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

    def megatron_overrides(self) -> dict[str, Any]:
        return {"bf16": True}

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
