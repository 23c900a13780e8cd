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


WHOLE_HEADS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "whole-head"


@pytest.mark.skipif(not (WHOLE_HEADS / "labels" / "ixi012.nii.gz").is_file(), reason="shared whole heads absent")
def test_head_crops_are_the_regions_localised_inference_segments(tmp_path):
    """One shared head -> two crops on the model's grid (box + context, template space) with a coarse label that
    train accepts next to MSD-style fine labels, and an evaluation of them."""
    import SimpleITK as sitk

    from AttentionUNetSegmentLib.model.bundle import ModelRegistry
    from AttentionUNetSegmentLib.training.datasets import load_datasets
    from AttentionUNetSegmentLib.errors import DatasetError
    from AttentionUNetSegmentLib.inference.predictor import ROI_MARGIN_VOXELS
    from AttentionUNetSegmentLib.preprocessing.localization import box_grid

    out = tmp_path / "crops"
    _run("make_head_crops.py", str(out), "--cases", "ixi012")
    spec = ModelRegistry().find("hippocampus").localization
    listing = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert listing["label_groups"] == {"1": ["Anterior", "Posterior"]} and listing["heads"] == ["ixi012"]
    for side in ("left", "right"):
        image = sitk.ReadImage(str(out / "imagesTr" / f"ixi012_{side}.nii.gz"))
        label = sitk.ReadImage(str(out / "labelsTr" / f"ixi012_{side}.nii.gz"))
        box = spec.boxes[side]
        context = [v - ROI_MARGIN_VOXELS if i % 2 == 0 else v + ROI_MARGIN_VOXELS for i, v in enumerate(box)]
        grid = box_grid(context, (1.0, 1.0, 1.0))
        assert image.GetSize() == grid.GetSize() and image.GetDirection() == grid.GetDirection()
        assert max(abs(a - b) for a, b in zip(image.GetOrigin(), grid.GetOrigin())) < 1e-4
        voxels = sitk.GetArrayViewFromImage(label)
        assert set(map(int, set(voxels.ravel().tolist()))) == {0, 1} and 2000 < voxels.sum() < 12000
    with pytest.raises(DatasetError, match="every label is a group"):
        load_datasets([out])  # alone it names no model class: it trains after a fully labelled dataset
    msd = WHOLE_HEADS.parent / "msd-hippocampus"
    if (msd / "dataset.json").is_file():
        dataset = load_datasets([msd, out])
        assert dataset.labels == {1: "Anterior", 2: "Posterior"}
        assert dataset.training_only == ["ixi012_left", "ixi012_right"]
        assert dataset.cases[-1].classes == ((1, (1, 2)),)
    refused = subprocess.run([sys.executable, str(BENCHMARKS / "make_head_crops.py"), str(out), "--cases", "ixi012"],
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "--force" in refused.stderr
    done = _run("eval_head_crops.py", str(out), "--json", str(tmp_path / "eval.json"))
    rows = json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))["rows"]
    assert [row["crop"] for row in rows] == ["ixi012_left", "ixi012_right"] and "median" in done.stdout
