"""Dynamic-sampling filters: which finished groups a rollout keeps.

A filter is ``fn(group: Group) -> bool`` (True: keep). ``load_filter(spec)``: None keeps every group;
``"nonzero_std"`` drops groups whose rewards are all equal (DAPO's dynamic sampling: such a group has zero
advantage under GRPO and teaches nothing); ``"package.module:function"`` loads a user filter (a failed import
raises ``RewardLoadError`` with one line).
"""

from __future__ import annotations

from collections.abc import Callable

from portable_rl.data.types import Group
from portable_rl.rollout.rewards import load_callable

GroupFilter = Callable[[Group], bool]


def keep_all(group: Group) -> bool:
    return True


def nonzero_reward_std(group: Group, eps: float = 1e-6) -> bool:
    rewards = group.rewards
    return len(rewards) > 1 and max(rewards) - min(rewards) > eps


def load_filter(spec: str | None) -> GroupFilter:
    if spec is None:
        return keep_all
    if spec == "nonzero_std":
        return nonzero_reward_std
    return load_callable(spec, what="group filter")
