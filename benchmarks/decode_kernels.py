"""The decode step's two native kernels on SmolLM2-135M's shapes, CPU time, one thread (issue 17).

  GEMV: every decoder layer's four projections (qkv, o, gate_up, down: 425 MB) at M rows, as a decode
        step meets them (not in cache: "cold"), and one layer's four repeated as often (in L2/L3: "hot").
  attention: decode attention of 16 sequences over 30 layers' paged caches at a context, the blocks
        of each sequence in order ("in order": a fresh pool) or shuffled (a pool after churn).

Run it on two trees to compare them (BENCHMARKS.md §1):

    python benchmarks/decode_kernels.py [--rows 1 4 8 12 16] [--contexts 100 400 1000]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pdserve.engine import kernels
from pdserve.engine.model_config import ModelConfig
from pdserve.models import resolve_model


def _median_s(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return sorted(times)[reps // 2]


LAYERS = 30  # SmolLM2-135M's decoder layers


def gemv(k: kernels.Kernels, hidden: int, q_out: int, inter: int, rows: list[int]) -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(q_out, hidden), (hidden, hidden), (2 * inter, hidden), (hidden, inter)]
    layer = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    cold = [torch.randn(s, generator=gen) * 0.02 for _ in range(LAYERS) for s in shapes]
    hot = layer * LAYERS
    flop = 2 * sum(w.numel() for w in cold)
    print(f"GEMV: {LAYERS} layers' projections, {sum(w.numel() for w in cold) * 4 / 1e6:.0f} MB")
    for m in rows:
        xs = {w.shape[1]: torch.randn(m, w.shape[1], generator=gen) for w in layer}
        cold_s = _median_s(lambda: [kernels.linear_small(k, xs[w.shape[1]], w) for w in cold])
        hot_s = _median_s(lambda: [kernels.linear_small(k, xs[w.shape[1]], w) for w in hot])
        print(f"  M={m:2d}: cold {cold_s * 1e3:6.2f} ms ({m * flop / cold_s / 1e9:5.1f} GFLOP/s), "
              f"hot {hot_s * 1e3:6.2f} ms ({m * flop / hot_s / 1e9:5.1f} GFLOP/s)", flush=True)


def attention(k: kernels.Kernels, h_q: int, h_kv: int, d: int, contexts: list[int], n: int = 16,
              block: int = 16) -> None:
    print(f"decode attention: {n} sequences x {LAYERS} layers, {h_q} query / {h_kv} KV heads of {d}, blocks of {block}")
    gen = torch.Generator().manual_seed(0)
    for ctx_len in contexts:
        per_seq = -(-ctx_len // block)
        pool = torch.randn(LAYERS, 2, n * per_seq, block, h_kv, d, generator=gen)
        ctx = torch.full((n,), ctx_len, dtype=torch.long)
        q = torch.randn(n, h_q, d, generator=gen)
        line = f"  context {ctx_len:4d}:"
        orders = (("in order", torch.arange(n * per_seq)), ("shuffled", torch.randperm(n * per_seq, generator=gen)))
        for name, ids in orders:
            tables = ids.view(n, per_seq).contiguous()
            t = _median_s(lambda: [kernels.decode_attention(k, q, pool[i, 0], pool[i, 1], tables, ctx, None)
                                   for i in range(LAYERS)])
            gbs = LAYERS * n * ctx_len * h_kv * d * 4 * 2 / t / 1e9
            line += f" {name} {t * 1e3:6.2f} ms ({gbs:4.1f} GB/s of KV);"
        print(line, flush=True)
        del pool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 12, 16])
    ap.add_argument("--contexts", type=int, nargs="+", default=[100, 400, 1000])
    args = ap.parse_args()
    torch.set_num_threads(1)
    k = kernels.load()
    if k is None:
        raise SystemExit(f"native kernels unavailable: {kernels.load_error()}")
    cfg = ModelConfig.from_hf(json.loads((resolve_model("smollm2-135m") / "config.json").read_text()))
    d = cfg.head_dim
    gemv(k, cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * d, cfg.intermediate_size, args.rows)
    attention(k, cfg.num_heads, cfg.num_kv_heads, d, args.contexts)


if __name__ == "__main__":
    main()
