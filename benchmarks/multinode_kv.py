"""KV pulls across a node boundary vs on one node, through the whole serving path.

Builds the two-node namespace cluster of tests/e2e/netns.py (needs root), serves SmolLM2-135M
with prefill pinned to node A and decode to node B (or both on node A), sends long prompts one at
a time and reads each request's `pdserve_timings`: `transfer_s` (the pull, from the decode
instance's start of it to the KV landing) and `transfer_bytes` (wire bytes). Reports the median
per-pull latency and effective throughput per (transport, codec, placement).

    .venv/bin/python -m benchmarks.multinode_kv --requests 8 --out /tmp/multinode_kv.json
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from tests.e2e.netns import BIN, NetnsCluster, available, wait_for_line

PORT = 18080
PROMPT = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 34)  # ~450 tokens


def _pulls(url: str, n: int) -> list[dict[str, float]]:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    timings = []
    for i in range(n + 1):  # the first warms up both engines and the transport's connection
        for chunk in client.completions.create(model="smollm2-135m", prompt=f"{i} {PROMPT}", max_tokens=2,
                                               temperature=0.0, stream=True, extra_body={"ignore_eos": True}):
            extra = chunk.model_extra or {}
            if "pdserve_timings" in extra and i > 0:
                timings.append(extra["pdserve_timings"])
    return timings


def run_one(cluster: NetnsCluster, transport: str, codec: str, cross: bool, n: int, tmp: Path) -> dict[str, Any]:
    decode_node = "node_b" if cross else "node_a"
    cfg = {"model": "smollm2-135m", "engine": {"kv_cache_memory_gb": 0.2, "max_model_len": 1024},
           "prefill": {"resources": {"node_a": 0.01}}, "decode": {"resources": {decode_node: 0.01}},
           "kvtransfer": {"transport": transport, "codec": codec}, "router": {"port": PORT}}
    path, log = tmp / f"{transport}-{codec}-{cross}.yaml", tmp / f"{transport}-{codec}-{cross}.log"
    path.write_text(yaml.safe_dump(cfg))
    proc = cluster.popen(cluster.head, [str(BIN / "pdserve"), "serve", "--address", cluster.address,
                                        "--config", str(path)], log)
    try:
        url = wait_for_line(log, r"ready at (http://\S+)", proc, 600).group(1)
        timings = cluster.executor(cluster.head).submit(_pulls, url, n).result()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert all("kv_recomputed" not in t and t.get("transfer_bytes", 0) > 0 for t in timings), timings
    lat = [t["transfer_s"] for t in timings]
    nbytes = [t["transfer_bytes"] for t in timings]
    return {"transport": transport, "codec": codec, "placement": "A→B" if cross else "A→A",
            "pulls": len(timings), "wire_mb": statistics.median(nbytes) / 1e6,
            "latency_ms_p50": 1e3 * statistics.median(lat), "latency_ms_max": 1e3 * max(lat),
            "gb_per_s": statistics.median(b / s for b, s in zip(nbytes, lat)) / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--out", default="multinode_kv.json")
    args = ap.parse_args()
    why = available()
    if why:
        raise SystemExit(f"cannot build the namespace cluster: {why}")
    rows = []
    with NetnsCluster(["node_a", "node_b"]) as cluster, tempfile.TemporaryDirectory() as tmp:
        for transport in ("grpc", "torch"):
            for codec in ("raw", "int8"):
                for cross in (False, True):
                    rows.append(run_one(cluster, transport, codec, cross, args.requests, Path(tmp)))
                    print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print("| transport | codec | placement | wire MB/pull | p50 ms | max ms | GB/s (p50) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['transport']} | {r['codec']} | {r['placement']} | {r['wire_mb']:.1f} | {r['latency_ms_p50']:.1f} "
              f"| {r['latency_ms_max']:.1f} | {r['gb_per_s']:.2f} |")


if __name__ == "__main__":
    main()
