"""The benchmark suite's smoke run finishes and writes well-formed results. Figures are never
asserted here: the machine running the tests is shared and noisy."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KEYS = {"name", "value", "unit", "floor", "ratio", "target", "met"}


def test_bench_smoke_writes_well_formed_results(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLYNAR_")}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    doc = json.loads(out.read_text())
    assert doc["smoke"] is True
    assert isinstance(doc["cores"], int) and doc["cores"] >= 1
    assert isinstance(doc["date"], str) and doc["date"]
    assert doc["errors"] == []
    results = doc["results"]
    assert isinstance(results, list) and results
    names = {r["name"] for r in results}
    for expected in ("append", "replay", "solver scaling", "service peak RSS"):
        assert expected in names, names
    assert any(n.startswith("scheduling p50") for n in names)
    assert any(n.startswith("e2e fan-out") for n in names)
    assert any(n.startswith("GET /api/run/{id}") for n in names)
    for r in results:
        assert KEYS <= set(r), r
        assert isinstance(r["name"], str) and isinstance(r["unit"], str)
        assert isinstance(r["value"], (int, float)) and math.isfinite(r["value"]), r
        for k in ("floor", "ratio"):
            assert r[k] is None or isinstance(r[k], (int, float)), r
        assert r["met"] in (True, False, None), r
        assert r["target"] is None or isinstance(r["target"], str), r
    # the table is printed
    assert "benchmark" in proc.stdout and "ratio" in proc.stdout
    # a smoke run never overwrites the committed full results
    assert not (REPO / "bench" / "results.json").exists() or \
        json.loads((REPO / "bench" / "results.json").read_text()).get("smoke") is not True
