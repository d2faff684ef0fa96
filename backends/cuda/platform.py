"""NVIDIA platform: CUDA torch build, NCCL collectives, NVML device probe, flash-attn / SGLang fa3.

Probe: ``torch.version.cuda`` set (and not a HIP build) and NVML (nvidia-ml-py) or
/proc/driver/nvidia/gpus reports at least one device. No CUDA context is created.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, MutableMapping
from typing import Any, ClassVar

from portable_rl.backends._gpu import TorchGpuPlatform, probe_devices
from portable_rl.backends._visibility import apply_masks, format_mask
from portable_rl.platform import DeviceInfo, KernelStatus, ProbeResult

CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
NOSET_CUDA = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"

# Dense (no sparsity) peak FLOP/s per device, by compute capability.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "sm80": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},  # A100
    "sm89": {"bf16": 362e12, "fp16": 362e12, "fp8": 733e12, "fp32": 91.6e12},  # L40S
    "sm90": {"bf16": 989e12, "fp16": 989e12, "fp8": 1979e12, "fp32": 67e12},  # H100/H200 SXM
    "sm100": {"bf16": 2250e12, "fp16": 2250e12, "fp8": 4500e12, "fp32": 80e12},  # B200
}
FP8_ARCHS = ("sm89", "sm90", "sm100", "sm120")


def _torch_build() -> tuple[str | None, str | None]:
    import torch

    return getattr(torch.version, "cuda", None), getattr(torch.version, "hip", None)


def _nvml_devices() -> list[DeviceInfo] | None:
    """Devices from NVML, or None when NVML is not importable/initialisable."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # pynvml raises NVMLError subclasses that vary by driver state
        return None
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else name
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h).total
            out.append(DeviceInfo(index=i, name=name, arch=f"sm{major}{minor}", memory_bytes=int(mem)))
        return out
    finally:
        pynvml.nvmlShutdown()


def _nvml_cpu_affinity(index: int, max_cpus: int) -> list[int] | None:
    """CPUs NVML names as close to device ``index`` (nvmlDeviceGetCpuAffinity), or None without NVML."""
    try:
        import pynvml
    except ImportError:
        return None
    words = (max_cpus + 63) // 64
    try:
        pynvml.nvmlInit()
    except Exception:  # pynvml raises NVMLError subclasses that vary by driver state
        return None
    try:
        masks = pynvml.nvmlDeviceGetCpuAffinity(pynvml.nvmlDeviceGetHandleByIndex(index), words)
    except Exception:  # an unsupported query (e.g. some virtualised devices) means: no answer
        return None
    finally:
        pynvml.nvmlShutdown()
    return [64 * w + bit for w, mask in enumerate(masks) for bit in range(64) if int(mask) >> bit & 1]


def _procfs_devices(root: str = "/proc/driver/nvidia/gpus") -> list[DeviceInfo]:
    if not os.path.isdir(root):
        return []
    return [DeviceInfo(index=i, name=f"NVIDIA GPU {bus}") for i, bus in enumerate(sorted(os.listdir(root)))]


class CudaPlatform(TorchGpuPlatform):
    name: ClassVar[str] = "cuda"
    torch_device_type: ClassVar[str] = "cuda"
    dist_backend: ClassVar[str] = "nccl"
    comm_library: ClassVar[str] = "NCCL"
    visible_devices_env: ClassVar[tuple[str, ...]] = (CUDA_VISIBLE_DEVICES,)
    ray_resource: ClassVar[str | None] = "GPU"
    ray_noset_env: ClassVar[tuple[str, ...]] = (NOSET_CUDA,)
    comm_env_defaults: ClassVar[dict[str, str]] = {
        # cuMem-backed NCCL buffers break CUDA IPC weight hand-off between co-located processes.
        "NCCL_CUMEM_ENABLE": "0",
        "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    }
    runtime_env_defaults: ClassVar[dict[str, str]] = {
        # Megatron's TP/SP communication overlap relies on in-order kernel launch.
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    }
    sglang_attention_backend: ClassVar[str] = "flashinfer"
    sglang_device: ClassVar[str] = "cuda"
    supports_numa_affinity: ClassVar[bool] = True
    ipc_handle_carries_device: ClassVar[bool] = True
    memory_saver_supported: ClassVar[bool] = True
    shared_tensor_transport: ClassVar[str] = "cuda_ipc"
    peak_flops_table: ClassVar[dict[str, dict[str, float]]] = PEAK_FLOPS
    default_fp8_dtype: ClassVar[str | None] = "float8_e4m3fn"
    k8s_gpu_resource: ClassVar[str | None] = "nvidia.com/gpu"  # the vendor device plugin's resource name

    @classmethod
    def probe(cls) -> ProbeResult:
        cuda, hip = _torch_build()
        if hip:
            return ProbeResult(False, f"torch is a ROCm build (hip {hip}), not CUDA")
        if not cuda:
            return ProbeResult(
                False, "torch is a CPU-only build (torch.version.cuda is None); install a CUDA build"
            )
        return probe_devices(
            f"CUDA torch {cuda}",
            ("NVML", _nvml_devices),
            ("/proc/driver/nvidia", _procfs_devices),
            "NVIDIA device",
        )

    # ---- capabilities -----------------------------------------------------------------------------------
    def device_cpus(self, physical_index: int) -> list[int] | None:
        # NVML numbers devices in PCI bus order; so does the runtime's mask with CUDA_DEVICE_ORDER=PCI_BUS_ID,
        # and on a node of identical devices also by default (its fastest-first order ties, then PCI order).
        return _nvml_cpu_affinity(physical_index, os.cpu_count() or 1)

    def fp8_dtype(self, arch: str | None = None) -> str | None:
        a = self._arch(arch)
        if a is None or a in FP8_ARCHS:
            return "float8_e4m3fn"
        return None

    def kernels(self) -> list[KernelStatus]:
        fa = importlib.util.find_spec("flash_attn") is not None
        te = importlib.util.find_spec("transformer_engine") is not None
        return [
            KernelStatus(
                "flash-attn",
                fa,
                "not used by the trainer (TE or torch SDPA bring their own flash kernels)"
                if fa
                else "not installed: not needed (the trainer's attention is TE or torch SDPA)",
            ),
            KernelStatus(
                "transformer-engine",
                te,
                "trainer: TE layer spec + TE attention"
                if te
                else "not installed: trainer uses Megatron's local spec + torch SDPA attention",
            ),
            KernelStatus("sglang", importlib.util.find_spec("sglang") is not None, "rollout engine on GPU"),
        ]

    def sglang_server_args(self) -> dict[str, Any]:
        args = super().sglang_server_args()
        # FA3 is Hopper-only; other archs use flashinfer.
        args["attention_backend"] = "fa3" if self._arch(None) == "sm90" else "flashinfer"
        return args

    # ---- visibility ---------------------------------------------------------------------------------------
    def resolve_visible_devices(self, env: Mapping[str, str] | None = None) -> list[int]:
        env = os.environ if env is None else env
        return apply_masks(env, self.visible_devices_env, len(self.devices))

    def worker_env(self, physical_devices: list[int]) -> dict[str, str]:
        env = super().worker_env(physical_devices)
        env[CUDA_VISIBLE_DEVICES] = format_mask(physical_devices)
        return env

    def prepare_process_env(self, env: MutableMapping[str, str] | None = None) -> dict[str, str]:
        target = os.environ if env is None else env
        self.resolve_visible_devices(target)  # fail early on a malformed mask
        return super().prepare_process_env(target)
