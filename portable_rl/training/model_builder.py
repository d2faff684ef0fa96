"""Megatron-core GPTModel from a Hugging Face decoder config (Llama, Qwen2, Qwen3).

Contract
--------
* ``ModelSpec.from_hf(path_or_dict)`` reads ``config.json`` and keeps the architecture facts the conversion and
  the model need: RMSNorm, rotary (default rope only), GQA, SwiGLU, Qwen2's q/k/v bias, Qwen3's per-head q/k
  RMSNorm, tied or untied embeddings. Anything else (rope scaling, sliding windows, MoE, other activations)
  raises ``UnsupportedModel`` with the offending field.
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

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


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
        if rope_type != "default":
            raise UnsupportedModel(f"rope_type={rope_type!r}: only default rotary embeddings are supported")
        rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        if cfg.get("use_sliding_window"):
            raise UnsupportedModel("use_sliding_window=true: sliding-window attention is not supported")
        if cfg.get("mlp_bias"):
            raise UnsupportedModel("mlp_bias=true: MLP biases are not supported")
        heads = cfg["num_attention_heads"]
        if model_type == "qwen2":
            qkv_bias = True  # Qwen2 always has q/k/v biases (and no o_proj bias)
        else:
            qkv_bias = bool(cfg.get("attention_bias", False))
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
            qk_norm=model_type == "qwen3",
        )


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


def check_parallel_layout(spec: ModelSpec, tp: int, pp: int) -> None:
    """Raise ValueError naming the field when ``spec`` cannot be split over TP=tp, PP=pp (the vocabulary is
    padded to a multiple of TP, so it always splits)."""
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
):
    """Megatron TransformerConfig for ``spec`` on a TP x PP layout; ``overrides`` win over defaults."""
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    check_parallel_layout(spec, tp, pp)
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
    return TransformerConfig(**kwargs)


def layer_spec(spec: ModelSpec, kernels):
    """Megatron layer spec for ``kernels`` (a ``portable_rl.platform.TrainerKernels``)."""
    import dataclasses

    from megatron.core.models.gpt import gpt_layer_specs

    if kernels.layer_spec == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=spec.qk_norm)
    local = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=spec.qk_norm, normalization="RMSNorm")
    if kernels.attention == "local":
        return local
    from portable_rl.training.attention import SdpaCoreAttention

    attn = local.submodules.self_attention
    attn_subs = dataclasses.replace(attn.submodules, core_attention=SdpaCoreAttention)
    self_attention = dataclasses.replace(attn, submodules=attn_subs)
    return dataclasses.replace(
        local, submodules=dataclasses.replace(local.submodules, self_attention=self_attention)
    )


def build_gpt_model(spec: ModelSpec, config, kernels):
    """This rank's stage of a Megatron GPTModel for ``spec`` (parallel_state must be initialised)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

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
    # Parameters only: buffers such as rotary inv_freq stay fp32 (casting them would coarsen the angles).
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != config.params_dtype:
            param.data = param.data.to(config.params_dtype)
    return model


def local_layer_range(spec: ModelSpec, pp: int, pp_rank: int) -> range:
    """Global indices of the decoder layers held by pipeline stage ``pp_rank`` (even split)."""
    per = spec.num_layers // pp
    return range(pp_rank * per, (pp_rank + 1) * per)
