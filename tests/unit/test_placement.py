"""Placement plans (pure) and their realisation on a real local Ray cluster."""

from __future__ import annotations

import pytest
from fake_hosts import simulate_rocm

from portable_rl import platform as plat
from portable_rl.orchestration.placement import PlacementConfig, actor_options, plan, reserve


def test_colocated_plan_shares_bundles():
    p = plan(PlacementConfig(mode="colocated", trainer_ranks=2, num_engines=2), plat.load("cpu"))
    assert len(p.bundles) == 2 and p.resource == "CPU"
    assert [s.bundle for s in p.trainer] == [0, 1]
    assert [[s.bundle for s in e] for e in p.engines] == [[0], [1]]
    assert all(s.device_share == 0.5 for s in p.trainer)


def test_disaggregated_plan_separates_bundles():
    p = plan(
        PlacementConfig(mode="disaggregated", trainer_ranks=2, num_engines=1, devices_per_engine=2),
        plat.load("cpu"),
    )
    assert len(p.bundles) == 4
    assert [s.bundle for s in p.trainer] == [0, 1]
    assert [[s.bundle for s in e] for e in p.engines] == [[2, 3]]
    assert all(s.device_share == 1.0 for s in p.trainer)


def test_gpu_platform_asks_for_gpus(monkeypatch):
    simulate_rocm(monkeypatch, ["gfx942"] * 8)
    p = plan(
        PlacementConfig(mode="disaggregated", trainer_ranks=4, num_engines=2, devices_per_engine=2),
        plat.load("rocm"),
    )
    assert p.resource == "GPU" and len(p.bundles) == 8
    assert p.bundles[0] == {"GPU": 1.0, "CPU": 1.0}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mode": "hybrid"}, "mode='hybrid'"),
        ({"trainer_ranks": 0}, "trainer_ranks=0 must be >= 1"),
        ({"mode": "colocated", "trainer_ranks": 1, "num_engines": 2}, "colocated mode needs"),
    ],
)
def test_bad_placement_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PlacementConfig(**kwargs)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    # Another module in this worker process may have left its Ray running; reuse it rather than fail.
    owned = not ray.is_initialized()
    if owned:
        ray.init(num_cpus=2, object_store_memory=80 * 1024**2, include_dashboard=False, log_to_driver=False)
    yield ray
    if owned:
        ray.shutdown()


def test_actors_land_on_their_bundles_in_rank_order(ray_local):
    ray = ray_local
    platform = plat.load("cpu")
    p = plan(
        PlacementConfig(mode="disaggregated", trainer_ranks=1, num_engines=1, cpus_per_device=0.5), platform
    )
    pg = reserve(p, timeout_s=30)

    @ray.remote
    class Where:
        def info(self):
            import os

            ctx = ray.get_runtime_context()
            return ctx.get_placement_group_id(), os.environ.get("TOKENIZERS_PARALLELISM")

    env = {"env_vars": platform.worker_env([])}
    trainer = Where.options(runtime_env=env, **actor_options(p, p.trainer[0], pg)).remote()
    engine = Where.options(runtime_env=env, **actor_options(p, p.engines[0][0], pg)).remote()
    (t_pg, t_env), (e_pg, _) = ray.get([trainer.info.remote(), engine.info.remote()])
    assert t_pg == e_pg == pg.id.hex()
    assert t_env == "false"  # the platform's worker env reached the actor
    ray.util.remove_placement_group(pg)


def test_reserve_fails_clearly_when_too_big(ray_local):
    p = plan(PlacementConfig(mode="disaggregated", trainer_ranks=4, num_engines=2), plat.load("cpu"))
    with pytest.raises(RuntimeError, match="did not fit"):
        reserve(p, timeout_s=2)
