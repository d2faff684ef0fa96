"""Saved rollouts: every sample of a step's rollout, on disk, exactly as the trainer receives it.

Format (``RUN_DIR/rollouts/step_N.jsonl``, UTF-8 JSON lines): one line per sample, in training order (groups
in order, samples of a group together), each a JSON object with

    step, group_id, prompt_index, prompt_tokens, response_tokens, rollout_logprobs, loss_mask, reward,
    status ("completed" | "truncated" | "aborted"), weight_version, response_text, label, metadata

and any further field ``portable_rl.data.types.Sample`` has. Floats are written with Python's shortest
round-trip repr, so ``read_step`` rebuilds samples bit-equal to those written: a train step from a saved
rollout is the train step the run took (``run.debug_mode: train_only``). A step's file is written to
``step_N.jsonl.partial`` and renamed, so a file that exists is whole.

* ``write_step(directory, step, groups)`` writes one step; ``read_step(directory, step)`` returns its groups.
* ``saved_steps(directory)``: the steps a directory holds, ascending.
* ``rollouts_dir(path)``: ``path`` itself, or ``path/rollouts`` when ``path`` is a run directory.
* ``SavedRolloutError`` (one line naming the file, the line and the fix) when a file is missing or malformed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

from portable_rl.data.types import Group, Sample, SampleStatus

DIR_NAME = "rollouts"
_STEP_FILE = re.compile(r"^step_(\d+)\.jsonl$")
_SAMPLE_FIELDS = {f.name for f in dataclasses.fields(Sample)}


class SavedRolloutError(ValueError):
    """A saved rollout cannot be read; one line naming the file and the fix."""


def rollouts_dir(path: str | Path) -> Path:
    """The directory holding ``step_N.jsonl`` files: ``path`` or, for a run directory, ``path/rollouts``."""
    p = Path(path)
    return p / DIR_NAME if (p / DIR_NAME).is_dir() else p


def step_file(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step}.jsonl"


def saved_steps(directory: str | Path) -> list[int]:
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := _STEP_FILE.match(p.name)))


def sample_record(step: int, sample: Sample) -> dict[str, Any]:
    row = {"step": step, **dataclasses.asdict(sample)}
    row["status"] = sample.status.value
    return row


def write_step(directory: str | Path, step: int, groups: list[Group]) -> Path:
    """Write ``groups`` as ``directory/step_{step}.jsonl`` (atomically) and return the path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    final = step_file(d, step)
    tmp = final.with_name(final.name + ".partial")
    with tmp.open("w", encoding="utf-8") as fh:
        for g in groups:
            for s in g.samples:
                fh.write(json.dumps(sample_record(step, s), default=str) + "\n")
    os.replace(tmp, final)
    return final


def read_step(directory: str | Path, step: int) -> list[Group]:
    """The groups ``write_step`` wrote for ``step`` (samples bit-equal to those written)."""
    path = step_file(directory, step)
    if not path.is_file():
        have = saved_steps(directory)
        raise SavedRolloutError(
            f"no saved rollout for step {step} ({path} is missing; {Path(directory)} holds steps "
            f"{have or 'none'}); run fewer steps or save more with run.debug_mode=rollout_only"
        )
    groups: list[Group] = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                unknown = set(row) - _SAMPLE_FIELDS - {"step"}
                if unknown:
                    raise ValueError(f"unknown field(s) {sorted(unknown)}")
                row.pop("step", None)
                row["status"] = SampleStatus(row.get("status", SampleStatus.COMPLETED.value))
                sample = Sample(**row)
            except (ValueError, TypeError) as exc:
                raise SavedRolloutError(
                    f"{path} line {n} is not a saved sample ({exc}); write it with write_step "
                    "(run.debug_mode=rollout_only or run.save_rollouts=true)"
                ) from None
            if not groups or groups[-1].group_id != sample.group_id:
                groups.append(Group(group_id=sample.group_id, prompt_index=sample.prompt_index, samples=[]))
            groups[-1].samples.append(sample)
    if not groups:
        raise SavedRolloutError(f"{path} holds no samples; save the rollout again")
    return groups
