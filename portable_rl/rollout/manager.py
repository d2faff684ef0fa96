"""Rollout manager: prompts in, rewarded groups of samples out, generated through the router.

Contract
--------
* ``RolloutManager(cfg, router_url, tokenizer, engine_urls=None, api_key=None)``. Prompts are any iterable of
  ``(prompt_index, prompt_tokens, label)`` tuples or objects with ``index``, ``prompt_tokens``, ``label`` (and
  optional ``metadata``), e.g. ``portable_rl.data.prompts.PromptItem``. The iterable is consumed lazily: a
  rollout takes only the prompts it launches.
* ``await generate(prompts, step=, seed=, num_groups=)`` / ``rollout(...)`` (sync): for each prompt,
  ``samples_per_prompt`` samples, each made by the generate hook (``rollout.generate``; default
  ``generate_hook.single_turn``: one ``/generate`` request with ``return_logprob``) with at most
  ``max_concurrency`` samples in progress. A sample's first request has ``rid =
  "<rollout tag>-<group id>-<sample>"`` and, when ``cfg.seeded``, a ``sampling_seed`` derived from (seed, step,
  prompt_index, sample) only (see ``generate_hook.HookEngine`` for later requests). Finished samples are scored
  by the reward function. The hook's loss mask becomes ``Sample.loss_mask``; ``metadata["weight_spans"]`` lists
  ``[start, end, weight_version]`` of the response's model-token spans.
* A hook that raises (anything but an engine failure, ``EngineError``) or returns a malformed ``HookOutput``
  ends the rollout: requests still running are aborted and ``GenerateHookError`` names the hook and the prompt.
* Group ids: a prompt that carries a ``group_id`` (the data buffer numbers every hand-out for the run) gives
  it to its group, so groups of several rollouts never share an id (the trainer's GRPO baseline is per id).
  Prompts without one (eval items, plain tuples) are numbered by the manager, unique within the manager.
* With ``num_groups`` the rollout returns once that many groups passed the filter. It launches
  ``over_sampling_factor x num_groups`` prompts at once (rounded up; with a filter at least
  ``over_sample_factor`` per group), and with a filter tops up ``over_sample_factor`` prompts per missing
  group, at most ``prompt_budget(cfg, num_groups)`` in all (``max_prompts_factor x num_groups`` with a filter,
  ``num_groups`` without one; at least the over-sampled launch).
  Requests still running then are aborted on every engine (``/abort_request`` by exact rid, which SGLang and
  the CPU engine both honour) and come back as ABORTED groups. Without ``num_groups`` every prompt is used once.
* ``RolloutResult``: ``groups`` (kept, at most ``num_groups``), ``surplus`` (finished and kept by the filter
  after the target was reached), ``filtered`` (finished, dropped by the filter), ``aborted`` (some sample did
  not finish: their prompts must be generated again; ``DataBuffer.add_groups`` re-queues them), ``metrics``
  (counts of this rollout under ``rollout/``: launched, kept, filtered, surplus, aborted, errors, generated
  tokens, seconds; ``merge_metrics`` sums several rollouts and adds the rates).
* Partial rollouts (``cfg.partial_rollout``): an aborted sample keeps the tokens it has (response, engine
  log-probs, loss mask, weight spans) and its finished siblings keep theirs. A prompt that carries them
  (``metadata[PARTIAL_KEY]``, a list of sample dicts; the engine group attaches them when it re-queues the
  prompt) is not generated from scratch: finished samples are reused as they are, the others are continued by
  the hook from their ``partial`` transcript, under the prompt's new group id.
* ``cut`` (a ``threading.Event``, optional): once set, the rollout aborts its requests as at the target and
  returns what it has (the async weight update of partial rollouts, see ``EngineGroup.cut``).
* A failed request becomes an ABORTED sample (counted in ``metrics["rollout/errors"]``); if requests failed
  and no group finished at all, ``RolloutError`` is raised with the first failure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from portable_rl.config.rollout import RolloutConfig
from portable_rl.data.types import Group, Sample, SampleStatus
from portable_rl.protocol.client import EngineClient, EngineError, GenerateOutput
from portable_rl.rollout.filters import GroupFilter, keep_all, load_filter
from portable_rl.rollout.generate_hook import (
    GenerateHookError,
    HookEngine,
    HookFn,
    HookOutput,
    HookSample,
    Transcript,
    check_output,
    hook_name,
    load_generate_hook,
)
from portable_rl.rollout.rewards import RewardFn, call_reward, load_reward_fn

log = logging.getLogger(__name__)
_STATUS = {"stop": SampleStatus.COMPLETED, "length": SampleStatus.TRUNCATED}
ABORT_WAIT_S = 60.0
CUT_POLL_S = 0.05
PARTIAL_KEY = "partial_rollout"  # prompt metadata: the samples of its cut rollout, continued next time


class RolloutError(RuntimeError):
    """Every request of a rollout failed; the message carries the first failure."""


@dataclass
class PromptRef:
    index: int
    prompt_tokens: list[int]
    label: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    group_id: int | None = None  # given by whoever handed the prompt out (the data buffer)
    partial: list[Sample] | None = None  # the samples of this prompt's cut rollout (partial rollouts)

    @classmethod
    def of(cls, item: Any) -> PromptRef:
        if isinstance(item, tuple):
            if len(item) != 3:
                raise ValueError(f"prompt tuple {item!r:.80} must be (prompt_index, prompt_tokens, label)")
            return cls(int(item[0]), list(item[1]), item[2])
        try:
            metadata = dict(getattr(item, "metadata", {}) or {})
            kept = metadata.pop(PARTIAL_KEY, None)
            return cls(
                int(item.index),
                list(item.prompt_tokens),
                item.label,
                metadata,
                getattr(item, "group_id", None),
                [sample_from_dict(d) for d in kept] if kept else None,
            )
        except AttributeError:
            raise TypeError(
                f"prompt {item!r:.80} is neither (prompt_index, prompt_tokens, label) nor an object with "
                "index/prompt_tokens/label"
            ) from None


@dataclass
class RolloutResult:
    groups: list[Group]
    surplus: list[Group] = field(default_factory=list)
    filtered: list[Group] = field(default_factory=list)
    aborted: list[Group] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def first_launch(cfg: RolloutConfig, num_groups: int, filtering: bool) -> int:
    """Prompts a rollout for ``num_groups`` groups launches at once (over-sampling)."""
    factor = max(cfg.over_sampling_factor, cfg.over_sample_factor if filtering else 1.0)
    return math.ceil(num_groups * factor)


def prompt_budget(cfg: RolloutConfig, num_groups: int, filtering: bool | None = None) -> int:
    """The most prompts a rollout for ``num_groups`` groups may launch (``filtering``: default ``cfg.filter``)."""
    filtering = cfg.filter is not None if filtering is None else filtering
    budget = math.ceil(num_groups * cfg.max_prompts_factor) if filtering else num_groups
    return max(budget, math.ceil(num_groups * cfg.over_sampling_factor))


def sample_to_dict(sample: Sample) -> dict[str, Any]:
    out = dataclasses.asdict(sample)
    out["status"] = SampleStatus(sample.status).value
    return out


def sample_from_dict(data: dict[str, Any]) -> Sample:
    return Sample(**{**data, "status": SampleStatus(data["status"])})


def transcript_of(sample: Sample) -> Transcript:
    """The tokens a cut sample has, with each token's weight version rebuilt from its spans."""
    versions: list[int] = []
    spans = sorted(sample.metadata.get("weight_spans") or [], key=lambda s: s[0])
    version = sample.weight_version
    for i in range(sample.response_length):
        for start, end, v in spans:
            if start <= i < end:
                version = v
        versions.append(version)
    logprobs = list(sample.rollout_logprobs) or [0.0] * sample.response_length
    return Transcript(list(sample.response_tokens), logprobs, list(sample.loss_mask), versions)


_COUNTS = (
    "groups",
    "prompts_launched",
    "groups_filtered",
    "groups_surplus",
    "groups_aborted",
    "errors",
    "generated_tokens",
    "samples_resumed",
    "reward_sum",
    "rewarded_samples",
    "time_s",
)


def merge_metrics(parts: Iterable[dict[str, float]]) -> dict[str, float]:
    """The ``rollout/`` counts of several rollouts summed, plus ``reward_mean`` and ``generated_tokens_per_s``
    (derived again from the sums, so merged metrics merge again)."""
    total = {f"rollout/{k}": 0.0 for k in _COUNTS}
    for part in parts:
        for key in total:
            total[key] += part.get(key, 0.0)
    n, seconds = total["rollout/rewarded_samples"], total["rollout/time_s"]
    total["rollout/reward_mean"] = total["rollout/reward_sum"] / n if n else 0.0
    total["rollout/generated_tokens_per_s"] = total["rollout/generated_tokens"] / seconds if seconds else 0.0
    return total


def sample_seed(seed: int, step: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit sampling seed that depends only on its arguments (stable across processes and runs)."""
    digest = hashlib.blake2b(f"{seed}:{step}:{prompt_index}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _version_int(version: str | None) -> int:
    return int(version) if version is not None and version.isdigit() else 0


def _kept(sample: Sample) -> bool:
    """Whether a cut rollout keeps ``sample`` for later: it finished, or it has tokens to continue from."""
    return sample.status != SampleStatus.ABORTED or bool(sample.response_tokens)


class RolloutManager:
    def __init__(
        self,
        cfg: RolloutConfig,
        router_url: str,
        tokenizer: Any,
        *,
        engine_urls: list[str] | None = None,
        api_key: str | None = None,
        reward_fn: RewardFn | None = None,
        group_filter: GroupFilter | None = None,
        generate_hook: HookFn | None = None,
        cut: threading.Event | None = None,
    ) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.api_key = api_key
        self.client = EngineClient(
            router_url, api_key, timeout_s=cfg.request_timeout_s, max_connections=cfg.max_concurrency
        )
        self.engine_urls = list(engine_urls) if engine_urls is not None else None
        self.reward_fn = (
            reward_fn if reward_fn is not None else load_reward_fn(cfg.reward, **cfg.reward_options)
        )
        self.group_filter = group_filter if group_filter is not None else load_filter(cfg.filter)
        self.hook = (
            generate_hook
            if generate_hook is not None
            else load_generate_hook(cfg.generate, cfg.generate_options)
        )
        self.hook_options = dict(cfg.generate_options) if generate_hook is None else {}
        self.hook_name = cfg.generate or hook_name(self.hook)
        self.cut = (
            cut  # set from another thread: the rollout aborts what runs and returns (see EngineGroup.cut)
        )
        self._next_group_id = 0

    # ---- public -----------------------------------------------------------------------------------------
    def rollout(self, prompts: Iterable[Any], **kwargs: Any) -> RolloutResult:
        """Synchronous ``generate`` (runs its own event loop)."""

        async def run() -> RolloutResult:
            try:
                return await self.generate(prompts, **kwargs)
            finally:
                await self.client.close()

        return asyncio.run(run())

    async def generate(
        self,
        prompts: Iterable[Any],
        *,
        step: int = 0,
        seed: int = 0,
        num_groups: int | None = None,
        eval_mode: bool = False,
    ) -> RolloutResult:
        run = _Rollout(self, iter(prompts), step, seed, num_groups, eval_mode)
        return await run.execute()

    def _new_group_id(self) -> int:
        gid = self._next_group_id
        self._next_group_id += 1
        return gid

    async def _engine_urls(self) -> list[str]:
        if self.engine_urls is not None:
            return self.engine_urls
        try:
            body = await self.client.get("/workers", timeout_s=10)
            return [w["url"] for w in body.get("workers", [])]
        except (EngineError, KeyError, AttributeError) as exc:
            log.warning("cannot list the router's workers (%s); aborts go through the router", exc)
            return [self.client.base_url]


class _Rollout:
    """The state of one ``generate`` call."""

    def __init__(
        self,
        mgr: RolloutManager,
        prompts: Iterator[Any],
        step: int,
        seed: int,
        num_groups: int | None,
        eval_mode: bool,
    ) -> None:
        cfg = mgr.cfg
        self.mgr, self.prompts, self.step, self.seed = mgr, prompts, step, seed
        self.num_groups = num_groups
        self.n = cfg.eval_samples_per_prompt if eval_mode else cfg.samples_per_prompt
        self.params = cfg.sampling_params(eval_mode=eval_mode)
        self.group_filter = keep_all if eval_mode else mgr.group_filter
        self.tag = uuid.uuid4().hex[:12]
        self.sem = asyncio.Semaphore(cfg.max_concurrency)
        self.stopping = False
        self.in_flight: set[str] = set()
        self.errors: list[str] = []
        self.launched = 0
        self.exhausted = False
        filtering = self.group_filter is not keep_all
        self.limit = None if num_groups is None else prompt_budget(cfg, num_groups, filtering)
        self.tasks: dict[asyncio.Task, tuple[PromptRef, int]] = {}
        self.result = RolloutResult(groups=[])
        self.generated_tokens = 0
        self.resumed = 0
        self.max_turns = cfg.max_turns
        self.partial = cfg.partial_rollout and not eval_mode

    # ---- launching ----------------------------------------------------------------------------------------
    def _launch(self, k: int) -> None:
        for _ in range(k):
            if self.limit is not None and self.launched >= self.limit:
                return
            item = next(self.prompts, None)
            if item is None:
                self.exhausted = True
                return
            ref = PromptRef.of(item)
            gid = ref.group_id if ref.group_id is not None else self.mgr._new_group_id()
            task = asyncio.create_task(self._group(ref, gid))
            self.tasks[task] = (ref, gid)
            self.launched += 1

    def _top_up(self) -> None:
        if self.num_groups is None or self.group_filter is keep_all or self.exhausted:
            return
        need = self.num_groups - len(self.result.groups) - len(self.tasks)
        if need > 0:
            self._launch(math.ceil(need * self.mgr.cfg.over_sample_factor))

    async def execute(self) -> RolloutResult:
        t0 = time.perf_counter()
        if self.num_groups is None:
            self._launch(1 << 62)
        else:
            self._launch(first_launch(self.mgr.cfg, self.num_groups, self.group_filter is not keep_all))
        cut = self.mgr.cut
        try:
            while self.tasks and not self._target_reached() and not (cut is not None and cut.is_set()):
                # With a cut event, look at it every CUT_POLL_S; it is set from another thread.
                timeout = CUT_POLL_S if cut is not None else None
                done, _ = await asyncio.wait(self.tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    self.tasks.pop(task)
                    self._classify(task.result())
                self._top_up()
        except GenerateHookError:
            await self._abort_leftovers(reraise=False)
            raise
        if self.tasks:
            await self._abort_leftovers()
        self._finish_metrics(time.perf_counter() - t0)
        finished = self.result.groups or self.result.filtered or self.result.surplus
        if self.errors and not finished:
            raise RolloutError(
                f"all {len(self.errors)} failed requests, none finished; first: {self.errors[0]}"
            )
        # Groups finish in an order set by timing; the trainer's batch must not depend on it (a resumed or
        # repeated run trains on bit-identical batches), so hand them out in launch order.
        self.result.groups.sort(key=lambda g: g.group_id)
        return self.result

    def _target_reached(self) -> bool:
        return self.num_groups is not None and len(self.result.groups) >= self.num_groups

    def _classify(self, group: Group) -> None:
        if any(s.status == SampleStatus.ABORTED for s in group.samples):
            self.result.aborted.append(group)
        elif not self.group_filter(group):
            self.result.filtered.append(group)
        elif self._target_reached():
            self.result.surplus.append(group)
        else:
            self.result.groups.append(group)

    async def _abort_leftovers(self, reraise: bool = True) -> None:
        """Abort every request still running; the groups come back (ABORTED) when the requests end."""
        self.stopping = True  # queued samples and a hook's later calls return ABORTED without a request
        rids = sorted(self.in_flight)
        if rids:
            urls = await self.mgr._engine_urls()
            calls = [EngineClient(u, self.mgr.api_key, timeout_s=30) for u in urls]
            try:
                await asyncio.gather(
                    *(c.abort_request(rid=r) for c in calls for r in rids), return_exceptions=True
                )
            finally:
                await asyncio.gather(*(c.close() for c in calls))
        done, pending = await asyncio.wait(self.tasks, timeout=ABORT_WAIT_S) if self.tasks else ((), ())
        for task in done:
            if task.exception() is not None:
                if reraise:
                    raise task.exception()
                continue
            self._classify(task.result())
        for task in pending:
            task.cancel()
            ref, gid = self.tasks[task]
            log.warning(
                "group %d (prompt %d) did not return after its abort; counted as aborted", gid, ref.index
            )
            self.result.aborted.append(
                Group(gid, ref.index, [self._aborted_sample(ref, gid, j) for j in range(self.n)])
            )
        self.tasks.clear()

    # ---- one group / one sample ---------------------------------------------------------------------------
    async def _group(self, ref: PromptRef, gid: int) -> Group:
        samples = await asyncio.gather(*(self._sample(ref, gid, j) for j in range(self.n)))
        return Group(group_id=gid, prompt_index=ref.index, samples=list(samples))

    def _kept_sample(self, ref: PromptRef, j: int) -> Sample | None:
        """Sample ``j`` of the prompt's cut rollout, when partial rollouts keep one."""
        if not self.partial or ref.partial is None or j >= len(ref.partial):
            return None
        return ref.partial[j] if _kept(ref.partial[j]) else None

    def _aborted_sample(
        self, ref: PromptRef, gid: int, j: int, error: str | None = None, kept: Sample | None = None
    ) -> Sample:
        """An ABORTED sample; with partial rollouts it keeps the tokens it had (``kept``) for next time."""
        kept = kept if kept is not None else self._kept_sample(ref, j)
        meta = {**ref.metadata, "finish_reason": "abort"}
        if error:
            meta["error"] = error
        if kept is not None and kept.status != SampleStatus.ABORTED:
            return dataclasses.replace(kept, group_id=gid)  # finished before: stays finished
        if kept is not None:
            meta["weight_spans"] = kept.metadata.get("weight_spans", [])
            return dataclasses.replace(kept, group_id=gid, metadata=meta)
        return Sample(
            ref.index,
            gid,
            list(ref.prompt_tokens),
            status=SampleStatus.ABORTED,
            label=ref.label,
            metadata=meta,
        )

    async def _call_engine(self, input_ids: list[int], params: dict[str, Any], rid: str) -> GenerateOutput:
        """One ``/generate`` request for a hook; after the cut-off an empty ``abort`` without a request."""
        if self.stopping:
            return GenerateOutput(rid=rid, output_ids=[], output_logprobs=[], finish_reason="abort")
        self.in_flight.add(rid)
        try:
            return await self.mgr.client.generate(input_ids, params, return_logprob=True, rid=rid)
        finally:
            self.in_flight.discard(rid)

    async def _sample(self, ref: PromptRef, gid: int, j: int) -> Sample:
        kept = self._kept_sample(ref, j)
        if kept is not None and kept.status != SampleStatus.ABORTED:
            self.resumed += 1
            return dataclasses.replace(kept, group_id=gid)  # finished in the cut rollout: reused as is
        seed = sample_seed(self.seed, self.step, ref.index, j) if self.mgr.cfg.seeded else None
        rid = f"{self.tag}-{gid}-{j}"
        engine = HookEngine(self._call_engine, self.mgr.tokenizer, rid, seed)
        partial = transcript_of(kept) if kept is not None else None
        hook_sample = HookSample(
            ref.index, gid, j, list(ref.prompt_tokens), ref.label, dict(ref.metadata), self.max_turns, partial
        )
        where = f"generate hook {self.mgr.hook_name!r} on prompt {ref.index} (group {gid}, sample {j})"
        async with self.sem:
            if self.stopping:
                return self._aborted_sample(ref, gid, j)
            if partial is not None:
                self.resumed += 1
            try:
                out = await self.mgr.hook(hook_sample, dict(self.params), engine, **self.mgr.hook_options)
            except EngineError as exc:
                self.errors.append(str(exc))
                log.warning("request %s failed: %s", rid, exc)
                return self._aborted_sample(ref, gid, j, error=str(exc))
            except Exception as exc:  # noqa: BLE001 - user code: any failure becomes one line naming it
                raise GenerateHookError(f"{where} raised {type(exc).__name__}: {exc}") from exc
        out = check_output(out, where)
        return await self._to_sample(out, ref, gid, rid, engine, partial)

    async def _to_sample(
        self,
        out: HookOutput,
        ref: PromptRef,
        gid: int,
        rid: str,
        engine: HookEngine,
        partial: Transcript | None,
    ) -> Sample:
        status = _STATUS.get(out.finish_reason, SampleStatus.ABORTED)
        self.generated_tokens += sum(out.loss_mask) - (sum(partial.loss_mask) if partial else 0)
        versions = out.weight_versions
        last = engine.last_weight_version
        if versions is None:  # the hook did not say: every token is from its last engine call's weights
            versions = [_version_int(last)] * len(out.tokens)
        spans = Transcript(out.tokens, out.logprobs, out.loss_mask, versions).spans()
        sample = Sample(
            prompt_index=ref.index,
            group_id=gid,
            prompt_tokens=list(ref.prompt_tokens),
            response_tokens=list(out.tokens),
            rollout_logprobs=list(out.logprobs),
            loss_mask=list(out.loss_mask),
            status=status,
            weight_version=spans[-1][2] if spans else _version_int(last),
            response_text=self.mgr.tokenizer.decode(out.tokens, skip_special_tokens=True),
            label=ref.label,
            metadata={
                **ref.metadata,
                "rid": rid,
                "finish_reason": out.finish_reason,
                "weight_version": last,
                "weight_spans": spans,
                **out.metadata,
            },
        )
        if status != SampleStatus.ABORTED:
            sample.reward = await call_reward(self.mgr.reward_fn, sample.response_text, ref.label, sample)
        return sample

    def _finish_metrics(self, seconds: float) -> None:
        r = self.result
        rewards = [s.reward for g in r.groups for s in g.samples]
        counts = {
            "groups": len(r.groups),
            "prompts_launched": self.launched,
            "groups_filtered": len(r.filtered),
            "groups_surplus": len(r.surplus),
            "groups_aborted": len(r.aborted),
            "errors": len(self.errors),
            "generated_tokens": self.generated_tokens,
            "samples_resumed": self.resumed,
            "reward_sum": sum(rewards),
            "rewarded_samples": len(rewards),
            "time_s": seconds,
        }
        r.metrics = merge_metrics([{f"rollout/{k}": float(v) for k, v in counts.items()}])
