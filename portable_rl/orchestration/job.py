"""One training job: Ray, placement, trainer ranks, rollout engines behind the router, data, checkpoints.

``Job(recipe, run_dir)`` is a context manager; entering it starts everything, leaving it stops everything
(also on errors). The training loop (portable_rl/train.py) only calls the methods below, which read the same
on every platform: the platform object decides devices, env and collectives.

Engine failures (see ``EngineGroup``): the trainer group is the engines' weight source, so a replaced engine
is re-synced by ``TrainerGroup.push_weights_to`` — weight sync reconnected to the new engine list (the
broadcast group re-formed with the new engine), then the trainer's current weights pushed under the trainer's
step as version — before it serves. ``sync_weights`` retries once
after replacing engines when an update failed because an engine died. Its metrics carry ``engine_restarts``
and ``prompts_requeued``, both counted over the whole run.

Co-located SGLang engines on a platform with ``memory_saver_supported`` free their KV cache while the trainer
computes (``EngineMemorySaver``): released once before the trainer is built and after every rollout, resumed
before anything generates or weights are pushed.

Debug modes (``run.debug_mode``), so the loop reads the same in every mode:

* ``rollout_only``: no trainer is built. ``train`` and ``sync_weights`` do nothing (the engines keep the initial
  weights), ``save_checkpoint`` records the data position only, there is no final model. Every step's samples
  are saved (``portable_rl.data.saved_rollouts``) under ``RUN_DIR/rollouts/``.
* ``train_only``: no engines are started. ``rollout(step)`` reads ``run.rollout_source``'s step_N.jsonl;
  ``sync_weights`` and ``evaluate`` do nothing. Given the same model, recipe and saved samples, every train step
  is the one the saving run took (the same numbers, bit for bit).
* Both reserve the placement of a normal run (so the trainer gets the same threads and devices) and record in
  ``layout.json`` only the side that ran. ``run.save_rollouts`` saves the samples in a normal run too.

Eval: ``data.eval`` is logged as ``eval_reward_mean``; each of ``data.eval_sets`` as ``eval/<name>/reward_mean``,
``eval/<name>/response_length_mean``, ``eval/<name>/truncated_frac`` and ``eval/<name>/samples``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from concurrent.futures import Future
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from portable_rl.config.weight_sync import resolve_strategy
from portable_rl.data.buffer import DataBuffer
from portable_rl.data.prompts import PromptSource
from portable_rl.data.saved_rollouts import DIR_NAME, read_step, rollouts_dir, write_step
from portable_rl.data.types import Group, SampleStatus
from portable_rl.distributed import NODE_ADDRESS
from portable_rl.orchestration.devices import (
    engine_devices,
    order_trainer_slots,
    probe_bundles,
    trainer_devices,
)
from portable_rl.orchestration.engine_group import EngineGroup
from portable_rl.orchestration.memory_saver import EngineMemorySaver
from portable_rl.orchestration.placement import (
    PlacementConfig,
    compute_threads,
    plan,
    reserve,
    write_layout,
)
from portable_rl.orchestration.trainer_group import TrainerGroup
from portable_rl.platform import current_platform
from portable_rl.recipe import Recipe
from portable_rl.rollout.engines.launcher import NODE_HOST, engine_kind
from portable_rl.rollout_to_train import flatten
from portable_rl.run_dir import RunDir
from portable_rl.training.actor import ActorConfig


def resolve_model(recipe: Recipe, run_dir: RunDir) -> Path:
    """The HF checkpoint directory the recipe names (building the tiny model or the demo model if asked)."""
    m = recipe.model
    if m.path == "tiny":
        from portable_rl.models.tiny import TinySpec, build_tiny_checkpoint

        out = run_dir.path / "model"
        if not (out / "config.json").is_file():
            build_tiny_checkpoint(out, TinySpec(arch=m.tiny_arch, seed=m.tiny_seed))
        return out
    if m.path == "smollm2":
        from portable_rl.models.smollm2 import materialize_smollm2

        return materialize_smollm2()
    return Path(m.path)


class Job:
    def __init__(self, recipe: Recipe, run_dir: RunDir):
        self.recipe = recipe
        self.run_dir = run_dir
        self.platform = current_platform()
        self._started_ray = False
        self._multi_node = False  # joined a cluster: engines and the sync rendezvous use node addresses
        self.trainer: TrainerGroup | None = None
        self.engines: EngineGroup | None = None
        mode = recipe.run.debug_mode
        self.needs_trainer, self.needs_engines = mode != "rollout_only", mode != "train_only"
        self.rollout_source = rollouts_dir(recipe.run.rollout_source) if recipe.run.rollout_source else None

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def __enter__(self) -> Job:
        import ray
        from transformers import AutoConfig, AutoTokenizer

        r = self.recipe
        self.platform.prepare_process_env()
        # Engines and router accept requests only with this run's key (the user's --sglang-api-key, else a
        # fresh one), so another process on the host cannot generate on them or overwrite their weights.
        # Hex, because a key starting with "-" would read as a flag on the router's command line.
        self.api_key = r.rollout.engine_args.get("api_key") or secrets.token_hex(24)
        engines = engine_kind(r.rollout.engine, self.platform)
        self.memory_saver = EngineMemorySaver(self.platform, r.run.mode, engines, self.api_key)
        self.model_dir = resolve_model(r, self.run_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        # Prompts longer than this never reach an engine (which would refuse them beyond its context).
        context = int(getattr(AutoConfig.from_pretrained(self.model_dir), "max_position_embeddings", 0) or 0)
        self.max_prompt_tokens = r.data.max_prompt_tokens or (
            context - r.rollout.max_new_tokens if context else None
        )
        limits = {"max_prompt_tokens": self.max_prompt_tokens, "long_prompts": r.data.long_prompts}
        self.prompts = PromptSource(r.data.train, self.tokenizer, **limits)
        self.buffer = DataBuffer(self.prompts)
        self.eval_prompts = PromptSource(r.data.eval, self.tokenizer, **limits) if r.data.eval else None
        self.eval_sets = [(e, PromptSource(e, self.tokenizer, **limits)) for e in r.data.eval_sets]
        if not ray.is_initialized():
            self.platform.check_ray_compatible()
            if os.environ.get("RAY_ADDRESS"):
                # Joining a cluster started by `portable-rl launch`: resources are the nodes' own.
                from portable_rl.orchestration.cluster import check_live_cluster

                ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
                self._multi_node = True
                check_live_cluster(r.weight_sync.strategy, default_platform=self.platform.name)
            else:
                # A private single-node cluster on loopback: token auth only adds a warning here.
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")
                ray.init(
                    num_cpus=r.run.num_cpus,
                    object_store_memory=256 * 1024**2,
                    include_dashboard=False,
                    log_to_driver=False,
                    runtime_env={
                        "env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "disabled"}
                    },
                )
            self._started_ray = True
        pcfg = PlacementConfig(
            mode=r.run.mode,
            trainer_ranks=r.train.world_size,
            num_engines=r.rollout.num_engines,
            devices_per_engine=r.rollout.engine_tp_size,
            cpus_per_device=float(os.environ.get("PORTABLE_RL_CPUS_PER_DEVICE", "0.5")),
            trainer_resource=r.placement.trainer_resource,
            engine_resource=r.placement.engine_resource,
        )
        self.plan = plan(pcfg, self.platform)
        # Threads from this machine's cores; on a cluster the driver's cores say nothing about the workers'
        # nodes, so Ray's default stays.
        threads = None if self._multi_node else compute_threads(pcfg, r.run.num_cpus or os.cpu_count() or 1)
        trainer_env, engine_env = (
            ({}, {}) if threads is None else tuple(self.platform.compute_threads_env(n) for n in threads)
        )
        try:
            self.pg = reserve(self.plan)
            # Devices as Ray assigned them to the bundles; trainer ranks in (node, device) order.
            self.bundle_devices = found = probe_bundles(self.plan, self.pg, self.platform)
            self.plan = order_trainer_slots(self.plan, found)
            if self.needs_engines:
                self.engines = EngineGroup(
                    replace(r.rollout, engine_args=self.memory_saver.engine_args(r.rollout.engine_args)),
                    self.model_dir,
                    self.plan,
                    self.pg,
                    self.platform,
                    api_key=self.api_key,
                    host=NODE_HOST if self._multi_node else "127.0.0.1",
                    env=engine_env,
                    devices=engine_devices(self.plan, found),
                )
                # Co-located: the trainer is built in the memory the engines' KV cache gives back.
                self.memory_saver.release(self.engines.urls)
            if self.needs_trainer:
                self.trainer = TrainerGroup(
                    self._actor_config(),
                    r.train.world_size,
                    self.plan,
                    self.pg,
                    self.platform,
                    trainer_devices(self.plan, found, self.platform),
                    extra_env=trainer_env,
                    check_weight_update=r.run.check_weight_update,
                )
            if self.trainer is not None and self.engines is not None:
                self.trainer.connect_weight_sync(
                    self.engines.urls, self._weight_sync_config(), r.run.mode, self.api_key
                )
                self.engines.attach_weight_source(self.trainer)
            sync = {
                "strategy": resolve_strategy(r.weight_sync, r.run.mode),
                "backend": self.platform.dist_backend,
            }
            if r.run.debug_mode != "none":
                sync = {"debug_mode": r.run.debug_mode}  # one side only: no weight sync
            layout_path = self.run_dir.path / "layout.json"  # where every rank and engine ran
            ran = replace(  # only the side that runs is recorded
                self.plan,
                trainer=self.plan.trainer if self.trainer is not None else [],
                engines=self.plan.engines if self.engines is not None else [],
            )
            trainer_actors = self.trainer.actors if self.trainer is not None else []
            engine_actors, urls = (
                (self.engines.actors, self.engines.urls) if self.engines is not None else ([], [])
            )
            layout_args = (layout_path, ran, self.pg, trainer_actors, engine_actors)
            layout_kwargs = dict(
                engine_urls=urls, weight_sync=sync, bundle_devices=[asdict(b) for b in found]
            )
            self._write_layout = lambda: write_layout(*layout_args, **layout_kwargs)
            if self.run_dir.last_checkpoint() is None:
                self._write_layout()  # a resumed run rewrites it only once its checkpoint is restored
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _actor_config(self) -> ActorConfig:
        t, r = self.recipe.train, self.recipe
        return ActorConfig(
            hf_checkpoint=str(self.model_dir),
            parallel=t.parallel,
            optim=t.optim,
            micro_batch_size=t.micro_batch_size,
            temperature=r.rollout.temperature,
            seed=t.seed,
            dtype=t.dtype,
            ref_checkpoint=str(self.model_dir) if r.algo.uses_reference else None,
            megatron_overrides=dict(t.megatron_args),
            attention=t.attention,
            max_tokens_per_micro_batch=t.max_tokens_per_micro_batch,
            critic_checkpoint=(t.critic.path or str(self.model_dir)) if r.algo.uses_critic else None,
            critic_optim=t.critic.optim,
            share_prompt_prefix=t.share_prompt_prefix,
        )

    def __exit__(self, *exc: Any) -> None:
        import ray

        if self.engines is not None:
            self.engines.resume()  # a cut rollout waiting in its thread ends (on stopped engines) instead of hanging
        if self.trainer is not None:
            self.trainer.shutdown()
            self.trainer = None
        if self.engines is not None:
            self.engines.shutdown()
            self.engines = None
        if getattr(self, "pg", None) is not None:
            ray.util.remove_placement_group(self.pg)
            self.pg = None
        if self._started_ray:
            ray.shutdown()

    # ---- the loop's verbs ------------------------------------------------------------------------------------
    def rollout(self, step: int) -> tuple[list[Group], dict[str, float]]:
        """Groups for ``step`` (prompts from the buffer, sampled on the engines, rewarded, filtered) and the
        rollout's ``rollout/`` counts; in train_only mode, the saved rollout of ``step``."""
        r = self.recipe
        if self.engines is None:
            return read_step(self.rollout_source, step), {}
        self.memory_saver.resume(self.engines.urls)
        groups, metrics = self.engines.rollout(
            self.buffer, step=step, seed=r.run.seed, tokenizer=self.tokenizer
        )
        self.memory_saver.release(self.engines.urls)  # co-located: the trainer computes next
        metrics["prompts_skipped_too_long"] = float(self.prompts.skipped_too_long)  # over the whole run
        metrics["prompt_lines_too_long"] = float(len(self.prompts.oversized))
        if r.run.save_rollouts:
            write_step(self.run_dir.path / DIR_NAME, step, groups)
        return groups, metrics

    def cut_rollout(self, pending: Future) -> None:
        """Partial rollouts in async mode: cut the rollout ``pending`` runs in its thread (its cut samples keep
        their tokens) and return once no request runs on the engines, or once it finished anyway."""
        self.engines.cut()
        while not (self.engines.paused.wait(0.05) or pending.done()):
            pass

    def resume_rollout(self) -> None:
        """The cut rollout goes on under the weights synced since ``cut_rollout``."""
        self.engines.resume()

    def train(self, groups: list[Group]) -> dict[str, float]:
        """One RL step on ``groups`` in the trainer (advantages, reference log-probs, loss, optimizer)."""
        if self.trainer is None:
            return {}
        return self.trainer.train_rl_step(groups, self.recipe.algo)

    def sync_weights(self, version: int) -> dict[str, float]:
        from portable_rl.weight_sync import CollectiveTimeout, WeightSyncError

        if self.trainer is None or self.engines is None:
            return {}  # a debug mode runs one side only: nothing to sync
        check = self.recipe.run.check_weight_update
        self.memory_saver.resume(self.engines.urls)
        try:
            out = self.trainer.sync_weights(version, check)
        except (WeightSyncError, CollectiveTimeout):  # Ray re-raises the actor's error as this type too
            if not self.engines.heal(probe=True):
                raise  # every engine is healthy: the failure is not an engine's death
            out = self.trainer.sync_weights(version, check)
        return {
            **out,
            "engine_restarts": float(self.engines.restarts),
            "prompts_requeued": float(self.engines.requeued),
        }

    def _weight_sync_config(self):
        """The recipe's weight sync; on a multi-node cluster the rendezvous is the weight source's node address."""
        ws = self.recipe.weight_sync
        if self._multi_node and ws.master_address is None:
            return replace(ws, master_address=NODE_ADDRESS)
        return ws

    def evaluate(self) -> dict[str, float]:
        """``eval_reward_mean`` of ``data.eval`` and ``eval/<name>/...`` of every ``data.eval_sets`` entry."""
        if self.engines is None or (self.eval_prompts is None and not self.eval_sets):
            return {}
        self.memory_saver.resume(self.engines.urls)
        out: dict[str, float] = {}
        if self.eval_prompts is not None:
            samples = self._eval_samples(self.eval_prompts, self.recipe.data.eval_size, {})
            out["eval_reward_mean"] = sum(s.reward for s in samples) / max(len(samples), 1)
        for cfg, source in self.eval_sets:
            sampling = {
                "eval_samples_per_prompt": cfg.samples_per_prompt,
                "eval_temperature": cfg.temperature,
            }
            samples = self._eval_samples(source, cfg.size or self.recipe.data.eval_size, sampling)
            n = max(len(samples), 1)
            out[f"eval/{cfg.name}/reward_mean"] = sum(s.reward for s in samples) / n
            out[f"eval/{cfg.name}/response_length_mean"] = sum(s.response_length for s in samples) / n
            out[f"eval/{cfg.name}/truncated_frac"] = (
                sum(s.status == SampleStatus.TRUNCATED for s in samples) / n
            )
            out[f"eval/{cfg.name}/samples"] = float(len(samples))
        return out

    def _eval_samples(self, source: PromptSource, size: int, sampling: dict[str, Any]) -> list:
        items = [item for i in range(min(size, len(source))) if source.fits(item := source.make_item(i, 0))]
        overrides = {k: v for k, v in sampling.items() if v is not None}
        groups = self.engines.evaluate(items, tokenizer=self.tokenizer, **overrides)
        return flatten(groups)

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> Path:
        final = self.run_dir.checkpoint_dir(step)
        tmp = final.with_name(final.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if self.trainer is not None:  # rollout_only: the data position is the whole state
            self.trainer.save_checkpoint(str(tmp / "trainer"))
        state = {"step": step, "buffer": self.buffer.state_dict()}  # includes the prompt source position
        (tmp / "data_state.json").write_text(json.dumps(state), encoding="utf-8")
        (tmp / "COMPLETE").write_text(str(step), encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # a crash mid-save leaves only a .partial directory, never a half checkpoint
        return final

    def restore_last_checkpoint(self) -> int:
        found = self.run_dir.last_checkpoint()
        if found is None:
            return 0
        step, path = found
        restored = self.trainer.load_checkpoint(str(path / "trainer"))
        state = json.loads((path / "data_state.json").read_text(encoding="utf-8"))
        self.buffer.load_state_dict(state["buffer"])
        self.sync_weights(version=restored)  # engines start from the checkpoint's weights
        self._write_layout()  # the resume works: now the run's layout may change
        return step

    def export_final_model(self) -> str | None:
        if self.trainer is None:
            return None  # rollout_only trains nothing
        return self.trainer.export_hf(str(self.run_dir.path / "hf"))
