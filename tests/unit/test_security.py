"""Security defaults: loopback binding, token-guarded admin/weight endpoints, no credentials in logs or files.

One real CPU engine process (tiny Llama, bearer token set, default host) and one real sglang-router in front of
it serve the module. Refused weight updates point at a *different* checkpoint, so a request that got through
would change the served weights; the test reads weights and version back (with the token) to prove it did not.
tests/unit/test_cpu_server.py already checks the basic 401 of /generate and one weight update; this module
covers every admin endpoint, malformed credentials, path tricks, the router, and redaction.
"""

from __future__ import annotations

import http.client
import logging
import shlex
import socket
import stat
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from portable_rl.rollout.engines import cpu_server
from portable_rl.rollout.engines.launcher import (
    EngineSpec,
    EngineStartError,
    engine_command,
    launch_engine,
)
from portable_rl.rollout.router import Router, RouterConfig, RouterError

TOKEN = "sec-token-3f9a71c2"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LOOPBACK = "127.0.0.1"


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory) -> Path:
    """Same architecture, different weights: what an unauthenticated update would try to load."""
    from portable_rl.models.tiny import TinySpec, build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("other-weights"), TinySpec(arch="llama", seed=7))


@pytest.fixture(scope="module")
def engine(tiny_llama, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("engine-log") / "engine.log"
    proc = launch_engine(
        EngineSpec(
            model_path=str(tiny_llama),
            kind="cpu",
            api_key=TOKEN,
            engine_args={"num_threads": 1, "max_running_requests": 4},
            startup_timeout_s=300,
            log_path=str(log_path),
        )
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def router(engine):
    r = Router(RouterConfig(api_key=TOKEN, startup_timeout_s=120)).start([engine.url])
    yield r
    r.stop()


def listening(pid: int) -> list[tuple[str, int]]:
    return [
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process(pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]


def non_loopback_addresses() -> list[str]:
    return [
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    ]


def weights_state(engine) -> tuple[str, dict]:
    version = requests.get(engine.url + "/get_weight_version", headers=AUTH, timeout=30).json()
    sums = requests.post(engine.url + "/get_weights_checksum", json={}, headers=AUTH, timeout=60).json()
    return version["weight_version"], sums["checksums"]


# ---- (a) loopback by default --------------------------------------------------------------------------------


def test_defaults_are_loopback(tiny_llama):
    from portable_rl.platform import current_platform

    assert EngineSpec(model_path=str(tiny_llama)).host == LOOPBACK
    assert RouterConfig().host == LOOPBACK
    assert cpu_server.build_parser().parse_args(["--model-path", "x"]).host == LOOPBACK
    platform = current_platform()
    for kind in ("cpu", "sglang"):
        cmd = engine_command(EngineSpec(model_path=str(tiny_llama), kind=kind), 30001, platform)
        assert cmd[cmd.index("--host") + 1] == LOOPBACK
    cmd = Router(RouterConfig()).command(["http://127.0.0.1:30001"])
    assert cmd[cmd.index("--host") + 1] == LOOPBACK
    assert cmd[cmd.index("--prometheus-host") + 1] == LOOPBACK


def test_started_engine_and_router_listen_on_loopback_only(engine, router):
    for pid, port in ((engine.proc.pid, engine.port), (router.proc.pid, router.port)):
        sockets = listening(pid)
        assert (LOOPBACK, port) in sockets, sockets
        assert all(ip == LOOPBACK for ip, _ in sockets), f"a socket is not on loopback: {sockets}"
    for address in non_loopback_addresses():  # reachable from the network: must be refused
        for port in (engine.port, router.port):
            with pytest.raises(OSError), socket.create_connection((address, port), timeout=2):
                pass


# ---- (b) admin and weight endpoints refuse missing or wrong tokens ------------------------------------------

ADMIN = [
    ("POST", "/update_weights_from_disk", "OTHER"),
    (
        "POST",
        "/init_weights_update_group",
        {
            "master_address": LOOPBACK,
            "master_port": 1,
            "rank_offset": 1,
            "world_size": 2,
            "group_name": "g",
            "backend": "gloo",
        },
    ),
    (
        "POST",
        "/update_weights_from_distributed",
        {"names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[64]], "group_name": "g"},
    ),
    ("POST", "/update_weights_from_tensor", {"serialized_named_tensors": ["AAAA"]}),
    ("POST", "/destroy_weights_update_group", {"group_name": "g"}),
    ("POST", "/begin_weight_update", {}),
    ("POST", "/end_weight_update", {}),
    ("POST", "/update_weight_version", {"new_version": "hijacked"}),
    ("POST", "/pause_generation", {"mode": "abort"}),
    ("POST", "/continue_generation", {}),
    ("POST", "/abort_request", {"abort_all": True}),
    ("POST", "/flush_cache", {}),
    ("POST", "/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 1}}),
    ("POST", "/get_weights_checksum", {}),
    ("GET", "/get_weights_by_name", {"name": "model.norm.weight"}),
    ("GET", "/server_info", None),
    ("GET", "/model_info", None),
    ("GET", "/get_weight_version", None),
]
BAD_CREDENTIALS = {
    "none": {},
    "wrong": {"Authorization": "Bearer not-the-token"},
    "prefix": {"Authorization": f"Bearer {TOKEN[:-1]}"},
    "longer": {"Authorization": f"Bearer {TOKEN}x"},
    "basic_scheme": {"Authorization": f"Basic {TOKEN}"},
    "no_scheme": {"Authorization": TOKEN},
    "empty_bearer": {"Authorization": "Bearer "},
    "non_ascii": {"Authorization": "Bearer t\u00f6ken".encode("latin-1")},
    "api_key_header": {"X-API-Key": TOKEN},
}


@pytest.mark.parametrize("credential", list(BAD_CREDENTIALS))
def test_admin_endpoints_refuse_bad_credentials_and_change_nothing(engine, other_checkpoint, credential):
    before = weights_state(engine)
    for method, path, body in ADMIN:
        body = (
            {"model_path": str(other_checkpoint), "weight_version": "hijacked"} if body == "OTHER" else body
        )
        r = requests.request(
            method, engine.url + path, json=body, headers=BAD_CREDENTIALS[credential], timeout=30
        )
        assert r.status_code in (401, 403), (
            f"{method} {path} with {credential}: {r.status_code} {r.text[:200]}"
        )
    assert weights_state(engine) == before
    info = requests.get(engine.url + "/server_info", headers=AUTH, timeout=30).json()
    assert info["internal_states"][0]["paused"] is False


def test_the_token_is_what_lets_a_weight_update_through(engine, tiny_llama, other_checkpoint):
    """Control: the same update with the token does change weights (so the refusals above are meaningful)."""
    before = weights_state(engine)
    body = {"model_path": str(other_checkpoint), "weight_version": "v-other"}
    r = requests.post(engine.url + "/update_weights_from_disk", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 200 and r.json()["success"], r.text
    try:
        version, sums = weights_state(engine)
        assert version == "v-other" and sums != before[1]
    finally:
        restore = {"model_path": str(tiny_llama), "weight_version": before[0]}
        r = requests.post(engine.url + "/update_weights_from_disk", json=restore, headers=AUTH, timeout=120)
        assert r.status_code == 200, r.text
    assert weights_state(engine) == before


def test_probes_are_open_but_paths_cannot_borrow_their_exemption(engine, other_checkpoint):
    for path in ("/health", "/ready", "/health_generate"):
        assert requests.get(engine.url + path, timeout=60).status_code == 200, path
    before = weights_state(engine)
    conn = http.client.HTTPConnection(LOOPBACK, engine.port, timeout=30)
    try:
        for raw in (
            "/health/../update_weights_from_disk",
            "/health/%2e%2e/update_weights_from_disk",
            "/healthz/../update_weights_from_disk",
            "/update_weights_from_disk?/health",
            "//update_weights_from_disk",
        ):
            body = f'{{"model_path": "{other_checkpoint}", "weight_version": "hijacked"}}'
            conn.request("POST", raw, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status in (401, 403, 404), f"{raw}: {resp.status}"
    finally:
        conn.close()
    assert weights_state(engine) == before


def test_router_refuses_clients_without_the_token(router, engine):
    workers_before = requests.get(router.url + "/workers", headers=AUTH, timeout=30).json()
    for headers in ({}, {"Authorization": "Bearer nope"}):
        gen = requests.post(
            router.url + "/generate",
            json={"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}},
            headers=headers,
            timeout=30,
        )
        assert gen.status_code == 401, gen.text
        add = requests.post(
            router.url + "/workers", json={"url": "http://127.0.0.1:9"}, headers=headers, timeout=30
        )
        assert add.status_code == 401, add.text
        assert requests.get(router.url + "/workers", headers=headers, timeout=30).status_code == 401
        # Weight updates are not routed at all: they go to each engine, which checks the token itself.
        upd = requests.post(
            router.url + "/update_weights_from_disk", json={"model_path": "x"}, headers=headers, timeout=30
        )
        assert upd.status_code in (401, 403, 404), upd.text
    assert requests.get(router.url + "/workers", headers=AUTH, timeout=30).json() == workers_before
    ok = requests.post(
        router.url + "/generate",
        json={"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}},
        headers=AUTH,
        timeout=60,
    )
    assert ok.status_code == 200, ok.text


# ---- (c) the token never reaches logs, command lines we control, or the run directory ----------------------


def test_engine_and_router_logs_and_cpu_engine_argv_hold_no_token(engine, router):
    # Traffic with right and wrong tokens has gone through both by now (the tests above); make sure of it.
    requests.post(engine.url + "/flush_cache", headers={"Authorization": f"Bearer {TOKEN}x"}, timeout=30)
    requests.post(
        router.url + "/generate", json={"text": "hi"}, headers={"Authorization": "Bearer x"}, timeout=30
    )
    assert TOKEN not in engine.log_path.read_text(errors="replace")
    assert TOKEN not in router.log_path.read_text(errors="replace")
    # The CPU engine takes its key from the environment, so `ps` never shows it.
    assert TOKEN not in " ".join(psutil.Process(engine.proc.pid).cmdline())
    assert TOKEN not in shlex.join(engine.command)
    # Log files are created private to the user (tempfile.mkstemp) when no path is given.
    default_log = Router(RouterConfig(api_key=TOKEN)).log_path
    try:
        assert stat.S_IMODE(default_log.stat().st_mode) & 0o077 == 0
    finally:
        default_log.unlink()


def _fake_server(tmp_path: Path, name: str) -> Path:
    """A stand-in interpreter that logs its whole command line (as SGLang logs server_args) and fails."""
    script = tmp_path / name
    script.write_text('#!/bin/sh\necho "server_args=$*"\nexit 3\n', encoding="utf-8")
    script.chmod(0o755)
    return script


def test_failed_starts_and_logged_commands_redact_the_token(tiny_llama, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    spec = EngineSpec(
        model_path=str(tiny_llama),
        kind="sglang",
        api_key=TOKEN,
        engine_args={"admin_api_key": "admin-" + TOKEN[::-1]},
        python=str(_fake_server(tmp_path, "fake-sglang")),
        startup_timeout_s=30,
        log_path=str(tmp_path / "sglang.log"),
    )
    with pytest.raises(EngineStartError) as info:
        launch_engine(spec)
    message = str(info.value)
    assert "server_args=" in message and "--api-key ***" in message  # the tail is there, the key is not
    assert TOKEN not in message and TOKEN[::-1] not in message
    assert TOKEN in (tmp_path / "sglang.log").read_text()  # (the engine itself did write it)

    cfg = RouterConfig(api_key=TOKEN, python=str(_fake_server(tmp_path, "fake-router")), startup_timeout_s=30)
    with pytest.raises(RouterError) as info:
        Router(cfg).start(["http://127.0.0.1:9"])
    assert "--api-key ***" in str(info.value) and TOKEN not in str(info.value)

    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "starting sglang engine" in logged and "starting sglang-router" in logged
    assert "--api-key ***" in logged
    assert TOKEN not in logged and TOKEN[::-1] not in logged


def test_train_writes_no_token_into_the_run_directory(tmp_path, monkeypatch, capsys):
    """`portable-rl train ... --sglang-api-key T`: the resolved config.yaml shows *** (the job is not run), and
    neither the failed run's log nor the terminal shows the key."""
    import portable_rl.train
    from portable_rl.cli import main

    class Stop(Exception):
        pass

    seen = {}

    def fake_train(recipe, run_dir, resume=False):
        seen["engine_args"] = dict(recipe.rollout.engine_args)
        raise Stop

    monkeypatch.setattr(portable_rl.train, "train", fake_train)
    monkeypatch.setenv("PORTABLE_RL_PLATFORM", "cpu")
    (tmp_path / "p.jsonl").write_text('{"prompt": "1+1?", "label": "2"}\n', encoding="utf-8")
    # A user reward that needs a credential of its own (e.g. for a hosted judge).
    (tmp_path / "judge_reward.py").write_text(
        "def score(response, label, sample, hf_token=None):\n    return 0.0\n", encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "data": {"train": {"path": "p.jsonl"}},
                "rollout": {
                    "prompts_per_step": 1,
                    "samples_per_prompt": 2,
                    "reward": "judge_reward:score",
                    "reward_options": {"hf_token": TOKEN},
                },
            }
        ),
        encoding="utf-8",
    )
    run = tmp_path / "run"
    argv = [
        "train",
        str(recipe),
        "--output-dir",
        str(run),
        "--sglang-api-key",
        TOKEN,
        "rollout.max_new_tokens=4",
    ]
    assert main(argv) == 1  # the failed run: one line, its traceback in run/train.log (checked below too)
    assert seen["engine_args"]["api_key"] == TOKEN  # the job itself still gets the real key
    written = (run / "config.yaml").read_text(encoding="utf-8")
    assert TOKEN not in written
    config = yaml.safe_load(written)
    assert config["rollout"]["engine_args"]["api_key"] == "***"
    assert config["rollout"]["reward_options"]["hf_token"] == "***"
    assert config["rollout"]["max_new_tokens"] == 4  # only credentials are masked
    out, err = capsys.readouterr()
    assert TOKEN not in out + err
    for path in run.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
