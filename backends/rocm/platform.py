"""AMD platform: ROCm torch build (device type "cuda"), RCCL collectives (torch backend "nccl"), amdsmi probe.

Probe: ``torch.version.hip`` set and amdsmi or the KFD topology in sysfs reports at least one GPU. No HIP
context is created.

Device visibility on ROCm is layered: ROCR_VISIBLE_DEVICES (ROCr runtime) selects among physical GPUs, then
HIP_VISIBLE_DEVICES — or its alias CUDA_VISIBLE_DEVICES — selects among what ROCR left. Ray 2.45+ masks with
HIP_VISIBLE_DEVICES and raises "Please use HIP_VISIBLE_DEVICES instead of ROCR_VISIBLE_DEVICES" when only
ROCR is set; older Ray used ROCR_VISIBLE_DEVICES. So before Ray sees the env we fold every mask into one
HIP_VISIBLE_DEVICES of physical indices (CUDA_VISIBLE_DEVICES mirrors it), drop ROCR, and set both NOSET flags.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from collections.abc import Mapping, MutableMapping
from typing import Any, ClassVar

from portable_rl.backends._gpu import TorchGpuPlatform, probe_devices
from portable_rl.backends._visibility import format_mask, parse_mask
from portable_rl.platform import DeviceInfo, KernelStatus, ProbeResult, VisibilityError

ROCR = "ROCR_VISIBLE_DEVICES"
HIP = "HIP_VISIBLE_DEVICES"
CUDA_ALIAS = "CUDA_VISIBLE_DEVICES"
NOSET_HIP = "RAY_EXPERIMENTAL_NOSET_HIP_VISIBLE_DEVICES"  # Ray >= 2.45
NOSET_ROCR = "RAY_EXPERIMENTAL_NOSET_ROCR_VISIBLE_DEVICES"  # older Ray

# gfx target -> fp8 e4m3 flavour. MI300 (gfx942) implements the "fnuz" variant (no negative zero, bias 8);
# MI350 (gfx950) implements OCP e4m3fn like NVIDIA. Older Instinct parts have no fp8.
FP8_BY_ARCH: dict[str, str] = {"gfx942": "float8_e4m3fnuz", "gfx950": "float8_e4m3fn"}

# Dense peak FLOP/s per device.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "gfx90a": {"bf16": 383e12, "fp16": 383e12, "fp32": 47.9e12},  # MI250X
    "gfx942": {"bf16": 1307.4e12, "fp16": 1307.4e12, "fp8": 2614.9e12, "fp32": 163.4e12},  # MI300X/MI325X
    "gfx950": {"bf16": 2300e12, "fp16": 2300e12, "fp8": 4600e12, "fp32": 157.3e12},  # MI355X
}


def _torch_hip() -> str | None:
    import torch

    return getattr(torch.version, "hip", None)


def _arch_from_gfx_version(value: int) -> str:
    """KFD's gfx_target_version 90402 -> "gfx942" (major*10000 + minor*100 + stepping)."""
    major, minor, step = value // 10000, (value // 100) % 100, value % 100
    return f"gfx{major}{minor:x}{step:x}"


def _amdsmi_devices() -> list[DeviceInfo] | None:
    try:
        import amdsmi
    except ImportError:
        return None
    try:
        amdsmi.amdsmi_init()
    except Exception:  # AmdSmiLibraryException and driver-state errors vary across releases
        return None
    try:
        out = []
        for i, handle in enumerate(amdsmi.amdsmi_get_processor_handles()):
            info = amdsmi.amdsmi_get_gpu_asic_info(handle)
            arch = info.get("target_graphics_version") or None
            vram = (
                amdsmi.amdsmi_get_gpu_vram_info(handle) if hasattr(amdsmi, "amdsmi_get_gpu_vram_info") else {}
            )
            size_mb = vram.get("vram_size") if isinstance(vram, dict) else None
            out.append(
                DeviceInfo(
                    index=i,
                    name=str(info.get("market_name", "AMD GPU")),
                    arch=str(arch) if arch else None,
                    memory_bytes=int(size_mb) * 1024 * 1024 if size_mb else None,
                )
            )
        return out
    finally:
        amdsmi.amdsmi_shut_down()


def _kfd_devices(root: str = "/sys/class/kfd/kfd/topology/nodes") -> list[DeviceInfo]:
    out: list[DeviceInfo] = []
    for props in sorted(glob.glob(os.path.join(root, "*", "properties"))):
        fields = {}
        with open(props, encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(" ")
                fields[key] = value.strip()
        gfx = int(fields.get("gfx_target_version", "0") or 0)
        if gfx == 0:  # CPU nodes of the topology have no gfx target
            continue
        out.append(DeviceInfo(index=len(out), name="AMD GPU", arch=_arch_from_gfx_version(gfx)))
    return out


class RocmPlatform(TorchGpuPlatform):
    name: ClassVar[str] = "rocm"
    torch_device_type: ClassVar[str] = "cuda"  # ROCm builds of torch expose HIP devices as "cuda"
    dist_backend: ClassVar[str] = "nccl"  # maps to RCCL on a ROCm build
    comm_library: ClassVar[str] = "RCCL"
    visible_devices_env: ClassVar[tuple[str, ...]] = (ROCR, HIP, CUDA_ALIAS)
    ray_resource: ClassVar[str | None] = "GPU"
    ray_noset_env: ClassVar[tuple[str, ...]] = (NOSET_HIP, NOSET_ROCR)
    comm_env_defaults: ClassVar[dict[str, str]] = {
        # Known RCCL hangs with cuMem allocations, NVLS-style multicast and MSCCL algorithms.
        "NCCL_CUMEM_ENABLE": "0",
        "NCCL_NVLS_ENABLE": "0",
        "RCCL_MSCCL_ENABLE": "0",
        "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    }
    runtime_env_defaults: ClassVar[dict[str, str]] = {
        "HSA_NO_SCRATCH_RECLAIM": "1",
        "HIP_FORCE_DEV_KERNARG": "1",
        "SGLANG_USE_AITER": "1",
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    }
    sglang_attention_backend: ClassVar[str] = "aiter"
    sglang_device: ClassVar[str] = "cuda"
    supports_numa_affinity: ClassVar[bool] = (
        False  # NVML's CPU-affinity query has no amdsmi equivalent used here
    )
    ipc_handle_carries_device: ClassVar[bool] = True  # HIP IPC handle names the exporter's device ordinal
    memory_saver_supported: ClassVar[bool] = False
    shared_tensor_transport: ClassVar[str] = "cuda_ipc"
    peak_flops_table: ClassVar[dict[str, dict[str, float]]] = PEAK_FLOPS
    default_fp8_dtype: ClassVar[str | None] = "float8_e4m3fnuz"
    k8s_gpu_resource: ClassVar[str | None] = "amd.com/gpu"  # the vendor device plugin's resource name
    # The KFD compute node and the DRM render nodes; both are owned by the "video" group (GID 44).
    container_device_mounts: ClassVar[tuple[str, ...]] = ("/dev/kfd", "/dev/dri")
    container_supplemental_groups: ClassVar[tuple[int, ...]] = (44,)

    @classmethod
    def probe(cls) -> ProbeResult:
        hip = _torch_hip()
        if not hip:
            return ProbeResult(
                False, "torch is not a ROCm build (torch.version.hip is None); use the rocm image"
            )
        return probe_devices(
            f"ROCm torch {hip}", ("amdsmi", _amdsmi_devices), ("KFD sysfs", _kfd_devices), "AMD GPU"
        )

    # ---- capabilities -----------------------------------------------------------------------------------
    def fp8_dtype(self, arch: str | None = None) -> str | None:
        a = self._arch(arch)
        if a is None:
            return self.default_fp8_dtype
        return FP8_BY_ARCH.get(a)

    def has_aiter(self) -> bool:
        # amd-aiter installs the import name "aiter"; PyPI's unrelated "aiter" package is never a dependency.
        return importlib.util.find_spec("aiter") is not None

    def kernels(self) -> list[KernelStatus]:
        aiter = self.has_aiter()
        fa = importlib.util.find_spec("flash_attn") is not None
        return [
            KernelStatus(
                "amd-aiter",
                aiter,
                "SGLang attention 'aiter'" if aiter else "not installed: SGLang uses 'triton'",
            ),
            KernelStatus(
                "flash-attn (CK)",
                fa,
                "not used by the trainer (TE or torch SDPA bring their own flash kernels)"
                if fa
                else "not installed: not needed (the trainer's attention is TE or torch SDPA)",
            ),
            KernelStatus(
                "transformer-engine",
                importlib.util.find_spec("transformer_engine") is not None,
                "trainer: TE layer spec + TE attention"
                if importlib.util.find_spec("transformer_engine") is not None
                else "not installed: trainer uses Megatron's local spec + torch SDPA attention",
            ),
            KernelStatus("sglang", importlib.util.find_spec("sglang") is not None, "rollout engine on GPU"),
        ]

    def sglang_server_args(self) -> dict[str, Any]:
        args = super().sglang_server_args()
        args["attention_backend"] = "aiter" if self.has_aiter() else "triton"
        return args

    # ---- visibility ---------------------------------------------------------------------------------------
    def resolve_visible_devices(self, env: Mapping[str, str] | None = None) -> list[int]:
        env = os.environ if env is None else env
        hip, alias = env.get(HIP), env.get(CUDA_ALIAS)
        if hip is not None and alias is not None and hip.strip() != alias.strip():
            raise VisibilityError(
                f"{HIP}={hip!r} and {CUDA_ALIAS}={alias!r} disagree; on ROCm they are the same mask — "
                f"set only {HIP}"
            )
        visible = list(range(len(self.devices)))
        if ROCR in env:
            visible = parse_mask(ROCR, env[ROCR], visible)
        mask_var = HIP if hip is not None else (CUDA_ALIAS if alias is not None else None)
        if mask_var:
            visible = parse_mask(mask_var, env[mask_var], visible)
        return visible

    def check_ray_compatible(self, env: Mapping[str, str] | None = None) -> None:
        """Raise VisibilityError for an env Ray >= 2.45 would reject inside its AMD accelerator manager."""
        env = os.environ if env is None else env
        if ROCR in env and HIP not in env:
            raise VisibilityError(
                f"{ROCR}={env[ROCR]!r} is set without {HIP}; Ray >= 2.45 rejects this — "
                f"export {HIP} instead (or call platform.prepare_process_env() before starting Ray)"
            )

    def worker_env(self, physical_devices: list[int]) -> dict[str, str]:
        env = super().worker_env(physical_devices)
        mask = format_mask(physical_devices)
        env[HIP] = mask
        env[CUDA_ALIAS] = mask
        return env

    def prepare_process_env(self, env: MutableMapping[str, str] | None = None) -> dict[str, str]:
        """Fold ROCR/HIP/CUDA masks into one HIP mask of physical indices and set Ray's NOSET flags."""
        target = os.environ if env is None else env
        changes = super().prepare_process_env(target)
        if any(v in target for v in self.visible_devices_env):
            folded = format_mask(self.resolve_visible_devices(target))
            if target.pop(ROCR, None) is not None:
                changes[ROCR] = "<unset>"
            for var in (HIP, CUDA_ALIAS):
                if target.get(var) != folded:
                    target[var] = folded
                    changes[var] = folded
        for flag in self.ray_noset_env:
            if target.get(flag) != "1":
                target[flag] = "1"
                changes[flag] = "1"
        return changes
