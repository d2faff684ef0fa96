"""Framework overhead of one training step: wall step time / (generate + train + raw sync), one run.

Run: ``python benchmarks/bench_step_overhead.py [--recipe examples/tiny_cpu.yaml] [--steps 6] [overrides...]``

Trains the recipe with ``portable-rl train`` (the real loop: Ray, engines behind the router, Megatron, weight
sync), reads each step's ``time_generate_s`` / ``time_train_s`` / ``time_step_s`` from metrics.jsonl, and
measures in the same process run the raw floor for moving the model's bytes: one single-tensor broadcast of
the exported model's size with the platform's collective backend (``bench_weight_sync.time_raw_broadcast``).
The ratio wall / (generate + train + raw sync) is what the loop costs beyond the three unavoidable pieces
(orchestration, batching, bookkeeping, the sync's HTTP protocol and engine-side load). Medians over steps
2..N-1: step 1 includes warm-up, and step N also writes the run's final checkpoint (0.1-0.2 s on the tiny recipe,
once per run, not per step; kept in, it shifts the median wall step of a few steps up by one rank).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_weight_sync import time_raw_broadcast  # noqa: E402

from portable_rl.platform import current_platform  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def measure(recipe: str, steps: int, overrides: list[str] | None = None) -> dict[str, float]:
    """Median seconds of generate / train / sync / wall over steps 2..N-1, the raw broadcast, and model bytes."""
    if steps < 3:
        raise ValueError(f"steps={steps}: need at least 3 (step 1 warms up, the last one also checkpoints)")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "portable_rl", "train", recipe, "--output-dir", str(run_dir)]
        cmd += [f"run.steps={steps}", *(overrides or [])]
        subprocess.run(
            cmd, check=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, stdout=subprocess.DEVNULL
        )
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:-1]
        model_bytes = sum(p.stat().st_size for p in (run_dir / "hf").glob("*.safetensors"))
    return {
        "raw": statistics.median(time_raw_broadcast(model_bytes, 5, current_platform().dist_backend)),
        "generate": statistics.median(r["time_generate_s"] for r in rows),
        "train": statistics.median(r["time_train_s"] for r in rows),
        "sync": statistics.median(r["time_sync_s"] for r in rows),
        "wall": statistics.median(r["time_step_s"] for r in rows),
        "model_bytes": float(model_bytes),
        "steps_measured": float(len(rows)),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "examples" / "tiny_cpu.yaml"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if args.steps < 3:
        ap.error(f"--steps {args.steps}: use 3 or more (step 1 warms up, the last one also checkpoints)")
    m = measure(args.recipe, args.steps, args.overrides)
    raw, gen, train, sync, wall = m["raw"], m["generate"], m["train"], m["sync"], m["wall"]
    model_bytes = m["model_bytes"]
    print(
        f"recipe {Path(args.recipe).name}, {int(m['steps_measured'])} steps measured, "
        f"model {model_bytes / 2**20:.1f} MiB"
    )
    print(f"| {'piece':<34} | {'median s':>9} |")
    print(f"|{'-' * 36}|{'-' * 11}|")
    for name, value in (
        ("generate", gen),
        ("train", train),
        ("weight sync (through the engine)", sync),
        ("raw broadcast of the same bytes", raw),
        ("wall step", wall),
    ):
        print(f"| {name:<34} | {value:>9.3f} |")
    print(f"wall / (generate + train + raw sync) = {wall / (gen + train + raw):.2f}")
    print(f"weight sync / raw broadcast          = {sync / raw:.1f}")


if __name__ == "__main__":
    main()
