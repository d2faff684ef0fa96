"""The one rollout engine a conformance run starts, and the samples it draws at the checkpoint's weights.

Shared by the engine checks (``conformance.engine``) and the trainer spawn (``conformance.trainer``, which
scores these samples for ``rollout.engine_vs_trainer_logprobs``); it imports neither, so they do not import
each other in a circle. ``running_engine(ctx)`` starts the engine once per Context (memoized) with
portable_rl's launcher (``kind="auto"``) on the tiny Llama checkpoint and samples two responses (temperature
1, ``NEW_TOKENS`` tokens, log-probs returned) before any weight-sync check changes its weights.
"""

from __future__ import annotations

import asyncio
from typing import Any

from portable_rl.conformance.registry import Context

ENGINE_MODULES = ("portable_rl.rollout.engines.launcher", "portable_rl.protocol.client")
NEW_TOKENS = 24
PROMPT_LEN = 6


def engine_prompts(vocab_size: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(5)
    return torch.randint(3, vocab_size, (2, PROMPT_LEN), generator=gen).tolist()


async def _sample(url: str, prompts: list[list[int]]) -> list[dict[str, Any]]:
    from portable_rl.protocol.client import EngineClient

    params = {"max_new_tokens": NEW_TOKENS, "temperature": 1.0, "ignore_eos": True}
    async with EngineClient(url, timeout_s=300) as client:
        outs = await asyncio.gather(*(client.generate(p, params, return_logprob=True) for p in prompts))
    return [
        {"prompt": p, "response": o.output_ids, "logprobs": o.output_logprobs}
        for p, o in zip(prompts, outs, strict=True)
    ]


def start_engine(ctx: Context) -> dict[str, Any]:
    """Launch the engine, sample from it at the checkpoint's weights, and register its shutdown."""
    import json

    from portable_rl.rollout.engines.launcher import EngineSpec, launch_engine

    ckpt = ctx.tiny_checkpoint("llama")
    devices = [0] if ctx.platform.devices else []
    engine = launch_engine(
        EngineSpec(model_path=str(ckpt), kind="auto", devices=devices, startup_timeout_s=600), ctx.platform
    )
    ctx.finalizers.append(engine.stop)
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    samples = asyncio.run(_sample(engine.url, engine_prompts(vocab)))
    return {"engine": engine, "url": engine.url, "kind": engine.kind, "samples": samples}


def running_engine(ctx: Context) -> dict[str, Any]:
    """The engine of this run (started on first use; one per Context)."""
    import portable_rl.conformance.engine_fixture as this  # through the module: meta-tests patch start_engine

    return ctx.memo("engine", lambda: this.start_engine(ctx))


def engine_samples(ctx: Context) -> list[dict[str, Any]]:
    """The engine's samples at the checkpoint's weights (starts the engine on first use)."""
    return running_engine(ctx)["samples"]
