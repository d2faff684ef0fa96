"""One conformance context per test session. Expensive shared work (the 2-process collective run, the Megatron
spawn) is computed once even under ``pytest -n``: workers share a cache directory and a lock."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def conformance_ctx(tmp_path_factory):
    from portable_rl.conformance import Context
    from portable_rl.platform import detect

    # getbasetemp().parent is common to all xdist workers of one run (and private to that run).
    shared = tmp_path_factory.getbasetemp().parent / "conformance-shared"
    ctx = Context(detect(), workdir=tmp_path_factory.mktemp("conformance"), shared_dir=shared)
    yield ctx
    ctx.close()
