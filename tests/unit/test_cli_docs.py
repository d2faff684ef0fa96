"""Every CLI command has --help and appears in the README's CLI table."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from portable_rl.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[2]
NAMES = [m.rsplit(".", 1)[1] for m in COMMANDS]


@pytest.mark.parametrize("name", NAMES)
def test_command_documented_and_has_help(name, capsys):
    importlib.import_module(f"portable_rl.commands.{name}")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"`portable-rl {name}" in readme, f"README's CLI table lacks portable-rl {name}"
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([name, "--help"])
    assert exit_.value.code == 0
    assert f"portable-rl {name}" in capsys.readouterr().out
