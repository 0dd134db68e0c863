"""Upper bounds on the request rate a deployment sustains, which cap the goodput search.

A finite trace can make any deployment look limitless: at a rate far above what it serves, the
queue of a 1,000-request burst drains within a loose TPOT SLO (waiting time is divided by the
output length). Goodput is a steady-state rate, so it can never exceed the rate at which work
arrives faster than it can be done. Two bounds, in requests/s for a trace's length mix:

  service_bound   from the latency model itself: each phase at its most efficient batch (prefill:
                  the largest batch the token budget admits; decode: `max_num_seqs`, or what the KV
                  memory holds, split evenly over the pipeline's micro-batch lanes), its attention
                  and context terms at the trace's means (Σl²/Σl; the mean context of all decode
                  iterations). A colocated instance shares its time between the phases, so its
                  bound is the harmonic combination. Above it, queues grow without limit (load > 1).
  hardware_bound  from the GPUs: no instance does more FLOPs than tp·pp × peak (2·params per
                  token, `ModelSpec.flops_per_token`) nor reads more bytes than tp·pp × HBM
                  bandwidth (every decode iteration reads all weights once for at most
                  `max_num_seqs` tokens, plus each token's KV). Independent of any fitted model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdserve.placement.sim_deployment import SimDeployment
from pdserve.placement.hardware import GPUSpec
from pdserve.placement.latency import InstanceLatency
from pdserve.placement.model_spec import ModelSpec
from pdserve.placement.workload import Trace


@dataclass(frozen=True)
class LengthStats:
    """What the bounds need of a trace's lengths (tokens)."""

    mean_prompt: float
    mean_decode_iters: float  # mean(output_len − 1): decode iterations per request
    mean_decode_ctx: float  # a decode iteration's context averaged over all iterations of all requests
    prefill_sq_per_token: float  # Σl² / Σl: the attention term a batch of S tokens carries per token
    min_prompt: int
    max_prompt: int
    min_need: int  # smallest prompt + output (KV tokens one request reserves)

    @classmethod
    def of(cls, trace: Trace) -> LengthStats:
        n, ps, os_ = len(trace), trace.prompt_lens, trace.output_lens
        iters = sum(os_) - n
        # request r decodes at contexts p+1 .. p+o−1: (o−1)·p + o(o−1)/2 in all
        ctx = sum((o - 1) * p + o * (o - 1) / 2 for p, o in zip(ps, os_))
        return cls(sum(ps) / n, iters / n, ctx / iters if iters else 0.0, sum(p * p for p in ps) / sum(ps),
                   min(ps), max(ps), min(p + o for p, o in zip(ps, os_)))


def _per_request(tokens_per_s: float, tokens_per_request: float) -> float:
    return math.inf if tokens_per_request <= 0 else tokens_per_s / tokens_per_request


def prefill_tokens_per_s(inst: InstanceLatency, budget: int, st: LengthStats) -> float:
    """Most prompt tokens/s one prefill instance can process (a new batch enters each stage time)."""
    sizes = {budget} | {2**k for k in range(int(math.log2(budget)) + 1)}
    return max(s / inst.prefill_stage_s(s, s * st.prefill_sq_per_token) for s in sizes if s >= st.min_prompt)


def max_batch(dep: SimDeployment, inst: InstanceLatency, st: LengthStats) -> int:
    """Largest decode batch of one instance: the sequence limit or what its KV memory holds."""
    return max(1, min(dep.max_num_seqs, dep.decode_capacity(inst) // st.min_need))


def decode_tokens_per_s(dep: SimDeployment, inst: InstanceLatency, lanes: int, st: LengthStats) -> float:
    """Most output tokens/s of one instance: `lanes` micro-batches sharing `max_batch` evenly,
    at the trace's mean decode context (Σctx of a full batch averages B × that in steady state, and
    iteration time is linear in Σctx). Exact for the linear form (throughput concave in B)."""
    per_lane = -(-max_batch(dep, inst, st) // lanes)
    ctx = st.mean_decode_ctx
    best = max(b / inst.decode_coeffs(b)(b * ctx, b) for b in range(1, per_lane + 1))
    return lanes * best


def computed_prompts(dep: SimDeployment, trace: Trace) -> Trace:
    """The trace with each prompt cut to what a prefill must compute at best: with a prefix cache,
    a session turn's uncached part (`SessionTrace.new_lens`); else the trace itself."""
    new_lens = getattr(trace, "new_lens", None)
    if not dep.prefix_caching or new_lens is None:
        return trace
    return Trace(trace.unit_arrivals, new_lens(), trace.output_lens)


def service_bound(dep: SimDeployment, trace: Trace) -> float:
    """Highest rate (req/s) the deployment's latency model can sustain; see the module doc. With a
    prefix cache the prefill side counts only uncached prompt tokens, and with conditional
    disaggregation (local prefills on the decode pool) the prefill pool does not bound it."""
    st = LengthStats.of(trace)
    pst = LengthStats.of(computed_prompts(dep, trace))
    colocated = dep.mode == "colocated"
    prefill = sum(_per_request(prefill_tokens_per_s(i, dep.prefill_token_budget, pst), pst.mean_prompt)
                  for i in dep.prefill)
    if dep.pd_threshold_tokens or dep.pd_prefill_queue_limit is not None:
        prefill = math.inf
    decoders = dep.prefill if colocated else dep.decode
    decode = sum(_per_request(decode_tokens_per_s(dep, i, 1 if colocated else i.pp, st), st.mean_decode_iters)
                 for i in decoders)
    link = math.inf
    if not colocated and dep.transfer.bytes_per_s and dep.phases == "both":
        link = len(dep.decode) / max(dep.transfer.transfer_s(round(pst.mean_prompt)), 1e-12)
    if dep.phases == "prefill":
        return prefill
    if dep.phases == "decode":
        return decode
    if colocated:  # one engine does both: its time is shared between them
        return 1.0 / (1.0 / prefill + 1.0 / decode)
    return min(prefill, decode, link)


def hardware_bound(dep: SimDeployment, trace: Trace, model: ModelSpec, gpu: GPUSpec,
                   decode_gpu: GPUSpec | None = None) -> float:
    """Highest rate (req/s) the GPUs could serve at full FLOP and HBM utilisation; see the module
    doc. `decode_gpu`: the decode (and colocated) instances' GPU, when it differs."""
    st = LengthStats.of(trace)
    fpt = model.flops_per_token()
    prefill = sum(i.num_gpus * gpu.peak_tflops * 1e12 / fpt for i in dep.prefill) / st.mean_prompt
    decoders = dep.prefill if dep.mode == "colocated" else dep.decode
    gpu = decode_gpu or gpu
    flops, hbm = gpu.peak_tflops * 1e12, gpu.mem_gbps * 1e9
    decode_tps = 0.0
    for i in decoders:
        bytes_per_token = model.weight_bytes / max_batch(dep, i, st) + model.kv_bytes_per_token * (st.min_prompt + 1)
        decode_tps += min(i.num_gpus * flops / fpt, i.num_gpus * hbm / bytes_per_token)
    decode = _per_request(decode_tps, st.mean_decode_iters)
    if dep.phases == "prefill":
        return prefill
    if dep.phases == "decode":
        return decode
    return min(prefill, decode)
