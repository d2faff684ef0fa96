"""Worker side of test_megatron_moe_rope: MegatronActor jobs (MoE at EP1/EP2, rope-scaled dense models) on
spawned gloo ranks; rank 0 saves what the test compares (logits, log-probs, step metrics, HF weights)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from portable_rl.training.actor import ActorConfig, MegatronActor, OptimConfig, ParallelConfig

LR = 1e-3


def nll_loss(logp: torch.Tensor, entropy: torch.Tensor, mb: dict[str, Any]):
    mask = mb["loss_mask"]
    return -(logp * mask).sum() / mask.sum().clamp(min=1.0), {}


def run_job(job: dict[str, Any], rank: int, world: int, port: int) -> dict[str, Any]:
    config = ActorConfig(
        hf_checkpoint=job["ckpt"],
        parallel=ParallelConfig(pipeline_parallel=job.get("pp", 1), expert_parallel=job.get("ep", 1)),
        optim=OptimConfig(lr=LR, clip_grad=1.0),
        micro_batch_size=1,
    )
    actor = MegatronActor(config, rank, world, "127.0.0.1", port)
    out: dict[str, Any] = {}
    tokens = job["tokens"]
    if job.get("pp", 1) == 1:
        with torch.no_grad():
            actor.model.eval()
            logits = actor.model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)
        out["logits"] = logits[..., : actor.spec.vocab_size].clone()
    out["logprobs"] = actor.compute_logprobs(job["batch"])
    out["metrics"] = [actor.train_step(job["batch"], nll_loss) for _ in range(job.get("steps", 0))]
    out["weights"] = {name: t.clone() for name, t in actor.named_hf_weights(all_stages=True)}
    if job.get("export"):
        actor.export_hf(job["export"])
    if job.get("resume"):  # save, step on; a fresh actor loads the checkpoint and must take the same step
        actor.save_checkpoint(job["resume"])
        out["continued"] = actor.train_step(job["batch"], nll_loss)
        out["continued_weights"] = {name: t.clone() for name, t in actor.named_hf_weights(all_stages=True)}
        fresh = MegatronActor(config, rank, world, "127.0.0.1", port)
        fresh.load_checkpoint(job["resume"])
        out["resumed"] = fresh.train_step(job["batch"], nll_loss)
        out["resumed_weights"] = {name: t.clone() for name, t in fresh.named_hf_weights(all_stages=True)}
    actor.ps.destroy_model_parallel()
    return out


def run_jobs(rank: int, world: int, port: int, jobs: list[dict[str, Any]], out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results = {job["name"]: run_job(job, rank, world, port) for job in jobs}
    if rank == 0:
        torch.save(results, Path(out_dir) / "results.pt")
    dist.destroy_process_group()
