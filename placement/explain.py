"""Why a plan: for the winner and the runner-up, each phase's goodput in the unit, the bottleneck,
the latencies the simulator predicts at the planned rate, and what one more node would buy.

Bottleneck: the smallest of the unit's prefill goodput (prefill compute), decode goodput (decode
iterations: memory-bound reads of weights and KV; "KV capacity" when the KV memory, not
max_num_seqs, caps the batch) and the KV links (`bound.service_bound`'s link term).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pdserve.placement.bound import LengthStats, max_batch
from pdserve.placement.goodput import counted
from pdserve.placement.packing import max_replicas
from pdserve.placement.search import (Scored, SearchResult, SearchSpec, deployment_of, job_trace, search_trace,
                                      transfer_model)
from pdserve.placement.simulator import simulate


def explain(spec: SearchSpec, result: SearchResult, top: int = 2) -> dict[str, Any]:
    trace = search_trace(spec)
    out = {}
    for label, s in zip(("winner", "runner_up"), result.ranked[:top]):
        out[label] = _one(spec, result, s, trace)
    return out


def _one(spec: SearchSpec, result: SearchResult, s: Scored, trace: Any) -> dict[str, Any]:
    u = s.unit
    dep = deployment_of(spec, u)
    long = job_trace(spec, dep, trace)
    info: dict[str, Any] = {"unit": u.describe(), "unit_goodput_rps": round(s.unit_goodput, 3),
                            "planned_goodput_rps": round(s.planned_goodput, 3), "replicas": s.replicas}
    if u.decode is not None:
        g = result.phase_goodput
        terms = {"prefill compute": u.num_prefill * g.get(("prefill", u.prefill), 0.0),
                 "decode": u.num_decode * g.get(("decode", u.decode), 0.0),
                 "KV transfer": u.num_decode / transfer_model(spec.model, spec.cluster, u, spec.codec).transfer_s(
                     round(spec.workload.mean_prompt_len))}
        info["phase_goodput_rps"] = {k: round(v, 3) for k, v in terms.items()}
        neck = min(terms, key=terms.get)
        if neck == "decode":
            d = dep.decode[0]
            kv_bound = max_batch(dep, d, LengthStats.of(long)) < spec.max_num_seqs
            neck = "decode KV capacity" if kv_bound else "decode memory bandwidth"
        info["bottleneck"] = neck
    else:
        info["bottleneck"] = "colocated: prefill batches stall decoding on the same GPUs"
    if s.unit_goodput > 0:
        q = counted(simulate(dep, long, s.unit_goodput)).percentiles()
        info["predicted_at_planned_rate"] = {k: round(v, 4) for k, v in q.items()}
    bigger = dataclasses.replace(spec.cluster, num_nodes=spec.cluster.num_nodes + 1,
                                 prefill_nodes=spec.cluster.prefill_nodes)
    more = max_replicas(u, bigger)
    info["one_more_node"] = {"replicas": more, "planned_goodput_rps": round(more * s.unit_goodput, 3)}
    return info


def format_explanation(why: dict[str, Any]) -> str:
    lines = []
    for label, info in why.items():
        lines.append(f"{label.replace('_', '-')}: {info['unit']} — {info['unit_goodput_rps']} req/s per unit × "
                     f"{info['replicas']}; bottleneck: {info['bottleneck']}")
        if "phase_goodput_rps" in info:
            lines.append("  per phase (req/s): " + ", ".join(f"{k} {v}" for k, v in info["phase_goodput_rps"].items()))
        if "predicted_at_planned_rate" in info:
            q = info["predicted_at_planned_rate"]
            lines.append(f"  at the planned rate: TTFT p50/p90/p99 {q['ttft_p50']}/{q['ttft_p90']}/{q['ttft_p99']} s, "
                         f"TPOT {q['tpot_p50']}/{q['tpot_p90']}/{q['tpot_p99']} s")
        m = info["one_more_node"]
        lines.append(f"  one more node: {m['replicas']} replicas, {m['planned_goodput_rps']} req/s")
    return "\n".join(lines)
