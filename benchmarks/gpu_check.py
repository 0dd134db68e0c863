"""GPU check: every GPU code path of the engine and the KV path, on one machine, in one command.

    python benchmarks/gpu_check.py --out gpu-check              # a CUDA box: < 8 min on one H200
    python benchmarks/gpu_check.py --device cpu --out /tmp/gc   # the same checks on CPU (minutes)

Needs only torch, transformers, safetensors, tokenizers and numpy (pyyaml comes with transformers):
no Ray, no gRPC, no download. Run from a checkout; pdserve need not be installed (the repo's
folders are mapped onto `pdserve.*`), and a missing `zstandard` is replaced by an identity stub
(recorded in the output: int4_zstd then round-trips without its entropy stage).

Models are random-weight checkpoints saved with transformers into --workdir: a GQA Llama (hidden
512, 4 layers, 8 q / 2 kv heads, head_dim 64) and a Qwen2 (tied embeddings, qkv bias) for parity,
and a Llama-shaped ~1.1B model (hidden 2048, 16 layers, 32 / 8 heads) for speed. On CPU every size
is smaller (parity: hidden 128, 2 layers; speed: hidden 256, 4 layers; 8 decode steps, not 32), so
the same checks and the same output format come back in minutes on a laptop. Each check runs in
its own process with a timeout (a broken NCCL or CUDA path
may crash rather than raise) and reports `ok` and its figures; the results go to
<out>/gpu_check.json and a table to <out>/gpu_check.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]


def _import_pdserve() -> str:
    """'installed', or 'checkout' after mapping the repo's folders onto pdserve.* (no pip needed)."""
    try:
        import pdserve.engine.engine  # noqa: F401

        return "installed"
    except ImportError:
        sys.path.insert(0, str(REPO))
        for m in [m for m in sys.modules if m == "pdserve" or m.startswith("pdserve.")]:
            del sys.modules[m]
        import pdserve

        pdserve.__path__.append(str(REPO))
        return "checkout"


def _zstd() -> str:
    try:
        import zstandard  # noqa: F401

        return "zstandard"
    except ImportError:
        stub = types.ModuleType("zstandard")

        class ZstdError(Exception):
            pass

        class ZstdCompressor:
            def __init__(self, level: int = 3) -> None:
                pass

            def compress(self, data: bytes) -> bytes:
                return bytes(data)

        class ZstdDecompressor:
            def decompress(self, data: bytes, max_output_size: int = 0) -> bytes:
                return bytes(data)

        stub.ZstdError, stub.ZstdCompressor, stub.ZstdDecompressor = ZstdError, ZstdCompressor, ZstdDecompressor
        sys.modules["zstandard"] = stub
        return "identity stub"


# ---- models -------------------------------------------------------------------------------------

_STD = {"rms_norm_eps": 1e-6, "initializer_range": 0.1}  # std 0.1: greedy argmaxes are not near-ties
PARITY = {"cuda": {"vocab_size": 1024, "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 4,
                   "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
                   "max_position_embeddings": 1024, **_STD},
          "cpu": {"vocab_size": 256, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                  "max_position_embeddings": 1024, **_STD}}
SPEED = {"cuda": {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                  "max_position_embeddings": 4096},
         "cpu": {"vocab_size": 1024, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                 "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 1024}}


def save_models(workdir: Path, device: str) -> dict[str, str]:
    import torch
    import transformers

    out = {}
    for name, (cfg_cls, model_cls, extra) in {
        "llama": ("LlamaConfig", "LlamaForCausalLM", {**PARITY[device], "tie_word_embeddings": False}),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**PARITY[device], "tie_word_embeddings": True}),
        "speed": ("LlamaConfig", "LlamaForCausalLM", {**SPEED[device], "tie_word_embeddings": False}),
    }.items():
        path = workdir / name
        out[name] = str(path)
        if (path / "config.json").exists():
            continue
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**extra))
        with torch.no_grad():  # transformers starts biases at 0 and norms at 1: make them matter
            for pname, p in model.named_parameters():
                if pname.endswith("bias") or "norm" in pname:
                    p.add_(0.1 * torch.randn_like(p))
        model.to(torch.bfloat16 if name == "speed" and device == "cuda" else torch.float32).save_pretrained(path)
    return out


# ---- helpers ------------------------------------------------------------------------------------

def _sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _engine(path: str, device: str, **kw: Any) -> Any:
    from pdserve.config import EngineConfig
    from pdserve.engine.engine import Engine

    cfg = EngineConfig(device=device, gpu_memory_utilization=None, **kw)  # type: ignore[arg-type]
    return Engine.from_config(path, cfg)


def _hf(path: str, engine: Any) -> Any:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=engine.pool.kv.dtype).to(
        engine.device).eval()


def _generate(engine: Any, prompts: list[list[int]], n: int, policy: str, budget: int) -> list[list[int]]:
    from pdserve.decode.scheduler import DecodeOptions
    from pdserve.decode.worker import DecodeWorker
    from pdserve.types import GenerateRequest, RequestId, SamplingParams

    options = DecodeOptions(policy, max_num_seqs=64, max_num_batched_tokens=budget)  # type: ignore[arg-type]
    worker = DecodeWorker(engine, options)
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    return worker.run_to_completion([GenerateRequest(RequestId(f"r{i}"), tuple(p), params)
                                     for i, p in enumerate(prompts)])


def _prompts(vocab: int, lengths: list[int]) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


# ---- checks -------------------------------------------------------------------------------------

def check_load(models: dict[str, str], device: str) -> dict[str, Any]:
    """Device and dtype take effect (params, pool, rope) and the peak memory of a load."""
    import torch

    from pdserve.engine.device import resolve_device_dtype
    from pdserve.config import EngineConfig

    res: dict[str, Any] = {"auto_resolves_to": [str(x) for x in resolve_device_dtype(EngineConfig())]}
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    engine = _engine(models["speed"], device, kv_cache_memory_gb=0.05)
    params = list(engine.model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in params)
    tensors = params + [engine.pool.kv, engine.model.rope.cos]
    want_dtype = torch.bfloat16 if cuda else torch.float32
    res.update(device=str(engine.device), dtype=str(engine.pool.kv.dtype), param_gb=round(nbytes / 1e9, 3),
               all_on_device=all(t.device == engine.device for t in tensors),
               all_in_dtype=all(t.dtype == want_dtype for t in tensors))
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        res.update(peak_gb=round(peak / 1e9, 3), peak_over_params=round(peak / nbytes, 2))
    res["ok"] = res["all_on_device"] and res["all_in_dtype"] and res.get("peak_over_params", 1.0) < 1.5
    return res


def check_parity(models: dict[str, str], device: str) -> dict[str, Any]:
    """Logits and greedy tokens vs transformers, same device and dtype, prefill-priority and chunked."""
    import torch

    from pdserve.engine.batch import Chunk
    from pdserve.engine.request import RequestStatus
    from pdserve.types import GenerateRequest, RequestId, SamplingParams

    res: dict[str, Any] = {"ok": True}
    for name in ("llama", "qwen2"):
        engine = _engine(models[name], device, kv_cache_memory_gb=0.2, max_model_len=512)
        hf = _hf(models[name], engine)
        prompts = _prompts(engine.model_config.vocab_size, [5, 37, 120])
        req = engine.add_request(GenerateRequest(RequestId("x"), tuple(prompts[2]), SamplingParams()))
        req.status = RequestStatus.RUNNING
        engine.ensure_blocks(req, len(prompts[2]))
        ours = engine.runner.execute([Chunk(req, len(prompts[2]))], all_positions=True)
        engine.free(req)
        with torch.no_grad():
            ref = hf(torch.tensor([prompts[2]], device=engine.device)).logits[0].float()
        diff = (ours - ref).abs().max().item() / ref.abs().max().item()
        want = [hf.generate(torch.tensor([p], device=engine.device), max_new_tokens=16, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in prompts]
        r: dict[str, Any] = {"logits_max_rel_diff": round(diff, 5)}
        for policy, budget in (("prefill_priority", 2048), ("chunked", 8)):
            got = _generate(engine, prompts, 16, policy, budget)
            r[f"{policy}_tokens_match"] = sum(a == b for a, b in zip(got, want))
        r["prompts"] = len(prompts)
        res[name] = r
        res["ok"] &= diff < (2e-2 if device == "cuda" else 1e-4) and all(
            r[f"{p}_tokens_match"] == len(prompts) for p in ("prefill_priority", "chunked"))
    return res


def check_sdpa(models: dict[str, str], device: str) -> dict[str, Any]:
    """Which SDPA backends accept the engine's attention shapes (decode: GQA + bool mask), and their time."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = device == "cuda"
    b, ctx = (64, 2048) if cuda else (4, 256)
    dt = torch.bfloat16 if cuda else torch.float32
    q = torch.randn(b, 32, 1, 128, device=device, dtype=dt)
    kv = torch.randn(b, 8, ctx, 128, device=device, dtype=dt)
    mask = torch.ones(b, 1, 1, ctx, device=device, dtype=torch.bool)
    shapes = {"decode_gqa_mask": (q, kv, kv, {"attn_mask": mask, "enable_gqa": True}),
              "decode_gqa_nomask": (q, kv, kv, {"enable_gqa": True}),
              "decode_repeated_kv_nomask": (q, kv.repeat_interleave(4, 1), kv.repeat_interleave(4, 1), {})}
    res: dict[str, Any] = {"shape": f"B={b} h_q=32 h_kv=8 ctx={ctx} d=128 {dt}"}
    for backend in ("MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
        for sname, (qq, k, v, kw) in shapes.items():
            key = f"{backend}/{sname}"
            try:
                with sdpa_kernel([getattr(SDPBackend, backend)]), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    F.scaled_dot_product_attention(qq, k, v, **kw)
                    _sync(device)
                    t0 = time.perf_counter()
                    for _ in range(5):
                        F.scaled_dot_product_attention(qq, k, v, **kw)
                    _sync(device)
                res[key] = f"{(time.perf_counter() - t0) / 5 * 1e3:.3f} ms"
            except RuntimeError as e:
                res[key] = f"rejected: {str(e).splitlines()[0][:80]}"
    res["ok"] = not res["MATH/decode_gqa_mask"].startswith("rejected")
    return res


def check_launches(models: dict[str, str], device: str) -> dict[str, Any]:
    """Kernel launches (CUDA) or operators (CPU) and host syncs in one decode step at batch 16."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pdserve.decode.scheduler import DecodeOptions
    from pdserve.decode.worker import DecodeWorker
    from pdserve.types import GenerateRequest, RequestId, SamplingParams

    cuda = device == "cuda"
    engine = _engine(models["speed"], device, kv_cache_memory_gb=1.0 if cuda else 0.1, max_model_len=512)
    res: dict[str, Any] = {"layers": engine.model_config.num_layers}
    for label, params in (("greedy", SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)),
                          ("top_p_seeded", SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=8,
                                                          ignore_eos=True))):
        worker = DecodeWorker(engine, DecodeOptions("prefill_priority", max_num_seqs=64, max_num_batched_tokens=4096))
        for i, p in enumerate(_prompts(engine.model_config.vocab_size, [32] * 16)):
            worker.submit(GenerateRequest(RequestId(f"{label}{i}"), tuple(p), params))
        for _ in range(3):
            worker.step()  # prefill, then decode steps
        _sync(device)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            worker.step()
            _sync(device)
        events = prof.events()
        if cuda:
            res[f"{label}_kernels_per_step"] = sum(1 for e in events if e.device_type.name == "CUDA")
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                worker.step()
            torch.cuda.set_sync_debug_mode("default")
            res[f"{label}_syncs_per_step"] = sum("synchroniz" in str(w.message) for w in caught)
        else:
            res[f"{label}_aten_ops_per_step"] = sum(1 for e in events if e.name.startswith("aten::"))
        while worker.has_work():
            worker.step()
    res["ok"] = True
    return res


def check_codecs(models: dict[str, str], device: str) -> dict[str, Any]:
    """Every codec on the engine's device slabs: encode on the device, the wire's host bytes, decode on
    the device, scatter into a pool of another block size; raw bit-exact, lossy within bound."""
    import torch

    from pdserve.engine.kv_cache import KVPool
    from pdserve.kvtransfer.codecs import CODEC_NAMES, get_codec
    from pdserve.kvtransfer.reshard import gather_slab, scatter_slab, token_slots

    bounds = {"raw": 0.0, "int8": 0.02, "fp8": 0.05, "int4": 0.13, "int4_zstd": 0.14}
    engine = _engine(models["llama"], device, kv_cache_memory_gb=0.05, max_model_len=512)
    engine.pool.kv.copy_(torch.randn_like(engine.pool.kv))
    dst = KVPool(type(engine.layout)(**{**engine.layout.__dict__, "block_size": 32}), 64, engine.device)
    res: dict[str, Any] = {"ok": True}
    for t in (3, 300):
        lay = engine.layout
        src_slots = token_slots(list(range(lay.num_blocks_for(t))), lay.block_size, t, engine.device)
        dst_slots = token_slots(list(range(dst.layout.num_blocks_for(t))), 32, t, engine.device)
        slab = gather_slab(engine.pool, 0, src_slots, slice(None))
        for name in CODEC_NAMES:
            codec = get_codec(name)
            try:
                parts = codec.encode(slab)
                wire = [p.contiguous().cpu().view(-1).view(torch.uint8).clone().view(p.dtype).view(p.shape)
                        if p.numel() else p.cpu() for p in parts]  # host bytes, as the byte wire ships them
                out = codec.decode([p.to(engine.device) for p in wire], slab.shape, slab.dtype)
                scatter_slab(dst, 0, dst_slots, slice(None), out)
                back = gather_slab(dst, 0, dst_slots, slice(None))
                err = ((back.float() - slab.float()).norm() / slab.float().norm()).item()
                close = torch.equal(back, slab) if name == "raw" else err <= bounds[name]
                good = back.device == engine.device and close
                res[f"{name}/T={t}"] = f"err {err:.4f}" + ("" if good else " FAIL")
            except Exception as e:  # noqa: BLE001 - a failing codec is this check's finding, not a crash
                good, res[f"{name}/T={t}"] = False, f"{type(e).__name__}: {e}"[:120]
            res["ok"] &= good
    return res


def check_world1(models: dict[str, str], device: str) -> dict[str, Any]:
    """The instance process group at world size 1: NCCL for device tensors, gloo for CPU ones."""
    import torch
    import torch.distributed as dist

    from pdserve.config import EngineConfig
    from pdserve.engine.device import backend_for, resolve_device
    from pdserve.engine.tp import init_process_group

    dev = resolve_device(EngineConfig(device=device))  # type: ignore[arg-type]
    store = Path(tempfile.mkdtemp()) / "store"
    init_process_group(0, 1, f"file://{store}", dev)
    try:
        x = torch.ones(4, device=dev)
        dist.all_reduce(x)
        n = torch.tensor([7])
        dist.all_reduce(n, op=dist.ReduceOp.MIN)  # a CPU control tensor: gloo's half of the group
        box: list[Any] = [None]
        dist.all_gather_object(box, {"rank": 0})
        return {"ok": bool(x.sum() == 4 and int(n) == 7 and box[0] == {"rank": 0}), "backend": backend_for(dev),
                "device": str(dev), "pg_backend": str(dist.get_backend())}
    finally:
        dist.destroy_process_group()


def _pair_sender(port: int, kind: str, device: str, nbytes: int, repeats: int) -> None:
    _import_pdserve()
    import torch

    from pdserve.kvtransfer.tensor_transport import open_pair, pair_store

    store = pair_store("127.0.0.1", port, False, 60)
    tx = open_pair(kind, store, False, torch.device(device), 60)  # type: ignore[arg-type]
    t = torch.arange(nbytes // 2, device=device).to(torch.bfloat16)
    for _ in range(repeats):
        tx.send([t])
    tx.close()


def check_kv_pair(models: dict[str, str], device: str) -> dict[str, Any]:
    """The tensor KV transport between two processes on this node: CUDA IPC on one GPU (gloo with CPU
    tensors here on CPU), against the host round trip a byte transport needs."""
    import torch
    import torch.multiprocessing as mp

    from pdserve.kvtransfer.tensor_transport import open_pair, pair_store

    kind = "ipc" if device == "cuda" else "group"
    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    nbytes, repeats = (256 << 20, 5) if device == "cuda" else (16 << 20, 3)
    store = pair_store("127.0.0.1", 0, True, 60)
    proc = mp.get_context("spawn").Process(target=_pair_sender, args=(store.port, kind, str(dev), nbytes, repeats))
    proc.start()
    rx = open_pair(kind, store, True, dev, 60)  # type: ignore[arg-type]
    want = torch.arange(nbytes // 2, device=dev).to(torch.bfloat16)
    out = torch.empty_like(want)
    rx.recv([out])  # the first one sets the pair up
    t0 = time.perf_counter()
    for _ in range(repeats - 1):
        rx.recv([out])
    _sync(dev)
    pair_s = (time.perf_counter() - t0) / (repeats - 1)
    proc.join(60)
    t0 = time.perf_counter()
    host = want.cpu().to(dev) if device == "cuda" else want.clone()
    _sync(dev)
    host_s = time.perf_counter() - t0
    return {"ok": proc.exitcode == 0 and torch.equal(out, want) and torch.equal(host, want), "kind": kind,
            "mb": nbytes >> 20, "pair_gb_s": round(nbytes / pair_s / 1e9, 2),
            "host_round_trip_gb_s": round(nbytes / host_s / 1e9, 2)}


def check_pool_sizing(models: dict[str, str], device: str) -> dict[str, Any]:
    """The KV pool on CUDA takes what gpu_memory_utilization leaves after a warm-up forward."""
    if device != "cuda":
        return {"ok": True, "skipped": "CPU pools use kv_cache_memory_gb"}
    import torch

    from pdserve.config import EngineConfig
    from pdserve.engine.engine import Engine

    engine = Engine.from_config(models["speed"], EngineConfig(device="cuda", gpu_memory_utilization=0.5,
                                                              max_model_len=2048))
    free, total = torch.cuda.mem_get_info()
    pool = engine.pool.kv.numel() * engine.pool.kv.element_size()
    used = total - free
    return {"ok": 0.3 * total < pool and used <= 0.55 * total, "pool_gb": round(pool / 1e9, 1),
            "used_gb": round(used / 1e9, 1), "total_gb": round(total / 1e9, 1),
            "tokens": engine.allocator.num_blocks * engine.layout.block_size}


def check_decode_speed(models: dict[str, str], device: str) -> dict[str, Any]:
    """Decode tokens/s at batch 1/16/64 (prompt 64, 32 steps): this engine vs transformers."""
    import torch
    from transformers import DynamicCache

    from pdserve.decode.scheduler import DecodeOptions
    from pdserve.decode.worker import DecodeWorker
    from pdserve.types import GenerateRequest, RequestId, SamplingParams

    cuda = device == "cuda"
    steps = 32 if cuda else 8
    engine = _engine(models["speed"], device, kv_cache_memory_gb=8.0 if cuda else 0.2, max_model_len=256)
    hf = _hf(models["speed"], engine)
    nbytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    res: dict[str, Any] = {"model_gb": round(nbytes / 1e9, 2)}
    for b in (1, 16, 64):
        prompts = _prompts(engine.model_config.vocab_size, [64] * b)
        worker = DecodeWorker(engine, DecodeOptions("prefill_priority", max_num_seqs=b, max_num_batched_tokens=64 * b))
        for i, p in enumerate(prompts):
            worker.submit(GenerateRequest(RequestId(f"b{b}-{i}"), tuple(p),
                                          SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True)))
        worker.step()  # prefill
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            worker.step()
        _sync(device)
        ours = b * steps / (time.perf_counter() - t0)
        while worker.has_work():
            worker.step()
        with torch.no_grad():
            ids = torch.tensor(prompts, device=engine.device)
            cache = DynamicCache()
            nxt = hf(ids, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                nxt = hf(nxt, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
            _sync(device)
            theirs = b * steps / (time.perf_counter() - t0)
        res[f"batch{b}_tok_s"] = round(ours, 1)
        res[f"batch{b}_hf_tok_s"] = round(theirs, 1)
    res["ok"] = True
    return res


CHECKS: dict[str, Callable[[dict[str, str], str], dict[str, Any]]] = {
    "load": check_load, "parity": check_parity, "sdpa": check_sdpa, "launches": check_launches,
    "codecs": check_codecs, "world1": check_world1, "kv_pair": check_kv_pair, "pool_sizing": check_pool_sizing,
    "decode_speed": check_decode_speed,
}


# ---- driver -------------------------------------------------------------------------------------

def _run_isolated(name: str, args: argparse.Namespace, timeout_s: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--device", args.device, "--workdir", str(args.workdir), "--one", name]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout_s:.0f} s",
                "seconds": round(time.perf_counter() - t0, 1)}
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"ok": False, "error": f"exit {p.returncode}: {(p.stderr or p.stdout).strip()[-400:]}",
                "seconds": round(time.perf_counter() - t0, 1)}
    return {**json.loads(lines[-1]), "seconds": round(time.perf_counter() - t0, 1)}


def _run_one(name: str, models: dict[str, str], device: str) -> dict[str, Any]:
    try:
        return CHECKS[name](models, device)
    except Exception as e:  # noqa: BLE001 - the check's failure is its result
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:400]}


def _markdown(report: dict[str, Any]) -> str:
    m = report["meta"]
    rows = [f"# GPU check ({m['device_name']}, torch {m['torch']}, transformers {m['transformers']})", "",
            f"pdserve from the {m['pdserve']}; zstd: {m['zstd']}; total {m['seconds']} s", "",
            "| check | ok | s | figures |", "|---|---|---|---|"]
    for name, r in report["checks"].items():
        figs = "; ".join(f"{k}: {v}" for k, v in r.items() if k not in ("ok", "seconds"))
        rows.append(f"| {name} | {'yes' if r['ok'] else '**no**'} | {r.get('seconds', '')} | {figs} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--out", type=Path, default=Path("gpu-check"))
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pdserve-gpu-check")
    p.add_argument("--checks", default=",".join(CHECKS), help="comma-separated subset")
    p.add_argument("--timeout-s", type=float, default=180.0, help="per check")
    p.add_argument("--one", help=argparse.SUPPRESS)  # run one check in this process, print its JSON
    args = p.parse_args(argv)
    source, zstd = _import_pdserve(), _zstd()
    args.workdir = args.workdir / args.device
    args.workdir.mkdir(parents=True, exist_ok=True)
    import torch
    import transformers

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --device cpu", file=sys.stderr)
        return 2
    models = save_models(args.workdir, args.device)
    if args.one:
        print(json.dumps(_run_one(args.one, models, args.device)))
        return 0
    t0 = time.perf_counter()
    checks = {}
    for name in args.checks.split(","):
        checks[name] = _run_isolated(name, args, args.timeout_s)
        print(f"{name:<13} {'ok' if checks[name]['ok'] else 'FAIL'}  {checks[name]}", flush=True)
    report = {"meta": {"device": args.device, "torch": torch.__version__, "transformers": transformers.__version__,
                       "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "CPU",
                       "pdserve": source, "zstd": zstd, "seconds": round(time.perf_counter() - t0, 1),
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
              "checks": checks}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (args.out / "gpu_check.md").write_text(_markdown(report))
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}")
    return 0 if all(c["ok"] for c in checks.values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
