"""The Slicer module's Logic on real MRML (``slicer-core``) with the real engine in a child process.

Only what ``slicer-core`` lacks (Qt, the ScriptedLoadableModule bases, parameterNodeWrapper) is shimmed
(``slicer_module_shims.py``); scene, nodes, storage and segmentation logic are Slicer's own.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import shutil
import subprocess
import sys
import time
import unittest

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
sitk = pytest.importorskip("SimpleITK")
slicerio = pytest.importorskip("slicerio")
vtk = pytest.importorskip("vtk")

from AttentionUNetSegmentLib.bundle import DIGEST_KEY, metadata_digest  # noqa: E402
from AttentionUNetSegmentLib.runner import EtaEstimator  # noqa: E402
from slicer_module_shims import load_module  # noqa: E402

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def _rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    angle = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _add_volume(scene, name, array_kji, spacing=(1.1, 0.9, 2.5), origin=(12.0, -30.0, 40.0),
                directions=None, class_name="vtkMRMLScalarVolumeNode"):
    node = scene.AddNewNodeByClass(class_name, name)
    slicer.util.updateVolumeFromArray(node, array_kji)
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin)
    matrix = vtk.vtkMatrix4x4()
    directions = np.eye(3) if directions is None else directions
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, directions[r, c])
    node.SetIJKToRASDirectionMatrix(matrix)
    return node


def _oblique_image(shape_kji=(14, 26, 30), seed=0):
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_kji], indexing="ij")
    blob = np.exp(-((i * 1.5) ** 2 + (j * 1.5) ** 2 + (k * 1.2) ** 2) * 3)
    return (100 * blob + rng.normal(0, 5, shape_kji)).astype(np.float32)


def _matrix(node):
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _sitk_ijk_to_ras(image):
    direction = np.array(image.GetDirection()).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    m[:3, 3] = LPS_TO_RAS @ np.array(image.GetOrigin())
    return m


def _node_ids(scene):
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


@pytest.fixture(scope="module")
def env(tiny_bundle):
    """Module under test, a scene with an oblique anisotropic volume inside a study, and a logic using the tiny
    random-weight bundle."""
    module = load_module()
    scene = slicer.mrmlScene
    volume = _add_volume(scene, "Oblique", _oblique_image(), directions=_rotation((1, 2, 3), 25))
    sh = scene.GetSubjectHierarchyNode()
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient"), "Study")
    sh.CreateItem(study, volume)
    logic = module.AttentionUNetSegmentLogic()
    logic.enginePython = sys.executable
    return {"module": module, "scene": scene, "volume": volume, "study": study, "logic": logic,
            "bundle": tiny_bundle, "model": str(tiny_bundle.path)}


@pytest.fixture(scope="module")
def first_result(env):
    progress, log = [], []
    result = env["logic"].process(env["volume"], model=env["model"], device="cpu",
                                  progressCallback=lambda f, m, eta: progress.append(f), logCallback=log.append)
    return {"result": result, "progress": progress, "log": log}


def test_segmentation_has_one_segment_per_label_with_names_colours_values(env, first_result):
    result = first_result["result"]
    segments = result.segmentation.GetSegmentation()
    labels = env["bundle"].labels
    assert segments.GetNumberOfSegments() == len(labels)
    for index, label in enumerate(labels):
        segment = segments.GetNthSegment(index)
        assert segment.GetName() == label.name
        assert segment.GetLabelValue() == label.value
        assert segment.GetColor() == pytest.approx(label.color)
    assert result.segmentation.GetName() == "Oblique segmentation"
    assert first_result["progress"][-1] == pytest.approx(1.0)
    assert any("Results added" in line for line in first_result["log"])


def test_results_match_the_engine_run_directly_geometry_included(env, first_result, tmp_path):
    """Scene label map and attention volumes equal what the CLI writes for the same input (read with SimpleITK,
    converted LPS -> RAS independently here)."""
    logic, volume, result = env["logic"], env["volume"], first_result["result"]
    input_path = logic.writeVolumeForEngine(volume, tmp_path / "in")
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "AttentionUNetSegmentLib", "segment", str(input_path), "--output-dir",
                    str(out), "--model", env["model"], "--device", "cpu", "--format", "nrrd", "--progress", "none"],
                   check=True, capture_output=True, timeout=300)

    labelmap = logic.exportToLabelMapNode(result.segmentation, volume)
    try:
        assert labelmap.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
        np.testing.assert_allclose(_matrix(labelmap), _matrix(volume), atol=1e-6)
        expected = sitk.ReadImage(str(out / "input_seg.nrrd"))
        np.testing.assert_allclose(_sitk_ijk_to_ras(expected), _matrix(volume), atol=1e-5)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(labelmap), sitk.GetArrayFromImage(expected))
    finally:
        env["module"]._remove_nodes([labelmap.GetDisplayNode().GetColorNode(), labelmap])

    files = sorted(out.glob("input_attention_*.nrrd"), key=lambda p: int(p.name.split("_")[-1].split(".")[0]))
    assert len(result.attentionVolumes) == len(files) >= 1
    for node, path in zip(result.attentionVolumes, files):
        image = sitk.ReadImage(str(path))
        np.testing.assert_allclose(_matrix(node), _sitk_ijk_to_ras(image), atol=1e-5)
        np.testing.assert_allclose(slicer.util.arrayFromVolume(node), sitk.GetArrayFromImage(image), atol=1e-6)
        assert node.GetImageData().GetDimensions() == image.GetSize()


def test_attention_volumes_display_provenance_and_hierarchy(env, first_result):
    result, scene = first_result["result"], env["scene"]
    sizes = [n.GetImageData().GetDimensions() for n in result.attentionVolumes]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)  # each gate at its own grid
    input_bounds = [0.0] * 6
    env["volume"].GetRASBounds(input_bounds)
    for index, node in enumerate(result.attentionVolumes):
        display = node.GetDisplayNode()
        assert display.GetColorNodeID() == "vtkMRMLColorTableNodeFileInferno.txt"
        assert not display.GetAutoWindowLevel()
        assert display.GetWindowLevelMin() == pytest.approx(0.0)
        assert display.GetWindowLevelMax() == pytest.approx(1.0)
        assert node.GetAttribute("AttentionUNet.Gate") == str(index)
        bounds = [0.0] * 6
        node.GetRASBounds(bounds)  # same physical box as the input, within one coarse voxel
        np.testing.assert_allclose(bounds, input_bounds, atol=max(node.GetSpacing()) * 1.01)

    bundle = env["bundle"]
    for node in [result.segmentation, *result.attentionVolumes]:
        assert node.GetAttribute("AttentionUNet.Model") == bundle.name
        assert node.GetAttribute("AttentionUNet.ModelVersion") == bundle.version
        assert node.GetAttribute("AttentionUNet.ModelSha256") == bundle.sha256
        assert node.GetAttribute("AttentionUNet.Device") == "cpu"
        assert json.loads(node.GetAttribute("AttentionUNet.Parameters"))["device"] == "cpu"
        assert node.GetAttribute("AttentionUNet.Date")

    sh = scene.GetSubjectHierarchyNode()
    study = env["study"]
    assert sh.GetItemParent(sh.GetItemByDataNode(result.segmentation)) == study
    folder = sh.GetItemParent(sh.GetItemByDataNode(result.attentionVolumes[0]))
    assert sh.GetItemParent(folder) == study and sh.GetItemName(folder) == "Oblique attention maps"
    assert result.segmentation.GetNumberOfNodeReferences("AttentionUNetAttention") == len(result.attentionVolumes)
    env["logic"].showResults(result)  # headless scene: no slice views, must not fail
    # no temporary node (label map, colour table) or orphaned display node is left behind
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeDisplayNode") == 0
    assert scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode") == 0


def test_export_for_report_files_read_back(env, first_result, tmp_path):
    logic, result = env["logic"], first_result["result"]
    for fmt in ("nii.gz", "nrrd"):
        files = logic.exportForReport(result.segmentation, tmp_path / fmt, fileFormat=fmt)
        assert sorted(p.name for p in (tmp_path / fmt).iterdir()) == sorted(
            [f"Oblique_segmentation_labels.{fmt}", "Oblique_segmentation_labels.csv",
             "Oblique_segmentation_volumes.csv", "Oblique_segmentation_provenance.json",
             "Oblique_segmentation.seg.nrrd"])
        image = sitk.ReadImage(files["labelmap"])
        np.testing.assert_allclose(_sitk_ijk_to_ras(image), _matrix(env["volume"]), atol=1e-4)
        labels = sitk.GetArrayFromImage(image)
        assert set(np.unique(labels)) <= {0, 1, 2}

        with open(files["label_table"], newline="") as stream:
            table = list(csv.DictReader(stream))
        assert [(int(r["value"]), r["name"]) for r in table] == [(1, "Anterior"), (2, "Posterior")]
        assert table[0]["color"] == "#e69933"

        voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
        with open(files["volumes"], newline="") as stream:
            for row in csv.DictReader(stream):
                count = int((labels == int(row["value"])).sum())
                assert int(row["voxels"]) == count
                assert float(row["volume_ml"]) == pytest.approx(count * voxel_ml, rel=1e-5)
        stats = {row["value"]: row["voxels"] for row in result.statistics}
        assert stats == {v: int((labels == v).sum()) for v in (1, 2)}

        provenance = json.loads(open(files["provenance"]).read())
        assert provenance["attributes"]["Model"] == env["bundle"].name
        assert provenance["attributes"]["ModelSha256"] == env["bundle"].sha256

        segmentation = slicerio.read_segmentation(files["segmentation"])
        names = {s["name"]: s for s in segmentation["segments"]}
        assert set(names) == {"Anterior", "Posterior"}
        assert names["Anterior"]["labelValue"] == 1 and names["Posterior"]["labelValue"] == 2
        assert names["Posterior"]["color"] == pytest.approx([0.2, 0.6, 0.9], abs=1e-3)

    with pytest.raises(env["module"].AttentionUNetSegmentError, match="exist already"):
        logic.exportForReport(result.segmentation, tmp_path / "nrrd", fileFormat="nrrd")
    logic.exportForReport(result.segmentation, tmp_path / "nrrd", fileFormat="nrrd", force=True)
    assert not list((tmp_path / "nrrd").glob("*partial*"))


def test_export_to_labelmap_node_keeps_stable_values(env, first_result):
    scene, result = env["scene"], first_result["result"]
    segments = result.segmentation.GetSegmentation()
    labelmap = env["logic"].exportToLabelMapNode(result.segmentation)
    try:
        assert labelmap.IsA("vtkMRMLLabelMapVolumeNode") and labelmap.GetScene() is scene
        values = set(np.unique(slicer.util.arrayFromVolume(labelmap))) - {0}
        assert values == {row["value"] for row in result.statistics if row["voxels"] > 0}
        assert {segments.GetNthSegment(i).GetLabelValue() for i in range(segments.GetNumberOfSegments())} == {1, 2}
        colors = labelmap.GetDisplayNode().GetColorNode()
        assert colors.GetColorName(2) == "Posterior"
        assert labelmap.GetAttribute("AttentionUNet.Model") == env["bundle"].name
    finally:
        env["module"]._remove_nodes([labelmap.GetDisplayNode().GetColorNode(), labelmap])


def test_cancel_leaves_the_scene_unchanged(env):
    scene = env["scene"]
    before = _node_ids(scene)
    job = env["logic"].process(env["volume"], model=env["model"], device="cpu", waitForCompletion=False)
    deadline = time.monotonic() + 120
    while job._engine.progress.stage == "starting" and time.monotonic() < deadline and job.poll():
        time.sleep(0.05)
    started = time.monotonic()
    job.cancel()
    assert time.monotonic() - started < 5
    assert job.done and job.cancelled and job.result is None and job.error is None
    assert _node_ids(scene) == before
    assert job._workDir is None  # temporary files removed


def test_cancelled_batch_reports_every_volume_and_adds_no_segmentation(env):
    scene = env["scene"]
    count = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    job = env["logic"].processBatch([env["volume"], env["volume"]], waitForCompletion=False, model=env["model"],
                                    device="cpu")
    job.cancel()
    assert job.done and job.cancelled
    statuses = [job.summaryTable.GetCellText(r, 1) for r in range(job.summaryTable.GetNumberOfRows())]
    assert statuses == ["cancelled", "not run"]
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == count
    assert "0 segmented" in job.summary


@pytest.mark.slow
def test_existing_outputs_overwritten_only_when_chosen(env, first_result):
    scene, logic, volume = env["scene"], env["logic"], env["volume"]
    first = first_result["result"]
    first_ids = [n.GetID() for n in first.attentionVolumes]
    first_date = first.segmentation.GetAttribute("AttentionUNet.Date")

    new = logic.process(volume, model=env["model"], device="cpu", attentionMaps=True)
    assert new.segmentation.GetID() != first.segmentation.GetID()
    assert new.segmentation.GetName() != first.segmentation.GetName()
    assert not {n.GetID() for n in new.attentionVolumes} & set(first_ids)
    assert first.segmentation.GetAttribute("AttentionUNet.Date") == first_date  # untouched

    count = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    again = logic.process(volume, new.segmentation, model=env["model"], device="cpu", overlap=0.25)
    assert again.segmentation is new.segmentation
    assert [n.GetID() for n in again.attentionVolumes] == [n.GetID() for n in new.attentionVolumes]
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == count
    assert json.loads(again.segmentation.GetAttribute("AttentionUNet.Parameters"))["overlap"] == 0.25
    assert again.segmentation.GetSegmentation().GetNumberOfSegments() == len(env["bundle"].labels)

    # Overwriting a run that made attention maps with one that makes none removes that run's maps too.
    without = logic.process(volume, new.segmentation, model=env["model"], device="cpu", attentionMaps=False)
    assert without.attentionVolumes == []
    assert all(scene.GetNodeByID(node_id) is None for node_id in (n.GetID() for n in new.attentionVolumes))
    assert new.segmentation.GetNumberOfNodeReferences(env["module"].ATTENTION_ROLE) == 0


def test_results_belong_to_their_input_only(env, first_result):
    """What the panel checks before keeping a previous result selected as the output for a new input."""
    logic, volume, scene = env["logic"], env["volume"], env["scene"]
    segmentation = first_result["result"].segmentation
    other = _add_volume(scene, "Other", _oblique_image(seed=1))
    unrelated = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Drawn by hand")
    try:
        assert logic.segmentationBelongsTo(segmentation, volume)
        assert not logic.segmentationBelongsTo(segmentation, other)
        assert not logic.segmentationBelongsTo(unrelated, volume)
    finally:
        env["module"]._remove_nodes([unrelated, other])


def test_failed_import_into_a_reused_segmentation_changes_nothing(env, first_result, tmp_path):
    """Results are read into new nodes first: when a file fails to load (here the last attention map), the
    segmentation and the attention volumes the user chose to overwrite keep every voxel, and no node is added."""
    module, logic, volume, scene = env["module"], env["logic"], env["volume"], env["scene"]
    first = first_result["result"]
    target, maps = first.segmentation, first.attentionVolumes
    input_path = logic.writeVolumeForEngine(volume, tmp_path / "in")
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "AttentionUNetSegmentLib", "segment", str(input_path), "--output-dir",
                    str(out), "--model", env["model"], "--device", "cpu", "--format", "nrrd", "--progress", "none",
                    "--overlap", "0.25"], check=True, capture_output=True, timeout=300)
    attention = sorted(out.glob("input_attention_*.nrrd"), key=lambda p: int(p.name.split("_")[-1].split(".")[0]))
    assert len(attention) == len(maps) >= 2
    attention[-1].write_bytes(b"NRRD0004\nthis is not a volume\n")
    files = {"segmentation": str(out / "input_seg.nrrd"), "report": str(out / "input_report.json"),
             "attention": [str(p) for p in attention]}

    def labels():
        labelmap = logic.exportToLabelMapNode(target, volume)
        voxels = slicer.util.arrayFromVolume(labelmap).copy()
        module._remove_nodes([labelmap.GetDisplayNode().GetColorNode(), labelmap])
        return voxels

    segments = target.GetSegmentation()
    ids = [segments.GetNthSegmentID(i) for i in range(segments.GetNumberOfSegments())]
    voxels = labels()
    assert voxels.any()
    map_voxels = [slicer.util.arrayFromVolume(node).copy() for node in maps]
    before = _node_ids(scene)

    job = module.SegmentationJob(logic, volume, target, module.SegmentationOptions(model=env["model"], device="cpu"),
                                 env["bundle"])
    with pytest.raises(module.AttentionUNetSegmentError, match="input_attention_"):
        logic.importResults(job, files, [])
    assert _node_ids(scene) == before
    assert [segments.GetNthSegmentID(i) for i in range(segments.GetNumberOfSegments())] == ids
    np.testing.assert_array_equal(labels(), voxels)
    for node, expected in zip(maps, map_voxels):
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), expected)


@pytest.mark.slow
def test_probability_maps_on_the_input_grid(env):
    result = env["logic"].process(env["volume"], model=env["model"], device="cpu", attentionMaps=False,
                                  probabilityMaps=True)
    assert result.attentionVolumes == []
    assert [n.GetName() for n in result.probabilityVolumes] == [
        f"Oblique probability {label.name}" for label in env["bundle"].labels]
    for node in result.probabilityVolumes:
        np.testing.assert_allclose(_matrix(node), _matrix(env["volume"]), atol=1e-5)
        values = slicer.util.arrayFromVolume(node)
        assert values.min() >= 0.0 and values.max() <= 1.0
        assert node.GetAttribute("AttentionUNet.Role") == "probability"


@pytest.mark.slow
def test_volume_under_a_linear_transform_keeps_its_transform(env, first_result):
    scene, logic = env["scene"], env["logic"]
    moved = _add_volume(scene, "Moved", slicer.util.arrayFromVolume(env["volume"]).copy(),
                        directions=_rotation((1, 2, 3), 25))
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "Shift")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 30.0)
    transform.SetMatrixTransformToParent(matrix)
    moved.SetAndObserveTransformNodeID(transform.GetID())
    result = logic.process(moved, model=env["model"], device="cpu")
    for node in [result.segmentation, *result.attentionVolumes]:
        assert node.GetTransformNodeID() == transform.GetID()
    same = logic.exportToLabelMapNode(result.segmentation, moved)
    reference = logic.exportToLabelMapNode(first_result["result"].segmentation, env["volume"])
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(same), slicer.util.arrayFromVolume(reference))


TERMINOLOGY = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
               "~SCT^5976002^Hippocampus~^^~Anatomic codes - DICOM master list~^^~^^")


@pytest.mark.slow
def test_bundle_terminology_reaches_the_segments(env, tmp_path):
    bundle_dir = tmp_path / "with-terminology"
    shutil.copytree(env["model"], bundle_dir)
    metadata = json.loads((bundle_dir / "model.json").read_text())
    metadata["labels"][0]["terminology"] = TERMINOLOGY
    metadata[DIGEST_KEY] = metadata_digest(metadata)  # as the author's re-export would
    (bundle_dir / "model.json").write_text(json.dumps(metadata))
    result = env["logic"].process(env["volume"], model=str(bundle_dir), device="cpu", attentionMaps=False)
    segments = result.segmentation.GetSegmentation()
    assert segments.GetNthSegment(0).GetTerminology() == TERMINOLOGY  # read through Slicer's own accessor
    assert segments.GetNthSegment(1).GetTerminology() != TERMINOLOGY  # Slicer's default stays where none is given


@pytest.mark.slow
def test_roi_restricts_the_segmentation(env):
    scene, volume = env["scene"], env["volume"]
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Box")
    bounds = [0.0] * 6
    volume.GetRASBounds(bounds)
    center = [(bounds[2 * a] + bounds[2 * a + 1]) / 2 for a in range(3)]
    roi.SetXYZ(*center)
    roi.SetRadiusXYZ(8, 8, 10)
    result = env["logic"].process(volume, model=env["model"], device="cpu", roi=roi, attentionMaps=False)
    assert result.attentionVolumes == []
    labelmap = env["logic"].exportToLabelMapNode(result.segmentation, volume)
    labels = slicer.util.arrayFromVolume(labelmap)
    kji = np.argwhere(labels > 0)
    assert len(kji) < labels.size  # the crop left most of the volume unlabelled
    # The engine crops the input's voxel grid to the index box holding the ROI's corners (an oblique grid's box
    # is larger than the RAS box): every labelled voxel lies in that index box.
    roi_bounds = [0.0] * 6
    roi.GetRASBounds(roi_bounds)
    corners = np.array([[r, a, s, 1.0] for r in roi_bounds[0:2] for a in roi_bounds[2:4] for s in roi_bounds[4:6]])
    corner_ijk = (np.linalg.inv(_matrix(volume)) @ corners.T).T[:, :3]
    ijk = kji[:, ::-1]
    assert (ijk >= np.floor(corner_ijk.min(axis=0)) - 1).all()
    assert (ijk <= np.ceil(corner_ijk.max(axis=0)) + 1).all()
    roi.SetXYZ(center[0] + 1000, center[1], center[2])
    with pytest.raises(env["module"].AttentionUNetSegmentError, match="does not overlap"):
        env["logic"].process(volume, model=env["model"], device="cpu", roi=roi)


@pytest.mark.slow
def test_compute_device_is_asked_of_the_engine_process(env):
    import torch

    text = env["logic"].detectComputeDevice()
    assert text.startswith("GPU found" if torch.cuda.is_available() else "No CUDA GPU found"), text
    env["logic"].enginePython = "/nonexistent/python"
    try:
        assert env["logic"].detectComputeDevice().startswith("Could not ask the engine")
    finally:
        env["logic"].enginePython = sys.executable


def test_the_modules_own_output_maps_are_not_offered_as_inputs(env, first_result):
    logic, volume, result = env["logic"], env["volume"], first_result["result"]
    assert result.attentionVolumes  # the run made scalar volumes of its own
    inputs = logic.allInputVolumes()
    assert volume in inputs
    assert not {node.GetID() for node in result.attentionVolumes + result.probabilityVolumes} & {n.GetID() for n in inputs}
    # An attention map shown as the active volume in the views is not the default input either.
    scene = env["scene"]
    selection = scene.GetFirstNodeByClass("vtkMRMLSelectionNode")
    added = selection is None  # Slicer's application creates it; bare slicer-core does not
    if added:
        selection = scene.AddNewNodeByClass("vtkMRMLSelectionNode")
    previous = selection.GetActiveVolumeID()
    try:
        selection.SetActiveVolumeID(result.attentionVolumes[0].GetID())
        current = logic.currentVolume()
        assert current is not None and current.GetID() != result.attentionVolumes[0].GetID()
    finally:
        selection.SetActiveVolumeID(previous)
        if added:
            scene.RemoveNode(selection)


def test_batch_runs_each_volume_and_fills_a_summary_table(env):
    scene = env["scene"]
    second = _add_volume(scene, "Second", _oblique_image(seed=3), spacing=(1.0, 1.0, 1.5))
    flat = _add_volume(scene, "Flat", np.zeros((1, 20, 20), np.float32))
    module, updates = env["module"], []
    options = module.SegmentationOptions(model=env["model"], device="cpu", attentionMaps=False)
    job = module.BatchJob(env["logic"], [second, flat], options, progressCallback=lambda *update: updates.append(update))
    job._eta = EtaEstimator(clock=itertools.count(0.0, 10.0).__next__)  # 10 s between updates: an ETA at once
    table = job.start().wait().summaryTable
    fractions = [fraction for fraction, _, _ in updates]
    assert fractions == sorted(fractions) and 0.0 <= fractions[0] and fractions[-1] <= 0.5  # volume 1 of 2
    assert all(message.startswith("[1/2] ") for _, message, _ in updates)
    assert any(eta is not None and eta > 0 for _, _, eta in updates)  # the batch's remaining time is shown
    assert table.IsA("vtkMRMLTableNode")
    rows = [[table.GetCellText(r, c) for c in range(table.GetNumberOfColumns())]
            for r in range(table.GetNumberOfRows())]
    columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert columns[:6] == ["Volume", "Status", "Segment", "Label value", "Voxels", "Volume [mL]"]
    done = [row for row in rows if row[0] == "Second"]
    assert [row[1] for row in done] == ["done", "done"] and [row[2] for row in done] == ["Anterior", "Posterior"]
    skipped = [row for row in rows if row[0] == "Flat"]
    assert len(skipped) == 1 and skipped[0][1] == "skipped" and "2D" in skipped[0][-1]
    assert scene.GetFirstNodeByName("Second segmentation") is not None


# Bad input: a clear message and nothing added to the scene


def _expect_rejected(env, match, volume, **kwargs):
    scene = env["scene"]
    before = _node_ids(scene)
    with pytest.raises(env["module"].AttentionUNetSegmentError, match=match):
        env["logic"].process(volume, **{"model": env["model"], "device": "cpu", **kwargs})
    assert _node_ids(scene) == before


def test_no_input_is_rejected(env):
    _expect_rejected(env, "No input volume", None)


def test_2d_volume_is_rejected(env):
    volume = _add_volume(env["scene"], "Slice", np.ones((1, 16, 16), np.float32))
    _expect_rejected(env, "is 2D", volume)


def test_rgb_and_4d_volumes_are_rejected(env):
    scene = env["scene"]
    rgb = _add_volume(scene, "Photo", np.zeros((4, 16, 16, 3), np.uint8), class_name="vtkMRMLVectorVolumeNode")
    _expect_rejected(env, "3 components per voxel", rgb)
    series = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Series")  # 4D: 5 time points per voxel
    image = vtk.vtkImageData()
    image.SetDimensions(16, 16, 4)
    image.AllocateScalars(vtk.VTK_FLOAT, 5)
    series.SetAndObserveImageData(image)
    _expect_rejected(env, "5 components per voxel", series)
    labels = _add_volume(scene, "Labels", np.zeros((4, 16, 16), np.uint8), class_name="vtkMRMLLabelMapVolumeNode")
    _expect_rejected(env, "not an intensity image", labels)


def test_volume_under_nonlinear_transform_is_rejected(env):
    scene = env["scene"]
    volume = _add_volume(scene, "Warped", _oblique_image())
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "Warp")
    volume.SetAndObserveTransformNodeID(grid.GetID())
    _expect_rejected(env, "non-linear transform 'Warp'.*Harden", volume)


def test_corrupt_model_weights_are_rejected_by_the_engine(env, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(env["model"], corrupt)
    weights = corrupt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    _expect_rejected(env, "sha256", env["volume"], model=str(corrupt))


def test_corrupt_model_metadata_is_rejected_before_running(env, tmp_path):
    corrupt = tmp_path / "broken"
    shutil.copytree(env["model"], corrupt)
    (corrupt / "model.json").write_text("{not json")
    _expect_rejected(env, "model.json|JSON", env["volume"], model=str(corrupt))
    _expect_rejected(env, "no installed model named 'nonexistent'", env["volume"], model="nonexistent")


@pytest.mark.slow
def test_in_slicer_self_test_passes_headless(env):
    """``AttentionUNetSegmentTest`` (what Slicer's ctest runs) on the bundled sample with the bundled model."""
    module = env["module"]
    if not module.AttentionUNetSegmentLogic().availableModels()[0]:
        pytest.skip("the bundled default model is not installed yet")
    scene = slicer.mrmlScene
    slicer.mrmlScene = slicer.vtkMRMLScene()
    try:
        outcome = unittest.TextTestRunner(stream=io.StringIO()).run(
            unittest.defaultTestLoader.loadTestsFromTestCase(module.AttentionUNetSegmentTest))
        assert outcome.wasSuccessful(), [str(e[1]) for e in outcome.errors + outcome.failures]
        assert outcome.testsRun == 2
    finally:
        slicer.mrmlScene = scene


@pytest.mark.slow
def test_label_values_above_255_survive_the_engine_the_scene_and_the_export(env, tmp_path):
    """Labels 3 and 300 (an int16 label map from the engine) keep their values in the segments, the exported
    label map and the CSV volumes; a segment whose value a label map cannot hold is exported under a free value."""
    import torch

    from AttentionUNetSegmentLib.bundle import create_metadata, save_bundle
    from AttentionUNetSegmentLib.network import AttentionUNet

    torch.manual_seed(0)
    model = AttentionUNet(in_channels=1, out_channels=3, channels=(4, 8, 16))
    with torch.no_grad():
        model.head.bias[:] = torch.tensor([0.0, 5.0, 4.9])  # random weights, biased to predict both labels
    metadata = create_metadata(
        name="wide", labels=[{"value": 3, "name": "A", "color": [1, 0, 0]}, {"value": 300, "name": "B",
                                                                            "color": [0, 1, 0]}],
        patch_size=(32, 32, 32), preprocessing={"orientation": "RAS", "target_spacing": [1.0, 1.0, 1.0],
                                                "normalization": {"scheme": "zscore"}})
    bundle = save_bundle(model, metadata, tmp_path / "wide")
    logic, scene = env["logic"], env["scene"]
    result = logic.process(env["volume"], model=str(bundle.path), device="cpu", attentionMaps=False)
    counts = {row["value"]: row["voxels"] for row in result.statistics}
    assert set(counts) == {3, 300} and counts[3] > 0 and counts[300] > 0
    segments = result.segmentation.GetSegmentation()
    assert [segments.GetNthSegment(i).GetLabelValue() for i in range(2)] == [3, 300]

    files = logic.exportForReport(result.segmentation, tmp_path / "export")
    labels = sitk.GetArrayFromImage(sitk.ReadImage(files["labelmap"]))
    assert {int(v): int((labels == v).sum()) for v in np.unique(labels) if v} == counts
    with open(files["volumes"], newline="") as stream:
        assert {int(r["value"]): int(r["voxels"]) for r in csv.DictReader(stream)} == counts

    env["module"]._remove_nodes([result.segmentation])

    # A segmentation imported from a uint16 label map can hold a value Slicer's int16 export would clip to 32767.
    wide = np.zeros(slicer.util.arrayFromVolume(env["volume"]).shape, np.uint16)
    wide[2:4, 3:6, 4:8] = 40000  # 24 voxels
    source = _add_volume(scene, "Wide labels", wide, class_name="vtkMRMLLabelMapVolumeNode")
    imported = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Wide")
    imported.SetReferenceImageGeometryParameterFromVolumeNode(source)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(source, imported)
    assert imported.GetSegmentation().GetNthSegment(0).GetLabelValue() == 40000
    labelmap = logic.exportToLabelMapNode(imported, source)
    try:
        exported = slicer.util.arrayFromVolume(labelmap)
        assert int((exported == 1).sum()) == 24 and set(np.unique(exported)) == {0, 1}  # a free value, not clipped
        assert labelmap.GetDisplayNode().GetColorNode().GetColorName(1) == "Wide labels"
    finally:
        env["module"]._remove_nodes([labelmap.GetDisplayNode().GetColorNode(), labelmap, imported, source])


def test_sample_data_registration_points_at_the_bundled_sample(env, monkeypatch):
    """``registerSampleData`` against a stand-in ``SampleData`` module whose ``registerCustomSampleDataSource`` has
    Slicer's keyword signature (``Modules/Scripted/SampleData/SampleData.py``): the file URI exists, the checksum is
    the file's SHA256 in Slicer's ``<algo>:<digest>`` form, the thumbnail exists."""
    import hashlib
    import types
    from pathlib import Path
    from urllib.parse import unquote, urlparse

    calls = []

    def registerCustomSampleDataSource(category="Custom", sampleName=None, uris=None, fileNames=None,
                                       nodeNames=None, customDownloader=None, thumbnailFileName=None,
                                       loadFileType="VolumeFile", loadFiles=None, loadFileProperties={},
                                       checksums=None):
        calls.append(dict(category=category, sampleName=sampleName, uris=uris, fileNames=fileNames,
                          nodeNames=nodeNames, thumbnailFileName=thumbnailFileName, checksums=checksums))

    stub = types.ModuleType("SampleData")
    stub.SampleDataLogic = type("SampleDataLogic", (), {
        "registerCustomSampleDataSource": staticmethod(registerCustomSampleDataSource)})
    monkeypatch.setitem(sys.modules, "SampleData", stub)
    env["module"].registerSampleData()

    assert len(calls) == 1
    call = calls[0]
    sample = Path(unquote(urlparse(call["uris"]).path))
    assert sample.is_file() and sample.name == call["fileNames"]
    assert sample.parent == env["module"].SAMPLE_DATA_DIR
    algorithm, digest = call["checksums"].split(":")
    assert algorithm == "SHA256" and digest == hashlib.sha256(sample.read_bytes()).hexdigest()
    assert Path(call["thumbnailFileName"]).is_file()
    assert call["category"] == "AttentionUNet" and call["nodeNames"]


# Dependencies: Slicer's installers are absent from slicer-core, so they are stood in for by recorders; the
# requirement checks run on the real installed distributions.


@pytest.fixture
def missing_requirement(env, tmp_path, monkeypatch):
    """A requirements file with one package that is not installed and one that is."""
    path = tmp_path / "requirements.txt"
    path.write_text("# test\nattention-unet-no-such-package>=1.0\nnumpy>=1.0\n", encoding="utf-8")
    monkeypatch.setattr(env["module"], "REQUIREMENTS_FILE", path)
    return path


def _fake_packaging(monkeypatch, pip_ensure):
    import types

    from packaging.requirements import Requirement

    fake = types.ModuleType("slicer.packaging")
    fake.loaded = []

    def load_requirements(path):
        lines = [line.split("#")[0].strip() for line in open(path, encoding="utf-8")]
        fake.loaded.append([Requirement(line) for line in lines if line])
        return fake.loaded[-1]

    fake.load_requirements = load_requirements
    fake.pip_ensure = pip_ensure
    monkeypatch.setitem(sys.modules, "slicer.packaging", fake)
    monkeypatch.setattr(slicer, "packaging", fake, raising=False)
    return fake


def test_dependencies_go_through_pip_ensure_as_requirement_objects(env, missing_requirement, monkeypatch):
    calls = []
    fake = _fake_packaging(monkeypatch, lambda requirements, **kwargs: calls.append((requirements, kwargs)))
    env["logic"].ensureDependencies()
    assert len(calls) == 1 and calls[0][0] is fake.loaded[0] and calls[0][1] == {"requester": "AttentionUNet"}

    def declined(requirements, **kwargs):
        raise RuntimeError("the user declined")

    fake.pip_ensure = declined
    with pytest.raises(env["module"].AttentionUNetSegmentError, match="accept the installation"):
        env["logic"].ensureDependencies()


def test_dependencies_on_slicer_before_5_11_are_confirmed_then_pip_installed(env, missing_requirement, monkeypatch):
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)  # no slicer.packaging: Slicer 5.8/5.10
    monkeypatch.delattr(slicer, "packaging", raising=False)
    installed, answers = [], [True]
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kwargs: answers[0], raising=False)
    monkeypatch.setattr(slicer.util, "pip_install", installed.append, raising=False)
    env["logic"].ensureDependencies()
    assert installed == [["attention-unet-no-such-package>=1.0"]]  # only what is missing (numpy is installed)
    answers[0] = False
    with pytest.raises(env["module"].AttentionUNetSegmentError, match="accept the installation"):
        env["logic"].ensureDependencies()


def test_an_installed_torch_older_than_required_is_refused(env, monkeypatch):
    monkeypatch.setattr(env["module"], "TORCH_REQUIREMENT", ">=99")
    with pytest.raises(env["module"].AttentionUNetSegmentError, match="too old.*PyTorch Utils"):
        env["logic"].ensureDependencies()


def test_requirement_checks_read_version_pins(env):
    satisfied = env["module"]._requirement_satisfied
    assert satisfied("numpy>=1.0") and not satisfied("numpy>=999") and not satisfied("attention-unet-no-such-package")
