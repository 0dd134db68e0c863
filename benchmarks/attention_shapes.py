"""Forward time of SmolLM2-135M for batch shapes where attention padding used to cost: prompts of
different lengths in one batch, decodes at different contexts, a chunked-prefill step (decodes
plus a prompt chunk after its cached prefix). One thread, median of 3 after a warm-up.

    python benchmarks/attention_shapes.py
    # the engine before attention stopped padding: the same script on commit 49f7701, with
    # engine/profiling.py's time_step spelled _timed there
    python benchmarks/attention_shapes.py --backends   # decode shapes under the "reference" and the
        # "paged" decode attention (engine/attention.py), alternated in one process, 5 rounds, CPU time
"""

from __future__ import annotations

import sys
import time

import torch

from pdserve.config import EngineConfig
from pdserve.engine.engine import Engine
from pdserve.engine.profiling import time_decode, time_prefill, time_step

SPREAD = [20, 80, 150, 220, 300, 380, 450, 500]
SIXTEEN = [32 + 23 * i for i in range(16)]  # benchmarks/engine.py's 16 prompts after 16 new tokens


def main() -> None:
    torch.set_num_threads(1)
    engine = Engine.from_config("smollm2-135m", EngineConfig(max_model_len=1025))
    rows = [
        ("prefill [300]", lambda: time_prefill(engine, [300])),
        ("prefill [300, 300, 300]", lambda: time_prefill(engine, [300] * 3)),
        ("prefill [317, 275, 10, 484]", lambda: time_prefill(engine, [317, 275, 10, 484])),
        ("decode 8 at contexts 20..500", lambda: time_decode(engine, SPREAD)),
        ("decode 8 at context 300", lambda: time_decode(engine, [300] * 8)),
        ("8 decodes (20..500) + 24-token chunk after 200 cached",
         lambda: time_step(engine, SPREAD + [224], [c - 1 for c in SPREAD] + [200])),
    ]
    if "--backends" in sys.argv:
        cpu = time.process_time  # CPU seconds: the comparison survives a loaded machine
        rows = [
            ("decode 8 at contexts 20..500", lambda: time_step(engine, SPREAD, [c - 1 for c in SPREAD], clock=cpu)),
            ("decode 16 at contexts 32..377", lambda: time_step(engine, SIXTEEN, [c - 1 for c in SIXTEEN], clock=cpu)),
            ("decode 1 at context 128", lambda: time_step(engine, [128], [127], clock=cpu)),
            ("8 decodes (20..500) + 24-token chunk after 200 cached",
             lambda: time_step(engine, SPREAD + [224], [c - 1 for c in SPREAD] + [200], clock=cpu)),
        ]
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(5):
            for name, run in rows:
                for backend in ("reference", "paged"):
                    engine.runner.attention_backend = backend
                    times.setdefault((name, backend), []).append(run())
        for name, _ in rows:
            ref, paged = (sorted(times[(name, b)])[2] for b in ("reference", "paged"))
            print(f"{name:55s} reference {1e3 * ref:7.1f} ms  paged {1e3 * paged:7.1f} ms  "
                  f"({paged / ref:.2f}x)", flush=True)
        return
    for name, run in rows:
        print(f"{name:55s} {1e3 * run():7.1f} ms", flush=True)


if __name__ == "__main__":
    main()
