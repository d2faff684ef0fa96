"""Trainer side of resident engine weights: write each weight straight into the engine's served tensor.

Contract
--------
* ``ResidentTargets.open(engine_ops)``: asks every engine for its resident segment (``POST /resident_weights``,
  see ``rollout/engines/resident_weights.py``) and maps each one in this process; raises ``ResidentUnavailable``
  (with the reason) when an engine refuses or its segment cannot be opened here (another host), having mapped
  nothing. The mapping is not tracked by Python's resource tracker: the segment is the engine's, and this
  process exiting must not unlink it.
* ``write(named_tensors)``: per (name, tensor), every engine's view of ``name`` gets ``copy_(tensor)`` (cast to the
  engine's dtype, exactly what the engine's own load does). An unknown name or a shape mismatch raises
  ``ValueError`` naming it before that tensor is written. Call it only inside an update session (engines paused,
  no forward pass reads the weights); weights written before a failure stay written and the version does not
  move, as with a bucketed update that fails midway.
* ``close()``: drops the views and unmaps the segments.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import torch

from portable_rl.protocol.buckets import NamedTensor, dtype_from_name
from portable_rl.protocol.engine_ops import EngineCallError, EngineOps


class ResidentUnavailable(RuntimeError):
    """Some engine cannot take resident writes from this process; the message says which and why."""


def _open_segment(name: str) -> shared_memory.SharedMemory:
    segment = shared_memory.SharedMemory(name=name, create=False)
    # Python 3.11 registers every opened segment and unlinks it when this process exits; the engine owns it.
    resource_tracker.unregister(segment._name, "shared_memory")  # noqa: SLF001 - the name the tracker knows
    return segment


def _views(segment: shared_memory.SharedMemory, tensors: dict[str, Any]) -> dict[str, torch.Tensor]:
    base = torch.frombuffer(segment.buf, dtype=torch.uint8)
    typed: dict[torch.dtype, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, spec in tensors.items():
        dtype = dtype_from_name(str(spec["dtype"]))
        if dtype not in typed:
            usable = base.numel() // dtype.itemsize * dtype.itemsize
            typed[dtype] = base[:usable].view(dtype)
        out[name] = typed[dtype].as_strided(tuple(spec["shape"]), tuple(spec["stride"]), int(spec["offset"]))
    return out


class ResidentTargets:
    def __init__(self, segments: list[shared_memory.SharedMemory], views: list[dict[str, torch.Tensor]]):
        self._segments = segments
        self._views = views

    @classmethod
    def open(cls, engines: Sequence[EngineOps]) -> ResidentTargets:
        futures = [e.resident_weights() for e in engines]
        layouts: list[dict[str, Any]] = []
        for engine, fut in zip(engines, futures, strict=True):
            try:
                layouts.append(fut.result(timeout=engine.timeout_s))
            except (EngineCallError, TimeoutError) as exc:
                raise ResidentUnavailable(f"{engine.label}: {exc}") from exc
        segments: list[shared_memory.SharedMemory] = []
        try:
            for engine, layout in zip(engines, layouts, strict=True):
                try:
                    segments.append(_open_segment(str(layout["segment"])))
                except OSError as exc:
                    raise ResidentUnavailable(
                        f"{engine.label}: its segment {layout['segment']!r} cannot be opened here ({exc}); "
                        "is the engine on another host?"
                    ) from exc
        except ResidentUnavailable:
            for segment in segments:
                segment.close()
            raise
        return cls(segments, [_views(s, lay["tensors"]) for s, lay in zip(segments, layouts, strict=True)])

    def write(self, named_tensors: Iterable[NamedTensor]) -> int:
        count = 0
        with torch.no_grad():
            for name, tensor in named_tensors:
                for views in self._views:
                    target = views.get(name)
                    if target is None:
                        raise ValueError(
                            f"weight {name!r} is not a parameter of the served model; send HF parameter names"
                        )
                    if tuple(target.shape) != tuple(tensor.shape):
                        raise ValueError(
                            f"weight {name!r} has shape {tuple(tensor.shape)}, the served model expects "
                            f"{tuple(target.shape)}"
                        )
                    target.copy_(tensor)
                count += 1
        if not count:
            raise ValueError("update() got no tensors; pass the model's named weights")
        return count

    def close(self) -> None:
        self._views = []  # the views hold the buffers' exports; they must go before the segments close
        for segment in self._segments:
            try:
                segment.close()
            except BufferError:
                pass  # a caller still holds a view; the mapping goes when that view is collected
        self._segments = []
