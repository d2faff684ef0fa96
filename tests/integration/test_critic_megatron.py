"""PPO's critic and several optimizer steps per rollout on real Megatron (CPU, gloo), in spawned ranks.

One world-size-1 process builds the actor with its co-located critic from the tiny tied-embedding checkpoint
(the critic is built untied with a value head), runs RL steps as the trainer does (GAE from the critic's values,
GSPO, 2 epochs x 2 mini-batches = 4 optimizer steps for the actor and for the critic), then saves, continues one
step, and restores the checkpoint into a fresh actor that must repeat that step bit for bit (actor and critic).
A two-rank gloo group runs the same first step on TP2, PP2, DP2 and DP2 with packed micro-batches: the same numbers
within fp32 reduction-order tolerance (the value head is replicated over TP, lives on the last pipeline stage, its
gradients are all-reduced over DP, and packed samples' values are read at their own offsets).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from spawned_ranks import run_single_and_pair

from portable_rl.models.tiny import TinySpec, build_tiny_checkpoint

pytestmark = pytest.mark.slow


def _groups(vocab: int):
    from portable_rl.data.types import Group, Sample

    g = torch.Generator().manual_seed(5)
    groups = []
    for gid in range(2):
        samples = []
        for j, n in enumerate((3, 5, 2, 4)):
            prompt = torch.randint(3, vocab, (3 + gid,), generator=g).tolist()
            response = torch.randint(3, vocab, (n,), generator=g).tolist()
            samples.append(Sample(gid, gid, prompt, response, [-6.0] * n, reward=float((gid + j) % 2)))
        groups.append(Group(gid, gid, samples))
    return groups


def _rl_step(actor, groups, algo):
    from portable_rl.rollout_to_train import make_loss_fn, make_value_loss_fn, prepare_train_batch

    batch, _ = prepare_train_batch(groups, algo, actor.compute_logprobs, actor.critic.compute_values)
    metrics = actor.train_step(batch, make_loss_fn(algo), algo.num_mini_batches, algo.ppo_epochs)
    metrics.update(
        actor.critic.train_step(batch, make_value_loss_fn(algo), algo.num_mini_batches, algo.ppo_epochs)
    )
    return batch, metrics


ALGO = dict(advantage_estimator="gae", policy_loss="gspo", ppo_epochs=2, num_mini_batches=2, lam=0.95)
# (TP, PP, token budget of packed micro-batches or None); DP = 2 / (TP x PP).
LAYOUTS = {"tp2": (2, 1, None), "pp2": (1, 2, None), "dp2": (1, 1, None), "dp2-packed": (1, 1, 16)}
TOL = dict(rel=1e-4, abs=1e-5)  # fp32, reduction orders differ between layouts


def _config(ckpt: str, tp: int = 1, pp: int = 1, budget: int | None = None):
    from portable_rl.training.actor import ActorConfig, OptimConfig, ParallelConfig

    return ActorConfig(
        hf_checkpoint=ckpt,
        parallel=ParallelConfig(tp, pp),
        optim=OptimConfig(lr=1e-3),
        micro_batch_size=2,
        critic_checkpoint=ckpt,
        critic_optim=OptimConfig(lr=1e-3),
        max_tokens_per_micro_batch=budget,
    )


def _pair_worker(rank: int, ckpt: str, out: str, port: int) -> None:
    torch.set_num_threads(1)
    from portable_rl.config.algo import AlgoConfig
    from portable_rl.training.actor import MegatronActor

    res = {}
    for name, (tp, pp, budget) in LAYOUTS.items():
        actor = MegatronActor(_config(ckpt, tp, pp, budget), rank, 2, "127.0.0.1", port)
        _, res[name] = _rl_step(actor, _groups(actor.spec.vocab_size), AlgoConfig(**ALGO))
        actor.ps.destroy_model_parallel()  # the next layout on the same process group
    if rank == 0:
        torch.save(res, Path(out) / "pair.pt")
    torch.distributed.destroy_process_group()


def _worker(ckpt: str, out: str, port: int) -> None:
    torch.set_num_threads(1)
    from portable_rl.config.algo import AlgoConfig
    from portable_rl.training.actor import MegatronActor

    algo = AlgoConfig(**ALGO)
    cfg = _config(ckpt)
    actor = MegatronActor(cfg, 0, 1, "127.0.0.1", port)
    groups = _groups(actor.spec.vocab_size)
    res = {"head": type(actor.critic.model.output_layer).__name__}
    batch, res["metrics1"] = _rl_step(actor, groups, algo)
    res["values0"] = batch.token_fields["old_values"]
    res["returns"] = batch.token_fields["returns"]
    res["values1"] = actor.critic.compute_values(batch)
    actor.save_checkpoint(str(Path(out) / "ckpt"))
    _, res["continued"] = _rl_step(actor, groups, algo)
    res["continued_values"] = actor.critic.compute_values(batch)
    fresh = MegatronActor(cfg, 0, 1, "127.0.0.1", port)
    res["restored_step"] = fresh.load_checkpoint(str(Path(out) / "ckpt"))
    _, res["resumed"] = _rl_step(fresh, groups, algo)
    res["resumed_values"] = fresh.critic.compute_values(batch)
    torch.save(res, Path(out) / "result.pt")
    actor.shutdown()


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("critic")
    ckpt = build_tiny_checkpoint(root / "tied", TinySpec(arch="llama", tie_word_embeddings=True))
    run_single_and_pair(
        lambda port: (_worker, (str(ckpt), str(root), port)),
        lambda rank, port: (_pair_worker, (rank, str(ckpt), str(root), port)),
        timeout_s=600,
    )
    return {
        **torch.load(root / "result.pt", weights_only=False),
        "pair": torch.load(root / "pair.pt", weights_only=False),
    }


def test_untrained_critic_predicts_zero_and_learns_the_returns(result):
    assert result["head"] == "ValueHead"
    # The value head starts at zero (weight and bias): every rollout-time value is exactly 0.
    assert all(v == 0.0 for row in result["values0"] for v in row)
    # 4 steps at lr 1e-3 on the clipped value loss move the values towards the GAE returns.
    flat = [
        (v, r)
        for vs, rs in zip(result["values1"], result["returns"], strict=True)
        for v, r in zip(vs, rs, strict=True)
    ]
    before = sum(abs(r) for _, r in flat) / len(flat)
    after = sum(abs(v - r) for v, r in flat) / len(flat)
    assert after < 0.95 * before, (before, after)  # observed: 0.466 -> 0.414


def test_several_updates_and_critic_metrics(result):
    m = result["metrics1"]
    assert m["optimizer_steps"] == 4.0 and m["step"] == 1 and m["num_samples"] == 8
    for key in ("loss", "grad_norm", "pg_clipfrac", "ppo_kl", "gspo_seq_ratio_mean"):
        assert key in m and torch.isfinite(torch.tensor(m[key])), key
    for key in (
        "critic/value_loss",
        "critic/grad_norm",
        "critic/vf_clipfrac",
        "critic/value_mean",
        "critic/lr",
    ):
        assert key in m and torch.isfinite(torch.tensor(m[key])), key
    assert m["critic/lr"] == 1e-3 and m["critic/value_loss"] > 0
    # Old log-probs come from before the first of the 4 steps: later steps see a moved policy.
    assert m["ppo_kl"] != 0.0


def test_resume_restores_actor_and_critic_exactly(result):
    assert result["restored_step"] == 1
    assert result["resumed"] == result["continued"]
    assert result["resumed_values"] == result["continued_values"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_train_actor_and_critic_alike(result, layout):
    want, got = result["metrics1"], result["pair"][layout]
    for key in ("loss", "grad_norm", "ppo_kl", "critic/value_loss", "critic/grad_norm", "critic/value_mean"):
        assert got[key] == pytest.approx(want[key], **TOL), key
