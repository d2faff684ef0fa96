"""Sampling parameters as SGLang's ``/generate`` names them, and the CPU engine's token sampler.

``SamplingParams.from_request(dict)`` accepts SGLang's field names (max_new_tokens, temperature, top_p, top_k,
min_p, stop, stop_token_ids, ignore_eos, skip_special_tokens, no_stop_trim, sampling_seed, n) and rejects
unknown or out-of-range values with one line naming the field. Fields SGLang has but this engine does not
implement (penalties, grammars, logit_bias, ...) are refused when set to a non-default value, never ignored.

Log-probs follow SGLang's default: ``log_softmax(logits / temperature)`` of the sampled token, computed
before top-k/top-p/min-p truncation (greedy requests: ``log_softmax(logits)``). That is the distribution the
trainer recomputes, so rollout and trainer log-probs are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

TOP_K_ALL = 1 << 30  # SGLang's "no top-k" sentinel
_ALLOWED_DEFAULTS: dict[str, Any] = {
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "json_schema": None,
    "regex": None,
    "ebnf": None,
    "structural_tag": None,
    "logit_bias": None,
    "beam_width": None,
    "custom_params": None,
    "stop_regex": None,
    "stream_interval": None,
    "spaces_between_special_tokens": True,
    "watermark": None,
}


class InvalidRequest(ValueError):
    """A /generate request this engine cannot serve; the message is one line naming the field."""


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = TOP_K_ALL
    min_p: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: set[int] = field(default_factory=set)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: int | None = None
    n: int = 1

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @classmethod
    def from_request(cls, raw: dict[str, Any] | None) -> SamplingParams:
        raw = dict(raw or {})
        for name, default in _ALLOWED_DEFAULTS.items():
            value = raw.pop(name, default)
            if value not in (default, None):
                raise InvalidRequest(
                    f"sampling_params.{name}={value!r} is not supported by the CPU engine; leave it unset"
                )
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise InvalidRequest(f"unknown sampling_params field(s) {', '.join(unknown)}")
        p = cls()
        for key, value in raw.items():
            if value is not None:
                setattr(p, key, value)
        p._normalise()
        return p

    def _normalise(self) -> None:
        def integer(name: str, low: int) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidRequest(f"sampling_params.{name}={value!r} must be an integer >= {low}")
            return value

        def number(name: str, low: float, high: float) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise InvalidRequest(f"sampling_params.{name}={value!r} must be a number in [{low}, {high}]")
            return float(value)

        integer("max_new_tokens", 0)
        self.temperature = number("temperature", 0.0, 1e6)
        self.top_p = number("top_p", 1e-9, 1.0)
        self.min_p = number("min_p", 0.0, 1.0)
        if self.top_k == -1:
            self.top_k = TOP_K_ALL
        integer("top_k", 1)
        if integer("n", 1) != 1:
            raise InvalidRequest("sampling_params.n>1 is not supported by the CPU engine; send n requests")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequest(f"sampling_params.stop={self.stop!r} must be a string or a list of strings")
        try:
            self.stop_token_ids = {int(t) for t in self.stop_token_ids if t is not None}
        except (TypeError, ValueError):
            raise InvalidRequest(
                f"sampling_params.stop_token_ids={self.stop_token_ids!r} must be a list of token ids"
            ) from None
        if self.sampling_seed is not None and (
            isinstance(self.sampling_seed, bool) or not isinstance(self.sampling_seed, int)
        ):
            raise InvalidRequest(f"sampling_params.sampling_seed={self.sampling_seed!r} must be an integer")


def make_generator(seed: int | None, fallback: torch.Generator) -> torch.Generator:
    """A request's own generator: seeded from ``sampling_seed``, else from the engine's generator."""
    g = torch.Generator()
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,), generator=fallback))
    g.manual_seed(seed % (2**63))
    return g


def _filter(scaled: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Probabilities after top-k, top-p and min-p truncation of one row of temperature-scaled logits."""
    probs = torch.softmax(scaled, dim=-1)
    if p.top_k < probs.numel():
        kth = torch.topk(probs, p.top_k).values[-1]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop_sorted = (cumulative - sorted_probs) > p.top_p * cumulative[-1]
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs


def _draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of ``probs`` [rows, vocab] (unnormalised), each row from its own generator.

    Exactly ``torch.multinomial(probs[i], 1, generator=generators[i])`` for every row: for one sample torch
    draws q ~ Exp(1) of the row's shape from the generator and takes ``argmax(p / q)``. Drawing the noise row
    by row into one buffer and dividing and reducing the whole batch at once gives the same tokens and leaves
    every generator in the same state, without a multinomial call (and its input checks) per row.
    """
    noise = torch.empty_like(probs)
    for row, g in zip(noise, generators, strict=True):
        row.exponential_(1.0, generator=g)
    return torch.div(probs, noise, out=noise).argmax(dim=-1)


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> tuple[list[int], list[float]]:
    """One token per row of ``logits`` [batch, vocab] and its log-prob (see module docstring)."""
    logits = logits.float()
    temps = [p.temperature if not p.greedy else 1.0 for p in params]
    # x / 1.0 == x exactly, so the common all-temperature-1 batch skips a [batch, vocab] division and copy.
    scaled = logits if all(t == 1.0 for t in temps) else logits / torch.tensor(temps)[:, None]
    logprobs = torch.log_softmax(scaled, dim=-1)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    plain = [
        i
        for i, p in enumerate(params)
        if not p.greedy and p.top_k == TOP_K_ALL and p.top_p >= 1.0 and p.min_p == 0.0
    ]
    if len(plain) == len(params):  # the usual rollout batch: one draw for all rows, no index bookkeeping
        tokens = _draw(logprobs.exp(), generators)
    else:
        tokens = torch.empty(len(params), dtype=torch.long)
    if greedy:
        tokens[greedy] = logits[greedy].argmax(dim=-1)
    if plain and len(plain) < len(params):
        tokens[plain] = _draw(logprobs[plain].exp(), [generators[i] for i in plain])
    for i, p in enumerate(params):
        if not p.greedy and i not in plain:
            tokens[i] = _draw(_filter(logits[i] / p.temperature, p)[None], [generators[i]])[0]
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
    return tokens.tolist(), chosen.tolist()
