"""Convert ragged per-sample data to the padded ``[B, T]`` + mask representation used by ``portable_rl.algo``.

* ``pad_sequences(seqs)`` right-pads 1-D tensors or lists to ``[B, T]`` and returns the 0/1 mask
  (a sample's own loss mask can be passed to keep masked-out tokens inside a response masked).
* ``group_index(group_ids)`` maps arbitrary group ids (one per sample) to a dense ``[B]`` long tensor
  0..G-1 in order of first appearance: the grouping argument of the GRPO-style estimators.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_sequences(
    seqs: Sequence[Sequence[float] | torch.Tensor],
    pad_value: float = 0.0,
    masks: Sequence[Sequence[int] | torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``seqs`` into ``[B, T]`` (``T = length`` or the longest); returns ``(padded, mask)``."""
    if masks is not None and len(masks) != len(seqs):
        raise ValueError(f"got {len(masks)} masks for {len(seqs)} sequences")
    longest = max((len(s) for s in seqs), default=0)
    T = longest if length is None else length
    if T < longest:
        raise ValueError(f"length={length} is shorter than the longest sequence ({longest} tokens)")
    padded = torch.full((len(seqs), T), pad_value, dtype=dtype)
    mask = torch.zeros((len(seqs), T), dtype=dtype)
    for i, s in enumerate(seqs):
        n = len(s)
        if n == 0:
            continue
        padded[i, :n] = torch.as_tensor(s, dtype=dtype)
        if masks is None:
            mask[i, :n] = 1.0
        else:
            m = torch.as_tensor(masks[i], dtype=dtype)
            if m.numel() != n:
                raise ValueError(f"sequence {i} has {n} tokens but its mask has {m.numel()} entries")
            mask[i, :n] = m
    return padded, mask


def group_index(group_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Dense group index (0..G-1, by first appearance) for per-sample group ids."""
    ids = group_ids.tolist() if isinstance(group_ids, torch.Tensor) else list(group_ids)
    dense: dict[int, int] = {}
    return torch.tensor([dense.setdefault(g, len(dense)) for g in ids], dtype=torch.long)
