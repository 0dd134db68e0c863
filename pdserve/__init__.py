"""pdserve: disaggregated prefill/decode LLM serving on Ray.

`from pdserve import LLM, SamplingParams` is the offline API. `LLM` is imported lazily so that
torch-free parts (router, placement, bench) can import `pdserve.*` without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pdserve.types import GenerateRequest, SamplingParams, StepOutput

if TYPE_CHECKING:
    from pdserve.llm import LLM, RequestOutput

__all__ = ["LLM", "RequestOutput", "SamplingParams", "GenerateRequest", "StepOutput"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("LLM", "RequestOutput"):
        from pdserve import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'pdserve' has no attribute {name!r}")
