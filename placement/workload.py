"""Workloads for planning: (prompt_len, output_len) pairs (`WorkloadLengths`), and seeded traces drawn from them.

A `Trace` keeps arrival times at rate 1; `arrivals(rate)` scales them by 1/rate, so every rate and
every candidate of a search sees the same requests in the same order (common random numbers).
Lengths come from a lengths file (bench's JSON lines, a JSON list, or CSV `prompt_len,output_len`)
or from `sharegpt_like()`: lognormals fitted to DistServe's ShareGPT statistics (OPT tokenizer,
prompt + output < 2048; mean 755.5 / 200.3 tokens).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path

from pdserve.bench.arrivals import arrival_times
from pdserve.bench.lengths import read_lengths
from pdserve.bench.workload import WORKLOADS


@dataclass(frozen=True)
class WorkloadLengths:
    """A workload reduced to its token lengths: the (prompt_len, output_len) pairs a planning trace
    resamples. `pdserve bench`'s workloads (real text, `pdserve.bench.workload`) reduce to one
    through `load_workload`; a lengths file through `load_lengths`."""

    name: str
    prompt_lens: tuple[int, ...]
    output_lens: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.prompt_lens or len(self.prompt_lens) != len(self.output_lens):
            raise ValueError(f"workload {self.name}: need matching, non-empty prompt and output lengths")
        if min(self.prompt_lens) < 1 or min(self.output_lens) < 1:
            raise ValueError(f"workload {self.name}: lengths must be >= 1")

    @functools.cached_property
    def mean_prompt_len(self) -> float:
        return sum(self.prompt_lens) / len(self.prompt_lens)

    @functools.cached_property
    def mean_output_len(self) -> float:
        return sum(self.output_lens) / len(self.output_lens)

    def rescaled(self, mean_prompt_len: float, mean_output_len: float, name: str) -> WorkloadLengths:
        """Every request stretched by one factor per side so the means become these: the same
        requests counted in another tokenizer's tokens, when only that tokenizer's means are known
        (e.g. a paper's statistics). Lengths stay >= 1."""
        kp, ko = mean_prompt_len / self.mean_prompt_len, mean_output_len / self.mean_output_len
        return WorkloadLengths(name, tuple(max(1, round(p * kp)) for p in self.prompt_lens),
                               tuple(max(1, round(o * ko)) for o in self.output_lens))

    def trace(self, num_requests: int, seed: int = 0, cv: float = 1.0) -> Trace:
        """Resample `num_requests` pairs; arrivals at rate 1 from bench's arrival process
        (`pdserve.bench.arrivals.arrival_times`: Gamma gaps with coefficient of variation `cv`,
        1.0 = Poisson), the same process `pdserve bench` sends requests with."""
        rng = random.Random(seed)
        idx = [rng.randrange(len(self.prompt_lens)) for _ in range(num_requests)]
        times = arrival_times(num_requests, 1.0, cv, seed)
        return Trace(tuple(times), tuple(self.prompt_lens[i] for i in idx), tuple(self.output_lens[i] for i in idx))


@dataclass(frozen=True)
class Trace:
    unit_arrivals: tuple[float, ...]  # seconds at rate 1 req/s, increasing
    prompt_lens: tuple[int, ...]
    output_lens: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.unit_arrivals)

    def head(self, n: int) -> Trace:
        """The first `n` requests (the whole trace if it is shorter)."""
        if n >= len(self):
            return self
        return Trace(self.unit_arrivals[:n], self.prompt_lens[:n], self.output_lens[:n])

    def arrivals(self, rate: float) -> list[float]:
        inv = 1.0 / rate
        return [t * inv for t in self.unit_arrivals]


def sharegpt_like(num: int = 20_000, seed: int = 0, max_total_len: int = 2048) -> WorkloadLengths:
    rng = random.Random(seed)
    prompts: list[int] = []
    outputs: list[int] = []
    while len(prompts) < num:
        p = max(4, int(rng.lognormvariate(6.767, 0.95)))
        o = max(4, int(rng.lognormvariate(4.945, 1.0)))
        if p + o < max_total_len:
            prompts.append(p)
            outputs.append(o)
    return WorkloadLengths("sharegpt-like", tuple(prompts), tuple(outputs))


def load_lengths(path: str | Path) -> WorkloadLengths:
    """A lengths file, read by bench's reader (`pdserve.bench.lengths.read_lengths`: JSON lines of
    {"prompt_len", "output_len"}, a JSON list of such objects or pairs, or CSV with those columns);
    a `sessions.SessionWorkload` when it has sessions or shared prefixes."""
    items = read_lengths(path)
    if not items:
        raise ValueError(f"{path}: no requests")
    from pdserve.placement.sessions import SessionWorkload, has_sessions

    if has_sessions(items):  # sessions or shared prefixes: traces keep them (closed loop, reuse)
        return SessionWorkload.of(Path(path).stem, items)
    return WorkloadLengths(Path(path).stem, tuple(r.prompt_len for r in items), tuple(r.output_len for r in items))


# distinct requests drawn from each of bench's datasets (traces resample them); the long-prompt
# set tokenizes whole documents, so it is kept small (`pdserve bench lengths` caches any size)
DATASET_SAMPLES = {"sharegpt": 1000, "humaneval": 164, "longbench": 100}


FALLBACK_TOKENIZER = "smollm2-135m"  # ships with pdserve's dependencies, so it is always there


def planning_tokenizer(model: str, tokenizer: str | None = None) -> tuple[str, str | None]:
    """The tokenizer to count a named workload's tokens with, and a note when it is not the planned
    model's own. Token counts depend on the tokenizer (DistServe's HumanEval is 171 prompt / 98
    output tokens under OPT's byte-level BPE, which spends a token per indentation space; SmolLM2's
    merges them: 139 / 59), so planning a model with another model's lengths is said, not silent.
    `tokenizer` given: it. Else the model's own when pdserve can load it (an HF directory with
    tokenizer.json, or a model pdserve serves); else FALLBACK_TOKENIZER, with the note."""
    if tokenizer:
        return tokenizer, None
    from pdserve.models import known_models

    path = Path(model).expanduser()
    if model.lower() in {m.lower() for m in known_models()} or (path / "tokenizer.json").is_file() or path.name == "tokenizer.json":
        return model, None
    return FALLBACK_TOKENIZER, (f"{model}'s tokenizer is not available here: workload lengths are counted in "
                                f"{FALLBACK_TOKENIZER}'s tokens (pass --tokenizer with the model's tokenizer.json)")


def load_workload(name_or_path: str, tokenizer: str = FALLBACK_TOKENIZER, max_model_len: int = 2048) -> WorkloadLengths:
    """`sharegpt-like` (offline, fitted to DistServe's ShareGPT statistics), one of bench's
    workloads (`sharegpt`, `humaneval`, `longbench`: real data tokenized with `tokenizer` and
    filtered as `pdserve bench` does), or a lengths file."""
    if name_or_path == "sharegpt-like":
        return sharegpt_like()  # DistServe's filter (prompt + output < 2048), which its fit assumes
    if name_or_path in DATASET_SAMPLES:
        from pdserve.bench.tokenizer import load_tokenizer
        from pdserve.bench.workload import WorkloadSpec, build_workload

        spec = WorkloadSpec(name_or_path, DATASET_SAMPLES[name_or_path], max_model_len=max_model_len)
        reqs = build_workload(spec, load_tokenizer(tokenizer))
        return WorkloadLengths(name_or_path, tuple(r.prompt_len for r in reqs), tuple(r.output_len for r in reqs))
    if Path(name_or_path).is_file():
        return load_lengths(name_or_path)
    raise ValueError(f"--workload: {name_or_path!r} is none of sharegpt-like, {', '.join(WORKLOADS)} "
                     "nor a lengths file")
