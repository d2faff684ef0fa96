"""The rollout side of a job: engine actors on their placement slots, the router in front, the manager.

* ``EngineGroup(cfg, model_dir, plan, pg, platform, api_key, devices=)`` starts ``cfg.num_engines`` engine
  servers (SGLang on GPUs, the CPU engine on the CPU platform: ``EngineSpec.kind="auto"``), each inside a Ray
  actor placed on its bundle with the physical devices Ray reserved for its bundles (``devices[e]``, from
  ``orchestration.devices.engine_devices``; none on the CPU platform) as its device mask, then the real
  sglang-router over them. With ``api_key`` (the job passes one per run)
  engines and router refuse requests without ``Authorization: Bearer <key>``; every client here sends it.
  ``host``: what engines bind — loopback for a job on one machine, ``NODE_HOST`` (the Ray node's address) for
  a job on a multi-node cluster, where the router on the driver's node must reach them.
* ``EngineGroup.on_running_engines(cfg, router_url, engine_urls)``: the same rollout over engines and a router
  someone else started and watches (no actors: health checks must be off).
* ``rollout(buffer, step, seed, tokenizer)`` generates through the router in rounds: each round's manager takes
  prompts from the data buffer one at a time as it launches them (so a prompt is handed out only when it is
  generated, and gets its run-unique group id then), hands finished groups back to the buffer (aborted ones are
  re-queued there, filtered ones discarded); a round that comes back short (a strict filter, aborted groups,
  an engine failure) is followed by another. With ``rollout.over_sampling_factor`` a round launches more
  prompts than it needs and the manager aborts the rest at the target; with ``rollout.partial_rollout`` a
  re-queued prompt carries its cut group's samples (``metadata[PARTIAL_KEY]``) and continues them next time.
* ``cut()`` / ``resume()`` (another thread; partial rollouts in async mode): the running round aborts its
  requests and returns; the rollout sets ``paused`` and waits for ``resume()`` before its next round, which
  continues the cut samples under the weights synced in between. A cut round does not count against the
  round limit. Returns ``(groups, metrics)``: exactly ``prompts_per_step``
  groups (fewer only if the filter keeps too few; see the manager) and the rounds' ``rollout/`` counts merged.
* ``evaluate(items, tokenizer)`` runs an eval rollout (eval sampling params, no filter, no buffer).

Fault tolerance (``rollout.health_check_interval_s`` > 0; see ``portable_rl.orchestration.health``):
* While a rollout round runs, an ``EngineMonitor`` probes every engine. An engine found dead, hung or unhealthy
  is fenced at once: removed from the router (no new requests reach it) and killed (requests stuck on it fail
  instead of waiting for ``request_timeout_s``). Its failed requests come back as aborted samples, so their
  groups' prompts return to the front of the buffer; a round in which every request failed returns all its
  prompts. Nothing handed out is lost or counted twice: every prompt ends as a ready group, a discarded
  (filtered) group, or back in the buffer.
* ``heal(probe)`` replaces fenced engines (``probe=True`` probes every engine first): a new actor on the same
  placement bundle (started as soon as the engine was fenced, so it boots while the round goes on), then the
  ``weight_source`` (the trainer group, attached with ``attach_weight_source``; a ``WeightSource``) reconnects
  weight sync to the new engine list and pushes its current weights — and only then the router gets the new
  engine, so it never serves stale weights. A rollout heals before its first round, between rounds and
  before it returns, so the next weight update and the next rollout see a full, synced set of engines. More than
  ``rollout.max_engine_restarts`` replacements in a run raise ``EngineFailure``.
* ``restarts`` and ``requeued`` count replacements and re-queued prompts over the run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import requests

from portable_rl.config.rollout import RolloutConfig
from portable_rl.data.buffer import DataBuffer
from portable_rl.data.types import Group
from portable_rl.orchestration.health import EngineMonitor, Failure, Verdict
from portable_rl.orchestration.placement import Plan, actor_options
from portable_rl.platform import Platform
from portable_rl.rollout.engines.launcher import EngineSpec, remote_engine_actor
from portable_rl.rollout.manager import (
    PARTIAL_KEY,
    RolloutError,
    RolloutManager,
    RolloutResult,
    merge_metrics,
    prompt_budget,
    sample_to_dict,
)
from portable_rl.rollout.router import Router, RouterConfig, RouterError

log = logging.getLogger(__name__)
# A fenced engine is killed without a grace period worth waiting for: it is dead, hung or misbehaving.
FENCE_STOP_S = 2.0
MAX_ROUNDS = 8  # rollout rounds per step without an engine failure (each tops up what the last one missed)


class EngineFailure(RuntimeError):
    """An engine failed and is not replaced (restarts used up); the message names the engine and the cause."""


class WeightSource(Protocol):
    """Who owns the weights the engines serve (the trainer group)."""

    def push_weights_to(self, engine_urls: list[str]) -> None:
        """Reconnect weight sync to ``engine_urls`` and push the current weights under the current version."""


class EngineGroup:
    def __init__(
        self,
        cfg: RolloutConfig,
        model_dir: Path,
        plan: Plan,
        pg: Any,
        platform: Platform,
        api_key: str | None = None,
        host: str = "127.0.0.1",
        env: dict[str, str] | None = None,
        devices: list[list[int]] | None = None,
    ):
        import ray

        self._init_state(cfg, api_key)
        try:
            if devices is None and platform.ray_resource:
                raise ValueError("engines on a device platform need devices= (orchestration.devices)")
            devices = devices if devices is not None else [[] for _ in plan.engines]
            if len(devices) != len(plan.engines):
                raise ValueError(f"{len(devices)} device lists for {len(plan.engines)} engines")
            for slots, engine_devices in zip(plan.engines, devices, strict=True):
                self.specs.append(
                    EngineSpec(
                        model_path=str(model_dir),
                        kind=cfg.engine,
                        # the key travels as ``api_key`` (env for the CPU engine, off its command line)
                        engine_args={k: v for k, v in cfg.engine_args.items() if k != "api_key"},
                        devices=list(engine_devices),  # as Ray assigned them (orchestration.devices)
                        startup_timeout_s=cfg.engine_startup_timeout_s,
                        api_key=api_key,
                        host=host,
                        env=dict(env or {}),
                    )
                )
                self.options.append(actor_options(plan, slots[0], pg))
                self.actors.append(self._start(len(self.specs) - 1))
            self.urls = ray.get([a.url.remote() for a in self.actors])
            self.router = Router(RouterConfig(policy=cfg.router_policy, api_key=api_key)).start(self.urls)
            self.router_url = self.router.url
        except BaseException:
            self.shutdown()
            raise

    def _init_state(self, cfg: RolloutConfig, api_key: str | None) -> None:
        self.cfg = cfg
        self.api_key = api_key
        self.actors: list[Any] = []
        self.urls: list[str] = []
        self.router: Router | None = None
        self.router_url = ""
        self.weight_source: WeightSource | None = None
        self.restarts = 0
        self.requeued = 0
        self._failed: dict[int, Failure] = {}
        self._replacements: dict[int, Any] = {}  # engine index -> replacement actor, booting
        self._fence_lock = threading.Lock()
        self.specs: list[EngineSpec] = []
        self.options: list[dict[str, Any]] = []
        self._cut = threading.Event()  # set: a rollout in progress stops its round and waits for resume()
        self._resumed = threading.Event()
        self._resumed.set()
        self.paused = threading.Event()  # set while a cut rollout waits: no request runs on any engine

    @classmethod
    def on_running_engines(
        cls, cfg: RolloutConfig, router_url: str, engine_urls: list[str], api_key: str | None = None
    ) -> EngineGroup:
        """Rollouts over engines and a router started elsewhere; this group neither watches nor stops them."""
        if cfg.health_check_interval_s > 0:
            raise ValueError(
                f"rollout.health_check_interval_s={cfg.health_check_interval_s}: engines this group did not "
                "start cannot be replaced; set it to 0"
            )
        group = cls.__new__(cls)
        group._init_state(cfg, api_key)
        group.urls, group.router_url = list(engine_urls), router_url
        return group

    def attach_weight_source(self, source: WeightSource) -> None:
        """Replaced engines get ``source``'s weights before they serve (the job attaches its trainer group)."""
        self.weight_source = source

    def _start(self, i: int) -> Any:
        """A new actor for engine ``i`` on its placement bundle (its engine boots in the background)."""
        return remote_engine_actor(self.specs[i], **self.options[i])

    @property
    def health_checks(self) -> bool:
        return self.cfg.health_check_interval_s > 0

    def _manager(self, tokenizer: Any, cfg: RolloutConfig | None = None) -> RolloutManager:
        return RolloutManager(
            cfg or self.cfg,
            self.router_url,
            tokenizer,
            engine_urls=self.urls,
            api_key=self.api_key,
            # Only partial rollouts are cut (async weight updates); eval rollouts never are.
            cut=self._cut if cfg is None and self.cfg.partial_rollout else None,
        )

    # ---- cutting an asynchronous rollout for a weight update ---------------------------------------------
    def cut(self) -> None:
        """Ask a rollout running in another thread to abort its requests and wait for ``resume()``.

        Cut samples keep their tokens when ``rollout.partial_rollout`` is on (the recipe checks it for async
        runs); ``paused`` is set once nothing runs on the engines, or the rollout may simply finish first."""
        self._resumed.clear()
        self._cut.set()

    def resume(self) -> None:
        """Let a cut rollout go on (after the weight update): its cut samples continue under the new weights."""
        self._cut.clear()
        self.paused.clear()
        self._resumed.set()

    def _wait_if_cut(self) -> None:
        if self._cut.is_set():
            self.paused.set()
            self._resumed.wait()

    # ---- rollout ------------------------------------------------------------------------------------------
    def rollout(
        self, buffer: DataBuffer, *, step: int, seed: int, tokenizer: Any
    ) -> tuple[list[Group], dict[str, float]]:
        n = self.cfg.prompts_per_step
        groups: list[Group] = []
        rounds: list[dict[str, float]] = []
        self.heal(probe=True)
        # Surplus groups of the previous step come first; a round tops up what is still missing. Within a
        # round the manager tops up filtered groups itself; another round is needed only when one came back
        # short (aborted groups re-queued by the buffer, the filter's prompt budget used up, an engine failure).
        groups += buffer.pop_groups(n)
        rounds_left = MAX_ROUNDS + self.cfg.max_engine_restarts
        while rounds_left > 0:
            missing = n - len(groups)
            if missing <= 0:
                break
            self._wait_if_cut()  # a cut round waits for the weight update, then goes on
            self.heal(probe=False)
            handed = _HandOut(buffer, prompt_budget(self.cfg, missing))
            result = self._round(tokenizer, handed, step=step, seed=seed, num_groups=missing)
            rounds_left -= 0 if self._cut.is_set() else 1
            if result is None:  # every request failed on failed engines: the whole round goes back
                buffer.return_prompts(handed.items)
                self.requeued += len(handed.items)
                continue
            rounds.append(result.metrics)
            requeued = buffer.add_groups(result.groups + result.surplus + result.aborted)
            self.requeued += len(requeued)
            self._keep_partial(requeued, result.aborted)
            buffer.discard_groups(result.filtered)
            groups += buffer.pop_groups(missing)
        self.heal(probe=False)  # engines lost in the last round are back before the next weight update
        if not groups:
            raise RuntimeError(
                f"step {step}: the rollout produced no trainable group (all filtered or aborted)"
            )
        return groups, merge_metrics(rounds)

    def _keep_partial(self, requeued: list[Any], aborted: list[Group]) -> None:
        """Partial rollouts: a re-queued prompt carries its cut group's samples, continued when it runs again.

        They travel in the prompt's metadata, so a checkpoint of the buffer keeps them too."""
        if not self.cfg.partial_rollout:
            return
        by_id = {g.group_id: g for g in aborted}
        for item in requeued:
            group = by_id.get(item.group_id)
            kept = [sample_to_dict(s) for s in group.samples] if group is not None else []
            item.metadata.pop(PARTIAL_KEY, None)
            if any(s["response_tokens"] or s["status"] != "aborted" for s in kept):
                item.metadata[PARTIAL_KEY] = kept

    def _round(self, tokenizer: Any, prompts: list[Any], **kwargs: Any) -> RolloutResult | None:
        """One manager rollout, watched by the health monitor; None when it failed because engines did."""
        if not self.health_checks:
            return self._manager(tokenizer).rollout(prompts, **kwargs)
        with self._monitor() as monitor:
            try:
                return self._manager(tokenizer).rollout(prompts, **kwargs)
            except RolloutError:
                if monitor.check_now() or self._failed:
                    return None
                raise

    def evaluate(self, items: list[Any], tokenizer: Any, **sampling: Any) -> list[Group]:
        """Eval groups of ``items``; ``sampling`` replaces ``eval_*`` fields of the config (one eval set's own)."""
        from dataclasses import replace

        base = replace(self.cfg, **sampling) if sampling else self.cfg
        cfg = replace(
            base,
            samples_per_prompt=base.eval_samples_per_prompt,
            temperature=base.eval_temperature,
            filter=None,
        )
        self.heal(probe=True)
        return self._manager(tokenizer, cfg).rollout(items, step=0, seed=0, eval_mode=True).groups

    # ---- health -------------------------------------------------------------------------------------------
    def _monitor(self) -> EngineMonitor:
        """A monitor over the engines not fenced yet (indices are engine indices)."""
        urls = list(self.urls)
        checks = [None if i in self._failed else _process_check(a) for i, a in enumerate(self.actors)]
        monitor = EngineMonitor(
            urls,
            timeout_s=self.cfg.health_timeout_s,
            interval_s=self.cfg.health_check_interval_s,
            on_failure=self._fence,
            process_checks=checks,
            api_key=self.api_key,
        )
        monitor.failures.update(self._failed)  # already fenced: not probed again
        return monitor

    def _fence(self, failure: Failure) -> None:
        """Take a failed engine out of service: out of the router, process and actor killed. Idempotent."""
        import ray

        with self._fence_lock:
            if failure.index in self._failed:
                return
            self._failed[failure.index] = failure
        actor = self.actors[failure.index]
        try:
            tail = ray.get(actor.log_tail.remote(20), timeout=FENCE_STOP_S)
            log.warning("%s; fencing it. Its log ends:\n%s", failure, tail)
        except (ray.exceptions.RayError, TimeoutError):
            log.warning("%s; fencing it (its log is unreachable)", failure)
        if self.router is not None:
            try:
                self.router.remove_worker(failure.url)
            except (RouterError, requests.RequestException) as exc:
                log.warning("could not remove %s from the router: %s", failure.url, exc)
        _kill(actor)
        if self.restarts + len(self._replacements) < self.cfg.max_engine_restarts:
            # Boot the replacement now, while the other engines finish the round; heal() waits for it.
            self._replacements[failure.index] = self._start(failure.index)

    def heal(self, probe: bool = True) -> int:
        """Replace fenced engines (after probing every engine when ``probe``); returns how many were replaced."""
        import ray

        if not self.health_checks:
            return 0
        if probe:
            monitor = self._monitor()
            monitor.check_now()
        failed = sorted(self._failed)
        if not failed:
            return 0
        if self.restarts + len(failed) > self.cfg.max_engine_restarts:
            causes = "; ".join(str(self._failed[i]) for i in failed)
            raise EngineFailure(
                f"{causes}. rollout.max_engine_restarts={self.cfg.max_engine_restarts} allows no more "
                f"replacements ({self.restarts} done); raise it, or find the cause in the engine's log"
            )
        new = {i: self._replacements.pop(i) if i in self._replacements else self._start(i) for i in failed}
        urls = dict(zip(new, ray.get([a.url.remote() for a in new.values()]), strict=True))
        for i in failed:
            self.actors[i], self.urls[i] = new[i], urls[i]
        self.restarts += len(failed)
        log.warning("replaced engine(s) %s: now at %s", failed, [urls[i] for i in failed])
        if self.weight_source is not None:  # the new engines get the trainer's weights before they serve
            self.weight_source.push_weights_to(list(self.urls))
        for i in failed:
            self.router.add_worker(urls[i])
            del self._failed[i]
        return len(failed)

    def shutdown(self) -> None:
        if self.router is not None:
            self.router.stop()
            self.router = None
        for a in self.actors + list(self._replacements.values()):
            _kill(a, timeout_s=30)
        self.actors = []
        self._replacements = {}


def _process_check(actor: Any) -> Callable[[float], Verdict | None]:
    """Health pre-check through the engine's Ray actor: is the actor alive, is its engine process running?"""

    def check(timeout_s: float) -> Verdict | None:
        import ray

        try:
            status = ray.get(actor.process_status.remote(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            return Verdict("hung", f"its Ray actor did not answer within {timeout_s:g}s")
        except ray.exceptions.RayError as exc:  # RayActorError / ActorUnavailableError: the actor is gone
            return Verdict("dead", f"its Ray actor died ({str(exc).strip().splitlines()[0][:200]})")
        if not status["alive"]:
            return Verdict(
                "dead", f"its process (pid {status['pid']}) exited with code {status['returncode']}"
            )
        return None

    return check


def _kill(actor: Any, timeout_s: float = FENCE_STOP_S) -> None:
    """Stop the engine process through its actor (SIGTERM, SIGKILL after ``timeout_s``), then the actor."""
    import ray

    try:
        ray.get(actor.stop.remote(timeout_s), timeout=timeout_s + 30)
    except (ray.exceptions.RayError, TimeoutError):
        pass  # the actor is already gone; ray.kill below reaps it
    ray.kill(actor)


class _HandOut:
    """Prompts from the buffer one at a time, as the manager launches them, up to ``budget``; remembers them."""

    def __init__(self, buffer: DataBuffer, budget: int) -> None:
        self.buffer, self.budget = buffer, budget
        self.items: list[Any] = []

    def __iter__(self) -> Iterator[Any]:
        while len(self.items) < self.budget:
            got = self.buffer.get_prompts(1)
            if not got:
                return
            self.items += got
            yield got[0]
