"""Bucketing of named tensors and SGLang's flattened-bucket byte layout.

Contract
--------
* ``iter_buckets(named_tensors, max_bytes)`` groups tensors in arrival order into buckets of one dtype each and
  at most ``max_bytes`` (a tensor larger than that travels alone). It consumes the iterable lazily, so a
  trainer that gathers weights layer by layer never holds more than one bucket of extra memory (per dtype and
  size class). With ``split_at``, tensors smaller than ``split_at`` bytes fill buckets of their own (a sender
  can then flatten the buckets of small tensors and send the others tensor by tensor).
* ``Staging`` keeps one flat buffer for reuse across buckets and syncs: a fresh allocation per bucket pays
  first-touch page faults on every byte, which on CPU costs as much as the copy itself.
* ``flatten(bucket)`` lays a bucket out as SGLang's ``FlattenedTensorBucket`` does: each tensor's bytes, in
  order, concatenated into one uint8 tensor, with (name, shape, dtype, start_idx, end_idx, numel) per tensor
  (offsets and numel in bytes). ``unflatten`` is the inverse and returns views into the flat buffer.
  Buckets hold one dtype, which keeps every tensor aligned and is accepted by SGLang releases whose bucket
  class did not yet support mixed dtypes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

NamedTensor = tuple[str, torch.Tensor]


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives inside a flat byte buffer (field names as SGLang's FlattenedTensorMetadata)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int  # bytes, as in SGLang


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: the spelling SGLang's requests use (getattr(torch, name) inverts it)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype name (expected e.g. 'float32', 'bfloat16')")
    return dtype


def iter_buckets(
    named_tensors: Iterable[NamedTensor], max_bytes: int, split_at: int | None = None
) -> Iterator[list[NamedTensor]]:
    """Yield lists of (name, tensor), one dtype per list, each at most ``max_bytes`` unless a single tensor is larger."""
    if max_bytes <= 0:
        raise ValueError(f"bucket size must be positive, got {max_bytes} bytes")
    seen: set[str] = set()
    open_buckets: dict[tuple[torch.dtype, bool], tuple[list[NamedTensor], int]] = {}
    for name, tensor in named_tensors:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"weight {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if name in seen:
            raise ValueError(f"weight {name!r} appears twice in one update; names must be unique")
        seen.add(name)
        size = nbytes(tensor)
        key = (tensor.dtype, split_at is not None and size < split_at)
        items, used = open_buckets.get(key, ([], 0))
        if items and used + size > max_bytes:
            yield items
            items, used = [], 0
        items.append((name, tensor))
        used += size
        open_buckets[key] = (items, used)
    for items, _ in open_buckets.values():
        if items:
            yield items


def _bytes_view(tensor: torch.Tensor) -> torch.Tensor:
    # reshape(-1) copies only if the tensor is not contiguous; view(uint8) reinterprets without copying.
    return tensor.detach().reshape(-1).view(torch.uint8)


def _copy_into(dst: torch.Tensor, tensor: torch.Tensor) -> None:
    """Copy ``tensor``'s bytes into the uint8 slice ``dst``, as its own dtype where the slice is aligned for it.

    Same bytes either way, but a byte view has ``itemsize`` times the elements, which pushes small tensors past
    torch's grain size for a parallel copy: a bucket of a tiny model's weights then took ~7 ms instead of
    ~0.3 ms on a 2-core host whose other core was busy (each copy waits for the intra-op threads).
    """
    size = tensor.element_size()
    if (dst.storage_offset() % size == 0) and dst.numel() % size == 0:
        dst.view(tensor.dtype).view(tensor.shape).copy_(tensor.detach())
    else:
        dst.copy_(_bytes_view(tensor))


def flatten(
    bucket: Sequence[NamedTensor], out: torch.Tensor | None = None
) -> tuple[torch.Tensor, list[TensorMeta]]:
    """Copy ``bucket`` into one flat uint8 tensor (``out`` if given, else a new one on the first tensor's device)."""
    if not bucket:
        raise ValueError("cannot flatten an empty bucket")
    metas: list[TensorMeta] = []
    offset = 0
    for name, tensor in bucket:
        size = nbytes(tensor)
        metas.append(TensorMeta(name, tuple(tensor.shape), tensor.dtype, offset, offset + size, size))
        offset += size
    if out is None:
        out = torch.empty(offset, dtype=torch.uint8, device=bucket[0][1].device)
    elif out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < offset:
        raise ValueError(
            f"flat buffer must be 1-D uint8 with >= {offset} elements, got {out.dtype} {tuple(out.shape)}"
        )
    for (_, tensor), meta in zip(bucket, metas, strict=True):
        _copy_into(out[meta.start_idx : meta.end_idx], tensor)
    return out[:offset], metas


def empty_flat(metas: Sequence[TensorMeta], device: torch.device | str = "cpu") -> torch.Tensor:
    total = metas[-1].end_idx if metas else 0
    return torch.empty(total, dtype=torch.uint8, device=device)


def metas_from_lists(
    names: Sequence[str], dtypes: Sequence[str], shapes: Sequence[Sequence[int]]
) -> list[TensorMeta]:
    """Byte layout of a bucket described the way /update_weights_from_distributed describes it."""
    if not len(names) == len(dtypes) == len(shapes):
        raise ValueError(f"names/dtypes/shapes lengths differ: {len(names)}/{len(dtypes)}/{len(shapes)}")
    metas: list[TensorMeta] = []
    offset = 0
    for name, dtype_str, shape in zip(names, dtypes, shapes, strict=True):
        dtype = dtype_from_name(dtype_str)
        shape_t = tuple(int(d) for d in shape)
        size = torch.Size(shape_t).numel() * dtype.itemsize
        metas.append(TensorMeta(name, shape_t, dtype, offset, offset + size, size))
        offset += size
    return metas


def unflatten(flat: torch.Tensor, metas: Sequence[TensorMeta]) -> list[NamedTensor]:
    """Views of ``flat`` shaped and typed as ``metas`` describe (no copy)."""
    out: list[NamedTensor] = []
    for meta in metas:
        if meta.end_idx > flat.numel():
            raise ValueError(
                f"tensor {meta.name!r} ends at byte {meta.end_idx}, past the buffer's {flat.numel()}"
            )
        out.append((meta.name, flat[meta.start_idx : meta.end_idx].view(meta.dtype).reshape(meta.shape)))
    return out


class Staging:
    """A reusable flat uint8 buffer; ``allocate(nbytes, device)`` makes a new one when it is too small."""

    def __init__(self, allocate: Callable[[int, torch.device], torch.Tensor] | None = None) -> None:
        self._allocate = allocate or (lambda n, dev: torch.empty(n, dtype=torch.uint8, device=dev))
        self._buf: torch.Tensor | None = None

    def get(self, nbytes: int, device: torch.device) -> torch.Tensor:
        if self._buf is None or self._buf.numel() < nbytes or self._buf.device != device:
            self._buf = None  # drop the old one before allocating its replacement
            self._buf = self._allocate(nbytes, device)
        return self._buf[:nbytes]

    def release(self) -> None:
        self._buf = None
