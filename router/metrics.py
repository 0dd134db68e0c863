"""Prometheus metrics of the router, in a registry of its own (no process globals).

Latencies are observed per request by the server as outputs stream (TTFT, inter-token, end-to-end)
and from the breakdown on the last output (queue, prefill, KV transfer, decode). Per-instance
gauges (running, waiting, KV usage, health) are read from the router's pools at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pdserve.router.core import Router
from pdserve.router.pool import Instance
from pdserve.router.vllm_metrics import VllmGauges, VllmMetrics
from pdserve.types import LatencyBreakdown

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds; wide because CPU instances are slow and GPU ones fast.
_LATENCY = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# breakdown phase -> metric name
_BREAKDOWN = {"queue": "queue", "prefill": "prefill", "transfer": "kv_transfer", "decode": "decode"}


class RouterMetrics:
    def __init__(self, router: Router | None = None, model_name: str | None = None) -> None:
        """With `model_name`, the vLLM-named series (router/vllm_metrics.py) are exported too."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.vllm = VllmMetrics(r, model_name) if model_name else None
        def hist(name: str, doc: str) -> Histogram:
            return Histogram(f"pdserve_{name}_seconds", doc, buckets=_LATENCY, registry=r)

        self.ttft = hist("time_to_first_token", "Arrival to first token")
        self.itl = hist("inter_token_latency", "Gap between consecutive outputs, per token")
        self.tpot = hist("time_per_output_token", "(e2e - TTFT) / (output tokens - 1), per request")
        self.e2e = hist("e2e_request_latency", "Arrival to last token")
        self.phase = {p: hist(f"{name}_time", f"Per-request {name} time") for p, name in _BREAKDOWN.items()}
        self.phase_queue = Histogram("pdserve_phase_queue_time_seconds", "Per-request wait in each phase's queue: "
                                     "prefill (colocated: the one queue), decode (admission and KV memory)",
                                     ["phase"], buckets=_LATENCY, registry=r)
        self.transfer_bytes = Counter("pdserve_kv_transfer_bytes", "KV bytes moved prefill -> decode", registry=r)
        self.requests = Counter("pdserve_requests", "Finished requests", ["finish_reason"], registry=r)
        self.rejected = Counter("pdserve_rejected_requests", "Requests refused before dispatch", ["status"], registry=r)
        self.prompt_tokens = Counter("pdserve_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("pdserve_generation_tokens", "Tokens sent to clients", registry=r)
        self.local_prefill_tokens = Counter("pdserve_pd_local_prefill_tokens", "Prompt tokens decode instances "
                                            "computed in local prefills (conditional disaggregation), cache hits "
                                            "not counted", registry=r)
        if router is not None:
            r.register(_PoolCollector(router))
            if model_name:
                r.register(VllmGauges(model_name, lambda: _instance_rows(router)))

    def observe_finish(self, finish_reason: str, num_prompt: int, num_output: int,
                       latency: LatencyBreakdown | None) -> None:
        if self.vllm is not None:
            self.vllm.observe_finish(finish_reason, num_prompt, num_output, latency)
        self.requests.labels(finish_reason).inc()
        self.prompt_tokens.inc(num_prompt)
        self.generation_tokens.inc(num_output)
        if latency is None or finish_reason == "error":
            return
        for phase, seconds in latency.phases().items():
            self.phase[phase].observe(seconds)
        self.phase_queue.labels("prefill").observe(latency.prefill_queue_s)
        if latency.decode_queue_s is not None:  # the KV was pulled: the decode pool's wait
            self.phase_queue.labels("decode").observe(latency.decode_queue_s)
        self.ttft.observe(latency.ttft_s)
        self.e2e.observe(latency.e2e_s)
        if num_output > 1:
            self.tpot.observe((latency.e2e_s - latency.ttft_s) / (num_output - 1))
        self.transfer_bytes.inc(latency.transfer_bytes or 0)
        if latency.pd_local:
            self.local_prefill_tokens.inc(max(0, num_prompt - latency.cached_tokens))

    def observe_gap(self, gap_s: float, num_tokens: int) -> None:
        for _ in range(max(1, num_tokens)):
            self.itl.observe(gap_s / max(1, num_tokens))
            if self.vllm is not None:
                self.vllm.observe_token_gap(gap_s / max(1, num_tokens))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _instance_rows(router: Router) -> Iterator[tuple[str, float, float, float]]:
    """(instance id, running, waiting, KV usage) of every instance, as the vLLM gauges want them."""
    for pool in (router.prefill, router.decode):
        for inst in pool.instances.values():
            yield inst.worker_id, inst.snapshot().num_running, inst.stats.num_waiting, inst.stats.kv_usage


# Per-instance series: (kind, name after pdserve_instance_, help, value). The router's own counts
# (running, outstanding tokens, health) are current; the others are the instance's polled stats.
_INSTANCE_SERIES: tuple[tuple[str, str, str, Callable[[Instance[Any]], float]], ...] = (
    ("gauge", "running_requests", "Requests running (router view)", lambda i: i.snapshot().num_running),
    ("gauge", "waiting_requests", "Requests queued (worker view)", lambda i: i.stats.num_waiting),
    ("gauge", "kv_usage_ratio", "Fraction of KV blocks in use", lambda i: i.stats.kv_usage),
    ("gauge", "healthy", "1 if the instance is serving", lambda i: float(i.healthy)),
    ("gauge", "unavailable", "1 if Ray cannot reach the instance for now (not dead; out of dispatch)",
     lambda i: float(i.state == "unavailable")),
    ("gauge", "outstanding_prompt_tokens", "Prompt tokens dispatched, not answered", lambda i: i.outstanding_tokens),
    ("counter", "engine_busy_seconds", "Seconds the instance spent in engine steps (worker view)",
     lambda i: i.stats.busy_s),
    ("counter", "engine_steps", "Engine steps that ran a batch", lambda i: i.stats.num_steps),
    ("counter", "engine_step_tokens", "Tokens run through the model, all steps", lambda i: i.stats.num_step_tokens),
    ("counter", "engine_failed_steps", "Engine steps that raised (their requests failed)",
     lambda i: i.stats.num_failed_steps),
    ("counter", "engine_fallback_steps", "Engine steps run without the native CPU kernels (slower path)",
     lambda i: i.stats.num_fallback_steps),
    ("counter", "prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache",
     lambda i: i.stats.prefix_cache_queried_tokens),
    ("counter", "prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache (not computed or pulled)",
     lambda i: i.stats.prefix_cache_hit_tokens),
)


class _PoolCollector(Collector):
    """Reads the router's pools at scrape time: no copies to keep in sync."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def collect(self) -> Iterator[Metric]:
        families = {name: (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
            f"pdserve_instance_{name}", doc, labels=["role", "instance"]) for kind, name, doc, _ in _INSTANCE_SERIES}
        failures = CounterMetricFamily("pdserve_worker_failures", "Instances seen dying", labels=["role"])
        for pool in (self.router.prefill, self.router.decode):
            for inst in pool.instances.values():
                for _, name, _, value in _INSTANCE_SERIES:
                    families[name].add_metric([pool.role, inst.worker_id], value(inst))
            failures.add_metric([pool.role], pool.num_failures)
        yield from families.values()
        yield failures
        yield _kv_pulls(self.router)
        yield _pd_decisions(self.router)
        yield CounterMetricFamily("pdserve_redispatched_requests", "Requests moved to another instance after a failure",
                                  value=self.router.num_redispatched)
        yield CounterMetricFamily("pdserve_retried_requests", "Requests retried once after a worker step failed on them",
                                  value=self.router.num_retried)
        yield CounterMetricFamily("pdserve_poison_requests", "Requests ended with an error: their step failed twice",
                                  value=self.router.num_poison)
        yield GaugeMetricFamily("pdserve_pending_requests", "Requests admitted and not finished",
                                value=len(self.router.requests))


def _kv_pulls(router: Router) -> Metric:
    """Decode instances' KV pulls by outcome (worker view): a recompute is never silent."""
    pulls = CounterMetricFamily("pdserve_kv_pulls", "KV pulls by decode instance and outcome "
                                "(ok, failed, timed_out; recomputed: prompts decode recomputed, after a "
                                "failed pull or with no KV to pull; never a local prefill the router chose)",
                                labels=["instance", "outcome"])
    for inst in router.decode.instances.values():
        for outcome in ("ok", "failed", "timed_out", "recomputed"):
            pulls.add_metric([inst.worker_id, outcome], inst.stats.kv_pulls.get(outcome, 0))
    return pulls


def _pd_decisions(router: Router) -> Metric:
    """Conditional disaggregation's decisions (router/conditional.py), none when it is off."""
    family = CounterMetricFamily("pdserve_pd_decisions", "Per-request prefill placement decisions: local (the "
                                 "decode instance prefills) or remote (prefill pool + KV transfer), by reason",
                                 labels=["decision", "reason"])
    for (decision, reason), n in sorted((router.conditional.decisions if router.conditional else {}).items()):
        family.add_metric([decision, reason], n)
    return family
