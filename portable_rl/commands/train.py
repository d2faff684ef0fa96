"""`portable-rl train RECIPE.yaml [overrides] [--resume] [--dry-run] [--check-weight-update]`: the training job.

Everything that can be known before the run starts is checked first, before the run directory is created or
touched (``portable_rl.commands.preflight``: recipe numbers and names, platform, run directory, trainer ranks vs
this host, trainer kernels, the model directory and its layout, the resume checkpoint's model, ports, prompt
files, reward and filter imports); a bad value is one line on stderr and exit code 2. ``--dry-run`` stops there
and prints the resolved plan (layout, engines, ports, weight-sync strategy, kernels chosen) as YAML.

A run that fails after it started prints one line (what failed, where the log is, what to run next) and exits 1;
its full traceback goes to ``RUN_DIR/train.log``, never the terminal. A run that ends before its first checkpoint
is replaced by the same command (``portable_rl.run_dir``); one with a checkpoint is continued with ``--resume``.
The resolved config written to the run directory shows credentials (e.g. ``--sglang-api-key``) as ``***``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import traceback
from pathlib import Path
from typing import Any

import yaml

from portable_rl.errors import RunFailed, UserError


def run(args: argparse.Namespace) -> int:
    from portable_rl.commands.preflight import plan, preflight
    from portable_rl.config_loader import ConfigError, to_dict
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
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    platform = current_platform()  # an unavailable PORTABLE_RL_PLATFORM fails here, before any write
    found = preflight(recipe, args.resume, platform)
    for warning in found.warnings:  # options this layout ignores: named once, before anything starts
        print(f"portable-rl train: warning: {warning}", file=sys.stderr)
    if args.dry_run:
        print(yaml.safe_dump(plan(recipe, platform, found), sort_keys=False).rstrip(), file=sys.stdout)
        return 0
    run_dir = RunDir(Path(recipe.run.output_dir))
    try:
        replaced = run_dir.prepare(redact_secrets(to_dict(recipe)), resume=args.resume)
    except RunDirError as exc:
        raise UserError(str(exc)) from None
    if replaced:
        print(
            f"portable-rl train: {run_dir.path} held a run that ended before its first checkpoint; starting it over",
            file=sys.stderr,
        )
    root = logging.getLogger()
    level, handler = (
        root.level,
        _log_to(run_dir, f"portable-rl train {args.recipe}" + (" --resume" * args.resume)),
    )
    try:
        from portable_rl.train import train

        history = train(recipe, run_dir, resume=args.resume)
    except Exception as exc:
        _to_log_only(handler, "the run failed")
        raise RunFailed(failure_line(exc, run_dir)) from None
    except KeyboardInterrupt:
        _to_log_only(handler, "interrupted")
        raise RunFailed(failure_line(None, run_dir), exit_code=130) from None
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()
        run_dir.release()
    summary = json.loads((run_dir.path / "summary.json").read_text(encoding="utf-8"))
    print(json.dumps({"run_dir": str(run_dir.path), **summary}, indent=2), file=sys.stdout)
    return 0 if history else 1


def _log_to(run_dir, command: str) -> logging.Handler:
    """Every log record of this attempt (and a failure's traceback) goes to RUN_DIR/train.log, appended.

    The attempt's header names the recipe only: the command line may carry credentials (--sglang-api-key)."""
    handler = logging.FileHandler(run_dir.log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    logging.getLogger("portable_rl").info("attempt: %s", command)
    return handler


def _to_log_only(handler: logging.Handler, title: str) -> None:
    """The traceback being handled, into the run's log file only (never a terminal handler)."""
    record = logging.makeLogRecord(
        {
            "name": "portable_rl",
            "levelno": logging.ERROR,
            "levelname": "ERROR",
            "msg": f"{title}:\n{traceback.format_exc()}",
        }
    )
    handler.handle(record)


def _cause(exc: BaseException) -> BaseException:
    """The error a worker raised, where a remote-call wrapper (e.g. Ray's task error) carries it as ``cause``."""
    inner = getattr(exc, "cause", None)
    return inner if isinstance(inner, BaseException) else exc


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The last line of a Python traceback: "ValueError: ..." (possibly dotted, e.g. ray.exceptions.RayTaskError: ...).
_FINAL = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Timeout|Exit|Interrupt)): (\S.*)$")


def _what(exc: BaseException) -> str:
    """``Type: first line`` of the error; where its text carries a worker's traceback (an actor that died in
    its constructor), that traceback's own last error instead of the wrapper's."""
    cause = _cause(exc)
    text = _ANSI.sub("", str(cause))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    finals = [m for line in lines[1:] if (m := _FINAL.match(line))]
    if finals:
        name, message = finals[-1].group(1).rsplit(".", 1)[-1], finals[-1].group(2)
    else:
        name, message = type(cause).__name__, lines[0] if lines else ""
    return f"{name}: {message[:300]}" if message else name


def failure_line(exc: BaseException | None, run_dir) -> str:
    """One line: what failed, where the log is, and the command that continues from here."""
    what = "the run was interrupted" if exc is None else f"the run failed: {_what(exc)}"
    last = run_dir.last_checkpoint()
    then = (
        f"the last checkpoint is step {last[0]}; continue with --resume"
        if last
        else "no checkpoint was written; the same command starts the run over"
    )
    return f"{what} (full traceback in {run_dir.log_path}); {then}"


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
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="run the preflight checks only and print the resolved plan (layout, engines, ports, weight sync, "
        "kernels); writes nothing",
    )
    p.add_argument("--output-dir", help="run directory (overrides run.output_dir)")
    p.set_defaults(func=run, accepts_pass_through=True)
