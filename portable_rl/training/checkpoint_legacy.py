"""Reading the per-rank checkpoints of earlier releases (format 1), onto the layout they were saved with only.

Format 1 wrote one ``mp_rank_{tp}_{pp}_dp_{dp}.pt`` per rank (its model shard, the state and parameter tensors
of every torch optimizer inside the Megatron optimizer, the RNG states) and ``meta.json`` with
``"format": 1``. Those files are tied to one TP/PP/DP layout and to the optimizer's internal parameter order,
so they load only onto that layout; ``portable-rl train --resume`` refuses any other before the run starts.
The next save of a resumed run writes the layout-free format (``checkpoint.py``).

``load_legacy(path, model, optimizer, layout) -> rng_state`` restores model and optimizer from this rank's file
and returns its RNG states (the caller checks the layout first and restores them); ``LegacyFormatError`` names
a missing or mismatched file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def filename(tp_rank: int, pp_rank: int, dp_rank: int) -> str:
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}_dp_{dp_rank:03d}.pt"


def inner_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a Megatron optimizer (one per chained optimizer)."""
    chained = getattr(optimizer, "chained_optimizers", None)
    wrappers = chained if chained is not None else [optimizer]
    return [w.optimizer for w in wrappers if getattr(w, "optimizer", None) is not None]


class LegacyFormatError(RuntimeError):
    """This rank's file is missing or does not match the model and optimizer it is loaded into."""


@torch.no_grad()
def load_legacy(path: str | Path, model: torch.nn.Module, optimizer, layout) -> dict[str, Any]:
    file = Path(path) / filename(layout.tp_rank, layout.pp_rank, layout.dp_rank)
    if not file.is_file():
        raise LegacyFormatError(f"checkpoint {path} lacks {file.name} for this rank")
    payload = torch.load(file, map_location="cpu", weights_only=False)
    missing, unexpected = model.load_state_dict(payload["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise LegacyFormatError(f"{file.name}: missing {missing[:3]}, unexpected {list(unexpected)[:3]}")
    inners = inner_optimizers(optimizer)
    if len(inners) != len(payload["optimizers"]):
        raise LegacyFormatError(
            f"{file.name} holds {len(payload['optimizers'])} optimizers, the trainer has {len(inners)}"
        )
    for opt, state, mains in zip(inners, payload["optimizers"], payload["main_params"], strict=True):
        params = [p for group in opt.param_groups for p in group["params"]]
        if len(params) != len(mains):
            raise LegacyFormatError(
                f"{file.name}: {len(mains)} optimizer parameters saved, {len(params)} present"
            )
        for p, saved in zip(params, mains, strict=True):
            p.data.copy_(saved)
        opt.load_state_dict(state)
    return payload["rng"]
