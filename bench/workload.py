"""Benchmark workloads: real prompts with the token lengths of the model under test.

A workload is a list of `WorkloadRequest`s built deterministically from a `WorkloadSpec` and a
tokenizer. Filtering follows DistServe: a pair is dropped when both prompt and output are shorter than 4
tokens, or when prompt + output reaches `max_model_len`. For small machines, outputs are first
clamped to `max_output_len` (sent as `max_tokens`, so the request simply stops earlier) and
prompts longer than `max_input_len` are dropped (the survivors keep their natural distribution).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pdserve.bench.lengths import RequestLengths
from pdserve.bench.tokenizer import TextTokenizer

WORKLOADS = ("sharegpt", "humaneval", "longbench")


@dataclass(frozen=True)
class WorkloadRequest:
    prompt: str
    prompt_len: int  # tokens of `prompt` under the served model's tokenizer
    output_len: int  # tokens to generate (max_tokens with ignore_eos)
    messages: tuple[tuple[str, str], ...] = ()  # chat: (role, content) pairs sent instead of `prompt`

    def lengths(self) -> RequestLengths:
        return RequestLengths(self.prompt_len, self.output_len)


@dataclass(frozen=True)
class WorkloadSpec:
    """`name` is one of WORKLOADS or the path of a lengths file (real text cut to those lengths)."""

    name: str = "sharegpt"
    num_requests: int = 100
    seed: int = 0
    max_input_len: int | None = None
    max_output_len: int | None = None
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        if self.name not in WORKLOADS and not Path(self.name).is_file():
            raise ValueError(f"workload: {self.name!r} is neither one of {', '.join(WORKLOADS)} nor a lengths file")
        if self.num_requests < 1:
            raise ValueError(f"num_requests: must be >= 1, got {self.num_requests}")
        for name in ("max_input_len", "max_output_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: must be >= 1, got {value}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len: must be >= 2, got {self.max_model_len}")

    def input_cap(self) -> int:
        cap = self.max_model_len - 1
        return cap if self.max_input_len is None else min(cap, self.max_input_len)

    def accept(self, prompt_len: int, output_len: int) -> int | None:
        """The output length to use for this pair, or None when the pair is filtered out."""
        if prompt_len < 1 or output_len < 1 or (prompt_len < 4 and output_len < 4):
            return None
        if self.max_output_len is not None:
            output_len = min(output_len, self.max_output_len)
        if prompt_len > self.input_cap() or prompt_len + output_len >= self.max_model_len:
            return None
        return output_len


def build_workload(spec: WorkloadSpec, tokenizer: TextTokenizer) -> list[WorkloadRequest]:
    """`spec.num_requests` requests, the same ones for the same spec and tokenizer."""
    rng = random.Random(spec.seed)
    if spec.name == "sharegpt":
        from pdserve.bench.sharegpt import load_conversations, split_conversation

        pairs = _cycle_shuffled(load_conversations(), rng, lambda turns: split_conversation(turns, rng))
    elif spec.name == "humaneval":
        from pdserve.bench.humaneval import load_problems

        pairs = _cycle_shuffled(load_problems(), rng, lambda pair: pair)
    elif spec.name == "longbench":
        from pdserve.bench.longprompt import long_prompt_workload

        return long_prompt_workload(spec, tokenizer, rng)
    else:
        from pdserve.bench.longprompt import workload_from_lengths

        return workload_from_lengths(spec, tokenizer, rng)
    return _tokenize_and_filter(pairs, spec, tokenizer)


def _cycle_shuffled(items: Sequence, rng: random.Random, to_pair: Callable) -> Iterator[tuple[str, str]]:
    """Endless (prompt, completion) pairs: each pass over `items` in a fresh random order
    (HumanEval's replication is this cycling; ShareGPT redraws its split point per pass)."""
    if not items:
        return
    while True:
        order = list(range(len(items)))
        rng.shuffle(order)
        for i in order:
            yield to_pair(items[i])


def _tokenize_and_filter(pairs: Iterator[tuple[str, str]], spec: WorkloadSpec,
                         tokenizer: TextTokenizer) -> list[WorkloadRequest]:
    out: list[WorkloadRequest] = []
    misses = 0
    for prompt, completion in pairs:
        prompt_len = len(tokenizer.encode(prompt))
        output_len = spec.accept(prompt_len, len(tokenizer.encode(completion)))
        if output_len is None:
            misses += 1
        else:
            out.append(WorkloadRequest(prompt, prompt_len, output_len))
            misses = 0
            if len(out) == spec.num_requests:
                return out
        if misses > 100_000:
            raise ValueError(f"workload {spec.name}: no request passes the length filters "
                             f"(max_input_len={spec.max_input_len}, max_model_len={spec.max_model_len})")
    raise ValueError(f"workload {spec.name}: the dataset is empty")

