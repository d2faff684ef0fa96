"""Weight sync through a real engine vs a raw broadcast of the same bytes.

Run: ``python benchmarks/bench_weight_sync.py [--size-mb 256] [--bucket-mb 64] [--repeats 5] [--engine cpu|sglang]``

Builds a random Llama checkpoint of about ``--size-mb`` MB (fp32), starts one engine on it (portable_rl's CPU
engine, or the real SGLang server with ``--engine sglang --python <sglang venv python>``), and times
``WeightSync.update()`` of the full weights for each strategy: end to end as a trainer sees it (pause, flush,
session, every bucket's HTTP call + transfer + load into the engine's model, resume, version read-back). The
CPU engine also gets the shared-tensor sync with resident weights (the trainer writes into the engine's
shared-memory weights: one copy, no bucket requests), measured last because it moves the engine's weights.

The reference is the floor for moving those bytes with the platform's collective: one single-tensor broadcast
of the same number of bytes, rank 0 (this process) -> one receiver process, on a group built by the same
rendezvous code with the same backend (the engine's own group cannot be driven without its HTTP endpoint).
Each raw broadcast is followed by a one-element all-reduce so the time covers delivery, not just the send.
Prints medians of ``--repeats`` timed runs (after one warm-up) and the ratio to the raw broadcast.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
import torch.distributed as dist

from portable_rl.distributed import free_port
from portable_rl.models.tiny import TinySpec, build_tiny_checkpoint
from portable_rl.platform import current_platform
from portable_rl.protocol.process_group import init_weight_update_group
from portable_rl.rollout.engines.launcher import EngineSpec, launch_engine
from portable_rl.weight_sync import WeightSyncConfig, make_weight_sync

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 1024, 2816, 16, 8

RAW_RECEIVER = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from portable_rl.protocol.process_group import init_weight_update_group
    port, nbytes, rounds, backend = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    g = init_weight_update_group(master_address="127.0.0.1", master_port=port, rank=1, world_size=2,
                                 group_name="bench_raw", backend=backend, timeout_s=600)
    buf = torch.empty(nbytes, dtype=torch.uint8)
    ack = torch.zeros(1)
    for _ in range(rounds):
        g.broadcast(buf)
        dist.all_reduce(ack, group=g.pg)
    g.destroy()
    """
)


def layer_bytes() -> int:
    head_dim = HIDDEN // HEADS
    attn = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV_HEADS * head_dim
    return 4 * (attn + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN)


def build_checkpoint(root: Path, size_mb: float) -> Path:
    layers = max(1, round(size_mb * 2**20 / layer_bytes()))
    spec = TinySpec(
        arch="llama",
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
    )
    return build_tiny_checkpoint(root / "model", spec)


def load_weights(path: Path) -> list[tuple[str, torch.Tensor]]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    # Cloned into ordinary memory, where a trainer's weights (and the raw broadcast's buffer) live: tensors
    # from load_file read measurably slower, which charged every strategy for the benchmark's file cache.
    return sorted((name, t.clone()) for name, t in out.items())


def time_raw_broadcast(nbytes: int, repeats: int, backend: str) -> list[float]:
    port = free_port()
    rounds = repeats + 1
    proc = subprocess.Popen(
        [sys.executable, "-c", RAW_RECEIVER, str(port), str(nbytes), str(rounds), backend]
    )
    try:
        group = init_weight_update_group(
            master_address="127.0.0.1",
            master_port=port,
            rank=0,
            world_size=2,
            group_name="bench_raw",
            backend=backend,
            timeout_s=600,
        )
        buf = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
        ack = torch.zeros(1)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            group.broadcast(buf)
            dist.all_reduce(ack, group=group.pg)
            times.append(time.perf_counter() - start)
        group.destroy()
        proc.wait(120)
    finally:
        proc.kill()
    return times[1:]


def time_sync(
    url: str, cfg: WeightSyncConfig, mode: str, weights, repeats: int, version0: int
) -> list[float]:
    sync = make_weight_sync(cfg, mode)
    sync.connect([url])
    times = []
    try:
        for i in range(repeats + 1):
            start = time.perf_counter()
            sync.update(iter(weights), version=version0 + i)
            times.append(time.perf_counter() - start)
    finally:
        sync.disconnect()
    return times[1:]


def measure(
    size_mb: float = 256.0,
    bucket_mb: float = 64.0,
    repeats: int = 5,
    engine_kind: str = "cpu",
    python: str = sys.executable,
    log=print,
) -> tuple[int, list[tuple[str, list[float]]]]:
    """(bytes synced, [(label, seconds per timed run)]); the first row is the raw broadcast reference."""
    platform = current_platform()
    backend = platform.dist_backend

    with tempfile.TemporaryDirectory(prefix="bench-weight-sync-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        ckpt = build_checkpoint(root, size_mb)
        weights = load_weights(ckpt)
        nbytes = sum(t.numel() * t.element_size() for _, t in weights)
        log(
            f"checkpoint: {len(weights)} tensors, {nbytes / 2**20:.1f} MiB, built in {time.perf_counter() - t0:.1f}s"
        )
        engine_args = (
            {"num_threads": 2}
            if engine_kind == "cpu"
            else {"max_total_tokens": 4096, "skip_server_warmup": True}
        )
        env = {"SGLANG_USE_CPU_ENGINE": "1"} if engine_kind == "sglang" and platform.name == "cpu" else {}
        engine = launch_engine(
            EngineSpec(
                model_path=str(ckpt),
                kind=engine_kind,
                python=python,
                engine_args=engine_args,
                env=env,
                startup_timeout_s=900,
            )
        )
        try:
            common = dict(timeout_s=600, master_address="127.0.0.1")
            all_mb = nbytes / 2**20 + 1
            cases = [
                (
                    f"broadcast sync, flattened {bucket_mb:g} MB buckets",
                    "disaggregated",
                    WeightSyncConfig(
                        strategy="broadcast", bucket_mb=bucket_mb, flatten_buckets="on", **common
                    ),
                ),
                (
                    "broadcast sync, flattened, one bucket",
                    "disaggregated",
                    WeightSyncConfig(strategy="broadcast", bucket_mb=all_mb, flatten_buckets="on", **common),
                ),
                (
                    f"broadcast sync, per tensor ({bucket_mb:g} MB requests)",
                    "disaggregated",
                    WeightSyncConfig(
                        strategy="broadcast", bucket_mb=bucket_mb, flatten_buckets="off", **common
                    ),
                ),
                (
                    f"shared-tensor sync ({platform.shared_tensor_transport}), {bucket_mb:g} MB",
                    "colocated",
                    WeightSyncConfig(
                        strategy="shared_tensor", bucket_mb=bucket_mb, resident_weights="off", **common
                    ),
                ),
                (
                    "disk sync (safetensors)",
                    "colocated",
                    WeightSyncConfig(strategy="disk", disk_dir=str(root / "xfer"), **common),
                ),
            ]
            if engine_kind == "cpu":
                # Last: from here on the engine's weights live in shared memory (the CPU engine offers it).
                cases.append(
                    (
                        "shared-tensor sync, resident engine weights",
                        "colocated",
                        WeightSyncConfig(strategy="shared_tensor", resident_weights="on", **common),
                    )
                )
            raw = time_raw_broadcast(nbytes, repeats, backend)
            rows = [(f"raw {backend} broadcast, 1 tensor, rank 0 -> 1 receiver", raw)]
            for i, (label, mode, cfg) in enumerate(cases):
                rows.append((label, time_sync(engine.url, cfg, mode, weights, repeats, 1000 * (i + 1))))
        finally:
            engine.stop()
    return nbytes, rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-mb", type=float, default=256.0, help="approximate checkpoint size (fp32)")
    p.add_argument("--bucket-mb", type=float, default=64.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--engine", choices=["cpu", "sglang"], default="cpu")
    p.add_argument("--python", default=sys.executable, help="interpreter with the engine installed")
    args = p.parse_args(argv)
    platform = current_platform()
    backend = platform.dist_backend
    nbytes, rows = measure(args.size_mb, args.bucket_mb, args.repeats, args.engine, args.python)
    raw_median = statistics.median(rows[0][1])
    print(
        f"\nweight sync of {nbytes / 2**20:.1f} MiB to one {args.engine} engine on {platform.name} "
        f"({backend}); median of {args.repeats} runs after 1 warm-up"
    )
    header = f"{'what':<58} {'median s':>9} {'min s':>8} {'GiB/s':>7} {'x raw':>7}"
    print(header)
    print("-" * len(header))
    for label, times in rows:
        med = statistics.median(times)
        print(
            f"{label:<58} {med:>9.3f} {min(times):>8.3f} {nbytes / 2**30 / med:>7.2f} {med / raw_median:>7.2f}"
        )


if __name__ == "__main__":
    main()
