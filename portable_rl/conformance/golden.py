"""Golden run: the tiny recipe, end to end through ``portable-rl train``, reproduces its recorded metrics.

``golden.tiny_recipe`` runs ``portable-rl train examples/tiny_cpu.yaml`` in a subprocess (the launch script a
user runs: Ray, the engines, the Megatron trainer, weight sync, all of it) on the current platform and
compares each step's metrics with ``tests/golden/tiny_cpu_<platform>.json``. Measured: the largest
``|got - want| / max(1, |want|)`` over every recorded step and metric (wall-clock metrics are not recorded).
A missing step or metric counts as infinite.

It needs the training loop (``portable_rl.train``), the recipe and a golden file for the platform; without
one the check is skipped, naming the file. Record one (on a machine you trust, after the other checks pass):

    python -m portable_rl.conformance.golden --record [--platform cpu|cuda|rocm]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from portable_rl.conformance.registry import Context, Measurement, register
from portable_rl.platform import Platform

RECIPE = "tiny_cpu"
REPO = Path(__file__).resolve().parents[2]
RECIPE_PATH = REPO / "examples" / f"{RECIPE}.yaml"
SCHEMA = 1


def golden_path(platform_name: str) -> Path:
    return REPO / "tests" / "golden" / f"{RECIPE}_{platform_name}.json"


def is_recorded_metric(key: str, value: Any) -> bool:
    """Numbers that a rerun must reproduce: everything but wall-clock times and rates."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return not (key.startswith("time_") or key.endswith(("_s", "_per_s", "per_sec")) or "time" in key)


def run_recipe(platform_name: str, out_dir: Path, timeout_s: float = 1800) -> list[dict[str, Any]]:
    """Run the recipe through the CLI in a subprocess; return its per-step metrics (metrics.jsonl)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PORTABLE_RL_PLATFORM": platform_name}
    cmd = [
        sys.executable,
        "-m",
        "portable_rl.cli",
        "train",
        str(RECIPE_PATH),
        f"run.output_dir={out_dir}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"`portable-rl train {RECIPE_PATH.name}` exited with {proc.returncode}:\n{tail}")
    from portable_rl.metrics import read_metrics

    return read_metrics(out_dir / "metrics.jsonl")


def recorded_steps(history: list[dict[str, Any]]) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in h.items() if k == "step" or is_recorded_metric(k, v)} for h in history]


def compare(got: list[dict[str, Any]], want: list[dict[str, float]]) -> tuple[float, str]:
    """Worst relative difference of ``got`` from the golden steps, and where it is."""
    by_step = {int(h["step"]): h for h in got}
    worst, where = 0.0, "all steps equal"
    for ref in want:
        step = int(ref["step"])
        row = by_step.get(step)
        for key, value in ref.items():
            if key == "step":
                continue
            if row is None or key not in row:
                return math.inf, f"step {step}: {key} missing"
            err = abs(float(row[key]) - value) / max(1.0, abs(value))
            if err > worst or math.isnan(err):
                worst, where = err, f"step {step} {key}: {float(row[key]):.6g} vs golden {value:.6g}"
                if math.isnan(err):
                    return math.inf, where
    return worst, where


def _golden_available(platform: Platform) -> str | None:
    if not RECIPE_PATH.is_file():
        return f"recipe {RECIPE_PATH} not found (run from a source checkout)"
    path = golden_path(platform.name)
    if not path.is_file():
        return (
            f"no golden file {path.relative_to(REPO)}; record one with "
            f"`python -m portable_rl.conformance.golden --record --platform {platform.name}`"
        )
    return None


@register(
    "golden.tiny_recipe",
    f"worst relative difference of `portable-rl train {RECIPE}.yaml` per-step metrics from "
    f"tests/golden/{RECIPE}_<platform>.json",
    requires=("portable_rl.train", "portable_rl.commands.train"),
    depends_on="the training loop (portable_rl.train) and a golden file for the platform",
    markers=("slow",),
    available=_golden_available,
)
def check_golden(ctx: Context, dtype: str | None) -> Measurement:
    import portable_rl.conformance.golden as this  # meta-tests patch run_recipe

    golden = json.loads(golden_path(ctx.platform.name).read_text(encoding="utf-8"))
    history = this.run_recipe(ctx.platform.name, ctx.workdir / "golden-run")
    err, where = compare(history, golden["steps"])
    return Measurement(err, where)


def record(platform_name: str, out_dir: Path) -> Path:
    """Run the recipe and write its golden file (with the versions it was recorded under)."""
    from portable_rl.conformance.report import package_versions

    history = run_recipe(platform_name, out_dir)
    if not history:
        raise RuntimeError("the recipe produced no steps; nothing to record")
    path = golden_path(platform_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "schema": SCHEMA,
        "recipe": f"examples/{RECIPE}.yaml",
        "platform": platform_name,
        "versions": package_versions(),
        "steps": recorded_steps(history),
    }
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    import tempfile

    from portable_rl.platform import current_platform

    p = argparse.ArgumentParser(
        prog="python -m portable_rl.conformance.golden", description=__doc__.split("\n")[0]
    )
    p.add_argument("--record", action="store_true", help="run the recipe and (over)write the golden file")
    p.add_argument("--platform", choices=("auto", "cpu", "cuda", "rocm"), default="auto")
    args = p.parse_args(argv)
    if not args.record:
        p.print_help()
        return 2
    os.environ["PORTABLE_RL_PLATFORM"] = args.platform
    name = current_platform().name
    with tempfile.TemporaryDirectory(prefix="golden-") as tmp:
        path = record(name, Path(tmp) / "run")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
