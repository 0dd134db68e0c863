"""The reuse settings of a serving config as the simulator models them, both ways: `of_serving`
reads them from a `ServingConfig` (`pdserve simulate`), `apply` puts them on a `SimDeployment`
(`pdserve simulate` and the mode search alike), `deploy_fields` writes them into a plan's
deployment (`pdserve plan --compare-modes`), so what was simulated is what is served.

  engine.enable_prefix_caching            prefix caches on every instance (sim_reuse.py)
  router.prefill_policy / decode_policy   cache_aware on both, or least_tokens / least_kv on both
  router.pd_threshold_tokens,             conditional disaggregation (sim_cond.py: router/pd_decision.py)
  router.pd_prefill_queue_limit
  decode.max_num_batched_tokens           the step budget of an engine that chunks prompts: a colocated
                                          chunked engine's chunk, or a decode instance's local prefills
                                          (decodes + local chunk ≤ the budget, as decode/scheduler.py)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from pdserve.config import RouterConfig, ServingConfig
from pdserve.placement.sim_deployment import SimDeployment

_PLAIN = {"prefill_policy": RouterConfig.prefill_policy, "decode_policy": RouterConfig.decode_policy}


@dataclass(frozen=True, kw_only=True)
class ReuseSettings:
    prefix_caching: bool = False
    cache_aware: bool = False  # the router's cache_aware policies on both pools
    pd_threshold_tokens: int = 0
    pd_prefill_queue_limit: int | None = None
    chunk_size: int | None = None
    """Tokens per step of an engine that chunks prompts (colocated chunked, or a decode instance's
    local prefills); None: no engine chunks (the simulator's default is unused)."""

    @property
    def conditional(self) -> bool:
        return self.pd_threshold_tokens > 0 or self.pd_prefill_queue_limit is not None

    @classmethod
    def of_serving(cls, cfg: ServingConfig) -> ReuseSettings:
        """What `cfg` serves. ValueError naming the field for a router policy the simulator does
        not model (round_robin, or cache_aware on one pool only)."""
        r = cfg.router
        names = {"prefill_policy": r.prefill_policy, "decode_policy": r.decode_policy}
        pools = ("decode_policy",) if cfg.mode == "colocated" else ("prefill_policy", "decode_policy")
        aware = {n: names[n] == "cache_aware" for n in pools}
        for n in pools:
            if names[n] not in ("cache_aware", _PLAIN[n]):
                raise ValueError(f"simulate: router.{n}: {names[n]} is not simulated (cache_aware or {_PLAIN[n]})")
        if len(set(aware.values())) > 1:
            raise ValueError("simulate: router.prefill_policy and router.decode_policy: the simulator models "
                             "cache_aware on both pools or on neither")
        conditional = r.pd_threshold_tokens > 0 or r.pd_prefill_queue_limit is not None
        chunks = conditional or (cfg.mode == "colocated" and cfg.colocated_policy == "chunked")
        return cls(prefix_caching=cfg.engine.enable_prefix_caching, cache_aware=all(aware.values()),
                   pd_threshold_tokens=r.pd_threshold_tokens, pd_prefill_queue_limit=r.pd_prefill_queue_limit,
                   chunk_size=cfg.decode.max_num_batched_tokens if chunks else None)

    def apply(self, dep: SimDeployment) -> SimDeployment:
        """`dep` serving with these settings."""
        chunk = {"chunk_size": self.chunk_size} if self.chunk_size is not None else {}
        return replace(dep, prefix_caching=self.prefix_caching, cache_aware=self.cache_aware,
                       pd_threshold_tokens=self.pd_threshold_tokens, pd_prefill_queue_limit=self.pd_prefill_queue_limit,
                       **chunk)

    def deploy_fields(self, deploy: dict[str, Any]) -> dict[str, Any]:
        """A plan's `deploy` section (plan.py's `serving_config` reads it) with these settings: the
        engine's prefix caching, the router's policies and decider, and the decode pool's budget."""
        engine = {**deploy.get("engine", {}), "enable_prefix_caching": self.prefix_caching}
        policy = {n: "cache_aware" if self.cache_aware else v for n, v in _PLAIN.items()}
        router = {**policy, "pd_threshold_tokens": self.pd_threshold_tokens,
                  "pd_prefill_queue_limit": self.pd_prefill_queue_limit}
        pools = dict(deploy.get("pools", {}))
        if self.chunk_size is not None:
            pools["decode"] = {**pools.get("decode", {}), "max_num_batched_tokens": self.chunk_size}
        return {**deploy, "engine": engine, "router": router, "pools": pools}
