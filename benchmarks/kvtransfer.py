"""KV-transfer benchmark on SmolLM2-135M: codec ratio / speed / quality, transport efficiency, TTFT.

    python benchmarks/kvtransfer.py [--docs 8] [--context 512] [--continuation 256] [--skip-quality]
                                    [--transports-only]

Codecs: bytes on the wire (frame headers and chunk prefixes included) vs raw fp32 and vs the
bf16-equivalent bytes; encode/decode GB/s of fp32 cache bytes on this CPU (one thread); quality
teacher-forced over real ShareGPT text: the context's KV goes through the codec, then the
continuation runs on top of it; top-1 agreement and mean KL(p_raw || p_codec) per continuation token.
Transports: a 64 MiB KV pull through KVSender/KVReceiver (raw codec) vs the same transport moving
64 MiB of plain 4 MiB chunks in the same run; torch both as wire bytes and over its tensor lane.
TTFT: exposed transfer time after a 1024-token prefill, with the pull starting after prefill vs
streaming layer by layer during it.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from pdserve.config import EngineConfig, KVTransferConfig
from pdserve.engine.batch import Batch, Chunk
from pdserve.engine.engine import Engine
from pdserve.engine.kv_cache import BlockAllocator, KVLayout, KVPool
from pdserve.engine.request import RequestStatus
from pdserve.kvtransfer import wire
from pdserve.kvtransfer.codecs import CODEC_NAMES, get_codec
from pdserve.kvtransfer.factories import make_receiver, make_sender, make_transport
from pdserve.kvtransfer.listen import Listen
from pdserve.kvtransfer.reshard import gather_slab, scatter_slab, token_slots
from pdserve.kvtransfer.types import TransferId, TransferStatus
from pdserve.types import GenerateRequest, RequestId, SamplingParams


LOCAL = Listen.on("127.0.0.1")  # both ends on this machine


def sharegpt_texts(n: int, min_tokens: int, tok: object, seed: int = 0) -> list[list[int]]:
    from pdserve.bench.sharegpt import load_conversations

    convs = list(load_conversations(min_turns=3))
    random.Random(seed).shuffle(convs)
    docs = []
    for turns in convs:
        ids = tok.encode("\n\n".join(turns))
        if len(ids) >= min_tokens:
            docs.append(ids[:min_tokens])
        if len(docs) == n:
            return docs
    raise SystemExit("not enough long ShareGPT conversations")


def _layer_slabs(eng: Engine, blocks: list[int], n: int) -> list[torch.Tensor]:
    slots = token_slots(blocks, eng.layout.block_size, n, eng.device)
    return [gather_slab(eng.pool, i, slots, slice(None)).clone() for i in range(eng.layout.num_layers)]


def codec_quality(eng: Engine, docs: list[list[int]], ctx: int) -> None:
    stats = {c: {"agree": 0, "kl": 0.0, "wire": 0, "enc_s": 0.0, "dec_s": 0.0} for c in CODEC_NAMES}
    raw_bytes, total = 0, 0
    for d, ids in enumerate(docs):
        req = eng.add_request(GenerateRequest(RequestId(f"d{d}"), tuple(ids), SamplingParams(temperature=0)))
        assert eng.ensure_blocks(req, len(ids))
        req.status = RequestStatus.RUNNING
        eng.runner.forward([Chunk(req, ctx)])
        req.num_computed_tokens = ctx
        slots = token_slots(req.block_table, eng.layout.block_size, ctx, eng.device)
        slabs = _layer_slabs(eng, req.block_table, ctx)
        raw_bytes += sum(s.numel() * 4 for s in slabs)
        ref = None
        for name in CODEC_NAMES:
            codec = get_codec(name)
            for i, slab in enumerate(slabs):
                t0 = time.perf_counter()
                parts = codec.encode(slab)
                t1 = time.perf_counter()
                out = codec.decode(parts, slab.shape, slab.dtype)
                t2 = time.perf_counter()
                chunks = list(wire.encode_frame(name, slab.dtype, slab.shape, i, 0, parts))
                st = stats[name]
                st["enc_s"] += t1 - t0
                st["dec_s"] += t2 - t1
                st["wire"] += sum(len(c) for c in chunks)
                scatter_slab(eng.pool, i, slots, slice(None), out)
            logits = eng.runner.execute([Chunk(req, len(ids) - ctx)], all_positions=True).float()
            logp = torch.log_softmax(logits, -1)
            if ref is None:
                ref = logp
            st = stats[name]
            st["agree"] += int((logp.argmax(-1) == ref.argmax(-1)).sum())
            st["kl"] += float((ref.exp() * (ref - logp)).sum(-1).sum())
        total += ref.shape[0]
        eng.free(req)
    print(f"\n## Codecs (SmolLM2-135M, {len(docs)} ShareGPT docs, context {ctx}, {total} continuation tokens)")
    print("| codec | x vs fp32 | x vs bf16-equiv | encode GB/s | decode GB/s | top-1 agreement | mean KL |")
    print("|---|---|---|---|---|---|---|")
    for name, st in stats.items():
        print(f"| {name} | {raw_bytes / st['wire']:.2f} | {raw_bytes / 2 / st['wire']:.2f} | "
              f"{raw_bytes / st['enc_s'] / 1e9:.2f} | {raw_bytes / st['dec_s'] / 1e9:.2f} | "
              f"{100 * st['agree'] / total:.2f}% | {st['kl'] / total:.2e} |")


def _plain_gbps(name: str, nbytes: int) -> float:
    tx, rx = make_transport(name, LOCAL).start(), make_transport(name, LOCAL, serve=False).start()
    payload = [bytes(4 << 20) for _ in range(nbytes // (4 << 20))]
    best = float("inf")
    for i in range(3):
        info = rx.connect_info(tx.endpoint())
        t0 = time.perf_counter()
        r = rx.recv(TransferId(f"p{i}"), tx.endpoint(), lambda c: None, 60)
        tx.send(TransferId(f"p{i}"), iter(payload), info, 60)
        assert r.wait(60) is TransferStatus.DONE, r.error
        best = min(best, time.perf_counter() - t0)
    tx.close()
    rx.close()
    return nbytes / best / 1e9


def transports(nbytes: int = 64 << 20) -> None:
    lay = KVLayout(30, 3, 64, 16)  # SmolLM2-135M, fp32
    n = nbytes // lay.bytes_per_token
    print(f"\n## Transports (64 MiB = {n} tokens of SmolLM2 KV, raw codec, localhost)")
    print("| transport | plain bytes GB/s | KV pull GB/s | effective / plain | CPU ms per pull (both ends) |")
    print("|---|---|---|---|---|")
    plains: dict[str, float] = {}
    for name, lane in (("loopback", "auto"), ("grpc", "auto"), ("torch", "off"), ("torch", "auto")):
        plain = plains[name] = plains.get(name) or _plain_gbps(name, nbytes)
        cfg = KVTransferConfig(transport=name, codec="raw", timeout_s=60, tensor_lane=lane)  # type: ignore[arg-type]
        sp, dp = KVPool(lay, lay.num_blocks_for(n) + 1), KVPool(lay, lay.num_blocks_for(n) + 1)
        sp.kv.normal_()
        sa = BlockAllocator(sp.num_blocks)
        tx, rx = make_sender(cfg, sp, sa, listen=LOCAL), make_receiver(cfg, dp, listen=LOCAL)
        blocks = sa.allocate(lay.num_blocks_for(n))
        best, cpu = float("inf"), float("inf")
        for i in range(4):  # the first pull forms the torch pair (and its lane): not counted
            h = tx.export(f"r{i}", blocks, n)
            t0, c0 = time.perf_counter(), time.process_time()
            x = rx.pull(h, blocks)
            assert rx.wait(x, 120) is TransferStatus.DONE, rx.poll(x)
            if i:
                best, cpu = min(best, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
        kv = n * lay.bytes_per_token / best / 1e9
        label = name if name != "torch" else f"torch ({'gloo, wire bytes' if lane == 'off' else 'gloo tensor lane'})"
        print(f"| {label} | {plain:.2f} | {kv:.2f} | {kv / plain:.2f} | {cpu * 1e3:.0f} |")
        rx.close()
        tx.close()


def ttft(eng: Engine, prompt: list[int], transport: str, codec: str) -> None:
    cfg = KVTransferConfig(transport=transport, codec=codec, timeout_s=60)
    dpool = KVPool(eng.layout, eng.layout.num_blocks_for(len(prompt)) + 1)
    rows = []
    for streaming in (False, True, False, True):
        tx, rx = make_sender(cfg, eng.pool, eng.allocator, listen=LOCAL), make_receiver(cfg, dpool, listen=LOCAL)
        req = eng.add_request(GenerateRequest(RequestId("t"), tuple(prompt), SamplingParams(temperature=0)))
        assert eng.ensure_blocks(req, len(prompt))
        req.status = RequestStatus.RUNNING
        dst = list(range(eng.layout.num_blocks_for(len(prompt))))
        t0 = time.perf_counter()
        if streaming:
            h = tx.export("t", req.block_table, len(prompt), streaming=True)
            x = rx.pull(h, dst)
        eng.step(Batch((Chunk(req, len(prompt)),)), layer_hook=tx.layer_hook if streaming else None)
        t1 = time.perf_counter()
        if not streaming:
            x = rx.pull(tx.export("t", req.block_table, len(prompt)), dst)
        assert rx.wait(x, 120) is TransferStatus.DONE, rx.poll(x)
        t2 = time.perf_counter()
        rows.append((streaming, t1 - t0, t2 - t1))
        eng.free(req)
        rx.close()
        tx.close()
        deadline = time.monotonic() + 5
        while tx.num_exports and time.monotonic() < deadline:
            tx.poll()
            time.sleep(0.01)
    plain = min(r[2] for r in rows if not r[0])
    stream = min(r[2] for r in rows if r[0])
    prefill = min(r[1] for r in rows)
    print(f"| {transport} | {codec} | {prefill * 1e3:.0f} | {plain * 1e3:.1f} | {stream * 1e3:.1f} | "
          f"{100 * (1 - stream / plain):.0f}% |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--continuation", type=int, default=256)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--transports-only", action="store_true", help="only the transport table (no model, no data)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.transports_only:
        return transports()
    eng = Engine.from_config("smollm2-135m", EngineConfig(kv_cache_memory_gb=0.5, max_model_len=2048))
    docs = sharegpt_texts(args.docs, max(args.context + args.continuation, 1024), eng.tokenizer)
    if not args.skip_quality:
        codec_quality(eng, [d[:args.context + args.continuation] for d in docs], args.context)
    transports()
    print("\n## TTFT overhead of the transfer after a 1024-token prefill (SmolLM2-135M, ms)")
    print("| transport | codec | prefill | exposed, pull after prefill | exposed, layer-wise streaming | hidden |")
    print("|---|---|---|---|---|---|")
    for transport, codec in (("grpc", "raw"), ("torch", "raw"), ("grpc", "int8")):
        ttft(eng, docs[0][:1024], transport, codec)


if __name__ == "__main__":
    main()
