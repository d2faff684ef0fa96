"""One conformance context per test session: expensive shared work (the 2-process collective run, a local
Ray, tiny checkpoints) happens once and is torn down at the end."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def conformance_ctx():
    from portable_rl.conformance import Context
    from portable_rl.platform import detect

    ctx = Context(detect())
    yield ctx
    ctx.close()
