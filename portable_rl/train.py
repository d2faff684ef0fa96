"""The training loop, top to bottom: generate -> train -> sync weights -> eval -> save.

``train(recipe, run_dir, resume)`` runs ``recipe.run.steps`` steps and returns the per-step metrics.
Synchronous by default; with ``run.async_rollout`` (disaggregated mode only) the rollout of step n+1 runs on
the engines while the trainer trains step n — its samples come from weights one step older, and the weight
sync of step n waits until that rollout has finished, so engines never change weights mid-generation. With
``rollout.partial_rollout`` too, the sync does not wait: it cuts that rollout (its requests aborted, their
tokens kept), syncs, and lets it go on, so its cut samples finish under the new weights.

Resume: the checkpoint of step k holds the trainer (model, optimizer, RNG, step) and the data state (prompt
offset/epoch, buffer); rollout sampling seeds derive from (run seed, step, prompt, sample), so steps k+1..
repeat exactly what an uninterrupted run does.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from portable_rl.metrics import MetricsLogger
from portable_rl.orchestration.job import Job
from portable_rl.recipe import Recipe
from portable_rl.rollout_to_train import rollout_metrics
from portable_rl.run_dir import RunDir


def train(recipe: Recipe, run_dir: RunDir, resume: bool = False) -> list[dict[str, Any]]:
    cfg = recipe.run
    # Log records (warnings, errors) print above the progress bar instead of into it.
    with Job(recipe, run_dir) as job, logging_redirect_tqdm():
        start = job.restore_last_checkpoint() if resume else 0
        logger = MetricsLogger(
            run_dir.path, resume_after_step=start if resume else None, wandb_project=cfg.wandb_project
        )
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout")
        pending: Future | None = None
        history: list[dict[str, Any]] = []
        bar = tqdm(range(start + 1, cfg.steps + 1), desc="train", unit="step", initial=start, total=cfg.steps)
        for step in bar:
            t_step = time.perf_counter()

            # 1. Generate: this step's groups (already running if the previous step started them).
            t0 = time.perf_counter()
            groups, gen_metrics = pending.result() if pending is not None else job.rollout(step)
            t_gen = time.perf_counter() - t0
            pending = None
            if cfg.async_rollout and step < cfg.steps:
                pending = pool.submit(job.rollout, step + 1)

            # 2. Train: in the trainer, advantages (reference log-probs, critic values where the algo needs them),
            #    then algo.ppo_epochs x algo.num_mini_batches optimizer steps (one by default); PPO's critic too.
            t0 = time.perf_counter()
            train_metrics = job.train(groups)
            t_train = time.perf_counter() - t0

            # 3. Sync: engines get the new weights after an in-flight async rollout has drained — or, with
            # partial rollouts, has been cut: its cut samples then continue under the new weights.
            cut = pending is not None and recipe.rollout.partial_rollout
            if cut:
                job.cut_rollout(pending)
            elif pending is not None:
                pending = _done(pending.result())
            t0 = time.perf_counter()
            sync_metrics = job.sync_weights(version=step)
            t_sync = time.perf_counter() - t0
            if cut:
                job.resume_rollout()

            metrics = {
                **rollout_metrics(groups),
                **gen_metrics,
                **train_metrics,
                **sync_metrics,
                "time_generate_s": t_gen,
                "time_train_s": t_train,
                "time_sync_s": t_sync,
            }

            # 4. Eval and save on their cadence.
            if cfg.eval_every and step % cfg.eval_every == 0:
                metrics.update(job.evaluate())
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                job.save_checkpoint(step)

            metrics["time_step_s"] = time.perf_counter() - t_step
            metrics["tokens_per_s"] = metrics.get("num_response_tokens", 0.0) / max(
                metrics["time_step_s"], 1e-9
            )
            logger.log(step, metrics)
            logger.log_rollout(step, groups)
            history.append({"step": step, **metrics})
            bar.set_postfix(
                reward=f"{metrics['reward_mean']:.3f}",
                loss=f"{metrics.get('loss', float('nan')):.4f}",
                tok_s=f"{metrics['tokens_per_s']:.0f}",
            )
        bar.close()
        pool.shutdown()
        logger.close()
        job.export_final_model()
    (run_dir.path / "summary.json").write_text(json.dumps(_summary(history), indent=2), encoding="utf-8")
    return history


def _done(rollout: Any) -> Future:
    """A completed future holding ``rollout`` (the drained async rollout for the next step)."""
    fut: Future = Future()
    fut.set_result(rollout)
    return fut


def _summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    if not history:
        return {}
    k = max(1, len(history) // 3)
    first = [h["reward_mean"] for h in history[:k]]
    last = [h["reward_mean"] for h in history[-k:]]
    return {
        "steps": len(history),
        "reward_first_steps_mean": sum(first) / len(first),
        "reward_last_steps_mean": sum(last) / len(last),
        "step_time_median_s": sorted(h["time_step_s"] for h in history)[len(history) // 2],
    }
