"""Peak memory of one trainer micro-batch, measured in a fresh process: ``python memory_probe.py CKPT TOKENS ATTN``.

Builds a world-size-1 ``MegatronActor`` on the tiny checkpoint with ``train.attention=ATTN``, runs one warm-up
``forward_backward`` (so optimizer state, gradient buffers and lazy imports exist), then one ``forward_backward``
over a single sample of TOKENS tokens. With ATTN other than ``local`` the micro-batch is packed
(``max_tokens_per_micro_batch=TOKENS``); ``local`` (Megatron's unfused attention) takes it padded.

Prints one JSON line: ``peak_bytes`` is the resident-set high-water mark during that call minus the resident set
just before it (Linux: ``/proc/self/clear_refs`` resets the mark), i.e. what the micro-batch itself needed.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def main(ckpt: str, tokens: int, attention: str) -> None:
    import torch

    from portable_rl.training.actor import ActorConfig, MegatronActor
    from portable_rl.training.batch import TrainBatch

    torch.set_num_threads(int(os.environ.get("PROBE_THREADS", "2")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    packed = attention != "local"
    config = ActorConfig(
        hf_checkpoint=ckpt,
        attention=attention,
        max_tokens_per_micro_batch=tokens if packed else None,
    )
    actor = MegatronActor(config, 0, 1, "127.0.0.1", port)
    vocab = actor.spec.vocab_size

    def batch(n: int) -> TrainBatch:
        ids = torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        return TrainBatch([ids[:16]], [ids[16:]], [[1] * (n - 16)])

    def loss_fn(logp, ent, mb):
        mask = mb["loss_mask"]
        return -(logp * mask).sum() / mask.sum(), {}

    actor.forward_backward(batch(64), loss_fn)
    before = _kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current resident set
    actor.forward_backward(batch(tokens), loss_fn)
    peak = _kib("VmHWM")
    print(
        json.dumps(
            {"tokens": tokens, "attention": actor.kernels.attention, "peak_bytes": (peak - before) * 1024}
        )
    )
    actor.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
