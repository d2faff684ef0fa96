"""Shared test fixtures: a clean platform cache per test, quiet Ray, and tiny checkpoints built once."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # Every collected test's markers, before -m / -k deselect any: tests/unit/test_ci_matrix.py evaluates each
    # CI leg's marker expression on them (and collects in a subprocess when this run did not collect it all).
    config.portable_rl_markers = {item.nodeid: {m.name for m in item.iter_markers()} for item in items}


@pytest.fixture(autouse=True)
def _fresh_platform():
    from portable_rl.platform import reset_current_platform

    reset_current_platform()
    yield
    reset_current_platform()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from portable_rl.models.tiny import TinySpec, build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), TinySpec(arch="llama"))


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    from portable_rl.models.tiny import TinySpec, build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen2"), TinySpec(arch="qwen2"))


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    from portable_rl.models.tiny import TinySpec, build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen3"), TinySpec(arch="qwen3"))
