"""Megatron-core GPTModel from a Hugging Face decoder config (Llama, Qwen2, Qwen3, Qwen2-MoE, Qwen3-MoE).

Contract
--------
* ``ModelSpec.from_hf(path_or_dict)`` reads ``config.json`` and keeps the architecture facts the conversion and
  the model need: RMSNorm, rotary embeddings (``rope_type`` default, ``llama3`` or ``yarn``), GQA, SwiGLU,
  Qwen2's q/k/v bias, Qwen3's per-head q/k RMSNorm, tied or untied embeddings, and for the MoE models the
  experts (count, top-k, expert width, top-k renormalisation, router load-balancing coefficient) and Qwen2-MoE's
  gated shared expert. Anything else (other rope types, sliding windows, dense layers inside a MoE model,
  other activations) raises ``UnsupportedModel`` naming the field and the supported values.
* Rotary scaling: the inverse frequencies are computed here from the HF rope parameters (``rope_inv_freq``, the
  formulas of the llama3 and YaRN papers as transformers applies them) and replace Megatron's after the model is
  built: Megatron 0.16's llama3 scaling fixes low/high frequency factors and the original context (1, 4, 8192)
  and its YaRN embedding needs multi-latent-attention config fields. YaRN's cos/sin factor (HF
  ``attention_factor``) goes through the config fields Megatron's attention reads for it (``rope_mscale_fields``).
* MoE: Megatron's MoE layer (router, token dispatcher ``alltoall``, ``SequentialMLP`` experts in the local spec)
  with ``expert_parallel`` ranks each holding ``num_experts / expert_parallel`` consecutive experts. MoE with
  tensor parallelism needs Megatron's sequence parallelism, which this trainer does not run: refused.
* ``padded_vocab_size(spec, tp)``: the vocabulary rounded up so it splits evenly over TP ranks. Padding rows are
  zeros and their logits are masked out by ``portable_rl.training.logprobs``.
* ``transformer_config(spec, tp, pp, dtype, overrides)`` -> Megatron ``TransformerConfig`` with
  dropout off (RL log-probs must be deterministic) and no fused kernels that need TransformerEngine/Apex;
  ``overrides`` (platform facts, then user ``--megatron-*`` flags) set any TransformerConfig field.
* ``layer_spec(spec, kernels)``: the Megatron layer spec for a ``TrainerKernels`` answer of
  ``Platform.trainer_kernels`` (the single source ``doctor`` prints): TransformerEngine's spec, or the local spec
  with ``SdpaCoreAttention`` (``attention.py``), or the local spec unchanged (``local``: unfused s x s scores).
* ``build_gpt_model(spec, config, kernels)`` builds this rank's pipeline stage with that spec and keeps every
  parameter in ``config.params_dtype`` (Megatron's torch RMSNorm is created in fp32 otherwise, and a bf16
  input with an fp32 norm weight cannot take torch's fused rms_norm). ``parallel_state`` must be initialised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
MOE_MODEL_TYPES = ("qwen2_moe", "qwen3_moe")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "yarn")


class UnsupportedModel(ValueError):
    """The HF config describes something this builder cannot represent faithfully."""


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    # Rotary scaling: HF's rope_type and its parameters (factor, original_max_position_embeddings, ...).
    rope_type: str = "default"
    rope_scaling: dict[str, Any] | None = None
    # MoE (0 experts: a dense model). Every decoder layer is a MoE layer.
    num_experts: int = 0
    moe_intermediate_size: int = 0
    experts_per_token: int = 0
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities (HF norm_topk_prob)
    router_aux_loss_coef: float = 0.0
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's sigmoid-gated shared expert (0: none)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModel(
                f"model_type {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_attention_heads % self.num_kv_heads:
            raise UnsupportedModel(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any]) -> ModelSpec:
        """From a HF checkpoint directory, a config.json path, or an already-parsed config dict."""
        cfg = _read_config(source)
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModel(
                f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModel(f"hidden_act={act!r}: only SwiGLU (silu) MLPs are supported")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModel(
                f"rope_scaling.rope_type={rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_scaling = _rope_scaling(rope_type, rope, cfg)
        if cfg.get("use_sliding_window"):
            raise UnsupportedModel("use_sliding_window=true: sliding-window attention is not supported")
        if cfg.get("mlp_bias"):
            raise UnsupportedModel("mlp_bias=true: MLP biases are not supported")
        heads = cfg["num_attention_heads"]
        if model_type in ("qwen2", "qwen2_moe"):
            qkv_bias = True  # Qwen2 always has q/k/v biases (and no o_proj bias)
        else:
            qkv_bias = bool(cfg.get("attention_bias", False))
        moe = _moe_facts(model_type, cfg)
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            rope_type=rope_type,
            rope_scaling=rope_scaling,
            **moe,
        )


# HF rope parameters each supported rope type needs (read with transformers' defaults where it has them).
_ROPE_KEYS = {
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": (
        "factor",
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    ),
}


def _rope_scaling(rope_type: str, rope: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any] | None:
    if rope_type == "default":
        return None
    if rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedModel("partial_rotary_factor != 1 is not supported")
    out = {k: rope[k] for k in _ROPE_KEYS[rope_type] if rope.get(k) is not None}
    if "original_max_position_embeddings" not in out:
        # transformers falls back to the config's own context length (Qwen2.5's yarn configs rely on it)
        out["original_max_position_embeddings"] = cfg.get("max_position_embeddings", 4096)
    if rope_type == "llama3":
        missing = [k for k in _ROPE_KEYS["llama3"] if k not in out]
        if missing:
            raise UnsupportedModel(f"rope_scaling.rope_type='llama3' lacks {', '.join(missing)}")
    if rope_type == "yarn" and "factor" not in out:
        out["factor"] = cfg.get("max_position_embeddings", 4096) / out["original_max_position_embeddings"]
    return out


def _moe_facts(model_type: str, cfg: dict[str, Any]) -> dict[str, Any]:
    if model_type not in MOE_MODEL_TYPES:
        return {}
    step = cfg.get("decoder_sparse_step", 1)
    if step != 1 or cfg.get("mlp_only_layers"):
        raise UnsupportedModel(
            f"decoder_sparse_step={step}, mlp_only_layers={cfg.get('mlp_only_layers')}: only models whose every "
            "layer is a MoE layer are supported (decoder_sparse_step=1, mlp_only_layers=[])"
        )
    shared = int(cfg.get("shared_expert_intermediate_size") or 0) if model_type == "qwen2_moe" else 0
    # transformers 5 writes the expert count as num_local_experts (an alias of num_experts)
    experts = cfg.get("num_experts", cfg.get("num_local_experts"))
    if not experts:
        raise UnsupportedModel(f"{model_type} config has no num_experts (or num_local_experts)")
    return dict(
        num_experts=int(experts),
        moe_intermediate_size=int(cfg["moe_intermediate_size"]),
        experts_per_token=int(cfg["num_experts_per_tok"]),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        router_aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.0)),
        shared_expert_intermediate_size=shared,
    )


def rope_inv_freq(spec: ModelSpec):
    """Rotary inverse frequencies [head_dim / 2] (float32, as transformers computes them) for ``spec``."""
    import math

    dim = spec.head_dim
    base = spec.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
    r = spec.rope_scaling or {}
    if spec.rope_type == "llama3":
        factor, low, high = r["factor"], r["low_freq_factor"], r["high_freq_factor"]
        old = r["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are divided by the factor, short ones kept, the band between blended smoothly
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        return torch.where(medium, blended, scaled)
    if spec.rope_type == "yarn":
        factor, old = r["factor"], r["original_max_position_embeddings"]
        fast, slow = r.get("beta_fast") or 32, r.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(old / (rotations * 2 * math.pi))) / (2 * math.log(base))

        lo, hi = correction_dim(fast), correction_dim(slow)
        if r.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
        pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
        extrapolation = 1 - ramp  # share of the unscaled frequency per dimension
        return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq


def rope_attention_factor(spec: ModelSpec) -> float:
    """HF's ``attention_factor``: the factor on cos and sin (1 except for YaRN)."""
    import math

    if spec.rope_type != "yarn":
        return 1.0
    r = spec.rope_scaling or {}
    if r.get("attention_factor") is not None:
        return float(r["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = r["factor"]
    if r.get("mscale") and r.get("mscale_all_dim"):
        return mscale(factor, r["mscale"]) / mscale(factor, r["mscale_all_dim"])
    return mscale(factor)


def rope_mscale_fields(factor: float) -> dict[str, float]:
    """TransformerConfig attributes that make Megatron's attention multiply cos/sin by ``factor``.

    Megatron 0.16 applies ``mscale(s, m) / mscale(s, m_all)`` with ``mscale(s, m) = 0.1 m ln s + 1`` whenever the
    config has ``yarn_rotary_scaling_factor``; with s = e and m_all = 0 that ratio is ``0.1 m + 1``.
    """
    if factor == 1.0:
        return {}
    import math

    return {
        "yarn_rotary_scaling_factor": math.e,
        "yarn_mscale": (factor - 1.0) * 10.0,
        "yarn_mscale_all_dim": 0.0,
    }


def _read_config(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    if isinstance(source, dict):
        return source
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no HF config at {path}; pass a checkpoint directory containing config.json")
    return json.loads(path.read_text())


def padded_vocab_size(spec: ModelSpec, tp: int) -> int:
    """Smallest size >= vocab_size divisible by ``tp`` (VocabParallelEmbedding needs equal shards)."""
    return -(-spec.vocab_size // tp) * tp


def check_expert_layout(spec: ModelSpec, tp: int, ep: int) -> None:
    """Raise ValueError (a sentence naming the field and the fix) when EP=ep or TP=tp cannot hold ``spec``'s
    experts."""
    if ep > 1 and not spec.is_moe:
        raise ValueError(
            f"expert_parallel={ep} needs a MoE model, but {spec.model_type} has no experts; set it to 1"
        )
    if spec.is_moe and spec.num_experts % ep:
        raise ValueError(
            f"expert_parallel={ep} does not divide num_experts={spec.num_experts}; choose a divisor of it"
        )
    if spec.is_moe and tp > 1:
        raise ValueError(
            f"tensor_parallel={tp} is not supported with the MoE model {spec.model_type} (Megatron's MoE layers "
            "need sequence parallelism with TP, which this trainer does not run); use tensor_parallel=1 and "
            "expert_parallel"
        )


def check_parallel_layout(spec: ModelSpec, tp: int, pp: int, ep: int = 1) -> None:
    """Raise ValueError naming the field when ``spec`` cannot be split over TP=tp, PP=pp, EP=ep (the vocabulary
    is padded to a multiple of TP, so it always splits)."""
    check_expert_layout(spec, tp, ep)
    if spec.num_attention_heads % tp:
        raise ValueError(
            f"tensor_parallel={tp} does not divide num_attention_heads={spec.num_attention_heads}"
        )
    if spec.num_kv_heads % tp:
        raise ValueError(f"tensor_parallel={tp} does not divide num_key_value_heads={spec.num_kv_heads}")
    if spec.intermediate_size % tp:
        raise ValueError(f"tensor_parallel={tp} does not divide intermediate_size={spec.intermediate_size}")
    if spec.num_layers % pp:
        raise ValueError(f"pipeline_parallel={pp} does not divide num_hidden_layers={spec.num_layers}")


# TransformerConfig fields portable_rl sets from the model's config.json and the trainer layout: a --megatron-*
# override of one would contradict the checkpoint or train.parallel, so preflight refuses it (naming the owner).
LAYOUT_OWNED_FIELDS = {
    "tensor_model_parallel_size": "train.parallel.tensor_parallel",
    "pipeline_model_parallel_size": "train.parallel.pipeline_parallel",
    "expert_model_parallel_size": "train.parallel.expert_parallel",
    "num_moe_experts": "the model's config.json",
    "moe_ffn_hidden_size": "the model's config.json",
    "moe_router_topk": "the model's config.json",
    "num_layers": "the model's config.json",
    "hidden_size": "the model's config.json",
    "ffn_hidden_size": "the model's config.json",
    "num_attention_heads": "the model's config.json",
    "num_query_groups": "the model's config.json",
    "kv_channels": "the model's config.json",
}


def transformer_config_fields() -> frozenset[str] | None:
    """Names of Megatron's TransformerConfig fields, read from its source without importing megatron (an
    import takes seconds and prints warnings); None where megatron-core is not installed."""
    import ast
    import importlib.util

    found = importlib.util.find_spec("megatron")
    if found is None or not found.submodule_search_locations:
        return None
    names: set[str] = set()
    for base in found.submodule_search_locations:
        for rel, cls in (
            ("core/transformer/transformer_config.py", "TransformerConfig"),
            ("core/model_parallel_config.py", "ModelParallelConfig"),
        ):
            path = Path(base) / rel
            if not path.is_file():
                continue
            for node in ast.parse(path.read_text(encoding="utf-8")).body:
                if isinstance(node, ast.ClassDef) and node.name == cls:
                    names |= {
                        st.target.id
                        for st in node.body
                        if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name)
                    }
    return frozenset(names) or None


def transformer_config(
    spec: ModelSpec,
    tp: int = 1,
    pp: int = 1,
    dtype: torch.dtype = torch.float32,
    overrides: dict[str, Any] | None = None,
    ep: int = 1,
):
    """Megatron TransformerConfig for ``spec`` on a TP x PP (x EP) layout; ``overrides`` win over defaults."""
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    check_parallel_layout(spec, tp, pp, ep)
    kwargs: dict[str, Any] = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.intermediate_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_kv_heads,
        kv_channels=spec.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=spec.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        # Fused kernels come from TransformerEngine/Apex; the local spec uses plain torch ops.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
    )
    if spec.is_moe:
        kwargs.update(_moe_config(spec, ep))
    valid = {f.name for f in fields(TransformerConfig)}
    for key, value in (overrides or {}).items():
        if key not in valid:
            raise ValueError(f"megatron override {key!r} is not a TransformerConfig field")
        kwargs[key] = value
    # The precision flags decide the parameter dtype, so a platform fact (e.g. bf16=False on CPU) or a user
    # flag that flips them cannot leave the weights in a dtype the optimizer does not expect.
    if "params_dtype" not in (overrides or {}):
        final = torch.bfloat16 if kwargs["bf16"] else torch.float16 if kwargs["fp16"] else torch.float32
        kwargs["params_dtype"] = kwargs["pipeline_dtype"] = final
    config = TransformerConfig(**kwargs)
    # Not dataclass fields in 0.16 (only multi-latent attention declares them), read with getattr by attention.
    for key, value in rope_mscale_fields(rope_attention_factor(spec)).items():
        setattr(config, key, value)
    return config


def _moe_config(spec: ModelSpec, ep: int) -> dict[str, Any]:
    """Megatron MoE fields for a Qwen-MoE ``spec``: softmax router, dropless, no expert bias."""
    out: dict[str, Any] = dict(
        num_moe_experts=spec.num_experts,
        moe_ffn_hidden_size=spec.moe_intermediate_size,
        moe_router_topk=spec.experts_per_token,
        moe_router_score_function="softmax",
        # top-k of the logits then softmax over them = HF's softmax, top-k, renormalise (norm_topk_prob);
        # without renormalisation HF takes the top-k of the softmax over all experts (pre-softmax)
        moe_router_pre_softmax=not spec.norm_topk_prob,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=spec.router_aux_loss_coef,
        moe_token_dispatcher_type="alltoall",  # the dispatcher that runs expert parallelism on any backend
        moe_grouped_gemm=False,  # SequentialMLP: one linear pair per expert, no grouped-GEMM kernel
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=1,
    )
    if spec.shared_expert_intermediate_size:
        out.update(
            moe_shared_expert_intermediate_size=spec.shared_expert_intermediate_size,
            moe_shared_expert_gate=True,
            moe_shared_expert_overlap=False,
        )
    return out


def layer_spec(spec: ModelSpec, kernels):
    """Megatron layer spec for ``kernels`` (a ``portable_rl.platform.TrainerKernels``)."""
    import dataclasses

    from megatron.core.models.gpt import gpt_layer_specs

    experts = spec.num_experts or None
    if kernels.layer_spec == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=experts, moe_grouped_gemm=False, qk_layernorm=spec.qk_norm
        )
    local = gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=experts, moe_grouped_gemm=False, qk_layernorm=spec.qk_norm, normalization="RMSNorm"
    )
    if kernels.attention == "local":
        return local
    from portable_rl.training.attention import SdpaCoreAttention

    attn = local.submodules.self_attention
    attn_subs = dataclasses.replace(attn.submodules, core_attention=SdpaCoreAttention)
    self_attention = dataclasses.replace(attn, submodules=attn_subs)
    return dataclasses.replace(
        local, submodules=dataclasses.replace(local.submodules, self_attention=self_attention)
    )


def _router_without_transformer_engine() -> None:
    """Megatron 0.16.1's router GEMM tests ``te_general_gemm is not None``, a name its module defines only when
    TransformerEngine imports: without TE every MoE forward raises NameError. ``None`` selects its torch path
    (what megatron-core 0.19 sets itself; it ships no Python 3.11 wheel)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def build_gpt_model(spec: ModelSpec, config, kernels):
    """This rank's stage of a Megatron GPTModel for ``spec`` (parallel_state must be initialised)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    if spec.is_moe:
        _router_without_transformer_engine()

    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(spec, kernels),
        vocab_size=padded_vocab_size(spec, config.tensor_model_parallel_size),
        max_sequence_length=spec.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        parallel_output=True,  # logits stay vocab-parallel; logprobs.py reduces over TP
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=spec.rope_theta,
    )
    if spec.rope_type != "default" and getattr(model, "rotary_pos_emb", None) is not None:
        old = model.rotary_pos_emb.inv_freq
        model.rotary_pos_emb.inv_freq = rope_inv_freq(spec).to(device=old.device, dtype=old.dtype)
    # Parameters only: buffers such as rotary inv_freq stay fp32 (casting them would coarsen the angles).
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != config.params_dtype:
            param.data = param.data.to(config.params_dtype)
    return model


def local_layer_range(spec: ModelSpec, pp: int, pp_rank: int) -> range:
    """Global indices of the decoder layers held by pipeline stage ``pp_rank`` (even split)."""
    per = spec.num_layers // pp
    return range(pp_rank * per, (pp_rank + 1) * per)
