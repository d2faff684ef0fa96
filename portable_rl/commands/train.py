"""`portable-rl train RECIPE.yaml [overrides] [--resume] [--check-weight-update]`: the training job.

Everything the user gave is validated (recipe, overrides, platform, prompt file, run directory) before
anything is written; a bad value is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from portable_rl.cli import UserError


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
        current_platform()  # an unavailable PORTABLE_RL_PLATFORM fails here, before any file is written
        run_dir = RunDir(Path(recipe.run.output_dir))
        run_dir.check(resume=args.resume)
        _check_prompts(recipe)
    except (ConfigError, RunDirError, PromptFileError) as exc:
        raise UserError(str(exc)) from None
    run_dir.prepare(to_dict(recipe))
    from portable_rl.train import train

    history = train(recipe, run_dir, resume=args.resume)
    summary = json.loads((run_dir.path / "summary.json").read_text(encoding="utf-8"))
    print(json.dumps({"run_dir": str(run_dir.path), **summary}, indent=2), file=sys.stdout)
    return 0 if history else 1


def _check_prompts(recipe) -> None:
    """Read the prompt files now so a bad file fails before the run directory is created."""
    from portable_rl.data.prompts import read_prompt_file

    for cfg in (recipe.data.train, recipe.data.eval):
        if cfg is not None:
            read_prompt_file(cfg.path, cfg.prompt_key, cfg.label_key, cfg.apply_chat_template)


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
        "overrides", nargs="*", help="section.key=value; also --sglang-<name> V / --megatron-<name> V"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in run.output_dir from its last checkpoint"
    )
    p.add_argument(
        "--check-weight-update",
        action="store_true",
        help="after every weight sync compare trainer and engine weight checksums (slow; for debugging)",
    )
    p.add_argument("--output-dir", help="run directory (overrides run.output_dir)")
    p.set_defaults(func=run, accepts_pass_through=True)
