"""Bounded prompts: streaming file reading with a per-line byte cap, token limits skipped or refused.

A 200 MB line is read in a child process whose peak RSS is measured: it must stay far below the line's size.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from portable_rl.config.data import PromptConfig
from portable_rl.data.prompts import (
    LINE_BYTES_FLOOR,
    PromptFileError,
    PromptSource,
    line_byte_limit,
    read_prompt_file,
)

BIG = 200 * 1024 * 1024


@pytest.fixture(scope="module")
def tokenizer():
    from portable_rl.models.tiny import train_tokenizer

    return train_tokenizer(512)


def _write(path, prompts: list[str]):
    path.write_text(
        "".join(json.dumps({"prompt": p, "label": "x"}) + "\n" for p in prompts), encoding="utf-8"
    )
    return path


def test_line_limit_grows_with_the_token_limit():
    assert line_byte_limit(504) == LINE_BYTES_FLOOR
    assert line_byte_limit(1_000_000) == 64 * 1_000_000
    assert line_byte_limit(None) > LINE_BYTES_FLOOR


def test_a_200_mb_line_is_skipped_in_bounded_memory(tmp_path):
    path = tmp_path / "big.jsonl"
    digest = hashlib.sha256()
    with path.open("wb") as fh:
        for part in (json.dumps({"prompt": "1 + 1?"}).encode() + b"\n", b'{"prompt": "'):
            fh.write(part)
            digest.update(part)
        block = b"x" * (1024 * 1024)
        for _ in range(BIG // len(block)):
            fh.write(block)
            digest.update(block)
        tail = b'"}\n' + json.dumps({"prompt": "2 + 2?"}).encode() + b"\n"
        fh.write(tail)
        digest.update(tail)
    code = (
        "import json, resource, sys\n"
        "from portable_rl.data.prompts import read_prompt_file, line_byte_limit\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "f = read_prompt_file(sys.argv[1], max_line_bytes=line_byte_limit(504))\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'prompts': [r.prompt for r in f.records], 'oversized': f.oversized,"
        " 'fingerprint': f.fingerprint, 'grew_kib': peak - before}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300, check=True
    )
    found = json.loads(proc.stdout)
    assert found["prompts"] == ["1 + 1?", "2 + 2?"]
    assert found["oversized"] == [[2, len(b'{"prompt": "') + BIG + 2]]
    assert found["fingerprint"] == digest.hexdigest()[:16]  # the whole file, as resume compares it
    assert found["grew_kib"] < 32 * 1024, f"reading grew the process by {found['grew_kib']} KiB"


def test_fingerprint_is_that_of_the_whole_file(tmp_path):
    """Checkpoints of earlier versions hold sha256(file) as the fingerprint: streaming keeps it."""
    path = _write(tmp_path / "p.jsonl", ["a", "b"])
    assert read_prompt_file(path).fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def test_long_prompts_are_skipped_and_counted(tmp_path, tokenizer):
    path = _write(tmp_path / "p.jsonl", ["1 + 1?", "word " * 200, "2 + 2?", "word " * 300])
    src = PromptSource(PromptConfig(path=str(path), shuffle=False), tokenizer, max_prompt_tokens=40)
    texts = [item.prompt_text for item in src.next_batch(4)]
    assert all("word" not in t for t in texts) and len(texts) == 4
    assert all(len(item.prompt_tokens) <= 40 for item in src.next_batch(2))
    # File order 0 1 2 3, lines 1 and 3 too long: batch one draws 0 1 2 3 | 0 1 2 (3 skips), batch two 3 | 0 1 2.
    assert src.skipped_too_long == 5
    assert (src.epoch, src.offset) == (2, 3)


def test_long_prompts_refused_name_the_line_and_both_numbers(tmp_path, tokenizer):
    path = _write(tmp_path / "p.jsonl", ["1 + 1?", "word " * 200])
    src = PromptSource(
        PromptConfig(path=str(path), shuffle=False), tokenizer, max_prompt_tokens=40, long_prompts="refuse"
    )
    assert len(src.next_batch(1)) == 1
    with pytest.raises(PromptFileError, match=r"p.jsonl line 2: the prompt has \d+ tokens, more than data"):
        src.next_batch(1)


def test_a_file_of_only_long_prompts_is_one_error_not_a_hang(tmp_path, tokenizer):
    path = _write(tmp_path / "p.jsonl", ["word " * 200, "word " * 300])
    src = PromptSource(PromptConfig(path=str(path)), tokenizer, max_prompt_tokens=40)
    with pytest.raises(PromptFileError, match="every prompt of .* is longer than data.max_prompt_tokens=40"):
        src.next_batch(1)


def test_oversized_lines_skip_or_refuse(tmp_path, tokenizer):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "1 + 1?"}\n{"prompt": "' + b"y" * (2 * LINE_BYTES_FLOOR) + b'"}\n')
    cfg = PromptConfig(path=str(path))
    src = PromptSource(cfg, tokenizer, max_prompt_tokens=40)
    assert len(src) == 1 and src.oversized == [(2, 2 * LINE_BYTES_FLOOR + 14)]
    with pytest.raises(PromptFileError, match="line 2 is .* bytes, too large .* data.long_prompts=skip"):
        PromptSource(cfg, tokenizer, max_prompt_tokens=40, long_prompts="refuse")
