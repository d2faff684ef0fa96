"""Megatron core attention on torch's ``scaled_dot_product_attention``: memory linear in the sequence length.

Contract
--------
``SdpaCoreAttention`` has the constructor and ``forward`` signature of Megatron's ``DotProductAttention`` (the
``core_attention`` slot of a layer spec) and computes causal softmax attention with ``softmax_scale``
(default ``1/sqrt(head_dim)``):

* padded ``bshd`` input (``packed_seq_params is None``): query ``[s, b, heads, d]``, key/value
  ``[s, b, groups, d]`` -> ``[s, b, heads*d]``. Right padding never changes a real token's output (causal).
* packed ``thd`` input (``packed_seq_params.qkv_format == "thd"``): query ``[t, heads, d]``, key/value
  ``[t, groups, d]`` with samples laid end to end at ``cu_seqlens_q`` -> ``[t, heads*d]``. Each sample
  attends causally to itself only (one SDPA call per sample), so attention never crosses samples.
  Megatron's rotary embedding restarts positions per sample from the same ``cu_seqlens`` (``rope_utils``'s
  ``thd`` branch); the caller keeps ``max_seqlen_q`` below the packed length so that holds.

Heads are whatever this tensor-parallel rank holds (the query's head dimension), grouped-query attention repeats
each key/value group over its ``heads // groups`` query heads in Megatron's order. ``attention_mask`` must be
None (causal only) and dropout 0: RL log-probs must be deterministic.

Why SDPA and not Megatron's ``DotProductAttention``: the latter materialises ``[b*heads, s, s]`` scores (plus
the softmax and, in training, their gradients), so memory grows with the square of the response length and it
refuses packed sequences. torch's SDPA dispatches to fused flash / memory-efficient kernels on GPU builds and to
a flash-style kernel on CPU, none of which keep the score matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


class SdpaCoreAttention(MegatronModule):
    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"attention_dropout={dropout}: SDPA core attention runs without dropout; set 0")
        if config.context_parallel_size != 1:
            raise ValueError(
                f"context_parallel_size={config.context_parallel_size}: SDPA core attention has no context "
                "parallelism; use train.attention=transformer_engine"
            )
        if config.apply_query_key_layer_scaling:
            raise ValueError("apply_query_key_layer_scaling=True is not supported by SDPA core attention")
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    @staticmethod
    def _attend(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q ``[B, heads, s, d]``, k/v ``[B, groups, s, d]`` -> ``[B, heads, s, d]`` (causal, or ``mask``:
        ``[s, s]`` boolean, True where a query row may attend to a key column)."""
        rep = q.shape[1] // k.shape[1]
        if rep > 1:
            # Megatron's GQA layout: query heads [g*rep, (g+1)*rep) share key/value group g.
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_mask is not None or attention_bias is not None:
            raise ValueError("SDPA core attention is causal only: attention_mask/attention_bias must be None")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            # The actor attaches the bounds as a list too: reading the device tensor would sync every layer.
            bounds = (
                getattr(packed_seq_params, "host_cu_seqlens", None) or packed_seq_params.cu_seqlens_q.tolist()
            )
            masks = _branch_masks(packed_seq_params, len(bounds) - 1, query.device)
            outs = []
            for start, end, mask in zip(bounds[:-1], bounds[1:], masks, strict=True):
                if end == start:
                    continue
                # [len, heads, d] -> [1, heads, len, d]
                q, k, v = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (query, key, value))
                outs.append(self._attend(q, k, v, self.softmax_scale, mask)[0].transpose(0, 1))
            out = torch.cat(outs, dim=0)  # [t, heads, d]
            return out.reshape(out.shape[0], -1)
        if packed_seq_params is not None:
            raise ValueError(f"packed qkv_format={packed_seq_params.qkv_format!r}: only 'thd' is supported")
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        out = self._attend(q, k, v, self.softmax_scale)  # [b, heads, s, d]
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def shared_prefix_mask(parts: tuple[int, ...]) -> torch.Tensor:
    """``[n, n]`` boolean attention mask of a segment ``(lp, r_1, ..., r_k)``: a prompt of ``lp`` tokens then
    k responses to it (n = lp + sum r). Query row q may see key column c iff c <= q and c is in the prompt or
    in q's own response."""
    lp, *responses = parts
    n = lp + sum(responses)
    # branch id: -1 for the prompt, i for response i
    branch = torch.cat(
        [torch.full((lp,), -1, dtype=torch.long)]
        + [torch.full((r,), i, dtype=torch.long) for i, r in enumerate(responses)]
    )
    idx = torch.arange(n)
    causal = idx.unsqueeze(1) >= idx.unsqueeze(0)
    visible = (branch.unsqueeze(0) == -1) | (branch.unsqueeze(1) == branch.unsqueeze(0))
    return causal & visible


def _branch_masks(params, segments: int, device: torch.device) -> list[torch.Tensor | None]:
    """One mask per segment (None = plain causal), built on the first layer and kept on ``params``."""
    branches = getattr(params, "host_branches", None)
    if branches is None:
        return [None] * segments
    cached = getattr(params, "branch_masks", None)
    if cached is None:
        cached = [None if b is None else shared_prefix_mask(b).to(device) for b in branches]
        params.branch_masks = cached
    return cached
