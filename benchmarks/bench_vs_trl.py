"""portable_rl vs TRL's GRPOTrainer: GRPO samples/s on the same model, prompts, group size, lengths and machine.

Run: ``python benchmarks/bench_vs_trl.py [--recipe examples/smollm2_arithmetic_cpu.yaml] [--steps 3]
[--prompts 2] [--group-size 4] [--max-tokens 48] [--micro-batch N] [--threads N] [--quick] [--markdown OUT.md]``
(needs ``pip install -e .[bench]`` for ``trl``).

Both sides get one workload, built from one portable_rl recipe (``Workload`` + ``load_workload``):

* portable_rl runs the recipe through the real path (``portable-rl train``: Ray, the rollout engine behind the
  router, Megatron, weight sync) in a subprocess; samples/s per step is ``num_samples / time_step_s`` from
  metrics.jsonl. Step 1 (warm-up) and the last step (it writes the final checkpoint) are not measured.
* TRL 1.16 ``GRPOTrainer`` in its default colocated mode (Hugging Face ``generate``, no vLLM) runs in a second
  subprocess; a callback times every optimizer step. Step 1 (warm-up) is not measured.
* Same on both: checkpoint, prompt file and order (no shuffling, so step k trains the same prompts), prompts per
  step x group size = completions per optimizer step (``generation_batch_size``, one generation per optimizer
  step), max completion tokens, temperature / top-p / top-k, reward function (the recipe's, through portable_rl's
  reward hub), learning rate, Adam betas / eps, weight decay, grad clip, constant LR, training dtype, micro-batch
  (TRL: ``per_device_train_batch_size`` with gradient accumulation), loss (``token-mean`` -> TRL ``dapo``), clip
  range, KL coefficient (``beta``), seed, torch threads = the machine's cores. TRL's 1.16 defaults that would
  differ are set explicitly: ``gradient_checkpointing=False``, ``bf16=False`` for fp32, constant LR.
* Ray starts its workers at niceness 15; on a machine shared with other jobs that alone slows portable_rl's
  trainer and engine down, so the portable_rl run gets ``RAY_worker_niceness=0`` (the TRL process runs at 0).

Completions end at EOS on both sides, so their lengths differ: the table reports mean completion tokens and
generated tokens/s next to samples/s. Prints medians over the measured steps and the ratio portable_rl / TRL
(above 1 = portable_rl is faster).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform as pyplatform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = ROOT / "examples" / "smollm2_arithmetic_cpu.yaml"
LOSS_AGG_TO_TRL = {"token-mean": "dapo", "seq-mean-token-mean": "grpo", "seq-mean-token-sum-norm": "dr_grpo"}
DTYPE_TO_TRL = {"float32": (False, False), "bfloat16": (True, False), "float16": (False, True)}
QUICK = {"steps": 3, "prompts": 2, "group_size": 4, "max_tokens": 32}


@dataclass
class Workload:
    """What both sides run. ``None`` keeps the recipe's value; ``steps`` counts measured steps per side."""

    recipe: str = str(DEFAULT_RECIPE)
    steps: int = 3
    prompts: int | None = None
    group_size: int | None = None
    max_tokens: int | None = None
    micro_batch: int | None = None
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)

    def __post_init__(self) -> None:
        if not Path(self.recipe).is_file():
            raise ValueError(f"recipe {self.recipe!r} does not exist; pass --recipe with a recipe YAML file")
        for name in ("steps", "prompts", "group_size", "max_tokens", "micro_batch", "threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.group_size is not None and self.group_size < 2:
            raise ValueError(f"group_size={self.group_size} must be >= 2 (GRPO needs a group to compare)")


def portable_rl_overrides(w: Workload) -> list[str]:
    """Recipe overrides for the portable_rl run: the workload's sizes, fixed prompt order, no eval/filter."""
    out = [
        f"run.steps={w.steps + 2}",  # + warm-up step 1 + the last step, which writes the final checkpoint
        "run.save_every=0",
        "run.eval_every=0",
        "run.async_rollout=false",
        "data.train.shuffle=false",
        "rollout.filter=null",  # every step trains exactly prompts x group_size samples, as TRL does
        f"rollout.engine_args.num_threads={w.threads}",
    ]
    for key, value in (
        ("rollout.prompts_per_step", w.prompts),
        ("rollout.samples_per_prompt", w.group_size),
        ("rollout.max_new_tokens", w.max_tokens),
        ("train.micro_batch_size", w.micro_batch),
    ):
        if value is not None:
            out.append(f"{key}={value}")
    return out


def load_workload(w: Workload):
    """The portable_rl ``Recipe`` both sides are built from (the recipe file plus ``portable_rl_overrides``)."""
    from portable_rl.recipe import load_recipe

    recipe = load_recipe(w.recipe, portable_rl_overrides(w))
    batch = recipe.rollout.prompts_per_step * recipe.rollout.samples_per_prompt
    if batch % recipe.train.micro_batch_size:
        raise ValueError(
            f"micro_batch={recipe.train.micro_batch_size} does not divide prompts x group_size = {batch}; "
            "pick a divisor with --micro-batch"
        )
    return recipe


def train_dtype(recipe) -> str:
    """The trainer's dtype: ``train.dtype``, with ``auto`` resolved as the trainer does (the platform's default)."""
    if recipe.train.dtype != "auto":
        return recipe.train.dtype
    from portable_rl.platform import current_platform

    return current_platform().default_train_dtype


def trl_config_kwargs(recipe, w: Workload, output_dir: str, use_cpu: bool) -> dict[str, Any]:
    """``trl.GRPOConfig`` keyword arguments equal to ``recipe`` in everything that sets the work per step."""
    ro, tr, algo, opt = recipe.rollout, recipe.train, recipe.algo, recipe.train.optim
    if algo.advantage_estimator != "grpo":
        raise ValueError(
            f"algo.advantage_estimator={algo.advantage_estimator!r}: only grpo compares with TRL"
        )
    if algo.loss_agg not in LOSS_AGG_TO_TRL:
        raise ValueError(
            f"algo.loss_agg={algo.loss_agg!r} has no TRL loss_type; use {sorted(LOSS_AGG_TO_TRL)}"
        )
    dtype = train_dtype(recipe)
    if dtype not in DTYPE_TO_TRL:
        raise ValueError(f"train.dtype={dtype!r} has no TRL equivalent; use {sorted(DTYPE_TO_TRL)}")
    if ro.stop or ro.stop_token_ids:
        raise ValueError(
            "rollout.stop / stop_token_ids have no TRL equivalent here; clear them for this benchmark"
        )
    batch = ro.prompts_per_step * ro.samples_per_prompt
    bf16, fp16 = DTYPE_TO_TRL[dtype]
    return {
        "output_dir": output_dir,
        "max_steps": w.steps + 1,  # + warm-up step 1
        "num_generations": ro.samples_per_prompt,
        "per_device_train_batch_size": tr.micro_batch_size,
        "gradient_accumulation_steps": batch // tr.micro_batch_size,
        "generation_batch_size": batch,  # one generation of prompts x group per optimizer step
        "num_iterations": 1,
        "max_completion_length": ro.max_new_tokens,
        "temperature": ro.temperature,
        "top_p": ro.top_p,
        "top_k": max(ro.top_k, 0),  # portable_rl -1 = TRL 0 = no top-k
        "use_vllm": False,
        "use_transformers_continuous_batching": False,
        "learning_rate": opt.lr,
        "lr_scheduler_type": "constant" if opt.warmup_steps == 0 else "constant_with_warmup",
        "warmup_steps": opt.warmup_steps,
        "adam_beta1": opt.adam_beta1,
        "adam_beta2": opt.adam_beta2,
        "adam_epsilon": opt.adam_eps,
        "weight_decay": opt.weight_decay,
        "max_grad_norm": opt.clip_grad,
        "beta": algo.kl_coef,
        "epsilon": algo.clip_eps_low,
        "epsilon_high": algo.clip_eps_high,
        "loss_type": LOSS_AGG_TO_TRL[algo.loss_agg],
        "scale_rewards": "group" if algo.grpo_normalize_std else "none",
        "gradient_checkpointing": False,  # TRL 1.16 defaults to True; portable_rl does not recompute
        "bf16": bf16,
        "fp16": fp16,
        "model_init_kwargs": {"dtype": dtype},
        "shuffle_dataset": False,
        "seed": recipe.run.seed,
        "use_cpu": use_cpu,
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "eval_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "log_completions": False,
    }


def trl_dataset_rows(recipe) -> list[dict[str, Any]]:
    """The recipe's training prompts as TRL rows: conversational prompts (TRL applies the same chat template)."""
    from portable_rl.data.prompts import read_prompt_file

    cfg = recipe.data.train
    rows = []
    records = read_prompt_file(cfg.path, cfg.prompt_key, cfg.label_key, cfg.apply_chat_template).records
    for rec in records:
        prompt = rec.prompt
        if cfg.apply_chat_template and isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        rows.append({"prompt": prompt, "label": rec.label})
    return rows


class TrlReward:
    """The recipe's reward (portable_rl's reward hub) behind TRL's ``fn(prompts, completions, label, ...)``."""

    __name__ = "portable_rl_reward"

    def __init__(self, spec: str, options: dict[str, Any]) -> None:
        from portable_rl.rollout.rewards import load_reward_fn

        self.fn = load_reward_fn(spec, **options)

    def __call__(self, prompts, completions, label, **_: Any) -> list[float]:
        from portable_rl.rollout.rewards import call_reward

        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]

        async def score() -> list[float]:
            return list(
                await asyncio.gather(
                    *(call_reward(self.fn, t, y, None) for t, y in zip(texts, label, strict=True))
                )
            )

        return asyncio.run(score())


# ---- results -----------------------------------------------------------------------------------------------
@dataclass
class SideResult:
    """Per measured step: wall seconds, completions and mean completion tokens; plus the load around the run."""

    side: str
    step_s: list[float]
    samples: list[float]
    completion_tokens: list[float]
    reward: list[float] = field(default_factory=list)
    breakdown_s: dict[str, float] = field(default_factory=dict)  # median seconds per part of a step, if known
    notes: list[str] = field(default_factory=list)  # events that make the timing suspect (engine restarts)
    load_before: tuple[float, float, float] | None = None
    load_after: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if not self.step_s:
            raise ValueError(f"{self.side}: no measured steps; run more steps (--steps)")
        if not len(self.step_s) == len(self.samples) == len(self.completion_tokens):
            raise ValueError(f"{self.side}: per-step lists differ in length")

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_s)

    @property
    def samples_per_s(self) -> float:
        return statistics.median(n / t for n, t in zip(self.samples, self.step_s, strict=True))

    @property
    def best_step_s(self) -> float:
        return min(self.step_s)

    @property
    def best_samples_per_s(self) -> float:
        return max(n / t for n, t in zip(self.samples, self.step_s, strict=True))

    @property
    def tokens_per_s(self) -> float:
        return statistics.median(
            n * m / t for n, m, t in zip(self.samples, self.completion_tokens, self.step_s, strict=True)
        )

    @property
    def mean_completion_tokens(self) -> float:
        return statistics.fmean(self.completion_tokens)


def portable_rl_steps(rows: list[dict[str, Any]], side: str = "portable_rl") -> SideResult:
    """Measured steps from metrics.jsonl rows: all but step 1 (warm-up) and the last (final checkpoint)."""
    measured = sorted(rows, key=lambda r: r["step"])[1:-1]
    return SideResult(
        side=side,
        step_s=[r["time_step_s"] for r in measured],
        samples=[r["num_samples"] for r in measured],
        completion_tokens=[r["response_len_mean"] for r in measured],
        reward=[r["reward_mean"] for r in measured],
        breakdown_s={
            part: statistics.median(r[f"time_{part}_s"] for r in measured)
            for part in ("generate", "train", "sync")
            if measured and all(f"time_{part}_s" in r for r in measured)
        },
    )


def trl_steps(
    step_ends: list[float], log_history: list[dict[str, Any]], samples: int, side: str = "TRL"
) -> SideResult:
    """Measured steps from the step-end timestamps (first = train begin) and TRL's per-step logs, minus step 1."""
    durations = [b - a for a, b in zip(step_ends, step_ends[1:], strict=False)]
    logs = {h["step"]: h for h in log_history if "completions/mean_length" in h}
    if sorted(logs) != list(range(1, len(durations) + 1)):
        raise ValueError(f"{side}: expected one log per step 1..{len(durations)}, got steps {sorted(logs)}")
    return SideResult(
        side=side,
        step_s=durations[1:],
        samples=[float(samples)] * (len(durations) - 1),
        completion_tokens=[logs[s]["completions/mean_length"] for s in range(2, len(durations) + 1)],
        reward=[logs[s].get("reward", float("nan")) for s in range(2, len(durations) + 1)],
    )


def format_table(ours: SideResult, trl: SideResult) -> str:
    """Medians, the fastest step (on a shared machine the least disturbed one) and ratios portable_rl / TRL."""
    head = (
        f"| {'side':<12} | {'median step s':>13} | {'samples/s':>9} | {'mean compl. tokens':>18} "
        f"| {'tokens/s':>8} | {'steps':>5} | {'ratio samples/s':>15} | {'ratio tokens/s':>14} "
        f"| {'best step s':>11} | {'ratio best samples/s':>20} |"
    )
    lines = [head, "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"]
    for r in (ours, trl):
        lines.append(
            f"| {r.side:<12} | {r.median_step_s:>13.2f} | {r.samples_per_s:>9.3f} "
            f"| {r.mean_completion_tokens:>18.1f} | {r.tokens_per_s:>8.1f} | {len(r.step_s):>5} "
            f"| {r.samples_per_s / trl.samples_per_s:>15.2f} | {r.tokens_per_s / trl.tokens_per_s:>14.2f} "
            f"| {r.best_step_s:>11.2f} | {r.best_samples_per_s / trl.best_samples_per_s:>20.2f} |"
        )
    return "\n".join(lines)


def machine_facts() -> dict[str, str]:
    """CPU model, cores, RAM and the versions that decide speed, for results files."""
    cpu = pyplatform.processor() or pyplatform.machine()
    ram = ""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        cpu = next(
            (ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), cpu
        )
        kib = next(
            ln.split()[1]
            for ln in Path("/proc/meminfo").read_text().splitlines()
            if ln.startswith("MemTotal")
        )
        ram = f"{int(kib) / 2**20:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass  # not Linux: keep what platform.processor() says
    facts = {"cpu": cpu, "cores": str(os.cpu_count()), "ram": ram, "python": pyplatform.python_version()}
    for dist in ("torch", "transformers", "trl", "megatron-core", "ray", "accelerate"):
        try:
            facts[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            facts[dist] = "not installed"
    return facts


def load_average() -> tuple[float, float, float]:
    return tuple(round(x, 2) for x in os.getloadavg())  # type: ignore[return-value]


# ---- the two runs --------------------------------------------------------------------------------------------
def workload_args(w: Workload) -> list[str]:
    out = ["--recipe", w.recipe, "--steps", str(w.steps), "--threads", str(w.threads)]
    for flag, value in (
        ("--prompts", w.prompts),
        ("--group-size", w.group_size),
        ("--max-tokens", w.max_tokens),
        ("--micro-batch", w.micro_batch),
    ):
        if value is not None:
            out += [flag, str(value)]
    return out


def run_portable_rl(w: Workload, tmp: Path) -> SideResult:
    run_dir = tmp / "portable_rl"
    cmd = [sys.executable, "-m", "portable_rl", "train", w.recipe, "--output-dir", str(run_dir)]
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_worker_niceness": "0",
        "OMP_NUM_THREADS": str(w.threads),
    }
    before = load_average()
    log_path = tmp / "portable_rl.log"
    with log_path.open("w") as log:
        proc = subprocess.run(cmd + portable_rl_overrides(w), env=env, stdout=subprocess.DEVNULL, stderr=log)
    log_text = log_path.read_text(errors="replace")
    if proc.returncode:
        sys.stderr.write(log_text[-4000:])
        raise RuntimeError(f"portable-rl train exited with {proc.returncode} (its log's end is above)")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    result = portable_rl_steps(rows)
    result.load_before, result.load_after = before, load_average()
    result.notes = log_events(log_text)
    return result


def log_events(text: str) -> list[str]:
    """Lines of a portable_rl log that mean the step times include recovery work (engine fenced/replaced)."""
    return [line.strip() for line in text.splitlines() if "replaced engine" in line or "fencing it" in line]


def run_trl(w: Workload, tmp: Path) -> SideResult:
    out = tmp / "trl.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", "trl", "--result", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(w.threads), "TOKENIZERS_PARALLELISM": "false"}
    before = load_average()
    subprocess.run(cmd + workload_args(w), check=True, env=env)
    data = json.loads(out.read_text())
    result = SideResult(**{k: v for k, v in data.items() if k not in ("load_before", "load_after")})
    result.load_before, result.load_after = before, load_average()
    return result


def trl_side(w: Workload, result_path: Path) -> None:
    """Runs inside the TRL subprocess: train with GRPOTrainer and write the measured steps as JSON."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from portable_rl.orchestration.job import resolve_model
    from portable_rl.platform import current_platform
    from portable_rl.run_dir import RunDir

    torch.set_num_threads(w.threads)
    recipe = load_workload(w)
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as tmp:
        model_dir = resolve_model(recipe, RunDir(Path(tmp) / "model-run"))
        cfg = GRPOConfig(
            **trl_config_kwargs(recipe, w, str(Path(tmp) / "out"), current_platform().name == "cpu")
        )
        ends: list[float] = []

        class StepTimer(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                ends.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kwargs):
                ends.append(time.perf_counter())

        trainer = GRPOTrainer(
            model=str(model_dir),
            reward_funcs=TrlReward(recipe.rollout.reward, dict(recipe.rollout.reward_options)),
            args=cfg,
            train_dataset=Dataset.from_list(trl_dataset_rows(recipe)),
            processing_class=AutoTokenizer.from_pretrained(model_dir),
            callbacks=[StepTimer()],
        )
        if trainer.model.is_gradient_checkpointing:
            raise RuntimeError("TRL turned gradient checkpointing on; the comparison assumes it is off")
        trainer.train()
        batch = recipe.rollout.prompts_per_step * recipe.rollout.samples_per_prompt
        result = trl_steps(ends, trainer.state.log_history, batch)
    data = asdict(result)
    data.pop("load_before"), data.pop("load_after")
    result_path.write_text(json.dumps(data))


def measure(w: Workload, order: str = "trl-first") -> tuple[SideResult, SideResult]:
    """(portable_rl, TRL) results for workload ``w``, each side in its own subprocess, one after the other."""
    load_workload(w)  # a bad workload fails here, before either run starts
    with tempfile.TemporaryDirectory(prefix="bench-vs-trl-") as tmp:
        if order == "trl-first":
            trl = run_trl(w, Path(tmp))
            ours = run_portable_rl(w, Path(tmp))
        else:
            ours = run_portable_rl(w, Path(tmp))
            trl = run_trl(w, Path(tmp))
    return ours, trl


def describe(w: Workload) -> str:
    r = load_workload(w)
    ro = r.rollout
    return (
        f"model {r.model.path}, {ro.prompts_per_step} prompts x {ro.samples_per_prompt} = "
        f"{ro.prompts_per_step * ro.samples_per_prompt} completions/step, max {ro.max_new_tokens} new tokens, "
        f"temperature {ro.temperature}, lr {r.train.optim.lr}, micro-batch {r.train.micro_batch_size}, "
        f"{train_dtype(r)}, {w.threads} threads, {w.steps} measured steps per side"
    )


def markdown_report(w: Workload, ours: SideResult, trl: SideResult, command: str) -> str:
    facts = machine_facts()
    lines = [
        "# portable_rl vs TRL GRPOTrainer (CPU)",
        "",
        f"Command: `{command}`",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in facts.items()),
        "",
        f"Workload: {describe(w)}.",
        "",
        format_table(ours, trl),
        "",
        f"- Load average (1/5/15 min) around the runs: TRL {trl.load_before} -> {trl.load_after}; "
        f"portable_rl {ours.load_before} -> {ours.load_after}, on {facts['cores']} cores. Above the core count "
        "means other jobs shared the machine; both sides then lose time, not necessarily equally.",
        f"- Per-step seconds: portable_rl {[round(t, 2) for t in ours.step_s]}, "
        f"TRL {[round(t, 2) for t in trl.step_s]}.",
        "- portable_rl step parts (median s): "
        + ", ".join(f"{k} {v:.2f}" for k, v in ours.breakdown_s.items())
        + ".",
        "- portable_rl engine recoveries during the run (timings include them): "
        + ("; ".join(ours.notes) if ours.notes else "none")
        + ".",
        f"- Mean reward per measured step: portable_rl {[round(x, 3) for x in ours.reward]}, "
        f"TRL {[round(x, 3) for x in trl.reward]}.",
        "",
        "How the two sides are kept equal: see the docstring of `benchmarks/bench_vs_trl.py` (same recipe-derived "
        "workload, prompt order, sampling, optimizer, loss, dtype, micro-batch and threads; TRL's "
        "`gradient_checkpointing` off; Ray workers at niceness 0 like the TRL process). Completions stop at EOS "
        "on both sides, so compare tokens/s as well as samples/s.",
    ]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(DEFAULT_RECIPE))
    ap.add_argument("--steps", type=int, help="measured steps per side, after warm-up (default 3)")
    ap.add_argument("--prompts", type=int, help="prompts per step (default: the recipe's)")
    ap.add_argument("--group-size", type=int, help="completions per prompt (default: the recipe's)")
    ap.add_argument("--max-tokens", type=int, help="max completion tokens (default: the recipe's)")
    ap.add_argument("--micro-batch", type=int, help="training micro-batch (default: the recipe's)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true", help=f"defaults {QUICK} (explicit flags still win)")
    ap.add_argument("--order", choices=["trl-first", "portable_rl-first"], default="trl-first")
    ap.add_argument("--markdown", default=None, help="also write the result as markdown to this file")
    ap.add_argument("--side", choices=["trl"], help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    return ap


def workload_from_args(args: argparse.Namespace) -> Workload:
    """Explicit flags, else the ``--quick`` sizes, else 3 measured steps at the recipe's own sizes."""
    defaults = QUICK if args.quick else {"steps": 3, "prompts": None, "group_size": None, "max_tokens": None}
    sizes = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}
    return Workload(recipe=args.recipe, micro_batch=args.micro_batch, threads=args.threads, **sizes)


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        w = workload_from_args(args)
        load_workload(w)
    except ValueError as exc:
        ap.exit(2, f"bench_vs_trl: error: {exc}\n")
    if args.side == "trl":
        trl_side(w, Path(args.result))
        return
    ours, trl = measure(w, args.order)
    print(f"\nGRPO step throughput: {describe(w)}; medians over measured steps")
    print(format_table(ours, trl))
    if ours.notes:
        print(f"warning: portable_rl's engine was fenced/replaced during the run: {ours.notes}")
    print(
        f"load average before/after: TRL {trl.load_before}/{trl.load_after}, "
        f"portable_rl {ours.load_before}/{ours.load_after}"
    )
    if args.markdown:
        command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown_report(w, ours, trl, command))


if __name__ == "__main__":
    main()
