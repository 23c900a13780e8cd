"""Evaluation metrics against hand-computed cases, and ``attention-unet evaluate`` end to end."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from AttentionUNetSegmentLib.evaluation.evaluate import dice_score, hausdorff95, label_metrics

CLI = [sys.executable, "-m", "AttentionUNetSegmentLib"]


def test_dice_hand_computed():
    reference = np.zeros((4, 4, 4), bool)
    prediction = np.zeros((4, 4, 4), bool)
    reference[0:2, 0:2, 0:2] = True  # 8 voxels
    prediction[0:2, 0:2, 1:3] = True  # 8 voxels, 4 shared
    assert dice_score(prediction, reference) == pytest.approx(0.5)
    assert dice_score(reference, reference) == 1.0
    assert dice_score(np.zeros_like(reference), reference) == 0.0
    assert dice_score(np.zeros_like(reference), np.zeros_like(reference)) is None


def test_hd95_single_voxels_anisotropic():
    reference = np.zeros((12, 10, 10), bool)
    prediction = np.zeros_like(reference)
    reference[5, 5, 5] = True
    prediction[8, 5, 5] = True  # 3 slices apart along z, slices 2 mm thick
    assert hausdorff95(prediction, reference, (2.0, 0.7, 0.7)) == pytest.approx(6.0)


def test_hd95_parallel_planes():
    reference = np.zeros((6, 6, 12), bool)
    prediction = np.zeros_like(reference)
    reference[:, :, 2] = True
    prediction[:, :, 5] = True  # every boundary voxel is 3 columns (1.5 mm) from the other plane
    assert hausdorff95(prediction, reference, (1.0, 1.0, 0.5)) == pytest.approx(1.5)
    assert hausdorff95(prediction, np.zeros_like(reference), (1.0, 1.0, 1.0)) is None


def _brute_force_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    from scipy import ndimage

    def boundary(mask):
        return mask & ~ndimage.binary_erosion(mask, ndimage.generate_binary_structure(3, 1), border_value=0)

    pa = np.argwhere(boundary(a)) * np.asarray(spacing)
    pb = np.argwhere(boundary(b)) * np.asarray(spacing)
    distances = np.linalg.norm(pa[:, None, :] - pb[None, :, :], axis=-1)
    return max(np.percentile(distances.min(1), 95), np.percentile(distances.min(0), 95))


def test_hd95_matches_brute_force_on_random_blobs():
    from scipy import ndimage

    rng = np.random.default_rng(3)
    spacing = (1.5, 1.0, 0.8)
    for _ in range(3):
        a = ndimage.binary_dilation(rng.random((14, 16, 15)) > 0.985, iterations=2)
        b = ndimage.binary_dilation(rng.random((14, 16, 15)) > 0.985, iterations=2)
        assert hausdorff95(a, b, spacing) == pytest.approx(_brute_force_hd95(a, b, spacing), rel=1e-6)


def test_hd95_of_a_small_structure_in_a_large_scan_is_unchanged():
    from scipy import ndimage

    rng = np.random.default_rng(4)
    spacing = (2.0, 0.7, 0.9)
    a = ndimage.binary_dilation(rng.random((12, 10, 14)) > 0.98, iterations=2)
    b = ndimage.binary_dilation(rng.random((12, 10, 14)) > 0.98, iterations=2)
    scan_a, scan_b = np.zeros((60, 50, 70), bool), np.zeros((60, 50, 70), bool)
    scan_a[20:32, 5:15, 40:54], scan_b[20:32, 5:15, 40:54] = a, b
    assert hausdorff95(scan_a, scan_b, spacing) == pytest.approx(_brute_force_hd95(a, b, spacing), rel=1e-6)


def test_volumes_in_millilitres():
    reference = np.zeros((10, 10, 10), np.uint8)
    prediction = np.zeros_like(reference)
    reference[2:6, 2:6, 2:6] = 1  # 64 voxels
    prediction[2:6, 2:6, 2:4] = 1  # 32 voxels
    metrics = label_metrics(prediction, reference, 1, (2.0, 1.0, 1.0))  # 2 mm^3 voxels
    assert metrics["volume_reference_ml"] == pytest.approx(0.128)
    assert metrics["volume_prediction_ml"] == pytest.approx(0.064)
    assert metrics["volume_difference_ml"] == pytest.approx(-0.064)
    assert metrics["volume_difference_percent"] == pytest.approx(-50.0)
    assert metrics["dice"] == pytest.approx(2 * 32 / 96)


def _write(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 1.0)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def test_evaluate_cli_on_prediction_folder(tmp_path):
    references, predictions = tmp_path / "ref", tmp_path / "pred"
    references.mkdir()
    predictions.mkdir()
    reference = np.zeros((8, 8, 8), np.uint8)
    reference[1:4, 1:4, 1:4] = 1
    reference[5:7, 5:7, 5:7] = 2
    _write(reference, references / "a.nii.gz")
    _write(reference, predictions / "a_seg.nii.gz")
    half = reference.copy()
    half[5:7, 5:7, 5:7] = 0  # label 2 missed entirely
    _write(reference, references / "b.nrrd")
    _write(half, predictions / "b.nii.gz")

    run = subprocess.run([*CLI, "evaluate", str(references), "--predictions", str(predictions),
                          "-o", str(tmp_path / "scores"), "--progress", "none"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "scores.json").read_text())
    by_case = {r["case"]: r["labels"] for r in report["cases"]}
    assert by_case["a"]["label_1"]["dice"] == 1.0 and by_case["a"]["label_1"]["hd95_mm"] == 0.0
    assert by_case["b"]["label_2"]["dice"] == 0.0 and by_case["b"]["label_2"]["hd95_mm"] is None
    assert report["mean"]["label_2"]["dice"] == pytest.approx(0.5)
    rows = list(csv.DictReader(open(tmp_path / "scores.csv")))
    assert [(r["case"], r["label"]) for r in rows][-2:] == [("mean", "label_1"), ("mean", "label_2")]

    again = subprocess.run([*CLI, "evaluate", str(references), "--predictions", str(predictions),
                            "-o", str(tmp_path / "scores")], capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr


def _one_cube_case(tmp_path: Path, name: str, prediction_spacing=(1.0, 1.0, 1.0)):
    """``ref/<name>.nii.gz`` and ``pred/<name>_seg.nii.gz``: the same 3-voxel cube, the prediction at
    ``prediction_spacing``; returns the two folders."""
    references, predictions = tmp_path / "ref", tmp_path / "pred"
    references.mkdir()
    predictions.mkdir()
    reference = np.zeros((8, 8, 8), np.uint8)
    reference[2:5, 2:5, 2:5] = 1
    _write(reference, references / f"{name}.nii.gz")
    _write(reference, predictions / f"{name}_seg.nii.gz", spacing=prediction_spacing)
    return references, predictions


def test_evaluate_refuses_prediction_on_another_grid(tmp_path):
    references, predictions = _one_cube_case(tmp_path, "case7", prediction_spacing=(1.0, 1.0, 2.0))
    run = subprocess.run([*CLI, "evaluate", str(references), "--predictions", str(predictions),
                          "-o", str(tmp_path / "scores")], capture_output=True, text=True)
    assert run.returncode == 2
    assert "case7" in run.stderr and "spacing" in run.stderr
    assert not (tmp_path / "scores.csv").exists()


def test_evaluate_runs_a_model(tmp_path, tiny_bundle):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(0)
    label = np.zeros((20, 24, 22), np.uint8)
    label[5:12, 6:14, 6:12] = 1
    label[12:16, 6:14, 6:12] = 2
    _write((rng.normal(size=label.shape) + label).astype(np.float32), images / "c1.nii.gz")
    _write(label, labels / "c1.nii.gz")
    run = subprocess.run([*CLI, "evaluate", str(labels), "--images", str(images), "--model", str(tiny_bundle.path),
                          "--device", "cpu", "-o", str(tmp_path / "scores"), "--progress", "none"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "scores.json").read_text())
    assert set(report["mean"]) == {"Anterior", "Posterior"}  # names come from the model's labels
    metrics = report["cases"][0]["labels"]["Anterior"]
    assert metrics["volume_reference_ml"] == pytest.approx(7 * 8 * 6 / 1000.0)
    assert metrics["dice"] is None or 0.0 <= metrics["dice"] <= 1.0


def _evaluate_with_case_list(tmp_path: Path, cases: Path) -> subprocess.CompletedProcess:
    references, predictions = _one_cube_case(tmp_path, "a")
    return subprocess.run([*CLI, "evaluate", str(references), "--predictions", str(predictions), "--cases-file",
                           str(cases), "-o", str(tmp_path / "scores"), "--progress", "none"],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("content, problem", [("{not json", "is not valid JSON"),
                                              ('{"training_cases": ["a"]}', "is not a case list"),
                                              ('{"validation_cases": "a"}', "is not a case list"),
                                              ('"a"', "is not a case list"), ("[1, 2]", "is not a case list"),
                                              ("[" * 100000 + "]" * 100000, "nests too deeply")])
def test_evaluate_refuses_a_malformed_case_list_in_one_line(tmp_path, content, problem):
    cases = tmp_path / "cases.json"
    cases.write_text(content)
    run = _evaluate_with_case_list(tmp_path, cases)
    assert run.returncode == 2
    assert run.stderr.startswith("error:") and len(run.stderr.splitlines()) == 1, run.stderr
    assert problem in run.stderr and str(cases) in run.stderr
    assert not list(tmp_path.glob("scores*"))


@pytest.mark.parametrize("name", ["cases.json", "cases.txt"])
@pytest.mark.parametrize("kind", ["oversized", "fifo", "folder", "not utf-8"])
def test_evaluate_reads_a_case_list_under_the_json_limits(tmp_path, name, kind):
    """A case list, a JSON or a text one, is read by the one reader of JSON inputs with its limits: a file larger
    than MAX_JSON_BYTES (sparse here), a pipe (which would block the read), a folder or bytes that are not UTF-8
    are one ``error:`` line naming the file, exit status 2, nothing written."""
    from AttentionUNetSegmentLib.fileio.jsonfile import MAX_JSON_BYTES

    cases = tmp_path / name
    if kind == "oversized":
        with open(cases, "wb") as stream:
            stream.truncate(MAX_JSON_BYTES + 1)
    elif kind == "fifo":
        os.mkfifo(cases)
    elif kind == "folder":
        cases.mkdir()
    else:
        cases.write_bytes(b'["a\xff"]')
    run = _evaluate_with_case_list(tmp_path, cases)
    assert run.returncode == 2
    assert run.stderr.startswith("error: case list") and len(run.stderr.splitlines()) == 1, run.stderr
    assert str(cases) in run.stderr and not list(tmp_path.glob("scores*"))


def test_evaluate_takes_a_text_case_list(tmp_path):
    cases = tmp_path / "cases.txt"
    cases.write_text("a\n\n")
    run = _evaluate_with_case_list(tmp_path, cases)
    assert run.returncode == 0, run.stderr
    assert [case["case"] for case in json.loads((tmp_path / "scores.json").read_text())["cases"]] == ["a"]


def _boxes(shape=(10, 12, 9)) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[2:6, 2:7, 2:5] = 1
    label[6:9, 2:7, 2:5] = 2
    return label


def test_evaluate_a_csv_pairs_file_with_label_names(tmp_path, capsys):
    from AttentionUNetSegmentLib.cli.commands import main

    (tmp_path / "pred").mkdir()
    label = _boxes()
    _write(label.astype(np.float32) * 10, tmp_path / "c1.nii.gz")
    _write(label, tmp_path / "c1_label.nii.gz")
    missed = label.copy()
    missed[missed == 2] = 0
    _write(missed, tmp_path / "pred" / "c1_seg.nii.gz")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("image,label\nc1.nii.gz,c1_label.nii.gz\n")
    common = ["evaluate", str(pairs), "--predictions", str(tmp_path / "pred"), "--progress", "none"]

    assert main([*common, "-o", str(tmp_path / "unnamed")]) == 2
    assert "--label-names" in capsys.readouterr().err and not list(tmp_path.glob("unnamed*"))

    assert main([*common, "--label-names", "1=Liver", "2=Tumour", "-o", str(tmp_path / "scores")]) == 0
    report = json.loads((tmp_path / "scores.json").read_text())
    assert report["labels"] == {"1": "Liver", "2": "Tumour"}
    assert report["mean"]["Liver"]["dice"] == 1.0 and report["mean"]["Tumour"]["dice"] == 0.0


def test_evaluate_a_csv_pairs_file_with_a_model_takes_the_models_names(tmp_path, tiny_bundle, capsys):
    from AttentionUNetSegmentLib.cli.commands import main

    label = _boxes((20, 24, 22))
    _write((np.random.default_rng(0).normal(size=label.shape) + label).astype(np.float32), tmp_path / "c1.nii.gz")
    _write(label, tmp_path / "c1_label.nii.gz")
    (tmp_path / "pairs.csv").write_text("image,label\nc1.nii.gz,c1_label.nii.gz\n")
    status = main(["evaluate", str(tmp_path / "pairs.csv"), "--model", str(tiny_bundle.path), "--device", "cpu",
                   "-o", str(tmp_path / "scores"), "--progress", "none"])
    assert status == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "scores.json").read_text())
    assert set(report["mean"]) == {"Anterior", "Posterior"}


def test_evaluate_finds_segment_outputs_of_nnunet_v2_images(tmp_path, capsys):
    """nnU-Net v2 names images ``<case>_0000``; ``segment`` writes ``<case>_0000_seg``; the case is ``<case>``."""
    from AttentionUNetSegmentLib.cli.commands import main

    for folder in ("imagesTr", "labelsTr", "pred"):
        (tmp_path / folder).mkdir()
    label = _boxes()
    _write(label.astype(np.float32), tmp_path / "imagesTr" / "hippo_007_0000.nii.gz")
    _write(label, tmp_path / "labelsTr" / "hippo_007.nii.gz")
    _write(label, tmp_path / "pred" / "hippo_007_0000_seg.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "Anterior": 1, "Posterior": 2},
                                                       "channel_names": {"0": "MRI"}, "file_ending": ".nii.gz"}))
    status = main(["evaluate", str(tmp_path), "--predictions", str(tmp_path / "pred"), "-o",
                   str(tmp_path / "scores"), "--progress", "none"])
    assert status == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "scores.json").read_text())
    assert [case["case"] for case in report["cases"]] == ["hippo_007"]
    assert report["mean"]["Anterior"]["dice"] == 1.0 and report["mean"]["Posterior"]["dice"] == 1.0


def test_every_command_takes_the_same_device_words(tmp_path):
    """``segment``, ``demo``, ``train`` and ``evaluate`` take ``--device`` from ``constants.DEVICES``, and refuse
    any other word alike: one ``error:`` line, exit status 2, before anything is read."""
    import argparse

    from AttentionUNetSegmentLib.cli.commands import build_parser
    from AttentionUNetSegmentLib.constants import DEVICES

    choices = {}
    for command in ("segment", "demo", "train", "evaluate"):
        commands = next(a for a in build_parser([command])._actions if isinstance(a, argparse._SubParsersAction))
        choices[command] = [tuple(a.choices) for a in commands.choices[command]._actions
                            if "--device" in a.option_strings]
    assert choices == dict.fromkeys(choices, [DEVICES])
    references, predictions = _one_cube_case(tmp_path, "a")
    run = subprocess.run([*CLI, "evaluate", str(references), "--predictions", str(predictions), "--device", "gpu",
                          "-o", str(tmp_path / "scores")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.startswith("error: argument --device: invalid choice: 'gpu'")
    assert len(run.stderr.splitlines()) == 1 and not list(tmp_path.glob("scores*"))
