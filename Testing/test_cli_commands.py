"""The ``attention-unet`` command line, end to end on small synthetic oblique anisotropic volumes.

Only a few tests start a real subprocess (each pays for importing torch); the many bad-input cases call
``cli.main`` in-process, which is the same code path minus the interpreter start, and one subprocess confirms the
process-level behaviour (exit status 2, one ``error:`` line, no traceback).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from AttentionUNetSegmentLib.cli import commands as cli
from AttentionUNetSegmentLib.constants import DEFAULT_MODEL
from AttentionUNetSegmentLib.model.bundle import BUNDLED_MODELS_DIR, MODELS_ENV
from AttentionUNetSegmentLib.fileio.imageio import image_stem

#: Direction cosines of an oblique acquisition: a 0.4 rad rotation about an oblique axis (exactly orthonormal).
OBLIQUE = sitk.VersorTransform((0.3, -0.5, 0.8), 0.4).GetMatrix()


def make_volume(path: Path, size_xyz: Sequence[int], spacing: Sequence[float], direction=OBLIQUE,
                origin=(-12.5, 30.25, 7.0), seed: int = 0) -> sitk.Image:
    """An ellipsoidal 'structure' brighter than noisy background, written to ``path`` (float32)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in size_xyz[::-1]), indexing="ij")
    array = (100.0 * ((x / 0.6) ** 2 + (y / 0.5) ** 2 + (z / 0.7) ** 2 < 1) + rng.normal(0, 10, x.shape))
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(direction)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return image


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "AttentionUNetSegmentLib", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def assert_same_grid(image: sitk.Image, reference: sitk.Image) -> None:
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-5)


def ras_affine(image: sitk.Image) -> np.ndarray:
    """The NIfTI (RAS) voxel-to-world affine of an ITK (LPS) image."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.array(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


@pytest.fixture(scope="module")
def segmented(tiny_bundle, tmp_path_factory):
    """One real subprocess run on two inputs: an oblique anisotropic NIfTI and a volume smaller than a patch."""
    folder = tmp_path_factory.mktemp("cli")
    inputs = {
        "oblique": make_volume(folder / "oblique.nii.gz", (22, 18, 12), (1.1, 0.8, 2.3)),
        "small": make_volume(folder / "small.nrrd", (9, 11, 7), (1.0, 1.0, 1.0), seed=1),
    }
    out = folder / "out"
    result = run_cli("segment", str(folder / "oblique.nii.gz"), str(folder / "small.nrrd"), "--output-dir", str(out),
                     "--model", str(tiny_bundle.path), "--device", "cpu", "--probabilities", "--progress", "json")
    assert result.returncode == 0, result.stderr
    return inputs, out, result


def test_segment_writes_every_output_on_the_input_grid(segmented, tiny_bundle):
    inputs, out, _ = segmented
    for stem, image in inputs.items():
        labels = sitk.ReadImage(str(out / f"{stem}_seg.nii.gz"))
        assert labels.GetPixelID() == sitk.sitkUInt8
        assert_same_grid(labels, image)
        assert set(np.unique(sitk.GetArrayViewFromImage(labels))) <= {0, 1, 2}
        for name in ("Anterior", "Posterior"):
            probability = sitk.ReadImage(str(out / f"{stem}_prob_{name}.nii.gz"))
            assert probability.GetPixelID() == sitk.sitkFloat32
            assert_same_grid(probability, image)
        for k in range(len(tiny_bundle.architecture["channels"]) - 1):
            attention = sitk.ReadImage(str(out / f"{stem}_attention_{k}.nii.gz"))
            values = sitk.GetArrayViewFromImage(attention)
            assert attention.GetPixelID() == sitk.sitkFloat32 and attention.GetDimension() == 3
            assert values.min() >= 0.0 and values.max() <= 1.0
            # What another viewer sees: nibabel's affine of the written map is the map's ITK geometry.
            np.testing.assert_allclose(nib.load(str(out / f"{stem}_attention_{k}.nii.gz")).affine,
                                       ras_affine(attention), atol=1e-4)
        assert not (out / f"{stem}_attention_2.nii.gz").exists()
        np.testing.assert_allclose(nib.load(str(out / f"{stem}_seg.nii.gz")).affine, ras_affine(image), atol=1e-4)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_segment_report_volumes_match_voxel_counts(segmented, tiny_bundle):
    inputs, out, _ = segmented
    for stem, image in inputs.items():
        report = json.loads((out / f"{stem}_report.json").read_text())
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{stem}_seg.nii.gz")))
        voxel_ml = math.prod(image.GetSpacing()) / 1000.0
        assert [s["name"] for s in report["segments"]] == ["Anterior", "Posterior"]
        for segment in report["segments"]:
            count = int((labels == segment["value"]).sum())
            assert segment["voxels"] == count
            assert segment["volume_ml"] == pytest.approx(count * voxel_ml)
        assert report["model"] == {"name": "tiny", "version": "0.0.1", "sha256": tiny_bundle.sha256,
                                   "path": str(tiny_bundle.path.resolve()), "license": "Apache-2.0"}
        assert report["device"] == "cpu" and report["parameters"]["probabilities"] is True
        assert report["timings"]["read"] >= 0
        assert report["files"]["segmentation"] == f"{stem}_seg.nii.gz"
        assert report["image"]["size"] == list(image.GetSize())


def test_segment_slicer_segmentation_reads_back_with_slicerio(segmented):
    slicerio = pytest.importorskip("slicerio")
    inputs, out, _ = segmented
    segmentation = slicerio.read_segmentation(str(out / "oblique_seg.seg.nrrd"))
    segments = {s["name"]: s for s in segmentation["segments"]}
    assert segments["Anterior"]["labelValue"] == 1 and segments["Posterior"]["labelValue"] == 2
    assert segments["Anterior"]["color"] == pytest.approx([0.9, 0.6, 0.2])
    assert segments["Posterior"]["color"] == pytest.approx([0.2, 0.6, 0.9])
    labels = sitk.ReadImage(str(out / "oblique_seg.nii.gz"))
    # slicerio's voxels are (i, j, k); SimpleITK's array is (k, j, i).
    np.testing.assert_array_equal(segmentation["voxels"], sitk.GetArrayFromImage(labels).transpose(2, 1, 0))
    ijk_to_lps = segmentation["ijkToLPS"]
    direction = np.array(labels.GetDirection()).reshape(3, 3) * np.array(labels.GetSpacing())
    np.testing.assert_allclose(ijk_to_lps[:3, :3], direction, atol=1e-5)
    np.testing.assert_allclose(ijk_to_lps[:3, 3], labels.GetOrigin(), atol=1e-4)


def test_segment_json_progress_lines_parse(segmented):
    _, out, result = segmented
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert all({"stage", "fraction"} <= set(r) for r in records)
    fractions = [r["fraction"] for r in records]
    assert fractions == sorted(fractions) and 0.0 <= fractions[0] and fractions[-1] == 1.0
    done = records[-1]
    assert done["stage"] == "done"
    assert set(done["outputs"]) == {"oblique", "small"}
    for paths in done["outputs"].values():
        assert Path(paths["segmentation"]).is_file() and Path(paths["report"]).is_file()
        assert all(Path(p).is_file() for p in paths["attention"])
    assert result.stderr == ""
    # Two inputs, one model load.
    assert [r["stage"] for r in records].count("load") == 1


@pytest.fixture(scope="module")
def warned(tiny_bundle, tmp_path_factory):
    """The tiny network with a domain of 16 mm crops, and a 40 mm input its domain guard warns about."""
    from AttentionUNetSegmentLib.model.bundle import create_metadata, save_bundle
    from AttentionUNetSegmentLib.preprocessing.domain import measure_domain

    folder = tmp_path_factory.mktemp("warned")
    metadata = create_metadata(name="tiny-domain", labels=tiny_bundle.metadata["labels"], patch_size=(32, 32, 32),
                               preprocessing=tiny_bundle.metadata["preprocessing"],
                               domain=measure_domain([(16, 16, 16)] * 2, [(1.0, 1.0, 1.0)] * 2))
    bundle = save_bundle(tiny_bundle.build_model(), metadata, folder / "model")
    make_volume(folder / "wide.nii.gz", (40, 36, 20), (1.0, 1.0, 1.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    return bundle, folder / "wide.nii.gz"


def test_warnings_of_a_json_progress_run_stay_out_of_stdout_and_stderr(warned, tmp_path):
    """--progress json: stdout holds only the JSON records and stderr only errors, also when an input gets a
    domain-guard warning while the run is going; the warning is in the report (and the record's report)."""
    bundle, image = warned
    result = run_cli("segment", str(image), "--output-dir", str(tmp_path), "--model", str(bundle.path), "--device",
                     "cpu", "--no-attention", "--progress", "json")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert records[-1]["stage"] == "done" and result.stderr == ""
    warnings = json.loads((tmp_path / "wide_report.json").read_text(encoding="utf-8"))["warnings"]
    assert len(warnings) == 1 and "field of view" in warnings[0]


@pytest.mark.parametrize("kind", ["bar", "none"])
def test_warnings_and_the_model_line_are_printed_above_the_bar(warned, tmp_path, kind):
    """The lines for people (the input's warning, the model line) go through the progress reporter's log: whole
    lines of their own, never written into a bar's frame (a bar redraws with carriage returns, so a line written
    past it would start mid-frame)."""
    bundle, image = warned
    result = run_cli("segment", str(image), "--output-dir", str(tmp_path), "--model", str(bundle.path), "--device",
                     "cpu", "--no-attention", "--progress", kind)
    assert result.returncode == 0, result.stderr
    warning = "warning: wide: the input's field of view"
    frames = [frame for line in result.stderr.split("\n") for frame in line.split("\r")]
    lines = [frame for frame in frames if warning in frame or "model: tiny-domain" in frame]
    assert len(lines) == 2 and lines[0].startswith(warning), result.stderr
    assert lines[1] == f"model: tiny-domain 1.0.0 from {bundle.path.resolve()}"
    if kind == "bar":
        assert "100%" in result.stderr
    else:
        assert result.stderr.splitlines() == lines


# ----------------------------------------------------------------------------------------- bad input, in-process
def run_main(capsys, *args: str):
    status = cli.main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_clean_failure(status: int, err: str, out_dir: Path, expected: str) -> None:
    lines = err.strip().splitlines()
    assert status == 2
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0]
    assert "Traceback" not in err
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def _bad_inputs(folder: Path) -> List[tuple]:
    cases = [("missing.nii.gz", "does not exist")]
    (folder / "garbage.nii.gz").write_bytes(b"this is not an image" * 10)
    cases.append(("garbage.nii.gz", "garbage.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(16, 16).astype(np.float32)), str(folder / "flat.nrrd"))
    cases.append(("flat.nrrd", "2D"))
    nib.save(nib.Nifti1Image(np.random.rand(8, 8, 8, 3).astype(np.float32), np.eye(4)), str(folder / "series.nii.gz"))
    cases.append(("series.nii.gz", "4D"))
    rgb = sitk.GetImageFromArray(np.random.randint(0, 255, (8, 8, 8, 3), dtype=np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(folder / "rgb.nrrd"))
    cases.append(("rgb.nrrd", "component"))
    for name, bad in (("nan.mha", np.nan), ("inf.nrrd", np.inf)):
        array = np.random.rand(8, 8, 8).astype(np.float32)
        array[3, 3, 3] = bad
        sitk.WriteImage(sitk.GetImageFromArray(array), str(folder / name))
        cases.append((name, "NaN" if np.isnan(bad) else "Inf"))
    sitk.WriteImage(sitk.GetImageFromArray(np.full((8, 8, 8), 5, np.int16)), str(folder / "constant.nii.gz"))
    cases.append(("constant.nii.gz", "constant"))
    return cases


def test_every_bad_input_fails_cleanly(tiny_bundle, tmp_path, capsys):
    for name, expected in _bad_inputs(tmp_path):
        out = tmp_path / f"out-{name}"
        status, _, err = run_main(capsys, "segment", str(tmp_path / name), "--output-dir", str(out),
                                  "--model", str(tiny_bundle.path), "--device", "cpu")
        assert_clean_failure(status, err, out, expected)


def test_a_failing_input_of_several_is_recorded_in_the_summary_and_the_others_still_run(tiny_bundle, tmp_path,
                                                                                       capsys):
    """``segment A B C ...``: every bad input gets a failed row with its error in ``summary.csv``, the good ones
    (before and after them) are segmented, and the run ends with exit status 2 and one ``error:`` line."""
    first, last = tmp_path / "first.nii.gz", tmp_path / "last.nrrd"
    make_volume(first, (12, 10, 10), (1, 1, 1))
    make_volume(last, (10, 12, 8), (1.2, 1, 1.5), seed=1)
    cases = _bad_inputs(tmp_path)
    out = tmp_path / "out"
    inputs = [str(first), *(str(tmp_path / name) for name, _ in cases), str(last)]
    status, stdout, err = run_main(capsys, "segment", *inputs, "--output-dir", str(out), "--model",
                                   str(tiny_bundle.path), "--device", "cpu", "--no-attention", "--progress", "json")
    assert status == 2 and "Traceback" not in err
    errors = err.strip().splitlines()  # --progress json: stderr holds the error line only
    assert len(errors) == 1 and errors[0].startswith(f"error: {len(cases)} of {len(inputs)} inputs failed (")
    assert str(out / "summary.csv") in errors[0]
    done = json.loads(stdout.strip().splitlines()[-1])
    assert done["stage"] == "done" and set(done["outputs"]) == {"first", "last"}
    assert done["summary"] == str((out / "summary.csv").resolve())
    assert set(done["failed"]) == {image_stem(name) for name, _ in cases}
    with open(out / "summary.csv", newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    stems = ["first", *(image_stem(name) for name, _ in cases), "last"]
    assert [row["input"] for row in rows] == stems
    assert list(rows[0]) == ["input", "status", "error", "model", "model_version", "Anterior (mL)",
                             "Posterior (mL)", "warnings"]
    for row, (_, expected) in zip(rows[1:-1], cases):
        assert row["status"] == "failed" and expected in row["error"] and row["Anterior (mL)"] == ""
        assert not list(out.glob(f"{row['input']}_*"))
    for row in (rows[0], rows[-1]):
        report = json.loads((out / f"{row['input']}_report.json").read_text())
        assert row["status"] == "done" and row["error"] == "" and (row["model"], row["model_version"]) == (
            "tiny", "0.0.1")
        assert [row[f"{s['name']} (mL)"] for s in report["segments"]] == [
            f"{s['volume_ml']:.3f}" for s in report["segments"]]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_an_existing_summary_needs_force(tiny_bundle, tmp_path, capsys):
    images = [tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"]
    for index, image in enumerate(images):
        make_volume(image, (10, 10, 10), (1, 1, 1), seed=index)
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.csv").write_text("an earlier run's summary\n")
    args = ["segment", *map(str, images), "--output-dir", str(out), "--model", str(tiny_bundle.path), "--device",
            "cpu", "--no-attention"]
    status, _, err = run_main(capsys, *args)
    assert_clean_failure(status, err, tmp_path / "absent", "summary.csv")
    assert [p.name for p in out.iterdir()] == ["summary.csv"]
    assert (out / "summary.csv").read_text() == "an earlier run's summary\n"
    status, stdout, err = run_main(capsys, *args, "--force")
    assert status == 0 and "error" not in err
    assert stdout.strip().splitlines()[-1] == f"summary: {out / 'summary.csv'}"
    with open(out / "summary.csv", newline="") as stream:
        assert [(row["input"], row["status"]) for row in csv.DictReader(stream)] == [("a", "done"), ("b", "done")]


def test_bad_models_fail_cleanly(tiny_bundle, tmp_path, capsys):
    image = tmp_path / "image.nii.gz"
    make_volume(image, (10, 10, 10), (1, 1, 1))
    tampered = Path(shutil.copytree(tiny_bundle.path, tmp_path / "tampered"))
    weights = tampered / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    newer = Path(shutil.copytree(tiny_bundle.path, tmp_path / "newer"))
    metadata = json.loads((newer / "model.json").read_text())
    metadata["format_version"] = 99
    (newer / "model.json").write_text(json.dumps(metadata))
    for model, expected in ((tampered, "sha256"), (newer, "newer"), (tmp_path / "absent", "does not exist"),
                            ("no-such-model", "no installed model named")):
        out = tmp_path / f"out-{Path(model).name}"
        status, _, err = run_main(capsys, "segment", str(image), "--output-dir", str(out), "--model", str(model))
        assert_clean_failure(status, err, out, expected)


def test_usage_errors_fail_cleanly(tiny_bundle, tmp_path, capsys):
    image = tmp_path / "image.nii.gz"
    make_volume(image, (10, 10, 10), (1, 1, 1))
    out = tmp_path / "out"
    for extra, expected in ((["--overlap", "1.5"], "overlap"), (["--roi", "1", "2", "3"], "--roi"),
                            (["--roi", "0", "1", "5", "2", "0", "1"], "minimum below"), (["--format", "png"], "png"),
                            (["--no-such-option"], "unrecognized")):
        status, _, err = run_main(capsys, "segment", str(image), "--output-dir", str(out),
                                  "--model", str(tiny_bundle.path), *extra)
        assert_clean_failure(status, err, out, expected)
    status, _, err = run_main(capsys, "segment", str(image), str(tmp_path / "other" / "image.nii.gz"),
                              "--output-dir", str(out), "--model", str(tiny_bundle.path))
    assert_clean_failure(status, err, out, "share the file name stem")


def test_existing_outputs_need_force(tiny_bundle, tmp_path, capsys):
    image = tmp_path / "image.nii.gz"
    make_volume(image, (12, 10, 8), (1.5, 1.0, 2.0))
    out = tmp_path / "out"
    args = ["segment", str(image), "--output-dir", str(out), "--model", str(tiny_bundle.path), "--device", "cpu",
            "--no-attention", "--format", "nrrd"]
    status, stdout, _ = run_main(capsys, *args)
    assert status == 0 and "image: Anterior" in stdout
    written = sorted(p.name for p in out.iterdir())
    assert written == ["image_report.json", "image_seg.nrrd", "image_seg.seg.nrrd"]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    status, _, err = run_main(capsys, *args)
    assert status == 2 and err.startswith("error: ") and "--force" in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    status, _, _ = run_main(capsys, *args, "--force")
    assert status == 0 and sorted(p.name for p in out.iterdir()) == written


def test_unusable_output_folder_fails_before_inference(tiny_bundle, tmp_path, capsys):
    image = tmp_path / "image.nii.gz"
    make_volume(image, (10, 10, 10), (1, 1, 1))
    (tmp_path / "a-file").write_text("not a folder")
    out = tmp_path / "a-file" / "out"
    status, stdout, err = run_main(capsys, "segment", str(image), "--output-dir", str(out), "--model",
                                   str(tiny_bundle.path), "--device", "cpu", "--progress", "json")
    assert_clean_failure(status, err, out, "is a file, not a folder")
    assert not any(json.loads(line)["stage"] == "inference" for line in stdout.splitlines())
    assert (tmp_path / "a-file").read_text() == "not a folder"
    # A write that fails after inference (here: a folder where the report goes) is one error line, too.
    blocked = tmp_path / "blocked"
    (blocked / "image_report.json").mkdir(parents=True)
    status, _, err = run_main(capsys, "segment", str(image), "--output-dir", str(blocked), "--model",
                              str(tiny_bundle.path), "--device", "cpu", "--no-attention", "--force")
    assert status == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert [p.name for p in blocked.iterdir()] == ["image_report.json"]


def test_roi_restricts_the_segmentation(tiny_bundle, tmp_path, capsys):
    image_path = tmp_path / "image.nii.gz"
    image = make_volume(image_path, (16, 16, 16), (1.0, 1.0, 1.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
                        origin=(0, 0, 0))
    # LPS (0..15) -> RAS: R = -x, A = -y. A box in the first quarter of x only.
    roi = ["-4", "0", "-15", "0", "0", "15"]
    status, _, err = run_main(capsys, "segment", str(image_path), "--output-dir", str(tmp_path / "out"), "--model",
                              str(tiny_bundle.path), "--device", "cpu", "--roi", *roi, "--no-attention")
    assert status == 0, err
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "image_seg.nii.gz")))
    assert labels.shape == sitk.GetArrayViewFromImage(image).shape
    assert not labels[:, :, 5:].any()  # nothing outside the ROI (x >= 5 mm)
    report = json.loads((tmp_path / "out" / "image_report.json").read_text())
    assert report["parameters"]["roi"] == [-4.0, 0.0, -15.0, 0.0, 0.0, 15.0]


def test_roi_from_a_slicer_markups_file(tmp_path):
    slicer = pytest.importorskip("slicer")
    scene = slicer.vtkMRMLScene()
    roi = slicer.vtkMRMLMarkupsROINode()
    scene.AddNode(roi)
    roi.SetCenter(10.0, -20.0, 30.0)
    roi.SetSize(4.0, 6.0, 8.0)
    storage = slicer.vtkMRMLMarkupsROIJsonStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "roi.mrk.json"))
    assert storage.WriteData(roi)
    assert cli.parse_roi([str(tmp_path / "roi.mrk.json")]) == pytest.approx((8, 12, -23, -17, 26, 34))
    assert cli.parse_roi(["1", "2", "3", "4", "5", "6"]) == (1, 2, 3, 4, 5, 6)


def test_models_lists_bundles_from_the_environment(tiny_bundle, capsys, monkeypatch):
    monkeypatch.setenv(MODELS_ENV, str(tiny_bundle.path.parent))
    status, out, _ = run_main(capsys, "models", "--json")
    assert status == 0
    rows = {row["name"]: row for row in json.loads(out)}
    assert rows["tiny"]["labels"] == ["Anterior", "Posterior"]
    assert rows["tiny"]["sha256"] == tiny_bundle.sha256
    assert rows["tiny"]["size_bytes"] == (tiny_bundle.path / "model.safetensors").stat().st_size
    status, out, _ = run_main(capsys, "models")
    assert status == 0 and "tiny" in out and tiny_bundle.sha256[:12] in out


def test_devices_reports_what_auto_uses(capsys):
    import torch

    status, out, _ = run_main(capsys, "devices", "--json")
    info = json.loads(out)
    assert status == 0 and info["torch"] == torch.__version__
    assert len(info["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert info["auto"] == ("cuda" if info["gpus"] else "cpu")


def test_summary_and_gradcheck_commands(tiny_bundle, capsys):
    status, out, _ = run_main(capsys, "summary", "--model", str(tiny_bundle.path), "--input-size", "16", "12", "8")
    assert status == 0
    assert "1x3x8x12x16" in out  # the head's output, (B, C, z, y, x)
    assert "FLOPs per forward pass" in out
    status, out, _ = run_main(capsys, "gradcheck", "--channels", "4", "8", "--input-size", "8", "8", "8")
    assert status == 0 and "every parameter received a non-zero gradient" in out
    status, _, err = run_main(capsys, "summary", "--channels", "4", "8", "16", "--input-size", "2", "8", "8")
    assert status == 2 and "too small" in err


def test_gradcheck_exits_1_when_a_parameter_gets_no_gradient(tiny_bundle, tmp_path, capsys):
    import torch

    from AttentionUNetSegmentLib.model.bundle import save_bundle

    model = tiny_bundle.build_model("cpu")
    with torch.no_grad():
        model.head.weight.zero_()  # nothing flows back through the head into the network
    broken = save_bundle(model, tiny_bundle.metadata, tmp_path / "dead-head")
    status, out, _ = run_main(capsys, "gradcheck", "--model", str(broken.path), "--input-size", "8", "8", "8")
    assert status == 1 and "all-zero gradient" in out and "decoders.0.1.0.weight" in out


def test_process_level_failure_has_one_error_line_and_no_traceback(tiny_bundle, tmp_path):
    array = np.random.rand(8, 8, 8).astype(np.float32)
    array[0, 0, 0] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "nan.mha"))
    result = run_cli("segment", str(tmp_path / "nan.mha"), "--output-dir", str(tmp_path / "out"),
                     "--model", str(tiny_bundle.path))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_a_failing_write_leaves_no_partial_files(tiny_bundle, tmp_path):
    """A file-size limit makes writes fail as a full disk would. ITK's NIfTI writer does not notice (it leaves a
    truncated file and no error), so the engine checks each file: one error line naming the file, nothing left."""
    import resource

    image = tmp_path / "case.nii.gz"
    make_volume(image, (24, 20, 16), (1.0, 1.0, 1.5))
    out = tmp_path / "out"
    out.mkdir()

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))

    result = subprocess.run([sys.executable, "-m", "AttentionUNetSegmentLib", "segment", str(image), "--output-dir",
                             str(out), "--model", str(tiny_bundle.path), "--device", "cpu"], capture_output=True,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300,
                            preexec_fn=limit_file_size)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write {out / 'case_attention_0.nii.gz'}: "), lines
    assert "free space" in lines[0]
    assert list(out.iterdir()) == []


def test_demo_preview(tmp_path, capsys):
    if not list(cli.SAMPLE_DATA_DIR.glob("*.nii.gz")):
        pytest.skip(f"no bundled sample in {cli.SAMPLE_DATA_DIR}")
    if not (BUNDLED_MODELS_DIR / DEFAULT_MODEL / "model.json").is_file():
        pytest.skip(f"the default model is not in {BUNDLED_MODELS_DIR}")
    pytest.importorskip("matplotlib")
    status, out, err = run_main(capsys, "demo", "--output-dir", str(tmp_path / "demo"), "--device", "cpu")
    assert status == 0, err
    previews = list((tmp_path / "demo").glob("*_preview.png"))
    assert len(previews) == 1 and previews[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_preview_draws_the_segmentation_and_an_attention_map(tiny_bundle, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from AttentionUNetSegmentLib.errors import OutputExistsError
    from AttentionUNetSegmentLib.inference.outputs import plan_outputs
    from AttentionUNetSegmentLib.inference.preview import write_preview

    image = tmp_path / "case.nii.gz"
    make_volume(image, (20, 18, 12), (1.0, 1.2, 2.0))
    status, _, err = run_main(capsys, "segment", str(image), "--output-dir", str(tmp_path / "out"), "--model",
                              str(tiny_bundle.path), "--device", "cpu")
    assert status == 0, err
    paths = plan_outputs(tmp_path / "out", "case", tiny_bundle.labels, num_attention=2)
    preview = write_preview(image, paths, tmp_path / "out" / "case_preview.png")
    import matplotlib.image

    pixels = matplotlib.image.imread(str(preview))
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 600
    assert pixels[..., :3].std() > 0.05  # an actual picture, not a blank canvas
    with pytest.raises(OutputExistsError):
        write_preview(image, paths, preview)


def test_sigterm_cancels_cleanly_without_partial_files(tiny_bundle, tmp_path):
    """The Slicer module's Cancel: SIGTERM during inference -> exit 2, one error line, nothing left behind."""
    image = tmp_path / "large.nii.gz"
    make_volume(image, (48, 48, 48), (1.0, 1.0, 1.0))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "AttentionUNetSegmentLib", "segment", str(image), "--output-dir", str(out),
               "--model", str(tiny_bundle.path), "--device", "cpu", "--tta", "--progress", "json"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        for line in process.stdout:
            if json.loads(line)["stage"] == "inference":
                process.send_signal(signal.SIGTERM)
                break
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 2
    assert stderr.startswith("error: cancelled") and len(stderr.strip().splitlines()) == 1
    assert not out.exists() or list(out.iterdir()) == []


def test_train_and_evaluate_commands_come_from_their_modules(capsys):
    parser = cli.build_parser(["train"])
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert {"segment", "models", "summary", "gradcheck", "demo", "train", "evaluate"} <= set(commands)
    from AttentionUNetSegmentLib.cli import train

    assert commands["train"].get_default("handler") is train.run_from_args
    status, _, err = run_main(capsys, "evaluate")  # required options missing: a usage error, not a traceback
    assert status == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
