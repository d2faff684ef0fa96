"""Cross-backend conformance: does this platform compute what portable_rl assumes it computes?

Pull the vendor image, run ``portable-rl conformance``, then trust the launch script. Each check measures
one number on the current platform (a max abs error against a float64 reference, a count of differing
bits); ``tolerances.TOLERANCES`` says per platform and dtype how large it may be. The same checks run from
the CLI (``portable_rl.commands.conformance``) and from pytest (``tests/conformance``), and every run can
write a JSON + Markdown report with the platform's facts and package versions.

Public API: ``load_all()``, ``select(names)``, ``Context(platform)``, ``run(checks, ctx)``,
``write_reports(results, ctx, dir)``; checks register with ``@register(name, measures, ...)``.
"""

from __future__ import annotations

# Modules whose import registers checks, in report order.
CHECK_MODULES = (
    "portable_rl.conformance.collectives",
    "portable_rl.conformance.kernels",
    "portable_rl.conformance.determinism",
    "portable_rl.conformance.ray_visibility",
    "portable_rl.conformance.trainer",
    "portable_rl.conformance.engine",
    "portable_rl.conformance.golden",
)

from portable_rl.conformance.registry import (  # noqa: E402
    CHECKS,
    Check,
    CheckResult,
    Context,
    ExpectedSkip,
    Measurement,
    all_cases,
    is_expected_skip,
    load_all,
    register,
    select,
    unmet_requirement,
)
from portable_rl.conformance.report import write_reports  # noqa: E402
from portable_rl.conformance.runner import run, run_case, summary, unexpected_skips  # noqa: E402

__all__ = [
    "CHECKS",
    "CHECK_MODULES",
    "Check",
    "CheckResult",
    "Context",
    "ExpectedSkip",
    "Measurement",
    "all_cases",
    "is_expected_skip",
    "load_all",
    "register",
    "run",
    "run_case",
    "select",
    "summary",
    "unexpected_skips",
    "unmet_requirement",
    "write_reports",
]
