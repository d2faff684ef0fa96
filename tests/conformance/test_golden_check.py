"""Conformance end to end: the tiny recipe through `portable-rl train` reproduces its golden metrics."""

from __future__ import annotations

import pytest
from conformance_cases import assert_passes, is_golden_check, params


@pytest.mark.parametrize("case", params(is_golden_check))
def test_golden_check(case, conformance_ctx):
    assert_passes(case, conformance_ctx)
