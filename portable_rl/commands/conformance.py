"""`portable-rl conformance`: run the cross-backend conformance checks on this host's platform.

    portable-rl conformance [--platform auto|cpu|cuda|rocm] [--report DIR] [--only NAME ...] [--list]
                            [--fail-on-unexpected-skip]

Prints one line per case (check, dtype, measured error, tolerance, status, reason; a failure's detail below
it) and a summary; with ``--report DIR`` also writes conformance-<platform>.json / .md there. Exit codes: 0 all
cases passed or were skipped with a reason, 1 a case failed (or, with ``--fail-on-unexpected-skip``, was
skipped for a reason the platform does not explain: a missing component, a golden file the repository should
hold), 2 bad input (unknown check, unavailable platform). CI runs with ``--fail-on-unexpected-skip``.
``--platform`` sets PORTABLE_RL_PLATFORM for the run, so spawned workers see the same platform.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time

PLATFORM_CHOICES = ("auto", "cpu", "cuda", "rocm")


def _list(checks) -> int:
    for check in checks:
        dtypes = ",".join(d for d in check.dtypes if d) or "-"
        marks = ",".join(check.markers) or "-"
        print(f"{check.name:<40} dtypes={dtypes:<17} markers={marks:<5} {check.measures}")
        if check.depends_on:
            print(f"{'':<40} needs: {check.depends_on}")
    return 0


def run(args: argparse.Namespace) -> int:
    from portable_rl.conformance import Context, select, summary, unexpected_skips
    from portable_rl.conformance import run as run_checks
    from portable_rl.conformance.report import format_table, write_reports
    from portable_rl.errors import UserError
    from portable_rl.platform import PLATFORM_ENV, current_platform, reset_current_platform

    try:
        checks = select(args.only)
    except KeyError as exc:
        raise UserError(exc.args[0]) from None
    if args.list:
        return _list(checks)

    previous = os.environ.get(PLATFORM_ENV)
    os.environ[PLATFORM_ENV] = args.platform
    reset_current_platform()
    try:
        platform = current_platform()  # PlatformUnavailable -> one line, exit 2 (cli.main)
        print(f"conformance on platform {platform.name} ({platform.reason}); {len(checks)} checks")
        ctx = Context(platform)
        started, t0 = dt.datetime.now(dt.timezone.utc), time.perf_counter()

        def show(res) -> None:
            err = "-" if res.error is None else f"{res.error:.3g}"
            tol = "-" if res.tolerance is None else f"{res.tolerance:.3g}"
            extra = f"  ({res.reason})" if res.reason else ""
            print(f"  {res.status:<7} {res.id:<48} error {err:<9} tol {tol:<8} {res.seconds:5.1f}s{extra}")
            if res.status == "fail" and res.detail:  # where the error is: what to look at first
                for line in res.detail.strip().splitlines()[-6:]:
                    print(f"            {line}")
            sys.stdout.flush()

        try:
            results = run_checks(checks, ctx, on_result=show)
        finally:
            ctx.close()
        seconds = time.perf_counter() - t0
        counts = summary(results)
        print()
        print(format_table(results))
        print(
            f"\n{counts['pass']} passed, {counts['fail']} failed, {counts['skipped']} skipped "
            f"on {platform.name} in {seconds:.1f} s"
        )
        if args.report:
            json_path, md_path = write_reports(results, ctx, args.report, started, seconds)
            print(f"report: {json_path} {md_path}")
        unexpected = unexpected_skips(results) if args.fail_on_unexpected_skip else []
        for res in unexpected:
            print(f"unexpected skip (--fail-on-unexpected-skip): {res.id}: {res.reason}")
        return 1 if counts["fail"] or unexpected else 0
    finally:
        if previous is None:
            os.environ.pop(PLATFORM_ENV, None)
        else:
            os.environ[PLATFORM_ENV] = previous
        reset_current_platform()


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "conformance",
        help="check that this platform's collectives, kernels and components give the expected numbers",
        description=(
            "Run the conformance checks on this platform: collectives, kernels against float64 references, "
            "training determinism, Ray device visibility, and the trainer/engine/weight-sync components. "
            "Exit 1 if any check fails."
        ),
    )
    p.add_argument(
        "--platform",
        choices=PLATFORM_CHOICES,
        default="auto",
        help="platform to check (sets PORTABLE_RL_PLATFORM for the run; default: auto-detect)",
    )
    p.add_argument("--report", metavar="DIR", help="write conformance-<platform>.json and .md into DIR")
    p.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="run only these checks (exact names or groups such as 'kernels'; see --list)",
    )
    p.add_argument("--list", action="store_true", help="list the checks and what each measures, then exit")
    p.add_argument(
        "--fail-on-unexpected-skip",
        action="store_true",
        help=(
            "exit 1 when a check is skipped for a reason the platform does not explain (a missing component "
            "module, a golden file the repository should hold); GPU-only checks on CPU, another vendor's "
            "checks and too few devices stay plain skips. CI runs with it"
        ),
    )
    p.set_defaults(func=run)
