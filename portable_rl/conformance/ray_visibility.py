"""Ray checks: workers get the platform's env, and (GPU) each sees exactly the device Ray placed it on.

* ``ray.worker_env`` (every platform): two actors placed with portable_rl's placement plan, started with
  ``platform.worker_env(devices)`` as their runtime env. Each reports the values it sees, its placement group
  and the devices the platform resolves from its env. Measured: number of mismatches (tolerance 0).
* ``ray.device_placement`` (``gpu``): one actor per device (up to two), each asking Ray for one device and
  letting Ray set the mask. Each reports Ray's accelerator ids, the devices the platform resolves from the
  env Ray gave it, and torch's device count. Any worker that sees other than exactly its assigned device,
  or two workers sharing a device, counts as a mismatch.

A Ray already initialised in this process is reused; otherwise a small local one is started
(2 CPUs, 100 MiB object store) and shut down when the run's context closes.
"""

from __future__ import annotations

import os
from typing import Any

from portable_rl.conformance.registry import Context, Measurement, register
from portable_rl.platform import Platform


def _ray(ctx: Context):
    """A local Ray for the visibility checks; started again if something shut it down between checks."""
    import ray

    if not ray.is_initialized():
        ctx.platform.check_ray_compatible()
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            num_cpus=2,
            object_store_memory=100 * 1024**2,
            include_dashboard=False,
            log_to_driver=False,
        )
        ctx.memo("ray-finalizer", lambda: ctx.finalizers.append(ray.shutdown))
    return ray


def _probe_actor(ray):
    @ray.remote
    class Probe:
        def report(self, platform_name: str, keys: list[str]) -> dict[str, Any]:
            import torch

            from portable_rl.platform import load

            platform = load(platform_name)
            ctx = ray.get_runtime_context()
            ids = ctx.get_accelerator_ids().get(platform.ray_resource or "", [])
            count = 0
            if platform.torch_device_type != "cpu":
                count = torch.get_device_module(platform.torch_device_type).device_count()
            return {
                "env": {k: os.environ.get(k) for k in keys},
                "placement_group": ctx.get_placement_group_id(),
                "ray_ids": [int(i) for i in ids],
                "visible": platform.resolve_visible_devices(os.environ),
                "device_count": count,
            }

    return Probe


def compare_worker_env(
    expected: list[dict[str, str]],
    expected_visible: list[list[int]],
    reports: list[dict[str, Any]],
    pg_id: str,
) -> list[str]:
    """Mismatches between what each worker should have and what it reported (empty when all agree)."""
    problems = []
    for rank, (env, visible, rep) in enumerate(zip(expected, expected_visible, reports, strict=True)):
        for key, value in env.items():
            if rep["env"].get(key) != value:
                problems.append(f"worker {rank}: {key}={rep['env'].get(key)!r}, expected {value!r}")
        if rep["placement_group"] != pg_id:
            problems.append(f"worker {rank}: placement group {rep['placement_group']}, expected {pg_id}")
        if rep["visible"] != visible:
            problems.append(f"worker {rank}: resolves visible devices {rep['visible']}, expected {visible}")
    return problems


def _slot_devices(platform: Platform, n: int) -> list[list[int]]:
    return [[i] for i in range(n)] if platform.torch_device_type != "cpu" else [[] for _ in range(n)]


@register(
    "ray.worker_env",
    "mismatches between platform.worker_env / placement and what two placed Ray actors see",
)
def check_worker_env(ctx: Context, dtype: str | None) -> Measurement:
    from portable_rl.orchestration.placement import PlacementConfig, actor_options, plan, reserve

    ray = _ray(ctx)
    platform = ctx.platform
    n = 2 if platform.torch_device_type == "cpu" else min(2, max(1, len(platform.devices)))
    p = plan(PlacementConfig(mode="colocated", trainer_ranks=n, num_engines=1, cpus_per_device=0.5), platform)
    pg = reserve(p, timeout_s=60)
    try:
        devices = _slot_devices(platform, n)
        envs = [platform.worker_env(d) for d in devices]
        probe = _probe_actor(ray)
        actors = []
        for slot, env in zip(p.trainer, envs, strict=True):
            opts = actor_options(p, slot, pg)
            # Env propagation only: the actor takes no device from Ray, so the mask it sees is ours.
            opts.pop("num_gpus", None)
            opts.pop("resources", None)
            actors.append(probe.options(runtime_env={"env_vars": env}, **opts).remote())
        reports = ray.get(
            [a.report.remote(platform.name, sorted(env)) for a, env in zip(actors, envs, strict=True)]
        )
        for a in actors:
            ray.kill(a)
    finally:
        ray.util.remove_placement_group(pg)
    problems = compare_worker_env(envs, devices, reports, pg.id.hex())
    return Measurement(
        float(len(problems)), "; ".join(problems[:4]) or f"{n} workers, {len(envs[0])} env vars each"
    )


@register(
    "ray.device_placement",
    "workers (one per device, up to 2) that do not see exactly the one device Ray assigned them",
    markers=("gpu",),
    min_devices=1,
)
def check_device_placement(ctx: Context, dtype: str | None) -> Measurement:
    ray = _ray(ctx)
    platform = ctx.platform
    n = min(2, len(platform.devices))
    env = {**platform.comm_env_defaults, **platform.runtime_env_defaults}
    probe = _probe_actor(ray)
    actors = [
        probe.options(num_gpus=1, num_cpus=0.5, runtime_env={"env_vars": dict(env)}).remote()
        for _ in range(n)
    ]
    reports = ray.get([a.report.remote(platform.name, []) for a in actors])
    for a in actors:
        ray.kill(a)
    problems = []
    for rank, rep in enumerate(reports):
        if len(rep["ray_ids"]) != 1:
            problems.append(f"worker {rank}: Ray assigned {rep['ray_ids']}")
        elif rep["visible"] != rep["ray_ids"] or rep["device_count"] != 1:
            problems.append(
                f"worker {rank}: assigned {rep['ray_ids']}, platform resolves {rep['visible']}, "
                f"torch counts {rep['device_count']} device(s)"
            )
    assigned = [tuple(r["ray_ids"]) for r in reports]
    if len(set(assigned)) != len(assigned):
        problems.append(f"workers share devices: {assigned}")
    return Measurement(float(len(problems)), "; ".join(problems[:4]) or f"assigned {assigned}")
