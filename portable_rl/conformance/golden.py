"""Golden run: the tiny recipe, end to end through ``portable-rl train``, reproduces its recorded metrics.

``golden.tiny_recipe`` runs ``portable-rl train examples/tiny_cpu.yaml`` in a subprocess (the launch script a
user runs: Ray, the engines, the Megatron trainer, weight sync, all of it) on the current platform and
compares each step's metrics with ``tests/golden/tiny_cpu_<platform>.json``.

Bounds: every recorded metric has its own bound in ``METRIC_BOUNDS``, ``|got - want| <= atol + rtol * |want|``,
in the metric's own units and chosen for what its value means (counts and rewards of identical samples are
exact; fp32 reductions get a few ulps; metrics that are zero by construction, such as GRPO's mean advantage,
get an absolute bound on the scale of the terms they sum, never a share of their own rounding noise). The
measurement is the worst ``|got - want| / bound`` over every step and metric, so 1.0 is the edge of the
bounds and the tolerance; a difference where the bound is 0, a NaN, or a missing step or metric is infinite.
A golden metric without a bound is an error that names it.

The recipe learns (a reward the random model earns about half of, weight checks on): a golden file must show
it. ``record`` refuses a run where a step has no gradient, zero advantages, unchanged weights or an engine
whose weights differ from the trainer's, so a golden run can never again pin a model that does not train.

It needs the training loop (``portable_rl.train``), the recipe and a golden file for the platform; without
one the check is skipped, naming the file: an expected skip on a platform nobody recorded yet, an unexpected
one (a failure under ``--fail-on-unexpected-skip`` and in pytest) where the repository holds the file
(``RECORDED_PLATFORMS``). Record one (on a machine you trust, after the other checks pass):

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
from typing import Any, NamedTuple

from portable_rl.conformance.registry import Context, ExpectedSkip, Measurement, register
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


class Bound(NamedTuple):
    """``|got - want| <= atol + rtol * |want|``."""

    atol: float
    rtol: float


EXACT = Bound(0.0, 0.0)
FP32 = Bound(0.0, 1e-5)  # an fp32 mean or norm of O(1) terms: ~80 ulps of slack for reduction order
ZERO_BY_CONSTRUCTION = Bound(1e-6, 0.0)  # sums of O(1) advantages that cancel: their scale, not the residue's
REWARD = Bound(1e-12, 0.0)  # float64 sums of exact per-sample rewards

METRIC_BOUNDS: dict[str, Bound] = {
    # What the engines generated: identical seeds and weights give identical tokens.
    "num_samples": EXACT,
    "num_response_tokens": EXACT,
    "num_tokens": EXACT,
    "response_len_mean": EXACT,
    "truncated_frac": EXACT,
    "zero_std_group_frac": EXACT,
    "rollout/groups": EXACT,
    "rollout/prompts_launched": EXACT,
    "rollout/groups_filtered": EXACT,
    "rollout/groups_surplus": EXACT,
    "rollout/groups_aborted": EXACT,
    "rollout/errors": EXACT,
    "rollout/generated_tokens": EXACT,
    "rollout/rewarded_samples": EXACT,
    "engine_restarts": EXACT,
    "prompts_requeued": EXACT,
    # Rewards of those tokens.
    "reward_mean": REWARD,
    "reward_std": REWARD,
    "rollout/reward_sum": REWARD,
    "rollout/reward_mean": REWARD,
    # The trainer's step.
    "lr": EXACT,
    "entropy": FP32,  # ~5.8 nats per token
    "loss_fn/entropy": FP32,
    "grad_norm": FP32,  # ~2; a step from other weights or other advantages moves it by far more
    "advantage_abs_mean": FP32,  # ~0.75: the signal GRPO trains on
    "advantage_mean": ZERO_BY_CONSTRUCTION,  # group-normalised advantages cancel
    "return_mean": ZERO_BY_CONSTRUCTION,
    "loss": ZERO_BY_CONSTRUCTION,  # at ratio 1 the policy loss is -mean(advantage): it cancels too
    "pg_loss": ZERO_BY_CONSTRUCTION,
    "ppo_kl": Bound(1e-7, 0.0),  # old log-probs are the current ones, detached: 0 up to rounding
    "pg_clipfrac": EXACT,  # a fraction of tokens; 0 at ratio 1
    # Engine log-probs against the trainer's for the same tokens: fp32 rounding of two implementations
    # (~3e-7); an engine that missed one optimizer step is orders of magnitude further off.
    "logp_abs_diff": Bound(2e-6, 0.0),
    # Checks of the run itself (run.check_weight_update): every tensor changed, every engine bit-equal.
    "weights_changed_frac": EXACT,
    "weight_check_ok": EXACT,
}

# What a golden run must show at every step, or it pins a run that does not learn (see module docstring).
LEARNING_SIGNALS = ("grad_norm", "advantage_abs_mean", "weights_changed_frac")


def bound_for(key: str) -> Bound:
    bound = METRIC_BOUNDS.get(key)
    if bound is None:
        raise KeyError(
            f"golden metric {key!r} has no bound; add one to METRIC_BOUNDS in portable_rl/conformance/golden.py"
        )
    return bound


def compare(got: list[dict[str, Any]], want: list[dict[str, float]]) -> tuple[float, str]:
    """Worst ``|got - want| / bound`` over the golden steps and metrics, and where it is (module docstring)."""
    by_step = {int(h["step"]): h for h in got}
    worst, where = 0.0, "every metric within its bound"
    outside: list[str] = []
    for ref in want:
        step = int(ref["step"])
        row = by_step.get(step)
        for key, value in ref.items():
            if key == "step":
                continue
            bound = bound_for(key)
            if row is None or key not in row:
                return math.inf, f"step {step}: {key} missing"
            got_value = float(row[key])
            diff = abs(got_value - value)
            allowed = bound.atol + bound.rtol * abs(value)
            if math.isnan(diff):
                err = math.inf
            elif allowed == 0.0:
                err = 0.0 if diff == 0.0 else math.inf
            else:
                err = diff / allowed
            line = f"step {step} {key}: {got_value:.9g} vs golden {value:.9g} (bound {allowed:.3g})"
            if err > 1.0:
                outside.append(line)
            if err > worst:
                worst, where = err, line
    if outside:  # the worst alone may hide what broke first; list the earliest too
        where += f"; {len(outside)} values outside their bounds, first: " + "; ".join(outside[:4])
    return worst, where


def learning_problems(steps: list[dict[str, float]]) -> list[str]:
    """Why ``steps`` cannot be a golden run (no gradient, no advantages, unchanged or unsynced weights)."""
    problems = []
    for row in steps:
        for key in LEARNING_SIGNALS:
            if not row.get(key, 0.0) > 0.0:
                problems.append(f"step {int(row['step'])}: {key}={row.get(key)}")
        if row.get("weight_check_ok") != 1.0:
            problems.append(f"step {int(row['step'])}: weight_check_ok={row.get('weight_check_ok')}")
    return problems


# Platforms whose golden file the repository holds: for them a missing file is a breakage (an unexpected
# skip), for the others it is not recorded yet (an expected one). A unit test keeps this equal to the files.
RECORDED_PLATFORMS = ("cpu",)


def _golden_available(platform: Platform) -> str | None:
    if not RECIPE_PATH.is_file():
        return f"recipe {RECIPE_PATH} not found (run from a source checkout)"
    path = golden_path(platform.name)
    if not path.is_file():
        how = f"`python -m portable_rl.conformance.golden --record --platform {platform.name}`"
        if platform.name in RECORDED_PLATFORMS:
            return f"no golden file {path.relative_to(REPO)}, which the repository holds: restore it or {how}"
        return ExpectedSkip(f"no golden file {path.relative_to(REPO)} recorded yet; record one with {how}")
    return None


@register(
    "golden.tiny_recipe",
    f"worst difference of `portable-rl train {RECIPE}.yaml` per-step metrics from "
    f"tests/golden/{RECIPE}_<platform>.json, in units of each metric's bound (1 = at the bound)",
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
    steps = recorded_steps(history)
    unbounded = sorted({k for row in steps for k in row if k != "step" and k not in METRIC_BOUNDS})
    if unbounded:
        raise RuntimeError(
            f"metrics without a bound: {', '.join(unbounded)}; add them to METRIC_BOUNDS first"
        )
    problems = learning_problems(steps)
    if problems:
        raise RuntimeError(
            "the recipe did not train, so it cannot be golden ("
            + "; ".join(problems[:5])
            + "); give it a reward the model earns part of the time and run.check_weight_update: true"
        )
    path = golden_path(platform_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "schema": SCHEMA,
        "recipe": f"examples/{RECIPE}.yaml",
        "platform": platform_name,
        "versions": package_versions(),
        "steps": steps,
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
