"""A generative reward model: a second engine reads each response and answers a grade (LLM-as-judge).

Contract
--------
* ``judge_reward(response, label, sample, *, engine_url, ...)`` is an async reward function. It fills
  ``template`` with the response and the label (the reference answer), sends it to ``engine_url``'s
  ``POST /generate`` (SGLang's native API: a real SGLang server or portable_rl's CPU engine), greedy, at most
  ``max_new_tokens`` tokens, and reads the last number of the judge's text as the grade: the reward is
  ``grade / max_score`` clipped to [0, 1]. A judge text without a number scores ``no_verdict`` (0.0).
* With ``tokenizer_path`` (the judge model's directory) the prompt is rendered with that tokenizer's chat
  template (what an instruct judge expects) and sent as token ids; without it, as raw text.
* An engine that fails or answers without ``text`` raises ``JudgeError`` naming the URL; behind the reward
  server that is an HTTP 422, which the job's remote reward reports with the URL of the reward server.
* The usual deployment runs it behind ``python -m portable_rl.rollout.reward_server --reward
  portable_rl.rollout.judge:judge_reward --reward-options '{"engine_url": ...}'`` so the training job reaches
  it with ``rollout.reward: remote`` (see docs/customise-rollout.md, "Remote reward models").
"""

from __future__ import annotations

import functools
import math
from typing import Any

import aiohttp

from portable_rl.rollout.rewards import last_number

DEFAULT_TEMPLATE = (
    "You grade answers to math problems.\n"
    "Reference answer: {label}\n"
    "Answer to grade: {response}\n"
    "Does the answer reach the reference answer? Reply with one integer from 0 (wrong) to 10 (right)."
)


class JudgeError(RuntimeError):
    """The judge engine could not grade a response; one line naming the URL."""


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def judge_request(prompt: str, tokenizer_path: str | None, max_new_tokens: int) -> dict[str, Any]:
    """The ``/generate`` body that asks the judge ``prompt`` (chat-templated token ids when a tokenizer is given)."""
    body: dict[str, Any] = {"sampling_params": {"temperature": 0.0, "max_new_tokens": max_new_tokens}}
    if tokenizer_path:
        tok = _tokenizer(tokenizer_path)
        messages = [{"role": "user", "content": prompt}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        body["input_ids"] = tok.encode(
            text, add_special_tokens=False
        )  # the template holds the special tokens
    else:
        body["text"] = prompt
    return body


def grade(text: str, max_score: float, no_verdict: float) -> float:
    """The reward the judge's ``text`` gives: its last number over ``max_score``, clipped to [0, 1]."""
    found = last_number(text)
    if found is None:
        return no_verdict
    try:
        num, _, den = found.replace(",", "").partition("/")
        value = float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        return no_verdict
    if not math.isfinite(value):
        return no_verdict
    return min(1.0, max(0.0, value / max_score))


async def judge_reward(
    response: str,
    label: Any = None,
    sample: Any = None,
    *,
    engine_url: str,
    tokenizer_path: str | None = None,
    template: str = DEFAULT_TEMPLATE,
    max_new_tokens: int = 8,
    max_score: float = 10.0,
    no_verdict: float = 0.0,
    api_key: str | None = None,
    timeout_s: float = 120.0,
) -> float:
    """Grade ``response`` with the judge engine at ``engine_url`` (see the module docstring)."""
    body = judge_request(template.format(response=response, label=label), tokenizer_path, max_new_tokens)
    url = engine_url.rstrip("/") + "/generate"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            async with session.post(url, json=body, headers=headers) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise JudgeError(f"judge engine {url} answered HTTP {resp.status}: {text.strip()[:200]}")
                answer = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise JudgeError(f"judge engine {url} did not answer ({type(exc).__name__}: {exc})") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("text"), str):
        raise JudgeError(f"judge engine {url} answered without a 'text' field: {str(answer)[:200]}")
    return grade(answer["text"], max_score, no_verdict)
