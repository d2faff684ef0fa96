"""Worker side of test_megatron_parallel: runs MegatronActor jobs on spawned gloo ranks and saves the results.

Each rank runs the same list of jobs (one parallel layout each) and writes ``rank{r}.pt``; rank 0's file holds
what the test compares (logits, log-probs, per-step metrics, gathered HF weights, resume checks).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from portable_rl.training.actor import ActorConfig, MegatronActor, OptimConfig, ParallelConfig

LR = 1e-3
ENTROPY_COEF = 0.01


def pg_loss(logp: torch.Tensor, entropy: torch.Tensor, mb: dict[str, Any]):
    """A simple policy-gradient loss with an entropy bonus (the real ones live in portable_rl.algo)."""
    mask = mb["loss_mask"]
    tokens = mask.sum().clamp(min=1.0)
    loss = -(logp * mb["advantages"] * mask).sum() / tokens - ENTROPY_COEF * (entropy * mask).sum() / tokens
    return loss, {"mean_logp": ((logp * mask).sum() / tokens).detach()}


def pg_loss_global_sum(logp: torch.Tensor, entropy: torch.Tensor, mb: dict[str, Any]):
    """``pg_loss`` written as a contribution to a global sum (``loss_scaling="global_sum"``).

    With micro-batches of one sample, summing this over the whole batch gives the same objective as
    ``pg_loss`` under the default sample-share weighting, so both conventions must train identically.
    """
    loss, metrics = pg_loss(logp, entropy, mb)
    return loss * mb["loss_mask"].shape[0] / mb["global_num_samples"], metrics


def pg_loss_per_sample(logp: torch.Tensor, entropy: torch.Tensor, mb: dict[str, Any]):
    """``pg_loss`` per sample, averaged over the micro-batch's samples: the same objective at any micro-batching.

    Under the default sample-share weighting a step minimises the batch's sample mean of each sample's
    token-mean loss, so packed micro-batches (several samples each) train exactly like micro-batches of one.
    """
    mask = mb["loss_mask"]
    tokens = mask.sum(1).clamp(min=1.0)
    per_sample = (
        -(logp * mb["advantages"] * mask).sum(1) / tokens - ENTROPY_COEF * (entropy * mask).sum(1) / tokens
    )
    return per_sample.mean(), {"mean_logp": ((logp * mask).sum(1) / tokens).mean().detach()}


def _full_logits(actor: MegatronActor, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = actor.model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)
    group = actor.ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(out) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, out.contiguous(), group=group)
    return torch.cat(parts, dim=-1)[..., : actor.spec.vocab_size]


def _weights(actor: MegatronActor) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in actor.named_hf_weights(all_stages=True)}


def _make(job: dict[str, Any], rank: int, world: int, port: int) -> MegatronActor:
    config = ActorConfig(
        hf_checkpoint=job["ckpt"],
        parallel=ParallelConfig(job["tp"], job["pp"], distributed_optimizer=job.get("distopt", False)),
        optim=OptimConfig(lr=LR, clip_grad=1.0),
        micro_batch_size=1,
        loss_scaling=job.get("loss_scaling", "sample_share"),
        max_tokens_per_micro_batch=job.get("budget"),
    )
    return MegatronActor(config, rank, world, "127.0.0.1", port)


def run_job(job: dict[str, Any], rank: int, world: int, port: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    actor = _make(job, rank, world, port)
    batch = job["batch"]
    loss_fn = pg_loss_global_sum if job.get("loss_scaling") == "global_sum" else pg_loss
    if job.get("budget"):
        loss_fn = pg_loss_per_sample
    out["core_attention"] = type(actor.model.decoder.layers[0].self_attention.core_attention).__name__
    if job["pp"] == 1:
        out["logits"] = _full_logits(actor, job["tokens"])
    out["logprobs"] = actor.compute_logprobs(batch)
    if job.get("export_initial"):
        actor.export_hf(job["export_initial"])
    out["metrics"] = [actor.train_step(batch, loss_fn) for _ in range(job["steps"])]
    out["logprobs_after"] = actor.compute_logprobs(batch)
    if job.get("export"):
        actor.export_hf(job["export"])
    if job.get("resume"):
        actor.save_checkpoint(job["resume"])
        out["continued"] = actor.train_step(batch, pg_loss)
        out["continued_weights"] = _weights(actor)
        fresh = _make(job, rank, world, port)
        out["restored_step"] = fresh.load_checkpoint(job["resume"])
        out["resumed"] = fresh.train_step(batch, pg_loss)
        out["resumed_weights"] = _weights(fresh)
    actor.ps.destroy_model_parallel()  # the next job may use another layout on the same process group
    return out


def run_jobs(rank: int, world: int, port: int, jobs: list[dict[str, Any]], out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results = {job["name"]: run_job(job, rank, world, port) for job in jobs}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()
