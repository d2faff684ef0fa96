"""Run conformance cases on one platform and turn measurements into verdicts.

``run_case(case, ctx)`` returns a ``CheckResult``: skipped (with the unmet requirement, and whether the
platform explains it: ``skip_expected``), pass
(``error <= tolerance``), or fail (``error > tolerance``, a NaN error, or the check raised — the exception's
one-line summary becomes the reason). ``run(checks, ctx)`` runs every case of every check in order; a failing
case never stops the run.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable, Iterable

from portable_rl.conformance.registry import (
    Case,
    Check,
    CheckResult,
    Context,
    is_expected_skip,
    unmet_requirement,
)
from portable_rl.conformance.tolerances import tolerance


def run_case(case: Case, ctx: Context) -> CheckResult:
    check = case.check
    result = CheckResult(check.name, case.dtype, "skipped", measures=check.measures)
    why = unmet_requirement(check, ctx.platform)
    if why:
        result.reason = str(why)
        result.skip_expected = is_expected_skip(why)
        return result
    start = time.perf_counter()
    try:
        result.tolerance = tolerance(check.name, ctx.platform.name, case.dtype)
        measured = check.fn(ctx, case.dtype)
    except Exception as exc:  # a check that crashes is a failed check, reported with its cause
        result.seconds = time.perf_counter() - start
        result.status = "fail"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        result.reason = f"raised {type(exc).__name__}: {first}"
        result.detail = traceback.format_exc(limit=6)
        return result
    result.seconds = time.perf_counter() - start
    result.error = float(measured.error)
    result.detail = measured.detail
    if math.isnan(result.error):
        result.status, result.reason = "fail", "measured error is NaN"
    elif result.error <= result.tolerance:
        result.status = "pass"
    else:
        result.status = "fail"
        result.reason = f"error {result.error:.3g} > tolerance {result.tolerance:.3g}"
    return result


def run(
    checks: Iterable[Check],
    ctx: Context,
    on_result: Callable[[CheckResult], None] | None = None,
) -> list[CheckResult]:
    results = []
    for check in checks:
        for case in check.cases():
            res = run_case(case, ctx)
            results.append(res)
            if on_result is not None:
                on_result(res)
    return results


def unexpected_skips(results: list[CheckResult]) -> list[CheckResult]:
    """Skipped cases the platform does not explain: something the check needs is missing or broken."""
    return [r for r in results if r.status == "skipped" and not r.skip_expected]


def summary(results: list[CheckResult]) -> dict[str, int]:
    out = {"pass": 0, "fail": 0, "skipped": 0}
    for r in results:
        out[r.status] += 1
    return out
