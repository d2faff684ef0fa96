"""Megatron training engine on CPU across parallel layouts, checked against Hugging Face transformers.

One world-size-1 process (TP1) and one two-rank gloo group (TP2, PP2, DP2 + distributed optimizer) run
concurrently; the parent compares their results with a plain transformers model trained the same way.

Tolerances (float32 throughout): logits and log-probs within 1e-4 absolute of transformers (observed ~1e-6;
the orders of reduction differ); per-step losses between layouts and transformers within 1e-4 relative /
1e-5 absolute; checkpoint resume and untrained export are compared bitwise.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest
import torch
from megatron_jobs import ENTROPY_COEF, LR
from spawned_ranks import run_single_and_pair

from portable_rl.distributed import free_port
from portable_rl.models.tiny import TinySpec, build_tiny_checkpoint
from portable_rl.training.batch import TrainBatch
from portable_rl.training.convert import HFWeights

pytestmark = pytest.mark.slow  # ~1 CPU-minute over three processes (imports dominate)

ARCHS = ("llama", "qwen2", "qwen3")
STEPS = 2
LOGIT_ATOL = 1e-4
LOSS_TOL = dict(rtol=1e-4, atol=1e-5)


def _batch(vocab: int) -> TrainBatch:
    g = torch.Generator().manual_seed(3)
    prompts, responses, masks, advs = [], [], [], []
    for i, (p, r) in enumerate([(3, 5), (5, 2), (4, 6), (2, 4)]):
        prompts.append(torch.randint(3, vocab, (p,), generator=g).tolist())
        responses.append(torch.randint(3, vocab, (r,), generator=g).tolist())
        masks.append([0 if (i == 2 and j == 0) else 1 for j in range(r)])
        advs.append([1.0 if i % 2 == 0 else -0.5] * r)
    return TrainBatch(prompts, responses, masks, token_fields={"advantages": advs})


def _hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _hf_logprobs(model, batch: TrainBatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rows = []
    for p, r in zip(batch.prompt_tokens, batch.response_tokens, strict=True):
        ids = torch.tensor([p + r])
        logp_all = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        target = ids[0, 1:]
        logp = logp_all.gather(-1, target.unsqueeze(-1)).squeeze(-1)[len(p) - 1 :]
        ent = -(logp_all.exp() * logp_all).sum(-1)[len(p) - 1 :]
        rows.append((logp, ent))
    return rows


def _hf_training(path: Path, batch: TrainBatch) -> list[float]:
    """Losses before each of STEPS Adam steps, the objective the actor optimises with micro-batches of 1."""
    model = _hf_model(path)
    opt = torch.optim.Adam(model.parameters(), lr=LR, betas=(0.9, 0.98), eps=1e-8)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        total = 0.0
        for i, (logp, ent) in enumerate(_hf_logprobs(model, batch)):
            mask = torch.tensor(batch.loss_masks[i], dtype=torch.float32)
            adv = torch.tensor(batch.token_fields["advantages"][i])
            n = mask.sum().clamp(min=1.0)
            loss = (-(logp * adv * mask).sum() / n - ENTROPY_COEF * (ent * mask).sum() / n) / len(batch)
            loss.backward()
            total += float(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(total)
    return losses


def _once_per_session(tmp_path_factory, name: str, compute):
    """Run ``compute(dir)`` once per pytest session even when xdist spreads this module over workers."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return compute(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent  # this session's directory, common to all workers
    result = shared / f"{name}.pt"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not result.exists():
            (shared / name).mkdir(exist_ok=True)
            torch.save(compute(shared / name), result)
    return torch.load(result, weights_only=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return _once_per_session(tmp_path_factory, "megatron-parallel", _run_everything)


def _run_everything(root: Path) -> dict:
    ckpts = {a: build_tiny_checkpoint(root / a, TinySpec(arch=a)) for a in ARCHS}
    ckpts["tied"] = build_tiny_checkpoint(root / "tied", TinySpec(arch="llama", tie_word_embeddings=True))
    vocab = HFWeights(ckpts["llama"])["model.embed_tokens.weight"].shape[0]
    batch = _batch(vocab)
    tokens = torch.tensor([sum(batch.prompt_tokens[:2], [])[:8], batch.response_tokens[2][:6] + [5, 6]])
    common = dict(batch=batch, tokens=tokens, steps=STEPS)
    single = [
        dict(name=f"tp1-{a}", ckpt=str(ckpts[a]), tp=1, pp=1, **common)
        for a in ("llama", "qwen2", "qwen3", "tied")
    ]
    single[0].update(export=str(root / "export-tp1-llama"), resume=str(root / "ckpt-tp1"))
    pair = [dict(name=f"tp2-{a}", ckpt=str(ckpts[a]), tp=2, pp=1, **common) for a in ARCHS]
    pair[1].update(export_initial=str(root / "export0-tp2-qwen2"), export=str(root / "export-tp2-qwen2"))
    pair += [
        dict(
            name="pp2-tied",
            ckpt=str(ckpts["tied"]),
            tp=1,
            pp=2,
            export_initial=str(root / "export0-pp2-tied"),
            resume=str(root / "ckpt-pp2"),
            **common,
        ),
        dict(name="pp2-qwen3", ckpt=str(ckpts["qwen3"]), tp=1, pp=2, **common),
        dict(
            name="dp2-llama",
            ckpt=str(ckpts["llama"]),
            tp=1,
            pp=1,
            distopt=True,
            resume=str(root / "ckpt-dp2"),
            **common,
        ),
        # Packed token-budget micro-batches (sample lengths 8, 7, 10, 6): TP2 packs 8+7 and 10+6 into 16;
        # PP2 pads both packs to one length; DP2 with a budget of 9 gives each sample its own micro-batch and
        # the 10-token sample, longer than the budget, one of its own.
        dict(name="tp2-packed-llama", ckpt=str(ckpts["llama"]), tp=2, pp=1, budget=16, **common),
        dict(name="pp2-packed-qwen3", ckpt=str(ckpts["qwen3"]), tp=1, pp=2, budget=16, **common),
        dict(name="dp2-packed-llama", ckpt=str(ckpts["llama"]), tp=1, pp=1, budget=9, **common),
        dict(
            name="dp2-global-sum-llama",
            ckpt=str(ckpts["llama"]),
            tp=1,
            pp=1,
            loss_scaling="global_sum",
            **common,
        ),
    ]
    out1, out2 = root / "single", root / "pair"
    out1.mkdir()
    out2.mkdir()
    from megatron_jobs import run_jobs

    run_single_and_pair(
        lambda port: (run_jobs, (0, 1, port, single, str(out1))),
        lambda rank, port: (run_jobs, (rank, 2, port, pair, str(out2))),
    )
    results = {
        **torch.load(out1 / "rank0.pt", weights_only=False),
        **torch.load(out2 / "rank0.pt", weights_only=False),
    }
    hf = {}
    for name, path in ckpts.items():
        model = _hf_model(path)
        with torch.no_grad():
            hf[name] = {
                "logits": model(tokens).logits,
                "logprobs": [lp for lp, _ in _hf_logprobs(model, batch)],
            }
        hf[name]["losses"] = _hf_training(path, batch)
    return {"root": root, "ckpts": ckpts, "batch": batch, "tokens": tokens, "results": results, "hf": hf}


def _arch(job: str) -> str:
    return job.rsplit("-", 1)[1]


@pytest.mark.parametrize("job", [f"tp1-{a}" for a in ARCHS] + [f"tp2-{a}" for a in ARCHS] + ["tp1-tied"])
def test_logits_match_transformers(setup, job):
    ours = setup["results"][job]["logits"]
    ref = setup["hf"][_arch(job)]["logits"]
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < LOGIT_ATOL


PACKED_JOBS = ["tp2-packed-llama", "pp2-packed-qwen3", "dp2-packed-llama"]


@pytest.mark.parametrize(
    "job", ["tp1-llama", "tp2-qwen2", "pp2-tied", "pp2-qwen3", "dp2-llama", *PACKED_JOBS]
)
def test_logprobs_match_transformers(setup, job):
    ours = setup["results"][job]["logprobs"]
    ref = setup["hf"][_arch(job)]["logprobs"]
    for row, ref_row in zip(ours, ref, strict=True):
        assert torch.allclose(torch.tensor(row), ref_row, atol=LOGIT_ATOL)


@pytest.mark.parametrize(
    "job",
    [f"tp1-{a}" for a in ARCHS]
    + [f"tp2-{a}" for a in ARCHS]
    + ["tp1-tied", "pp2-tied", "pp2-qwen3", "dp2-llama", "dp2-global-sum-llama", *PACKED_JOBS],
)
def test_training_losses_match_tp1_and_transformers(setup, job):
    losses = [m["loss"] for m in setup["results"][job]["metrics"]]
    arch = _arch(job)
    tp1 = [m["loss"] for m in setup["results"][f"tp1-{arch}"]["metrics"]]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(tp1), **LOSS_TOL)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(setup["hf"][arch]["losses"]), **LOSS_TOL)
    assert losses[1] < losses[0], "one Adam step on this loss must lower it"


def test_trainer_builds_the_attention_doctor_reports(setup):
    from portable_rl.commands.doctor import report
    from portable_rl.platform import reset_current_platform

    reset_current_platform()
    try:
        answer = report()["trainer_kernels"]["attention"]
    finally:
        reset_current_platform()
    classes = {"sdpa": "SdpaCoreAttention", "local": "DotProductAttention"}
    assert {r["core_attention"] for r in setup["results"].values()} == {classes[answer]}


def test_step_metrics_are_complete(setup):
    metrics = setup["results"]["tp2-llama"]["metrics"]
    assert [m["step"] for m in metrics] == [1, 2]
    batch = setup["batch"]
    assert metrics[0]["num_tokens"] == sum(sum(m) for m in batch.loss_masks)
    assert metrics[0]["grad_norm"] > 0 and metrics[0]["entropy"] > 0 and metrics[0]["lr"] == LR
    ref_mean = sum(
        float((lp * torch.tensor(m, dtype=torch.float32)).sum() / max(sum(m), 1))
        for lp, m in zip(setup["hf"]["llama"]["logprobs"], batch.loss_masks, strict=True)
    ) / len(batch)
    assert abs(metrics[0]["mean_logp"] - ref_mean) < 1e-4


@pytest.mark.parametrize("job", ["tp1-llama", "pp2-tied", "dp2-llama"])
def test_resume_is_bitwise(setup, job):
    r = setup["results"][job]
    assert r["restored_step"] == STEPS
    assert r["resumed"]["step"] == r["continued"]["step"] == STEPS + 1
    for key in ("loss", "grad_norm", "entropy", "mean_logp"):
        assert r["resumed"][key] == r["continued"][key], key
    assert r["resumed_weights"].keys() == r["continued_weights"].keys()
    for name, tensor in r["continued_weights"].items():
        assert torch.equal(r["resumed_weights"][name], tensor), name


@pytest.mark.parametrize("export, source", [("export0-tp2-qwen2", "qwen2"), ("export0-pp2-tied", "tied")])
def test_untrained_export_reproduces_the_source_exactly(setup, export, source):
    exported = HFWeights(setup["root"] / export)
    original = HFWeights(setup["ckpts"][source])
    assert sorted(exported.keys()) == sorted(original.keys())
    for name in original.keys():
        assert torch.equal(exported[name], original[name]), name


@pytest.mark.parametrize(
    "export, job", [("export-tp1-llama", "tp1-llama"), ("export-tp2-qwen2", "tp2-qwen2")]
)
def test_trained_export_loads_in_transformers(setup, export, job):
    model = _hf_model(setup["root"] / export)
    with torch.no_grad():
        ref = [lp for lp, _ in _hf_logprobs(model, setup["batch"])]
    ours = setup["results"][job]["logprobs_after"]
    before = setup["results"][job]["logprobs"]
    assert any(
        not torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-3)
        for a, b in zip(ours, before, strict=True)
    )
    for row, ref_row in zip(ours, ref, strict=True):
        assert torch.allclose(torch.tensor(row), ref_row, atol=LOGIT_ATOL)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(setup["root"] / export).chat_template


def test_named_hf_weights_equal_the_export(setup):
    weights = setup["results"]["pp2-tied"]["continued_weights"]
    assert "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights
    assert len(weights) == len(HFWeights(setup["ckpts"]["tied"]).keys())


def test_ray_actors_drive_training(tmp_path):
    """The actor as orchestration uses it: two Ray actors (TP2) with a reference model, driven remotely."""
    import ray

    from portable_rl.training.actor import ActorConfig, ParallelConfig, remote_class

    ckpt = build_tiny_checkpoint(tmp_path / "qwen3", TinySpec(arch="qwen3"))
    batch = _batch(HFWeights(ckpt)["model.embed_tokens.weight"].shape[0])
    config = ActorConfig(
        hf_checkpoint=str(ckpt), parallel=ParallelConfig(tensor_parallel=2), ref_checkpoint=str(ckpt)
    )

    def loss(logp, entropy, mb):  # nested, so Ray pickles it by value
        mask = mb["loss_mask"]
        kl = ((logp - mb["ref_logprobs"]) * mask).sum() / mask.sum()
        return -(logp * mb["advantages"] * mask).sum() / mask.sum(), {"kl": kl.detach()}

    if ray.is_initialized():  # another module of this xdist worker left its Ray up
        ray.shutdown()
    ray.init(num_cpus=2, object_store_memory=100 * 1024**2, include_dashboard=False)
    try:
        port = free_port("127.0.0.1")  # every rank gets the same rendezvous port
        actors = [remote_class(num_cpus=1).remote(config, r, 2, "127.0.0.1", port) for r in range(2)]
        policy = ray.get([a.compute_logprobs.remote(batch) for a in actors])
        ref = ray.get([a.compute_logprobs.remote(batch, "ref") for a in actors])
        assert policy[0] == policy[1], "every rank returns the whole batch"
        # Same weights; the policy's live in DDP's flat buffer, so float32 sums may round differently.
        for row, ref_row in zip(policy[0], ref[0], strict=True):
            assert torch.allclose(torch.tensor(row), torch.tensor(ref_row), atol=1e-5)
        batch.token_fields.update(rollout_logprobs=policy[0], ref_logprobs=ref[0])
        metrics = ray.get([a.train_step.remote(batch, loss) for a in actors])
        assert metrics[0] == metrics[1]
        assert metrics[0]["logp_abs_diff"] < 1e-5 and abs(metrics[0]["kl"]) < 1e-5 and metrics[0]["step"] == 1
        after = ray.get([a.compute_logprobs.remote(batch, "ref") for a in actors])  # collective: all ranks
        assert after[0] == ref[0], "the reference model must not train"
        trained = ray.get([a.compute_logprobs.remote(batch) for a in actors])
        assert trained[0] != policy[0]
    finally:
        ray.shutdown()
