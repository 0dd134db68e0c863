"""pdserve.router: the OpenAI-compatible front door and the request lifecycle across the pools.

  protocols.py   PrefillClient / DecodeClient seams and the two boundary errors
  policies.py    dispatch policies (pure functions over stats snapshots)
  pool.py        one pool's instances: health, load counts, stats polling
  core.py        Router: admission, dispatch, failover, abort (no HTTP, no Ray)
  openai_api.py  request parsing and validation -> token ids + SamplingParams
  responses.py   OpenAI response bodies and SSE chunks
  server.py      FastAPI app (`build_app`)
  metrics.py     Prometheus metrics in the router's own registry
  actor.py       RouterActor (uvicorn inside a Ray actor) and Ray handle adapters

May import: pdserve.kvtransfer.types (KVHandle), the contracts (config, types) and its own
modules. Never torch, the engine, a role or the runtime; only actor.py imports ray.
"""
