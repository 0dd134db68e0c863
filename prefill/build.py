"""The one way a prefill instance's rank is built, for any (tp, pp): engine, sender, worker, lock-step."""

from __future__ import annotations

from pdserve.config import ServingConfig
from pdserve.engine.pipeline import RankLayout
from pdserve.engine.rank_loader import load_rank_engine
from pdserve.kvtransfer.factories import make_sender
from pdserve.kvtransfer.listen import Listen
from pdserve.kvtransfer.reshard import rank_spans
from pdserve.prefill.agreed_sender import AgreedSender, RecordingAllocator
from pdserve.prefill.worker import PrefillWorker
from pdserve.runtime.lockstep import LockStep, all_gather


def build_prefill_worker(cfg: ServingConfig, worker_id: str, ranks: RankLayout, init_method: str,
                         listen: Listen) -> LockStep:
    """Join the instance (world size > 1), load this rank's engine and start its sender, serving at
    once on `listen`. Collective: every rank of the instance calls it, rank 0 with the actor's
    `init_method` rendezvous and the others with the same."""
    engine = load_rank_engine(cfg.model, cfg.engine, ranks, init_method)
    layers, heads = rank_spans(engine.model.start, engine.layout, ranks.tp_rank)
    recorder = RecordingAllocator(engine.allocator)
    mcfg = engine.model_config
    sender = make_sender(cfg.kvtransfer, engine.pool, recorder, listen=listen, layers=layers,
                         heads=heads).with_model_shape(mcfg.num_layers, mcfg.num_kv_heads)
    peers = all_gather((sender.address, layers, heads), ranks)
    agreed = AgreedSender(sender, recorder, peers, ranks)
    worker = PrefillWorker(engine, cfg.prefill.max_num_seqs, cfg.prefill.max_num_batched_tokens, agreed,
                           worker_id=worker_id)
    return LockStep(worker, [agreed], ranks)
