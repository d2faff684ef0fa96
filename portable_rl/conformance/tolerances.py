"""Tolerances as data: check name -> platform -> dtype -> the largest ``Measurement.error`` that passes.

``"*"`` matches any platform or dtype (``None``, the dtype-free case, is looked up as ``"*"``). Every
registered case must resolve on every platform in ``PLATFORMS`` (a unit test holds the table to that).

How the numbers are chosen (docs/conformance.md has the longer version):
* exact checks (collectives, weight sync, determinism, mismatch counts) are 0 — any difference is a bug;
* kernel checks: about 2x the worst max-abs error measured over 10 input seeds on the platform, rounded up,
  and never below what rounding the output to the dtype costs (half an ulp at the output's magnitude).
  CPU figures are measured (10 seeds, torch 2.13 CPU; see the report). GPU figures start from the same
  numbers with fp32 loosened to 2e-5 for reduction order in fused kernels (no TF32: torch leaves it off for
  matmuls and SDPA by default); a GPU leg's report is the evidence to tighten or loosen them.
* model-level comparisons (Megatron vs HF, TP2 vs TP1, engine vs trainer log-probs) are in fp32 on CPU and
  bf16 on GPUs, where logits differ by accumulated rounding rather than one kernel's.
"""

from __future__ import annotations

PLATFORMS = ("cpu", "cuda", "rocm")

EXACT = {"*": {"*": 0.0}}

_GPU_KERNELS = {
    # fp32 / bf16 max abs error, inputs ~N(0, 1) (logits ~N(0, 16)); see the module docstring.
    "kernels.attention": {"float32": 2e-5, "bfloat16": 3e-2},
    "kernels.rmsnorm": {"float32": 2e-5, "bfloat16": 4e-2},
    "kernels.rmsnorm_hf": {"float32": 2e-5, "bfloat16": 6e-2},
    "kernels.rotary": {"float32": 2e-3, "bfloat16": 6e-2},
    "kernels.token_logprobs": {"float32": 5e-5, "bfloat16": 1.5e-1},
}

TOLERANCES: dict[str, dict[str, dict[str, float]]] = {
    "collectives.all_reduce": EXACT,
    "collectives.broadcast": EXACT,
    "collectives.all_gather": EXACT,
    "collectives.all_reduce_determinism": EXACT,
    # CPU measured worst of 10 seeds: attention 1.2e-6 / 8.6e-3, rmsnorm 8.6e-7 / 1.6e-2,
    # rmsnorm_hf 8.6e-7 / 3.1e-2, rotary 4.5e-4 / 2.4e-2 (fp32 angles at positions < 4096),
    # token_logprobs 4.5e-6 / 7.4e-2.
    "kernels.attention": {"cpu": {"float32": 5e-6, "bfloat16": 3e-2}, "*": _GPU_KERNELS["kernels.attention"]},
    "kernels.rmsnorm": {"cpu": {"float32": 5e-6, "bfloat16": 4e-2}, "*": _GPU_KERNELS["kernels.rmsnorm"]},
    "kernels.rmsnorm_hf": {
        "cpu": {"float32": 5e-6, "bfloat16": 6e-2},
        "*": _GPU_KERNELS["kernels.rmsnorm_hf"],
    },
    "kernels.rotary": {"cpu": {"float32": 1e-3, "bfloat16": 6e-2}, "*": _GPU_KERNELS["kernels.rotary"]},
    "kernels.token_logprobs": {
        "cpu": {"float32": 2e-5, "bfloat16": 1.5e-1},
        "*": _GPU_KERNELS["kernels.token_logprobs"],
    },
    # Upcasts to fp32 before the softmax, so bf16 inputs are held to fp32 accuracy (CPU worst of 10 seeds:
    # 2.0e-6 fp32, 1.1e-6 bf16). Forgetting the upcast costs ~7e-2 in bf16.
    "kernels.trainer_token_logprobs": {"cpu": {"*": 1e-5}, "*": {"*": 5e-5}},
    "determinism.hf_train_steps": EXACT,
    # Model level. CPU trains in fp32: measured 1.7e-6 (logits), 1.0e-6 (log-probs), 1.7e-6 (TP2 vs TP1).
    # GPU platforms train in bf16 (their default_train_dtype). Measured on one H100 (torch 2.11, local spec +
    # SDPA): logits 0.031-0.038 for the dense models, 0.325 for Qwen3-MoE; log-probs 0.015-0.025 and 0.116.
    # The MoE figure is bf16's, not the converter's: transformers itself in bf16 is 0.317 off float64 on the
    # same batch (also Megatron on the CPU in bf16: 0.328; fp32 routing, moe_router_dtype, does not move it),
    # so the bound is ~1.5x the MoE figure. A conversion bug (a transposed or misplaced weight, wrong RoPE)
    # moves logits by O(1) and still fails; the detail lists transformers' own bf16 error per architecture.
    "training.megatron_vs_hf_logits": {"cpu": {"*": 2e-5}, "*": {"*": 5e-1}},
    "training.megatron_vs_hf_logprobs": {"cpu": {"*": 2e-5}, "*": {"*": 2e-1}},
    # Exported weights vs the checkpoint cast to the trainer's dtype: bit-equal in every dtype.
    "training.hf_roundtrip": EXACT,
    # Packed vs one sample per micro-batch: same math, other shapes (and SDPA calls); fp32 rounding on CPU
    # (measured 9.5e-7 for log-probs). GPUs run bf16: provisional, like the other model-level checks.
    "training.packed_vs_unpacked": {"cpu": {"*": 1e-5}, "*": {"*": 1e-1}},
    "training.tp2_vs_tp1": {"cpu": {"*": 2e-5}, "*": {"*": 1e-1}},
    # EP2 vs EP1: the same expert math on other ranks (tokens travel all-to-all); CPU measured 4.8e-7 (fp32).
    "training.ep2_vs_ep1": {"cpu": {"*": 2e-5}, "*": {"*": 1e-1}},
    "determinism.megatron_train_steps": EXACT,
    # Engine log-probs: the CPU engine decodes with a KV cache in fp32 (measured 5.6e-7 vs HF); SGLang on GPUs
    # samples in bf16 against a bf16 trainer — provisional until a GPU leg reports.
    "rollout.engine_vs_hf_logprobs": {"cpu": {"*": 2e-5}, "*": {"*": 2e-1}},
    "rollout.engine_vs_trainer_logprobs": {"cpu": {"*": 2e-5}, "*": {"*": 2e-1}},
    "weight_sync.shared_tensor": EXACT,
    "weight_sync.broadcast": EXACT,
    "weight_sync.disk": EXACT,
    # Measured in units of each metric's own bound (golden.METRIC_BOUNDS): 1 is the edge of every bound.
    "golden.tiny_recipe": {"*": {"*": 1.0}},
    "ray.worker_env": EXACT,
    "ray.device_placement": EXACT,
}


def tolerance(check: str, platform: str, dtype: str | None) -> float:
    """The tolerance for one case; a missing entry is a bug in this table, reported with what to add."""
    by_platform = TOLERANCES.get(check)
    if by_platform is None:
        raise KeyError(f"no tolerance for check {check!r}; add it to portable_rl/conformance/tolerances.py")
    by_dtype = by_platform.get(platform, by_platform.get("*"))
    if by_dtype is None:
        raise KeyError(
            f"no tolerance for check {check!r} on platform {platform!r}; add a {platform!r} or '*' row"
        )
    key = dtype or "*"
    value = by_dtype.get(key, by_dtype.get("*"))
    if value is None:
        raise KeyError(f"no tolerance for check {check!r} on {platform!r} in dtype {key!r}; add it")
    return float(value)
