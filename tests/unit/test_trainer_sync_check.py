"""TrainerWorker.sync_weights with check_weight_update: the comparison runs while the engines close their session.

The worker method runs on a stand-in ``self`` (its weights and its weight sync), the strategy is a minimal one
session per update, and the engine an in-process fake client (test_engine_ops_session's), so no Megatron, Ray or
server is needed.
"""

from __future__ import annotations

import asyncio
import itertools
from types import SimpleNamespace

import pytest
import torch
from test_engine_ops_session import FakeClient, _ops

from portable_rl.orchestration.trainer_group import TrainerWorker
from portable_rl.protocol.checksum import tensor_checksum
from portable_rl.protocol.client import EngineError
from portable_rl.weight_sync.base import update_session

WEIGHTS = [("a", torch.arange(4.0)), ("b", torch.ones(2, 3)), ("c", torch.zeros(5))]


class HashingClient(FakeClient):
    """Serves /get_weights_checksum for ``served`` and logs when it was asked."""

    def __init__(self, url: str, served: dict[str, torch.Tensor] | None = None, **fake) -> None:
        super().__init__(url, version="3", **fake)
        self.served = dict(WEIGHTS) if served is None else served
        self.asked: asyncio.Event | None = None

    async def end_weight_update(self) -> None:
        # Ends the session only once the checksums were asked for: a check run after closing fails here.
        self.asked = self.asked or asyncio.Event()
        try:
            await asyncio.wait_for(self.asked.wait(), timeout=5)
        except TimeoutError as exc:
            raise EngineError("the check did not run while the session closed") from exc
        await super().end_weight_update()

    async def post(self, path: str, payload: dict) -> dict:
        assert path == "/get_weights_checksum"
        self.log.append("get_weights_checksum")
        self.asked = self.asked or asyncio.Event()
        self.asked.set()
        return {"checksums": {n: tensor_checksum(t) for n, t in self.served.items() if n in payload["names"]}}


class OneSession:
    """A strategy that sends, inside one update session, the first ``take`` tensors (all by default)."""

    def __init__(self, engines, take: int | None = None) -> None:
        self.engines, self.take, self.sent = engines, take, []

    def update(self, named_tensors, version: int) -> None:
        with update_session(self.engines, version):
            self.sent = list(itertools.islice(named_tensors, self.take))
            self.engines[0].client.log.append("update")


def _worker(client_kwargs: dict | None = None, take: int | None = None) -> SimpleNamespace:
    ops = _ops(1, client=HashingClient, **(client_kwargs or {}))
    ops[0]._info = {"weights_checksum": True}
    return SimpleNamespace(named_hf_weights=lambda all_stages: iter(WEIGHTS), _sync=OneSession(ops, take))


def test_the_check_runs_while_the_session_closes_and_passes():
    worker = _worker()
    out = TrainerWorker.sync_weights(worker, 3, check=True)
    assert out["weight_check_ok"] == 1.0 and out["weight_sync_s"] > 0
    log = worker._sync.engines[0].client.log
    assert log.index("update") < log.index("get_weights_checksum") < log.index("end_weight_update")
    assert [n for n, _ in worker._sync.sent] == ["a", "b", "c"]


def test_a_differing_engine_weight_fails_the_sync():
    served = {**dict(WEIGHTS), "b": torch.full((2, 3), 2.0)}
    with pytest.raises(RuntimeError, match=r"differ from the trainer's after sync 3.*1 differ \(first: b\)"):
        TrainerWorker.sync_weights(_worker({"served": served}), 3, check=True)


def test_tensors_the_strategy_did_not_consume_are_still_compared():
    served = {n: t for n, t in WEIGHTS if n != "c"}  # the engine never got "c"
    worker = _worker({"served": served}, take=2)
    with pytest.raises(RuntimeError, match=r"1 missing on engine \(first: c\)"):
        TrainerWorker.sync_weights(worker, 3, check=True)


def test_without_the_check_the_engines_are_not_asked():
    worker = _worker()
    worker._sync.engines[0].client.asked = asyncio.Event()
    worker._sync.engines[0].client.asked.set()  # nothing to wait for at the session's end
    out = TrainerWorker.sync_weights(worker, 3)
    assert "weight_check_ok" not in out
    assert "get_weights_checksum" not in worker._sync.engines[0].client.log
