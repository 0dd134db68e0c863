"""pdserve.prefill: the prefill role — FCFS scheduler, PrefillWorker (plain class), the one rank
build path for any (tp, pp) (build.py, with agreed_sender.py's frees across ranks), and
PrefillActor (the Ray shell).

May import: pdserve.engine, pdserve.kvtransfer, pdserve.runtime and the contracts (config, types).
Never decode, the router or placement; only actor.py imports ray.
"""
