"""Is a Hugging Face checkpoint directory readable and complete? Checked from file headers only, in milliseconds.

``check_hf_dir(path)`` returns the parsed ``config.json`` or raises ``ModelDirError`` (one line naming the file
and the fix) when:

* ``config.json`` is missing, unreadable or not a JSON object;
* no tokenizer is there (``tokenizer.json``, or ``tokenizer_config.json`` with a vocabulary file);
* no weights are there (``model.safetensors`` or ``model.safetensors.index.json``), or an index names a shard
  that is missing or a tensor that its shard does not hold;
* a safetensors file is cut short or padded: its size differs from ``8 + header length + the end of the last
  tensor's data`` that its own header declares, or the header is not valid JSON.

Only the 8-byte length and the JSON header of every shard are read, never the tensor data, so a 100 GB model is
checked as fast as a tiny one. ``*.bin`` (pickle) weights are not accepted: the trainer and engines read
safetensors.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

# A safetensors header larger than this is not a header (the format's own limit is 100 MB).
_MAX_HEADER = 100 * 1024 * 1024
_TOKENIZER_VOCABS = ("vocab.json", "tokenizer.model", "spiece.model", "vocab.txt")


class ModelDirError(ValueError):
    """The model directory is not a complete, readable HF checkpoint; one line naming the file and the fix."""


def _fail(path: Path, problem: str, fix: str = "copy the model directory again") -> ModelDirError:
    return ModelDirError(f"model.path={str(path)!r}: {problem}; {fix}")


def read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise _fail(path, "no config.json", "point model.path at a HF checkpoint directory")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"config.json cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(cfg, dict):
        raise _fail(path, "config.json is not a JSON object")
    return cfg


def safetensors_tensors(file: Path, model_dir: Path) -> set[str]:
    """The tensor names of one safetensors file, after checking that its size matches its header."""
    try:
        size = file.stat().st_size
        with file.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise _fail(model_dir, f"{file.name} has {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise _fail(model_dir, f"{file.name} is truncated or not safetensors (header of {n} bytes)")
            header = json.loads(fh.read(n).decode("utf-8"))
    except OSError as exc:
        raise _fail(model_dir, f"{file.name} cannot be read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _fail(model_dir, f"{file.name} has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise _fail(model_dir, f"{file.name} has a corrupt safetensors header")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise _fail(model_dir, f"{file.name} has a corrupt safetensors header (bad data_offsets)") from None
    expected = 8 + n + end
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise _fail(model_dir, f"{file.name} is {what}: {size} bytes on disk, its header declares {expected}")
    return set(tensors)


def check_weights(path: Path) -> None:
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards: dict[str, list[str]] = {}
            for tensor, shard in weight_map.items():
                shards.setdefault(str(shard), []).append(str(tensor))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise _fail(path, f"{index.name} is not a safetensors index (no weight_map)") from None
        for shard, names in sorted(shards.items()):
            file = path / shard
            if not file.is_file():
                raise _fail(path, f"{index.name} names shard {shard!r}, which is missing")
            missing = set(names) - safetensors_tensors(file, path)
            if missing:
                raise _fail(
                    path, f"shard {shard!r} lacks tensor {sorted(missing)[0]!r} that {index.name} lists"
                )
        return
    if single.is_file():
        safetensors_tensors(single, path)
        return
    raise _fail(
        path,
        "no model.safetensors or model.safetensors.index.json",
        "save the model with safetensors (save_pretrained(..., safe_serialization=True))",
    )


def check_tokenizer(path: Path) -> None:
    if (path / "tokenizer.json").is_file():
        return
    if (path / "tokenizer_config.json").is_file() and any((path / v).is_file() for v in _TOKENIZER_VOCABS):
        return
    raise _fail(
        path,
        "no tokenizer (tokenizer.json, or tokenizer_config.json with a vocabulary file)",
        "add the tokenizer files to the directory (tokenizer.save_pretrained)",
    )


def check_hf_dir(path: str | Path) -> dict[str, Any]:
    """The directory's ``config.json`` as a dict, after checking config, tokenizer and weights are complete."""
    p = Path(path)
    cfg = read_config(p)
    check_tokenizer(p)
    check_weights(p)
    return cfg
