"""Arithmetic word problems (small sums and differences) for the demo recipe, deterministic from a seed.

``generate_problems(n, seed)`` returns ``n`` dicts ``{"prompt": str, "label": str, "a", "b", "op"}``, e.g.
"Tom has 3 apples and gets 4 more. How many apples does Tom have now? Put the final answer in
\\boxed{}." with label "7". The same arguments always give the same problems (Python's ``random.Random``
seeded with ``seed``). ``write_jsonl(path, ...)`` writes them one object per line, the format
``portable_rl.data.prompts`` reads. Differences never go below zero.

Command line: ``python -m portable_rl.data.arithmetic OUT.jsonl --n 512 --seed 0 --max-operand 9``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

DEFAULT_INSTRUCTION = "Put the final answer in \\boxed{}."
NAMES = ("Tom", "Anna", "Ben", "Mia", "Sam", "Lily", "Omar", "Zoe", "Ravi", "Elena")
ITEMS = (
    ("apple", "apples"),
    ("pencil", "pencils"),
    ("marble", "marbles"),
    ("book", "books"),
    ("cookie", "cookies"),
    ("sticker", "stickers"),
    ("shell", "shells"),
    ("card", "cards"),
)
ADD_TEMPLATES = (
    "{name} has {a} and gets {b_more} more. How many {items} does {name} have now?",
    "{name} picks {a} in the morning and {b} in the afternoon. How many {items} did {name} pick in total?",
    "There are {a} in a box. {name} puts in {b} more. How many {items} are in the box now?",
)
SUB_TEMPLATES = (
    "{name} has {a} and gives {b} to a friend. How many {items} does {name} have left?",
    "There are {a} on a table. {name} takes away {b}. How many {items} are on the table now?",
)
OPERATIONS = ("add", "sub")


def _count(n: int, item: tuple[str, str]) -> str:
    return f"{n} {item[0] if n == 1 else item[1]}"


def make_problem(
    rng: random.Random, min_operand: int, max_operand: int, ops: tuple[str, ...], instruction: str
):
    op = rng.choice(ops)
    a, b = rng.randint(min_operand, max_operand), rng.randint(min_operand, max_operand)
    if op == "sub" and b > a:
        a, b = b, a
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    template = rng.choice(ADD_TEMPLATES if op == "add" else SUB_TEMPLATES)
    question = template.format(name=name, a=_count(a, item), b=_count(b, item), b_more=b, items=item[1])
    answer = a + b if op == "add" else a - b
    prompt = f"{question} {instruction}".strip()
    return {"prompt": prompt, "label": str(answer), "a": a, "b": b, "op": op}


def generate_problems(
    n: int,
    seed: int = 0,
    min_operand: int = 1,
    max_operand: int = 9,
    ops: tuple[str, ...] = ("add",),
    instruction: str = DEFAULT_INSTRUCTION,
) -> list[dict[str, Any]]:
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    if not 0 <= min_operand <= max_operand:
        raise ValueError(f"operand range [{min_operand}, {max_operand}] must satisfy 0 <= min <= max")
    bad = [op for op in ops if op not in OPERATIONS]
    if bad or not ops:
        raise ValueError(f"ops={list(ops)!r} must be a non-empty subset of {', '.join(OPERATIONS)}")
    rng = random.Random(seed)
    return [make_problem(rng, min_operand, max_operand, tuple(ops), instruction) for _ in range(n)]


def write_jsonl(path: str | Path, n: int, seed: int = 0, **kwargs: Any) -> Path:
    """Write ``generate_problems(n, seed, **kwargs)`` to ``path`` as JSONL; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(p, ensure_ascii=False) for p in generate_problems(n, seed, **kwargs)]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write arithmetic word problems as JSONL (prompt + label).")
    parser.add_argument("out", help="output .jsonl path")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-operand", type=int, default=1)
    parser.add_argument("--max-operand", type=int, default=9)
    parser.add_argument("--ops", default="add", help="comma-separated: add,sub")
    parser.add_argument("--instruction", default=DEFAULT_INSTRUCTION)
    args = parser.parse_args(argv)
    try:
        path = write_jsonl(
            args.out,
            args.n,
            args.seed,
            min_operand=args.min_operand,
            max_operand=args.max_operand,
            ops=tuple(s.strip() for s in args.ops.split(",") if s.strip()),
            instruction=args.instruction,
        )
    except ValueError as exc:
        parser.exit(2, f"arithmetic: error: {exc}\n")
    print(f"wrote {args.n} problems to {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
