"""Collective timeouts of the trainer's world group end with an error naming the group and the ranks.

Two real processes join a gloo world with a short timeout; rank 1 never joins rank 0's all_reduce (it
sleeps, or it exits), and rank 0's error must say which group, which rank waited, and for whom.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from portable_rl.distributed import collective_errors, free_port
from portable_rl.training.actor import MegatronActor, ParallelConfig, _names_collective_failures
from portable_rl.weight_sync import CollectiveTimeout

RANK = textwrap.dedent(
    """
    import datetime, os, sys, time
    import torch, torch.distributed as dist
    from portable_rl.weight_sync import CollectiveTimeout
    from portable_rl.distributed import collective_errors
    rank, port, peer = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=1.5))
    if rank == 1:
        if peer == "exit":
            time.sleep(0.5)
            os._exit(0)  # gone without a word, like a killed rank
        time.sleep(8)  # alive, but never joins the collective
        os._exit(0)
    t0 = time.monotonic()
    try:
        with collective_errors(group="the trainer's world group", backend="gloo", rank=0, world_size=2,
                               timeout_s=1.5, what="train_step"):
            dist.all_reduce(torch.ones(4))
    except CollectiveTimeout as exc:
        print(f"{time.monotonic() - t0:.2f}")
        print(exc)
        os._exit(0)
    print("no error")
    os._exit(1)
    """
)


def _run_pair(peer: str) -> tuple[float, str]:
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK, str(rank), str(port), peer],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        out, err = procs[0].communicate(timeout=90)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 0, f"rank 0 saw no CollectiveTimeout: {out}\n{err[-2000:]}"
    seconds, message = out.split("\n", 1)
    return float(seconds), message.strip()


def test_rank_that_never_joins_times_out_naming_group_and_ranks():
    seconds, msg = _run_pair("sleep")
    assert seconds < 6  # the configured 1.5 s, not torch's 30 min default
    assert "the trainer's world group (gloo, 2 ranks)" in msg
    assert "rank 0 timed out in train_step waiting for rank(s) 1" in msg
    assert "collective timeout 1.5s" in msg


def test_rank_that_dies_is_named_as_a_lost_peer():
    seconds, msg = _run_pair("exit")
    assert seconds < 6
    assert "rank 0 " in msg and "waiting for rank(s) 1" in msg and "(gloo, 2 ranks)" in msg
    # gloo reports a vanished peer as a closed connection (or, if it notices late, as a timeout)
    assert "lost a peer" in msg or "timed out" in msg


def test_other_errors_pass_through_unchanged():
    kwargs = dict(group="g", backend="gloo", rank=0, world_size=2, timeout_s=1.0, what="x")
    with pytest.raises(ValueError, match="bad shape"), collective_errors(**kwargs):
        raise ValueError("bad shape")
    with pytest.raises(RuntimeError, match="size mismatch") as info, collective_errors(**kwargs):
        raise RuntimeError("size mismatch")
    assert not isinstance(info.value, CollectiveTimeout)
    with pytest.raises(CollectiveTimeout, match=r"g \(gloo, 2 ranks\): rank 0 timed out in x"):
        with collective_errors(**kwargs):
            raise RuntimeError("[gloo/transport/tcp/pair.cc:500] Timed out waiting 1000ms for recv")


def test_trainer_collectives_are_guarded_and_their_timeout_is_configurable():
    guard = _names_collective_failures(lambda self: None).__code__

    def guarded(fn) -> bool:  # somewhere in its chain of decorators (torch.no_grad wraps too)
        while fn is not None:
            if getattr(fn, "__code__", None) is guard:
                return True
            fn = getattr(fn, "__wrapped__", None)
        return False

    for name in ("train_step", "compute_logprobs", "save_checkpoint", "load_checkpoint", "export_hf"):
        assert guarded(getattr(MegatronActor, name)), f"{name} does not name collective failures"
    assert not guarded(MegatronActor.info)
    assert ParallelConfig(collective_timeout_s=5).collective_timeout_s == 5
    with pytest.raises(ValueError, match="collective_timeout_s=0 must be a positive number"):
        ParallelConfig(collective_timeout_s=0)
