"""Batch surgery on a transformers ``DynamicCache`` for the CPU engine's continuous batching.

The engine keeps one left-padded batch: a cache whose every layer holds keys/values of shape
``[batch, kv_heads, T, head_dim]`` and a ``[batch, T]`` attention mask (0 = padding). Three operations keep it
that way while requests come and go between decode steps:
  * ``merge(a, mask_a, b, mask_b)``: new rows join: the shorter side is padded on the left, rows concatenated;
  * ``select(cache, mask, rows)``: finished rows leave;
  * ``trim_left(cache, mask)``: columns that are padding in every row are dropped (after long rows leave).
Only full-attention ``DynamicLayer`` caches are supported (Llama / Qwen families); anything else raises
``UnsupportedCache`` so the engine fails at start-up, not mid-rollout.

``preallocate(cache)`` makes every layer keep its keys/values in a buffer with spare room at the end of the
time axis, so a decode step writes one column into it instead of ``torch.cat`` copying the whole cache
(quadratic in the sequence length over a rollout). ``layer.keys``/``layer.values`` stay the logical tensors
(views of the buffer's first ``T`` columns), so the surgery above reads and replaces them as before; a layer
whose keys were replaced gets a new buffer at its next update. Attention over such a view gives the same bits
as over a contiguous tensor (the time axis keeps its layout; only the batch/head strides differ).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class UnsupportedCache(TypeError):
    """The model's cache is not a plain full-attention DynamicCache."""


def _layers(cache: DynamicCache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise UnsupportedCache(
            f"{type(cache).__name__} has no per-layer tensors; the CPU engine needs DynamicCache"
        )
    for layer in layers:
        if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
            raise UnsupportedCache(
                f"cache layer {type(layer).__name__} is not full attention; the CPU engine supports "
                "full-attention decoder models (Llama/Qwen families)"
            )
    return layers


def check_supported(cache: DynamicCache) -> None:
    _layers(cache)


def headroom(length: int) -> int:
    """Spare columns a buffer gets when it is (re)allocated for ``length`` columns: amortised growth of at
    most 1.5x memory, and at least 32 decode steps before the next copy."""
    return max(32, length // 2)


class PreallocLayer(DynamicLayer):
    """A ``DynamicLayer`` whose update writes into a buffer with spare capacity (see module docstring)."""

    _kbuf: torch.Tensor | None = None
    _vbuf: torch.Tensor | None = None

    def _in_buffer(self, length: int) -> bool:
        buf = self._kbuf
        return (
            buf is not None
            and self.keys.data_ptr() == buf.data_ptr()
            and self.values.data_ptr() == self._vbuf.data_ptr()
            and self.keys.shape[0] == buf.shape[0]
            and self.keys.shape[-2] == length
        )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.keys.shape[-2] if self.keys.numel() else 0
        end = length + key_states.shape[-2]
        if not self._in_buffer(length) or end > self._kbuf.shape[-2]:
            capacity = end + headroom(end)
            shape_k = (*key_states.shape[:2], capacity, key_states.shape[-1])
            shape_v = (*value_states.shape[:2], capacity, value_states.shape[-1])
            self._kbuf = key_states.new_empty(shape_k)
            self._vbuf = value_states.new_empty(shape_v)
            if length:
                self._kbuf[:, :, :length] = self.keys
                self._vbuf[:, :, :length] = self.values
        self._kbuf[:, :, length:end] = key_states
        self._vbuf[:, :, length:end] = value_states
        self.keys, self.values = self._kbuf[:, :, :end], self._vbuf[:, :, :end]
        return self.keys, self.values


def preallocate(cache: DynamicCache) -> DynamicCache:
    """Turn every plain ``DynamicLayer`` of ``cache`` into a ``PreallocLayer`` (in place; returns ``cache``)."""
    for layer in _layers(cache):
        if type(layer) is DynamicLayer:
            layer.__class__ = PreallocLayer
    return cache


def _set(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    layer.keys = keys
    layer.values = values
    layer.is_initialized = True
    layer.dtype, layer.device = keys.dtype, keys.device


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    if n == 0:
        return t
    pad = torch.zeros(*t.shape[:2], n, *t.shape[3:], dtype=t.dtype, device=t.device)
    return torch.cat([pad, t], dim=2)


def merge(
    a: DynamicCache, mask_a: torch.Tensor, b: DynamicCache, mask_b: torch.Tensor
) -> tuple[DynamicCache, torch.Tensor]:
    """Rows of ``a`` then rows of ``b`` in one cache (``a`` is updated in place and returned)."""
    la, lb = _layers(a), _layers(b)
    if len(la) != len(lb):
        raise ValueError(f"cannot merge caches with {len(la)} and {len(lb)} layers")
    ta, tb = mask_a.shape[1], mask_b.shape[1]
    t = max(ta, tb)
    for x, y in zip(la, lb, strict=True):
        keys = torch.cat([_pad_left(x.keys, t - ta), _pad_left(y.keys, t - tb)], dim=0)
        values = torch.cat([_pad_left(x.values, t - ta), _pad_left(y.values, t - tb)], dim=0)
        _set(x, keys, values)
    mask = torch.cat(
        [
            torch.nn.functional.pad(mask_a, (t - ta, 0)),
            torch.nn.functional.pad(mask_b, (t - tb, 0)),
        ],
        dim=0,
    )
    return a, mask


def select(cache: DynamicCache, mask: torch.Tensor, rows: list[int]) -> tuple[DynamicCache, torch.Tensor]:
    index = torch.tensor(rows, dtype=torch.long)
    for layer in _layers(cache):
        _set(layer, layer.keys.index_select(0, index), layer.values.index_select(0, index))
    return cache, mask.index_select(0, index)


def trim_left(cache: DynamicCache, mask: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """Drop leading columns that are padding in every row."""
    used = mask.any(dim=0).nonzero()
    start = int(used[0]) if used.numel() else mask.shape[1]
    if start == 0:
        return cache, mask
    for layer in _layers(cache):
        _set(layer, layer.keys[:, :, start:].contiguous(), layer.values[:, :, start:].contiguous())
    return cache, mask[:, start:]
