"""pdserve.engine: the one inference engine both roles run — model, paged KV cache, runner,
sampler, weights, tensor and pipeline parallelism, and rank_loader.py (the engine one rank of
any (tp, pp) loads).

May import: torch and the contracts (config, types, models, tokenizer). Never ray, never
kvtransfer, never a role, the runtime, the router or placement.
"""
