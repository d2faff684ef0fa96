"""``--resume`` preflight for layout-free (format 2) checkpoints: another TP/PP/DP layout is accepted; a switch
of the optimizer kind and a checkpoint whose files are missing or cut short are refused in one line, exit 2,
with the run untouched. The checkpoint's files come from torch.distributed.checkpoint itself (one process),
which writes the same index and ``*.distcp`` layout Megatron's torch_dist backend does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

# The fixtures (work, _tripwire) are test_bad_input_cli's; pytest finds them here by name.
from test_bad_input_cli import (  # noqa: F401
    ReachedPrepare,
    _tripwire,
    assert_one_line_error,
    main,
    run_cli,
    tiny_model_facts,
    tree,
    work,
)


def format2_run(work: Path, name: str, distributed_optimizer: bool = False) -> Path:  # noqa: F811
    run = work / "runs" / name
    shutil.copytree(work / "runs" / "existing", run)
    trainer = run / "checkpoints" / "step_1" / "trainer"
    shutil.rmtree(trainer)
    from torch.distributed.checkpoint import save

    save({"w": torch.arange(64.0)}, checkpoint_id=str(trainer), no_dist=True)
    torch.save({}, trainer / "common.pt")
    layout = {
        "tensor_parallel": 1,
        "pipeline_parallel": 1,
        "data_parallel": 1,
        "distributed_optimizer": distributed_optimizer,
    }
    meta = {"format": 2, "step": 1, "layout": layout, "model": tiny_model_facts()}
    (trainer / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return run


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.parallel.tensor_parallel=2"],
        ["train.data_parallel=2"],
        ["train.parallel.pipeline_parallel=2"],
    ],
)
def test_format2_checkpoint_resumes_on_another_layout(work, overrides):  # noqa: F811
    run = format2_run(work, "reshard_" + overrides[0].split("=")[0].rsplit(".", 1)[1])
    argv = ["train", str(work / "recipe.yaml"), *overrides, "--output-dir", str(run), "--resume"]
    with pytest.raises(ReachedPrepare):
        main(argv)


def test_format2_checkpoint_refuses_another_optimizer_kind(work, capsys):  # noqa: F811
    run = format2_run(work, "reshard_distopt")
    before = tree(run)
    argv = [
        "train",
        str(work / "recipe.yaml"),
        "train.data_parallel=2",
        "train.parallel.distributed_optimizer=true",
        "--output-dir",
        str(run),
        "--resume",
    ]
    needles = ("distributed_optimizer=False", "asks for True", "resume with the saved setting")
    assert_one_line_error(*run_cli(capsys, argv), needles)
    assert tree(run) == before


def test_format2_checkpoint_cut_short_is_refused(work, capsys):  # noqa: F811
    run = format2_run(work, "reshard_cut")
    argv = ["train", str(work / "recipe.yaml"), "--output-dir", str(run), "--resume"]
    with pytest.raises(ReachedPrepare):  # control: the whole checkpoint passes
        main(argv)
    capsys.readouterr()
    shard = next((run / "checkpoints" / "step_1" / "trainer").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:16])
    before = tree(run)
    needles = (
        "checkpoint step_1 is incomplete or corrupt",
        f"{shard.name} is cut short",
        "move checkpoints/step_1",
    )
    assert_one_line_error(*run_cli(capsys, argv), needles)
    assert tree(run) == before
    (run / "checkpoints" / "step_1" / "trainer" / ".metadata").unlink()
    assert_one_line_error(*run_cli(capsys, argv), (".metadata is missing",))
