"""Batch surgery on a transformers ``DynamicCache`` for the CPU engine's continuous batching.

The engine keeps one left-padded batch: a cache whose every layer holds keys/values of shape
``[batch, kv_heads, T, head_dim]`` and a ``[batch, T]`` attention mask (0 = padding). Three operations keep it
that way while requests come and go between decode steps:
  * ``merge(a, mask_a, b, mask_b)``: new rows join: the shorter side is padded on the left, rows concatenated;
  * ``select(cache, mask, rows)``: finished rows leave;
  * ``trim_left(cache, mask)``: columns that are padding in every row are dropped (after long rows leave).
Only full-attention ``DynamicLayer`` caches are supported (Llama / Qwen families); anything else raises
``UnsupportedCache`` so the engine fails at start-up, not mid-rollout.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


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
