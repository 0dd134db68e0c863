"""What an endpoint says about itself at `GET /v1/models`: the model to request and, from a pdserve
server, the deployment's shape (`deployment`: mode, instances × tp × pp per pool, `num_gpus`), so
per-GPU figures divide by what actually serves. Any other OpenAI server lists models only."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServedModel:
    id: str | None  # None: the endpoint lists no model (requests then send none)
    num_gpus: float | None = None  # None: the endpoint does not say
    shape: str | None = None  # e.g. "disaggregated: prefill 1 x (tp1, pp1), decode 1 x (tp1, pp1)"


def served_model(base_url: str, api_key: str | None = None, timeout_s: float = 10.0) -> ServedModel:
    """The endpoint's first listed model; an unreachable endpoint or a bad answer gives ServedModel(None)
    (the benchmark's warm-up then reports why the endpoint fails)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=timeout_s)
        data = resp.json().get("data") or []
    except (httpx.HTTPError, ValueError, AttributeError):
        return ServedModel(None)
    first = data[0] if data and isinstance(data[0], dict) else {}
    dep = first.get("deployment")
    if not isinstance(dep, dict) or not isinstance(dep.get("num_gpus"), (int, float)):
        return ServedModel(first.get("id"))
    return ServedModel(first.get("id"), float(dep["num_gpus"]), describe_shape(dep))


def describe_shape(dep: dict) -> str:
    pools = [r for r in ("prefill", "decode") if isinstance(dep.get(r), dict)]
    parts = [f"{r} {dep[r].get('instances')} x (tp{dep[r].get('tp')}, pp{dep[r].get('pp')})" for r in pools]
    return f"{dep.get('mode')}: {', '.join(parts)}"
