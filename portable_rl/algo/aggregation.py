"""Masked reductions and loss aggregation over padded response tensors.

Representation (shared by every module in ``portable_rl.algo``)
------------------------------------------------------------------
Per-token quantities are padded ``[B, T]`` float tensors over the *response* tokens only (left-aligned,
right-padded); ``mask`` is a ``[B, T]`` tensor (bool or 0/1 of any dtype) where 1 marks a token that is
trained on. Padding and masked-out tokens (e.g. tool output inside a multi-turn response) never contribute.

Aggregation modes (names as peers spell them)
---------------------------------------------
* ``token-mean``: sum of all masked values / number of masked tokens in the batch (every token weighs the
  same; long answers weigh more).
* ``seq-mean-token-mean``: mean over tokens inside each sequence, then mean over sequences (GRPO paper).
* ``seq-mean-token-sum``: sum over tokens inside each sequence, then mean over sequences.
* ``seq-mean-token-sum-norm``: Dr.GRPO: sum of all masked values / (B * L), with L a constant (the
  generation budget; defaults to ``T``) so that neither response length nor token count rescales a sample.

Micro-batching: the trainer may split one optimizer batch into micro-batches and add up their gradients.
Passing ``global_tokens`` (token-mean) or ``global_seqs`` (the seq-* modes) replaces the local denominator
by the whole batch's count, so the sum of micro-batch losses equals the loss of the whole batch.
Sequences with no masked token count as sequences (they add 0) in the seq-* modes.
"""

from __future__ import annotations

import torch

from portable_rl.config.algo import LOSS_AGG_MODES, LossAgg

__all__ = [
    "LOSS_AGG_MODES",
    "LossAgg",
    "aggregate_loss",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
]


def _as_float_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match values shape {tuple(like.shape)}")
    return mask.to(like.dtype)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    m = _as_float_mask(mask, values)
    # where() rather than multiply: a NaN/inf in a padded slot must not leak into the sum.
    filled = torch.where(m > 0, values, torch.zeros_like(values)) * m
    return filled.sum() if dim is None else filled.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over masked entries; 0 where there is none (never NaN)."""
    m = _as_float_mask(mask, values)
    count = m.sum() if dim is None else m.sum(dim=dim)
    return masked_sum(values, m, dim) / count.clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over all masked entries (Bessel-corrected when ``unbiased`` and more than one entry)."""
    m = _as_float_mask(mask, values)
    mean = masked_mean(values, m)
    count = m.sum()
    sq = masked_sum((values - mean) ** 2, m)
    denom = count - 1.0 if unbiased else count
    return torch.where(count > 1, sq / denom.clamp(min=1.0), torch.zeros_like(sq))


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise masked entries to zero mean / unit variance over the whole batch; 0 outside the mask."""
    m = _as_float_mask(mask, values)
    mean = masked_mean(values, m)
    var = masked_var(values, m)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m > 0, out, torch.zeros_like(out))


def aggregate_loss(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    norm_constant: float | None = None,
    global_tokens: float | None = None,
    global_seqs: float | None = None,
) -> torch.Tensor:
    """Reduce per-token ``values`` [B, T] to a scalar by ``mode`` (see module docstring)."""
    if values.dim() != 2:
        raise ValueError(f"aggregate_loss expects [B, T] values, got shape {tuple(values.shape)}")
    m = _as_float_mask(mask, values)
    num_seqs = float(global_seqs) if global_seqs is not None else float(values.shape[0])
    if mode == "token-mean":
        denom = (
            torch.as_tensor(global_tokens, dtype=values.dtype, device=values.device)
            if global_tokens is not None
            else m.sum()
        )
        return masked_sum(values, m) / denom.clamp(min=1.0)
    if mode == "seq-mean-token-mean":
        per_seq = masked_sum(values, m, dim=-1) / m.sum(dim=-1).clamp(min=1.0)
        return per_seq.sum() / max(num_seqs, 1.0)
    if mode == "seq-mean-token-sum":
        return masked_sum(values, m, dim=-1).sum() / max(num_seqs, 1.0)
    if mode == "seq-mean-token-sum-norm":
        norm = float(norm_constant) if norm_constant is not None else float(values.shape[-1])
        if norm <= 0:
            raise ValueError(f"norm_constant={norm_constant!r} must be > 0 (the generation token budget)")
        return masked_sum(values, m) / (max(num_seqs, 1.0) * norm)
    raise ValueError(f"loss aggregation {mode!r} is not one of {', '.join(LOSS_AGG_MODES)}")
