"""The conformance checks as pytest cases, on the platform this process detects.

Each registered case is one test. GPU-only checks carry the ``gpu`` / ``cuda`` / ``rocm`` markers, so CPU runs
deselect them (``-m "not gpu"``) and vendor legs select them; a case whose requirement is unmet on this
platform (or whose component does not exist yet) is skipped by a marker that states why.
"""

from __future__ import annotations

import pytest

from portable_rl.conformance import all_cases, run_case, unmet_requirement
from portable_rl.platform import detect

_PLATFORM = detect()


def _param(case):
    marks = [getattr(pytest.mark, m) for m in case.check.markers]
    why = unmet_requirement(case.check, _PLATFORM)
    if why:
        marks.append(pytest.mark.skip(reason=why))
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in all_cases()])
def test_conformance(case, conformance_ctx):
    result = run_case(case, conformance_ctx)
    assert result.status == "pass", f"{result.id}: {result.reason}\n{result.detail}"
    assert result.error is not None and result.error <= result.tolerance
