"""The platform's optimizer options: written into Megatron's torch optimizers, and on the CPU bit-neutral."""

from __future__ import annotations

import pytest
import torch

from portable_rl import platform as plat
from portable_rl.training.updates import set_optimizer_options, torch_optimizers


class _Wrapped:  # Megatron's optimizers hold the torch one in ``.optimizer``; a chained one holds several
    def __init__(self, inner):
        self.optimizer = inner


class _Chained:
    def __init__(self, *parts):
        self.chained_optimizers = list(parts)


def _adamw(params, **kw):
    return torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, **kw)


def test_options_reach_every_torch_optimizer_and_only_known_keys():
    a = _adamw([torch.nn.Parameter(torch.zeros(2))])
    b = _adamw([torch.nn.Parameter(torch.zeros(3))])
    chained = _Chained(_Wrapped(a), _Wrapped(b))
    assert torch_optimizers(chained) == [a, b]
    assert set_optimizer_options(chained, {"foreach": True, "not_an_option": 1}) == 2
    for opt in (a, b):
        assert opt.param_groups[0]["foreach"] is True
        assert "not_an_option" not in opt.param_groups[0]
    assert set_optimizer_options(_Wrapped(a), {}) == 0


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_cpu_optimizer_options_change_the_update_by_float_rounding_only(weight_decay):
    options = plat.load("cpu").optimizer_options()
    assert options  # the CPU platform sets something; it may only reorder the arithmetic

    def run(opts):
        g = torch.Generator().manual_seed(0)
        params = [
            torch.nn.Parameter(torch.randn(s, generator=g))
            for s in [(576, 576), (1536, 576), (576,), (300, 7)]
        ]
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=weight_decay)
        set_optimizer_options(_Wrapped(opt), opts)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return params, [opt.state[p][k] for p in params for k in ("exp_avg", "exp_avg_sq")]

    base, base_state = run({})
    got, got_state = run(options)
    # A few ulp of float32 at most: a wrong update (another lr, bias correction or decay) is off by far more.
    for x, y in zip(base + base_state, got + got_state, strict=True):
        torch.testing.assert_close(y, x, rtol=4e-7, atol=1e-9)
