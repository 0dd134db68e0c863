"""pdserve.decode: the decode role and the colocated policies — DecodeScheduler, DecodeWorker
(plain class), the one rank build path for any (tp, pp) (build.py, with agreed_receiver.py's pull
outcomes across ranks), and DecodeActor (the Ray shell).

May import: pdserve.engine, pdserve.kvtransfer, pdserve.runtime and the contracts (config, types).
Never prefill, the router or placement; only actor.py imports ray.
"""
