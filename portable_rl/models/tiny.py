"""Tiny random-init HF checkpoints (Llama / Qwen2 / Qwen3 / Qwen2-MoE / Qwen3-MoE) with an in-process BPE tokenizer.

``build_tiny_checkpoint(dir, arch)`` writes a directory that transformers, portable_rl's trainer and engines
(and the real SGLang server) load like any hub checkpoint: config.json, model.safetensors, tokenizer files
with a chat template. Deterministic for a given (arch, seed). Nothing is downloaded. The MoE archs have
``num_experts`` experts of width ``moe_intermediate_size``, ``experts_per_token`` routed per token (top-k
renormalised, as Qwen3-30B-A3B); Qwen2-MoE adds its gated shared expert. ``rope_scaling`` (e.g.
``{"rope_type": "llama3", "factor": 8.0, ...}``) is written into the config as transformers reads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "What is 2 + 3? The answer is \\boxed{5}.",
    "Tom has 4 apples and buys 7 more. How many apples does Tom have? \\boxed{11}",
    "Compute 12 - 5. Answer: 7",
    "user assistant system You are a helpful assistant. Think step by step.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - * = ( ) { } \\boxed",
    "The quick brown fox jumps over the lazy dog. A sample, a group, a reward, a policy.",
]


TINY_ARCHS = ("llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe")


@dataclass(frozen=True)
class TinySpec:
    arch: str = "llama"  # one of TINY_ARCHS
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = False
    seed: int = 0
    num_experts: int = 4  # MoE archs only
    experts_per_token: int = 2
    moe_intermediate_size: int = 32
    rope_scaling: dict | None = None

    def __post_init__(self) -> None:
        if self.arch not in TINY_ARCHS:
            raise ValueError(f"tiny arch {self.arch!r} is not one of {', '.join(TINY_ARCHS)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )


def train_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on a fixed corpus (deterministic, ~0.05 s), as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def hf_config(spec: TinySpec, vocab_size: int, eos_id: int, pad_id: int):
    from transformers import LlamaConfig, Qwen2Config, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        rms_norm_eps=1e-6,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    rope = {"rope_type": "default", **(spec.rope_scaling or {}), "rope_theta": 10000.0}
    common["rope_parameters"] = rope
    moe = dict(
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.experts_per_token,
        moe_intermediate_size=spec.moe_intermediate_size,
        norm_topk_prob=True,
        router_aux_loss_coef=0.001,
    )
    head_dim = spec.hidden_size // spec.num_attention_heads
    if spec.arch == "llama":
        return LlamaConfig(**common)
    if spec.arch == "qwen2":
        return Qwen2Config(**common)
    if spec.arch == "qwen2_moe":
        return Qwen2MoeConfig(shared_expert_intermediate_size=spec.intermediate_size, **moe, **common)
    if spec.arch == "qwen3_moe":
        return Qwen3MoeConfig(head_dim=head_dim, **moe, **common)
    return Qwen3Config(head_dim=head_dim, **common)


def build_tiny_checkpoint(out_dir: str | Path, spec: TinySpec | None = None) -> Path:
    """Write a random-init HF checkpoint + tokenizer to ``out_dir`` and return the path."""
    import torch
    from transformers import AutoModelForCausalLM

    spec = spec or TinySpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(spec.vocab_size)
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = hf_config(spec, len(tokenizer), eos_id, pad_id)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init gives near-uniform logits; a wider init makes sampling and RL signal non-trivial.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:  # MoE experts are [experts, out, in] in memory
                param.normal_(0.0, 0.08)
            elif "norm" in name:
                param.fill_(1.0)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "portable_rl_tiny.json").write_text(json.dumps(spec.__dict__, indent=2))
    return out
