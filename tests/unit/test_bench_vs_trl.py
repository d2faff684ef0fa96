"""The TRL comparison benchmark builds the same workload for both sides and measures the right steps.

Covers only the parts of benchmarks/bench_vs_trl.py that do not import trl (config building, step
selection, medians, reward adapter), so it runs without the ``bench`` extra.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples" / "smollm2_arithmetic_cpu.yaml"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_vs_trl", ROOT / "benchmarks" / "bench_vs_trl.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_vs_trl"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_vs_trl", None)


def test_both_sides_get_the_same_workload(bench):
    w = bench.Workload(recipe=str(RECIPE), steps=3, prompts=2, group_size=4, max_tokens=32, threads=2)
    recipe = bench.load_workload(w)
    ro = recipe.rollout
    assert (ro.prompts_per_step, ro.samples_per_prompt, ro.max_new_tokens) == (2, 4, 32)
    assert recipe.run.steps == 5  # 3 measured + warm-up + the checkpointing last step
    assert recipe.data.train.shuffle is False and ro.filter is None and recipe.run.async_rollout is False
    assert ro.engine_args["num_threads"] == 2

    kw = bench.trl_config_kwargs(recipe, w, "out", use_cpu=True)
    assert kw["num_generations"] == 4
    assert kw["generation_batch_size"] == 8
    assert kw["per_device_train_batch_size"] == recipe.train.micro_batch_size
    assert kw["per_device_train_batch_size"] * kw["gradient_accumulation_steps"] == 8
    assert kw["max_completion_length"] == 32
    assert kw["max_steps"] == 4  # 3 measured + warm-up
    assert kw["temperature"] == ro.temperature == 0.6
    assert kw["top_p"] == ro.top_p and kw["top_k"] == 0  # portable_rl's -1 = no top-k = TRL's 0
    assert kw["learning_rate"] == recipe.train.optim.lr == 1e-5
    assert (kw["adam_beta1"], kw["adam_beta2"], kw["adam_epsilon"]) == (
        recipe.train.optim.adam_beta1,
        recipe.train.optim.adam_beta2,
        recipe.train.optim.adam_eps,
    )
    assert kw["max_grad_norm"] == recipe.train.optim.clip_grad
    assert kw["lr_scheduler_type"] == "constant"
    assert kw["gradient_checkpointing"] is False and kw["bf16"] is False and kw["fp16"] is False
    assert kw["use_vllm"] is False and kw["use_transformers_continuous_batching"] is False
    assert kw["loss_type"] == "dapo" and kw["beta"] == recipe.algo.kl_coef
    assert kw["shuffle_dataset"] is False and kw["seed"] == recipe.run.seed


def test_recipe_values_flow_through_when_flags_are_absent(bench):
    recipe = bench.load_workload(bench.Workload(recipe=str(RECIPE), steps=1))
    kw = bench.trl_config_kwargs(recipe, bench.Workload(recipe=str(RECIPE), steps=1), "o", use_cpu=True)
    assert kw["generation_batch_size"] == 16 and kw["max_completion_length"] == 48  # the recipe's 4 x 4, 48


def test_bad_workloads_fail_with_the_value_named(bench):
    with pytest.raises(ValueError, match="micro_batch=3"):
        bench.load_workload(bench.Workload(recipe=str(RECIPE), prompts=2, group_size=4, micro_batch=3))
    with pytest.raises(ValueError, match="group_size=1"):
        bench.Workload(recipe=str(RECIPE), group_size=1)
    with pytest.raises(ValueError, match="steps=0"):
        bench.Workload(recipe=str(RECIPE), steps=0)
    with pytest.raises(ValueError, match="nope.yaml"):
        bench.Workload(recipe="nope.yaml")
    w = bench.Workload(recipe=str(RECIPE))
    recipe = bench.load_workload(w)
    recipe.algo.advantage_estimator = "reinforce_plus_plus"
    with pytest.raises(ValueError, match="reinforce_plus_plus"):
        bench.trl_config_kwargs(recipe, w, "o", use_cpu=True)


def test_bf16_recipe_maps_to_trl_bf16(bench):
    w = bench.Workload(recipe=str(RECIPE))
    recipe = bench.load_workload(w)
    recipe.train.dtype = "bfloat16"
    kw = bench.trl_config_kwargs(recipe, w, "o", use_cpu=True)
    assert kw["bf16"] is True and kw["fp16"] is False and kw["model_init_kwargs"] == {"dtype": "bfloat16"}


def test_quick_sets_defaults_but_explicit_flags_win(bench):
    args = bench.build_parser().parse_args(["--quick", "--prompts", "3", "--recipe", str(RECIPE)])
    w = bench.workload_from_args(args)
    assert w.prompts == 3 and w.group_size == bench.QUICK["group_size"] and w.steps == bench.QUICK["steps"]
    w = bench.workload_from_args(bench.build_parser().parse_args(["--recipe", str(RECIPE)]))
    assert (w.prompts, w.group_size, w.max_tokens, w.steps) == (None, None, None, 3)


def test_portable_rl_steps_skip_warmup_and_final_checkpoint_step(bench):
    rows = [
        {
            "step": s,
            "time_step_s": t,
            "num_samples": 8.0,
            "response_len_mean": m,
            "reward_mean": 0.5,
            "time_generate_s": t / 2,
            "time_train_s": t / 4,
            "time_sync_s": 0.1,
        }
        for s, t, m in [(1, 100.0, 10.0), (2, 4.0, 20.0), (3, 2.0, 30.0), (4, 8.0, 40.0), (5, 50.0, 50.0)]
    ]
    r = bench.portable_rl_steps(list(reversed(rows)))
    assert r.step_s == [4.0, 2.0, 8.0]
    assert r.median_step_s == 4.0
    assert r.samples_per_s == pytest.approx(2.0)  # median of 8/4, 8/2, 8/8
    assert r.tokens_per_s == pytest.approx(8 * 20 / 4.0)  # median of 40, 120, 40
    assert r.mean_completion_tokens == pytest.approx(30.0)
    assert r.breakdown_s["generate"] == 2.0 and r.breakdown_s["sync"] == 0.1


def test_trl_steps_from_timestamps_and_logs(bench):
    ends = [0.0, 30.0, 40.0, 52.0, 61.0]  # train begin, then the end of steps 1..4
    logs = [{"step": s, "completions/mean_length": 10.0 * s, "reward": 0.1 * s} for s in range(1, 5)]
    logs.append({"step": 4, "train_runtime": 61.0})
    r = bench.trl_steps(ends, logs, samples=8)
    assert r.step_s == [10.0, 12.0, 9.0]
    assert r.completion_tokens == [20.0, 30.0, 40.0]
    assert r.samples == [8.0, 8.0, 8.0]
    with pytest.raises(ValueError, match="one log per step"):
        bench.trl_steps(ends, logs[:2], samples=8)
    with pytest.raises(ValueError, match="no measured steps"):
        bench.trl_steps(ends[:2], logs[:1], samples=8)


def test_table_ratio_is_portable_rl_over_trl(bench):
    ours = bench.SideResult("portable_rl", [2.0, 3.0, 2.0], [8.0, 8.0, 8.0], [10.0, 10.0, 10.0])
    trl = bench.SideResult("TRL", [4.0, 4.0], [8.0, 8.0], [20.0, 20.0])
    table = bench.format_table(ours, trl)
    row = next(line for line in table.splitlines() if line.startswith("| portable_rl"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "4.000" and cells[6] == "2.00" and cells[7] == "1.00"  # 4/2 samples/s, 40/40 tok/s
    assert cells[8] == "2.00" and cells[9] == "2.00"  # fastest steps 2 s vs 4 s


def test_trl_reward_scores_like_the_recipe_reward(bench):
    reward = bench.TrlReward("math", {"format_bonus": 0.1})
    completions = [
        [{"role": "assistant", "content": "The answer is \\boxed{7}."}],
        [{"role": "assistant", "content": "I think 8"}],
        [{"role": "assistant", "content": "\\boxed{5}"}],
    ]
    scores = reward(prompts=["p"] * 3, completions=completions, label=["7", "8", "7"], trainer_state=None)
    assert scores == pytest.approx([1.1, 1.0, 0.1])


def test_trl_rows_are_the_recipe_prompts_in_file_order(bench):
    recipe = bench.load_workload(bench.Workload(recipe=str(RECIPE)))
    rows = bench.trl_dataset_rows(recipe)
    first = (ROOT / "examples" / "data" / "arithmetic_train.jsonl").read_text().splitlines()[0]
    rec = json.loads(first)
    assert rows[0] == {"prompt": [{"role": "user", "content": rec["prompt"]}], "label": rec["label"]}
    assert len(rows) == 512


def test_engine_recoveries_in_the_log_are_reported(bench):
    log = "\n".join(
        [
            "train:  20%|##| 1/5",
            "engine 0 at http://127.0.0.1:1 is unhealthy: /health_generate answered HTTP 503; fencing it. Its log ends:",
            "replaced engine(s) [0]: now at ['http://127.0.0.1:2']",
            "request x failed: HTTP 503",
        ]
    )
    events = bench.log_events(log)
    assert len(events) == 2 and events[1].startswith("replaced engine(s) [0]")
    assert bench.log_events("train: 100%") == []


def test_run_all_rejects_unknown_benchmarks_and_marks_failures(bench):
    spec = importlib.util.spec_from_file_location("bench_run_all", ROOT / "benchmarks" / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    sys.modules["bench_run_all"] = run_all  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(run_all)
    finally:
        sys.modules.pop("bench_run_all", None)
    assert run_all.parse_only("engine, vs_trl") == ["engine", "vs_trl"]
    with pytest.raises(ValueError, match="wieght_sync"):
        run_all.parse_only("wieght_sync")
    table = run_all.format_table(
        [run_all.Row("engine", "a / b", 0.5, "1 / 2"), run_all.Row("vs_trl", "(failed)", None, "boom")]
    )
    assert "| engine | a / b | 0.50 | 1 / 2 |" in table and "| vs_trl | (failed) | failed | boom |" in table
