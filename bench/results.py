"""A benchmark results directory: what one `pdserve bench` run writes and `compare` reads.

    summary.json    label, endpoint, workload, SLO, GPUs, one summary per rate, goodput
    points.csv      one row per rate (the attainment-vs-rate curve, percentiles)
    requests.csv    one row per request and rate (rate, index, lengths, ok, error, ttft_s, tpot_s, e2e_s, ...)
    requests.jsonl  the same records with every inter-token gap (itl_s)
    lengths.jsonl   the workload's lengths (pdserve.bench.lengths format; `pdserve plan` reads it)
    *.png           plots (pdserve.bench.plots)
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pdserve.bench.lengths import RequestLengths, write_lengths
from pdserve.bench.record import RequestRecord

FORMAT_VERSION = 1
_REQUEST_COLUMNS = ("rate", "index", "prompt_len", "output_len", "arrival_s", "ok", "error", "send_delay_s",
                    "ttft_s", "tpot_s", "e2e_s", "num_output_tokens")


@dataclass(frozen=True)
class RunData:
    """One results directory, loaded: `summary` as written, records grouped by rate."""

    path: Path
    summary: dict
    records: dict[float, list[RequestRecord]]

    @property
    def label(self) -> str:
        return self.summary.get("label") or self.path.name


def write_results(out_dir: str | Path, summary: dict, records_by_rate: dict[float, Sequence[RequestRecord]],
                  lengths: Sequence[RequestLengths]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(_finite({"version": FORMAT_VERSION, **summary}), indent=2))
    _write_points_csv(out / "points.csv", summary["points"])
    with open(out / "requests.csv", "w", newline="") as f, open(out / "requests.jsonl", "w") as g:
        writer = csv.writer(f)
        writer.writerow(_REQUEST_COLUMNS)
        for rate, records in records_by_rate.items():
            for r in records:
                row = {"rate": rate, **asdict(r), "tpot_s": r.tpot_s}
                writer.writerow(["" if row[c] is None else row[c] for c in _REQUEST_COLUMNS])
                g.write(json.dumps(row) + "\n")
    write_lengths(out / "lengths.jsonl", lengths)
    return out


def _write_points_csv(path: Path, points: Sequence[dict]) -> None:
    flat = [_flatten(p) for p in points]
    columns = list(flat[0]) if flat else []
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in flat:
            writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])


def _flatten(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _finite(x):
    """JSON has no inf: an unreachable SLO scale is written as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def read_results(path: str | Path) -> RunData:
    root = Path(path)
    summary_file = root / "summary.json"
    if not summary_file.is_file():
        raise ValueError(f"{root}: not a pdserve bench results directory (no summary.json)")
    summary = json.loads(summary_file.read_text())
    records: dict[float, list[RequestRecord]] = {}
    requests_file = root / "requests.jsonl"
    if requests_file.is_file():
        fields = set(RequestRecord.__dataclass_fields__)
        for line in requests_file.read_text().splitlines():
            row = json.loads(line)
            records.setdefault(float(row["rate"]), []).append(
                RequestRecord(**{k: v for k, v in row.items() if k in fields}))
    return RunData(root, summary, records)
