"""``train.share_prompt_prefix`` off vs on: one GRPO-shaped trainer step and one log-prob pass, same actor.

A GRPO batch is ``--prompts`` prompts x ``--group`` samples each (``--prompt-len`` prompt tokens, responses of
``--response-len`` tokens), cut into micro-batches of ``--micro-batch-size`` samples (padded), as the trainer
does for examples/smollm2_arithmetic_cpu.yaml. One ``MegatronActor`` (SmolLM2-135M's shape, random weights:
time depends on the shape only) runs ``train_step`` (forward + backward + optimizer step) and
``compute_logprobs``, alternating sharing off and on every iteration (the actor's config switch: the same
weights and process either way) so that a shared box's load hits both alike; medians of ``--iters`` after one
warm-up of each. ``logp max |diff|`` is the largest log-prob difference between the two layouts on the same
weights (float rounding only).

    python benchmarks/bench_share_prompt.py                 # SmolLM2-135M shape, 2 x 4 samples of 68 + 32 tokens
    python benchmarks/bench_share_prompt.py --model tiny    # seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_megatron_vs_hf import build_shaped, free_port  # noqa: E402

from portable_rl.models.tiny import TinySpec, build_tiny_checkpoint  # noqa: E402
from portable_rl.training.actor import ActorConfig, MegatronActor  # noqa: E402
from portable_rl.training.batch import TrainBatch  # noqa: E402


def grpo_batch(vocab: int, prompts: int, group: int, prompt_len: int, response_len: int) -> TrainBatch:
    g = torch.Generator().manual_seed(0)
    prompt_tokens, responses, advantages = [], [], []
    for _ in range(prompts):
        prompt = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
        for j in range(group):
            prompt_tokens.append(prompt)
            responses.append(torch.randint(3, vocab, (response_len,), generator=g).tolist())
            advantages.append([1.0 if j % 2 else -1.0] * response_len)
    return TrainBatch(
        prompt_tokens, responses, [[1] * len(r) for r in responses], token_fields={"advantages": advantages}
    )


def loss_fn(logp: torch.Tensor, entropy: torch.Tensor, mb: dict) -> tuple[torch.Tensor, dict]:
    mask = mb["loss_mask"]
    per_sample = (logp * mb["advantages"] * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return -per_sample.mean(), {}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=("smollm", "tiny"), default="smollm")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=68)
    parser.add_argument("--response-len", type=int, default=32)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "tiny":
            ckpt = build_tiny_checkpoint(Path(tmp) / "tiny", TinySpec(arch="llama"))
        else:
            ckpt = build_shaped("smollm", Path(tmp) / "smollm")
        config = ActorConfig(
            hf_checkpoint=str(ckpt), micro_batch_size=args.micro_batch_size, attention="sdpa"
        )
        actor = MegatronActor(config, 0, 1, "127.0.0.1", free_port())
        batch = grpo_batch(
            actor.spec.vocab_size, args.prompts, args.group, args.prompt_len, args.response_len
        )
        times: dict[tuple[str, bool], list[float]] = {}
        logps: dict[bool, list[list[float]]] = {}
        for it in range(args.iters + 1):
            for share in (False, True):
                actor.config.share_prompt_prefix = share
                start = time.perf_counter()
                actor.train_step(batch, loss_fn)
                mid = time.perf_counter()
                logps[share] = actor.compute_logprobs(batch)
                end = time.perf_counter()
                if it:  # the first round warms up
                    times.setdefault(("train_step", share), []).append(mid - start)
                    times.setdefault(("compute_logprobs", share), []).append(end - mid)
        # Each logp pass above ran after a different number of optimizer steps; compare on one set of weights.
        actor.config.share_prompt_prefix = False
        off = actor.compute_logprobs(batch)
        actor.config.share_prompt_prefix = True
        on = actor.compute_logprobs(batch)
        diff = max(abs(a - b) for x, y in zip(off, on, strict=True) for a, b in zip(x, y, strict=True))
        tokens = batch.num_tokens()
        shared_tokens = sum(
            p.num_tokens(share_prompts=True) for p in batch.micro_batches(args.micro_batch_size)
        )
        print(
            f"model {args.model}, {args.prompts} prompts x {args.group} samples, {args.prompt_len} + "
            f"{args.response_len} tokens, micro_batch_size {args.micro_batch_size}, torch threads "
            f"{torch.get_num_threads()}, {args.iters} iterations (medians)"
        )
        print(f"tokens per step: {tokens} unshared, {shared_tokens} shared; logp max |diff| {diff:.2e}")
        print(f"{'':18}{'off (s)':>10}{'on (s)':>10}{'speed-up':>10}")
        for what in ("train_step", "compute_logprobs"):
            a, b = statistics.median(times[(what, False)]), statistics.median(times[(what, True)])
            print(f"{what:18}{a:10.3f}{b:10.3f}{a / b:9.2f}x")
        for what in ("train_step", "compute_logprobs"):
            off, on = ([round(t, 2) for t in times[(what, share)]] for share in (False, True))
            print(f"{what} per iteration (s): off {off}, on {on}")
        actor.shutdown()


if __name__ == "__main__":
    main()
