"""The run directory: resolved config, metrics, curves, checkpoints — and the rules that protect it.

Layout::

    RUN_DIR/config.yaml          the fully resolved recipe (after overrides)
    RUN_DIR/metrics.jsonl        one line per step (see portable_rl.metrics)
    RUN_DIR/curves.png           reward / loss curves
    RUN_DIR/tb/                  tensorboard events
    RUN_DIR/checkpoints/step_N/  trainer + data state at the end of step N (written atomically)
    RUN_DIR/hf/                  the final model as a HF checkpoint

A fresh run refuses a RUN_DIR that already holds a run (so nothing is overwritten); ``--resume`` requires
one with a complete checkpoint; a path that is a file is refused. Validation happens before ``prepare``
creates anything, so bad input never writes into a run dir.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

_STEP = re.compile(r"^step_(\d+)$")


class RunDirError(ValueError):
    """The run directory cannot be used as asked; one line naming the path and the fix."""


@dataclass
class RunDir:
    path: Path

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def holds_run(self) -> bool:
        return self.config_path.is_file()

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"step_{step}"

    def last_checkpoint(self) -> tuple[int, Path] | None:
        if not self.checkpoints.is_dir():
            return None
        steps = [
            (int(m.group(1)), p)
            for p in self.checkpoints.iterdir()
            if (m := _STEP.match(p.name)) and (p / "COMPLETE").is_file()
        ]
        return max(steps) if steps else None

    def check(self, resume: bool) -> None:
        """Raise RunDirError if a fresh run would overwrite, or a resume has nothing to resume."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(
                f"run directory {str(self.path)!r} is not a directory (a file is in the way); "
                "choose another run.output_dir"
            )
        if resume and not self.holds_run():
            raise RunDirError(f"--resume: {str(self.path)!r} holds no run (no config.yaml); drop --resume")
        if resume and self.last_checkpoint() is None:
            # Starting over would truncate the run's metrics; a fresh run belongs in a fresh directory.
            raise RunDirError(
                f"--resume: {str(self.path)!r} has no complete checkpoint (checkpoints/step_N/COMPLETE) to "
                "resume from; start a new run in another run.output_dir (run.save_every sets the cadence)"
            )
        if not resume and self.holds_run():
            raise RunDirError(
                f"run directory {str(self.path)!r} already holds a run; pass --resume or choose run.output_dir"
            )

    def prepare(self, resolved_config: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(exist_ok=True)
        if not self.holds_run():
            self.config_path.write_text(yaml.safe_dump(resolved_config, sort_keys=False), encoding="utf-8")
