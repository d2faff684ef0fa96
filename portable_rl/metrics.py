"""Run metrics: one JSONL line per step, tensorboard scalars, optional wandb, and a reward/loss curve PNG.

``MetricsLogger(run_dir)`` appends to ``metrics.jsonl`` (so a resumed run continues the same file, after
dropping lines of steps that will be re-run), writes tensorboard events under ``tb/`` and redraws
``curves.png`` on ``close()``. wandb is used only if asked for and installed.

``log_rollout(step, groups)`` appends one line per trained group to ``rollouts.jsonl`` (prompt index, rewards,
response lengths, the weight version that generated each sample and the ``[start, end, version]`` spans of its
model tokens, the count of model tokens (loss mask 1), the first response's text): what a user
reads to see what the policy says, and what tests read to prove every prompt was trained exactly once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


class MetricsLogger:
    def __init__(
        self, run_dir: str | Path, *, resume_after_step: int | None = None, wandb_project: str | None = None
    ):
        self.dir = Path(run_dir)
        self.path = self.dir / "metrics.jsonl"
        if resume_after_step is not None:
            # Steps after the checkpoint are re-run; keep exactly the lines up to it.
            for path in (self.path, self.dir / "rollouts.jsonl"):
                kept = [r for r in read_metrics(path) if r.get("step", 0) <= resume_after_step]
                path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.dir / "tb"))
        except ImportError:  # tensorboard is a dependency, but a trimmed image may lack it
            self._tb = None
        self._wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ValueError(
                    "run.wandb_project is set but wandb is not installed; pip install wandb"
                ) from None
            self._wandb = wandb.init(project=wandb_project, dir=str(self.dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(row, step=step)

    def log_rollout(self, step: int, groups: list[Any]) -> None:
        with (self.dir / "rollouts.jsonl").open("a", encoding="utf-8") as fh:
            for g in groups:
                row = {
                    "step": step,
                    "prompt_index": g.prompt_index,
                    "group_id": g.group_id,
                    "rewards": [s.reward for s in g.samples],
                    "response_lengths": [s.response_length for s in g.samples],
                    "weight_versions": [s.weight_version for s in g.samples],
                    # [start, end, version] of each sample's model-token spans (partial rollouts: several)
                    "weight_spans": [s.metadata.get("weight_spans", []) for s in g.samples],
                    "model_tokens": [
                        sum(s.loss_mask) for s in g.samples
                    ],  # loss mask 1: sampled by the model
                    "response": g.samples[0].response_text if g.samples else "",
                }
                fh.write(json.dumps(row) + "\n")

    def close(self) -> None:
        plot_curves(self.path, self.dir / "curves.png")
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    return v


def plot_curves(
    metrics_path: str | Path, out_png: str | Path, keys: tuple[str, ...] = ("reward_mean", "loss")
) -> None:
    """Draw each of ``keys`` (and eval_reward_mean if present) against step into one PNG."""
    rows = read_metrics(metrics_path)
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [k for k in (*keys, "eval_reward_mean") if any(k in r for r in rows)]
    fig, axes = plt.subplots(len(shown) or 1, 1, figsize=(6, 2.4 * max(len(shown), 1)), squeeze=False)
    for ax, key in zip(axes[:, 0], shown, strict=False):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
