"""pdserve.bench: the goodput benchmark. Workloads from real data and lengths files (the one lengths
reader), arrivals (the one arrival process, which the planner's traces use too), the load
generator, SLO attainment and goodput analysis against `pdserve.config.SLOConfig`, results and plots.

May import: HTTP client libraries and the contracts (`pdserve.config`, `pdserve.models` for
tokenizers); never the server's internals, so it benchmarks any OpenAI-compatible endpoint.
"""
