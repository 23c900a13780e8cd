"""Writing a Prediction: files, geometry, the Slicer segmentation, the report, all-or-nothing behaviour."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from AttentionUNetSegmentLib.model.bundle import LabelInfo
from AttentionUNetSegmentLib.errors import OutputExistsError
from AttentionUNetSegmentLib.inference.predictor import Prediction
from AttentionUNetSegmentLib.inference.outputs import (
    plan_outputs,
    safe_name,
    segment_statistics,
    slicer_segmentation,
    write_prediction,
)

OBLIQUE = sitk.VersorTransform((0.3, -0.5, 0.8), 0.4).GetMatrix()


def _grid(array: np.ndarray, spacing=(0.7, 1.3, 2.1), origin=(-5.0, 12.0, 40.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(OBLIQUE)
    return image


@pytest.fixture
def prediction() -> Prediction:
    """Labels with 24 voxels of value 1 and 6 of value 2 on an oblique anisotropic (z, y, x) = (6, 7, 8) grid."""
    labels = np.zeros((6, 7, 8), np.uint8)
    labels[1:3, 2:5, 3:7] = 1  # 2 * 3 * 4 = 24
    labels[4, 5, 1:7] = 2  # 6
    coarse = _grid(np.full((3, 4, 4), 0.25, np.float32), spacing=(1.4, 2.6, 4.2))
    probabilities = {value: _grid((labels == value).astype(np.float32)) for value in (0, 1, 2)}
    return Prediction(labels=_grid(labels), attention=[_grid(np.full((6, 7, 8), 0.5, np.float32)), coarse],
                      probabilities=probabilities, timings={"inference": 0.25}, device="cpu")


def test_statistics_count_voxels_and_millilitres(prediction):
    rows = segment_statistics(prediction.labels, [LabelInfo(1, "A", (1, 0, 0)), LabelInfo(2, "B", (0, 1, 0)),
                                                  LabelInfo(7, "absent", (0, 0, 1))])
    voxel_ml = 0.7 * 1.3 * 2.1 / 1000.0
    assert [(r["voxels"], r["volume_ml"]) for r in rows] == [(24, pytest.approx(24 * voxel_ml)),
                                                             (6, pytest.approx(6 * voxel_ml)), (0, 0.0)]


def test_write_prediction_writes_every_file(prediction, tiny_bundle, tmp_path):
    paths = write_prediction(prediction, tiny_bundle, tmp_path / "out", "case", input_path=tmp_path / "case.nii.gz",
                             parameters={"tta": False})
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted(["case_seg.nii.gz", "case_seg.seg.nrrd", "case_attention_0.nii.gz",
                            "case_attention_1.nii.gz", "case_prob_Anterior.nii.gz", "case_prob_Posterior.nii.gz",
                            "case_report.json"])
    labels = sitk.ReadImage(str(paths.segmentation))
    assert labels.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(prediction.labels))
    np.testing.assert_allclose(labels.GetDirection(), OBLIQUE, atol=1e-5)
    coarse = sitk.ReadImage(str(paths.attention[1]))
    assert coarse.GetSize() == (4, 4, 3)
    np.testing.assert_allclose(coarse.GetSpacing(), (1.4, 2.6, 4.2), atol=1e-5)

    report = json.loads(paths.report.read_text())
    assert [(s["name"], s["voxels"]) for s in report["segments"]] == [("Anterior", 24), ("Posterior", 6)]
    assert report["segments"][0]["volume_ml"] == pytest.approx(24 * 0.7 * 1.3 * 2.1 / 1000.0)
    assert report["model"]["sha256"] == tiny_bundle.sha256
    assert report["parameters"] == {"tta": False} and report["timings"] == {"inference": 0.25}
    assert report["files"]["attention"] == ["case_attention_0.nii.gz", "case_attention_1.nii.gz"]
    assert report["files"]["probabilities"] == {"Anterior": "case_prob_Anterior.nii.gz",
                                                "Posterior": "case_prob_Posterior.nii.gz"}
    assert set(paths.to_dict()) == {"segmentation", "slicer_segmentation", "attention", "probabilities", "report"}


def test_nrrd_format_and_no_optional_outputs(prediction, tiny_bundle, tmp_path):
    prediction.attention, prediction.probabilities = [], {}
    write_prediction(prediction, tiny_bundle, tmp_path, "case", fmt="nrrd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_report.json", "case_seg.nrrd", "case_seg.seg.nrrd"]


def test_slicer_segmentation_reads_back_in_slicerio_and_slicer(prediction, tiny_bundle, tmp_path):
    paths = write_prediction(prediction, tiny_bundle, tmp_path, "case")
    slicerio = pytest.importorskip("slicerio")
    segmentation = slicerio.read_segmentation(str(paths.slicer_segmentation))
    assert [(s["name"], s["labelValue"], s["layer"]) for s in segmentation["segments"]] == [
        ("Anterior", 1, 0), ("Posterior", 2, 0)]
    assert segmentation["segments"][0]["color"] == pytest.approx([0.9, 0.6, 0.2])
    assert segmentation["segments"][0]["extent"] == [3, 6, 2, 4, 1, 2]  # i, j, k bounds of value 1
    assert int((segmentation["voxels"] == 2).sum()) == 6

    slicer = pytest.importorskip("slicer")  # the real MRML segmentation reader (slicer-core)
    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(paths.slicer_segmentation))
    assert storage.ReadData(node)
    loaded = node.GetSegmentation()
    segments = [loaded.GetNthSegment(i) for i in range(loaded.GetNumberOfSegments())]
    assert [(s.GetName(), s.GetLabelValue()) for s in segments] == [("Anterior", 1), ("Posterior", 2)]
    assert segments[1].GetColor() == pytest.approx((0.2, 0.6, 0.9))


HIPPOCAMPUS_TERMINOLOGY = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical "
                           "Structure~SCT^5976002^Hippocampus~^^~Anatomic codes - DICOM master list~^^~^^")


def test_terminology_reaches_the_slicer_segmentation(prediction, tiny_bundle, tmp_path):
    labels = [LabelInfo(1, "Anterior", (0.9, 0.6, 0.2), HIPPOCAMPUS_TERMINOLOGY), LabelInfo(2, "Posterior", (0, 0, 1))]
    sitk.WriteImage(slicer_segmentation(prediction.labels, labels, "test"), str(tmp_path / "t.seg.nrrd"))
    slicerio = pytest.importorskip("slicerio")
    segments = slicerio.read_segmentation(str(tmp_path / "t.seg.nrrd"), skip_voxels=True)["segments"]
    assert segments[0]["terminology"]["type"] == ["SCT", "5976002", "Hippocampus"]
    assert segments[0]["tags"] == {"Source": "test"} and "terminology" not in segments[1]


def test_existing_outputs_are_refused_and_untouched(prediction, tiny_bundle, tmp_path):
    (tmp_path / "case_attention_1.nii.gz").write_text("keep me")
    with pytest.raises(OutputExistsError, match="--force"):
        write_prediction(prediction, tiny_bundle, tmp_path, "case")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_attention_1.nii.gz"]
    assert (tmp_path / "case_attention_1.nii.gz").read_text() == "keep me"
    write_prediction(prediction, tiny_bundle, tmp_path, "case", force=True)
    assert sitk.ReadImage(str(tmp_path / "case_attention_1.nii.gz")).GetSize() == (4, 4, 3)


def test_a_failure_leaves_no_file_behind(prediction, tiny_bundle, tmp_path):
    # A directory where the report goes: every image is written, then the final rename fails.
    (tmp_path / "case_report.json").mkdir()
    with pytest.raises(OSError):
        write_prediction(prediction, tiny_bundle, tmp_path, "case", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_report.json"]


def test_probability_file_names_are_safe(tiny_bundle, tmp_path):
    labels = [LabelInfo(1, "Left Hippo/1", (1, 0, 0)), LabelInfo(2, "..", (0, 1, 0))]
    paths = plan_outputs(tmp_path, "case", labels, probabilities=True)
    assert [p.name for p in paths.probabilities.values()] == ["case_prob_Left_Hippo_1.nii.gz", "case_prob_label.nii.gz"]
    assert safe_name("a b") == "a_b"
    assert len(paths.all()) == 5
    colliding = plan_outputs(tmp_path, "case", [LabelInfo(1, "a b", (1, 0, 0)), LabelInfo(2, "a_b", (0, 1, 0))],
                             probabilities=True)
    assert [p.name for p in colliding.probabilities.values()] == ["case_prob_a_b_1.nii.gz", "case_prob_a_b_2.nii.gz"]
