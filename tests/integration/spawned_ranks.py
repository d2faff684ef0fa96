"""The Megatron tests' worker processes: a one-rank group and a two-rank group started side by side.

``run_single_and_pair(single, pair)`` spawns ``single(port)`` (one process) and ``pair(rank, port)`` for ranks
0 and 1, each group with its own free rendezvous port; each returns ``(target, args)`` of one process. It joins
all three and fails, naming the log, unless every one exited 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from portable_rl.distributed import free_port

Job = tuple[Callable[..., Any], tuple]


def run_single_and_pair(
    single: Callable[[int], Job], pair: Callable[[int, int], Job], timeout_s: float = 900
) -> None:
    ctx = mp.get_context("spawn")
    port1, port2 = free_port("127.0.0.1"), free_port("127.0.0.1")
    jobs = [single(port1), *(pair(rank, port2) for rank in range(2))]
    procs = [ctx.Process(target=target, args=args) for target, args in jobs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout_s)
    assert [p.exitcode for p in procs] == [0, 0, 0], (
        "a Megatron rank failed; its traceback is in the log above"
    )
