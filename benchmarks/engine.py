"""Engine benchmark: every figure is a ratio of two things measured side by side in this run.

  (a) decode step time at batch 1 ÷ time to read all weights once (memory roofline), alternated
  (b) decode tokens/s, 16 concurrent requests of different lengths: ours ÷ transformers
      `generate` batched (left-padded), and ÷ `generate` one request at a time
  (c) prefill tokens/s for one 512-token prompt

Usage: python benchmarks/engine.py [--model smollm2-135m] [--threads 1] [--new-tokens 32] [--repeats 3]
                                  [--clock wall|cpu]

With --clock cpu every time is this process's CPU time (time.process_time): with one torch thread
it leaves out the time other processes hold the core, which on a shared machine swings wall-clock
figures by 2-5x within a run (memory-bandwidth contention still counts).
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from pdserve import LLM, SamplingParams
from pdserve.models import resolve_model


CLOCK = time.perf_counter  # --clock cpu: time.process_time, this process's CPU seconds


def timed_step(engine, lens: list[int], computed: list[int], repeats: int = 3) -> float:
    """Median seconds (by CLOCK) of one forward + logits over sequences of total lengths `lens`
    with `computed` tokens cached (engine/profiling.py's time_step, on this script's clock)."""
    from pdserve.engine.batch import Chunk
    from pdserve.engine.profiling import _fake_requests

    reqs = _fake_requests(engine, lens, computed)
    chunks = [Chunk(r, n - c) for r, n, c in zip(reqs, lens, computed)]
    try:
        times = []
        for _ in range(repeats + 1):
            t0 = CLOCK()
            engine.runner.execute(chunks)
            times.append(CLOCK() - t0)
        return _median(times[1:])
    finally:
        for r in reqs:
            engine.free(r)


def weight_read_s(model: torch.nn.Module, repeats: int = 5) -> float:
    """Seconds to stream every weight byte once (a reduction reads each element exactly once).
    Tied embeddings are one parameter, so they count once (a decode reads the LM head in full and
    one embedding row)."""
    params = [p for p in model.parameters()]
    times = []
    for _ in range(repeats + 1):
        t0 = CLOCK()
        for p in params:
            p.sum()
        times.append(CLOCK() - t0)
    return sorted(times[1:])[repeats // 2]


def roofline_pairs(engine, context: int, pairs: int) -> tuple[list[float], list[float]]:
    """(weight read s, batch-1 decode step s) measured alternately, `pairs` times each, so a
    change in the machine's load hits both sides of the ratio alike."""
    reads, steps = [], []
    for _ in range(pairs):
        reads.append(weight_read_s(engine.model, repeats=1))
        steps.append(timed_step(engine, [context], [context - 1], repeats=3))
    return reads, steps


def _native_status(engine) -> str:
    """Whether the native kernels ran (engine/kernels.py), or why not and on how many steps not."""
    runner = engine.runner
    if getattr(runner, "native_fallback", False):
        from pdserve.engine import kernels

        return (f"native kernels UNAVAILABLE ({kernels.load_error()}): "
                f"{runner.num_fallback_steps} steps on the fallback path")
    return "native kernels: " + ("on" if getattr(runner, "native", None) is not None else "n/a")


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def prompts_of_lengths(tok, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(0)
    words = "the of and a to in is you that it he was for on are as with his they at be this".split()
    out = []
    for n in lengths:
        ids = tok.encode(" ".join(rng.choice(words) for _ in range(n)))
        out.append(ids[:n])
    return out


def hf_generate_s(hf, prompts: list[list[int]], new_tokens: int, pad_id: int) -> float:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = CLOCK()
    with torch.no_grad():
        hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    do_sample=False, pad_token_id=pad_id)
    return CLOCK() - t0


def measure(llm, engine, hf, args) -> dict[str, float]:
    """One side-by-side run of (a), (b), (c); prints its lines and returns its figures."""
    fig: dict[str, float] = {}
    # (a) memory roofline at batch 1: the ratio of the medians, and the spread of the paired ratios
    reads, steps = roofline_pairs(engine, 128, args.pairs)
    read_s, step1 = _median(reads), _median(steps)
    ratios = sorted(s / r for s, r in zip(steps, reads))
    nbytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    fig["a"] = step1 / read_s
    print(f"(a) weights {nbytes / 1e6:.0f} MB read in {read_s * 1e3:.1f} ms ({nbytes / read_s / 1e9:.1f} GB/s); "
          f"decode step b=1 {step1 * 1e3:.1f} ms; ratio {fig['a']:.2f} (target <= 1.3); "
          f"{len(ratios)} paired ratios {ratios[0]:.2f}..{ratios[-1]:.2f}, median {_median(ratios):.2f} "
          f"[matmul: {getattr(getattr(engine.model, 'linear', None), 'name', 'torch')}; "
          f"attention: {getattr(engine.runner, 'attention_backend', 'reference')}; {_native_status(engine)}]",
          flush=True)

    # (b) 16 concurrent requests of different lengths, every system making the same tokens (ignore_eos).
    # Reported end to end (output tokens / wall time, vLLM's throughput measure) and decode only,
    # isolated by differencing T(1 + n new tokens) − T(1 new token) on the same prompts.
    lengths = [16 + 23 * i for i in range(16)]
    prompts = prompts_of_lengths(llm.tokenizer, lengths)
    n_new = args.new_tokens
    pad = min(llm.tokenizer.eos_token_ids) if llm.tokenizer.eos_token_ids else 0

    def ours_s(new_tokens: int) -> float:
        t0 = CLOCK()
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True))
        return CLOCK() - t0

    ours_s(1)  # warm-up
    total = 16 * n_new
    ours_all, ours_first = ours_s(1 + n_new), ours_s(1)
    hf_all, hf_first = hf_generate_s(hf, prompts, 1 + n_new, pad), hf_generate_s(hf, prompts, 1, pad)
    one_all = one_first = 0.0
    for p in prompts:
        one_all += hf_generate_s(hf, [p], 1 + n_new, pad)
        one_first += hf_generate_s(hf, [p], 1, pad)
    for key, label, ours, batched, single in (
        ("e2e", "end-to-end (prefill + decode)", ours_all, hf_all, one_all),
        ("dec", "decode only (differenced)", ours_all - ours_first, hf_all - hf_first, one_all - one_first),
    ):
        fig[f"b_{key}_batched"], fig[f"b_{key}_single"] = batched / ours, single / ours
        print(f"(b) {label}, 16 requests (prompts {lengths[0]}-{lengths[-1]} tokens) x {n_new} new tokens: "
              f"ours {total / ours:.1f} tok/s; HF generate batched {total / batched:.1f} tok/s -> "
              f"x{batched / ours:.2f} (target >= 2); one at a time {total / single:.1f} tok/s -> "
              f"x{single / ours:.2f} (target >= 6)", flush=True)

    # (c) prefill throughput at 512 tokens
    p512 = timed_step(engine, [512], [0], repeats=3)
    fig["c"] = 512 / p512
    print(f"(c) prefill 512 tokens in {p512 * 1e3:.0f} ms = {fig['c']:.0f} tok/s [{_native_status(engine)}]",
          flush=True)
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--pairs", type=int, default=9, help="(a): weight reads and decode steps, alternated")
    ap.add_argument("--repeats", type=int, default=1, help="whole runs of (a)-(c); medians and ranges at the end")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: time this process's CPU seconds (one thread: robust to a shared, loaded machine)")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    llm = LLM(args.model, num_threads=args.threads)
    engine = llm.engine
    hf = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), dtype=torch.float32).eval()
    runs = []
    for r in range(args.repeats):
        if args.repeats > 1:
            print(f"-- run {r + 1}/{args.repeats}", flush=True)
        runs.append(measure(llm, engine, hf, args))
    if args.repeats > 1:
        names = {"a": "(a) decode b=1 / weight read", "b_e2e_batched": "(b) e2e vs HF batched",
                 "b_e2e_single": "(b) e2e vs HF one at a time", "b_dec_batched": "(b) decode vs HF batched",
                 "b_dec_single": "(b) decode vs HF one at a time", "c": "(c) prefill 512 tok/s"}
        for key, name in names.items():
            xs = sorted(run[key] for run in runs)
            print(f"{name}: median {_median(xs):.2f}, range {xs[0]:.2f}..{xs[-1]:.2f} over {len(xs)} runs")


if __name__ == "__main__":
    main()
