"""Placement plans (pure) and their realisation on a real local Ray cluster."""

from __future__ import annotations

import json

import pytest
from fake_hosts import simulate_rocm

from portable_rl import platform as plat
from portable_rl.config.placement import NodePlacementConfig, PlacementConfig
from portable_rl.orchestration.placement import (
    PIN_AMOUNT,
    PlacementError,
    actor_options,
    check_pins,
    plan,
    reserve,
    write_layout,
)


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


def test_pinned_disaggregated_plan_asks_each_side_for_its_node_resource():
    cfg = PlacementConfig(
        mode="disaggregated",
        trainer_ranks=2,
        num_engines=2,
        devices_per_engine=1,
        cpus_per_device=0.5,
        trainer_resource="node_trainer",
        engine_resource="node_engine",
    )
    p = plan(cfg, plat.load("cpu"))
    assert p.pins == {"trainer": "node_trainer", "engine": "node_engine"}
    assert p.strategy == "PACK"
    for slot in p.trainer:
        assert p.bundles[slot.bundle] == {"CPU": 0.5, "node_trainer": PIN_AMOUNT}
    for slots in p.engines:
        for slot in slots:
            assert p.bundles[slot.bundle] == {"CPU": 0.5, "node_engine": PIN_AMOUNT}
    # Every bundle belongs to exactly one side, so no bundle asks for both resources.
    assert (
        sum("node_trainer" in b for b in p.bundles) == 2 and sum("node_engine" in b for b in p.bundles) == 2
    )


def test_pinning_one_side_leaves_the_other_free(monkeypatch):
    simulate_rocm(monkeypatch, ["gfx942"] * 8)
    cfg = PlacementConfig(
        mode="disaggregated", trainer_ranks=2, num_engines=1, devices_per_engine=2, engine_resource="amd_pool"
    )
    p = plan(cfg, plat.load("rocm"))
    assert p.pins == {"engine": "amd_pool"}
    assert [p.bundles[s.bundle] for s in p.trainer] == [{"GPU": 1.0, "CPU": 1.0}] * 2
    assert [p.bundles[s.bundle] for s in p.engines[0]] == [
        {"GPU": 1.0, "CPU": 1.0, "amd_pool": PIN_AMOUNT}
    ] * 2
    # The actor itself asks only for its device share; the bundle already holds the node resource.
    assert "amd_pool" not in actor_options(p, p.engines[0][0], pg=None).get("resources", {})


def test_colocated_plan_pins_shared_bundles_once():
    cfg = PlacementConfig(mode="colocated", trainer_ranks=2, num_engines=2, trainer_resource="pool")
    p = plan(cfg, plat.load("cpu"))
    assert p.bundles == [{"CPU": 1.0, "pool": PIN_AMOUNT}] * 2
    same = PlacementConfig(mode="colocated", trainer_ranks=1, trainer_resource="pool", engine_resource="pool")
    assert plan(same, plat.load("cpu")).bundles == [{"CPU": 1.0, "pool": PIN_AMOUNT}]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mode": "colocated", "trainer_resource": "a", "engine_resource": "b"}, "must be equal"),
        ({"mode": "disaggregated", "trainer_resource": "GPU"}, "one of Ray's own resources"),
        ({"mode": "disaggregated", "engine_resource": " "}, "must be the name of a custom Ray resource"),
        ({"mode": "disaggregated", "engine_resource": 3}, "must be the name of a custom Ray resource"),
    ],
)
def test_bad_pins(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PlacementConfig(**kwargs)


def test_recipe_section_validates_names_and_mode():
    assert NodePlacementConfig().trainer_resource is None
    with pytest.raises(ValueError, match="placement.trainer_resource='memory'"):
        NodePlacementConfig(trainer_resource="memory")
    pins = NodePlacementConfig(trainer_resource="t", engine_resource="e")
    pins.check_mode("disaggregated")
    with pytest.raises(ValueError, match="run.mode=disaggregated"):
        pins.check_mode("colocated")


def test_check_pins_names_the_missing_resource():
    p = plan(
        PlacementConfig(mode="disaggregated", trainer_resource="node_trainer", engine_resource="node_engine"),
        plat.load("cpu"),
    )
    nodes = [
        {"Alive": True, "Resources": {"CPU": 1.0, "node_trainer": 1.0}},
        {"Alive": False, "Resources": {"CPU": 1.0, "node_engine": 1.0}},  # dead nodes do not count
    ]
    with pytest.raises(PlacementError, match=r"placement.engine_resource='node_engine': no alive node"):
        check_pins(p, nodes)
    nodes[1]["Alive"] = True
    check_pins(p, nodes)


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


def test_actors_land_on_their_bundles_in_rank_order(ray_local, tmp_path):
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

    # The layout record asks the actors where they run; one local node holds both bundles here.
    here = ray.get_runtime_context().get_node_id()
    record = write_layout(tmp_path / "layout.json", p, pg, [trainer], [engine], weight_sync={"strategy": "x"})
    assert json.loads((tmp_path / "layout.json").read_text()) == record
    assert record["strategy"] == "PACK" and record["weight_sync"] == {"strategy": "x"}
    assert [b["node_id"] for b in record["bundles"]] == [here, here]
    assert record["trainer"] == [
        {"rank": 0, "bundle": 0, "node_id": here, "node_ip": record["trainer"][0]["node_ip"]}
    ]
    assert record["engines"][0]["bundles"] == [1] and record["engines"][0]["node_id"] == here
    ray.util.remove_placement_group(pg)


def test_reserve_fails_clearly_when_too_big(ray_local):
    p = plan(PlacementConfig(mode="disaggregated", trainer_ranks=4, num_engines=2), plat.load("cpu"))
    with pytest.raises(RuntimeError, match="did not fit"):
        reserve(p, timeout_s=2)


def _live_pgs(ray) -> set[str]:
    return {pg_id for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"}


def test_reserve_refuses_a_pin_no_node_has(ray_local):
    before = _live_pgs(ray_local)
    p = plan(PlacementConfig(mode="disaggregated", engine_resource="no_such_node"), plat.load("cpu"))
    with pytest.raises(PlacementError, match="no_such_node"):
        reserve(p, timeout_s=2)
    assert _live_pgs(ray_local) == before, "a refused plan must not leave a placement group behind"


@pytest.mark.parametrize(
    "mode, ranks, engines, cores, want",
    [
        ("colocated", 1, 1, 2, (2, 2)),  # they take turns: each uses both cores
        ("colocated", 2, 1, 8, (4, 8)),
        ("disaggregated", 1, 1, 2, (1, 1)),  # they run at once: the cores are split
        ("disaggregated", 2, 2, 16, (4, 4)),
        ("disaggregated", 3, 2, 2, (1, 1)),  # never fewer than one
    ],
)
def test_compute_threads(mode, ranks, engines, cores, want):
    from portable_rl.orchestration.placement import compute_threads

    cfg = PlacementConfig(mode=mode, trainer_ranks=ranks, num_engines=engines)
    assert compute_threads(cfg, cores) == want


def test_compute_threads_env_is_a_platform_fact():
    cpu = plat.platform_class("cpu")
    assert cpu.compute_threads_env(object.__new__(cpu), 3)["OMP_NUM_THREADS"] == "3"
    for name in ("cuda", "rocm"):  # device compute: Ray's default of one host thread stays
        cls = plat.platform_class(name)
        assert cls.compute_threads_env(object.__new__(cls), 3) == {}
