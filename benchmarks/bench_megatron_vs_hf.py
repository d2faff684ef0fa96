"""Megatron-core (portable_rl's training actor) vs Hugging Face transformers: forward+backward time.

Same weights, same token batch, same loss (a policy-gradient loss on response-token log-probs computed by
portable_rl.training.logprobs), on the current platform with one rank. Prints one table with the median of
``--iters`` timed iterations after one warm-up, and the ratio Megatron / HF (below 1 = Megatron faster).

    python benchmarks/bench_megatron_vs_hf.py                # tiny Llama + a SmolLM2-135M-shaped model
    python benchmarks/bench_megatron_vs_hf.py --models tiny  # tiny only (seconds)
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

# SmolLM2-135M's shape (random init: only the shape matters for timing).
SMOLLM_SHAPE = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
)


def loss_fn(logp: torch.Tensor, entropy: torch.Tensor, mb: dict) -> tuple[torch.Tensor, dict]:
    mask = mb["loss_mask"]
    return -(logp * mb["advantages"] * mask).sum() / mask.sum().clamp(min=1.0), {}


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


def build_smollm_shaped(out: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SMOLLM_SHAPE, dtype="float32")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    return out


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
            mb = to_micro_batch(
                chunk,
                max(len(p) + len(r) for p, r in zip(chunk.prompt_tokens, chunk.response_tokens, strict=True)),
                device,
            )
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


def bench(name: str, ckpt: Path, batch: TrainBatch, iters: int, micro_batch_size: int, actor_holder: list):
    from transformers import AutoModelForCausalLM

    platform = current_platform()
    device = platform.torch_device(0)
    config = ActorConfig(hf_checkpoint=str(ckpt), micro_batch_size=micro_batch_size, seq_length_multiple=1)
    if actor_holder:  # one process group per process: later models reuse it
        actor_holder[0].ps.destroy_model_parallel()
    actor = MegatronActor(config, 0, 1, "127.0.0.1", free_port())
    actor_holder[:] = [actor]
    meg = timed(lambda: actor.forward_backward(batch, loss_fn), iters)
    hf_model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=actor.tconfig.params_dtype).to(device)
    hf_model.train()
    hf = timed(hf_fwd_bwd(hf_model, batch, device, micro_batch_size), iters)
    tokens = sum(len(p) + len(r) for p, r in zip(batch.prompt_tokens, batch.response_tokens, strict=True))
    return name, tokens, meg, hf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm", help="comma list of: tiny, smollm")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--response-len", type=int, default=96)
    args = parser.parse_args(argv)
    rows, holder = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            if model == "tiny":
                ckpt = build_tiny_checkpoint(Path(tmp) / "tiny", TinySpec(arch="llama"))
                vocab = 400
            elif model == "smollm":
                ckpt = build_smollm_shaped(Path(tmp) / "smollm")
                vocab = SMOLLM_SHAPE["vocab_size"]
            else:
                parser.error(f"unknown model {model!r}; choose from tiny, smollm")
            batch = make_batch(vocab, args.samples, args.prompt_len, args.response_len)
            label = f"{model} ({args.samples}x{args.prompt_len + args.response_len} tok, mbs {args.micro_batch_size})"
            rows.append(bench(label, ckpt, batch, args.iters, args.micro_batch_size, holder))
    if holder:
        holder[0].shutdown()
    print(
        f"platform: {current_platform().name}, torch threads: {torch.get_num_threads()}, median of {args.iters}"
    )
    header = f"{'model':<40} {'tokens':>7} {'megatron fwd+bwd s':>19} {'hf fwd+bwd s':>13} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for name, tokens, meg, hf in rows:
        print(f"{name:<40} {tokens:>7} {meg:>19.4f} {hf:>13.4f} {meg / hf:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
