"""The registered conformance cases as pytest parameters, for the test files of this directory.

Each case carries its check's markers (``gpu`` / ``cuda`` / ``rocm`` / ``slow``), so CPU runs deselect
GPU-only checks with ``-m "not gpu"`` and vendor legs select them. A case whose requirement is unmet on the
platform this process detects for a reason the platform explains (a GPU check on CPU, another vendor's
check, too few devices, no golden file recorded for the platform yet) gets a skip marker that states the
reason. Any other unmet requirement (a component module gone, a golden file the repository holds deleted) is
not a skip: the case runs and fails with the reason, so a breakage cannot hide as a skip.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from portable_rl.conformance import all_cases, is_expected_skip, run_case, unmet_requirement
from portable_rl.conformance.registry import Case, Check, Context
from portable_rl.platform import detect

_PLATFORM = detect()


def is_platform_check(check: Check) -> bool:
    """Needs nothing but the platform (no other portable_rl component)."""
    return not check.requires


def is_golden_check(check: Check) -> bool:
    return check.group == "golden"


def is_component_check(check: Check) -> bool:
    return not is_platform_check(check) and not is_golden_check(check)


def params(select: Callable[[Check], bool]) -> list:
    out = []
    for case in all_cases():
        if not select(case.check):
            continue
        marks = [getattr(pytest.mark, m) for m in case.check.markers]
        why = unmet_requirement(case.check, _PLATFORM)
        if why and is_expected_skip(why):
            marks.append(pytest.mark.skip(reason=str(why)))
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


def assert_passes(case: Case, ctx: Context) -> None:
    result = run_case(case, ctx)
    assert result.status == "pass", f"{result.id}: {result.reason}\n{result.detail}"
    assert result.error is not None and result.error <= result.tolerance
