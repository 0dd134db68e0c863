"""pdserve: disaggregated prefill/decode LLM serving on Ray.

`from pdserve import LLM, SamplingParams` is the offline API. `LLM` is imported lazily so that
torch-free parts (router, placement, bench) can import `pdserve.*` without loading torch.

The package root holds two kinds of module only. Contracts (config, types, models, tokenizer)
import nothing of pdserve but each other. Wiring (cli, serve, demo, llm; chaos_cli, chaos and
soak drive the whole system) may import anything. What both role actors run lives in
pdserve.runtime; the roles, engine, KV transfer, router, planner and bench live in their own
subpackages (README "Code map").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pdserve.types import GenerateRequest, SamplingParams, StepOutput

if TYPE_CHECKING:
    from pdserve.llm import LLM, LLMOptions, RequestOutput

__all__ = ["LLM", "LLMOptions", "RequestOutput", "SamplingParams", "GenerateRequest", "StepOutput"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("LLM", "LLMOptions", "RequestOutput"):
        from pdserve import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'pdserve' has no attribute {name!r}")
