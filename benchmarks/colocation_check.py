"""Do two engine processes on the two cores slow each other down, and how much does the machine
drift? Step times of one engine alone, beside a second process looping prefills ([300, 200]) or
16-sequence decode steps on the other core, and alone again at the end.

    python benchmarks/colocation_check.py            # ~2 min

The placement profile (`pdserve profile`) measures one engine alone; under load both engines of a
deployment are busy at once, which this quantifies.
"""

from __future__ import annotations

import multiprocessing as mp
import time

import torch

SHAPES = {"prefill [399, 498]": ("prefill", [399, 498]), "decode 4 x 300": ("decode", [300] * 4),
          "decode 12 x 300": ("decode", [300] * 12)}
BACKGROUND = {"prefill loop": ("prefill", [300, 200]), "decode-16 loop": ("decode", [300] * 16)}


def _engine():
    from pdserve.config import EngineConfig
    from pdserve.engine.engine import Engine

    torch.set_num_threads(1)
    return Engine.from_config("smollm2-135m", EngineConfig(max_model_len=1025))


def _time(engine, kind: str, lens: list[int], repeats: int) -> float:
    from pdserve.engine.profiling import time_decode, time_prefill

    return (time_prefill if kind == "prefill" else time_decode)(engine, lens, repeats)


def _loop(stop, kind: str, lens: list[int]) -> None:
    engine = _engine()
    while not stop.is_set():
        _time(engine, kind, lens, 1)


def _measure(engine, label: str) -> None:
    cells = [f"{name} {1e3 * _time(engine, kind, lens, 2 if kind == 'prefill' else 5):.0f} ms"
             for name, (kind, lens) in SHAPES.items()]
    print(f"{label:22s} " + " | ".join(cells), flush=True)


def main() -> None:
    engine = _engine()
    _measure(engine, "alone")
    for name, (kind, lens) in BACKGROUND.items():
        stop = mp.Event()
        bg = mp.Process(target=_loop, args=(stop, kind, lens))
        bg.start()
        time.sleep(10)  # its engine is loaded and looping
        _measure(engine, f"beside a {name}")
        stop.set()
        bg.join()
    _measure(engine, "alone again")


if __name__ == "__main__":
    main()
