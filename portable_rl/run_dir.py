"""The run directory: resolved config, metrics, curves, checkpoints — and the rules that protect it.

Layout::

    RUN_DIR/config.yaml          the fully resolved recipe (after overrides)
    RUN_DIR/metrics.jsonl        one line per step (see portable_rl.metrics)
    RUN_DIR/curves.png           reward / loss curves
    RUN_DIR/tb/                  tensorboard events
    RUN_DIR/checkpoints/step_N/  trainer + data state at the end of step N (written atomically): trainer/ (a
                                 Megatron distributed checkpoint + meta.json, any layout resumes it; see
                                 training.checkpoint), data_state.json, COMPLETE (last; what makes it complete)
    RUN_DIR/hf/                  the final model as a HF checkpoint
    RUN_DIR/rollouts/step_N.jsonl every sample of step N (run.save_rollouts, run.debug_mode=rollout_only;
                                 format: portable_rl.data.saved_rollouts)
    RUN_DIR/train.log            every attempt's log records and, for a failed one, its full traceback
    RUN_DIR/.lock                held (flock) by the live run, so a second command cannot use the directory

Rules:

* A fresh run refuses a RUN_DIR that holds a run with a complete checkpoint (pass ``--resume``), and one that
  a live run holds (its lock). A path that is a file is refused.
* A run that failed or was killed before its first complete checkpoint left nothing worth resuming: the same
  command (without ``--resume``) *replaces* it. ``prepare`` then removes only the entries a run writes
  (``RUN_OWNED``), never another file in the directory, and keeps ``train.log`` (appended to).
* ``--resume`` requires a complete checkpoint. Everything it checks is checked before ``prepare``; after it,
  nothing in the run is rewritten until the checkpoint is restored (``layout.json`` included), so a resume that
  fails leaves the run as it was (``train.log`` gains the attempt's log).
* Validation happens before ``prepare`` creates anything, so bad input never writes into a run dir.
"""

from __future__ import annotations

import fcntl
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import yaml

_STEP = re.compile(r"^step_(\d+)$")
LOG_NAME = "train.log"
LOCK_NAME = ".lock"
# What a run writes into its directory; a rerun that replaces a failed start removes these and nothing else.
RUN_OWNED = (
    "config.yaml",
    "checkpoints",
    "model",
    "layout.json",
    "metrics.jsonl",
    "rollouts.jsonl",
    "rollouts",
    "curves.png",
    "tb",
    "hf",
    "summary.json",
)


class RunDirError(ValueError):
    """The run directory cannot be used as asked; one line naming the path and the fix."""


@dataclass
class RunDir:
    path: Path
    _lock: IO[str] | None = field(default=None, repr=False, compare=False)

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

    @property
    def log_path(self) -> Path:
        return self.path / LOG_NAME

    def in_use(self) -> bool:
        """True while a live process holds this directory's lock (a killed one releases it with its death)."""
        lock = self.path / LOCK_NAME
        if not lock.is_file():
            return False
        with lock.open("r", encoding="utf-8") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
        return False

    def failed_start(self) -> bool:
        """The directory holds a run that ended (failed or killed) before its first complete checkpoint."""
        return self.holds_run() and self.last_checkpoint() is None and not self.in_use()

    def check(self, resume: bool) -> None:
        """Raise RunDirError if a fresh run would overwrite, or a resume has nothing to resume."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(
                f"run directory {str(self.path)!r} is not a directory (a file is in the way); "
                "choose another run.output_dir"
            )
        if self.in_use():
            raise RunDirError(
                f"run directory {str(self.path)!r} is in use by a running portable-rl train (it holds "
                f"{LOCK_NAME}); wait for it to end or choose another run.output_dir"
            )
        if resume and not self.holds_run():
            raise RunDirError(f"--resume: {str(self.path)!r} holds no run (no config.yaml); drop --resume")
        if resume and self.last_checkpoint() is None:
            # Starting over would truncate the run's metrics; a fresh run belongs in a fresh directory.
            raise RunDirError(
                f"--resume: {str(self.path)!r} has no complete checkpoint (checkpoints/step_N/COMPLETE) to "
                "resume from; run the same command without --resume to start that run over"
            )
        if not resume and self.holds_run() and not self.failed_start():
            raise RunDirError(
                f"run directory {str(self.path)!r} already holds a run; pass --resume or choose run.output_dir"
            )

    def prepare(self, resolved_config: dict, resume: bool = False) -> bool:
        """Create (or, for a failed start, replace) the run and take its lock; True when a failed start was
        replaced. Call ``check`` first: this assumes its rules hold."""
        replaced = not resume and self.failed_start()
        self.path.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        if replaced:
            for name in RUN_OWNED:
                target = self.path / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
        self.checkpoints.mkdir(exist_ok=True)
        if not self.holds_run():
            self.config_path.write_text(yaml.safe_dump(resolved_config, sort_keys=False), encoding="utf-8")
        return replaced

    def _take_lock(self) -> None:
        fh = (self.path / LOCK_NAME).open("a", encoding="utf-8")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise RunDirError(
                f"run directory {str(self.path)!r} is in use by another portable-rl train; choose another "
                "run.output_dir"
            ) from None
        self._lock = fh  # held until release() or this process ends (the kernel drops it then)

    def release(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None
