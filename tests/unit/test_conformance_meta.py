"""The conformance suite must be able to fail: break an implementation, watch the verdict flip.

The ``broken`` fixture swaps one piece of what a check measures (a kernel, the collective results, the
training run) for a deliberately wrong version through monkeypatch; every test asserts the check that
should notice reports ``fail``, and that the unbroken version passes. Collective results are simulated
here from the same inputs a correct backend would reduce (the real 3-process run is in tests/conformance).
"""

from __future__ import annotations

import json

import pytest

from portable_rl import conformance
from portable_rl.conformance import (
    Context,
    Measurement,
    collectives,
    determinism,
    kernels,
    run_case,
    tolerances,
)
from portable_rl.conformance.registry import CHECKS, Check, unmet_requirement
from portable_rl.conformance.tolerances import PLATFORMS, tolerance
from portable_rl.platform import load

conformance.load_all()


@pytest.fixture
def ctx(tmp_path):
    c = Context(load("cpu"), workdir=tmp_path)
    yield c
    c.close()


def verdicts(name: str, ctx: Context) -> dict[str | None, str]:
    conformance.load_all()
    return {case.dtype: run_case(case, ctx).status for case in CHECKS[name].cases()}


def perfect_collectives(platform_name, out_dir):
    """What the ranks of a correct (deterministic) backend hold after the worker's collectives."""
    import torch

    inputs = [collectives.rank_inputs(r) for r in range(collectives.WORLD)]
    small_sum = sum(i["small"] for i in inputs)
    det_sum = (inputs[0]["det"] + inputs[1]["det"]) + inputs[2]["det"]
    held = []
    for _ in range(collectives.WORLD):
        held.append(
            {
                "all_reduce": {
                    **{d: small_sum.to(getattr(torch, d)) for d in collectives.COLLECTIVE_DTYPES},
                    "random32": sum(i["random32"] for i in inputs),
                },
                "broadcast": {d: inputs[1]["bcast"][d].clone() for d in collectives.COLLECTIVE_DTYPES},
                "all_gather": {
                    d: [inputs[r]["gather"][d].clone() for r in range(collectives.WORLD)]
                    for d in collectives.COLLECTIVE_DTYPES
                },
                "determinism": [det_sum.clone(), det_sum.clone()],
            }
        )
    return held


@pytest.fixture
def broken(monkeypatch):
    """``broken(kind)`` applies one named breakage for the rest of the test."""

    def apply(kind: str) -> None:
        import torch

        if kind == "kernel_scaled":
            orig = kernels.IMPLEMENTATIONS["rmsnorm"]
            monkeypatch.setitem(kernels.IMPLEMENTATIONS, "rmsnorm", lambda x, w, eps: orig(x, w, eps) * 1.05)
        elif kind == "attention_not_causal":
            import torch.nn.functional as F

            def no_mask(q, k, v):
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
                return F.scaled_dot_product_attention(q, k, v, is_causal=False)

            monkeypatch.setitem(kernels.IMPLEMENTATIONS, "attention", no_mask)
        elif kind == "logprobs_off_by_one_token":
            orig = kernels.IMPLEMENTATIONS["token_logprobs"]
            monkeypatch.setitem(
                kernels.IMPLEMENTATIONS, "token_logprobs", lambda lg, t: orig(lg, (t + 1) % lg.shape[-1])
            )
        elif kind == "trainer_logprobs_without_upcast":

            def in_input_dtype(logits, targets):
                logp = torch.log_softmax(logits, dim=-1)
                return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)

            monkeypatch.setitem(kernels.IMPLEMENTATIONS, "trainer_token_logprobs", in_input_dtype)
        elif kind == "hf_rmsnorm_drops_weight":  # the library the check runs, not a replacement of it
            from transformers.models.llama import modeling_llama

            def forward(self, hidden_states):
                var = hidden_states.float().pow(2).mean(-1, keepdim=True)
                return (hidden_states.float() * torch.rsqrt(var + self.variance_epsilon)).to(
                    hidden_states.dtype
                )

            monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)
        elif kind == "hf_rotary_turns_backwards":
            from transformers.models.llama import modeling_llama

            real = modeling_llama.apply_rotary_pos_emb
            monkeypatch.setattr(
                modeling_llama,
                "apply_rotary_pos_emb",
                lambda q, k, cos, sin, *a, **kw: real(q, k, cos, -sin, *a, **kw),
            )
        elif kind.startswith("collective_"):
            what = kind.removeprefix("collective_")

            def corrupted(platform_name, out_dir):
                held = perfect_collectives(platform_name, out_dir)
                if what == "all_reduce":
                    held[1]["all_reduce"]["float32"][7] += 1
                elif what == "broadcast":
                    held[0]["broadcast"]["bfloat16"] = perfect_collectives(None, None)[0]["all_gather"][
                        "bfloat16"
                    ][0]
                elif what == "all_gather":
                    held[0]["all_gather"]["float32"].reverse()
                elif (
                    what == "determinism"
                ):  # the second run reduced in another order, as a real backend could
                    i = [collectives.rank_inputs(r)["det"] for r in range(collectives.WORLD)]
                    held[1]["determinism"][1] = i[0] + (i[1] + i[2])
                return held

            monkeypatch.setattr(collectives, "run_workers", corrupted)
        elif kind == "training_nondeterministic":
            calls = {"n": 0}
            orig = determinism.train_steps

            def noisy(platform, seed):
                calls["n"] += 1
                return orig(platform, seed + calls["n"])  # a different seed each run, like an unseeded init

            monkeypatch.setattr(determinism, "train_steps", noisy)
        else:
            raise ValueError(f"unknown breakage {kind!r}")

    return apply


@pytest.mark.parametrize(
    "kind,check,dtypes",
    [
        ("kernel_scaled", "kernels.rmsnorm", ("float32", "bfloat16")),
        ("attention_not_causal", "kernels.attention", ("float32", "bfloat16")),
        ("logprobs_off_by_one_token", "kernels.token_logprobs", ("float32", "bfloat16")),
        ("trainer_logprobs_without_upcast", "kernels.trainer_token_logprobs", ("bfloat16",)),
        ("hf_rmsnorm_drops_weight", "kernels.rmsnorm_hf", ("float32", "bfloat16")),
        ("hf_rotary_turns_backwards", "kernels.rotary", ("float32", "bfloat16")),
    ],
)
def test_broken_kernel_fails(kind, check, dtypes, ctx, broken):
    assert set(verdicts(check, ctx).values()) == {"pass"}
    broken(kind)
    after = verdicts(check, ctx)
    assert {d: v for d, v in after.items() if v == "fail"} == {d: "fail" for d in dtypes}


@pytest.mark.parametrize(
    "what,check,dtype",
    [
        ("all_reduce", "collectives.all_reduce", "float32"),
        ("broadcast", "collectives.broadcast", "bfloat16"),
        ("all_gather", "collectives.all_gather", "float32"),
        ("determinism", "collectives.all_reduce_determinism", None),
    ],
)
def test_corrupted_collective_fails(what, check, dtype, ctx, broken, monkeypatch, tmp_path):
    monkeypatch.setattr(collectives, "run_workers", perfect_collectives)
    assert set(verdicts(check, ctx).values()) == {"pass"}
    broken(f"collective_{what}")
    fresh = Context(load("cpu"), workdir=tmp_path / "fresh")
    result = verdicts(check, fresh)
    assert result[dtype] == "fail"
    assert all(v == "pass" for d, v in result.items() if d != dtype)  # only the corrupted case flips


def test_nondeterministic_training_fails(ctx, broken):
    assert verdicts("determinism.hf_train_steps", ctx) == {None: "pass"}
    broken("training_nondeterministic")
    assert verdicts("determinism.hf_train_steps", ctx) == {None: "fail"}


def test_training_that_never_steps_is_not_a_pass(ctx, monkeypatch):
    import torch

    frozen = {"losses": [2.0, 2.0], "weights": {"w": torch.zeros(2)}}
    monkeypatch.setattr(determinism, "train_steps", lambda platform, seed: frozen)
    case = CHECKS["determinism.hf_train_steps"].cases()[0]
    res = run_case(case, ctx)
    assert res.status == "fail" and "did not change the loss" in res.detail


def test_a_check_that_raises_is_a_failure_with_its_cause(ctx, monkeypatch):
    def boom(c, dtype):
        raise RuntimeError("device lost\nsecond line")

    monkeypatch.setitem(tolerances.TOLERANCES, "meta.boom", {"*": {"*": 0.0}})
    missing = run_case(Check("meta.untoleranced", "x", lambda c, d: Measurement(0.0)).cases()[0], ctx)
    assert missing.status == "fail" and "no tolerance for check 'meta.untoleranced'" in missing.reason

    res = run_case(Check("meta.boom", "nothing", boom).cases()[0], ctx)
    assert res.status == "fail" and res.reason == "raised RuntimeError: device lost"


def test_nan_is_a_failure(ctx, monkeypatch):
    monkeypatch.setitem(CHECKS, "meta.nan", Check("meta.nan", "nan", lambda c, d: Measurement(float("nan"))))
    monkeypatch.setitem(tolerances.TOLERANCES, "meta.nan", {"*": {"*": 1.0}})
    assert run_case(CHECKS["meta.nan"].cases()[0], ctx).status == "fail"


def test_every_case_has_a_tolerance_on_every_platform():
    for case in conformance.all_cases():
        for platform in PLATFORMS:
            assert tolerance(case.check.name, platform, case.dtype) >= 0


def test_requirements_become_reasons():
    cpu = load("cpu")
    gpu_check = Check("meta.gpu", "x", lambda c, d: Measurement(0.0), markers=("gpu",))
    assert "needs a GPU platform" in unmet_requirement(gpu_check, cpu)
    missing = Check(
        "meta.missing", "x", lambda c, d: Measurement(0.0), requires=("portable_rl.no_such_part",)
    )
    assert unmet_requirement(missing, cpu).startswith("component not available: portable_rl.no_such_part")
    two = Check("meta.two", "x", lambda c, d: Measurement(0.0), min_devices=2)
    assert unmet_requirement(two, cpu) is None  # on CPU ranks share the host


def test_a_renamed_component_is_an_unexpected_skip_and_fails_the_cli_flag(monkeypatch, capsys, tmp_path):
    from portable_rl.cli import main
    from portable_rl.conformance import registry

    check = CHECKS["kernels.trainer_token_logprobs"]
    assert "portable_rl.training.logprobs" in check.requires
    real = registry._module_exists
    monkeypatch.setattr(
        registry, "_module_exists", lambda m: m != "portable_rl.training.logprobs" and real(m)
    )
    cpu = load("cpu")
    why = unmet_requirement(check, cpu)
    assert why.startswith("component not available: portable_rl.training.logprobs")
    result = run_case(check.cases()[0], Context(cpu, workdir=tmp_path))
    assert result.status == "skipped" and not result.skip_expected
    only = ["conformance", "--platform", "cpu", "--only", "kernels.trainer_token_logprobs"]
    assert main(only) == 0  # without the flag a skip with a reason passes ...
    assert main([*only, "--fail-on-unexpected-skip"]) == 1  # ... with it (what CI runs) it fails
    out = capsys.readouterr().out
    assert "unexpected skip (--fail-on-unexpected-skip): kernels.trainer_token_logprobs[float32]" in out


def test_platform_skips_are_expected_and_pass_the_cli_flag(monkeypatch):
    from portable_rl.cli import main

    cpu = load("cpu")
    gpu_check = Check("meta.gpu", "x", lambda c, d: Measurement(0.0), markers=("gpu",))
    assert conformance.is_expected_skip(unmet_requirement(gpu_check, cpu))
    assert conformance.is_expected_skip(
        unmet_requirement(Check("meta.r", "x", lambda c, d: Measurement(0.0), markers=("rocm",)), cpu)
    )
    assert CHECKS["ray.device_placement"].markers == ("gpu",)
    assert (
        main(
            [
                "conformance",
                "--platform",
                "cpu",
                "--only",
                "ray.device_placement",
                "--fail-on-unexpected-skip",
            ]
        )
        == 0
    )


def test_a_deleted_golden_file_is_unexpected_an_unrecorded_platform_is_not(monkeypatch, tmp_path):
    from portable_rl.conformance import golden

    monkeypatch.setattr(
        golden, "golden_path", lambda name: golden.REPO / "tests" / "golden" / f"gone_{name}.json"
    )
    cpu_why = golden._golden_available(load("cpu"))
    assert "which the repository holds" in cpu_why and not conformance.is_expected_skip(cpu_why)
    monkeypatch.setattr(golden, "RECORDED_PLATFORMS", ())
    assert conformance.is_expected_skip(golden._golden_available(load("cpu")))


def test_recorded_platforms_are_the_golden_files_the_repository_holds():
    from portable_rl.conformance import golden

    on_disk = sorted(
        p.stem.removeprefix(f"{golden.RECIPE}_") for p in (golden.REPO / "tests" / "golden").glob("*.json")
    )
    assert on_disk == sorted(golden.RECORDED_PLATFORMS)


def test_pytest_cases_skip_only_what_the_platform_explains(monkeypatch):
    import sys

    sys.path.insert(0, str(golden_repo() / "tests" / "conformance"))
    try:
        import conformance_cases
    finally:
        sys.path.pop(0)
    from portable_rl.conformance import registry

    real = registry._module_exists
    monkeypatch.setattr(
        registry, "_module_exists", lambda m: m != "portable_rl.training.logprobs" and real(m)
    )
    params = {p.id: p for p in conformance_cases.params(lambda c: True)}
    renamed = params["kernels.trainer_token_logprobs[float32]"]
    assert not [m for m in renamed.marks if m.name == "skip"]  # runs, and fails with the reason
    gpu_only = params["ray.device_placement"]
    assert [m for m in gpu_only.marks if m.name == "skip"]


def golden_repo():
    from portable_rl.conformance import golden

    return golden.REPO


def test_requirements_on_a_one_gpu_host(monkeypatch):
    from fake_hosts import simulate_cuda

    simulate_cuda(monkeypatch, [(9, 0)])
    cuda = load("cuda")
    conformance.load_all()
    assert "needs 3 devices" in unmet_requirement(CHECKS["collectives.all_reduce"], cuda)
    assert unmet_requirement(CHECKS["ray.device_placement"], cuda) is None
    assert "needs the rocm platform" in unmet_requirement(
        Check("meta.rocm", "x", lambda c, d: Measurement(0.0), markers=("rocm",)), cuda
    )


def test_ray_env_comparison_reports_each_mismatch():
    from portable_rl.conformance.ray_visibility import compare_worker_env

    expected = [{"A": "1", "B": "x"}, {"A": "1", "B": "x"}]
    good = {"env": {"A": "1", "B": "x"}, "placement_group": "pg", "visible": [0]}
    bad = {"env": {"A": "1"}, "placement_group": "other", "visible": [1]}
    assert compare_worker_env(expected, [[0], [0]], [good, good], "pg") == []
    problems = compare_worker_env(expected, [[0], [0]], [good, bad], "pg")
    assert len(problems) == 3 and all(p.startswith("worker 1:") for p in problems)


def test_ray_worker_env_fails_when_the_shipped_placement_loses_the_bundle(ctx, monkeypatch):
    # Break what the check calls (portable_rl's own actor_options), on a real local Ray: actors placed
    # outside the placement group must be counted. The unbroken run passes in tests/conformance.
    from portable_rl.orchestration import placement

    real = placement.actor_options

    def without_bundle(*args, **kwargs):
        opts = real(*args, **kwargs)
        opts.pop("scheduling_strategy", None)
        return opts

    monkeypatch.setattr(placement, "actor_options", without_bundle)
    res = run_case(CHECKS["ray.worker_env"].cases()[0], ctx)
    assert res.status == "fail" and res.error >= 2, (res.reason, res.detail)
    assert "placement group" in res.detail


def test_weight_sync_fails_when_the_shipped_strategy_is_broken(ctx, monkeypatch):
    # The real CPU engine and the real shared-tensor strategy, with its own code broken in two ways a bug
    # could: the last tensor never sent (a partial sync), and one bit flipped in the staging buffer; and the
    # resident writes missing their last tensor.
    import torch

    from portable_rl.weight_sync import resident, shared_tensor

    real_update, real_flatten = shared_tensor.update_in_buckets, shared_tensor.flatten

    def partial(engines, cfg, staging, named, version, send):
        return real_update(engines, cfg, staging, list(named)[:-1], version, send)

    monkeypatch.setattr(shared_tensor, "update_in_buckets", partial)
    res = run_case(CHECKS["weight_sync.shared_tensor"].cases()[0], ctx)
    assert res.status == "fail" and res.error >= 1, (res.reason, res.detail)
    monkeypatch.setattr(shared_tensor, "update_in_buckets", real_update)

    def flipped(bucket, staging):
        flat, metas = real_flatten(bucket, staging)
        flat.view(torch.uint8)[0] ^= 1
        return flat, metas

    monkeypatch.setattr(shared_tensor, "flatten", flipped)
    res = run_case(CHECKS["weight_sync.shared_tensor"].cases()[0], ctx)
    assert res.status == "fail" and res.error >= 1, (res.reason, res.detail)
    monkeypatch.setattr(shared_tensor, "flatten", real_flatten)

    # Resident weights (the CPU engine offers them): the last tensor never written.
    real_write = resident.ResidentTargets.write
    monkeypatch.setattr(
        resident.ResidentTargets, "write", lambda self, named: real_write(self, list(named)[:-1])
    )
    res = run_case(CHECKS["weight_sync.shared_tensor"].cases()[0], ctx)
    assert res.status == "fail" and res.error >= 1, (res.reason, res.detail)


# ---- the CLI -----------------------------------------------------------------------------------------------
def test_cli_list(capsys):
    from portable_rl.cli import main

    assert main(["conformance", "--list"]) == 0
    out = capsys.readouterr().out
    for name in (
        "collectives.all_reduce",
        "kernels.attention",
        "determinism.hf_train_steps",
        "ray.worker_env",
    ):
        assert name in out


def test_cli_unknown_check_is_one_line_exit_2(capsys):
    from portable_rl.cli import main

    assert main(["conformance", "--only", "kernels.atention"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'kernels.atention'" in err[0] and "did you mean 'kernels.attention'" in err[0]


def test_cli_unavailable_platform_is_one_line_exit_2(capsys, monkeypatch):
    from portable_rl.cli import main

    monkeypatch.delenv("PORTABLE_RL_PLATFORM", raising=False)
    assert main(["conformance", "--platform", "rocm", "--only", "kernels.rmsnorm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rocm" in err[0] and "not available" in err[0]
    import os

    assert "PORTABLE_RL_PLATFORM" not in os.environ  # restored after the run


def test_cli_pass_then_broken_fails_exit_1_with_report(tmp_path, capsys, broken):
    from portable_rl.cli import main

    assert (
        main(["conformance", "--platform", "cpu", "--only", "kernels.rmsnorm", "--report", str(tmp_path)])
        == 0
    )
    broken("kernel_scaled")
    assert main(["conformance", "--platform", "cpu", "--only", "kernels", "--report", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "conformance-cpu.json").read_text())
    by_id = {(r["check"], r["dtype"]): r for r in report["results"]}
    assert by_id[("kernels.rmsnorm", "float32")]["status"] == "fail"
    assert by_id[("kernels.rmsnorm", "float32")]["error"] > by_id[("kernels.rmsnorm", "float32")]["tolerance"]
    assert by_id[("kernels.attention", "float32")]["status"] == "pass"
    assert report["summary"]["fail"] == 2 and report["platform"]["dist_backend"] == "gloo"
    assert report["versions"]["torch"].startswith("2.")
    md = (tmp_path / "conformance-cpu.md").read_text()
    assert "| `kernels.rmsnorm` | float32 |" in md and "| fail |" in md


# ---- trainer checks: a simulated correct trainer, then one corruption at a time ---------------------------
@pytest.fixture(scope="module")
def trainer_base(tmp_path_factory):
    """A correct Megatron spawn's record (the float64 HF answers in fp32, the checkpoint's weights), and the
    context cache holding the tiny checkpoints and HF references it was made from."""
    import torch
    from safetensors.torch import load_file

    from portable_rl.conformance import trainer

    ctx = Context(load("cpu"), workdir=tmp_path_factory.mktemp("trainer-meta"))
    record = {"timings": {}}
    for arch in trainer.ARCHS:
        ref = trainer._ref(ctx, arch)
        weights = load_file(str(ctx.tiny_checkpoint(arch) / "model.safetensors"))
        for tp in trainer.layouts(arch):
            record[f"{arch}/{tp}"] = {
                "logits": ref["logits"].float(),
                "logprobs": ref["logprobs"].float().tolist(),
                "weights": dict(weights),
            }
    record["llama/tp1/losses"] = record["llama/tp1/losses_again"] = [6.25, 5.75]
    record["llama/tp2/losses"] = [6.25, 5.75]
    samples = [{"prompt": [5, 6, 7], "response": [8, 9, 10, 11], "logprobs": [-1.0, -2.0, -3.0, -4.0]}]
    record["llama/tp1/engine_samples"] = samples
    record["llama/tp1/engine_logprobs"] = [list(s["logprobs"]) for s in samples]
    record["dtype"] = "float32"
    rows = [(torch.full((n,), -2.5), torch.full((n,), 3.0)) for n in (9, 14, 40)]
    record["llama/tp1/packed_vs_unpacked"] = {
        kind: {"seen": [(a.clone(), b.clone()) for a, b in rows], "loss": 6.25, "grad_norm": 3.1}
        for kind in ("packed", "unpacked")
    }
    return record, dict(ctx.cache)


TRAINER_CHECKS = [n for n in CHECKS if n.startswith("training.")] + [
    "determinism.megatron_train_steps",
    "rollout.engine_vs_trainer_logprobs",
]


@pytest.mark.parametrize(
    "corruption,check",
    [
        ("qwen3_logits_scaled", "training.megatron_vs_hf_logits"),
        ("llama_logprob_shifted", "training.megatron_vs_hf_logprobs"),
        ("qwen2_bias_perturbed", "training.hf_roundtrip"),
        ("tp2_loss_differs", "training.tp2_vs_tp1"),
        ("ep2_logits_differ", "training.ep2_vs_ep1"),
        ("second_run_differs", "determinism.megatron_train_steps"),
        ("packed_logprob_shifted", "training.packed_vs_unpacked"),
        ("packed_grad_norm_differs", "training.packed_vs_unpacked"),
        ("bf16_trainer_exports_unrounded_weights", "training.hf_roundtrip"),
        ("trainer_scores_engine_samples_differently", "rollout.engine_vs_trainer_logprobs"),
    ],
)
def test_corrupted_trainer_fails(corruption, check, trainer_base, monkeypatch, tmp_path):
    import copy

    import torch

    from portable_rl.conformance import trainer

    base, cache = trainer_base

    def context() -> Context:
        return Context(
            load("cpu"), workdir=tmp_path, cache={k: v for k, v in cache.items() if k != "trainer"}
        )

    trainer_checks = TRAINER_CHECKS
    monkeypatch.setattr(trainer, "run_trainer_workers", lambda c: base)
    ok = context()
    assert {n: verdicts(n, ok)[None] for n in trainer_checks} == {n: "pass" for n in trainer_checks}

    bad = copy.deepcopy(base)
    if corruption == "qwen3_logits_scaled":  # a conversion bug shows at every TP size
        for tp in ("tp1", "tp2"):
            bad[f"qwen3/{tp}"]["logits"] *= 1.001
    elif corruption == "llama_logprob_shifted":
        bad["llama/tp1"]["logprobs"][1][5] += 1e-3
    elif corruption == "qwen2_bias_perturbed":
        name = "model.layers.1.self_attn.k_proj.bias"
        bad["qwen2/tp2"]["weights"][name] = bad["qwen2/tp2"]["weights"][name] + torch.finfo(torch.float32).eps
    elif corruption == "ep2_logits_differ":  # e.g. an expert-parallel rank loaded the wrong experts
        bad["qwen3_moe/ep2"]["logits"] *= 1.001
    elif corruption == "tp2_loss_differs":
        bad["llama/tp2/losses"] = [6.25, 5.76]
    elif corruption == "second_run_differs":
        bad["llama/tp1/losses_again"] = [6.25, 5.750001]
    elif corruption == "packed_logprob_shifted":  # e.g. positions not restarting, attention crossing samples
        bad["llama/tp1/packed_vs_unpacked"]["packed"]["seen"][1][0][3] += 1e-4
    elif corruption == "packed_grad_norm_differs":  # e.g. micro-batch weights wrong for packed micro-batches
        bad["llama/tp1/packed_vs_unpacked"]["packed"]["grad_norm"] += 1e-4
    elif (
        corruption == "bf16_trainer_exports_unrounded_weights"
    ):  # bf16 trainer: the export must be bf16(ckpt)
        bad["dtype"] = "bfloat16"
    elif corruption == "trainer_scores_engine_samples_differently":
        bad["llama/tp1/engine_logprobs"][0][2] -= 1e-3
    monkeypatch.setattr(trainer, "run_trainer_workers", lambda c: bad)
    broken_ctx = context()
    after = {n: verdicts(n, broken_ctx)[None] for n in trainer_checks}
    assert {n for n, v in after.items() if v == "fail"} == {check}


# ---- rollout engine, weight sync, golden run: the checks' own logic with stand-ins -----------------------
def test_engine_logprobs_off_by_a_little_fail(ctx, monkeypatch):
    from portable_rl.conformance import engine, engine_fixture

    def fake_start(c, shift=0.0):
        samples = [
            {"prompt": [5, 17, 42], "response": [7, 99, 3, 12]},
            {"prompt": [9, 9], "response": [1, 2]},
        ]
        for s, row in zip(samples, engine.hf_logprobs(c, samples), strict=True):
            s["logprobs"] = [x + shift for x in row]
        return {"engine": None, "url": "http://unused", "kind": "stand-in", "samples": samples}

    monkeypatch.setattr(engine_fixture, "start_engine", fake_start)
    assert verdicts("rollout.engine_vs_hf_logprobs", ctx) == {None: "pass"}
    monkeypatch.setattr(engine_fixture, "start_engine", lambda c: fake_start(c, shift=1e-3))
    fresh = Context(load("cpu"), workdir=ctx.workdir / "fresh")
    assert verdicts("rollout.engine_vs_hf_logprobs", fresh) == {None: "fail"}


class _StandInEngine:
    """Holds weights in a dict; a 'strategy' writes into it, optionally corrupting one tensor."""

    def __init__(self):
        self.weights = {}

    def make_sync(self, corrupt: str | None):
        engine = self

        class Sync:
            def __init__(self, cfg, mode, platform=None):
                self.cfg = cfg

            def connect(self, urls):
                pass

            def update(self, named, version):
                for name, t in named:
                    t = t.clone()
                    if corrupt == "bit" and name.endswith("q_proj.weight"):
                        t.view(-1).view(__import__("torch").int32)[0] ^= 1
                    if corrupt == "drop" and name.endswith("norm.weight"):
                        continue
                    engine.weights[name] = t

            def disconnect(self):
                pass

        return Sync

    def check(self, urls, named):
        import torch

        from portable_rl.protocol.checksum import EngineCheck, WeightCheckReport

        rep = EngineCheck(engine="stand-in")
        for name, t in named:
            rep.compared += 1
            if name not in self.weights:
                rep.missing.append(name)
            elif not torch.equal(self.weights[name], t):
                rep.mismatched.append(name)
        return WeightCheckReport([rep])


@pytest.mark.parametrize(
    "corrupt,expected", [(None, "pass"), ("bit", "fail"), ("drop", "fail"), ("noop", "fail")]
)
def test_weight_sync_check_counts_what_the_engine_lacks(corrupt, expected, ctx, monkeypatch):
    import portable_rl.weight_sync as ws
    from portable_rl.conformance import engine

    stand_in = _StandInEngine()
    monkeypatch.setattr(engine, "running_engine", lambda c: {"url": "http://unused"})
    monkeypatch.setattr(ws, "make_weight_sync", stand_in.make_sync(corrupt))
    monkeypatch.setattr(ws, "check_weights", stand_in.check)
    if corrupt == "noop":  # the engine already holds what is synced: the check must not pass vacuously
        monkeypatch.setattr(engine, "perturbed_weights", lambda c, seed: sorted(stand_in.weights.items()))
        stand_in.weights = {"w": __import__("torch").ones(3)}
    res = run_case(CHECKS["weight_sync.broadcast"].cases()[0], ctx)
    assert res.status == expected, res.reason
    if corrupt in ("bit", "drop"):
        assert res.error >= 1


def test_golden_run_compares_every_recorded_metric(ctx, monkeypatch, tmp_path):
    from portable_rl.conformance import golden

    steps = [
        {"step": 1, "reward_mean": 0.25, "loss": 0.125, "grad_norm": 3.5, "time_step_s": 9.0},
        {"step": 2, "reward_mean": 0.5, "loss": -0.0625, "grad_norm": 2.75, "time_step_s": 8.0},
    ]
    recorded = golden.recorded_steps(steps)
    assert all("time_step_s" not in s for s in recorded)  # wall-clock numbers are never golden
    path = tmp_path / "tiny_cpu_cpu.json"
    path.write_text(json.dumps({"schema": 1, "steps": recorded}))
    monkeypatch.setattr(golden, "golden_path", lambda name: path)
    monkeypatch.setattr(golden, "_golden_available", lambda platform: None)
    monkeypatch.setitem(
        CHECKS,
        "golden.tiny_recipe",
        CHECKS["golden.tiny_recipe"].__class__(
            **{**CHECKS["golden.tiny_recipe"].__dict__, "requires": (), "available": None}
        ),
    )

    def run_with(rows):
        monkeypatch.setattr(golden, "run_recipe", lambda name, out: rows)
        return run_case(CHECKS["golden.tiny_recipe"].cases()[0], ctx)

    assert run_with([dict(s, time_step_s=99.0) for s in steps]).status == "pass"  # timing may differ
    shifted = [dict(s) for s in steps]
    shifted[1]["loss"] += 1e-3
    res = run_with(shifted)
    assert res.status == "fail" and "step 2 loss" in res.detail
    assert run_with(steps[:1]).status == "fail"  # a missing step


def _golden_case(monkeypatch, tmp_path, steps):
    """The golden check against a golden file of ``steps``; returns run(rows) -> CheckResult."""
    from portable_rl.conformance import golden

    path = tmp_path / "tiny_cpu_cpu.json"
    path.write_text(json.dumps({"schema": 1, "steps": steps}))
    monkeypatch.setattr(golden, "golden_path", lambda name: path)
    check = CHECKS["golden.tiny_recipe"]
    monkeypatch.setitem(
        CHECKS, "golden.tiny_recipe", check.__class__(**{**check.__dict__, "requires": (), "available": None})
    )

    def run_with(rows):
        monkeypatch.setattr(golden, "run_recipe", lambda name, out: rows)
        return run_case(CHECKS["golden.tiny_recipe"].cases()[0], Context(load("cpu"), workdir=tmp_path))

    return run_with


@pytest.mark.parametrize(
    "key,value,got,status",
    [
        ("logp_abs_diff", 3e-7, 6e-7, "pass"),  # engine/trainer rounding: within its absolute bound
        ("logp_abs_diff", 3e-7, 9e-5, "fail"),  # 300x at a tiny scale: an engine that missed a step
        ("advantage_mean", 7e-9, -7e-9, "pass"),  # zero by construction: the sign of the residue is noise
        ("advantage_mean", 7e-9, 1e-4, "fail"),  # advantages that no longer cancel
        ("grad_norm", 2.0, 2.0 * (1 + 5e-6), "pass"),
        ("grad_norm", 2.0, 2.0 * (1 + 5e-5), "fail"),
        ("num_tokens", 128.0, 129.0, "fail"),  # counts are exact
        ("weights_changed_frac", 1.0, 0.0, "fail"),  # a step that changed no weight
    ],
)
def test_golden_bounds_hold_each_metric_at_its_own_scale(key, value, got, status, monkeypatch, tmp_path):
    run_with = _golden_case(monkeypatch, tmp_path, [{"step": 1.0, key: value}])
    res = run_with([{"step": 1, key: got}])
    assert res.status == status, (res.reason, res.detail)
    if status == "fail":
        assert f"step 1 {key}" in res.detail


def test_golden_metric_without_a_bound_is_a_failure_naming_it(monkeypatch, tmp_path):
    run_with = _golden_case(monkeypatch, tmp_path, [{"step": 1.0, "new_metric": 1.0}])
    res = run_with([{"step": 1, "new_metric": 1.0}])
    assert res.status == "fail" and "'new_metric' has no bound" in res.reason


def test_every_golden_file_metric_has_a_bound_and_shows_learning():
    from portable_rl.conformance import golden

    files = sorted((golden.REPO / "tests" / "golden").glob("*.json"))
    assert files, "no golden files"
    for path in files:
        steps = json.loads(path.read_text())["steps"]
        for row in steps:
            for key in row:
                if key != "step":
                    golden.bound_for(key)
        assert golden.learning_problems(steps) == [], path.name


def test_record_refuses_a_run_that_does_not_learn(monkeypatch, tmp_path):
    from portable_rl.conformance import golden

    row = {"step": 1, "grad_norm": 0.0, "advantage_abs_mean": 0.0, "weights_changed_frac": 0.0}
    monkeypatch.setattr(golden, "run_recipe", lambda name, out: [row])
    monkeypatch.setattr(golden, "golden_path", lambda name: tmp_path / "g.json")
    with pytest.raises(RuntimeError, match="did not train.*grad_norm=0.0"):
        golden.record("cpu", tmp_path / "run")
    assert not (tmp_path / "g.json").exists()


def test_golden_without_a_file_is_skipped_naming_it(monkeypatch, tmp_path):
    from portable_rl.conformance import golden

    monkeypatch.setattr(golden, "golden_path", lambda name: tmp_path / "tests" / "golden" / f"x_{name}.json")
    monkeypatch.setattr(golden, "REPO", tmp_path)
    monkeypatch.setattr(golden, "RECIPE_PATH", tmp_path / "r.yaml")
    (tmp_path / "r.yaml").write_text("x: 1\n")
    why = golden._golden_available(load("cpu"))
    assert "no golden file tests/golden/x_cpu.json" in why and "--record --platform cpu" in why
