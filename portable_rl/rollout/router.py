"""The real ``sglang-router`` (PyPI ``sglang-router``) in a subprocess, in front of the rollout engines.

Contract
--------
* ``Router(cfg).start(worker_urls)`` runs ``python -m sglang_router.launch_router --host --port --policy
  --worker-urls ...`` (plus ``cfg.extra_args``) on loopback by default, and returns once ``/liveness`` answers
  and every given worker is listed healthy. ``url`` is where clients send ``/generate``.
* ``add_worker(url)`` / ``remove_worker(url)`` use the router's worker API (0.3.x: ``POST /workers``
  ``{"url", "api_key"}``, ``DELETE /workers/{id}``; older releases: ``/add_worker?url=``,
  ``/remove_worker?url=``), and wait until the change is visible in ``workers()``.
* With ``api_key`` the router requires ``Authorization: Bearer <key>`` from clients (``/generate``, the worker
  API) and presents it to workers, which is what engines started with the same key expect. The router binds
  ``127.0.0.1`` (and its metrics exporter too) unless ``host`` says otherwise; the logged command and the log
  tail in a ``RouterError`` show the key as ``***``.
* ``stop()`` terminates the router (SIGTERM, then SIGKILL after a timeout). The router is also a context manager.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from portable_rl.distributed import free_port
from portable_rl.rollout.engines.launcher import redact, to_cli
from portable_rl.rollout.subprocess_stop import stop_process_group
from portable_rl.rollout.tied import tied_command

log = logging.getLogger(__name__)
POLICIES = ("random", "round_robin", "cache_aware", "power_of_two")


class RouterError(RuntimeError):
    """The router did not start, or did not accept a worker change; the message names the router and worker."""


@dataclass
class RouterConfig:
    """host/port: where the router listens (port 0: a free one). policy: sglang-router's load-balancing policy;
    round_robin spreads a rollout's concurrent requests evenly (cache_aware, SGLang's default, keeps a prompt's
    samples on one engine until the load is far out of balance: good for SGLang's prefix cache, bad for small
    CPU batches)."""

    host: str = "127.0.0.1"
    port: int = 0
    policy: str = "round_robin"
    api_key: str | None = None
    startup_timeout_s: float = 120.0
    request_timeout_s: float = 3600.0
    python: str = sys.executable
    log_path: str | None = None
    extra_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"router policy {self.policy!r} is not one of {', '.join(POLICIES)}")
        if not 0 <= int(self.port) <= 65535:
            raise ValueError(f"router port {self.port} must be in 0..65535 (0: pick a free port)")


class Router:
    def __init__(self, cfg: RouterConfig | None = None) -> None:
        self.cfg = cfg or RouterConfig()
        self.port = self.cfg.port or free_port(self.cfg.host)
        host = "127.0.0.1" if self.cfg.host in ("0.0.0.0", "") else self.cfg.host
        self.url = f"http://{host}:{self.port}"
        self.proc: subprocess.Popen | None = None
        if self.cfg.log_path:
            self.log_path = Path(self.cfg.log_path)
        else:
            fd, name = tempfile.mkstemp(prefix=f"router-{self.port}-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self._session = requests.Session()
        if self.cfg.api_key:
            self._session.headers["Authorization"] = f"Bearer {self.cfg.api_key}"

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def command(self, worker_urls: list[str]) -> list[str]:
        args: dict[str, Any] = {
            "host": self.cfg.host,
            "port": self.port,
            "policy": self.cfg.policy,
            "request_timeout_secs": int(self.cfg.request_timeout_s),
            "log_level": "warn",
            # the metrics exporter's fixed default port (29000) collides when two routers share a host
            "prometheus_host": "127.0.0.1",
            "prometheus_port": free_port("127.0.0.1"),
            **self.cfg.extra_args,
        }
        if self.cfg.api_key:
            args["api_key"] = self.cfg.api_key
        cmd = [self.cfg.python, "-m", "sglang_router.launch_router", *to_cli(args)]
        if worker_urls:
            cmd += ["--worker-urls", *worker_urls]
        return cmd

    def start(self, worker_urls: list[str] | None = None) -> Router:
        urls = [u.rstrip("/") for u in worker_urls or []]
        command = self.command(urls)
        log.info(
            "starting sglang-router (log %s): %s",
            self.log_path,
            redact(shlex.join(command), self.cfg.api_key),
        )
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                tied_command(command), stdout=logf, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RouterError(
                    f"sglang-router exited with code {self.proc.returncode} (log {self.log_path}):\n{self._tail()}"
                )
            try:
                if self._session.get(f"{self.url}/liveness", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RouterError(
                    f"sglang-router at {self.url} did not answer within {self.cfg.startup_timeout_s:g}s"
                )
            time.sleep(0.3)
        try:
            self._wait_for(urls, present=True, deadline=deadline)
        except BaseException:
            self.stop()  # the caller never gets this Router, so nobody else would stop it
            raise
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc is None:
            return
        stop_process_group(self.proc, timeout_s)
        self.proc = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _tail(self, lines: int = 20) -> str:
        try:
            text = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
        return redact(text, self.cfg.api_key)

    # ---- workers ------------------------------------------------------------------------------------------
    def _list(self) -> list[dict[str, Any]]:
        resp = self._session.get(f"{self.url}/workers", timeout=10)
        if resp.status_code == 404:  # routers before the /workers API
            resp = self._session.get(f"{self.url}/list_workers", timeout=10)
            resp.raise_for_status()
            return [{"url": u, "is_healthy": True} for u in resp.json().get("urls", [])]
        resp.raise_for_status()
        return list(resp.json().get("workers", []))

    def workers(self, healthy_only: bool = True) -> list[str]:
        """URLs of the workers the router routes to."""
        return [w["url"] for w in self._list() if w.get("is_healthy", True) or not healthy_only]

    def _wait_for(self, urls: list[str], present: bool, deadline: float) -> None:
        while True:
            try:
                listed = set(self.workers(healthy_only=present))
            except requests.RequestException:
                listed = set()
            missing = [u for u in urls if (u in listed) != present]
            if not missing:
                return
            if time.monotonic() > deadline:
                what = "not listed healthy" if present else "still listed"
                raise RouterError(
                    f"sglang-router at {self.url}: worker(s) {missing} {what} in time (log {self.log_path})"
                )
            time.sleep(0.3)

    def add_worker(self, url: str, timeout_s: float = 120.0) -> None:
        url = url.rstrip("/")
        body: dict[str, Any] = {"url": url}
        if self.cfg.api_key:
            body["api_key"] = self.cfg.api_key
        resp = self._session.post(f"{self.url}/workers", json=body, timeout=30)
        if resp.status_code == 404:
            resp = self._session.post(f"{self.url}/add_worker", params={"url": url}, timeout=timeout_s)
        if resp.status_code >= 400:
            raise RouterError(
                f"sglang-router at {self.url} refused worker {url}: HTTP {resp.status_code} {resp.text[:300]}"
            )
        self._wait_for([url], present=True, deadline=time.monotonic() + timeout_s)

    def remove_worker(self, url: str, timeout_s: float = 60.0) -> None:
        url = url.rstrip("/")
        entry = next((w for w in self._list() if w.get("url") == url), None)
        if entry is None:
            raise RouterError(
                f"sglang-router at {self.url} has no worker {url}; workers: {self.workers(False)}"
            )
        if "id" in entry:
            resp = self._session.delete(f"{self.url}/workers/{entry['id']}", timeout=30)
        else:
            resp = self._session.post(f"{self.url}/remove_worker", params={"url": url}, timeout=30)
        if resp.status_code >= 400:
            raise RouterError(
                f"sglang-router at {self.url} did not remove {url}: HTTP {resp.status_code} {resp.text[:300]}"
            )
        self._wait_for([url], present=False, deadline=time.monotonic() + timeout_s)
