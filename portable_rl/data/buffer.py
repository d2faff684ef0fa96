"""Data buffer between the prompt source, the rollout and the trainer. No prompt is ever lost.

Life of a prompt::

    get_prompts(n)  -> handed out, recorded "in flight"; every hand-out gets a fresh ``group_id`` (unique
                       for the run: the counter is part of the saved state), which the rollout gives the
                       prompt's group, so two groups never share an id — not across rounds, steps or a resume
    add_groups(gs)  -> a group whose samples all finished (completed or truncated) becomes "ready";
                       a group with an ABORTED sample (or no sample) is dropped and its prompt goes back
                       to the *front* of the queue, so the next get_prompts regenerates it first
    discard_groups  -> finished but not trained on (e.g. a dynamic-sampling filter): just leaves "in flight"
    return_prompts  -> prompts whose groups will never come (an engine died): back to the front
    pop_groups(n)   -> ready groups, oldest first, for the trainer

``state_dict()`` is plain data (JSON-serialisable when labels and sample metadata are): the source
position, the queue of returned prompts, the prompts in flight, the ready groups and the next group id. ``load_state_dict``
puts the in-flight prompts back at the front of the queue (their rollouts died with the old process) and
restores the ready groups, so a resumed run sees every prompt exactly once per epoch.

Groups are matched to in-flight prompts by ``Group.prompt_index`` (FIFO when the same prompt is in flight
twice, which happens with tiny data sets spanning an epoch boundary).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterable
from typing import Any, Protocol

from portable_rl.data.prompts import PromptItem
from portable_rl.data.types import Group, Sample, SampleStatus


class PromptStream(Protocol):
    def next_batch(self, n: int) -> list[PromptItem]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def group_to_dict(group: Group) -> dict[str, Any]:
    out = dataclasses.asdict(group)
    for s in out["samples"]:
        s["status"] = SampleStatus(s["status"]).value
    return out


def group_from_dict(data: dict[str, Any]) -> Group:
    samples = [Sample(**{**s, "status": SampleStatus(s["status"])}) for s in data["samples"]]
    return Group(group_id=data["group_id"], prompt_index=data["prompt_index"], samples=samples)


def is_finished(group: Group) -> bool:
    """True when every sample finished generating (completed or truncated) and there is at least one."""
    return bool(group.samples) and all(s.status != SampleStatus.ABORTED for s in group.samples)


class DataBuffer:
    def __init__(self, source: PromptStream) -> None:
        self.source = source
        self._pending: deque[PromptItem] = deque()  # returned prompts, served before the source
        # prompt_index -> (hand-out number, item); the number keeps re-queues in hand-out order
        self._in_flight: dict[int, deque[tuple[int, PromptItem]]] = {}
        self._handed_out = 0  # hand-outs so far: the next hand-out's group id
        self._ready: deque[Group] = deque()

    # -- prompts ---------------------------------------------------------------------------------
    def get_prompts(self, n: int) -> list[PromptItem]:
        """``n`` prompts: returned ones first (oldest return first), then fresh ones from the source.

        Each carries a new ``group_id`` (a prompt generated again after an abort gets a new one too).
        """
        if n < 0:
            raise ValueError(f"number of prompts {n} must be >= 0")
        items = [self._pending.popleft() for _ in range(min(n, len(self._pending)))]
        items += self.source.next_batch(n - len(items))
        for item in items:
            item.group_id = self._handed_out
            self._in_flight.setdefault(item.index, deque()).append((self._handed_out, item))
            self._handed_out += 1
        return items

    def return_prompts(self, items: Iterable[PromptItem]) -> None:
        """Put unfinished prompts back at the front of the queue, keeping their order."""
        items = list(items)
        for item in items:
            self._take_in_flight(item.index, what=f"prompt {item.index}")
        self._pending.extendleft(reversed(items))

    def requeue_in_flight(self) -> list[PromptItem]:
        """Return every in-flight prompt to the front (e.g. all engines restarted); returns them."""
        items = self._in_flight_items()
        self._in_flight.clear()
        self._pending.extendleft(reversed(items))
        return items

    def _take_in_flight(self, prompt_index: int, what: str) -> PromptItem:
        queue = self._in_flight.get(prompt_index)
        if not queue:
            raise ValueError(
                f"{what} has prompt_index {prompt_index}, which this buffer did not hand out (or was already "
                "returned); pass items obtained from get_prompts"
            )
        _, item = queue.popleft()
        if not queue:
            del self._in_flight[prompt_index]
        return item

    def _in_flight_items(self) -> list[PromptItem]:
        return [
            item for _, item in sorted((e for q in self._in_flight.values() for e in q), key=lambda e: e[0])
        ]

    # -- groups ----------------------------------------------------------------------------------
    def add_groups(self, groups: Iterable[Group]) -> list[PromptItem]:
        """Store finished groups; re-queue the prompts of aborted ones (returned, in order)."""
        requeued = []
        for group in groups:
            item = self._take_in_flight(group.prompt_index, what=f"group {group.group_id}")
            if is_finished(group):
                self._ready.append(group)
            else:
                requeued.append(item)
        self._pending.extendleft(reversed(requeued))
        return requeued

    def discard_groups(self, groups: Iterable[Group]) -> None:
        """Mark finished-but-filtered groups as consumed (they are neither trained on nor regenerated)."""
        for group in groups:
            self._take_in_flight(group.prompt_index, what=f"group {group.group_id}")

    def pop_groups(self, n: int) -> list[Group]:
        """Up to ``n`` ready groups, oldest first."""
        return [self._ready.popleft() for _ in range(min(n, len(self._ready)))]

    @property
    def num_ready(self) -> int:
        return len(self._ready)

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    @property
    def num_in_flight(self) -> int:
        return sum(len(q) for q in self._in_flight.values())

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "source": self.source.state_dict(),
            "pending": [item.to_dict() for item in self._pending],
            "in_flight": [item.to_dict() for item in self._in_flight_items()],
            "ready": [group_to_dict(g) for g in self._ready],
            "next_group_id": self._handed_out,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state["source"])
        # Rollouts in flight when the state was saved are gone: regenerate those prompts first.
        items = [PromptItem.from_dict(d) for d in state["in_flight"]]
        items += [PromptItem.from_dict(d) for d in state["pending"]]
        self._pending = deque(items)
        self._in_flight = {}
        self._ready = deque(group_from_dict(d) for d in state["ready"])
        # Checkpoints written before group ids were numbered here lack the counter: continue above the
        # ready groups' ids, which is all a new group must not collide with.
        self._handed_out = state.get("next_group_id", 1 + max((g.group_id for g in self._ready), default=-1))
