"""Profile files: DistServe's JSON format, which `pdserve profile` also writes.

  {"<hf model name>": {"<tp>": {"prefill": [a, b, c], "decoding_smallbs": [a, b, c],
                               "decoding_largebs": [a, b, c], "decoding_large_small_bs_threshold": 95}}}

Times are milliseconds in the file and seconds in `PhaseProfile`. A profile `pdserve profile` measured
also carries the measured curves (latency.py), in keys DistServe's readers ignore:

  "prefill_curve": {"x": [Σl, ...], "ms": [...], "slope_ms": c'}        T = P(Σl) + c'·Σl²
  "decode_curve":  {"x": [B, ...],  "ms": [...], "slope_ms": b'}        T = D(B) + b'·Σctx
 The published DistServe A100-80GB
profile ships in `data/distserve-a100-80g.json` (OPT-13B TP 1/2/4, OPT-66B TP 2/3/4/8).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pdserve.placement.latency import Coeffs, Curve, PhaseProfile
from pdserve.placement.model_spec import ModelSpec

PUBLISHED = {"distserve-a100": "data/distserve-a100-80g.json",
             "distserve-a100-vllm": "data/distserve-a100-80g-vllm.json"}


@dataclass(frozen=True)
class ProfileFile:
    """A `LatencySource` backed by a profile file's table."""

    name: str
    table: dict[str, dict[int, PhaseProfile]] = field(repr=False)
    devices: frozenset[str] = frozenset()  # the entries' "device" keys (absent in DistServe's files)

    def profile(self, model: ModelSpec, tp: int) -> PhaseProfile | None:
        for key in (model.hf_name, model.name):
            if key and key in self.table:
                return self.table[key].get(tp)
        return None

    @property
    def device(self) -> str:
        """'cpu' when every entry was measured on a CPU (`pdserve profile` records it), else 'cuda'."""
        return "cpu" if self.devices and self.devices == {"cpu"} else "cuda"

    def models(self) -> list[str]:
        return sorted(self.table)


def load_profile(name_or_path: str) -> ProfileFile:
    """A published profile's name (`distserve-a100`) or a path to a profile file."""
    if name_or_path in PUBLISHED:
        text = resources.files("pdserve.placement").joinpath(PUBLISHED[name_or_path]).read_text()
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(f"profile: no file {name_or_path!r} (published: {', '.join(PUBLISHED)})")
        text = path.read_text()
    data = json.loads(text)
    devices = frozenset(e["device"] for per_tp in data.values() if isinstance(per_tp, dict)
                        for e in per_tp.values() if isinstance(e, dict) and "device" in e)
    return ProfileFile(name=name_or_path, table=parse_profile(data, name_or_path), devices=devices)


def parse_profile(data: Any, where: str = "profile") -> dict[str, dict[int, PhaseProfile]]:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of model name to TP entries")
    table: dict[str, dict[int, PhaseProfile]] = {}
    for model, per_tp in data.items():
        table[model] = {}
        for tp, entry in per_tp.items():
            try:
                table[model][int(tp)] = PhaseProfile(
                    prefill=_coeffs(entry["prefill"]),
                    decode_small=_coeffs(entry["decoding_smallbs"]),
                    decode_large=_coeffs(entry["decoding_largebs"]),
                    large_batch_threshold=int(entry.get("decoding_large_small_bs_threshold", 95)),
                    prefill_tokens=_curve(entry.get("prefill_curve")),
                    decode_batch=_curve(entry.get("decode_curve")))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{where}: {model} tp={tp}: bad entry ({e!r})") from None
    return table


def profile_to_json(table: dict[str, dict[int, PhaseProfile]]) -> dict[str, Any]:
    return {model: {str(tp): _entry(p) for tp, p in sorted(per_tp.items())} for model, per_tp in table.items()}


def _entry(p: PhaseProfile) -> dict[str, Any]:
    entry: dict[str, Any] = {"decoding_large_small_bs_threshold": p.large_batch_threshold,
                             "prefill": _ms(p.prefill), "decoding_smallbs": _ms(p.decode_small),
                             "decoding_largebs": _ms(p.decode_large)}
    for key, curve in (("prefill_curve", p.prefill_tokens), ("decode_curve", p.decode_batch)):
        if curve is not None:
            entry[key] = {"x": list(curve.xs), "ms": [y * 1e3 for y in curve.ys], "slope_ms": curve.slope * 1e3}
    return entry


def _curve(entry: Any) -> Curve | None:
    if entry is None:
        return None
    return Curve(tuple(float(x) for x in entry["x"]), tuple(float(y) * 1e-3 for y in entry["ms"]),
                 float(entry["slope_ms"]) * 1e-3)


def _coeffs(ms: list[float]) -> Coeffs:
    a, b, c = (float(x) for x in ms)
    return Coeffs(a, b, c).scaled(1e-3)


def _ms(c: Coeffs) -> list[float]:
    return [c.a * 1e3, c.b * 1e3, c.c * 1e3]
