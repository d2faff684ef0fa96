"""bf16 training done right, on the CPU (Megatron's bf16 path runs there through the compat layer).

One spawned world-size-1 ``MegatronActor`` with ``dtype="bfloat16"`` (packed micro-batches, the platform's
attention): every parameter is bf16, norms included (an fp32 norm weight under a bf16 input cannot take torch's
fused rms_norm); Megatron's optimizer holds fp32 master copies; before any step the exported HF weights are the
checkpoint cast once to bf16, bit for bit; after two steps the parameters (what export and weight sync read)
are exactly the fp32 masters cast to bf16, and the export holds those values; an fp32 export holds the fp32
masters (bits bf16 cannot hold), which round to the bf16 parameters.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from portable_rl.models.tiny import TinySpec, build_tiny_checkpoint
from portable_rl.training.convert import HFWeights

pytestmark = pytest.mark.slow  # one spawned trainer, ~15 s on 2 cores


def _bf16_worker(ckpt: str, port: int, out: str) -> None:
    from portable_rl.training.actor import ActorConfig, MegatronActor, OptimConfig
    from portable_rl.training.batch import TrainBatch

    torch.set_num_threads(1)
    actor = MegatronActor(
        ActorConfig(
            hf_checkpoint=ckpt, dtype="bfloat16", optim=OptimConfig(lr=1e-3), max_tokens_per_micro_batch=24
        ),
        0,
        1,
        "127.0.0.1",
        port,
    )
    record: dict = {
        "param_dtypes": {n: str(p.dtype) for n, p in actor.model.named_parameters()},
        "initial": {n: t.clone() for n, t in actor.named_hf_weights()},
    }
    g = torch.Generator().manual_seed(5)
    lengths = [(3, 9), (4, 7), (2, 12)]
    tokens = [torch.randint(3, actor.spec.vocab_size, (p + r,), generator=g).tolist() for p, r in lengths]
    batch = TrainBatch(
        [t[:p] for t, (p, _) in zip(tokens, lengths, strict=True)],
        [t[p:] for t, (p, _) in zip(tokens, lengths, strict=True)],
        [[1] * r for _, r in lengths],
    )

    def loss_fn(logp, ent, mb):
        mask = mb["loss_mask"]
        return -((logp * mask).sum(1) / mask.sum(1)).mean(), {}

    record["losses"] = [actor.train_step(batch, loss_fn)["loss"] for _ in range(2)]
    pairs = []
    for opt in [actor.optimizer, *getattr(actor.optimizer, "chained_optimizers", [])]:
        for model_group, main_group in zip(
            getattr(opt, "float16_groups", []), getattr(opt, "fp32_from_float16_groups", []), strict=True
        ):
            pairs += [
                (p.detach().clone(), m.detach().clone()) for p, m in zip(model_group, main_group, strict=True)
            ]
    record["pairs"] = pairs
    record["num_params"] = sum(1 for _ in actor.model.parameters())
    actor.export_hf(str(Path(out) / "export"))
    actor.export_hf(str(Path(out) / "export32"), dtype="float32")
    record["param_dtypes_after_export"] = {str(p.dtype) for p in actor.model.parameters()}
    record["after"] = {n: t.clone() for n, t in actor.named_hf_weights()}
    actor.shutdown()
    torch.save(record, Path(out) / "bf16.pt")


def test_bf16_trainer_keeps_fp32_masters_and_exports_them_cast(tmp_path):
    ckpt = build_tiny_checkpoint(tmp_path / "qwen3", TinySpec(arch="qwen3"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = mp.get_context("spawn").Process(target=_bf16_worker, args=(str(ckpt), port, str(tmp_path)))
    proc.start()
    proc.join(timeout=600)
    assert proc.exitcode == 0, "the bf16 trainer failed; its traceback is in the log above"
    rec = torch.load(tmp_path / "bf16.pt", weights_only=False)

    assert set(rec["param_dtypes"].values()) == {"torch.bfloat16"}, rec["param_dtypes"]
    assert any("layernorm" in n for n in rec["param_dtypes"])  # the norms are among them

    source = HFWeights(ckpt)
    assert set(rec["initial"]) == set(source.keys())
    for name, tensor in rec["initial"].items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, source[name].to(torch.bfloat16)), name

    assert len(rec["pairs"]) == rec["num_params"]  # every parameter has an fp32 master
    for param, master in rec["pairs"]:
        assert param.dtype == torch.bfloat16 and master.dtype == torch.float32
        assert torch.equal(param, master.to(torch.bfloat16))
    assert any(not torch.equal(m, m.to(torch.bfloat16).float()) for _, m in rec["pairs"]), (
        "after two steps the masters must hold bits bf16 cannot"
    )
    assert rec["losses"][1] < rec["losses"][0]

    # A wider export reads the fp32 masters themselves, and leaves the bf16 parameters in place.
    assert rec["param_dtypes_after_export"] == {"torch.bfloat16"}
    wide = HFWeights(tmp_path / "export32")
    assert all(wide[n].dtype == torch.float32 for n in wide.keys())
    assert any(not torch.equal(wide[n], wide[n].to(torch.bfloat16).float()) for n in wide.keys())
    for name in wide.keys():
        assert torch.equal(wide[name].to(torch.bfloat16), rec["after"][name]), name

    exported = HFWeights(tmp_path / "export")
    for name, tensor in rec["after"].items():
        assert torch.equal(exported[name], tensor), name
        assert not torch.equal(tensor, rec["initial"][name]) or "norm" in name


@pytest.mark.parametrize("strategy", ["broadcast", "shared_tensor"])
def test_bf16_trainer_syncs_to_the_float32_cpu_engine_with_weight_checks(tmp_path, strategy):
    """A GPU's layout on the CPU: a bf16 trainer, the float32 CPU engine, every sync checked bit for bit.

    The engine holds the trainer's bf16 values upcast (exactly) to float32; the check compares in the engine's
    dtype. Before, every check failed ("21 differ"), as on an H100 with ``rollout.engine=cpu``.
    """
    from train_cli import metrics, train

    run = tmp_path / "run"
    proc = train(run, "train.dtype=bfloat16", f"weight_sync.strategy={strategy}", "run.steps=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = metrics(run)
    assert [r["weight_check_ok"] for r in rows] == [1.0, 1.0]
