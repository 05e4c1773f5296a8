"""Sampling parameters and per-row token sampling, following SGLang's conventions.

Field names, defaults and validation follow `sglang.srt.sampling.sampling_params.SamplingParams`
(0.5.x): temperature below 1e-6 means greedy (SGLang turns it into top_k=1, temperature=1),
top_k=-1 means the whole vocabulary, top_p in (0, 1].

Logprob convention (informational: the learner recomputes old logprobs itself). SGLang's sampler
returns, by default, `log_softmax(logits / temperature)` at the sampled token: temperature-scaled
but BEFORE top-k / top-p truncation and renormalisation; greedy requests get `log_softmax(logits)`.
With `SGLANG_RETURN_ORIGINAL_LOGPROB=1` it returns `log_softmax(logits)` before temperature.
`logprob_vector` reproduces both (`original=True` for the latter).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

SAMPLING_EPS = 1e-6

# Accepted by SGLang; the embedded engine implements them only at their default (no-op) value.
_UNSUPPORTED_UNLESS_DEFAULT = {
    "min_p": 0.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "json_schema": None,
    "regex": None,
    "ebnf": None,
    "structural_tag": None,
    "stop_regex": None,
    "logit_bias": None,
    "custom_params": None,
}
# Accepted and ignored: they only shape streaming or detokenisation details we do not have.
_IGNORED = {"spaces_between_special_tokens", "stream_interval"}


class SamplingParamsError(ValueError):
    """A sampling_params field is unknown, out of range or unsupported by the embedded engine."""


@dataclass
class SamplingParams:
    """One request's sampling parameters (SGLang names and defaults)."""

    max_new_tokens: int = 128
    """Upper bound on generated tokens; reaching it finishes with {"type": "length"}."""
    temperature: float = 1.0
    """Softmax temperature; values below 1e-6 mean greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 keeps the whole vocabulary."""
    n: int = 1
    """Samples per prompt (expanded by the server, sample-major)."""
    stop: list[str] = field(default_factory=list)
    """Stop strings, matched on decoded text and trimmed from `text` unless no_stop_trim."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that finish the request like EOS does."""
    ignore_eos: bool = False
    """Ignore EOS and stop_token_ids (as SGLang does), stop only on length / stop strings."""
    skip_special_tokens: bool = True
    """Drop special tokens when decoding `text`."""
    no_stop_trim: bool = False
    """Keep the matched stop token / string in `text`."""
    sampling_seed: int | None = None
    """Seed of this request's sampler; None draws one from the server's seeded stream."""

    def __post_init__(self) -> None:
        if self.max_new_tokens is None or self.max_new_tokens < 0:
            raise SamplingParamsError(f"max_new_tokens must be at least 0, got {self.max_new_tokens}.")
        if not (self.temperature >= 0.0 and self.temperature < float("inf")):
            raise SamplingParamsError(f"temperature must be a non-negative finite number, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingParamsError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k != -1 and self.top_k < 1:
            raise SamplingParamsError(f"top_k must be -1 (disable) or at least 1, got {self.top_k}.")
        if self.n < 1:
            raise SamplingParamsError(f"n must be at least 1, got {self.n}.")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingParamsError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}.")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise SamplingParamsError(f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}.")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS or self.top_k == 1

    @classmethod
    def from_request(cls, raw: dict | None) -> SamplingParams:
        """Parse the JSON `sampling_params` of a /generate request, refusing what we cannot honour."""
        raw = dict(raw or {})
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {}
        for key, value in raw.items():
            if key in known:
                if value is not None:  # SGLang treats null as "use the default"
                    kwargs[key] = value
            elif key in _UNSUPPORTED_UNLESS_DEFAULT:
                # SGLang's own front-end sends empty lists / dicts for "none" (e.g. stop_regex=[])
                if value is not None and value != _UNSUPPORTED_UNLESS_DEFAULT[key] and value not in ([], {}):
                    raise SamplingParamsError(
                        f"sampling_params.{key}={value!r} is not supported by the embedded rollout server "
                        f"(only the default {_UNSUPPORTED_UNLESS_DEFAULT[key]!r}); use a real SGLang server")
            elif key not in _IGNORED:
                allowed = sorted(known | set(_UNSUPPORTED_UNLESS_DEFAULT) | _IGNORED)
                raise SamplingParamsError(f"unknown sampling_params field {key!r}; allowed: {allowed}")
        if isinstance(kwargs.get("stop"), str):
            kwargs["stop"] = [kwargs["stop"]]
        for key in ("stop", "stop_token_ids"):
            if not isinstance(kwargs.get(key, []), list):
                raise SamplingParamsError(f"sampling_params.{key} must be a list, got {kwargs[key]!r}")
        for key in ("max_new_tokens", "top_k", "n", "sampling_seed"):
            if key in kwargs and (isinstance(kwargs[key], bool) or not isinstance(kwargs[key], int)):
                raise SamplingParamsError(f"sampling_params.{key} must be an integer, got {kwargs[key]!r}")
        for key in ("temperature", "top_p"):
            if key in kwargs and (isinstance(kwargs[key], bool) or not isinstance(kwargs[key], (int, float))):
                raise SamplingParamsError(f"sampling_params.{key} must be a number, got {kwargs[key]!r}")
        kwargs["stop"] = list(kwargs.get("stop", []))
        kwargs["stop_token_ids"] = list(kwargs.get("stop_token_ids", []))
        return cls(**kwargs)


def processed_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature-scaled, top-k / top-p truncated logits (-inf outside the kept set), one row."""
    scaled = logits / params.temperature
    if params.top_k != -1 and params.top_k < scaled.numel():
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        probs = torch.softmax(scaled, dim=-1)
        sorted_probs, order = probs.sort(descending=True)
        # Keep a token while the mass strictly before it is within top_p (SGLang's rule).
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) > params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Draw one token from one row of logits [vocab] with the request's own generator."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(processed_logits(logits.float(), params), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def logprob_vector(logits: torch.Tensor, params: SamplingParams, original: bool = False) -> torch.Tensor:
    """Logprobs over the vocabulary in SGLang's reporting convention (see module docstring)."""
    logits = logits.float()
    # SGLang rewrites temperature < 1e-6 to temperature 1 (plus top_k=1) before sampling.
    temperature = 1.0 if original or params.temperature < SAMPLING_EPS else params.temperature
    return torch.log_softmax(logits / temperature, dim=-1)


def top_logprobs(logprobs: torch.Tensor, k: int) -> tuple[list[float], list[int]]:
    """The k largest entries of a logprob vector and their token ids."""
    values, ids = logprobs.topk(min(k, logprobs.numel()))
    return values.tolist(), ids.tolist()
