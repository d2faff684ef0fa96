"""`portable-rl` command line: one sub-command per module, each with its own --help.

Each sub-command module exposes ``add_parser(subparsers)`` (registers itself, sets ``func``) and returns
an exit code from ``func(args)``. CLI misuse exits 2 with a one-line message; expected failures (an
unavailable platform, a bad recipe) print one line to stderr and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from portable_rl import __version__
from portable_rl.errors import RunFailed, UserError

# Sub-command modules, in the order `--help` lists them.
COMMANDS = (
    "portable_rl.commands.doctor",
    "portable_rl.commands.train",
    "portable_rl.commands.conformance",
    "portable_rl.commands.launch",
    "portable_rl.commands.image",
)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``<prog>: error: <message>; see <prog> --help``), exit 2.

    Sub-command parsers inherit the class (argparse builds them with the parent's type), so every command's
    misuse reads like the commands' own errors instead of argparse's usage block plus a second line.
    """

    def error(self, message: str) -> NoReturn:
        text = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {text}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="portable-rl",
        description="RL post-training for LLMs on NVIDIA, AMD and CPU with one launch script.",
    )
    parser.add_argument("--version", action="version", version=f"portable-rl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


PASS_THROUGH_PREFIXES = ("--sglang-", "--megatron-")


def split_pass_through(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``--sglang-<name> [VALUE]`` / ``--megatron-<name>[=VALUE]`` flags from the rest of argv."""
    rest: list[str] = []
    passed: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith(PASS_THROUGH_PREFIXES):
            passed.append(token)
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if "=" not in token and nxt is not None and not nxt.startswith("-") and "=" not in nxt:
                passed.append(nxt)
                i += 1
        else:
            rest.append(token)
        i += 1
    return rest, passed


def main(argv: list[str] | None = None) -> int:
    from portable_rl.platform import PlatformUnavailable, VisibilityError

    parser = build_parser()
    argv, pass_through = split_pass_through(sys.argv[1:] if argv is None else list(argv))
    try:
        args, unknown = parser.parse_known_args(argv)
    except SystemExit as exc:  # --help, --version, or a one-line usage error already printed
        return exc.code if isinstance(exc.code, int) else 2
    # `key=value` overrides after an option are left over by argparse (positionals are taken in one go).
    overrides = [u for u in unknown if "=" in u and not u.startswith("-")]
    rest = [u for u in unknown if u not in overrides]
    if rest or ((pass_through or overrides) and not getattr(args, "accepts_pass_through", False)):
        prog = f"portable-rl {args.command}" if getattr(args, "command", None) else "portable-rl"
        print(
            f"{prog}: error: unrecognized arguments: {' '.join(rest or pass_through or overrides)}; "
            f"see {prog} --help",
            file=sys.stderr,
        )
        return 2
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + overrides
    args.pass_through = pass_through
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UserError, PlatformUnavailable, VisibilityError) as exc:
        print(f"portable-rl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:  # the traceback is in the run's log; the terminal gets one line
        print(f"portable-rl {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":  # pragma: no cover
    # UserError lives in portable_rl.errors, so running this file as __main__ catches the class commands raise.
    sys.exit(main())
