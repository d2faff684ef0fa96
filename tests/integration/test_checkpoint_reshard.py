"""Layout-free checkpoints: saved on one TP/PP/DP layout, resumed on another, on CPU (gloo).

A one-rank group trains TP1 for two steps and saves checkpoint A (and A0 before training); a two-rank group
resumes A on TP2, PP2 and DP2, and saves B on TP2 one step later, which the one-rank group resumes ("and
back"). The distributed optimizer's checkpoint C (DP2) is resumed on TP2 and PP2 with the distributed optimizer.
Each resumed run's next two losses are compared with the run that continued on the saving layout: the first
depends on the restored weights only, the second also on the restored Adam moments and step (a resume that
lost them misses the second loss by ~1e-2 here).

Tolerance: 1e-4 relative / 1e-5 absolute, the one test_megatron_parallel uses between layouts. A resumed run on
another layout is the same computation with another order of floating-point reductions (TP splits matmuls and
all-reduces partial sums, DP all-reduces half-batch gradients), which moves fp32 losses by ~1e-7 here; on the
saving layout a resume is bitwise (test_megatron_parallel.test_resume_is_bitwise). HF -> checkpoint -> HF and
the format-1 resume are compared bitwise.
"""

from __future__ import annotations

import pytest
import torch
from spawned_ranks import run_single_and_pair
from test_megatron_parallel import _batch

from portable_rl.models.tiny import TinySpec, build_tiny_checkpoint
from portable_rl.training.convert import HFWeights

pytestmark = pytest.mark.slow  # ~1 CPU-minute over three processes

TOL = dict(rel=1e-4, abs=1e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("reshard")
    ckpt = build_tiny_checkpoint(root / "llama", TinySpec(arch="llama"))
    batch = _batch(HFWeights(ckpt)["model.embed_tokens.weight"].shape[0])
    job = dict(root=str(root), ckpt=str(ckpt), batch=batch)
    from reshard_jobs import run

    run_single_and_pair(
        lambda port: (run, ("single", 0, 1, port, job, str(root))),
        lambda rank, port: (run, ("pair", rank, 2, port, job, str(root))),
    )
    return {
        "root": root,
        "ckpt": ckpt,
        **torch.load(root / "single.pt", weights_only=False),
        **{f"pair:{k}": v for k, v in torch.load(root / "pair.pt", weights_only=False).items()},
    }


def _close(resumed: list[dict], reference: list[dict]) -> None:
    assert len(resumed) == len(reference)
    for got, want in zip(resumed, reference, strict=True):
        assert got["step"] == want["step"]
        assert got["loss"] == pytest.approx(want["loss"], **TOL)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], **TOL)


def test_the_checkpoint_is_megatrons_distributed_format(runs):
    files = {p.name for p in (runs["root"] / "A").iterdir()}
    assert {".metadata", "common.pt", "metadata.json", "meta.json"} <= files
    assert any(name.endswith(".distcp") for name in files) and not any(n.endswith(".pt.tmp") for n in files)
    assert runs["meta_A"]["format"] == 2 and runs["meta_A"]["step"] == 2
    assert runs["meta_A"]["layout"]["tensor_parallel"] == 1


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_tp1_checkpoint_resumes_on_another_layout(runs, layout):
    assert runs[f"pair:A_on_{layout}_step"] == 2
    _close(runs[f"pair:A_on_{layout}"], runs["continued"])


def test_tp2_checkpoint_resumes_back_on_tp1(runs):
    assert runs["B_on_tp1_step"] == 3
    _close(runs["B_on_tp1"], runs["pair:A_on_tp2"][1:])


@pytest.mark.parametrize("layout", ["tp2-distopt", "pp2-distopt"])
def test_distributed_optimizer_state_reshards(runs, layout):
    assert runs[f"pair:C_on_{layout}_step"] == 2
    _close(runs[f"pair:C_on_{layout}"], runs["pair:C_continued"])


def test_format1_checkpoint_resumes_bitwise_on_its_layout(runs):
    assert runs["format1_step"] == 2
    for got, want in zip(runs["format1_resumed"], runs["continued"], strict=True):
        assert got["loss"] == want["loss"] and got["grad_norm"] == want["grad_norm"]


def test_hf_checkpoint_hf_round_trip_is_bitwise(runs):
    exported, original = HFWeights(runs["root"] / "A0-export"), HFWeights(runs["ckpt"])
    assert sorted(exported.keys()) == sorted(original.keys())
    for name in original.keys():
        assert torch.equal(exported[name], original[name]), name
