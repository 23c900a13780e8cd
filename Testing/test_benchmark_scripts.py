"""The benchmark scripts' own smoke modes, run for real: the GPU script must work the day a GPU is lent, and the
end-to-end benchmark must keep measuring our engine (MONAI, an optional extra, joins when it is installed)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent / "benchmarks"

pytestmark = pytest.mark.slow


def _run(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def test_gpu_benchmark_runs_its_cpu_code_path(tmp_path):
    out = tmp_path / "out"
    _run("gpu_benchmark.py", "--device", "cpu", "--quick", "--out", str(out), "--work-dir", str(tmp_path / "work"))
    data = json.loads((out / "gpu_benchmark.json").read_text(encoding="utf-8"))
    assert [row["precision"] for row in data["inference"]] == ["bf16", "fp32"]
    for row in data["inference"]:
        assert not row.get("error"), row
        assert row["windows"] >= 1 and row["cold_s"] > 0 and row["warm_s"] > 0
    assert [row["variant"] for row in data["training"]] == ["fp32", "fp32+checkpointing"]
    assert all(not row.get("error") and row["step_s"] > 0 for row in data["training"])
    assert (out / "gpu_benchmark.md").read_text(encoding="utf-8").startswith("# GPU benchmark on cpu")


def test_end_to_end_benchmark_quick_mode(tmp_path):
    pipelines = ["ours"] + (["monai"] if importlib.util.find_spec("monai") else [])
    result = tmp_path / "inference.json"
    _run("bench_inference.py", "--quick", "--pipelines", *pipelines, "--threads", "1",
         "--work-dir", str(tmp_path / "work"), "--json", str(result))
    rows = json.loads(result.read_text(encoding="utf-8"))["rows"]
    assert [row["pipeline"] for row in rows] == pipelines
    assert all(not row.get("error") and row["pipeline_s"] > 0 and row["peak_rss_mb"] > 0 for row in rows)
    if "monai" in pipelines:
        assert rows[1]["ours_speedup"] > 0 and "voxel_agreement" in rows[1]
