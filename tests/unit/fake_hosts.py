"""Simulated hosts for platform tests: a fake ROCm or CUDA torch build plus fake amdsmi / NVML modules.

The real probe code runs unchanged; only ``torch.version`` and the vendor management modules are swapped.
"""

from __future__ import annotations

import sys
import types

import pytest


def fake_amdsmi(archs: list[str]) -> types.ModuleType:
    mod = types.ModuleType("amdsmi")
    handles = [f"handle{i}" for i in range(len(archs))]
    mod.amdsmi_init = lambda *a, **k: None
    mod.amdsmi_shut_down = lambda: None
    mod.amdsmi_get_processor_handles = lambda: list(handles)
    names = {
        "gfx942": "AMD Instinct MI300X",
        "gfx950": "AMD Instinct MI355X",
        "gfx90a": "AMD Instinct MI250X",
    }

    def asic_info(handle):
        arch = archs[handles.index(handle)]
        return {"market_name": names.get(arch, "AMD GPU"), "target_graphics_version": arch}

    mod.amdsmi_get_gpu_asic_info = asic_info
    mod.amdsmi_get_gpu_vram_info = lambda h: {"vram_size": 196608}
    return mod


def fake_pynvml(
    ccs: list[tuple[int, int]],
    name: str = "NVIDIA H100 80GB HBM3",
    cpu_affinity: dict[int, list[int]] | None = None,
) -> types.ModuleType:
    """``cpu_affinity``: device index -> the CPUs nvmlDeviceGetCpuAffinity names (as 64-bit words)."""
    mod = types.ModuleType("pynvml")

    def get_cpu_affinity(handle, words):
        masks = [0] * words
        for cpu in (cpu_affinity or {}).get(handle, []):
            masks[cpu // 64] |= 1 << (cpu % 64)
        return masks

    mod.nvmlDeviceGetCpuAffinity = get_cpu_affinity
    mod.nvmlInit = lambda: None
    mod.nvmlShutdown = lambda: None
    mod.nvmlDeviceGetCount = lambda: len(ccs)
    mod.nvmlDeviceGetHandleByIndex = lambda i: i
    mod.nvmlDeviceGetName = lambda h: name
    mod.nvmlDeviceGetCudaComputeCapability = lambda h: ccs[h]
    mod.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=80 * 1024**3)
    return mod


def simulate_rocm(monkeypatch: pytest.MonkeyPatch, archs: list[str], hip: str = "7.0.51831") -> None:
    import torch

    monkeypatch.setattr(torch.version, "hip", hip, raising=False)
    monkeypatch.setattr(torch.version, "cuda", None, raising=False)
    monkeypatch.setitem(sys.modules, "amdsmi", fake_amdsmi(archs))


def simulate_cuda(
    monkeypatch: pytest.MonkeyPatch,
    ccs: list[tuple[int, int]],
    cuda: str = "12.9",
    cpu_affinity: dict[int, list[int]] | None = None,
) -> None:
    import torch

    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.version, "cuda", cuda, raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(ccs, cpu_affinity=cpu_affinity))


def simulate_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.version, "cuda", None, raising=False)
