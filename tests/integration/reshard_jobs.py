"""Worker side of test_checkpoint_reshard: checkpoints saved on one parallel layout, resumed on others.

Two groups run at once: a one-rank group (TP1) and a two-rank gloo group (TP2, PP2, DP2, each with and
without the distributed optimizer). They meet through the checkpoints: the two-rank group waits for the
one-rank group's checkpoint, and the one-rank group waits for one the two-rank group saved on TP2. Every
resumed run records the losses of its next steps; rank 0 of each group writes what the test compares.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron_jobs import _make, pg_loss

from portable_rl.training.actor import MegatronActor
from portable_rl.training.checkpoint import read_meta
from portable_rl.training.checkpoint_legacy import filename, inner_optimizers

STEPS = 2  # steps before the save and after it (the second step after a resume uses the restored Adam state)


def _wait_for(path: Path, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path / "meta.json").is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no checkpoint appeared at {path}")
        time.sleep(0.2)


def _losses(actor: MegatronActor, batch, steps: int = STEPS) -> list[dict[str, float]]:
    return [actor.train_step(batch, pg_loss) for _ in range(steps)]


def save_format1(actor: MegatronActor, path: Path) -> None:
    """A checkpoint as earlier releases wrote it (per-rank ``.pt`` files, ``"format": 1``)."""
    import random

    import numpy as np
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    lay = actor.layout
    inners = inner_optimizers(actor.optimizer)
    payload = {
        "format": 1,
        "step": actor.step,
        "model": {
            k: v.detach().clone() for k, v in actor.model.state_dict().items() if isinstance(v, torch.Tensor)
        },
        "optimizers": [opt.state_dict() for opt in inners],
        "main_params": [
            [p.detach().clone() for g in opt.param_groups for p in g["params"]] for opt in inners
        ],
        "rng": {
            "torch": torch.get_rng_state(),
            "tracker": get_cuda_rng_tracker().get_states(),
            "python": random.getstate(),
            "numpy": np.random.get_state(),
        },
    }
    path.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path / filename(lay.tp_rank, lay.pp_rank, lay.dp_rank))
    dist.barrier()
    if dist.get_rank() == 0:
        meta = {"format": 1, "step": actor.step, "layout": lay.shape()}
        (path / "meta.json").write_text(json.dumps(meta))
    dist.barrier()


def single(rank: int, port: int, job: dict[str, Any]) -> dict[str, Any]:
    """TP1: checkpoints A0 (untrained) and A (after STEPS), a format-1 copy of A; then resumes the TP2 one."""
    root, batch = Path(job["root"]), job["batch"]
    out: dict[str, Any] = {}
    actor = _make(dict(ckpt=job["ckpt"], tp=1, pp=1), rank, 1, port)
    actor.save_checkpoint(str(root / "A0"))
    _losses(actor, batch)
    save_format1(actor, root / "A-format1")
    actor.save_checkpoint(str(root / "A"))
    out["continued"] = _losses(actor, batch)
    actor.ps.destroy_model_parallel()

    legacy = _make(dict(ckpt=job["ckpt"], tp=1, pp=1), rank, 1, port)
    out["format1_step"] = legacy.load_checkpoint(str(root / "A-format1"))
    out["format1_resumed"] = _losses(legacy, batch)
    legacy.ps.destroy_model_parallel()

    _wait_for(root / "B")  # saved by the two-rank group on TP2, one step after resuming A
    back = _make(dict(ckpt=job["ckpt"], tp=1, pp=1), rank, 1, port)
    out["B_on_tp1_step"] = back.load_checkpoint(str(root / "B"))
    out["B_on_tp1"] = _losses(back, batch, 1)
    back.ps.destroy_model_parallel()
    return out


LAYOUTS = {
    "tp2": dict(tp=2, pp=1),
    "pp2": dict(tp=1, pp=2),
    "dp2": dict(tp=1, pp=1),
    "tp2-distopt": dict(tp=2, pp=1, distopt=True),
    "pp2-distopt": dict(tp=1, pp=2, distopt=True),
    "dp2-distopt": dict(tp=1, pp=1, distopt=True),
}


def pair(rank: int, port: int, job: dict[str, Any]) -> dict[str, Any]:
    root, batch, ckpt = Path(job["root"]), job["batch"], job["ckpt"]
    out: dict[str, Any] = {}

    def make(name: str) -> MegatronActor:
        return _make(dict(ckpt=ckpt, **LAYOUTS[name]), rank, 2, port)

    # The distributed optimizer's own checkpoint C (DP2, after STEPS), resumed on TP2 and PP2 below.
    actor = make("dp2-distopt")
    _losses(actor, batch)
    actor.save_checkpoint(str(root / "C"))
    out["C_continued"] = _losses(actor, batch)
    actor.ps.destroy_model_parallel()
    for name in ("tp2-distopt", "pp2-distopt"):
        actor = make(name)
        out[f"C_on_{name}_step"] = actor.load_checkpoint(str(root / "C"))
        out[f"C_on_{name}"] = _losses(actor, batch)
        actor.ps.destroy_model_parallel()

    _wait_for(root / "A")
    for name in ("tp2", "pp2", "dp2"):
        actor = make(name)
        out[f"A_on_{name}_step"] = actor.load_checkpoint(str(root / "A"))
        if name == "tp2":
            out[f"A_on_{name}"] = _losses(actor, batch, 1)
            actor.save_checkpoint(str(root / "B"))  # "and back": TP1 resumes this one
            out[f"A_on_{name}"] += _losses(actor, batch, 1)
        else:
            out[f"A_on_{name}"] = _losses(actor, batch)
        actor.ps.destroy_model_parallel()

    # HF -> checkpoint (saved on TP1) -> PP2 -> HF.
    actor = make("pp2")
    actor.load_checkpoint(str(root / "A0"))
    actor.export_hf(str(root / "A0-export"))
    actor.ps.destroy_model_parallel()
    return out


def run(group: str, rank: int, world: int, port: int, job: dict[str, Any], out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = (single if group == "single" else pair)(rank, port, job)
    if rank == 0:
        result["meta_A"] = read_meta(Path(job["root"]) / "A")
        torch.save(result, Path(out_dir) / f"{group}.pt")
    dist.destroy_process_group()
