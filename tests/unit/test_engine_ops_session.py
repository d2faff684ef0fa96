"""EngineOps.run_steps and update_session's sequencing, against an in-process fake client (no server).

The fake records the order calls start in; asked to, its continue_generation waits for the version read-back
to start and records whether it did, which only happens when the two are issued together.
"""

from __future__ import annotations

import asyncio

import pytest

from portable_rl.protocol.checksum import check_weights
from portable_rl.protocol.client import SESSION_CALLS, EngineError
from portable_rl.protocol.engine_ops import EngineOps
from portable_rl.weight_sync.base import WeightSyncError, update_session, while_closing


class FakeClient:
    def __init__(self, url: str, refuse: str | None = None, version: str = "7") -> None:
        self.base_url = url
        self.refuse = refuse
        self.version = version
        self.log: list[str] = []
        self.version_started: asyncio.Event | None = None
        self.wait_for_version = False
        self.overlapped = False

    async def _step(self, name: str) -> None:
        self.log.append(name)
        if name == self.refuse:
            raise EngineError(f"{self.base_url}/{name}: refused")

    async def pause_generation(self, mode: str) -> None:
        await self._step("pause_generation")

    async def flush_cache(self) -> None:
        await self._step("flush_cache")

    async def begin_weight_update(self) -> None:
        await self._step("begin_weight_update")

    async def end_weight_update(self) -> None:
        await self._step("end_weight_update")

    async def continue_generation(self) -> None:
        await self._step("continue_generation")
        self.version_started = self.version_started or asyncio.Event()
        if self.wait_for_version:
            await asyncio.wait_for(self.version_started.wait(), timeout=2)
            self.overlapped = True

    async def get_weight_version(self) -> str:
        await self._step("get_weight_version")
        self.version_started = self.version_started or asyncio.Event()
        self.version_started.set()
        return self.version

    async def get_server_info(self) -> dict:
        return {}  # SGLang declares no session batch: one request per call

    async def close(self) -> None:
        pass


class BatchingClient(FakeClient):
    """An engine that runs a whole session sequence per request (portable_rl's CPU engine server)."""

    def __init__(self, url: str, **fake) -> None:
        super().__init__(url, **fake)
        self.batches: list[list[str]] = []

    async def get_server_info(self) -> dict:
        return {"session_batch": sorted({path for _, path in SESSION_CALLS.values()})}

    async def session_batch(self, steps, pause_mode="abort", stop_on_error=True, weight_version=None):
        self.batches.append(list(steps))
        out = []
        for step in steps:
            try:
                out.append(await getattr(self, step)(*([pause_mode] if step == "pause_generation" else [])))
            except EngineError as exc:
                out.append(exc)
                if stop_on_error:
                    break
        return out


def _ops(n: int, client=FakeClient, **fake) -> list[EngineOps]:
    ops = []
    for i in range(n):
        op = EngineOps(f"http://127.0.0.1:{9000 + i}", timeout_s=10)
        op.client = client(op.client.base_url, **(fake if i == n - 1 else {}))
        ops.append(op)
    return ops


def test_session_runs_in_sglang_order_and_reads_the_version_while_resuming():
    ops = _ops(2)
    for op in ops:
        op.client.wait_for_version = True
    with update_session(ops, 7):
        for op in ops:
            op.client.log.append("update")
    for op in ops:
        assert op.client.overlapped
        log = op.client.log
        assert log[:5] == [
            "pause_generation",
            "flush_cache",
            "begin_weight_update",
            "update",
            "end_weight_update",
        ]
        assert sorted(log[5:]) == ["continue_generation", "get_weight_version"]


def test_session_names_a_stale_version():
    ops = _ops(2, version="6")
    with pytest.raises(WeightSyncError, match=r"did not move to '7'.*:9001 reports '6'"):
        with update_session(ops, 7):
            pass


def test_failed_begin_resumes_every_paused_engine_and_ends_opened_sessions():
    ops = _ops(2, refuse="begin_weight_update")
    with pytest.raises(
        WeightSyncError, match=r"begin_weight_update failed on 1 of 2 engine\(s\): .*:9001.*refused"
    ):
        with update_session(ops, 7, verify_version=False):
            pytest.fail("the body must not run when the session did not open everywhere")
    assert ops[0].client.log == [
        "pause_generation",
        "flush_cache",
        "begin_weight_update",
        "end_weight_update",
        "continue_generation",
    ]
    assert ops[1].client.log == [
        "pause_generation",
        "flush_cache",
        "begin_weight_update",
        "continue_generation",
    ]


def test_failed_end_still_resumes_and_is_reported():
    ops = _ops(1, refuse="end_weight_update")
    with pytest.raises(WeightSyncError, match="end_weight_update failed on 1 of 1"):
        with update_session(ops, 7):
            pass
    assert ops[0].client.log[:4] == [
        "pause_generation",
        "flush_cache",
        "begin_weight_update",
        "end_weight_update",
    ]
    assert "continue_generation" in ops[0].client.log[4:]


def test_failed_update_closes_the_session_without_a_version_check():
    ops = _ops(1, version="old")
    with pytest.raises(RuntimeError, match="bucket failed"):
        with update_session(ops, 7):
            raise RuntimeError("bucket failed")
    assert ops[0].client.log[-2:] == ["end_weight_update", "continue_generation"]


def test_while_closing_runs_once_the_update_is_done_while_the_engines_close():
    import threading

    ops = _ops(1)
    fake = ops[0].client
    compared = threading.Event()
    real_end = fake.end_weight_update

    async def end_waiting_for_the_work() -> None:
        # Answers only once the work ran: a session that ran it after closing would fail here.
        if not await asyncio.get_running_loop().run_in_executor(None, compared.wait, 5):
            raise EngineError("the work did not run while the session closed")
        await real_end()

    fake.end_weight_update = end_waiting_for_the_work

    def compare() -> list[str]:
        compared.set()
        return list(fake.log)

    with while_closing(compare) as results:
        with update_session(ops, 7):
            fake.log.append("update")
        with update_session(ops, 7):  # a second session in the same context closes without it
            pass
    assert results == [["pause_generation", "flush_cache", "begin_weight_update", "update"]]


def test_while_closing_is_skipped_by_a_failed_update_and_its_error_comes_after_the_resume():
    ops = _ops(1)
    with while_closing(lambda: pytest.fail("must not run after a failed update")) as results:
        with pytest.raises(RuntimeError, match="bucket failed"):
            with update_session(ops, 7):
                raise RuntimeError("bucket failed")
    assert results == []

    def broken() -> None:
        raise ValueError("compare failed")

    ops = _ops(1)
    with pytest.raises(ValueError, match="compare failed"), while_closing(broken):
        with update_session(ops, 7):
            pass
    assert ops[0].client.log[-1] in ("continue_generation", "get_weight_version")
    assert "continue_generation" in ops[0].client.log


def test_while_closing_is_left_to_the_caller_without_a_session():
    ops = _ops(1)
    with while_closing(lambda: "ran") as results, update_session(ops, 7, enabled=False):
        pass
    assert results == [] and ops[0].client.log == []


def test_run_steps_rejects_an_unknown_step():
    with pytest.raises(ValueError, match="unknown session step"):
        _ops(1)[0].run_steps(["pause_generation", "reboot"], {}, {})


@pytest.mark.parametrize(
    ("info", "prefers"),
    [
        ({"weight_update_load_formats": ["direct", "flattened_bucket"]}, True),
        (
            {
                "weight_update_load_formats": ["direct", "flattened_bucket"],
                "weight_update_prefers_per_tensor": True,
            },
            False,
        ),
        ({"weight_update_load_formats": ["direct"]}, False),
        ({"version": "0.5.23"}, True),  # SGLang declares nothing: its release decides
        ({"version": "0.5.2"}, False),
    ],
)
def test_auto_flattening_follows_what_the_engine_declares(info, prefers):
    op = EngineOps("http://127.0.0.1:9000", timeout_s=10)
    op._info = info
    assert op.prefers_flattened_bucket() is prefers


def test_overlap_runs_while_the_engines_open_their_sessions():
    import threading

    gathered = threading.Event()
    ops = _ops(1)
    fake = ops[0].client
    real_pause = fake.pause_generation

    async def pause_waiting_for_overlap(mode: str) -> None:
        # Returns only once the overlap ran: a session that opened before starting it would fail here.
        if not await asyncio.get_running_loop().run_in_executor(None, gathered.wait, 5):
            raise EngineError("overlap did not run while the session opened")
        await real_pause(mode)

    fake.pause_generation = pause_waiting_for_overlap

    def gather_first_bucket() -> str:
        gathered.set()
        return "bucket-0"

    with update_session(ops, 7, overlap=gather_first_bucket) as first:
        assert first == "bucket-0"
        assert fake.log[:3] == ["pause_generation", "flush_cache", "begin_weight_update"]


def test_failed_overlap_puts_the_engines_back():
    ops = _ops(1)

    def broken_gather() -> None:
        raise RuntimeError("gather failed")

    with pytest.raises(RuntimeError, match="gather failed"):
        with update_session(ops, 7, overlap=broken_gather):
            pytest.fail("the body must not run when the overlap failed")
    assert ops[0].client.log == [
        "pause_generation",
        "flush_cache",
        "begin_weight_update",
        "end_weight_update",
        "continue_generation",
    ]


def test_an_engine_that_batches_gets_each_opening_and_closing_in_one_request():
    ops = _ops(2, client=BatchingClient)
    with update_session(ops, 7):
        for op in ops:
            op.client.log.append("update")
    for op in ops:
        assert op.client.batches == [
            ["pause_generation", "flush_cache", "begin_weight_update"],
            ["end_weight_update", "continue_generation", "get_weight_version"],
        ]
        assert op.client.log[3] == "update"


def test_a_batched_refusal_is_reported_and_undone_like_a_lone_one():
    ops = _ops(2, client=BatchingClient, refuse="begin_weight_update")
    with pytest.raises(
        WeightSyncError, match=r"begin_weight_update failed on 1 of 2 engine\(s\): .*:9001.*refused"
    ):
        with update_session(ops, 7, verify_version=False):
            pytest.fail("the body must not run when the session did not open everywhere")
    assert ops[1].client.batches == [
        ["pause_generation", "flush_cache", "begin_weight_update"],
        ["continue_generation"],  # paused, session not opened: only resumed
    ]
    assert ops[0].client.batches[-1] == ["end_weight_update", "continue_generation"]


def test_a_failed_batch_request_fails_its_first_step_or_every_step_of_a_cleanup():
    op = _ops(1, client=BatchingClient)[0]

    async def unreachable(steps, pause_mode="abort", stop_on_error=True, weight_version=None):
        raise EngineError("http://127.0.0.1:9000/session_batch: connection refused")

    op.client.session_batch = unreachable
    done, failed = {}, {}
    op.run_steps(["pause_generation", "flush_cache"], done, failed).result(timeout=10)
    assert not done and list(failed) == ["pause_generation"]
    done, failed = {}, {}
    op.run_steps(["end_weight_update", "continue_generation"], done, failed, stop_on_error=False).result(10)
    assert not done and list(failed) == ["end_weight_update", "continue_generation"]


def test_check_weights_asks_the_engines_before_hashing_its_own_tensors(monkeypatch):
    """The engine hashes its weights while the trainer hashes the same weights: the two overlap."""
    import threading

    import torch

    from portable_rl.protocol import checksum

    asked = threading.Event()
    op = _ops(1)[0]
    op._info = {"weights_checksum": True}
    weights = [("w", torch.arange(6.0))]

    async def post(path, payload):
        assert path == "/get_weights_checksum"
        asked.set()
        return {"checksums": {"w": checksum.tensor_checksum(weights[0][1])}}

    op.client.post = post
    real = checksum.checksums

    def hashing_after_the_request(tensors):
        assert asked.wait(5), "the engine was asked only after the trainer hashed"
        return real(tensors)

    monkeypatch.setattr(checksum, "checksums", hashing_after_the_request)
    assert check_weights([op], weights).ok


@pytest.mark.parametrize("trainer_dtype", ["bfloat16", "float32"])
def test_check_weights_compares_in_the_dtype_the_engine_holds(trainer_dtype):
    """A bf16 trainer and a float32 engine (a GPU trainer, the CPU engine): equal iff the upcast values are."""
    import torch

    from portable_rl.protocol import checksum

    trainer = [("w", torch.randn(4, 3).to(getattr(torch, trainer_dtype))), ("steps", torch.arange(3))]
    held = {n: t.to(torch.float32) if t.is_floating_point() else t for n, t in trainer}
    op = _ops(1)[0]
    op._info = {"weights_checksum": True, "dtype": "float32"}

    async def post(path, payload):
        return {"checksums": {n: checksum.tensor_checksum(held[n]) for n in payload["names"]}}

    op.client.post = post
    assert check_weights([op], trainer).ok
    held["w"] = held["w"].clone()
    held["w"][0, 0] += 1e-3  # an engine value that is not the trainer's
    assert check_weights([op], trainer).engines[0].mismatched == ["w"]
