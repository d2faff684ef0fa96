"""Collective checks: three processes, the platform's torch.distributed backend, one device each.

One spawn (``torch.multiprocessing``, rendezvous over TCP on 127.0.0.1) runs every collective once and saves
what each rank holds; the parent then compares with values it computes itself:

* all_reduce: small integers (exact in float32 and bfloat16) and float32 random data from ranks 0 and 1 (the
  other ranks add zeros) — a sum of two non-zero operands is correctly rounded whatever the reduction order,
  so the expected value is exact (tolerance 0);
* broadcast from rank 1 and all_gather: every rank must hold the source tensors bit for bit;
* determinism: all_reduce of the same 4 Mi float32 random elements (non-zero on every rank) twice must give
  identical bits, on every rank (counts differing elements; tolerance 0). Three ranks, because with two the
  sum a + b is bit-identical in either order and no reduction-order change could show: with three,
  (a + b) + c and a + (b + c) differ in about a third of the elements, so a backend whose reduction order
  changes between runs, or that leaves ranks holding differently ordered sums, fails.

Workers are given the platform by name, call ``prepare_process_env()`` and pick device ``rank`` on device
platforms (hence ``min_devices=WORLD`` there). ``run_workers`` is the one seam a meta-test corrupts.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from portable_rl.conformance.registry import Context, Measurement, register
from portable_rl.distributed import free_port

WORLD = 3  # >= 3 so reduction order shows in float32 sums (module docstring)
EXACT_LEN = 4099  # odd, so no backend can hide an off-by-one behind a power-of-two chunking
DETERMINISM_LEN = 1 << 22
COLLECTIVE_DTYPES = ("float32", "bfloat16")


def rank_inputs(rank: int) -> dict[str, Any]:
    """The tensors rank ``rank`` contributes (CPU); the parent rebuilds them to compute expected values."""
    import torch

    gen = torch.Generator().manual_seed(1000 + rank)
    small = (torch.arange(EXACT_LEN) % 50 + 10 * rank).to(torch.float64)  # sums stay exact integers < 256
    out: dict[str, Any] = {
        "small": small,
        # Two non-zero operands (ranks 0 and 1): their float32 sum is exact in any order, zeros included.
        "random32": torch.randn(EXACT_LEN, generator=gen, dtype=torch.float32) * (rank < 2),
        "gather": {d: torch.randn(EXACT_LEN, generator=gen).to(getattr(torch, d)) for d in COLLECTIVE_DTYPES},
        "bcast": {d: torch.randn(EXACT_LEN, generator=gen).to(getattr(torch, d)) for d in COLLECTIVE_DTYPES},
        "det": torch.randn(DETERMINISM_LEN, generator=gen, dtype=torch.float32),
    }
    return out


def _worker(rank: int, platform_name: str, init_method: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from portable_rl.platform import load

    platform = load(platform_name)
    platform.prepare_process_env()
    device = platform.torch_device(rank)
    if platform.torch_device_type != "cpu":
        torch.accelerator.set_device_index(rank)
    dist.init_process_group(
        platform.dist_backend,
        init_method=init_method,
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=120),
    )
    try:
        inp = rank_inputs(rank)
        held: dict[str, Any] = {"all_reduce": {}, "broadcast": {}, "all_gather": {}}
        for d in COLLECTIVE_DTYPES:
            t = inp["small"].to(device=device, dtype=getattr(torch, d))
            dist.all_reduce(t)
            held["all_reduce"][d] = t.cpu()
        t = inp["random32"].to(device)
        dist.all_reduce(t)
        held["all_reduce"]["random32"] = t.cpu()
        for d in COLLECTIVE_DTYPES:
            t = inp["bcast"][d].to(device) if rank == 1 else torch.zeros_like(inp["bcast"][d], device=device)
            dist.broadcast(t, src=1)
            held["broadcast"][d] = t.cpu()
            src = inp["gather"][d].to(device)
            parts = [torch.empty_like(src) for _ in range(WORLD)]
            dist.all_gather(parts, src)
            held["all_gather"][d] = [p.cpu() for p in parts]
        runs = []
        for _ in range(2):
            t = inp["det"].to(device)
            dist.all_reduce(t)
            runs.append(t.cpu())
        held["determinism"] = runs
        platform.synchronize()
        torch.save(held, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_workers(platform_name: str, out_dir: Path) -> list[dict[str, Any]]:
    """Spawn the ranks, wait for them, and return what each rank held (index = rank)."""
    import torch
    import torch.multiprocessing as mp

    out_dir.mkdir(parents=True, exist_ok=True)
    init_method = f"tcp://127.0.0.1:{free_port('127.0.0.1')}"
    mp.start_processes(
        _worker,
        args=(platform_name, init_method, str(out_dir)),
        nprocs=WORLD,
        join=True,
        start_method="spawn",
    )
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def _held(ctx: Context) -> list[dict[str, Any]]:
    # Looked up through the module so a meta-test's monkeypatch of run_workers takes effect.
    import portable_rl.conformance.collectives as this

    return ctx.shared_memo(
        "collectives", lambda: this.run_workers(ctx.platform.name, ctx.workdir / "collectives")
    )


def _max_abs(a, b) -> float:
    import torch

    if a.shape != b.shape:
        return float("inf")
    return float((a.to(torch.float64) - b.to(torch.float64)).abs().max())


@register(
    "collectives.all_reduce",
    "max |all_reduce(sum) result - exact sum| over every rank (integers, and float32 random data as 'float32')",
    dtypes=COLLECTIVE_DTYPES,
    min_devices=WORLD,
)
def check_all_reduce(ctx: Context, dtype: str | None) -> Measurement:
    import torch

    held = _held(ctx)
    inputs = [rank_inputs(r) for r in range(WORLD)]
    expected = sum(i["small"] for i in inputs).to(getattr(torch, dtype))
    err = max(_max_abs(h["all_reduce"][dtype], expected) for h in held)
    if dtype == "float32":
        exact = inputs[0]["random32"] + inputs[1]["random32"]  # two non-zero operands: exact in any order
        err = max(err, *(_max_abs(h["all_reduce"]["random32"], exact) for h in held))
    return Measurement(err, f"{EXACT_LEN} elements x {WORLD} ranks")


@register(
    "collectives.broadcast",
    "max |broadcast(src=1) result - source| over every rank",
    dtypes=COLLECTIVE_DTYPES,
    min_devices=WORLD,
)
def check_broadcast(ctx: Context, dtype: str | None) -> Measurement:
    held = _held(ctx)
    source = rank_inputs(1)["bcast"][dtype]
    return Measurement(max(_max_abs(h["broadcast"][dtype], source) for h in held))


@register(
    "collectives.all_gather",
    "max |all_gather part r - rank r's tensor| over every rank and part",
    dtypes=COLLECTIVE_DTYPES,
    min_devices=WORLD,
)
def check_all_gather(ctx: Context, dtype: str | None) -> Measurement:
    held = _held(ctx)
    sources = [rank_inputs(r)["gather"][dtype] for r in range(WORLD)]
    err = 0.0
    for h in held:
        parts = h["all_gather"][dtype]
        if len(parts) != WORLD:
            return Measurement(float("inf"), f"got {len(parts)} parts, expected {WORLD}")
        err = max(err, *(_max_abs(p, s) for p, s in zip(parts, sources, strict=True)))
    return Measurement(err)


@register(
    "collectives.all_reduce_determinism",
    "elements that differ between two all_reduce runs of the same float32 data, and between ranks "
    "(three ranks: reduction order shows)",
    min_devices=WORLD,
)
def check_all_reduce_determinism(ctx: Context, dtype: str | None) -> Measurement:
    import torch

    held = _held(ctx)
    runs = [run for h in held for run in h["determinism"]]
    first = runs[0]
    differing = max(int((r.view(torch.int32) != first.view(torch.int32)).sum()) for r in runs[1:])
    return Measurement(float(differing), f"{DETERMINISM_LEN} float32 elements, 2 runs x {WORLD} ranks")
