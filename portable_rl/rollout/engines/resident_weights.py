"""Resident weights of the CPU engine: its parameters live in one shared-memory segment a co-located trainer writes.

A co-located shared-tensor sync otherwise copies every bucket twice (trainer -> staging segment, staging segment ->
the engine's parameters) and makes one HTTP request per bucket. Once the weights are resident, the trainer maps
the engine's segment once and writes each weight straight into the served tensor while the engine is paused: one
copy, no per-bucket request; ``/commit_resident_weights`` then only sets the weight version.

Contract
--------
* ``make_resident(model)`` (engine thread, no forward pass in flight): every parameter and buffer of ``model`` is
  copied into one new named segment (each start aligned to 64 bytes) and rebound to a view of it (a parameter
  keeps its identity, so tied weights stay tied); values are unchanged. Refused with ``ValueError`` before
  anything moves when the shared-memory filesystem has less free space than the weights (a mapping larger than
  it would kill the engine with SIGBUS on first touch). Calling it again returns the same ``ResidentWeights``.
* ``ResidentWeights.describe()``: what ``POST /resident_weights`` answers: the segment name, its size and per
  served name (``engine_weights.named_state``: tied aliases and per-expert views included) the dtype, shape,
  stride and element offset of its view. A writer that honours this layout writes exactly what
  ``load_named_tensors`` would have copied.
* The segment belongs to the engine: ``release()`` unlinks it (the engine server calls it at shutdown; Python's
  resource tracker unlinks it if the engine dies). A trainer's mapping stays valid until it closes it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import torch

from portable_rl.protocol.buckets import dtype_name
from portable_rl.rollout.engines.engine_weights import named_state

ALIGN = 64
SHM_DIR = "/dev/shm"  # where POSIX shared memory lives on Linux (shm_open)


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class ResidentWeights:
    segment: shared_memory.SharedMemory
    layout: dict[str, dict[str, Any]]

    def describe(self) -> dict[str, Any]:
        return {"segment": self.segment.name, "size": self.segment.size, "tensors": self.layout}

    def release(self) -> None:
        try:
            self.segment.unlink()
        except FileNotFoundError:
            pass  # already gone: unlinked by the resource tracker or by hand


def shm_free_bytes(path: str = SHM_DIR) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None  # no such filesystem here: shm_open decides
    return st.f_bavail * st.f_frsize


def make_resident(model: torch.nn.Module, existing: ResidentWeights | None = None) -> ResidentWeights:
    if existing is not None:
        return existing
    unique: dict[int, torch.Tensor] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type != "cpu":
            raise ValueError(f"resident weights need host tensors; found one on {t.device}")
        unique.setdefault(id(t), t)
    offsets: dict[int, int] = {}
    total = 0
    for key, t in unique.items():
        offsets[key] = total
        total += _aligned(t.numel() * t.element_size())
    total = max(total, ALIGN)
    free = shm_free_bytes()
    if free is not None and free < total:
        raise ValueError(
            f"resident weights need {total} bytes of shared memory, {SHM_DIR} has {free} free; "
            "enlarge it (docker: --shm-size) or set weight_sync.resident_weights=off"
        )
    segment = shared_memory.SharedMemory(create=True, size=total)
    base = torch.frombuffer(segment.buf, dtype=torch.uint8)
    moved: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for key, t in unique.items():
            n = t.numel() * t.element_size()
            view = base[offsets[key] : offsets[key] + n].view(t.dtype).view(t.shape)
            view.copy_(t)
            moved[key] = view
        for module in model.modules():
            for p in module._parameters.values():
                if p is not None and id(p) in moved:
                    p.data = moved[id(p)]
            for name, b in module._buffers.items():
                if b is not None and id(b) in moved:
                    module._buffers[name] = moved[id(b)]
    return ResidentWeights(segment, _layout(model, base))


def _layout(model: torch.nn.Module, base: torch.Tensor) -> dict[str, dict[str, Any]]:
    start, end = base.data_ptr(), base.data_ptr() + base.numel()
    out: dict[str, dict[str, Any]] = {}
    for name, t in named_state(model).items():
        ptr = t.data_ptr()
        if not start <= ptr < end:
            continue  # not in the segment (cannot happen for parameters and buffers moved above)
        out[name] = {
            "dtype": dtype_name(t.dtype),
            "shape": list(t.shape),
            "stride": list(t.stride()),
            "offset": (ptr - start) // t.element_size(),
        }
    return out
