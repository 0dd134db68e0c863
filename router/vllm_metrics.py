"""The metrics vLLM users already chart, under vLLM's names and labels, next to pdserve's own.

Same meaning, same name: a dashboard or alert written for vLLM (`vllm:time_to_first_token_seconds
{model_name=...}`, `sum(vllm:num_requests_running)`, ...) works on pdserve unchanged. Histograms and
counters carry `model_name`; per-instance gauges add `engine` (the instance id, e.g. `decode-0`), so
summing by `model_name` gives the deployment's total as it does over vLLM's engines. Values come from
the same observations as the `pdserve_*` series (router/metrics.py feeds both).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pdserve.types import LatencyBreakdown

# Seconds; vLLM's own TTFT/ITL buckets are finer at the low end, ours also reach CPU latencies.
_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            20.0, 40.0, 80.0, 160.0)
# pdserve breakdown key -> vLLM's per-request phase histogram
PHASES = {"queue": "request_queue_time", "prefill": "request_prefill_time", "decode": "request_decode_time"}


class VllmMetrics:
    """The vLLM-named series for one served model; `observe_*` mirror RouterMetrics'."""

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        def hist(name: str, doc: str) -> Histogram:
            return Histogram(f"vllm:{name}_seconds", doc, ["model_name"], buckets=_LATENCY,
                             registry=registry).labels(model_name)

        self.model_name = model_name
        self.ttft = hist("time_to_first_token", "Histogram of time to first token in seconds.")
        self.itl = hist("inter_token_latency", "Histogram of inter-token latency in seconds.")
        self.tpot = hist("time_per_output_token", "Histogram of time per output token in seconds (per token gap, "
                                                  "as vLLM v0 and <= 0.10 export it).")
        self.request_tpot = hist("request_time_per_output_token",
                                 "Histogram of (e2e - TTFT) / (output tokens - 1), per request.")
        self.e2e = hist("e2e_request_latency", "Histogram of end to end request latency in seconds.")
        self.phase = {k: hist(name, f"Histogram of time spent in the {k} phase of a request, in seconds.")
                      for k, name in PHASES.items()}
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", ["model_name"],
                                     registry=registry).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.",
                                         ["model_name"], registry=registry).labels(model_name)
        self.success = Counter("vllm:request_success", "Count of successfully processed requests.",
                               ["model_name", "finished_reason"], registry=registry)

    def observe_finish(self, finish_reason: str, num_prompt: int, num_output: int,
                       latency: LatencyBreakdown | None) -> None:
        self.prompt_tokens.inc(num_prompt)
        self.generation_tokens.inc(num_output)
        if finish_reason in ("stop", "length"):
            self.success.labels(self.model_name, finish_reason).inc()
        if latency is None or finish_reason == "error":
            return
        seconds = latency.phases()
        for key, h in self.phase.items():
            h.observe(seconds[key])
        self.ttft.observe(latency.ttft_s)
        self.e2e.observe(latency.e2e_s)
        if num_output > 1:
            self.request_tpot.observe((latency.e2e_s - latency.ttft_s) / (num_output - 1))

    def observe_token_gap(self, gap_s: float) -> None:
        self.itl.observe(gap_s)
        self.tpot.observe(gap_s)


class VllmGauges(Collector):
    """vLLM's scheduler gauges, read from the router's instance view at scrape time. `stats` yields
    (engine id, running, waiting, kv usage fraction) per instance."""

    def __init__(self, model_name: str, stats: Callable[[], Iterable[tuple[str, float, float, float]]]) -> None:
        self.model_name, self.stats = model_name, stats

    def collect(self) -> Iterator[Metric]:
        labels = ["model_name", "engine"]
        running = GaugeMetricFamily("vllm:num_requests_running", "Number of requests in model execution batches.",
                                    labels=labels)
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                                    labels=labels)
        usage = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                                  labels=labels)
        for engine, num_running, num_waiting, kv in self.stats():
            running.add_metric([self.model_name, engine], num_running)
            waiting.add_metric([self.model_name, engine], num_waiting)
            usage.add_metric([self.model_name, engine], kv)
        yield from (running, waiting, usage)
