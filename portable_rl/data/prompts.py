"""JSONL prompt source: validated file reading, chat templating, per-epoch shuffling, resumable position.

File format: one JSON object per line (blank lines are ignored). ``prompt_key`` (default ``"prompt"``)
holds either a string (sent as one user message) or a list of ``{"role", "content"}`` chat messages;
``label_key`` (default ``"label"``) holds an optional ground truth of any JSON type; every other field is
passed on as ``PromptItem.metadata`` (e.g. for the reward function).

Any problem in the file is a ``PromptFileError`` raised at construction whose one-line message names the
file and the 1-based line: missing file, empty file, bytes that are not UTF-8, a line that is not JSON or
not an object, a missing or wrongly typed prompt field.

Bounded: the file is read line by line, never whole, and a line longer than ``max_line_bytes`` (from
``line_byte_limit(max_prompt_tokens)``: more bytes than any prompt within the token limit needs) is skipped
while it is read, 1 MiB at a time, never held: a 200 MB line costs no more memory than a short one. Such lines
are listed in ``PromptFile.oversized`` (line, bytes). ``PromptSource`` with ``max_prompt_tokens`` skips a prompt
whose tokens exceed it (counted in ``skipped_too_long``; an epoch of nothing but such prompts raises) or, with
``long_prompts="refuse"``, raises ``PromptFileError`` naming the line, its length and the limit.

Order: epoch ``e`` visits every prompt once, in a permutation drawn from ``(seed, e)`` (or in file order
with ``shuffle: false``). ``next_batch(n)`` continues across epoch boundaries. ``state_dict()`` holds
``(epoch, offset)`` and a fingerprint of the file, so ``load_state_dict`` resumes exactly at the next
unseen prompt (no prompt skipped or repeated) and refuses a different file or seed.

Templating: with ``apply_chat_template: true`` (default) the tokenizer's chat template renders the
messages with the generation prompt, then the text is tokenized without adding special tokens (the
template carries them). With ``false`` the prompt must be a string and is tokenized as-is with the
tokenizer's special tokens (base models).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from portable_rl.config.data import LONG_PROMPTS, PromptConfig


class PromptFileError(ValueError):
    """The prompt file or its use is invalid; the message is one line naming the file, line and fix."""


@dataclass
class PromptItem:
    index: int  # 0-based position of the prompt among the file's prompts (blank lines not counted)
    epoch: int
    prompt_tokens: list[int]
    prompt_text: str
    label: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    # Set by the data buffer when it hands the prompt out: the id of the group generated from it.
    group_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptItem:
        return cls(**data)


@dataclass
class _Record:
    line: int
    prompt: str | list[dict[str, str]]
    label: Any
    metadata: dict[str, Any]


def _describe(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number" if isinstance(value, int | float) else type(value).__name__
    )


def _check_prompt(value: Any, where: str, key: str, chat: bool) -> str | list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise PromptFileError(f"{where}: field {key!r} is an empty string; remove the line or fill it")
        return value
    if isinstance(value, list):
        if not value:
            raise PromptFileError(f"{where}: field {key!r} is an empty message list; add a user message")
        for j, msg in enumerate(value):
            if not (
                isinstance(msg, dict)
                and isinstance(msg.get("role"), str)
                and isinstance(msg.get("content"), str)
            ):
                raise PromptFileError(
                    f"{where}: message {j} of {key!r} must be an object with string 'role' and 'content', "
                    f"got {json.dumps(msg)[:60]}"
                )
        if not chat:
            raise PromptFileError(
                f"{where}: field {key!r} is a list of chat messages but apply_chat_template is false; "
                "set apply_chat_template: true or write the prompt as a string"
            )
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise PromptFileError(
        f"{where}: field {key!r} must be a string or a list of {{role, content}} messages, got {_describe(value)}"
    )


# Bytes per allowed prompt token a line may hold (JSON escapes, chat fields, the label) before it is too large
# for any prompt within the limit; lines are never refused below LINE_BYTES_FLOOR. Unknown limit: the cap.
BYTES_PER_TOKEN = 64
LINE_BYTES_FLOOR = 1024 * 1024
LINE_BYTES_UNKNOWN = 16 * 1024 * 1024
_READ_CHUNK = 1024 * 1024


def line_byte_limit(max_prompt_tokens: int | None) -> int:
    """The largest line (bytes) a prompt of at most ``max_prompt_tokens`` tokens is read from."""
    if max_prompt_tokens is None:
        return LINE_BYTES_UNKNOWN
    return max(LINE_BYTES_FLOOR, BYTES_PER_TOKEN * max_prompt_tokens)


@dataclass
class PromptFile:
    records: list[_Record]
    fingerprint: str  # sha256 of every byte of the file (first 16 hex digits)
    oversized: list[tuple[int, int]] = field(default_factory=list)  # (line, bytes) of lines too large to read


def _lines(fh, max_line_bytes: int, digest) -> Any:
    """(line number, content or None for an oversized line, content bytes), hashing every byte read."""
    n = 0
    while True:
        chunk = fh.readline(max_line_bytes + 1)
        if not chunk:
            return
        n += 1
        digest.update(chunk)
        if len(chunk) > max_line_bytes and not chunk.endswith(b"\n"):
            size = len(chunk)
            while not chunk.endswith(b"\n"):  # drain the rest of the line without keeping it
                chunk = fh.readline(_READ_CHUNK)
                if not chunk:
                    break
                digest.update(chunk)
                size += len(chunk)
            yield n, None, size - chunk.endswith(b"\n")
        else:
            yield n, chunk[:-1] if chunk.endswith(b"\n") else chunk, len(chunk)


def read_prompt_file(
    path: str | Path,
    prompt_key: str = "prompt",
    label_key: str = "label",
    chat: bool = True,
    max_line_bytes: int = LINE_BYTES_UNKNOWN,
) -> PromptFile:
    """Parse and validate the file line by line; the records, a content fingerprint and the oversized lines."""
    p = Path(path)
    if not p.is_file():
        raise PromptFileError(f"prompt file '{p}' does not exist; pass a JSONL file with one object per line")
    records: list[_Record] = []
    oversized: list[tuple[int, int]] = []
    digest = hashlib.sha256()
    with p.open("rb") as fh:
        for n, raw, size in _lines(fh, max_line_bytes, digest):
            if raw is None:
                oversized.append((n, size))
                continue
            record = _parse_line(p, n, raw, prompt_key, label_key, chat)
            if record is not None:
                records.append(record)
    if not records and not oversized:
        raise PromptFileError(
            f"prompt file '{p}' is empty (no JSON lines); write one object per line with a {prompt_key!r} field"
        )
    return PromptFile(records, digest.hexdigest()[:16], oversized)


def _parse_line(p: Path, n: int, raw: bytes, prompt_key: str, label_key: str, chat: bool) -> _Record | None:
    """One line of the file as a record (None: a blank line)."""
    where = f"{p} line {n}"
    if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte-order mark some editors write
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PromptFileError(
            f"{where}: not UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line); "
            "re-save the file as UTF-8"
        ) from None
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PromptFileError(
            f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); write one JSON object per line"
        ) from None
    if not isinstance(obj, dict):
        raise PromptFileError(
            f'{where}: expected a JSON object like {{"{prompt_key}": "..."}}, got {_describe(obj)}'
        )
    if prompt_key not in obj:
        fields = ", ".join(repr(k) for k in obj) or "none"
        raise PromptFileError(
            f"{where}: missing field {prompt_key!r} (fields: {fields}); "
            "set prompt_key to the field that holds the prompt"
        )
    prompt = _check_prompt(obj[prompt_key], where, prompt_key, chat)
    metadata = {k: v for k, v in obj.items() if k not in (prompt_key, label_key)}
    return _Record(n, prompt, obj.get(label_key), metadata)


def tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


class PromptSource:
    """Endless, resumable stream of ``PromptItem`` over the epochs of one JSONL file."""

    def __init__(
        self,
        cfg: PromptConfig,
        tokenizer: Any,
        max_prompt_tokens: int | None = None,
        long_prompts: str = "skip",
        prompts: PromptFile | None = None,
    ) -> None:
        if long_prompts not in LONG_PROMPTS:
            raise ValueError(f"long_prompts={long_prompts!r} is not one of {', '.join(LONG_PROMPTS)}")
        if cfg.apply_chat_template and not getattr(tokenizer, "chat_template", None):
            raise PromptFileError(
                f"tokenizer {tokenizer_name(tokenizer)!r} has no chat template; use an instruct/chat "
                "tokenizer, set tokenizer.chat_template, or set apply_chat_template: false for raw prompts"
            )
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.long_prompts = long_prompts
        read = prompts or read_prompt_file(
            cfg.path,
            cfg.prompt_key,
            cfg.label_key,
            cfg.apply_chat_template,
            line_byte_limit(max_prompt_tokens),
        )
        self.records, self.fingerprint, self.oversized = read.records, read.fingerprint, read.oversized
        if not self.records:
            line, size = self.oversized[0]
            raise PromptFileError(
                f"{cfg.path} line {line} is {size} bytes and every line of the file is too large for a prompt "
                f"of data.max_prompt_tokens={max_prompt_tokens} tokens; shorten the prompts"
            )
        if self.oversized and long_prompts == "refuse":
            line, size = self.oversized[0]
            raise PromptFileError(
                f"{cfg.path} line {line} is {size} bytes, too large for a prompt of data.max_prompt_tokens="
                f"{max_prompt_tokens} tokens; shorten it or set data.long_prompts=skip"
            )
        self.skipped_too_long = 0  # prompts handed over because their tokens exceed max_prompt_tokens
        self.epoch = 0
        self.offset = 0  # prompts of the current epoch already handed out
        self._order_epoch = -1
        self._order: np.ndarray = np.arange(0)

    def __len__(self) -> int:
        return len(self.records)

    def order(self, epoch: int) -> np.ndarray:
        """Prompt indices in the order epoch ``epoch`` visits them."""
        if epoch != self._order_epoch:
            n = len(self.records)
            if self.cfg.shuffle:
                self._order = np.random.default_rng([self.cfg.seed, epoch]).permutation(n)
            else:
                self._order = np.arange(n)
            self._order_epoch = epoch
        return self._order

    def next_batch(self, n: int) -> list[PromptItem]:
        """The next ``n`` prompts (continuing into the next epoch when this one runs out)."""
        if n < 0:
            raise ValueError(f"batch size {n} must be >= 0")
        items = []
        skipped_in_a_row = 0
        while len(items) < n:
            if self.offset >= len(self.records):
                self.epoch, self.offset = self.epoch + 1, 0
            index = int(self.order(self.epoch)[self.offset])
            item = self.make_item(index, self.epoch)
            self.offset += 1
            if self.fits(item):
                items.append(item)
                skipped_in_a_row = 0
                continue
            self.skipped_too_long += 1
            skipped_in_a_row += 1
            if skipped_in_a_row >= len(self.records):  # a whole epoch without one prompt that fits
                raise PromptFileError(
                    f"every prompt of {self.cfg.path} is longer than data.max_prompt_tokens="
                    f"{self.max_prompt_tokens} tokens; shorten the prompts or raise the limit"
                )
        return items

    def fits(self, item: PromptItem) -> bool:
        """Whether ``item`` is within ``max_prompt_tokens``; with long_prompts="refuse" a long one raises."""
        limit = self.max_prompt_tokens
        if limit is None or len(item.prompt_tokens) <= limit:
            return True
        if self.long_prompts == "refuse":
            line = self.records[item.index].line
            raise PromptFileError(
                f"{self.cfg.path} line {line}: the prompt has {len(item.prompt_tokens)} tokens, more than "
                f"data.max_prompt_tokens={limit}; shorten it or set data.long_prompts=skip"
            )
        return False

    def make_item(self, index: int, epoch: int) -> PromptItem:
        rec = self.records[index]
        if self.cfg.apply_chat_template:
            messages = (
                [{"role": "user", "content": rec.prompt}] if isinstance(rec.prompt, str) else rec.prompt
            )
            from jinja2 import TemplateError  # transformers renders chat templates with jinja2

            try:
                text = self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
            except (
                TemplateError,
                ValueError,
                TypeError,
                KeyError,
            ) as exc:  # e.g. a template's raise_exception
                raise PromptFileError(
                    f"{self.cfg.path} line {rec.line}: the chat template of tokenizer "
                    f"{tokenizer_name(self.tokenizer)!r} failed: {exc}"
                ) from exc
            tokens = self.tokenizer.encode(text, add_special_tokens=False)
        else:
            text = rec.prompt
            tokens = self.tokenizer.encode(text, add_special_tokens=True)
        return PromptItem(index, epoch, list(tokens), text, rec.label, dict(rec.metadata))

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "num_prompts": len(self.records),
            "fingerprint": self.fingerprint,
            "seed": self.cfg.seed,
            "shuffle": self.cfg.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("num_prompts", "fingerprint", "seed", "shuffle"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise PromptFileError(
                    f"cannot resume prompt source: saved {key}={state.get(key)!r} but {self.cfg.path} "
                    f"gives {key}={mine!r}; resume with the original file and settings or start a new run"
                )
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset <= len(self.records):
            raise PromptFileError(
                f"cannot resume prompt source: invalid position epoch={epoch}, offset={offset}"
            )
        self.epoch, self.offset = epoch, offset
