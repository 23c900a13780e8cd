"""Automatic localisation (issue 11): registration to the bundle's template, per-side boxes, left/right segments.

Registration is checked on inputs synthesised from the shipped template itself with a known affine (rotation up to
20 degrees, scaling, translation, anisotropic voxels, LPS and RAS headers); the CLI on a tiny random network with
the shipped template as its localiser (the network is irrelevant to where the boxes go); the shared whole heads,
when present, against their reference hippocampi (slow).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from AttentionUNetSegmentLib.model.bundle import BUNDLED_MODELS_DIR, create_metadata, load_bundle, save_bundle
from AttentionUNetSegmentLib.preprocessing.localization import fraction_inside, register

from conftest import REPO_ROOT, TINY_LABELS

HIPPOCAMPUS = BUNDLED_MODELS_DIR / "hippocampus"
TEMPLATE = HIPPOCAMPUS / "template.nii.gz"
WHOLE_HEADS = REPO_ROOT.parent / "shared" / "data" / "whole-head"
#: Hippocampus centroids in the template (LPS mm).
CENTROIDS_LPS = {"left": (26.0, 22.0, -14.0), "right": (-26.0, 22.0, -14.0)}


def rotation(degrees_xyz):
    ax, ay, az = (math.radians(d) for d in degrees_xyz)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def moved_template(degrees, scale, translation, spacing, orientation):
    """The template moved by the affine ``A`` (template point q -> input point A q), on a new grid with
    ``spacing`` and ``orientation`` covering the moved head. Returns (image, A as sitk transform)."""
    template = sitk.ReadImage(str(TEMPLATE))
    truth = sitk.AffineTransform(3)
    truth.SetMatrix([float(v) for v in (rotation(degrees) @ np.diag(scale)).ravel()])
    truth.SetTranslation([float(v) for v in translation])
    size = np.array(template.GetSize())
    corners = [truth.TransformPoint(template.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner]))
               for corner in np.array(np.meshgrid(*[[0, s - 1] for s in size])).reshape(3, -1).T]
    low, high = np.min(corners, axis=0) - 10, np.max(corners, axis=0) + 10
    grid = sitk.Image([int(v) for v in np.ceil((high - low) / np.array(spacing))], sitk.sitkFloat32)
    grid.SetSpacing([float(s) for s in spacing])
    grid.SetOrigin([float(v) for v in low])
    grid = sitk.DICOMOrient(grid, orientation)
    moved = sitk.Resample(sitk.Cast(template, sitk.sitkFloat32), grid, truth.GetInverse(), sitk.sitkLinear, 0.0)
    return moved, truth


@pytest.mark.parametrize("degrees, scale, translation, spacing, orientation", [
    ((20.0, 0.0, 5.0), (1.1, 1.0, 0.95), (12.0, -8.0, 15.0), (1.2, 1.5, 2.0), "RAS"),
    ((-10.0, 15.0, -12.0), (0.9, 0.9, 0.85), (-20.0, 10.0, -30.0), (2.0, 1.6, 1.4), "LPS"),
])
def test_registration_recovers_a_known_affine(degrees, scale, translation, spacing, orientation):
    image, truth = moved_template(degrees, scale, translation, spacing, orientation)
    registration = register(image, sitk.ReadImage(str(TEMPLATE)))
    for side, centre in CENTROIDS_LPS.items():
        error = np.linalg.norm(np.subtract(registration.transform.TransformPoint(centre), truth.TransformPoint(centre)))
        assert error < 3.0, f"{side} hippocampus off by {error:.1f} mm"
    assert registration.determinant == pytest.approx(np.prod(scale), rel=0.05)
    assert registration.interior_information > 0.3


@pytest.fixture(scope="module")
def localizing_bundle(tiny_bundle, tmp_path_factory):
    """The tiny random network with the hippocampus bundle's domain and localiser (template included)."""
    shipped = json.loads((HIPPOCAMPUS / "model.json").read_text(encoding="utf-8"))
    metadata = create_metadata(name="tiny-localizing", labels=TINY_LABELS, patch_size=(32, 32, 32),
                               preprocessing=tiny_bundle.metadata["preprocessing"], domain=shipped["domain"],
                               localization=shipped["localization"])
    return save_bundle(tiny_bundle.build_model(), metadata, tmp_path_factory.mktemp("models") / "tiny-localizing",
                       extra_files={"template.nii.gz": TEMPLATE})


def run_segment(*args):
    return subprocess.run([sys.executable, "-m", "AttentionUNetSegmentLib", "segment", *map(str, args),
                           "--progress", "none"], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tilted_head(tmp_path_factory):
    image, truth = moved_template((15.0, 0.0, -8.0), (1.0, 1.05, 1.0), (5.0, -10.0, 20.0), (2.0, 2.0, 2.0), "LPS")
    path = tmp_path_factory.mktemp("heads") / "head.nii.gz"
    sitk.WriteImage(image, str(path))
    return path, truth


def test_segment_localizes_a_whole_head_and_writes_left_and_right(localizing_bundle, tilted_head, tmp_path):
    head, truth = tilted_head
    result = run_segment(head, "--output-dir", tmp_path, "--model", localizing_bundle.path, "--probabilities")
    assert result.returncode == 0, result.stderr
    assert "warning:" not in result.stderr
    report = json.loads((tmp_path / "head_report.json").read_text(encoding="utf-8"))
    assert report["warnings"] == []
    assert [(s["value"], s["name"], s["side"]) for s in report["segments"]] == [
        (1, "Left anterior hippocampus", "left"), (2, "Left posterior hippocampus", "left"),
        (3, "Right anterior hippocampus", "right"), (4, "Right posterior hippocampus", "right")]
    left, right = (report["sides"][side]["volume_ml"] for side in ("left", "right"))
    assert report["asymmetry_index"] == pytest.approx((left - right) / ((left + right) / 2), abs=1e-3)
    localization = report["localization"]
    assert localization["method"] == "template-affine" and localization["registration"]["seconds"] > 0
    # Each reported box (input RAS mm) encloses the true position of its hippocampus.
    for side, centre in CENTROIDS_LPS.items():
        r, a, s = np.multiply(truth.TransformPoint(centre), (-1, -1, 1))
        box = localization["boxes"][side]
        assert box[0] < r < box[1] and box[2] < a < box[3] and box[4] < s < box[5]
    # Outputs on the input grid; labels only inside the boxes, left labels on the left (R < 0).
    image = sitk.ReadImage(str(head))
    labels = sitk.ReadImage(str(tmp_path / "head_seg.nii.gz"))
    for getter in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert np.allclose(getattr(labels, getter)(), getattr(image, getter)())
    array = sitk.GetArrayFromImage(labels)
    assert set(np.unique(array)) <= {0, 1, 2, 3, 4}
    probability = sitk.ReadImage(str(tmp_path / "head_prob_Right_posterior_hippocampus.nii.gz"))
    assert probability.GetSize() == image.GetSize()
    segments = slicerio.read_segmentation(str(tmp_path / "head_seg.seg.nrrd"))["segments"]
    assert [s["name"] for s in segments][0] == "Left anterior hippocampus"
    assert segments[0]["terminology"]["typeModifier"] == ["SCT", "7771000", "Left"]
    assert segments[2]["terminology"]["typeModifier"] == ["SCT", "24028007", "Right"]
    attention = sitk.ReadImage(str(tmp_path / "head_attention_1.nii.gz"))
    assert np.allclose(attention.GetSpacing(), np.array(image.GetSpacing()) * 2)
    assert np.allclose(attention.GetDirection(), image.GetDirection())


def test_localize_off_and_roi_behave_as_before_with_the_guard_warning(localizing_bundle, tilted_head, tmp_path):
    head, _ = tilted_head
    image = sitk.ReadImage(str(head))
    # A 100 x 110 x 80 mm part of the head: still far beyond the domain, small enough for a quick whole-input run.
    size = [int(mm / s) for mm, s in zip((100, 110, 80), image.GetSpacing())]
    start = [(n - m) // 2 for n, m in zip(image.GetSize(), size)]
    part = tmp_path / "part.nii.gz"
    sitk.WriteImage(sitk.RegionOfInterest(image, size, start), str(part))
    off = run_segment(part, "--output-dir", tmp_path / "off", "--model", localizing_bundle.path, "--localize", "off",
                      "--no-attention")
    assert off.returncode == 0, off.stderr
    warnings = [line for line in off.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "field of view" in warnings[0] and "--localize auto" in warnings[0]
    report = json.loads((tmp_path / "off" / "part_report.json").read_text(encoding="utf-8"))
    assert report["localization"] is None and report["sides"] is None and report["asymmetry_index"] is None
    assert len(report["warnings"]) == 1 and report["warnings"][0] in warnings[0]
    assert [(s["name"], s["side"]) for s in report["segments"]] == [("Anterior", None), ("Posterior", None)]
    assert "1 warning(s)" in off.stdout
    roi = run_segment(head, "--output-dir", tmp_path / "roi", "--model", localizing_bundle.path, "--no-attention",
                      "--roi", "-45", "-5", "-50", "10", "-35", "5")
    assert roi.returncode == 0, roi.stderr
    report = json.loads((tmp_path / "roi" / "head_report.json").read_text(encoding="utf-8"))
    assert report["localization"] is None and report["warnings"] == []
    assert [s["name"] for s in report["segments"]] == ["Anterior", "Posterior"]


def test_a_crop_is_not_localized_and_gets_no_warning(localizing_bundle, tmp_path):
    sample = next((BUNDLED_MODELS_DIR.parent / "SampleData").glob("*.nii.gz"))
    result = run_segment(sample, "--output-dir", tmp_path, "--model", localizing_bundle.path, "--no-attention")
    assert result.returncode == 0 and "warning" not in result.stderr
    report = json.loads(next(tmp_path.glob("*_report.json")).read_text(encoding="utf-8"))
    assert report["localization"] is None and report["warnings"] == []
    assert [s["value"] for s in report["segments"]] == [1, 2]


def test_a_non_head_is_refused_with_what_to_do(localizing_bundle, tmp_path):
    noise = sitk.GetImageFromArray(np.random.default_rng(0).normal(100, 20, (100, 100, 100)).astype(np.float32))
    noise.SetSpacing((1.5, 1.5, 1.5))
    path = tmp_path / "noise.nii.gz"
    sitk.WriteImage(noise, str(path))
    result = run_segment(path, "--output-dir", tmp_path / "out", "--model", localizing_bundle.path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: automatic localisation failed") and "--roi" in lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_shipped_bundle_declares_domain_and_localizer():
    bundle = load_bundle(HIPPOCAMPUS)
    assert bundle.has_localizer and bundle.localization.template.is_file()
    assert bundle.domain["field_of_view_mm"]["median"] == [35.0, 50.0, 36.0]
    assert [label.side for label in bundle.localized_labels] == ["left", "left", "right", "right"]
    assert (HIPPOCAMPUS / "LICENSE-MNI152.txt").read_text(encoding="utf-8").count("Copyright") >= 1
    assert TEMPLATE.stat().st_size < 400_000


def _reference_points(reference, value):
    index = np.argwhere(sitk.GetArrayViewFromImage(reference) == value)[:, ::-1].astype(float)
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    return (direction @ (index * np.array(reference.GetSpacing())).T).T + np.array(reference.GetOrigin())


@pytest.mark.slow
@pytest.mark.skipif(not (WHOLE_HEADS / "labels").is_dir(), reason="shared whole-head data not present")
def test_boxes_contain_the_reference_hippocampus_on_the_shared_heads():
    spec = load_bundle(HIPPOCAMPUS).localization
    template = sitk.ReadImage(str(TEMPLATE))
    for label_path in sorted((WHOLE_HEADS / "labels").glob("*.nii.gz")):
        image = sitk.ReadImage(str(WHOLE_HEADS / "images" / label_path.name))
        reference = sitk.ReadImage(str(label_path))
        registration = register(image, template)
        inverse = registration.transform.GetInverse()
        for side, value in (("left", 1), ("right", 2)):
            points = np.array([inverse.TransformPoint(tuple(p)) for p in _reference_points(reference, value)])
            ras = points * np.array([-1.0, -1.0, 1.0])
            box = np.array(spec.boxes[side])
            inside = np.all((ras >= box[0::2]) & (ras <= box[1::2]), axis=1).mean()
            assert inside >= 0.95, f"{label_path.name} {side}: {inside:.3f} of the reference inside its box"
        assert fraction_inside(image, registration.transform, spec.boxes["left"]) > 0.9
