"""Typed config building: type checks, "did you mean", YAML errors with line numbers, overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from portable_rl.config_loader import ConfigError, apply_overrides, build, load_yaml, to_dict


@dataclass
class Inner:
    lr: float = 1e-6
    mode: Literal["a", "b"] = "a"

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")


@dataclass
class Outer:
    steps: int = 1
    name: str | None = None
    flag: bool = False
    inner: Inner = field(default_factory=Inner)
    engine_args: dict = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)


def test_build_nested_and_coerce_int_to_float():
    cfg = build(Outer, {"steps": 3, "inner": {"lr": 1, "mode": "b"}, "tags": ["x"]})
    assert cfg.steps == 3 and cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float) and cfg.tags == ["x"]
    assert to_dict(cfg)["inner"] == {"lr": 1.0, "mode": "b"}


@pytest.mark.parametrize(
    "data,message",
    [
        ({"stpes": 1}, "unknown key 'stpes'; did you mean 'steps'?"),
        ({"inner": {"lrr": 1}}, "unknown key 'inner.lrr'; did you mean 'lr'?"),
        ({"steps": "three"}, "steps='three' must be an integer"),
        ({"steps": True}, "steps=True must be an integer"),
        ({"flag": "yes"}, "flag='yes' must be true or false"),
        ({"inner": {"mode": "c"}}, "inner.mode='c' is not allowed; choose one of 'a', 'b'"),
        ({"inner": {"lr": -1}}, "inner: lr=-1.0 must be > 0"),
        ({"inner": 5}, "inner must be a mapping of Inner fields"),
        ({"tags": "x"}, "tags must be a list"),
        ({"zzz": 1}, "valid keys:"),
    ],
)
def test_bad_values_are_one_line(data, message):
    with pytest.raises(ConfigError) as err:
        build(Outer, data)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"line \d+, column \d+"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    nonutf = tmp_path / "latin.yaml"
    nonutf.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_yaml(nonutf)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_yaml(scalar)


def test_overrides_and_pass_through():
    base = {"run": {"steps": 1}}
    out = apply_overrides(
        base,
        [
            "run.steps=4",
            "train.lr=2e-6",
            "--sglang-mem-fraction-static",
            "0.7",
            "--sglang-enable-metrics",
            "--megatron-recompute-granularity=full",
        ],
    )
    assert out["run"]["steps"] == 4 and out["train"]["lr"] == 2e-6
    assert out["rollout"]["engine_args"] == {"mem_fraction_static": 0.7, "enable_metrics": True}
    assert out["train"]["megatron_args"] == {"recompute_granularity": "full"}
    assert base == {"run": {"steps": 1}}  # the input is not mutated
    with pytest.raises(ConfigError, match="cannot parse override"):
        apply_overrides(base, ["steps"])
    with pytest.raises(ConfigError, match="is not a section"):
        apply_overrides(base, ["run.steps.x=1"])


def test_unquoted_on_off_reach_a_string_field_as_on_off():
    # YAML 1.1 reads `off` as False: `weight_sync.resident_weights=off` must still mean "off".
    from portable_rl.config.weight_sync import WeightSyncConfig
    from portable_rl.config_loader import parse_scalar

    cfg = build(
        WeightSyncConfig,
        {"resident_weights": parse_scalar("off"), "flatten_buckets": parse_scalar("on")},
    )
    assert (cfg.resident_weights, cfg.flatten_buckets) == ("off", "on")
    with pytest.raises(ConfigError, match=r"name=3 must be a string"):
        build(Outer, {"name": 3})
