"""Data buffer: finished groups flow to the trainer, aborted/unfinished prompts return to the front,
and a saved/restored buffer neither loses nor repeats a prompt."""

from __future__ import annotations

import json
import random

import pytest

from portable_rl.data.buffer import DataBuffer
from portable_rl.data.prompts import PromptConfig, PromptSource
from portable_rl.data.types import Group, Sample, SampleStatus


@pytest.fixture(scope="module")
def tokenizer():
    from portable_rl.models.tiny import train_tokenizer

    return train_tokenizer(512)


@pytest.fixture
def make_buffer(tmp_path, tokenizer):
    path = tmp_path / "p.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"{i} + 1 = ?", "label": str(i + 1)}) + "\n" for i in range(6))
    )

    def make(shuffle: bool = False) -> DataBuffer:
        return DataBuffer(PromptSource(PromptConfig(path=str(path), shuffle=shuffle, seed=5), tokenizer))

    return make


def _group(item, gid: int, statuses=(SampleStatus.COMPLETED, SampleStatus.TRUNCATED)) -> Group:
    samples = [
        Sample(
            item.index, gid, item.prompt_tokens, [7, 8], [-0.5, -0.25], reward=1.0, status=s, label=item.label
        )
        for s in statuses
    ]
    return Group(gid, item.index, samples)


def test_finished_groups_are_popped_in_order(make_buffer):
    buf = make_buffer()
    items = buf.get_prompts(3)
    assert [i.index for i in items] == [0, 1, 2] and buf.num_in_flight == 3
    assert buf.add_groups([_group(items[1], 11), _group(items[0], 10)]) == []
    assert buf.num_ready == 2 and buf.num_in_flight == 1
    popped = buf.pop_groups(5)
    assert [g.group_id for g in popped] == [11, 10]
    assert buf.pop_groups(1) == []


def test_aborted_group_returns_its_prompt_to_the_front(make_buffer):
    buf = make_buffer()
    items = buf.get_prompts(3)
    requeued = buf.add_groups(
        [
            _group(items[0], 0),
            _group(items[1], 1, (SampleStatus.COMPLETED, SampleStatus.ABORTED)),
            Group(2, items[2].index, []),  # no sample came back at all
        ]
    )
    assert [i.index for i in requeued] == [1, 2]
    assert buf.num_ready == 1 and buf.num_pending == 2 and buf.num_in_flight == 0
    nxt = buf.get_prompts(3)
    assert [(i.index, i.epoch) for i in nxt] == [(1, 0), (2, 0), (3, 0)]
    assert nxt[0] is items[1]  # the very same prompt (tokens, label), not a re-read


def test_return_prompts_and_requeue_in_flight_keep_order(make_buffer):
    buf = make_buffer()
    items = buf.get_prompts(4)
    buf.return_prompts([items[2], items[3]])  # engine died with these
    assert buf.num_in_flight == 2
    assert buf.requeue_in_flight() == [items[0], items[1]]  # all engines restarted
    assert [i.index for i in buf.get_prompts(5)] == [0, 1, 2, 3, 4]


def test_discard_and_unknown_groups(make_buffer):
    buf = make_buffer()
    items = buf.get_prompts(2)
    buf.discard_groups([_group(items[0], 0)])  # filtered by dynamic sampling: consumed, not trained
    assert buf.num_in_flight == 1 and buf.num_ready == 0 and buf.num_pending == 0
    with pytest.raises(ValueError) as info:
        buf.add_groups([_group(items[0], 9)])
    assert str(info.value) == (
        "group 9 has prompt_index 0, which this buffer did not hand out (or was already returned); "
        "pass items obtained from get_prompts"
    )


def test_same_prompt_in_flight_twice_across_epoch_boundary(make_buffer):
    buf = make_buffer()
    items = buf.get_prompts(8)  # 6 prompts: indices 0, 1 are handed out in epochs 0 and 1
    assert [(i.index, i.epoch) for i in items[-2:]] == [(0, 1), (1, 1)]
    buf.add_groups([_group(items[6], 6, (SampleStatus.ABORTED,))])  # prompt 0 aborted once
    assert buf.num_in_flight == 7 and buf.num_pending == 1
    # FIFO: the earliest hand-out of index 0 is released; what remains in flight for 0 is the later one
    assert [i.epoch for i in buf.requeue_in_flight() if i.index == 0] == [1]


def test_state_round_trip_restores_ready_and_requeues_in_flight(make_buffer):
    buf = make_buffer(shuffle=True)
    items = buf.get_prompts(4)
    buf.add_groups([_group(items[0], 0), _group(items[1], 1, (SampleStatus.ABORTED,))])
    state = json.loads(json.dumps(buf.state_dict()))
    fresh = make_buffer(shuffle=True)
    fresh.load_state_dict(state)
    assert fresh.num_ready == 1 and fresh.num_in_flight == 0 and fresh.num_pending == 3
    group = fresh.pop_groups(1)[0]
    assert group.samples[0].status is SampleStatus.COMPLETED
    assert group.samples[0].rollout_logprobs == [-0.5, -0.25] and group.samples[0].label == items[0].label
    # in-flight prompts (2, 3) come first, then the aborted one (1), then the source continues
    assert [i.index for i in fresh.get_prompts(4)] == [items[2].index, items[3].index, items[1].index] + [
        buf.source.order(0)[4]
    ]


def test_crashes_and_aborts_never_lose_or_repeat_a_prompt(make_buffer):
    rng = random.Random(0)
    buf = make_buffer(shuffle=True)
    trained: list[tuple[int, int]] = []  # (epoch, prompt index) of every group the trainer consumed

    def finish(item, status=SampleStatus.COMPLETED):
        group = _group(item, 0, (status,))
        group.samples[0].metadata["epoch"] = item.epoch
        return group

    def train(n):
        trained.extend((g.samples[0].metadata["epoch"], g.prompt_index) for g in buf.pop_groups(n))

    for _step in range(40):
        items = buf.get_prompts(rng.randint(1, 4))
        statuses = [SampleStatus.ABORTED if rng.random() < 0.25 else SampleStatus.COMPLETED for _ in items]
        arrived = [rng.random() < 0.7 for _ in items]  # the rest is still generating
        buf.add_groups(finish(i, s) for i, s, a in zip(items, statuses, arrived, strict=True) if a)
        train(rng.randint(0, 3))
        if rng.random() < 0.3:  # crash; restore from the state saved at this moment
            state = json.loads(json.dumps(buf.state_dict()))
            buf = make_buffer(shuffle=True)
            buf.load_state_dict(state)
        else:  # the engine running the unfinished ones died
            buf.return_prompts(i for i, a in zip(items, arrived, strict=True) if not a)
    # drain: regenerate everything outstanding, then finish the current epoch
    while buf.num_pending or buf.num_in_flight:
        buf.requeue_in_flight()
        buf.add_groups(finish(i) for i in buf.get_prompts(buf.num_pending))
    buf.add_groups(finish(i) for i in buf.get_prompts(6 - buf.source.offset))
    train(10**6)
    last_epoch = buf.source.epoch
    assert last_epoch >= 2
    assert sorted(trained) == [(e, i) for e in range(last_epoch + 1) for i in range(6)]


def test_every_hand_out_gets_a_group_id_unique_for_the_run_and_across_a_restore(make_buffer):
    buf = make_buffer()
    first = buf.get_prompts(3)
    assert [p.group_id for p in first] == [0, 1, 2]
    buf.add_groups([_group(first[0], first[0].group_id, (SampleStatus.ABORTED,))])  # generated again later
    buf.add_groups([_group(p, p.group_id) for p in first[1:]])
    again = buf.get_prompts(2)
    assert again[0].index == first[0].index and [p.group_id for p in again] == [3, 4]  # a new id for a retry

    state = json.loads(json.dumps(buf.state_dict()))
    restored = make_buffer()
    restored.load_state_dict(state)
    assert [p.group_id for p in restored.get_prompts(2)] == [5, 6]  # the in-flight ones, regenerated
    # A checkpoint written before ids were numbered here: continue above the ready groups' ids.
    del state["next_group_id"]
    old = make_buffer()
    old.load_state_dict(state)
    assert max(g.group_id for g in old.pop_groups(10)) == 2
    assert old.get_prompts(1)[0].group_id == 3
