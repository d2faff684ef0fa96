"""The rollout side of a job: engine actors on their placement slots, the router in front, the manager.

* ``EngineGroup(cfg, model_dir, plan, pg, platform)`` starts ``cfg.num_engines`` engine servers (SGLang on
  GPUs, the CPU engine on the CPU platform: ``EngineSpec.kind="auto"``), each inside a Ray actor placed on its
  bundle, then the real sglang-router over them.
* ``rollout(buffer, step, seed, tokenizer)`` takes prompts from the data buffer, generates through the router,
  hands finished groups back to the buffer (aborted ones are re-queued there, filtered ones discarded) and
  returns exactly ``prompts_per_step`` groups (fewer only if the filter keeps too few; see the manager).
* ``evaluate(items, tokenizer)`` runs an eval rollout (eval sampling params, no filter, no buffer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from portable_rl.data.buffer import DataBuffer
from portable_rl.data.types import Group
from portable_rl.orchestration.placement import Plan, actor_options
from portable_rl.platform import Platform
from portable_rl.rollout.config import RolloutConfig
from portable_rl.rollout.engines.launcher import EngineSpec, remote_engine_actor
from portable_rl.rollout.manager import RolloutManager
from portable_rl.rollout.router import Router, RouterConfig


class EngineGroup:
    def __init__(self, cfg: RolloutConfig, model_dir: Path, plan: Plan, pg: Any, platform: Platform):
        import ray

        self.cfg = cfg
        self.actors = []
        self.router: Router | None = None
        try:
            for slots in plan.engines:
                first = slots[0]
                spec = EngineSpec(
                    model_path=str(model_dir),
                    kind=cfg.engine,
                    engine_args=dict(cfg.engine_args),
                    devices=[s.bundle for s in slots] if platform.ray_resource else [],
                    startup_timeout_s=cfg.engine_startup_timeout_s,
                )
                self.actors.append(remote_engine_actor(spec, **actor_options(plan, first, pg)))
            self.urls: list[str] = ray.get([a.url.remote() for a in self.actors])
            self.router = Router(RouterConfig(policy=cfg.router_policy)).start(self.urls)
        except BaseException:
            self.shutdown()
            raise

    def _manager(self, tokenizer: Any, cfg: RolloutConfig | None = None) -> RolloutManager:
        return RolloutManager(cfg or self.cfg, self.router.url, tokenizer, engine_urls=self.urls)

    def rollout(self, buffer: DataBuffer, *, step: int, seed: int, tokenizer: Any) -> list[Group]:
        n = self.cfg.prompts_per_step
        groups: list[Group] = []
        # A round may come back short (aborted groups re-queued by the buffer, or a strict filter); top up.
        for _ in range(8):
            missing = n - len(groups)
            if missing <= 0:
                break
            budget = missing if self.cfg.filter is None else int(missing * self.cfg.max_prompts_factor)
            prompts = buffer.get_prompts(budget)
            result = self._manager(tokenizer).rollout(prompts, step=step, seed=seed, num_groups=missing)
            buffer.add_groups(result.groups + result.surplus + result.aborted)
            buffer.discard_groups(result.filtered)
            unused = _unused(prompts, result)
            if unused:
                buffer.return_prompts(unused)
            groups += buffer.pop_groups(missing)
        if not groups:
            raise RuntimeError(
                f"step {step}: the rollout produced no trainable group (all filtered or aborted)"
            )
        return groups

    def evaluate(self, items: list[Any], tokenizer: Any) -> list[Group]:
        from dataclasses import replace

        cfg = replace(
            self.cfg,
            samples_per_prompt=self.cfg.eval_samples_per_prompt,
            temperature=self.cfg.eval_temperature,
            filter=None,
        )
        return self._manager(tokenizer, cfg).rollout(items, step=0, seed=0, eval_mode=True).groups

    def shutdown(self) -> None:
        import ray

        if self.router is not None:
            self.router.stop()
            self.router = None
        for a in self.actors:
            try:
                ray.get(a.stop.remote(), timeout=60)
            except (ray.exceptions.RayError, TimeoutError):
                pass  # the actor is already gone; ray.kill below reaps it
            ray.kill(a)
        self.actors = []


def _unused(prompts: list[Any], result: Any) -> list[Any]:
    """Prompts the manager never launched (the target was reached before it took them)."""
    launched = {g.prompt_index for g in result.groups + result.surplus + result.filtered + result.aborted}
    return [p for p in prompts if p.index not in launched]
