"""benchmarks/gpu_check.py runs end to end with --device cpu and writes the report a GPU run writes.
(A subset of its checks here, to stay fast; `python benchmarks/gpu_check.py --device cpu` runs all.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu_and_writes_json_and_markdown(tmp_path: Path) -> None:
    checks = "load,codecs,world1,kv_pair,pool_sizing"
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu",
                        "--checks", checks, "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work")],
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["meta"]["device"] == "cpu" and list(report["checks"]) == checks.split(",")
    assert all(c["ok"] for c in report["checks"].values()), report["checks"]
    assert report["checks"]["world1"]["backend"] == "gloo"
    assert report["checks"]["codecs"]["raw/T=300"] == "err 0.0000"
    assert report["checks"]["kv_pair"]["kind"] == "group"
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert md.startswith("# GPU check (CPU") and "| codecs | yes |" in md
