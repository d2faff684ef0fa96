"""Bit-exact comparison of trainer weights with the weights an engine serves.

Contract
--------
* ``tensor_checksum(t)`` is sha256 over the dtype name, the shape and the raw bytes of ``t``: two tensors have
  the same checksum iff they are bit-equal with the same dtype and shape. Engines that serve portable_rl's
  ``/get_weights_checksum`` endpoint compute exactly this function (the CPU engine imports it from here).
* ``check_weights(engines, named_tensors)`` asks every engine for its weights and returns a ``WeightCheckReport``
  listing mismatched, missing and failed names per engine; ``report.raise_if_failed()`` raises ``WeightMismatch``.
  An engine that reports the ``dtype`` it holds its weights in (``/server_info``; portable_rl's CPU engine does)
  is compared with the trainer's floating-point tensors cast to that dtype, which is what loading them did on its
  side: a bf16 GPU trainer and a float32 CPU engine agree iff the engine holds exactly the trainer's values (the
  upcast is exact); a float32 trainer and a bf16 engine iff the engine holds them rounded once.
  Engines are portable_rl engine clients. Two ways to read an engine's weights:
    - ``/get_weights_checksum`` (portable_rl's CPU engine): checksums only, one call for all names;
    - ``/get_weights_by_name`` (the real SGLang server, which has no per-tensor checksum of HF-named weights:
      its ``/weights_checker`` hashes the engine's fused internal parameters): the full values of each tensor
      as float32 lists (truncate_size = first dimension), compared exactly. SGLang implements this for
      Llama-family models at tensor-parallel size 1; float32 round-trips JSON exactly and bf16/fp16 widen to
      float32 losslessly, so equal values still mean bit-equal weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import torch

from portable_rl.protocol.buckets import NamedTensor, dtype_from_name, dtype_name
from portable_rl.protocol.engine_ops import EngineCallError, EngineOps

CHECKSUM_ALGORITHM = "sha256(dtype|shape|bytes)"


class WeightMismatch(AssertionError):
    """Engine weights differ from the trainer's after a sync."""


def tensor_checksum(tensor: torch.Tensor) -> str:
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    h = hashlib.sha256()
    h.update(dtype_name(t.dtype).encode())
    h.update(b"|")
    h.update(",".join(str(d) for d in t.shape).encode())
    h.update(b"|")
    if t.numel():
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())  # the buffer itself, not a copy
    return h.hexdigest()


def checksums(named_tensors: Iterable[NamedTensor]) -> dict[str, str]:
    return {name: tensor_checksum(t) for name, t in named_tensors}


@dataclass
class EngineCheck:
    engine: str
    compared: int = 0
    mismatched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.mismatched and not self.missing


@dataclass
class WeightCheckReport:
    engines: list[EngineCheck]

    @property
    def ok(self) -> bool:
        return all(e.ok for e in self.engines)

    def summary(self) -> str:
        lines = []
        for e in self.engines:
            if e.ok:
                lines.append(f"{e.engine}: {e.compared} tensors bit-equal")
                continue
            parts = []
            if e.error:
                parts.append(f"error: {e.error}")
            if e.mismatched:
                parts.append(f"{len(e.mismatched)} differ (first: {', '.join(e.mismatched[:5])})")
            if e.missing:
                parts.append(f"{len(e.missing)} missing on engine (first: {', '.join(e.missing[:5])})")
            lines.append(f"{e.engine}: " + "; ".join(parts))
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise WeightMismatch("engine weights differ from the trainer's:\n" + self.summary())


def _compare_checksums(
    served: Mapping[str, str | None], expected: Mapping[str, str], report: EngineCheck
) -> None:
    for name, digest in expected.items():
        if name not in served or served[name] is None:
            report.missing.append(name)
        elif served[name] != digest:
            report.mismatched.append(name)
        report.compared += 1


def _check_by_values(engine: EngineOps, tensors: Sequence[NamedTensor], report: EngineCheck) -> None:
    for name, tensor in tensors:
        rows = tensor.shape[0] if tensor.dim() else 1
        values = engine.get_weights_by_name(name, max(1, rows)).result()
        report.compared += 1
        if values is None:
            report.missing.append(name)
            continue
        served = torch.tensor(values, dtype=torch.float32)
        mine = tensor.detach().to("cpu", torch.float32)
        if served.shape != mine.shape or not torch.equal(served, mine):
            report.mismatched.append(name)


def check_weights(
    engines: Sequence[Any], named_tensors: Iterable[NamedTensor], timeout_s: float = 300.0
) -> WeightCheckReport:
    """Compare every engine's weights with ``named_tensors`` (bit-exact); see the module docstring.

    Engines that serve checksums are asked first, so they hash their weights while this process hashes its own.
    """
    tensors = list(named_tensors)
    ops = [item if isinstance(item, EngineOps) else EngineOps(item, timeout_s) for item in engines]
    reports = [EngineCheck(engine=engine.label) for engine in ops]
    asked: dict[int, Future] = {}
    for i, engine in enumerate(ops):
        try:
            if engine.supports_weights_checksum():
                asked[i] = engine.get_weights_checksum([name for name, _ in tensors])
        except _ENGINE_ERRORS as exc:
            reports[i].error = f"{type(exc).__name__}: {exc}"
    expected: dict[torch.dtype | None, dict[str, str]] = {}
    for i, (engine, report) in enumerate(zip(ops, reports, strict=True)):
        if report.error is not None:
            continue
        try:
            if i in asked:
                dtype = _engine_dtype(engine)
                if dtype not in expected:
                    expected[dtype] = checksums(_in_dtype(tensors, dtype))
                _compare_checksums(asked[i].result(timeout=timeout_s), expected[dtype], report)
            else:
                _check_by_values(engine, tensors, report)
        except (*_ENGINE_ERRORS, FutureTimeout) as exc:
            report.error = f"{type(exc).__name__}: {exc}"
    for item, engine in zip(engines, ops, strict=True):
        if engine is not item:
            engine.close()
    return WeightCheckReport(reports)


_ENGINE_ERRORS = (EngineCallError, OSError, ValueError, KeyError, TypeError)


def _engine_dtype(engine: EngineOps) -> torch.dtype | None:
    """The dtype the engine says it holds its weights in (``/server_info`` "dtype"), if a torch dtype name."""
    name = engine.server_info().get("dtype")
    try:
        dtype = dtype_from_name(name) if isinstance(name, str) else None
    except ValueError:  # a name this torch does not know (e.g. SGLang's "auto"): no cast
        return None
    return dtype if dtype is not None and dtype.is_floating_point else None


def _in_dtype(tensors: Sequence[NamedTensor], dtype: torch.dtype | None) -> list[NamedTensor]:
    if dtype is None:
        return list(tensors)
    return [(n, t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t) for n, t in tensors]
