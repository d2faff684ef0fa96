"""A multi-turn tool-calling rollout: the model calls a calculator, sees its result, and goes on.

Use it with ``rollout.generate: portable_rl.rollout.examples.tool_calling:calculator_agent``,
``rollout.max_turns`` and (optionally) ``rollout.generate_options`` (the keyword arguments below); score it with
``rollout.reward: portable_rl.rollout.examples.tool_calling:calculator_reward``. Recipe:
``examples/tiny_multiturn_cpu.yaml``.

Episode (``calculator_agent``)
------------------------------
1. The model writes one assistant turn (at most ``max_new_tokens`` tokens; the turn also stops at
   ``call_close``, passed to the engine as a stop string).
2. The turn is parsed for a tool call: the text after the last ``call_open`` (up to ``call_close``). An empty
   ``call_open`` makes the whole turn the call; an empty ``call_close`` lets it run to the turn's end. No call,
   or ``max_turns`` turns taken: the episode ends, and the last turn is the answer.
3. The calculator (``examples.calculator``, no ``eval``, no file or network access) evaluates the call. A call
   it cannot evaluate is not fatal: the observation is ``error: <why>``, as agent frameworks report a failing
   tool to the model, and the episode goes on.
4. The observation is appended as the model's chat template renders it: the assistant turn closed (its end
   token, if the model did not write it, and what the template puts after it), a message of role
   ``observation_role`` holding the result, and the next assistant header. These tokens get loss mask 0 (the
   model did not sample them; no loss, KL or entropy is computed on them); the model's own tokens mask 1.
5. Back to 1 with the whole conversation so far as the prompt.

``metadata`` of each sample: ``turns``, ``tool_calls``, ``tool_errors``, ``final_text`` (the last turn's text).

``max_response_tokens`` (default: no limit) bounds the whole response, observations included: a turn gets at
most what is left of it, and the episode ends ("length") when nothing is; set it so that the prompt plus the
response stay inside the model's context (an engine refuses a request beyond it).

Partial rollouts: a sample cut mid-turn continues that turn; one cut right after an observation starts the next
turn. The turn count is rebuilt from the transcript (each run of model tokens is one turn).
"""

from __future__ import annotations

from typing import Any

from portable_rl.rollout.examples.calculator import CalculatorError, calculate
from portable_rl.rollout.generate_hook import HookEngine, HookOutput, HookSample, Transcript
from portable_rl.rollout.rewards import last_number

_MARK_USER, _MARK_MODEL = "\x00U\x00", "\x00A\x00"


def _template_parts(tokenizer: Any, role: str, observation: str) -> tuple[str, str]:
    """(closer, block): what the chat template puts after an assistant message's content, and what it renders
    for a ``role`` message holding ``observation`` followed by the next assistant header."""
    convo = [{"role": "user", "content": _MARK_USER}, {"role": "assistant", "content": _MARK_MODEL}]
    base = tokenizer.apply_chat_template(convo, tokenize=False)
    full = tokenizer.apply_chat_template(
        [*convo, {"role": role, "content": observation}], tokenize=False, add_generation_prompt=True
    )
    if not full.startswith(base):
        raise ValueError(
            f"the chat template renders an assistant turn differently once a {role!r} message follows; "
            "set generate_options.observation_role to a role it supports (e.g. 'user')"
        )
    return base[base.rindex(_MARK_MODEL) + len(_MARK_MODEL) :], full[len(base) :]


def observation_tokens(tokenizer: Any, observation: str, role: str, ended_with_eos: bool) -> list[int]:
    """Token ids that close the model's turn and insert ``observation`` the way the chat template does."""
    closer, block = _template_parts(tokenizer, role, observation)
    eos = tokenizer.eos_token or ""
    if ended_with_eos and eos and closer.startswith(eos):
        closer = closer[len(eos) :]  # the model wrote its end token itself
    return tokenizer.encode(closer + block, add_special_tokens=False)


def parse_call(text: str, call_open: str, call_close: str) -> str | None:
    """The tool call in one assistant turn's ``text``, or None (see the module docstring)."""
    if call_open:
        at = text.rfind(call_open)
        if at < 0:
            return None
        text = text[at + len(call_open) :]
    if call_close:
        end = text.find(call_close)
        if end < 0:
            return None
        text = text[:end]
    return text


def run_tool(call: str) -> tuple[str, bool]:
    """(observation, ok): the calculator's result, or the error text when it cannot evaluate ``call``."""
    try:
        return calculate(call), True
    except CalculatorError as exc:
        return f"error: {exc}", False


def _turns_so_far(done: Transcript) -> tuple[int, list[int]]:
    """(turns started, tokens of the unfinished turn) of a partial transcript."""
    turns, current = 0, []
    for i, m in enumerate(done.loss_mask):
        if m and (i == 0 or not done.loss_mask[i - 1]):
            turns += 1
            current = []
        if m:
            current.append(done.tokens[i])
    if done.loss_mask and not done.loss_mask[-1]:
        current = []  # cut after an observation: the next turn starts fresh
    return turns, current


async def calculator_agent(
    sample: HookSample,
    sampling_params: dict[str, Any],
    engine: HookEngine,
    *,
    call_open: str = "<calc>",
    call_close: str = "</calc>",
    observation_role: str = "tool",
    max_observation_chars: int = 200,
    max_response_tokens: int | None = None,
) -> HookOutput:
    """The generate hook of the module docstring."""
    tok = engine.tokenizer
    done = sample.partial.copy() if sample.partial is not None else Transcript()
    turns, current = _turns_so_far(done)
    resuming = bool(current)
    stats = {"tool_calls": 0, "tool_errors": 0}
    budget = int(sampling_params["max_new_tokens"])
    params = dict(sampling_params)
    if call_close:
        params["stop"] = [*params.get("stop", []), call_close]
    eos_ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    text = ""
    while True:
        if max_response_tokens is not None and len(done.tokens) >= max_response_tokens:
            return done.output("length", {**stats, "turns": turns, "final_text": text})
        if not resuming:
            turns += 1
            current = []
        resuming = False
        params["max_new_tokens"] = budget - len(current)
        if max_response_tokens is not None:  # the whole episode's budget (keeps it inside the context)
            params["max_new_tokens"] = min(params["max_new_tokens"], max_response_tokens - len(done.tokens))
        finish = "length"
        if params["max_new_tokens"] > 0:
            out = await engine.generate(sample.prompt_tokens + done.tokens, params)
            done.add_model(out)
            current += out.output_ids
            finish = out.finish_reason
            if finish == "abort":
                return done.output("abort", {**stats, "turns": turns})
        text = tok.decode(current, skip_special_tokens=True)
        call = parse_call(text, call_open, call_close)
        if call is None or turns >= sample.max_turns:
            return done.output(finish, {**stats, "turns": turns, "final_text": text})
        observation, ok = run_tool(call)
        stats["tool_calls"] += 1
        stats["tool_errors"] += 0 if ok else 1
        ended_with_eos = bool(current) and current[-1] in eos_ids
        done.add_env(
            observation_tokens(tok, observation[:max_observation_chars], observation_role, ended_with_eos)
        )


def calculator_reward(
    response: str,
    label: Any,
    sample: Any,
    *,
    correct: float = 1.0,
    tool_bonus: float = 0.0,
    even_token_weight: float = 0.0,
) -> float:
    """``correct`` if the last number of the final turn equals the label, plus ``tool_bonus`` if a tool call
    succeeded, plus ``even_token_weight`` x the share of even ids among the model's own tokens (mask 1): a
    rule a random-init model can learn, so tiny test runs see a reward curve move."""
    meta = getattr(sample, "metadata", {}) or {}
    final = meta.get("final_text", response)
    score = 0.0
    got = last_number(final)
    if got is not None and label is not None:
        try:
            score += correct if float(got.replace(",", "")) == float(str(label)) else 0.0
        except ValueError:
            pass
    if meta.get("tool_calls", 0) > meta.get("tool_errors", 0):
        score += tool_bonus
    if even_token_weight:
        own = [t for t, m in zip(sample.response_tokens, sample.loss_mask, strict=True) if m]
        score += even_token_weight * (sum(t % 2 == 0 for t in own) / len(own) if own else 0.0)
    return score
