"""The CPU compat layer for megatron-core: version pin, activation rules, and real Megatron training on CPU.

The training checks run in a spawned process so the pytest worker's torch stays untouched. They use Megatron
directly (no portable_rl training code), so a megatron-core upgrade that breaks the layer fails here first.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
from importlib import metadata

import pytest
import torch
import torch.multiprocessing as mp

from portable_rl.backends.cpu import megatron_compat
from portable_rl.backends.versions import COMMON


def test_installed_megatron_is_the_pinned_one():
    assert metadata.version("megatron-core") == COMMON["megatron-core"]


def test_other_megatron_version_is_refused(monkeypatch):
    monkeypatch.setattr(megatron_compat, "needed", lambda: True)
    monkeypatch.setattr(megatron_compat, "_PATCHED", False)  # the first install of a process checks
    monkeypatch.setattr(megatron_compat.metadata, "version", lambda name: "0.99.0")
    with pytest.raises(megatron_compat.MegatronVersionError, match=r"0\.99\.0.*megatron-core==0\.16\.1"):
        megatron_compat.install()
    assert not megatron_compat.installed()


def test_version_is_read_once_per_process(monkeypatch):
    """Once patched, install() (run before every trainer step and weight export) skips the metadata read."""
    monkeypatch.setattr(megatron_compat, "needed", lambda: True)
    monkeypatch.setattr(megatron_compat, "_PATCHED", True)

    def read_again(name: str) -> str:
        raise AssertionError(f"package metadata of {name} read again")

    monkeypatch.setattr(megatron_compat.metadata, "version", read_again)
    result: dict = {}
    # In a thread of its own: the compat mode it pushes ends with the thread, not on the test's thread.
    worker = threading.Thread(target=lambda: result.update(active=megatron_compat.install()))
    worker.start()
    worker.join()
    assert result == {"active": True}


def test_inactive_on_a_torch_build_with_an_accelerator(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    assert megatron_compat.needed() is False
    assert megatron_compat.install() is False
    assert not megatron_compat.installed()


def _train_on_cpu(port: int, queue) -> None:
    """Megatron GPTModel + DDP + (distributed) optimizer + clip on a CPU-only torch, world size 1."""
    import torch.distributed as dist
    import torch.nn.functional as F

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    out: dict = {"active": megatron_compat.install(), "active_again": megatron_compat.install()}
    dist.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(7)
    out["cuda_tensor_device"] = str(torch.zeros(2, device="cuda").device)
    out["type_name"] = torch.zeros(2).type()
    default_state = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        first = torch.rand(3)
    out["fork_restores_default"] = torch.equal(default_state, torch.get_rng_state())
    model_parallel_cuda_manual_seed(7)
    with get_cuda_rng_tracker().fork():
        again = torch.rand(3)
    out["fork_reproducible"] = torch.equal(first, again)

    for dtype, distopt in ((torch.float32, True), (torch.bfloat16, False)):
        bf16 = dtype == torch.bfloat16
        cfg = TransformerConfig(
            num_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            num_query_groups=2,
            ffn_hidden_size=64,
            normalization="RMSNorm",
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=True,
            qk_layernorm=True,
            attention_dropout=0.1,  # exercises the RNG tracker's fork on the CPU generator
            hidden_dropout=0.0,
            use_cpu_initialization=True,
            gradient_accumulation_fusion=False,
            bf16=bf16,
            params_dtype=dtype,
            pipeline_dtype=dtype,
        )
        model = GPTModel(
            cfg,
            get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm"),
            vocab_size=64,
            max_sequence_length=32,
            position_embedding_type="rope",
        )
        ddp = DistributedDataParallel(
            cfg,
            DistributedDataParallelConfig(use_distributed_optimizer=distopt, grad_reduce_in_fp32=True),
            model,
        )
        opt = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=1e-2,
                clip_grad=0.5,
                bf16=bf16,
                params_dtype=dtype,
                use_distributed_optimizer=distopt,
            ),
            [ddp],
        )
        cfg.finalize_model_grads_func = finalize_model_grads
        tokens = torch.randint(0, 64, (2, 16))
        before = {k: v.detach().clone() for k, v in model.named_parameters()}

        def step(data, chunk):
            batch = next(data)
            logits = chunk(batch, torch.arange(16).expand(2, 16), None)

            def loss_func(output):
                loss = torch.nn.functional.cross_entropy(
                    output[:, :-1].float().reshape(-1, 64), batch[:, 1:].reshape(-1)
                )
                return loss, {"loss": loss.detach()}

            return logits, loss_func

        losses, norms = [], []
        for _ in range(2):
            ddp.zero_grad_buffer()
            opt.zero_grad()
            reports = get_forward_backward_func()(
                forward_step_func=step,
                data_iterator=iter([tokens, tokens]),
                model=[ddp],
                num_microbatches=2,
                seq_length=16,
                micro_batch_size=2,
            )
            ok, grad_norm, _ = opt.step()
            assert ok
            losses.append(float(reports[0]["loss"]))
            norms.append(float(grad_norm))
        changed = sum(not torch.equal(before[k], v) for k, v in model.named_parameters())
        out[str(dtype)] = {"losses": losses, "norms": norms, "changed": changed, "total": len(before)}
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    queue.put(out)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One spawned Megatron run per session, shared by xdist workers through a lock file."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return _spawn_cpu_run()
    shared = tmp_path_factory.getbasetemp().parent  # this session's directory, common to all workers
    result = shared / "megatron-compat-run.pt"
    with open(shared / "megatron-compat-run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not result.exists():
            torch.save(_spawn_cpu_run(), result)
    return torch.load(result, weights_only=False)


def _spawn_cpu_run() -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    proc = ctx.Process(target=_train_on_cpu, args=(port, queue))
    proc.start()
    proc.join(timeout=600)
    assert proc.exitcode == 0, f"Megatron CPU run exited with {proc.exitcode}"
    return queue.get()


def test_layer_activates_once_per_thread(cpu_run):
    assert cpu_run["active"] is True and cpu_run["active_again"] is True


def test_device_redirect_type_names_and_rng_tracker(cpu_run):
    assert cpu_run["cuda_tensor_device"] == "cpu"
    assert cpu_run["type_name"] == "torch.cuda.FloatTensor"
    assert cpu_run["fork_restores_default"] and cpu_run["fork_reproducible"]


@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
def test_megatron_trains_on_cpu(cpu_run, dtype):
    result = cpu_run[dtype]
    assert result["changed"] == result["total"], "every parameter must move after two Adam steps"
    assert all(n > 0 and n == n for n in result["norms"])
    assert result["losses"][1] < result["losses"][0], result["losses"]


@pytest.mark.skipif(not megatron_compat.needed(), reason="the CPU layer is inactive with an accelerator")
@pytest.mark.parametrize("in_place", [True, False])
def test_gradient_clipping_scale_is_bit_identical_to_megatrons_fallback(in_place):
    from megatron.core import utils as mcore_utils

    megatron_compat.install()
    from megatron.core.optimizer import clip_grads

    assert clip_grads.multi_tensor_scale_impl is megatron_compat._multi_tensor_scale
    g = torch.Generator().manual_seed(0)
    src = [torch.randn(s, generator=g) for s in [(576, 576), (1536, 576), (576,), (3, 7)]]
    expected = [t.clone() for t in src]
    mcore_utils.local_multi_tensor_scale(0, None, [expected, expected], 0.4412345678901)
    got = [t.clone() for t in src]
    dst = got if in_place else [torch.empty_like(t) for t in src]
    megatron_compat._multi_tensor_scale(0, None, [got, dst], 0.4412345678901)
    assert all(torch.equal(x, y) for x, y in zip(expected, dst, strict=True))
