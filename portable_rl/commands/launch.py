"""`portable-rl launch`: start Ray nodes, submit a recipe, check a cluster, generate cluster templates.

Actions
-------
* ``head`` / ``worker``: prepare this node's env for the detected platform (fold device masks, Ray NOSET
  flags, collective env, network interface from ``--ifname`` or the default route) and replace this process
  with ``ray start --head`` / ``ray start --address``. The node advertises ``portable_rl_platform:<name>``
  and its device count. ``--dry-run`` prints the env changes and the command as a shell script instead.
  Arguments after ``--`` go to ``ray start`` unchanged.
* ``submit RECIPE [overrides...]``: ``ray job submit`` of ``portable-rl train RECIPE overrides...`` with the
  working dir uploaded. Launch's own flags may appear anywhere before a literal ``--``; what follows ``--`` is
  passed to ``portable-rl train`` verbatim.
* ``check``: connect to a cluster, wait for ``--nodes`` alive nodes and refuse a mixed-vendor cluster.
* ``template slurm|kuberay``: print or write a SLURM batch script / KubeRay RayCluster for a platform.
Bad input raises ``UserError`` (one line, exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from portable_rl.errors import UserError

DEFAULT_PORT = 6379
DEFAULT_EXCLUDES = (".git", ".venv", "runs", "__pycache__")


# ---- head / worker ------------------------------------------------------------------------------------------


def _ray_executable() -> str:
    # Prefer the `ray` script of this interpreter's environment, so a venv needs no PATH activation.
    beside = Path(sys.executable).parent / "ray"
    if beside.is_file():
        return str(beside)
    found = shutil.which("ray")
    if not found:
        raise UserError(
            "the `ray` command was not found; install ray (pip install 'ray[default]') in this env"
        )
    return found


def _parse_resources(raw: str | None) -> dict[str, float]:
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"--resources {raw!r} is not JSON ({exc.msg}); pass e.g. '{{\"my_res\": 1}}'"
        ) from None
    if not isinstance(data, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in data.values()
    ):
        raise UserError(f"--resources {raw!r} must be a JSON object of numbers, e.g. '{{\"my_res\": 1}}'")
    return data


def _check_address(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(
            f"--address {address!r} must be HOST:PORT of the Ray head (e.g. 10.0.0.1:{DEFAULT_PORT})"
        )
    return address


def _resolve_ifname(choice: str, env: Mapping[str, str]) -> tuple[str | None, bool]:
    """(interface, explicit). ``auto``: the default route's interface; ``none``: leave the env alone."""
    from portable_rl.orchestration.cluster import default_route_interface

    if choice == "none":
        return None, False
    if choice == "auto":
        return default_route_interface(), False
    if not Path("/sys/class/net", choice).exists() and os.path.isdir("/sys/class/net"):
        raise UserError(f"--ifname {choice!r} is not a network interface of this host; see `ip link`")
    return choice, True


def node_start(args: argparse.Namespace, base_env: Mapping[str, str] | None = None):
    """The env and the `ray start` argv for ``launch head|worker`` (no side effects on this process)."""
    from portable_rl.orchestration.cluster import node_env, node_resources
    from portable_rl.platform import PLATFORM_ENV, current_platform

    platform = current_platform()
    env = dict(os.environ if base_env is None else base_env)
    platform.prepare_process_env(env)  # folds device masks, sets NOSET flags and collective defaults
    platform.check_ray_compatible(env)
    ifname, explicit = _resolve_ifname(args.ifname, env)
    devices = args.num_gpus
    if devices is None:
        devices = len(platform.resolve_visible_devices(env)) if platform.ray_resource else 0
    for key, value in node_env(platform).items():
        env.setdefault(key, value)
    env[PLATFORM_ENV] = platform.name  # every process on the node detects what the launcher detected
    # An interface the user names wins; an auto-detected one does not replace one already exported.
    for key, value in (platform.network_env(ifname) if ifname else {}).items():
        if explicit or not env.get(key):
            env[key] = value
    resources = node_resources(platform, args.role, _parse_resources(args.resources))
    argv = [_ray_executable(), "start"]
    if args.action == "head":
        argv += ["--head", "--port", str(args.port)]
    else:
        address = args.address or env.get("RAY_ADDRESS")
        if not address:
            raise UserError("launch worker needs --address HEAD_HOST:PORT (what `launch head` printed)")
        argv += ["--address", _check_address(address)]
    if args.node_ip:
        argv += ["--node-ip-address", args.node_ip]
    if args.num_cpus is not None:
        argv += ["--num-cpus", str(args.num_cpus)]
    if platform.ray_resource == "GPU":
        argv += ["--num-gpus", str(devices)]
    elif platform.ray_resource:
        resources[platform.ray_resource] = devices
    argv += ["--resources", json.dumps(resources, sort_keys=True)]
    if args.block:
        argv.append("--block")
    argv += list(args.ray_args)
    return platform, env, argv, ifname


def _env_script(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    lines = [f"unset {k}" for k in sorted(set(before) - set(after))]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(after.items()) if before.get(k) != v]
    return lines


def run_node(args: argparse.Namespace) -> int:
    if args.port is not None and not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} must be in 1..65535")
    before = dict(os.environ)
    platform, env, argv, ifname = node_start(args, before)
    if args.dry_run:
        print(f"# portable-rl launch {args.action}: platform {platform.name} ({platform.reason})")
        if ifname is None:
            print("# no network interface pinned (no default route, or --ifname none)")
        print("\n".join(_env_script(before, env)))
        print(shlex.join(argv))
        return 0
    sys.stdout.flush()
    os.execvpe(argv[0], argv, env)  # pragma: no cover - replaces the process
    return 0  # pragma: no cover


# ---- submit ------------------------------------------------------------------------------------------------

_SUBMIT_VALUE_FLAGS = ("--address", "--working-dir")
_SUBMIT_BOOL_FLAGS = ("--no-wait", "--dry-run")


def split_submit_args(rest: Sequence[str]) -> tuple[dict[str, object], list[str]]:
    """Separate launch's own flags from the overrides for `portable-rl train` (verbatim after ``--``)."""
    opts: dict[str, object] = {}
    passthrough: list[str] = []
    items = list(rest)
    i = 0
    while i < len(items):
        tok = items[i]
        if tok == "--":
            passthrough += items[i + 1 :]
            break
        name, eq, value = tok.partition("=")
        if name in _SUBMIT_VALUE_FLAGS:
            if not eq:
                if i + 1 >= len(items):
                    raise UserError(f"{name} needs a value")
                value, i = items[i + 1], i + 1
            opts[name[2:].replace("-", "_")] = value
        elif tok in _SUBMIT_BOOL_FLAGS:
            opts[tok[2:].replace("-", "_")] = True
        else:
            passthrough.append(tok)
        i += 1
    return opts, passthrough


def submit_command(
    recipe: str,
    overrides: Sequence[str] = (),
    address: str | None = None,
    working_dir: str = ".",
    no_wait: bool = False,
) -> list[str]:
    """`ray job submit` argv that runs ``portable-rl train RECIPE overrides`` with ``working_dir`` uploaded."""
    wd = Path(working_dir).resolve()
    if not wd.is_dir():
        raise UserError(f"--working-dir {working_dir!r} is not a directory")
    path = Path(recipe)
    if not path.is_file():
        raise UserError(f"recipe {recipe!r} does not exist; pass a YAML file")
    try:
        rel = path.resolve().relative_to(wd)
    except ValueError:
        raise UserError(
            f"recipe {recipe!r} is outside the working dir {str(wd)!r} that is uploaded; "
            "move it there or pass --working-dir"
        ) from None
    runtime_env = {"working_dir": str(wd), "excludes": list(DEFAULT_EXCLUDES)}
    argv = [_ray_executable(), "job", "submit"]
    if address:
        argv += ["--address", address if "://" in address else f"http://{address}"]
    argv += ["--runtime-env-json", json.dumps(runtime_env)]
    if no_wait:
        argv.append("--no-wait")
    return argv + ["--", "portable-rl", "train", rel.as_posix(), *overrides]


def run_submit(args: argparse.Namespace) -> int:
    opts, overrides = split_submit_args(args.rest)
    overrides += list(getattr(args, "pass_through", []))  # --sglang-* / --megatron-*, taken out by the CLI
    argv = submit_command(
        args.recipe,
        overrides,
        address=opts.get("address") or args.address,
        working_dir=str(opts.get("working_dir") or args.working_dir),
        no_wait=bool(opts.get("no_wait") or args.no_wait),
    )
    if opts.get("dry_run") or args.dry_run:
        print(shlex.join(argv))
        return 0
    sys.stdout.flush()
    os.execvp(argv[0], argv)  # pragma: no cover - replaces the process
    return 0  # pragma: no cover


def submit_recipe(recipe: str, address: str, overrides: Sequence[str] = (), working_dir: str = ".") -> int:
    """Run ``recipe`` as a Ray job on the cluster whose dashboard is ``address``; return the CLI's exit code.

    The hook for end-to-end tests and scripts: the same command `portable-rl launch submit` runs.
    """
    import subprocess

    return subprocess.run(
        submit_command(recipe, overrides, address=address, working_dir=working_dir)
    ).returncode


# ---- check -------------------------------------------------------------------------------------------------


def wait_for_port(address: str, deadline: float) -> None:
    """Block until HOST:PORT accepts TCP connections (``ray.init`` on a dead address hangs for minutes)."""
    import socket

    host, _, port = address.rpartition(":")
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2.0):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise UserError(
                    f"no Ray head answers at {address} ({exc.strerror or exc}); start `launch head` first"
                ) from None
            time.sleep(1.0)


def run_check(args: argparse.Namespace) -> int:
    import ray

    from portable_rl.orchestration.cluster import check_cluster_platforms
    from portable_rl.platform import current_platform

    current_platform().check_ray_compatible()  # before Ray starts in this process
    deadline = time.monotonic() + args.timeout
    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("launch check needs --address HEAD_HOST:PORT (or RAY_ADDRESS)")
    wait_for_port(_check_address(address), deadline)
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        while True:
            nodes = ray.nodes()
            alive = sum(1 for n in nodes if n.get("Alive"))
            if alive >= args.nodes:
                break
            if time.monotonic() > deadline:
                raise UserError(
                    f"only {alive} of {args.nodes} node(s) joined {address} within {args.timeout:.0f} s"
                )
            time.sleep(2.0)
        found = check_cluster_platforms(nodes, args.weight_sync)
    finally:
        ray.shutdown()
    print(f"cluster ok: {alive} node(s); trainer platform {found.trainer_platform}")
    for node in found.nodes:
        print(f"  {node.address:<20} {node.platform:<6} {node.role or 'trainer+engine'}")
    return 0


# ---- template ----------------------------------------------------------------------------------------------


def run_template(args: argparse.Namespace) -> int:
    from portable_rl.cluster_templates import TemplateSpec, render

    try:
        spec = TemplateSpec(
            platform=args.platform,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            image=args.image,
            cpus_per_node=args.cpus_per_node,
            memory_per_node=args.memory_per_node,
            name=args.name,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    text = render(args.kind, spec)
    if args.out:
        out = Path(args.out)
        if out.exists() and not args.force:
            raise UserError(f"--out {args.out!r} exists; pass --force to overwrite it")
        out.write_text(text, encoding="utf-8")
        if args.kind == "slurm":
            out.chmod(0o755)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


# ---- parser ------------------------------------------------------------------------------------------------


def _node_parser(sub: argparse._SubParsersAction, action: str, help_text: str) -> None:
    p = sub.add_parser(action, help=help_text, description=help_text)
    if action == "head":
        p.add_argument("--port", type=int, default=DEFAULT_PORT, help="GCS port of the head (default 6379)")
        p.set_defaults(address=None)
    else:
        p.add_argument("--address", help="HEAD_HOST:PORT of the Ray head (default: $RAY_ADDRESS)")
        p.set_defaults(port=None)
    p.add_argument("--num-cpus", type=int, help="CPUs this node offers to Ray (default: Ray counts them)")
    p.add_argument("--num-gpus", type=int, help="devices this node offers (default: the visible devices)")
    p.add_argument(
        "--node-ip", help="IP address other nodes reach this node at (ray start --node-ip-address)"
    )
    p.add_argument(
        "--ifname",
        default="auto",
        help="network interface for collectives: a name, 'auto' (default route) or 'none'",
    )
    p.add_argument(
        "--role",
        choices=("trainer", "engine"),
        help="advertise portable_rl_role:ROLE (the mixed-vendor check treats engine nodes as engine-only; "
        "a recipe pins work there with placement.trainer_resource / placement.engine_resource)",
    )
    p.add_argument(
        "--resources",
        help="extra custom Ray resources as JSON, merged with the platform's (e.g. '{\"trainer_pool\": 1}' "
        "for placement.trainer_resource=trainer_pool)",
    )
    p.add_argument("--block", action="store_true", help="keep ray start in the foreground (under srun)")
    p.add_argument(
        "--dry-run", action="store_true", help="print the env and the ray start command; run nothing"
    )
    p.add_argument("ray_args", nargs="*", metavar="-- RAY_START_ARGS", help="passed to ray start unchanged")
    p.set_defaults(func=run_node, action=action)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch",
        help="start Ray nodes for this platform, submit a recipe, check a cluster, write cluster templates",
        description="Multi-node launch: the same commands on NVIDIA, AMD and CPU clusters.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    _node_parser(actions, "head", "start the Ray head on this node with this platform's env")
    _node_parser(actions, "worker", "join this node to a Ray cluster with this platform's env")

    s = actions.add_parser("submit", help="run `portable-rl train RECIPE ...` as a Ray job on the cluster")
    s.add_argument(
        "--address", help="Ray dashboard address, e.g. http://HEAD:8265 (default: Ray's own lookup)"
    )
    s.add_argument(
        "--working-dir", default=".", help="directory uploaded with the job (must hold the recipe)"
    )
    s.add_argument("--no-wait", action="store_true", help="return after submitting instead of following logs")
    s.add_argument("--dry-run", action="store_true", help="print the ray job submit command; run nothing")
    s.add_argument("recipe", help="recipe YAML inside the working dir")
    s.add_argument(
        "rest", nargs=argparse.REMAINDER, help="overrides for portable-rl train (after -- verbatim)"
    )
    s.set_defaults(func=run_submit, accepts_pass_through=True)

    c = actions.add_parser("check", help="wait for the cluster's nodes and refuse a mixed-vendor cluster")
    c.add_argument("--address", help="HEAD_HOST:PORT of the Ray head (default: $RAY_ADDRESS)")
    c.add_argument("--nodes", type=int, default=1, help="alive nodes to wait for (default 1)")
    c.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for them (default 300)")
    c.add_argument(
        "--weight-sync",
        default="auto",
        help="the recipe's weight_sync.strategy (disk allows foreign engines)",
    )
    c.set_defaults(func=run_check)

    t = actions.add_parser(
        "template", help="write a SLURM batch script or a KubeRay RayCluster for a platform"
    )
    t.add_argument("kind", choices=("slurm", "kuberay"))
    t.add_argument("--platform", required=True, help="cpu, cuda or rocm")
    t.add_argument("--nodes", type=int, default=2, help="nodes (pods), head included (default 2)")
    t.add_argument("--gpus-per-node", type=int, default=8, help="devices per node (default 8)")
    t.add_argument("--image", help="container image (default: the platform's image)")
    t.add_argument("--cpus-per-node", default="32", help="KubeRay pod CPU request (default 32)")
    t.add_argument("--memory-per-node", default="256Gi", help="KubeRay pod memory request (default 256Gi)")
    t.add_argument("--name", help="job / RayCluster name (default portable-rl-<platform>)")
    t.add_argument("--out", help="write to this file instead of stdout")
    t.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    t.set_defaults(func=run_template)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
