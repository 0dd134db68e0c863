"""Prompts cut from long real texts to a chosen token length: the LongBench-like set, and
lengths-file workloads.

There is no LongBench package on PyPI, so the long texts are whole ShareGPT conversations and
blocks of consecutive HumanEval problems with their solutions, cut (like DistServe's LongBench
preprocessing) to a random length in [0.93 * L, L] tokens, L = the input cap left after the
output. LongBench answers are short (mean 90.7 tokens); outputs here are uniform in 32..128.
A lengths file keeps its own lengths and gets real text of each prompt length.
"""

from __future__ import annotations

import bisect
import random

from pdserve.bench.lengths import read_lengths
from pdserve.bench.tokenizer import TextTokenizer
from pdserve.bench.workload import WorkloadRequest, WorkloadSpec

LONG_OUTPUT_RANGE = (32, 128)
LONG_MIN_FRACTION = 0.93  # DistServe cuts LongBench contexts to 1900..2048 tokens
_HUMANEVAL_BLOCK = 16  # problems per HumanEval source text
_CHARS_PER_TOKEN_READ = 8  # encode at most this many chars per wanted token (generous for BPE)


class TextCutter:
    """Cuts real text to a target number of tokens."""

    def __init__(self, tokenizer: TextTokenizer, rng: random.Random) -> None:
        from pdserve.bench.humaneval import load_problems
        from pdserve.bench.sharegpt import load_conversations

        self.tokenizer, self.rng = tokenizer, rng
        self.sources = ["\n\n".join(turns) for turns in load_conversations(min_turns=1)]
        problems = [p + s for p, s in load_problems()]
        rng.shuffle(problems)
        self.sources += ["\n\n".join(problems[i:i + _HUMANEVAL_BLOCK])
                         for i in range(0, len(problems), _HUMANEVAL_BLOCK)]
        self.sources.sort(key=len)  # sorted, so texts of at least n chars are a suffix
        self._lens = [len(s) for s in self.sources]

    def cut(self, num_tokens: int) -> tuple[str, int]:
        """(text, its token length): the start of a random real text, num_tokens long (re-encoding
        the decoded cut may differ by a token or two; the returned length is the measured one)."""
        ids = self._leading_ids(num_tokens)
        prompt = self.tokenizer.decode(ids)
        prompt_len = len(self.tokenizer.encode(prompt))
        while prompt_len > num_tokens and len(ids) > 1:
            ids = ids[:-1]
            prompt = self.tokenizer.decode(ids)
            prompt_len = len(self.tokenizer.encode(prompt))
        return prompt, prompt_len

    def _leading_ids(self, num_tokens: int) -> list[int]:
        # Start from a text long enough by characters; encode only a prefix of it (a few chars per
        # token), reading further when the text is dense and appending another text when it is short.
        first = bisect.bisect_left(self._lens, 6 * num_tokens)
        text = self.sources[self.rng.randrange(min(first, len(self.sources) - 1), len(self.sources))]
        limit = _CHARS_PER_TOKEN_READ * num_tokens + 64
        while True:
            ids = self.tokenizer.encode(text[:limit])
            if len(ids) >= num_tokens:
                return ids[:num_tokens]
            if len(text) > limit:
                limit *= 2
            else:
                text += "\n\n" + self.rng.choice(self.sources)


def long_prompt_workload(spec: WorkloadSpec, tokenizer: TextTokenizer,
                         rng: random.Random) -> list[WorkloadRequest]:
    cutter = TextCutter(tokenizer, rng)
    out: list[WorkloadRequest] = []
    lo_out, hi_out = LONG_OUTPUT_RANGE
    for _ in range(spec.num_requests):
        output_len = rng.randint(lo_out, hi_out)
        if spec.max_output_len is not None:
            output_len = min(output_len, spec.max_output_len)
        hi = min(spec.input_cap(), spec.max_model_len - 1 - output_len)
        if hi < 4:
            raise ValueError(f"longbench: no room for a prompt (max_model_len={spec.max_model_len}, "
                             f"max_input_len={spec.max_input_len})")
        target = rng.randint(max(4, int(LONG_MIN_FRACTION * hi)), hi)
        prompt, prompt_len = cutter.cut(target)
        out.append(WorkloadRequest(prompt, prompt_len, output_len))
    return out


def workload_from_lengths(spec: WorkloadSpec, tokenizer: TextTokenizer,
                          rng: random.Random) -> list[WorkloadRequest]:
    """The first `num_requests` lines of the lengths file `spec.name` (cycled if it is shorter),
    after the spec's filters, each with real text of its prompt length."""
    lengths = read_lengths(spec.name)
    kept = [(item.prompt_len, n) for item in lengths
            if (n := spec.accept(item.prompt_len, item.output_len)) is not None]
    if not kept:
        raise ValueError(f"workload {spec.name}: no line passes the length filters")
    cutter = TextCutter(tokenizer, rng)
    out: list[WorkloadRequest] = []
    for i in range(spec.num_requests):
        prompt_len, output_len = kept[i % len(kept)]
        prompt, measured = cutter.cut(prompt_len)
        out.append(WorkloadRequest(prompt, measured, output_len))
    return out
