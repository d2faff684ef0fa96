"""Kernel checks: the implementations the stack runs, on the platform's device, against float64 on the CPU.

Implementations under test live in ``IMPLEMENTATIONS`` (a plain dict, so a meta-test can swap one for a
deliberately wrong version and watch the check fail). Each is what portable_rl's trainer or engine actually
calls; which device kernel runs underneath (flash / memory-efficient / math SDPA, a fused RMSNorm) is torch's
and the backend's choice on the platform's device — that choice is what is being checked:

* ``attention``: ``scaled_dot_product_attention`` with ``is_causal=True`` and grouped KV heads expanded.
* ``rmsnorm``: ``torch.nn.functional.rms_norm`` (what ``torch.nn.RMSNorm`` and Megatron's local spec run);
  ``rmsnorm_hf``: transformers' ``LlamaRMSNorm`` (the HF reference and the CPU engine).
* ``rotary``: transformers' ``LlamaRotaryEmbedding`` + ``apply_rotary_pos_emb`` at positions up to 4095.
* ``token_logprobs``: ``log_softmax`` over the vocabulary then a gather of the target token, in the given
  dtype (the RL loss reads these).

Inputs are made on the CPU from a fixed seed, rounded to the case's dtype, then moved to the device; the
reference is computed in float64 from the same rounded inputs, so the error is the kernel's alone.
The measured error is ``max |out - ref|``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from portable_rl.conformance.registry import Context, Measurement, register

KERNEL_DTYPES = ("float32", "bfloat16")
ROPE_THETA = 10000.0


def _torch_dtype(name: str | None):
    import torch

    if name is None:
        raise ValueError("kernel checks need a dtype case (float32 or bfloat16)")
    return getattr(torch, name)


# ---- implementations under test --------------------------------------------------------------------------
def sdpa_causal(q, k, v):
    import torch.nn.functional as F

    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def rms_norm_torch(x, weight, eps: float):
    import torch.nn.functional as F

    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rms_norm_hf(x, weight, eps: float):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(x.shape[-1], eps=eps).to(device=x.device, dtype=x.dtype)
    norm.weight.data.copy_(weight)
    return norm(x)


def rotary_hf(q, k, positions):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    heads, dim = q.shape[1], q.shape[-1]
    cfg = LlamaConfig(
        hidden_size=heads * dim,
        num_attention_heads=heads,
        max_position_embeddings=8192,
        rope_theta=ROPE_THETA,
    )
    rope = LlamaRotaryEmbedding(cfg).to(q.device)
    cos, sin = rope(q, positions)
    return apply_rotary_pos_emb(q, k, cos, sin)


def token_logprobs(logits, targets):
    import torch

    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


IMPLEMENTATIONS: dict[str, Callable[..., Any]] = {
    "attention": sdpa_causal,
    "rmsnorm": rms_norm_torch,
    "rmsnorm_hf": rms_norm_hf,
    "rotary": rotary_hf,
    "token_logprobs": token_logprobs,
}


# ---- float64 references -----------------------------------------------------------------------------------
def ref_attention(q, k, v):
    import torch

    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = q.shape[-2]
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)
    return torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ v


def ref_rms_norm(x, weight, eps: float):
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * weight


def ref_rotary(q, k, positions):
    import torch

    dim = q.shape[-1]
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions.to(torch.float64)[..., None] * inv_freq  # [b, s, dim/2]
    cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None]  # [b, 1, s, dim]
    sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None]

    def rot(x):
        half = x.shape[-1] // 2
        return torch.cat([-x[..., half:], x[..., :half]], -1)

    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def ref_token_logprobs(logits, targets):
    import torch

    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


# ---- the checks ----------------------------------------------------------------------------------------------
def _inputs(dtype: str, seed: int, *shapes: tuple[int, ...], scale: float = 1.0):
    """CPU tensors rounded to ``dtype``, as (rounded-float64 copies, device copies)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    rounded = [
        (torch.randn(*s, generator=gen, dtype=torch.float64) * scale).to(_torch_dtype(dtype)) for s in shapes
    ]
    return [r.to(torch.float64) for r in rounded], rounded


def _to(ctx: Context, *tensors):
    dev = ctx.platform.torch_device(0)
    return [t.to(dev) for t in tensors]


def _max_err(out, ref) -> float:
    import torch

    return float((out.detach().to("cpu", torch.float64) - ref).abs().max())


@register(
    "kernels.attention",
    "max |causal SDPA (GQA 8q/2kv heads, seq 128, head dim 64) - float64 reference|",
    dtypes=KERNEL_DTYPES,
)
def check_attention(ctx: Context, dtype: str | None) -> Measurement:
    (q64, k64, v64), (q, k, v) = _inputs(dtype, 11, (2, 8, 128, 64), (2, 2, 128, 64), (2, 2, 128, 64))
    q, k, v = _to(ctx, q, k, v)
    out = IMPLEMENTATIONS["attention"](q, k, v)
    err = _max_err(out, ref_attention(q64, k64, v64))
    return Measurement(err, f"max |ref| {float(ref_attention(q64, k64, v64).abs().max()):.3g}")


def _rms(ctx: Context, dtype: str, impl: str) -> Measurement:
    import torch

    (x64,), (x,) = _inputs(dtype, 12, (4, 64, 512))
    gen = torch.Generator().manual_seed(13)
    w = (1.0 + 0.1 * torch.randn(512, generator=gen, dtype=torch.float64)).to(_torch_dtype(dtype))
    w64 = w.to(torch.float64)
    x_dev, w_dev = _to(ctx, x, w)
    ref = ref_rms_norm(x64, w64, 1e-6)
    err = _max_err(IMPLEMENTATIONS[impl](x_dev, w_dev, 1e-6), ref)
    return Measurement(err, f"max |ref| {float(ref.abs().max()):.3g}")


@register(
    "kernels.rmsnorm",
    "max |torch rms_norm (hidden 512, eps 1e-6) - float64 reference|",
    dtypes=KERNEL_DTYPES,
)
def check_rmsnorm(ctx: Context, dtype: str | None) -> Measurement:
    return _rms(ctx, dtype, "rmsnorm")


@register(
    "kernels.rmsnorm_hf",
    "max |transformers LlamaRMSNorm (hidden 512, eps 1e-6) - float64 reference|",
    dtypes=KERNEL_DTYPES,
)
def check_rmsnorm_hf(ctx: Context, dtype: str | None) -> Measurement:
    return _rms(ctx, dtype, "rmsnorm_hf")


@register(
    "kernels.rotary",
    "max |transformers rotary embedding on q and k (head dim 64, positions < 4096) - float64 reference|",
    dtypes=KERNEL_DTYPES,
)
def check_rotary(ctx: Context, dtype: str | None) -> Measurement:
    import torch

    (q64, k64), (q, k) = _inputs(dtype, 14, (2, 4, 96, 64), (2, 2, 96, 64))
    gen = torch.Generator().manual_seed(15)
    positions = torch.randint(0, 4096, (2, 96), generator=gen)
    q_dev, k_dev, pos_dev = _to(ctx, q, k, positions)
    out_q, out_k = IMPLEMENTATIONS["rotary"](q_dev, k_dev, pos_dev)
    ref_q, ref_k = ref_rotary(q64, k64, positions)
    err = max(_max_err(out_q, ref_q), _max_err(out_k, ref_k))
    return Measurement(err, f"max position {int(positions.max())}")


@register(
    "kernels.token_logprobs",
    "max |log_softmax + gather of target tokens (vocab 8192, logits std 4) - float64 reference|",
    dtypes=KERNEL_DTYPES,
)
def check_token_logprobs(ctx: Context, dtype: str | None) -> Measurement:
    import torch

    (logits64,), (logits,) = _inputs(dtype, 16, (4, 64, 8192), scale=4.0)
    gen = torch.Generator().manual_seed(17)
    targets = torch.randint(0, 8192, (4, 64), generator=gen)
    logits_dev, targets_dev = _to(ctx, logits, targets)
    out = IMPLEMENTATIONS["token_logprobs"](logits_dev, targets_dev)
    ref = ref_token_logprobs(logits64, targets)
    return Measurement(_max_err(out, ref), f"mean ref log-prob {float(ref.mean()):.3g}")


def trainer_token_logprobs(logits, targets):
    from portable_rl.training.logprobs import token_logprobs_and_entropy

    return token_logprobs_and_entropy(logits, targets, vocab_size=logits.shape[-1])


IMPLEMENTATIONS["trainer_token_logprobs"] = trainer_token_logprobs


def ref_entropy(logits):
    import torch

    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


@register(
    "kernels.trainer_token_logprobs",
    "max |trainer's token_logprobs_and_entropy (log-probs and entropy, vocab 8192) - float64 reference|",
    dtypes=KERNEL_DTYPES,
    requires=("portable_rl.training.logprobs",),
    depends_on="the trainer's log-prob function",
)
def check_trainer_token_logprobs(ctx: Context, dtype: str | None) -> Measurement:
    import torch

    (logits64,), (logits,) = _inputs(dtype, 18, (4, 64, 8192), scale=4.0)
    gen = torch.Generator().manual_seed(19)
    targets = torch.randint(0, 8192, (4, 64), generator=gen)
    logits_dev, targets_dev = _to(ctx, logits, targets)
    logprobs, entropy = IMPLEMENTATIONS["trainer_token_logprobs"](logits_dev, targets_dev)
    err_lp = _max_err(logprobs, ref_token_logprobs(logits64, targets))
    err_ent = _max_err(entropy, ref_entropy(logits64))
    return Measurement(max(err_lp, err_ent), f"log-prob error {err_lp:.3g}, entropy error {err_ent:.3g}")
