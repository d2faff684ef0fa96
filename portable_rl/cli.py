"""`portable-rl` command line: one sub-command per module, each with its own --help.

Each sub-command module exposes ``add_parser(subparsers)`` (registers itself, sets ``func``) and returns
an exit code from ``func(args)``. CLI misuse exits 2 with a one-line message; expected failures (an
unavailable platform, a bad recipe) print one line to stderr and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from portable_rl import __version__

# Sub-command modules, in the order `--help` lists them.
COMMANDS = (
    "portable_rl.commands.doctor",
    "portable_rl.commands.conformance",
    "portable_rl.commands.launch",
    "portable_rl.commands.image",
)


class UserError(Exception):
    """An error caused by the user's input; printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="portable-rl",
        description="RL post-training for LLMs on NVIDIA, AMD and CPU with one launch script.",
    )
    parser.add_argument("--version", action="version", version=f"portable-rl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from portable_rl.platform import PlatformUnavailable, VisibilityError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UserError, PlatformUnavailable, VisibilityError) as exc:
        print(f"portable-rl {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
