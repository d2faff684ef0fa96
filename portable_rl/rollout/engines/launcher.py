"""Start, watch and stop one rollout engine server in a subprocess.

Contract
--------
* ``EngineSpec`` says what to run: ``kind="sglang"`` runs ``python -m sglang.launch_server`` with the platform's
  defaults (``current_platform().sglang_server_args()``) overridden by the user's pass-through options
  (``engine_args``, from ``--sglang-<name>`` flags); ``kind="cpu"`` runs portable_rl's CPU engine server;
  ``kind="auto"`` picks the CPU engine where the platform's torch device is the CPU, SGLang elsewhere.
* The subprocess env is this process's env plus ``platform.worker_env(devices)`` plus ``spec.env``; this module
  names no vendor. The engine runs in its own session, so stopping it reaches every process it forked.
* Security: engines bind ``127.0.0.1`` unless ``spec.host`` says otherwise. ``api_key`` reaches the CPU engine
  through its env (off the command line) and SGLang through ``--api-key``; the logged command and every log
  tail in an error show it as ``***``.
* ``launch_engine(spec)`` returns an ``EngineProcess`` once ``GET /health`` answers 200; if the process exits
  or ``startup_timeout_s`` passes first, it is stopped and ``EngineStartError`` carries the log's last lines.
* ``EngineProcess.stop(timeout_s)``: SIGTERM to the engine's process group, SIGKILL after ``timeout_s``.
* ``EngineServerActor`` is the same as a Ray actor body: ``ray.remote(EngineServerActor).remote(spec)``
  (see ``remote_engine_actor``) starts the engine where Ray placed the actor and exposes ``url()``,
  ``alive()``, ``process_status()`` (alive, exit code, pid), ``log_tail()`` and ``stop()``.
"""

from __future__ import annotations

import logging
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import requests

from portable_rl.distributed import free_port
from portable_rl.platform import Platform, current_platform
from portable_rl.rollout.subprocess_stop import stop_process_group
from portable_rl.rollout.tied import tied_command

log = logging.getLogger(__name__)
KINDS = ("auto", "cpu", "sglang")
TOKEN_ENV = "PORTABLE_RL_ENGINE_TOKEN"


REDACTED = "***"


SECRET_ARGS = ("api_key", "admin_api_key")  # engine server args that carry credentials


def redact(text: str, *secrets_: Any) -> str:
    """``text`` with every occurrence of each non-empty secret replaced by ``***`` (for logs and errors)."""
    for secret in secrets_:
        if isinstance(secret, str) and secret:
            text = text.replace(secret, REDACTED)
    return text


class EngineStartError(RuntimeError):
    """The engine process did not become healthy; the message ends with the tail of its log."""


# Bind the Ray node's own address: engines of a multi-node job must be reachable from the driver's node.
NODE_HOST = "node"


@dataclass
class EngineSpec:
    model_path: str
    kind: str = "auto"
    host: str = "127.0.0.1"  # NODE_HOST: the address of the Ray node the engine actor runs on
    port: int = 0  # 0: pick a free port
    api_key: str | None = None
    engine_args: dict[str, Any] = field(
        default_factory=dict
    )  # SGLang server args by name (dashes or underscores)
    devices: list[int] = field(default_factory=list)  # physical devices the engine may use
    env: dict[str, str] = field(default_factory=dict)
    python: str = sys.executable  # interpreter that has the engine installed (e.g. a separate SGLang venv)
    startup_timeout_s: float = 600.0
    log_path: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"engine kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not (Path(self.model_path) / "config.json").is_file():
            raise ValueError(
                f"engine model_path {self.model_path!r} has no config.json; pass a HF checkpoint dir"
            )
        if not 0 <= int(self.port) <= 65535:
            raise ValueError(f"engine port {self.port} must be in 0..65535 (0: pick a free port)")
        if self.startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s={self.startup_timeout_s} must be positive")


def resolve_kind(spec: EngineSpec, platform: Platform) -> str:
    return engine_kind(spec.kind, platform)


def engine_kind(kind: str, platform: Platform) -> str:
    """The engine an ``EngineSpec.kind`` runs on ``platform``: "auto" is the CPU engine on CPU, else SGLang."""
    if kind != "auto":
        return kind
    return "cpu" if platform.torch_device_type == "cpu" else "sglang"


def to_cli(args: dict[str, Any]) -> list[str]:
    """``{"attention_backend": "x", "enable_metrics": True}`` -> ``--attention-backend x --enable-metrics``."""
    out: list[str] = []
    for key, value in args.items():
        flag = "--" + str(key).replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            out.append(flag)
        elif isinstance(value, (list, tuple)):
            out += [flag, *[str(v) for v in value]]
        else:
            out += [flag, str(value)]
    return out


def _normalise(args: dict[str, Any]) -> dict[str, Any]:
    return {str(k).replace("-", "_"): v for k, v in args.items()}


def engine_command(spec: EngineSpec, port: int, platform: Platform) -> list[str]:
    kind = resolve_kind(spec, platform)
    if kind == "sglang":
        args = {**_normalise(platform.sglang_server_args()), **_normalise(spec.engine_args)}
        args.update({"model_path": spec.model_path, "host": spec.host, "port": port})
        if len(spec.devices) > 1:  # rollout.engine_tp_size reserved these devices for one server: it uses all
            args.setdefault("tp_size", len(spec.devices))
        if spec.api_key:
            args["api_key"] = spec.api_key  # SGLang reads its key from the command line only
        return [spec.python, "-m", "sglang.launch_server", *to_cli(args)]
    from portable_rl.rollout.engines.cpu_server import build_parser

    known = {a.dest for a in build_parser()._actions}
    args = _normalise(spec.engine_args)
    ignored = sorted(k for k in args if k not in known)
    if ignored:
        log.warning(
            "the CPU engine has no option(s) %s; they apply to SGLang only and are not passed", ignored
        )
    args = {k: v for k, v in args.items() if k in known}
    args.update({"model_path": spec.model_path, "host": spec.host, "port": port})
    return [spec.python, "-m", "portable_rl.rollout.engines.cpu_server", *to_cli(args)]


class EngineProcess:
    def __init__(self, spec: EngineSpec, platform: Platform | None = None) -> None:
        self.spec = spec
        self.platform = platform or current_platform()
        self.kind = resolve_kind(spec, self.platform)
        self.port = spec.port or free_port(spec.host)
        connect_host = "127.0.0.1" if spec.host in ("0.0.0.0", "") else spec.host
        self.url = f"http://{connect_host}:{self.port}"
        self.command = engine_command(spec, self.port, self.platform)
        if spec.log_path:
            self.log_path = Path(spec.log_path)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        else:
            fd, name = tempfile.mkstemp(prefix=f"engine-{self.port}-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.proc: subprocess.Popen | None = None

    @property
    def secrets(self) -> list[Any]:
        """The key and any credential passed through ``engine_args`` (``--sglang-api-key``), for redaction."""
        args = _normalise(self.spec.engine_args)
        return [self.spec.api_key, *(args.get(name) for name in SECRET_ARGS)]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.platform.worker_env(list(self.spec.devices)))
        env.update(self.spec.env)
        if self.spec.api_key and self.kind == "cpu":
            env[TOKEN_ENV] = self.spec.api_key  # kept off the command line (visible in ps)
        return env

    def start(self) -> EngineProcess:
        log.info(
            "starting %s engine (log %s): %s",
            self.kind,
            self.log_path,
            redact(shlex.join(self.command), *self.secrets),
        )
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                tied_command(self.command),
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=self._env(),
                start_new_session=True,
            )
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        # SGLang logs its server_args, api_key included; the tail ends up in our errors and logs.
        return redact("\n".join(text.splitlines()[-lines:]), *self.secrets)

    def wait_ready(self) -> EngineProcess:
        deadline = time.monotonic() + self.spec.startup_timeout_s
        headers = {"Authorization": f"Bearer {self.spec.api_key}"} if self.spec.api_key else {}
        while True:
            if not self.alive:
                code = None if self.proc is None else self.proc.returncode
                raise EngineStartError(
                    f"{self.kind} engine for {self.spec.model_path} exited with code {code} before it was healthy "
                    f"(log {self.log_path}):\n{self.log_tail()}"
                )
            try:
                if requests.get(f"{self.url}/health", headers=headers, timeout=5).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise EngineStartError(
                    f"{self.kind} engine at {self.url} was not healthy within {self.spec.startup_timeout_s:g}s "
                    f"(log {self.log_path}):\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """Terminate the engine and everything it started; returns its exit code."""
        if self.proc is None:
            return None
        return stop_process_group(self.proc, timeout_s)


def launch_engine(spec: EngineSpec, platform: Platform | None = None) -> EngineProcess:
    """Start the engine and wait until it is healthy (see module docstring)."""
    return EngineProcess(spec, platform).start().wait_ready()


class EngineServerActor:
    """Ray actor body owning one engine process on the actor's node."""

    def __init__(self, spec: EngineSpec) -> None:
        current_platform().prepare_process_env()
        if spec.host == NODE_HOST:
            spec = replace(spec, host=_node_address())
        self.engine = launch_engine(spec)

    def url(self) -> str:
        if self.engine.spec.host in ("0.0.0.0", ""):
            return f"http://{_node_address()}:{self.engine.port}"
        return self.engine.url

    def alive(self) -> bool:
        return self.engine.alive

    def process_status(self) -> dict[str, Any]:
        """``{"alive", "returncode", "pid"}`` of the engine process (for health checks)."""
        proc = self.engine.proc
        return {
            "alive": self.engine.alive,
            "returncode": None if proc is None else proc.poll(),
            "pid": None if proc is None else proc.pid,
        }

    def log_tail(self, lines: int = 50) -> str:
        return self.engine.log_tail(lines)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        return self.engine.stop(timeout_s)


def _node_address() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except (ImportError, RuntimeError):
        return socket.gethostbyname(socket.gethostname())


def remote_engine_actor(spec: EngineSpec, **ray_options: Any):
    """A Ray actor handle running ``EngineServerActor(spec)`` with ``ray_options`` (resources, scheduling)."""
    import ray

    return ray.remote(EngineServerActor).options(**ray_options).remote(spec)
