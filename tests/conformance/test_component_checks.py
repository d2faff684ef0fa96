"""Conformance of the components on this platform: the trainer's log-prob function, the Megatron trainer
against transformers and across TP sizes, the rollout engine against both, every weight-sync strategy (one
engine and one Megatron spawn, shared by the cases)."""

from __future__ import annotations

import pytest
from conformance_cases import assert_passes, is_component_check, is_golden_check, is_platform_check, params

from portable_rl.conformance import load_all


@pytest.mark.parametrize("case", params(is_component_check))
def test_component_check(case, conformance_ctx):
    assert_passes(case, conformance_ctx)


def test_every_check_is_collected_by_exactly_one_file():
    for check in load_all().values():
        kinds = [is_platform_check(check), is_component_check(check), is_golden_check(check)]
        assert kinds.count(True) == 1, check.name


def test_the_shared_cache_belongs_to_this_run(conformance_ctx, tmp_path_factory, request):
    # A cache outside this run's own temp directory would hand later runs results of older code.
    shared, base = conformance_ctx.shared_dir, tmp_path_factory.getbasetemp()
    worker_input = getattr(request.config, "workerinput", None)
    if worker_input is None:
        assert base in shared.parents, (shared, base)
    else:  # base is this worker's popen-gwN; its parent is the run's base temp
        assert base.parent in shared.parents and worker_input["testrunuid"] in shared.name, (shared, base)
