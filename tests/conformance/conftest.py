"""One conformance context per test session. Expensive shared work (the 2-process collective run, the Megatron
spawn) is computed once even under ``pytest -n``: workers share a cache directory and a lock.

The cache belongs to one test run: results from an earlier run (older code) must never be loaded. Without
xdist it lives in the session's base temp directory, which pytest creates fresh for every run (its parent is
shared by every run of the user: the cache must not sit there). Under xdist each worker's base temp is a
child of the run's own base temp; the cache sits in that common parent, named with the run's ``testrunuid``
(the controller hands the same id to every worker of one run, and no other run).
"""

from __future__ import annotations

from pathlib import Path

import pytest


def run_shared_dir(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    worker_input = getattr(config, "workerinput", None)
    if worker_input is None:
        return tmp_path_factory.getbasetemp() / "conformance-shared"
    return tmp_path_factory.getbasetemp().parent / f"conformance-shared-{worker_input['testrunuid']}"


@pytest.fixture(scope="session")
def conformance_ctx(request, tmp_path_factory):
    from portable_rl.conformance import Context
    from portable_rl.platform import detect

    shared = run_shared_dir(request.config, tmp_path_factory)
    ctx = Context(detect(), workdir=tmp_path_factory.mktemp("conformance"), shared_dir=shared)
    yield ctx
    ctx.close()
