"""A Ray cluster of three nodes on one machine, started the way a real cluster is: `portable-rl launch`.

The head and two workers are separate `portable-rl launch head|worker --block` processes (each execs
`ray start`) with their own custom resources (``node_trainer``, ``node_engine``), ports and worker-port
ranges, all under one temp dir of this test. There is one test per kind of cluster, which builds it once
for all its checks (a module-scoped fixture would be built again in every `pytest -n` worker):

* ``loopback``: all nodes on the host's own network stack (``--node-ip 127.0.0.1 --ifname lo``).
* ``netns``: each node in its own network namespace, joined by veth pairs to a bridge, with its own 10.x
  address and ``--ifname`` naming its veth, so gloo and Ray traffic really crosses interfaces. Needs
  CAP_NET_ADMIN; the test builds and probes the whole setup first and skips (marker ``netns``) with the
  reason when the host refuses any step.

Checks: every node carries the platform resource and its own resources; an actor on the trainer node and
one on the engine node broadcast a tensor over gloo (rendezvous at the sender node's address) and the
receiver's copy equals the sender's; `launch check` accepts the cluster; and the tiny recipe runs
disaggregated with its trainer pinned to the trainer node and its engine to the engine node, syncing weights
by gloo broadcast between them with nothing set by hand: the job itself binds engines to their node's
address and puts the weight-sync rendezvous at the trainer node's address. Under ``netns`` that means the
router and rollout traffic (driver in the head's namespace -> engine namespace), the weights (trainer
namespace -> engine namespace) and the checksums all cross veths; the test reads that from layout.json
(namespace addresses, the engine's URL) and the trainer veth's byte counter. Work that owns actors runs in a
driver process on the head's network (this file run as a script, or `portable-rl train`, inside the head's
namespace for ``netns``); this process only reads cluster state.

The cluster is torn down by killing exactly the processes this test started and their descendants:
`ray stop` would kill every Ray process on the host, so it is never used here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from learning import assert_trained_and_synced

from portable_rl.distributed import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples" / "tiny_cpu.yaml"
NODES = {"head": {}, "trainer": {"node_trainer": 1}, "engine": {"node_engine": 1}}
OBJECT_STORE_BYTES = 80 * 1024**2
START_TIMEOUT_S = 120.0
BROADCAST_NUMEL, BROADCAST_SEED = 1 << 18, 1234  # 1 MiB of float32


@dataclass
class LocalCluster:
    kind: str  # "loopback" | "netns"
    address: str  # GCS address, HOST:PORT
    temp_dir: str
    env: dict[str, str]
    ifname: str  # the interface every node's GLOO_SOCKET_IFNAME names
    node_ips: dict[str, str]  # node name -> its --node-ip
    lab: object | None = None  # the NetnsLab of a "netns" cluster
    procs: list[subprocess.Popen] = field(default_factory=list)

    def log(self, name: str) -> str:
        path = Path(self.temp_dir, f"{name}.log")
        return path.read_text(encoding="utf-8", errors="replace")[-4000:] if path.exists() else ""

    def on(self, node: str) -> list[str]:
        """argv prefix running a command on ``node``'s network (its namespace; nothing for loopback)."""
        return self.lab.exec_prefix(node) if self.lab is not None else []

    @property
    def head_ip(self) -> str:
        return self.address.rpartition(":")[0]


def _cluster_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RAY_AUTH_MODE="disabled",
        PORTABLE_RL_PLATFORM="cpu",
        RAY_USAGE_STATS_ENABLED="0",
    )
    return env


def _start_node(cluster: LocalCluster, name: str, action_args: list[str], resources: dict, cpus: int) -> None:
    worker_port = 20000 + 100 * len(cluster.procs) + (os.getpid() % 80) * 300
    argv = [
        *cluster.on(name),
        sys.executable,
        "-m",
        "portable_rl.cli",
        "launch",
        *action_args,
        "--node-ip",
        cluster.node_ips[name],
        "--ifname",
        cluster.ifname,
        "--num-cpus",
        str(cpus),
        "--resources",
        json.dumps(resources),
        "--block",
        "--",
        "--temp-dir",
        cluster.temp_dir,
        "--object-store-memory",
        str(OBJECT_STORE_BYTES),
        "--disable-usage-stats",
        "--include-log-monitor",
        "false",
        "--dashboard-agent-listen-port",
        str(free_port("127.0.0.1")),
        "--min-worker-port",
        str(worker_port),
        "--max-worker-port",
        str(worker_port + 60),
    ]
    if action_args[0] == "head":
        argv += ["--include-dashboard", "false", "--ray-client-server-port", str(free_port("127.0.0.1"))]
    log = open(Path(cluster.temp_dir, f"{name}.log"), "w", encoding="utf-8")  # noqa: SIM115 - kept by Popen
    cluster.procs.append(
        subprocess.Popen(argv, env=cluster.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    )
    log.close()


def _wait_port(cluster: LocalCluster, port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if cluster.procs[0].poll() is not None:
            pytest.fail(f"ray head exited with {cluster.procs[0].returncode}:\n{cluster.log('head')}")
        try:
            socket.create_connection((cluster.head_ip, port), timeout=1.0).close()
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"ray head did not open port {port} within {START_TIMEOUT_S} s:\n{cluster.log('head')}")


def _teardown(cluster: LocalCluster) -> None:
    """Kill the launched processes and every descendant (raylets, agents, workers), nothing else."""
    victims: dict[int, psutil.Process] = {}
    for proc in cluster.procs:
        try:
            root = psutil.Process(proc.pid)
            victims[root.pid] = root
            victims.update({c.pid: c for c in root.children(recursive=True)})
        except psutil.NoSuchProcess:
            continue
    # Anything left that still names this test's temp dir (a reparented child) belongs to it too.
    for p in psutil.process_iter(["cmdline"]):
        if any(cluster.temp_dir in arg for arg in (p.info["cmdline"] or [])):
            victims.setdefault(p.pid, p)
    for p in victims.values():
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(victims.values()), timeout=10)
    for proc in cluster.procs:
        proc.wait(timeout=10)


def _join(c: LocalCluster, name: str, alive_after: int) -> None:
    """Start one worker node and wait until the GCS lists it; one restart if it died while starting.

    Nodes start one at a time: on a loaded 2-core host two raylets starting together can overrun the
    30 s registration window of `ray start`.
    """
    import ray

    for attempt in range(2):
        _start_node(c, name, ["worker", "--address", c.address], NODES[name], cpus=1)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if sum(1 for n in ray.nodes() if n["Alive"]) >= alive_after:
                return
            if c.procs[-1].poll() is not None:
                break
            time.sleep(0.5)
        if attempt == 1 or c.procs[-1].poll() is None:
            pytest.fail(f"node {name} did not join within {START_TIMEOUT_S} s:\n{c.log(name)}")


def _netns_lab():
    """The namespaces for a "netns" cluster, or a skip naming the step this host refused."""
    from netns_lab import NetnsLab, NetnsUnavailable

    try:
        return NetnsLab.create(list(NODES))
    except NetnsUnavailable as exc:
        pytest.skip(
            f"netns: needs permission to create network namespaces (CAP_NET_ADMIN) and a bridge: {exc}"
        )


@contextmanager
def running_cluster(kind: str) -> Iterator[LocalCluster]:
    """Head (no CPUs: schedules nothing), a 'trainer' node and an 'engine' node; this process reads state.

    One cluster serves every check of a test: under `pytest -n` a module-scoped fixture would be built once
    per worker that runs one of its tests, so each kind of cluster is one test instead.
    """
    import ray

    lab = _netns_lab() if kind == "netns" else None
    temp_dir = tempfile.mkdtemp(prefix="prl", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port("127.0.0.1")
    if lab is None:
        ips, ifname = dict.fromkeys(NODES, "127.0.0.1"), "lo"
    else:
        from netns_lab import IFNAME

        ips, ifname = dict(lab.addresses), IFNAME
    c = LocalCluster(
        kind=kind,
        address=f"{ips['head']}:{port}",
        temp_dir=temp_dir,
        env=_cluster_env(),
        ifname=ifname,
        node_ips=ips,
        lab=lab,
    )
    try:
        _start_node(c, "head", ["head", "--port", str(port)], NODES["head"], cpus=0)
        _wait_port(c, port)
        # Reading cluster state from here is GCS traffic only, which reaches a head in a namespace too.
        if ray.is_initialized():  # another module of this xdist worker left its local Ray up
            ray.shutdown()
        ray.init(address=c.address, logging_level="ERROR", log_to_driver=False)
        _join(c, "trainer", alive_after=2)
        _join(c, "engine", alive_after=3)
        yield c
    finally:
        ray.shutdown()
        _teardown(c)
        shutil.rmtree(temp_dir, ignore_errors=True)
        if lab is not None:
            lab.destroy()


# ---- the driver side: actors on two nodes broadcasting over gloo ------------------------------------------


def _broadcast_actor_class():
    """Defined in a function, using no module globals, so Ray ships it by value (nodes cannot import tests/)."""
    import ray

    @ray.remote(num_cpus=1)
    class Peer:
        def info(self) -> dict:
            return {
                "node": ray.get_runtime_context().get_node_id(),
                "node_ip": ray.util.get_node_ip_address(),
                "gloo_ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
                "platform": os.environ.get("PORTABLE_RL_PLATFORM"),
            }

        def rendezvous(self) -> str:
            """tcp://NODE_IP:PORT with a port free on this node: where the other rank finds rank 0."""
            with socket.socket() as s:
                s.bind(("", 0))
                port = s.getsockname()[1]
            return f"tcp://{ray.util.get_node_ip_address()}:{port}"

        def broadcast(self, rank: int, init_method: str, numel: int, seed: int) -> list[float]:
            import datetime

            import torch
            import torch.distributed as dist

            dist.init_process_group(
                "gloo",
                init_method=init_method,
                rank=rank,
                world_size=2,
                timeout=datetime.timedelta(seconds=60),
            )
            try:
                if rank == 0:
                    data = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
                else:
                    data = torch.zeros(numel)
                dist.broadcast(data, src=0)
                return [float(data.sum()), float(data[0]), float(data[-1]), float(data.abs().max())]
            finally:
                dist.destroy_process_group()

    return Peer


def drive_broadcast(address: str) -> dict:
    """As a driver of the cluster at ``address``: one actor per worker node, a gloo broadcast between them."""
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        peer = _broadcast_actor_class()
        sender = peer.options(resources={"node_trainer": 0.5}).remote()
        receiver = peer.options(resources={"node_engine": 0.5}).remote()
        info_s, info_r = ray.get([sender.info.remote(), receiver.info.remote()], timeout=120)
        init_method = ray.get(sender.rendezvous.remote())
        sent, got = ray.get(
            [
                sender.broadcast.remote(0, init_method, BROADCAST_NUMEL, BROADCAST_SEED),
                receiver.broadcast.remote(1, init_method, BROADCAST_NUMEL, BROADCAST_SEED),
            ],
            timeout=120,
        )
        ray.kill(sender)
        ray.kill(receiver)
        return {"sender": info_s, "receiver": info_r, "init_method": init_method, "sent": sent, "got": got}
    finally:
        ray.shutdown()


def _drive(cluster: LocalCluster, action: str) -> dict:
    """Run this file as a driver on the head's network; its last stdout line is the JSON result."""
    out = subprocess.run(
        [*cluster.on("head"), sys.executable, str(Path(__file__).resolve()), action, cluster.address],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, f"driver {action} failed:\n{out.stderr[-4000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- checks ------------------------------------------------------------------------------------------------


def check_nodes_carry_platform_and_own_resources(cluster: LocalCluster) -> None:
    import ray

    from portable_rl.orchestration.cluster import check_cluster_platforms

    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 3
    assert all(n["Resources"].get("portable_rl_platform:cpu") == 1 for n in nodes)
    trainer = [n for n in nodes if "node_trainer" in n["Resources"]]
    engine = [n for n in nodes if "node_engine" in n["Resources"]]
    assert len(trainer) == 1 and len(engine) == 1 and trainer[0]["NodeID"] != engine[0]["NodeID"]
    addresses = {n["NodeManagerAddress"] for n in nodes}
    if cluster.kind == "loopback":
        # Ray replaces a loopback --node-ip with the host's own address (the one a local ray.init uses too).
        assert len(addresses) == 1
    else:
        # Each node is reached at its own namespace's address.
        assert addresses == set(cluster.node_ips.values())
        assert trainer[0]["NodeManagerAddress"] == cluster.node_ips["trainer"]
        assert engine[0]["NodeManagerAddress"] == cluster.node_ips["engine"]
    found = check_cluster_platforms(nodes, "broadcast")
    assert found.trainer_platform == "cpu" and len(found.nodes) == 3


def check_gloo_broadcast_between_actors_on_two_nodes(cluster: LocalCluster) -> None:
    import ray
    import torch

    crossed_before = cluster.lab.host_veth_bytes("trainer") if cluster.lab is not None else 0
    result = _drive(cluster, "broadcast")
    info_s, info_r = result["sender"], result["receiver"]
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes()}
    assert "node_trainer" in nodes[info_s["node"]] and "node_engine" in nodes[info_r["node"]]
    # The env `portable-rl launch --ifname` gave the node reached the workers Ray started there.
    assert info_s["gloo_ifname"] == info_r["gloo_ifname"] == cluster.ifname
    assert info_s["platform"] == info_r["platform"] == "cpu"
    assert result["init_method"].startswith(f"tcp://{info_s['node_ip']}:")

    expected = torch.randn(BROADCAST_NUMEL, generator=torch.Generator().manual_seed(BROADCAST_SEED))
    assert result["got"] == result["sent"]
    assert result["got"] == pytest.approx(
        [float(expected.sum()), float(expected[0]), float(expected[-1]), float(expected.abs().max())]
    )
    if cluster.lab is not None:
        assert info_s["node_ip"] == cluster.node_ips["trainer"]
        assert info_r["node_ip"] == cluster.node_ips["engine"]
        # The tensor left the trainer's namespace through its veth: at least its 1 MiB crossed the interface.
        assert cluster.lab.host_veth_bytes("trainer") - crossed_before >= BROADCAST_NUMEL * 4


def check_launch_check_cli_accepts_the_cluster(cluster: LocalCluster) -> None:
    out = subprocess.run(
        [
            *cluster.on("head"),
            sys.executable,
            "-m",
            "portable_rl.cli",
            "launch",
            "check",
            "--address",
            cluster.address,
            "--nodes",
            "3",
        ],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cluster ok: 3 node(s); trainer platform cpu" in out.stdout


def run_recipe_across_nodes(
    recipe: str | Path, cluster: LocalCluster, *overrides: str
) -> subprocess.CompletedProcess:
    """`portable-rl train RECIPE overrides...` as a driver of this three-node cluster, on the head's network.

    The driver connects through RAY_ADDRESS, exactly as the job `portable-rl launch submit` starts on a head
    does; this cluster runs without the dashboard, so the job API itself is not in the loop here.
    """
    env = dict(cluster.env, RAY_ADDRESS=cluster.address)
    return subprocess.run(
        [*cluster.on("head"), sys.executable, "-m", "portable_rl.cli", "train", str(recipe), *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _live_placement_groups() -> list[str]:
    import ray

    return [pg_id for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"]


def check_tiny_recipe_trainer_and_engines_on_their_own_nodes(cluster: LocalCluster, tmp_path: Path) -> None:
    import ray

    run_dir = tmp_path / "run"
    crossed_before = cluster.lab.host_veth_bytes("trainer") if cluster.lab is not None else 0
    out = run_recipe_across_nodes(
        RECIPE,
        cluster,
        "--output-dir",
        str(run_dir),
        "--check-weight-update",
        "run.mode=disaggregated",
        "run.steps=2",
        "placement.trainer_resource=node_trainer",
        "placement.engine_resource=node_engine",
    )
    assert out.returncode == 0, out.stderr[-4000:]

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # Every step trained (a gradient, every weight changed) and synced weights, and the engines' checksums
    # matched the trainer's afterwards.
    assert all(r["weight_sync_s"] > 0 for r in rows)
    assert_trained_and_synced(rows)

    layout = json.loads((run_dir / "layout.json").read_text())
    assert layout["weight_sync"] == {"strategy": "broadcast", "backend": "gloo"}
    assert layout["pins"] == {"trainer": "node_trainer", "engine": "node_engine"}
    node_resources = {n["NodeID"]: n["Resources"] for n in ray.nodes()}
    trainer_nodes = {r["node_id"] for r in layout["trainer"]}
    engine_nodes = {e["node_id"] for e in layout["engines"]}
    assert trainer_nodes and engine_nodes and not trainer_nodes & engine_nodes
    assert all("node_trainer" in node_resources[n] for n in trainer_nodes)
    assert all("node_engine" in node_resources[n] for n in engine_nodes)
    # Clients dial each engine at its own node's address (a multi-node job never binds loopback).
    for engine in layout["engines"]:
        assert engine["url"].startswith(f"http://{engine['node_ip']}:"), engine
    if cluster.lab is not None:
        assert {r["node_ip"] for r in layout["trainer"]} == {cluster.node_ips["trainer"]}
        assert {e["node_ip"] for e in layout["engines"]} == {cluster.node_ips["engine"]}
        # Every step's broadcast sent the whole model out of the trainer's namespace through its veth.
        model_bytes = sum(f.stat().st_size for f in (run_dir / "model").glob("*.safetensors"))
        crossed = cluster.lab.host_veth_bytes("trainer") - crossed_before
        print(f"trainer veth sent {crossed} bytes; model {model_bytes} bytes")
        assert model_bytes > 0 and crossed >= len(rows) * model_bytes

    # The job only disconnected its driver: the cluster is whole and holds none of the job's reservations.
    assert sum(1 for n in ray.nodes() if n["Alive"]) == 3
    assert _live_placement_groups() == []


# ---- tests: one per kind of cluster --------------------------------------------------------------------------


def test_loopback_cluster_runs_the_tiny_recipe_across_nodes(tmp_path: Path):
    with running_cluster("loopback") as cluster:
        check_nodes_carry_platform_and_own_resources(cluster)
        check_gloo_broadcast_between_actors_on_two_nodes(cluster)
        check_launch_check_cli_accepts_the_cluster(cluster)
        check_tiny_recipe_trainer_and_engines_on_their_own_nodes(cluster, tmp_path)


@pytest.mark.netns
def test_netns_cluster_runs_the_tiny_recipe_across_interfaces(tmp_path: Path):
    with running_cluster("netns") as cluster:
        check_nodes_carry_platform_and_own_resources(cluster)
        check_gloo_broadcast_between_actors_on_two_nodes(cluster)
        check_launch_check_cli_accepts_the_cluster(cluster)
        check_tiny_recipe_trainer_and_engines_on_their_own_nodes(cluster, tmp_path)


if __name__ == "__main__":
    # Driver entry point for `_drive`: python test_multinode.py ACTION RAY_ADDRESS
    _action, _address = sys.argv[1], sys.argv[2]
    if _action != "broadcast":
        raise SystemExit(f"unknown driver action {_action!r}; the only one is 'broadcast'")
    print(json.dumps(drive_broadcast(_address)))
