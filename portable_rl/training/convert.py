"""HF safetensors <-> Megatron GPTModel weights, both directions, TP-sharded and PP-split.

Two layers, kept apart so each is simple and testable:

1. Naming and layout (TP-independent): HF tensors <-> *full* Megatron tensors, with global layer indices.
   ``hf_to_megatron(spec, hf, layers, pre, post)`` yields ``(megatron_name, full_tensor)``;
   ``megatron_to_hf(spec, name, full_tensor)`` returns the HF ``(name, tensor)`` pairs. Megatron packs
   q/k/v per query group (``[q heads of group g, k_g, v_g]`` for each group) and gate/up as one
   ``linear_fc1`` (``[gate; up]``).
2. Tensor-parallel sharding of full Megatron tensors: ``shard(name, full, spec, tp_rank, tp)`` and
   ``unshard(name, shards, spec)``. Column-parallel weights split on dim 0, row-parallel on dim 1, the gated
   fc1 splits gate and up separately (rank r holds ``[gate_r; up_r]``), vocab tensors are zero-padded to
   ``padded_vocab_size`` before splitting and the padding is dropped again on unshard.

On top: ``load_hf_into_model`` (strict: every model tensor must be filled and every produced tensor used),
``HFWeights`` (lazy safetensors reader, single file or sharded index) and ``save_hf_checkpoint`` (writes
safetensors plus the source checkpoint's config/tokenizer files so transformers and SGLang load the result).
Layer specs: names are the local spec's. TransformerEngine's spec fuses the two pre-norms into the following
linear (``self_attention.linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``); ``te_name`` /
``local_spec_name`` translate, so loading and export work with either spec (the tensors are identical).
Tied embeddings: HF stores only ``model.embed_tokens.weight``; a Megatron last pipeline stage that holds its own
output copy receives the embedding, and export never emits ``lm_head.weight`` for a tied model.
MoE (Qwen2-MoE, Qwen3-MoE): ``mlp.gate`` is Megatron's ``mlp.router``; HF expert ``j`` (the checkpoint's
per-expert ``mlp.experts.{j}.{gate,up,down}_proj`` names, which SGLang and transformers both load) is
``mlp.experts.local_experts.{j}`` with gate/up packed into ``linear_fc1``; Qwen2-MoE's shared expert is
``mlp.shared_experts`` and its sigmoid gate ``mlp.shared_experts.gate_weight``. Full tensors carry the *global*
expert index; an expert-parallel rank ``r`` of ``ep`` holds experts ``[r * E/ep, (r + 1) * E/ep)`` under local
indices from 0 (``local_name`` / ``global_name`` translate both the layer and the expert index).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from portable_rl.training.model_builder import ModelSpec, padded_vocab_size

_LAYER = re.compile(r"^(decoder\.layers\.)(\d+)(\..*)$")
_EXPERT = re.compile(r"^(.*\.mlp\.experts\.local_experts\.)(\d+)(\..*)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")

# Per-layer names: Megatron suffix -> HF suffix (1:1 tensors only; qkv and fc1 are packed below).
_LAYER_SIMPLE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
# MoE layer (Megatron suffix -> HF suffix), 1:1 tensors; expert and shared-expert fc1 are packed below.
_MOE_SIMPLE = {
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.shared_experts.linear_fc2.weight": "mlp.shared_expert.down_proj.weight",
    "mlp.shared_experts.gate_weight": "mlp.shared_expert_gate.weight",
}
_TOP_SIMPLE = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}


# Local-spec layer suffix -> TransformerEngine-spec suffix (norm fused into the next linear layer).
_TE_FUSED_NORMS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
_LOCAL_NORMS = {te: local for local, te in _TE_FUSED_NORMS.items()}


def te_name(name: str) -> str:
    """A local-spec Megatron tensor name as TransformerEngine's layer spec names it."""
    match = _LAYER.match(name)
    if match and match.group(3)[1:] in _TE_FUSED_NORMS:
        return f"{match.group(1)}{match.group(2)}.{_TE_FUSED_NORMS[match.group(3)[1:]]}"
    return name


def local_spec_name(name: str) -> str:
    """Inverse of ``te_name`` (names that are the same in both specs pass through)."""
    match = _LAYER.match(name)
    if match and match.group(3)[1:] in _LOCAL_NORMS:
        return f"{match.group(1)}{match.group(2)}.{_LOCAL_NORMS[match.group(3)[1:]]}"
    return name


class ConversionError(ValueError):
    """A checkpoint does not match the model it is loaded into (missing, extra or mis-shaped tensors)."""


# ---- layer 1: naming and packing ---------------------------------------------------------------------------
def pack_qkv(spec: ModelSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HF q/k/v (weights [out, in] or biases [out]) -> Megatron's per-group packed linear_qkv tensor."""
    g, hd, qpg = spec.num_kv_heads, spec.head_dim, spec.q_per_kv
    tail = q.shape[1:]
    packed = torch.cat(
        [q.reshape(g, qpg * hd, *tail), k.reshape(g, hd, *tail), v.reshape(g, hd, *tail)], dim=1
    )
    return packed.reshape(g * (qpg + 2) * hd, *tail)


def unpack_qkv(spec: ModelSpec, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, hd, qpg = spec.num_kv_heads, spec.head_dim, spec.q_per_kv
    tail = packed.shape[1:]
    grouped = packed.reshape(g, (qpg + 2) * hd, *tail)
    q, k, v = torch.split(grouped, [qpg * hd, hd, hd], dim=1)
    return (
        q.reshape(g * qpg * hd, *tail).contiguous(),
        k.reshape(g * hd, *tail).contiguous(),
        v.reshape(g * hd, *tail).contiguous(),
    )


def hf_to_megatron(
    spec: ModelSpec,
    hf,
    layers: Iterable[int],
    pre_process: bool,
    post_process: bool,
    experts: Iterable[int] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Full Megatron tensors (global layer and expert indices) for the given stage; ``hf[name]`` returns a
    tensor. ``experts``: the global expert indices this rank holds (default: all of them)."""
    experts = list(range(spec.num_experts) if experts is None else experts)
    if pre_process:
        yield "embedding.word_embeddings.weight", hf["model.embed_tokens.weight"]
    for i in layers:
        p = f"model.layers.{i}."
        m = f"decoder.layers.{i}."
        for m_suffix, hf_suffix in _LAYER_SIMPLE.items():
            if "q_layernorm" in m_suffix or "k_layernorm" in m_suffix:
                if not spec.qk_norm:
                    continue
            if m_suffix == "mlp.linear_fc2.weight" and spec.is_moe:
                continue
            yield m + m_suffix, hf[p + hf_suffix]
        yield (
            m + "self_attention.linear_qkv.weight",
            pack_qkv(
                spec,
                hf[p + "self_attn.q_proj.weight"],
                hf[p + "self_attn.k_proj.weight"],
                hf[p + "self_attn.v_proj.weight"],
            ),
        )
        if spec.qkv_bias:
            yield (
                m + "self_attention.linear_qkv.bias",
                pack_qkv(
                    spec,
                    hf[p + "self_attn.q_proj.bias"],
                    hf[p + "self_attn.k_proj.bias"],
                    hf[p + "self_attn.v_proj.bias"],
                ),
            )
        if spec.is_moe:
            yield from _moe_to_megatron(spec, hf, p, m, experts)
            continue
        yield (
            m + "mlp.linear_fc1.weight",
            torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]], dim=0),
        )
    if post_process:
        yield "decoder.final_layernorm.weight", hf["model.norm.weight"]
        source = "model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"
        yield "output_layer.weight", hf[source]


def _moe_to_megatron(
    spec: ModelSpec, hf, p: str, m: str, experts: list[int]
) -> Iterator[tuple[str, torch.Tensor]]:
    for m_suffix, hf_suffix in _MOE_SIMPLE.items():
        if "shared" in m_suffix and not spec.shared_expert_intermediate_size:
            continue
        yield m + m_suffix, hf[p + hf_suffix]
    if spec.shared_expert_intermediate_size:
        gate, up = hf[p + "mlp.shared_expert.gate_proj.weight"], hf[p + "mlp.shared_expert.up_proj.weight"]
        yield m + "mlp.shared_experts.linear_fc1.weight", torch.cat([gate, up], dim=0)
    for j in experts:
        e = f"{p}mlp.experts.{j}."
        fc1 = torch.cat([hf[e + "gate_proj.weight"], hf[e + "up_proj.weight"]], dim=0)
        yield f"{m}mlp.experts.local_experts.{j}.linear_fc1.weight", fc1
        yield f"{m}mlp.experts.local_experts.{j}.linear_fc2.weight", hf[e + "down_proj.weight"]


def _gate_up(prefix: str, full: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    gate, up = torch.chunk(full, 2, dim=0)
    return [(prefix + "gate_proj.weight", gate.contiguous()), (prefix + "up_proj.weight", up.contiguous())]


def megatron_to_hf(spec: ModelSpec, name: str, full: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """HF tensors for one full Megatron tensor (global layer index in ``name``); [] for tied outputs."""
    name = local_spec_name(name)
    if name in _TOP_SIMPLE:
        if name == "output_layer.weight" and spec.tie_word_embeddings:
            return []
        return [(_TOP_SIMPLE[name], full)]
    match = _LAYER.match(name)
    if not match:
        raise ConversionError(f"no HF name for Megatron tensor {name!r}")
    layer, suffix = int(match.group(2)), match.group(3)[1:]
    p = f"model.layers.{layer}."
    if suffix in _LAYER_SIMPLE:
        return [(p + _LAYER_SIMPLE[suffix], full)]
    if suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = suffix.rsplit(".", 1)[1]
        q, k, v = unpack_qkv(spec, full)
        return [(f"{p}self_attn.{n}_proj.{kind}", t) for n, t in (("q", q), ("k", k), ("v", v))]
    if suffix == "mlp.linear_fc1.weight":
        return _gate_up(p + "mlp.", full)
    if suffix in _MOE_SIMPLE:
        return [(p + _MOE_SIMPLE[suffix], full)]
    if suffix == "mlp.shared_experts.linear_fc1.weight":
        return _gate_up(p + "mlp.shared_expert.", full)
    expert = _EXPERT.match(name)
    if expert:
        j, tail = int(expert.group(2)), expert.group(3)[1:]
        if tail == "linear_fc1.weight":
            return _gate_up(f"{p}mlp.experts.{j}.", full)
        if tail == "linear_fc2.weight":
            return [(f"{p}mlp.experts.{j}.down_proj.weight", full)]
    raise ConversionError(f"no HF name for Megatron tensor {name!r}")


# ---- layer 2: tensor-parallel sharding ---------------------------------------------------------------------
def tp_kind(name: str) -> str:
    """How a Megatron tensor is split over TP: vocab | column | row | fc1 | replicated."""
    if name.endswith(("word_embeddings.weight", "output_layer.weight")):
        return "vocab"
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        return "column"
    if name.endswith("linear_fc1.weight"):
        return "fc1"
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return "row"
    return "replicated"


def shard(name: str, full: torch.Tensor, spec: ModelSpec, tp_rank: int, tp: int) -> torch.Tensor:
    kind = tp_kind(name)
    if kind == "replicated" or tp == 1 and kind != "vocab":
        return full
    if kind == "vocab":
        pad = padded_vocab_size(spec, tp) - full.shape[0]
        if pad:
            full = torch.cat([full, full.new_zeros(pad, *full.shape[1:])], dim=0)
        return torch.chunk(full, tp, dim=0)[tp_rank].contiguous()
    if kind == "column":
        return torch.chunk(full, tp, dim=0)[tp_rank].contiguous()
    if kind == "row":
        return torch.chunk(full, tp, dim=1)[tp_rank].contiguous()
    halves = full.reshape(2, full.shape[0] // 2, *full.shape[1:])  # fc1: [gate; up]
    return torch.chunk(halves, tp, dim=1)[tp_rank].reshape(-1, *full.shape[1:]).contiguous()


def unshard(name: str, shards: list[torch.Tensor], spec: ModelSpec) -> torch.Tensor:
    kind = tp_kind(name)
    if kind == "replicated" or len(shards) == 1 and kind != "vocab":
        return shards[0]
    if kind == "vocab":
        return torch.cat(shards, dim=0)[: spec.vocab_size]
    if kind == "column":
        return torch.cat(shards, dim=0)
    if kind == "row":
        return torch.cat(shards, dim=1)
    halves = [s.reshape(2, s.shape[0] // 2, *s.shape[1:]) for s in shards]
    return torch.cat(halves, dim=1).reshape(-1, *shards[0].shape[1:])


def _shift_expert(name: str, offset: int) -> str:
    match = _EXPERT.match(name)
    if not match or not offset:
        return name
    return f"{match.group(1)}{int(match.group(2)) + offset}{match.group(3)}"


def is_expert(name: str) -> bool:
    """Whether ``name`` is a routed expert's tensor (split over expert-parallel ranks, not replicated)."""
    return _EXPERT.match(name) is not None


def local_name(name: str, layer_offset: int, expert_offset: int = 0) -> str:
    """Global Megatron name -> the name inside a pipeline stage whose first layer is ``layer_offset`` (and an
    expert-parallel rank whose first expert is ``expert_offset``)."""
    name = _shift_expert(name, -expert_offset)
    match = _LAYER.match(name)
    if not match or not layer_offset:
        return name
    return f"{match.group(1)}{int(match.group(2)) - layer_offset}{match.group(3)}"


def global_name(name: str, layer_offset: int, expert_offset: int = 0) -> str:
    name = _shift_expert(name, expert_offset)
    match = _LAYER.match(name)
    if not match or not layer_offset:
        return name
    return f"{match.group(1)}{int(match.group(2)) + layer_offset}{match.group(3)}"


# ---- checkpoint files --------------------------------------------------------------------------------------
class HFWeights:
    """Lazy reader of a HF checkpoint's safetensors (one file or an index of shards): ``hf[name]``."""

    def __init__(self, model_dir: str | Path) -> None:
        from safetensors import safe_open

        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
            weight_map = None
        else:
            raise FileNotFoundError(
                f"no model.safetensors or model.safetensors.index.json in {self.dir}; "
                "pass a HF checkpoint directory saved with safe_serialization"
            )
        self._handles = {f: safe_open(str(self.dir / f), framework="pt") for f in files}
        if weight_map is None:
            weight_map = {k: files[0] for k in self._handles[files[0]].keys()}  # noqa: SIM118
        self._map = weight_map

    def keys(self) -> list[str]:
        return list(self._map)

    def __contains__(self, name: str) -> bool:
        return name in self._map

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._map:
            raise ConversionError(f"tensor {name!r} is missing from the checkpoint in {self.dir}")
        return self._handles[self._map[name]].get_tensor(name)


@torch.no_grad()
def load_hf_into_model(
    model: torch.nn.Module,
    spec: ModelSpec,
    hf,
    tp_rank: int,
    tp: int,
    layers: range,
    pre_process: bool,
    post_process: bool,
    experts: range | None = None,
) -> None:
    """Copy HF weights into this rank's Megatron stage (and expert-parallel share ``experts``, global indices;
    default all); strict about names and shapes."""
    targets = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")}
    filled: set[str] = set()
    experts = range(spec.num_experts) if experts is None else experts
    for name, full in hf_to_megatron(spec, hf, layers, pre_process, post_process, experts):
        lname = local_name(name, layers.start, experts.start)
        if lname not in targets and te_name(lname) in targets:
            lname = te_name(lname)
        if lname not in targets:
            if name == "output_layer.weight" and spec.tie_word_embeddings:
                continue  # PP=1 with tied embeddings: the output layer reuses the embedding parameter
            raise ConversionError(f"Megatron model has no tensor {lname!r} (from HF weights)")
        value = shard(name, full, spec, tp_rank, tp)
        target = targets[lname]
        if tuple(target.shape) != tuple(value.shape):
            raise ConversionError(
                f"{lname}: checkpoint shard has shape {tuple(value.shape)}, model expects {tuple(target.shape)}"
            )
        target.data.copy_(value.to(dtype=target.dtype))
        filled.add(lname)
    missing = sorted(set(targets) - filled)
    if missing:
        raise ConversionError(f"HF checkpoint left Megatron tensors unfilled: {', '.join(missing[:5])}")


def save_hf_checkpoint(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: str | Path,
    source_dir: str | Path,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model.safetensors`` + the source checkpoint's non-weight files (config, tokenizer) to ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in named_tensors:
        t = tensor.detach().to("cpu")
        tensors[name] = (t.to(dtype) if dtype is not None else t).contiguous()
    source = Path(source_dir)
    for item in source.iterdir():
        if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(item, out / item.name)
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "model.safetensors")  # atomic: a reader never sees a half-written file
    stale_index = out / "model.safetensors.index.json"
    if stale_index.exists():
        stale_index.unlink()
    return out
