"""The training recipe: one YAML file, one typed config tree, identical on every platform.

Sections and where their dataclasses live (every one under ``portable_rl.config`` or here, so the recipe
imports no runtime code)::

    model:        ModelConfig (here)                      which checkpoint: tiny | smollm2 | a HF dir
    data:         DataConfig (here) of PromptConfig        train / eval prompt files (config.data)
    rollout:      RolloutConfig (config.rollout)           samples per prompt, sampling, engines, rewards
    train:        TrainConfig (here) of Parallel/Optim/CriticConfig (config.training)  parallelism, optimizer, critic
    algo:         AlgoConfig (config.algo)                 advantages, losses, KL, TIS
    weight_sync:  WeightSyncConfig (config.weight_sync)
    run:          RunConfig (here)                          steps, mode, async, eval/save cadence, output dir
    placement:    NodePlacementConfig (config.placement)   which cluster nodes host the trainer / the engines

``load_recipe(path, overrides)`` reads the YAML, applies ``section.key=value`` and ``--sglang-*`` /
``--megatron-*`` overrides, builds the tree with type checks and "did you mean" errors, and runs the
cross-section checks (e.g. co-located mode cannot be async). Every error is a one-line ``ConfigError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portable_rl.config import refuse_non_finite
from portable_rl.config.algo import AlgoConfig
from portable_rl.config.data import LONG_PROMPTS, EvalSetConfig, PromptConfig
from portable_rl.config.placement import NodePlacementConfig
from portable_rl.config.rollout import RolloutConfig
from portable_rl.config.training import (
    TRAINER_ATTENTION,
    CriticConfig,
    OptimConfig,
    ParallelConfig,
    share_prompt_prefix_refusal,
)
from portable_rl.config.weight_sync import WeightSyncConfig
from portable_rl.config_loader import ConfigError, apply_overrides, build, load_yaml

MODES = ("colocated", "disaggregated")
# run.debug_mode: the whole loop, generation only (no trainer), or training only on saved rollouts (no engines).
DEBUG_MODES = ("none", "rollout_only", "train_only")


@dataclass
class ModelConfig:
    path: str = "tiny"  # "tiny" (random init, built in-process), "smollm2" (shipped demo model) or a HF dir
    tiny_arch: str = "llama"  # one of portable_rl.models.tiny.TINY_ARCHS, for path="tiny"
    tiny_seed: int = 0

    def __post_init__(self) -> None:
        refuse_non_finite(self, "model.")
        archs = (
            "llama",
            "qwen2",
            "qwen3",
            "qwen2_moe",
            "qwen3_moe",
        )  # models.tiny.TINY_ARCHS (a lower layer)
        if self.tiny_arch not in archs:
            raise ValueError(f"model.tiny_arch={self.tiny_arch!r} is not one of {', '.join(archs)}")
        if self.path not in ("tiny", "smollm2") and not (Path(self.path) / "config.json").is_file():
            raise ValueError(
                f"model.path={self.path!r} is not a HF checkpoint directory (no config.json); "
                "use 'tiny', 'smollm2' or a directory with config.json and safetensors"
            )


@dataclass
class DataConfig:
    """The ``data:`` section. ``eval`` (one file, logged as ``eval_reward_mean``) and ``eval_sets`` (several
    named files, each logged under ``eval/<name>/``; see ``EvalSetConfig``) may be used together."""

    train: PromptConfig = field(default_factory=PromptConfig)
    eval: PromptConfig | None = None
    eval_size: int = 32  # prompts of the eval file used per evaluation
    eval_sets: list[EvalSetConfig] = field(default_factory=list)  # named eval sets, eval/<name>/ metrics
    # Longest prompt (tokens, after the chat template); None: the model's context minus rollout.max_new_tokens.
    max_prompt_tokens: int | None = None
    long_prompts: str = "skip"  # skip (counted in the metrics) | refuse (the run stops naming the line)

    def __post_init__(self) -> None:
        refuse_non_finite(self, "data.")
        if not self.train.path:
            raise ValueError("data.train.path is empty; point it at a JSONL prompt file")
        if self.eval_size < 1:
            raise ValueError(f"data.eval_size={self.eval_size} must be >= 1")
        limit = self.max_prompt_tokens
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(
                f"data.max_prompt_tokens={limit!r} must be an integer >= 1, or unset for the model's context "
                "minus rollout.max_new_tokens"
            )
        if self.long_prompts not in LONG_PROMPTS:
            raise ValueError(
                f"data.long_prompts={self.long_prompts!r} is not one of {', '.join(LONG_PROMPTS)}"
            )
        names = [s.name for s in self.eval_sets]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(
                f"data.eval_sets names {twice} appear more than once; give every set its own name"
            )


@dataclass
class TrainConfig:
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data_parallel: int = 1
    micro_batch_size: int = 4
    dtype: str = "auto"  # float32 | bfloat16 | auto (the platform's default_train_dtype: fp32 CPU, bf16 GPU)
    seed: int = 1234
    megatron_args: dict[str, Any] = field(default_factory=dict)  # --megatron-<name> pass-through
    attention: str = "auto"  # auto | transformer_engine | sdpa | local (Platform.trainer_kernels)
    max_tokens_per_micro_batch: int | None = None  # set: pack samples into micro-batches of this many tokens
    critic: CriticConfig = field(default_factory=CriticConfig)  # PPO's value model (algo gae only)
    # Samples of a micro-batch with identical prompts (a GRPO group) share one copy of the prompt in the
    # trainer's forward/backward: same results up to float rounding, less compute (sdpa; no PP/SP/critic).
    # A CPU win; on an H100 the per-group masked attention made the step slower (benchmarks/results/gpu_h100.md).
    share_prompt_prefix: bool = False

    def __post_init__(self) -> None:
        refuse_non_finite(self, "train.")
        if self.data_parallel < 1:
            raise ValueError(f"train.data_parallel={self.data_parallel} must be >= 1")
        if self.micro_batch_size < 1:
            raise ValueError(f"train.micro_batch_size={self.micro_batch_size} must be >= 1")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"train.dtype={self.dtype!r} is not one of auto, float32, bfloat16")
        if self.attention not in TRAINER_ATTENTION:
            raise ValueError(
                f"train.attention={self.attention!r} is not one of {', '.join(TRAINER_ATTENTION)}"
            )
        budget = self.max_tokens_per_micro_batch
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise ValueError(
                f"train.max_tokens_per_micro_batch={budget!r} must be an integer >= 1 (tokens per packed "
                "micro-batch), or unset for micro-batches of train.micro_batch_size samples"
            )
        if budget is not None and self.attention == "local":
            raise ValueError(
                "train.max_tokens_per_micro_batch needs packed-sequence attention, which train.attention=local "
                "(Megatron's unfused attention) lacks; use train.attention=auto"
            )
        if not isinstance(self.share_prompt_prefix, bool):
            raise ValueError(f"train.share_prompt_prefix={self.share_prompt_prefix!r} must be true or false")
        if self.share_prompt_prefix:
            why = share_prompt_prefix_refusal(
                self.attention,
                self.parallel.pipeline_parallel,
                False,
                sequence_parallel=bool(self.megatron_args.get("sequence_parallel")),
            )
            if why:
                raise ValueError(why)

    @property
    def world_size(self) -> int:
        return self.parallel.tensor_parallel * self.parallel.pipeline_parallel * self.data_parallel


@dataclass
class RunConfig:
    """The ``run:`` section: how long, where, and which parts of the loop run.

    debug_mode:       "none" (generate, train, sync, eval, save); "rollout_only" (engines only, no trainer: every
                      step's samples saved under RUN_DIR/rollouts/ from the initial weights, no checkpoint of a
                      trainer, no --resume); "train_only" (trainer only, no engines: step N trains on the saved
                      rollout ``rollout_source``/step_N.jsonl, no weight sync, no eval)
    rollout_source:   train_only: a run directory (its rollouts/) or a directory of step_N.jsonl files
    save_rollouts:    also save every step's samples under RUN_DIR/rollouts/ in a normal run (always on in
                      rollout_only), so a step can be reproduced with train_only
    """

    steps: int = 10
    mode: str = "colocated"  # colocated | disaggregated
    async_rollout: bool = False  # generate step n+1 while training step n (disaggregated only)
    eval_every: int = 0  # 0 = never
    save_every: int = 0  # 0 = only at the end
    output_dir: str = "runs/latest"
    seed: int = 0
    check_weight_update: bool = False  # checksums after each sync (engines = trainer) and each step (changed)
    wandb_project: str | None = None
    num_cpus: int | None = None  # Ray CPUs on the CPU platform (None: all cores)
    debug_mode: str = "none"  # none | rollout_only | train_only (see the class docstring)
    rollout_source: str | None = None  # train_only: a run dir or a directory of saved step_N.jsonl
    save_rollouts: bool = False  # save every step's samples under RUN_DIR/rollouts/ (on in rollout_only)

    def __post_init__(self) -> None:
        refuse_non_finite(self, "run.")
        if self.debug_mode not in DEBUG_MODES:
            raise ValueError(f"run.debug_mode={self.debug_mode!r} is not one of {', '.join(DEBUG_MODES)}")
        if self.debug_mode == "train_only" and not self.rollout_source:
            raise ValueError(
                "run.debug_mode=train_only needs run.rollout_source: a run directory saved with "
                "run.debug_mode=rollout_only or run.save_rollouts=true"
            )
        if self.rollout_source and self.debug_mode != "train_only":
            raise ValueError(
                f"run.rollout_source={self.rollout_source!r} is read only with run.debug_mode=train_only; "
                "set that or drop run.rollout_source"
            )
        if self.debug_mode == "rollout_only":
            self.save_rollouts = True  # what the mode is for
        if self.debug_mode != "none" and self.async_rollout:
            raise ValueError(
                f"run.async_rollout=true overlaps generation and training; run.debug_mode={self.debug_mode} "
                "runs only one of them: set run.async_rollout=false"
            )
        if self.steps < 1:
            raise ValueError(f"run.steps={self.steps} must be >= 1")
        if self.mode not in MODES:
            raise ValueError(f"run.mode={self.mode!r} is not one of {', '.join(MODES)}")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"run.{name}={getattr(self, name)} must be >= 0 (0 disables)")


@dataclass
class Recipe:
    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    run: RunConfig = field(default_factory=RunConfig)
    placement: NodePlacementConfig = field(default_factory=NodePlacementConfig)

    def __post_init__(self) -> None:
        if self.run.async_rollout and self.run.mode == "colocated":
            raise ValueError(
                "run.async_rollout=true needs run.mode=disaggregated (co-located engines share the trainer's "
                "devices, so they cannot generate while it trains)"
            )
        self.placement.check_mode(self.run.mode)
        batch = self.rollout.prompts_per_step * self.rollout.samples_per_prompt
        if batch % self.train.data_parallel:
            raise ValueError(
                f"rollout batch {batch} (prompts_per_step x samples_per_prompt) does not split over "
                f"train.data_parallel={self.train.data_parallel}; use a multiple"
            )
        mini = self.algo.num_mini_batches * self.train.data_parallel
        if self.algo.num_mini_batches > 1 and batch % mini:
            raise ValueError(
                f"rollout batch {batch} (prompts_per_step x samples_per_prompt) does not split into "
                f"algo.num_mini_batches={self.algo.num_mini_batches} mini-batches over "
                f"train.data_parallel={self.train.data_parallel}; use a divisor of {batch // self.train.data_parallel}"
            )
        if self.train.critic.path is not None and not self.algo.uses_critic:
            raise ValueError(
                f"train.critic.path is set but algo.advantage_estimator={self.algo.advantage_estimator!r} trains no "
                "critic; use advantage_estimator=gae or unset train.critic.path"
            )
        if self.train.share_prompt_prefix and self.algo.uses_critic:
            raise ValueError(share_prompt_prefix_refusal(self.train.attention, 1, True))


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    data = apply_overrides(load_yaml(path), overrides or [])
    base = Path(path).resolve().parent
    _resolve_paths(data, base)
    if "data" not in data:
        raise ConfigError(f"recipe {str(path)!r} has no data section; add data.train.path")
    return build(Recipe, data)


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Relative prompt/model paths in a recipe are relative to the recipe file, not the shell's cwd."""
    for section, key in (("model", "path"),):
        value = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
        if isinstance(value, str) and value not in ("tiny", "smollm2") and not Path(value).is_absolute():
            data[section][key] = str(base / value)
    critic = data.get("train", {}).get("critic") if isinstance(data.get("train"), dict) else None
    if (
        isinstance(critic, dict)
        and isinstance(critic.get("path"), str)
        and not Path(critic["path"]).is_absolute()
    ):
        critic["path"] = str(base / critic["path"])
    d = data.get("data")
    if isinstance(d, dict):
        sets = d.get("eval_sets")
        for s in [d.get("train"), d.get("eval"), *(sets if isinstance(sets, list) else [])]:
            if (
                isinstance(s, dict)
                and isinstance(s.get("path"), str)
                and s["path"]
                and not Path(s["path"]).is_absolute()
            ):
                s["path"] = str(base / s["path"])


def reference_markdown() -> str:
    """The recipe reference table (README's "Recipe reference" block is this text; a test keeps them equal)."""
    import dataclasses
    import typing

    rows = ["| key | type | default |", "|---|---|---|"]

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(tp):
                walk(tp, key + ".")
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = "(required)"
            name = str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")
            rows.append(f"| `{key}` | {name.replace('|', '&#124;')} | `{default!r}` |")

    for section in dataclasses.fields(Recipe):
        tp = typing.get_type_hints(Recipe)[section.name]
        if section.name == "data":
            rows.append("| `data.train.*`, `data.eval.*` | PromptConfig | see below |")
            walk(PromptConfig, "data.train.")
            data_fields = DataConfig.__dataclass_fields__
            rows.append(f"| `data.eval_size` | int | `{data_fields['eval_size'].default!r}` |")
            rows.append(
                f"| `data.max_prompt_tokens` | int &#124; None | `{data_fields['max_prompt_tokens'].default!r}` |"
            )
            rows.append(f"| `data.long_prompts` | str | `{data_fields['long_prompts'].default!r}` |")
            rows.append("| `data.eval_sets` | list[EvalSetConfig] | `[]` |")
            rows.append("| `data.eval_sets[].*` | PromptConfig | as `data.train.*`, and the rows below |")
            for f in dataclasses.fields(EvalSetConfig):
                if f.name not in PromptConfig.__dataclass_fields__ or f.name == "shuffle":
                    hint = typing.get_type_hints(EvalSetConfig)[f.name]
                    name = str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
                    rows.append(
                        f"| `data.eval_sets[].{f.name}` | {name.replace('|', '&#124;')} | `{f.default!r}` |"
                    )
            continue
        walk(tp, section.name + ".")
    return "\n".join(rows) + "\n"
