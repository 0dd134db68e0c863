"""The one way a decode instance's rank is built, for any (tp, pp): engine, receiver, worker, lock-step."""

from __future__ import annotations

from pdserve.config import ServingConfig
from pdserve.decode.agreed_receiver import AgreedReceiver
from pdserve.decode.scheduler import decode_options
from pdserve.decode.worker import DecodeWorker
from pdserve.engine.pipeline import RankLayout
from pdserve.engine.rank_loader import load_rank_engine
from pdserve.kvtransfer.factories import make_receiver
from pdserve.kvtransfer.listen import Listen
from pdserve.kvtransfer.reshard import rank_spans
from pdserve.runtime.lockstep import Agreement, LockStep


def build_decode_worker(cfg: ServingConfig, worker_id: str, ranks: RankLayout, init_method: str,
                        listen: Listen) -> LockStep:
    """Join the instance (world size > 1) and load this rank's engine; disaggregated, also its KV
    receiver, dialing out from `listen`. Colocated instances pull nothing: the worker prefills
    itself under `cfg.colocated_policy`. Collective: every rank of the instance calls it."""
    engine = load_rank_engine(cfg.model, cfg.engine, ranks, init_method)
    agreements: list[Agreement] = []
    receiver = None
    if cfg.mode == "disaggregated":
        layers, heads = rank_spans(engine.model.start, engine.layout, ranks.tp_rank)
        receiver = AgreedReceiver(make_receiver(cfg.kvtransfer, engine.pool, listen=listen, layers=layers,
                                                heads=heads))
        agreements.append(receiver)
    worker = DecodeWorker(engine, decode_options(cfg), receiver=receiver, worker_id=worker_id)
    return LockStep(worker, agreements, ranks)
