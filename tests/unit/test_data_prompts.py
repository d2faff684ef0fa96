"""JSONL prompt source: exact error messages for bad files, templating, deterministic epochs, exact resume."""

from __future__ import annotations

import json

import pytest

from portable_rl.data.prompts import PromptConfig, PromptFileError, PromptSource


@pytest.fixture(scope="module")
def tokenizer():
    from portable_rl.models.tiny import train_tokenizer

    return train_tokenizer(512)


def _write(tmp_path, content: str | bytes, name: str = "p.jsonl"):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _source(path, tokenizer, **kw):
    return PromptSource(PromptConfig(path=str(path), **kw), tokenizer)


def _lines(n: int) -> str:
    return "".join(json.dumps({"prompt": f"What is {i} + 1?", "label": str(i + 1)}) + "\n" for i in range(n))


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "prompt file '{p}' is empty (no JSON lines); write one object per line with a 'prompt' field"),
        (
            b"\n  \n",
            "prompt file '{p}' is empty (no JSON lines); write one object per line with a 'prompt' field",
        ),
        (
            b'{"prompt": "a"}\n{"prompt": "b",}\n',
            "{p} line 2: not valid JSON (Expecting property name enclosed in double quotes at column 16); "
            "write one JSON object per line",
        ),
        (
            b'{"prompt": "a"}\n\n{"question": "b", "answer": 3}\n',
            "{p} line 3: missing field 'prompt' (fields: 'question', 'answer'); "
            "set prompt_key to the field that holds the prompt",
        ),
        (
            b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n',
            "{p} line 2: not UTF-8 (byte 0xe9 at byte 16 of the line); re-save the file as UTF-8",
        ),
        (
            b'{"prompt": 42}\n',
            "{p} line 1: field 'prompt' must be a string or a list of {{role, content}} messages, got number",
        ),
        (b'["prompt", "x"]\n', '{p} line 1: expected a JSON object like {{"prompt": "..."}}, got list'),
        (
            b'{"prompt": [{"role": "user"}]}\n',
            "{p} line 1: message 0 of 'prompt' must be an object with string 'role' and 'content', "
            'got {{"role": "user"}}',
        ),
        (b'{"prompt": "  "}\n', "{p} line 1: field 'prompt' is an empty string; remove the line or fill it"),
    ],
)
def test_bad_files_give_one_exact_line(tmp_path, tokenizer, content, message):
    path = _write(tmp_path, content)
    with pytest.raises(PromptFileError) as info:
        _source(path, tokenizer)
    assert str(info.value) == message.format(p=path)


def test_missing_file_and_chat_list_without_template(tmp_path, tokenizer):
    with pytest.raises(PromptFileError) as info:
        _source(tmp_path / "nope.jsonl", tokenizer)
    assert str(info.value) == (
        f"prompt file '{tmp_path / 'nope.jsonl'}' does not exist; pass a JSONL file with one object per line"
    )
    path = _write(tmp_path, '{"prompt": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(PromptFileError, match="line 1: field 'prompt' is a list of chat messages but "):
        _source(path, tokenizer, apply_chat_template=False)


def test_tokenizer_without_chat_template(tmp_path):
    class BaseTokenizer:  # stand-in for a base model's tokenizer
        name_or_path = "org/base-model"
        chat_template = None

    path = _write(tmp_path, _lines(2))
    with pytest.raises(PromptFileError) as info:
        _source(path, BaseTokenizer())
    assert str(info.value) == (
        "tokenizer 'org/base-model' has no chat template; use an instruct/chat tokenizer, set "
        "tokenizer.chat_template, or set apply_chat_template: false for raw prompts"
    )


def test_custom_keys_messages_label_and_metadata(tmp_path, tokenizer):
    rows = [
        {"q": "What is 2 + 3?", "answer": "5", "source": "unit"},
        {"q": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1 + 1?"}]},
    ]
    path = _write(tmp_path, "\n".join(json.dumps(r) for r in rows))
    src = _source(path, tokenizer, prompt_key="q", label_key="answer", shuffle=False)
    a, b = src.next_batch(2)
    assert a.prompt_text == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    assert a.prompt_tokens == tokenizer.encode(a.prompt_text, add_special_tokens=False)
    assert (a.label, a.metadata, a.index, a.epoch) == ("5", {"source": "unit"}, 0, 0)
    assert b.prompt_text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1 + 1?")
    assert b.label is None
    with pytest.raises(PromptFileError, match="line 2: field 'q' is a list of chat messages"):
        _source(path, tokenizer, prompt_key="q", label_key="answer", apply_chat_template=False)


def test_raw_text_mode(tmp_path, tokenizer):
    path = _write(tmp_path, _lines(3))
    src = _source(path, tokenizer, apply_chat_template=False, shuffle=False)
    item = src.next_batch(1)[0]
    assert item.prompt_text == "What is 0 + 1?"
    assert item.prompt_tokens == tokenizer.encode("What is 0 + 1?", add_special_tokens=True)


def test_epochs_are_permutations_deterministic_per_seed(tmp_path, tokenizer):
    path = _write(tmp_path, _lines(7))
    src = _source(path, tokenizer, seed=3)
    first = [i.index for i in src.next_batch(7)]
    second = [i.index for i in src.next_batch(7)]
    assert sorted(first) == list(range(7)) and sorted(second) == list(range(7))
    assert first != second  # each epoch draws its own permutation
    again = _source(path, tokenizer, seed=3)
    assert [i.index for i in again.next_batch(14)] == first + second
    other = _source(path, tokenizer, seed=4)
    assert [i.index for i in other.next_batch(7)] != first
    assert [i.index for i in _source(path, tokenizer, shuffle=False).next_batch(9)] == [
        0,
        1,
        2,
        3,
        4,
        5,
        6,
        0,
        1,
    ]


def test_resume_neither_skips_nor_repeats_across_epochs(tmp_path, tokenizer):
    path = _write(tmp_path, _lines(5))
    reference = [(i.epoch, i.index) for i in _source(path, tokenizer, seed=1).next_batch(17)]
    src = _source(path, tokenizer, seed=1)
    seen = [(i.epoch, i.index) for i in src.next_batch(3)]
    for n in (4, 1, 6, 3):  # checkpoints mid-epoch and exactly at the epoch boundary
        state = json.loads(json.dumps(src.state_dict()))
        src = _source(path, tokenizer, seed=1)
        src.load_state_dict(state)
        seen += [(i.epoch, i.index) for i in src.next_batch(n)]
    assert seen == reference
    for epoch in range(3):
        assert sorted(idx for e, idx in seen if e == epoch) == list(range(5))


def test_resume_refuses_other_file_or_seed(tmp_path, tokenizer):
    path = _write(tmp_path, _lines(5))
    state = _source(path, tokenizer, seed=1).state_dict()
    with pytest.raises(PromptFileError, match=r"saved seed=1 but .* gives seed=2; resume with the original"):
        _source(path, tokenizer, seed=2).load_state_dict(state)
    other = _write(tmp_path, _lines(6), name="q.jsonl")
    with pytest.raises(PromptFileError, match="saved num_prompts=5 but .* gives num_prompts=6"):
        _source(other, tokenizer, seed=1).load_state_dict(state)


def test_config_validation():
    with pytest.raises(ValueError, match="data.prompt_key='' must be a non-empty field name"):
        PromptConfig(prompt_key="")
    with pytest.raises(ValueError, match="data.prompt_key and data.label_key are both 'x'"):
        PromptConfig(prompt_key="x", label_key="x")
    with pytest.raises(ValueError, match="data.seed=-1 must be an integer >= 0"):
        PromptConfig(seed=-1)


def test_chat_template_failure_names_file_line_and_tokenizer(tmp_path):
    from portable_rl.models.tiny import train_tokenizer

    strict = train_tokenizer(512)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    rows = [{"prompt": "ok"}, {"prompt": [{"role": "system", "content": "x"}]}]
    path = _write(tmp_path, "\n".join(json.dumps(r) for r in rows))
    src = _source(path, strict, shuffle=False)
    assert src.next_batch(1)[0].prompt_text == "ok"
    with pytest.raises(
        PromptFileError, match=r"p.jsonl line 2: the chat template of tokenizer .* failed: no system role"
    ):
        src.next_batch(1)
