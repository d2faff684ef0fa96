"""`portable-rl train RECIPE.yaml [overrides] [--resume] [--check-weight-update]`: the training job.

Everything the user gave is validated before anything is written (recipe, overrides, platform, run directory,
trainer ranks vs this host's CPUs/devices, the trainer's attention choice, model, prompt files and chat template, reward and filter imports);
a bad value is one line on stderr and exit code 2. The resolved config written to the run directory shows
credentials (e.g. ``--sglang-api-key``) as ``***``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from portable_rl.errors import UserError

# Cores that make one "device" on the CPU platform; the job's placement reads the same variable.
CPUS_PER_DEVICE_ENV = "PORTABLE_RL_CPUS_PER_DEVICE"


def run(args: argparse.Namespace) -> int:
    from portable_rl.config_loader import ConfigError, to_dict
    from portable_rl.data.prompts import PromptFileError
    from portable_rl.platform import current_platform
    from portable_rl.recipe import load_recipe
    from portable_rl.run_dir import RunDir, RunDirError

    overrides = list(args.overrides) + list(getattr(args, "pass_through", []))
    if args.check_weight_update:
        overrides.append("run.check_weight_update=true")
    if args.output_dir:
        overrides.append(f"run.output_dir={args.output_dir}")
    try:
        recipe = load_recipe(args.recipe, overrides)
        platform = current_platform()  # an unavailable PORTABLE_RL_PLATFORM fails here, before any write
        run_dir = RunDir(Path(recipe.run.output_dir))
        run_dir.check(resume=args.resume)
        _check_placement(recipe, platform)
        _check_trainer_kernels(recipe, platform)
        _check_model(recipe)
        _check_prompts(recipe)
        _check_reward_and_filter(recipe)
    except (ConfigError, RunDirError, PromptFileError) as exc:
        raise UserError(str(exc)) from None
    run_dir.prepare(redact_secrets(to_dict(recipe)))
    from portable_rl.train import train

    history = train(recipe, run_dir, resume=args.resume)
    summary = json.loads((run_dir.path / "summary.json").read_text(encoding="utf-8"))
    print(json.dumps({"run_dir": str(run_dir.path), **summary}, indent=2), file=sys.stdout)
    return 0 if history else 1


# Keys whose values are credentials (engine api keys, a judge's token): never written to the run directory.
_SECRET_KEY = re.compile(r"(^|_)(api_key|token|secret|password)$", re.IGNORECASE)


def redact_secrets(data: Any) -> Any:
    """A copy of a config tree with every credential-named key's value replaced by ``***``."""
    if isinstance(data, dict):
        return {
            k: ("***" if _SECRET_KEY.search(str(k)) and v not in (None, "") else redact_secrets(v))
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [redact_secrets(v) for v in data]
    return data


def _check_placement(recipe, platform) -> None:
    """The trainer ranks (TP x PP x DP) and engine devices must fit what this host's Ray will have.

    Only for the private single-node Ray the job starts itself; a cluster joined through RAY_ADDRESS is
    checked by the placement group (its nodes' resources are not known here).
    """
    from portable_rl.orchestration.placement import PlacementConfig

    if os.environ.get("RAY_ADDRESS"):
        return
    t, r = recipe.train, recipe.rollout
    ranks = (
        f"TP {t.parallel.tensor_parallel} x PP {t.parallel.pipeline_parallel} x DP {t.data_parallel} "
        f"= {t.world_size} trainer rank(s)"
    )
    engine_devices = r.num_engines * r.engine_tp_size
    if recipe.run.mode == "colocated" and engine_devices > t.world_size:
        raise UserError(
            f"run.mode=colocated puts every engine device on a trainer rank, but rollout.num_engines x "
            f"rollout.engine_tp_size = {engine_devices} > {ranks}; lower rollout.num_engines or use "
            "run.mode=disaggregated"
        )
    raw_share = os.environ.get(CPUS_PER_DEVICE_ENV, "0.5")
    try:
        share = float(raw_share)
        cfg = PlacementConfig(
            mode=recipe.run.mode,
            trainer_ranks=t.world_size,
            num_engines=r.num_engines,
            devices_per_engine=r.engine_tp_size,
            cpus_per_device=share,
        )
    except ValueError as exc:
        raise UserError(f"{ranks}: {exc} ({CPUS_PER_DEVICE_ENV}={raw_share!r})") from None
    engines = "" if recipe.run.mode == "colocated" else f" + {engine_devices} engine device(s)"
    if platform.ray_resource:
        have = len(platform.resolve_visible_devices())
        if cfg.total_devices > have:
            raise UserError(
                f"{ranks}{engines} need {cfg.total_devices} {platform.name} device(s) but {have} are visible; "
                "lower train.parallel / train.data_parallel / rollout.num_engines or expose more devices"
            )
        return
    need = cfg.total_devices * share
    limit = recipe.run.num_cpus
    have = limit if limit is not None else (os.cpu_count() or 1)
    if need > have:
        source = f"run.num_cpus={limit}" if limit is not None else "this host"
        raise UserError(
            f"{ranks}{engines} need {need:g} CPUs ({share:g} per device, {CPUS_PER_DEVICE_ENV}) but {source} "
            f"gives {have}; lower train.parallel / train.data_parallel / rollout.num_engines or raise run.num_cpus"
        )


def _check_trainer_kernels(recipe, platform) -> None:
    """train.attention must be one this platform runs (the trainer asks the same ``trainer_kernels``)."""
    from portable_rl.platform import UnsupportedKernel

    try:
        platform.trainer_kernels(recipe.train.attention)
    except UnsupportedKernel as exc:
        raise UserError(str(exc)) from None


def _check_model(recipe) -> None:
    """A model the recipe names must exist now (a HF dir is checked by ModelConfig; the demo model here)."""
    if recipe.model.path == "smollm2":
        from portable_rl.models.smollm2 import gguf_path

        try:
            gguf_path()
        except FileNotFoundError as exc:
            raise UserError(f"model.path='smollm2': {exc}") from None


def _check_prompts(recipe) -> None:
    """Read the prompt files (and template one prompt) so a bad file fails before the run dir is created."""
    from portable_rl.data.prompts import PromptFileError, PromptSource, read_prompt_file

    tokenizer = None
    for split, cfg in (("train", recipe.data.train), ("eval", recipe.data.eval)):
        if cfg is None:
            continue
        read_prompt_file(cfg.path, cfg.prompt_key, cfg.label_key, cfg.apply_chat_template)
        # The tiny and demo models ship a chat template; a user's HF directory may not.
        if cfg.apply_chat_template and recipe.model.path not in ("tiny", "smollm2"):
            tokenizer = tokenizer or _load_tokenizer(recipe.model.path)
            try:
                PromptSource(cfg, tokenizer).make_item(0, 0)
            except PromptFileError as exc:
                raise UserError(f"data.{split}: {exc}") from None


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"model.path={path!r}: cannot load its tokenizer ({first}); add the tokenizer files to the directory"
        ) from None


def _check_reward_and_filter(recipe) -> None:
    """Import the reward function and group filter now: a typo fails before the job starts Ray and engines."""
    import inspect

    from portable_rl.rollout.filters import load_filter
    from portable_rl.rollout.rewards import RewardLoadError, load_callable, load_reward_fn

    r = recipe.rollout
    try:
        if r.reward == "math":
            load_reward_fn(r.reward, **r.reward_options)
        else:
            fn = load_callable(r.reward)
            try:
                signature = inspect.signature(fn)
            except (TypeError, ValueError):  # builtins and some callables have none; nothing to check
                signature = None
            if signature is not None:
                signature.bind("response", None, None, **r.reward_options)
        load_filter(r.filter)
    except RewardLoadError as exc:
        raise UserError(str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise UserError(
            f"rollout.reward_options={r.reward_options!r} do not fit reward {r.reward!r} ({exc}); "
            "pass only the function's keyword arguments"
        ) from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="run a training recipe (YAML) on the detected platform",
        description=(
            "Run RECIPE.yaml: generate -> train -> sync weights -> eval -> save, for run.steps steps. "
            "Overrides: section.key=value (e.g. run.steps=5 train.optim.lr=1e-5), and SGLang / Megatron "
            "arguments passed through as --sglang-<name> VALUE / --megatron-<name> VALUE."
        ),
    )
    p.add_argument("recipe", help="recipe YAML file (see examples/)")
    p.add_argument(
        "overrides",
        nargs="*",
        default=[],
        help="section.key=value; also --sglang-<name> V / --megatron-<name> V",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in run.output_dir from its last checkpoint"
    )
    p.add_argument(
        "--check-weight-update",
        action="store_true",
        help=(
            "after every weight sync compare trainer and engine weight checksums (the run fails on a "
            "difference) and log weights_changed_frac, the share of trainer tensors each step changed "
            "(slow on large models; for debugging and tests)"
        ),
    )
    p.add_argument("--output-dir", help="run directory (overrides run.output_dir)")
    p.set_defaults(func=run, accepts_pass_through=True)
