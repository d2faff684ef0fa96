"""Conformance of the platform itself: collectives, kernels against float64, HF training determinism, Ray."""

from __future__ import annotations

import pytest
from conformance_cases import assert_passes, is_platform_check, params


@pytest.mark.parametrize("case", params(is_platform_check))
def test_platform_check(case, conformance_ctx):
    assert_passes(case, conformance_ctx)
