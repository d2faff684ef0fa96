"""Megatron-core (portable_rl's training actor) vs Hugging Face transformers: forward+backward time, tokens/s, MFU.

Same weights, same samples, same loss (a policy-gradient loss on response-token log-probs computed by
portable_rl.training.logprobs), on the current platform with one rank. For each model it times, median of
``--iters`` iterations after one warm-up:

* ``megatron padded``: micro-batches of ``--micro-batch-size`` samples padded to one length;
* ``megatron packed``: the same samples packed end to end into micro-batches of at most ``--max-tokens`` tokens
  (``train.max_tokens_per_micro_batch``; with one ``--samples`` sample of ``--max-tokens`` tokens this is the
  long-response case);
* ``hf padded``: transformers (its SDPA attention) on the padded micro-batches.

The trainer's attention is the platform's choice (``--attention`` overrides; ``doctor`` prints it), the dtype is
``--dtype`` (``auto``: the platform's training dtype). ``ratio`` is time / HF time (below 1 = faster than HF).
``MFU`` is model FLOPs / time / the platform's dense peak (``Platform.peak_flops``; "n/a" where unknown, e.g. CPU).
Model FLOPs of fwd+bwd: ``6 * matmul parameters * tokens + 6 * layers * q_width * sum(len^2) / 2 * 2`` —
the matmuls (lm head included, embedding lookup excluded) and causal attention (half the ``len x len`` scores).
A Megatron run that fails (e.g. out of memory) prints its error in the row instead of a time.

    python benchmarks/bench_megatron_vs_hf.py                          # tiny Llama, seconds on CPU
    python benchmarks/bench_megatron_vs_hf.py --models tiny,smollm --samples 32 --prompt-len 64 \\
        --response-len 448 --micro-batch-size 16 --max-tokens 8192      # SmolLM2-135M shape, 32x512 tokens
    python benchmarks/bench_megatron_vs_hf.py --models qwen1.5b --samples 4 --prompt-len 64 \\
        --response-len 8128 --micro-batch-size 1 --max-tokens 8192 --iters 3   # Qwen2.5-1.5B shape, 8k packs
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from portable_rl.models.tiny import TinySpec, build_tiny_checkpoint
from portable_rl.platform import current_platform
from portable_rl.training.actor import ActorConfig, MegatronActor
from portable_rl.training.batch import TrainBatch, to_micro_batch
from portable_rl.training.logprobs import response_view, token_logprobs_and_entropy
from portable_rl.training.model_builder import ModelSpec

# Shapes only (random init): the timing depends on the shape, not the weights. One row per model, columns as in
# _SHAPE_FIELDS (HF config names).
_SHAPE_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "tie_word_embeddings",
    "rms_norm_eps",
    "rope_theta",
)
SHAPES = {
    name: dict(zip(_SHAPE_FIELDS, row, strict=True))
    for name, row in {
        "smollm": ("llama", 49152, 576, 1536, 30, 9, 3, 8192, True, 1e-5, 100000.0),  # SmolLM2-135M
        "qwen1.5b": ("qwen2", 151936, 1536, 8960, 28, 12, 2, 32768, True, 1e-6, 1000000.0),  # Qwen2.5-1.5B
    }.items()
}


def loss_fn(logp: torch.Tensor, entropy: torch.Tensor, mb: dict) -> tuple[torch.Tensor, dict]:
    mask = mb["loss_mask"]
    per_sample = (logp * mb["advantages"] * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return -per_sample.mean(), {}


def make_batch(vocab: int, samples: int, prompt_len: int, response_len: int) -> TrainBatch:
    g = torch.Generator().manual_seed(0)
    return TrainBatch(
        prompt_tokens=[torch.randint(0, vocab, (prompt_len,), generator=g).tolist() for _ in range(samples)],
        response_tokens=[
            torch.randint(0, vocab, (response_len,), generator=g).tolist() for _ in range(samples)
        ],
        loss_masks=[[1] * response_len for _ in range(samples)],
        token_fields={"advantages": [[1.0 if i % 2 else -1.0] * response_len for i in range(samples)]},
    )


def build_shaped(name: str, out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(SHAPES[name])
    config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    return out


def model_flops(spec: ModelSpec, batch: TrainBatch) -> float:
    """fwd+bwd FLOPs: 6 x matmul parameters x tokens + causal attention (see the module docstring)."""
    h, q_width, kv_width = (
        spec.hidden_size,
        spec.num_attention_heads * spec.head_dim,
        spec.num_kv_heads * spec.head_dim,
    )
    per_layer = h * (q_width + 2 * kv_width) + q_width * h + 3 * h * spec.intermediate_size
    matmul_params = spec.num_layers * per_layer + spec.vocab_size * h
    lengths = [len(p) + len(r) for p, r in zip(batch.prompt_tokens, batch.response_tokens, strict=True)]
    attention = 6 * spec.num_layers * q_width * sum(n * n for n in lengths)  # 12 * ... * n^2 / 2 (causal)
    return 6.0 * matmul_params * sum(lengths) + attention


def timed(fn, iters: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        current_platform().synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hf_fwd_bwd(model, batch: TrainBatch, device, micro_batch_size: int):
    vocab = model.config.vocab_size

    def run():
        model.zero_grad(set_to_none=True)
        chunks = batch.micro_batches(micro_batch_size)
        for chunk in chunks:
            mb = to_micro_batch(chunk, chunk.max_length(), device)
            logits = model(input_ids=mb.tokens).logits
            logp, ent = token_logprobs_and_entropy(logits[:, :-1], mb.tokens[:, 1:], vocab)
            logp = response_view(logp, mb.prompt_lengths, mb.response_lengths)
            ent = response_view(ent, mb.prompt_lengths, mb.response_lengths)
            loss, _ = loss_fn(logp, ent, mb.as_loss_batch())
            (loss * len(chunk) / len(batch)).backward()

    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def megatron_time(
    ckpt: Path, batch: TrainBatch, args, holder: list, **extra
) -> tuple[float | str, MegatronActor | None]:
    config = ActorConfig(
        hf_checkpoint=str(ckpt),
        micro_batch_size=args.micro_batch_size,
        seq_length_multiple=1,
        dtype=args.dtype,
        attention=args.attention,
        **extra,
    )
    if holder:  # one process group per process: the next actor reuses it
        holder[0].ps.destroy_model_parallel()
        holder.clear()
    try:
        actor = MegatronActor(config, 0, 1, "127.0.0.1", free_port())
        holder.append(actor)
        return timed(lambda: actor.forward_backward(batch, loss_fn), args.iters), actor
    except (RuntimeError, MemoryError) as exc:  # out of memory is the finding, not a crash of the benchmark
        return f"failed: {str(exc).splitlines()[0][:60]}", None


def bench(model: str, ckpt: Path, batch: TrainBatch, args, holder: list) -> list[tuple]:
    from transformers import AutoModelForCausalLM

    platform = current_platform()
    spec = ModelSpec.from_hf(ckpt)
    flops = model_flops(spec, batch)
    tokens = batch.num_tokens()
    shape = f"{len(batch)}x{batch.max_length()}"
    rows = []
    padded, actor = megatron_time(ckpt, batch, args, holder)
    attention = holder[0].kernels.attention if holder else args.attention
    dtype = holder[0].dtype if holder else None
    rows.append(
        (model, shape, f"megatron padded mbs {args.micro_batch_size} ({attention})", tokens, flops, padded)
    )
    if attention == "local":
        packed = "n/a: attention=local (Megatron's unfused attention) cannot take packed sequences"
    else:
        packed, _ = megatron_time(ckpt, batch, args, holder, max_tokens_per_micro_batch=args.max_tokens)
    rows.append((model, shape, f"megatron packed {args.max_tokens} tok ({attention})", tokens, flops, packed))
    if dtype is None:
        dtype = torch.bfloat16 if platform.default_train_dtype == "bfloat16" else torch.float32
    device = platform.torch_device(0)
    hf_model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device)
    hf_model.train()
    try:
        hf = timed(hf_fwd_bwd(hf_model, batch, device, args.micro_batch_size), args.iters)
    except (RuntimeError, MemoryError) as exc:
        hf = f"failed: {str(exc).splitlines()[0][:60]}"
    rows.append((model, shape, f"hf padded mbs {args.micro_batch_size} (sdpa)", tokens, flops, hf))
    del hf_model
    return [(*r, hf, str(dtype).removeprefix("torch.")) for r in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny", help="comma list of: tiny, smollm, qwen1.5b")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--response-len", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=512, help="token budget of a packed micro-batch")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--attention", default="auto", help="auto | transformer_engine | sdpa | local")
    args = parser.parse_args(argv)
    platform = current_platform()
    rows, holder = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            if model == "tiny":
                ckpt = build_tiny_checkpoint(Path(tmp) / "tiny", TinySpec(arch="llama"))
            elif model in SHAPES:
                ckpt = build_shaped(model, Path(tmp) / model)
            else:
                parser.error(f"unknown model {model!r}; choose from tiny, {', '.join(SHAPES)}")
            vocab = ModelSpec.from_hf(ckpt).vocab_size
            batch = make_batch(vocab, args.samples, args.prompt_len, args.response_len)
            rows += bench(model, ckpt, batch, args, holder)
    if holder:
        holder[0].shutdown()
    print(
        f"platform: {platform.name} ({', '.join(d.name for d in platform.devices) or 'no accelerator'}), "
        f"torch threads: {torch.get_num_threads()}, median of {args.iters}"
    )
    header = (
        f"{'model':<9} {'batch':>9} {'path':<44} {'dtype':>8} {'fwd+bwd s':>10} {'tok/s':>9} "
        f"{'ratio':>6} {'MFU':>6}"
    )
    print(header)
    print("-" * len(header))
    for model, shape, path, tokens, flops, secs, hf, dtype in rows:
        if isinstance(secs, str):
            print(f"{model:<9} {shape:>9} {path:<44} {dtype:>8} {secs}")
            continue
        peak = platform.peak_flops("bf16" if dtype == "bfloat16" else "fp32")
        mfu = f"{flops / secs / peak:.1%}" if peak else "n/a"
        ratio = f"{secs / hf:.2f}" if isinstance(hf, float) else "n/a"
        print(
            f"{model:<9} {shape:>9} {path:<44} {dtype:>8} {secs:>10.4f} {tokens / secs:>9.0f} {ratio:>6} {mfu:>6}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
