"""The Slicer module's Logic on real MRML (``slicer-core``) with the real engine in a child process.

Only what ``slicer-core`` lacks (Qt, the ScriptedLoadableModule bases, parameterNodeWrapper, slicer.i18n, a Qt-free
tempDirectory) is shimmed (``slicer_module_shims.py``); scene, nodes, storage and segmentation logic are Slicer's
own.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import pathlib
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

from AttentionUNetSegmentLib.model.bundle import DIGEST_KEY, LabelInfo, metadata_digest  # noqa: E402
from AttentionUNetSegmentLib.inference.outputs import slicer_segmentation  # noqa: E402
from AttentionUNetSlicer.engineProcess import EtaEstimator  # noqa: E402
from slicer_module_shims import install_missing_modules, load_module  # noqa: E402

install_missing_modules()  # before the Slicer package's modules import slicer.parameterNodeWrapper
from AttentionUNetSlicer import definitions, dependencies, jobs, sceneNodes, widget  # noqa: E402

Options = jobs.SegmentationOptions

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
    result = env["logic"].process(env["volume"], options=Options(model=env["model"], device="cpu"),
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
        sceneNodes.removeNodes([labelmap.GetDisplayNode().GetColorNode(), labelmap])

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

    with pytest.raises(definitions.AttentionUNetSegmentError, match="exist already"):
        logic.exportForReport(result.segmentation, tmp_path / "nrrd", fileFormat="nrrd")
    logic.exportForReport(result.segmentation, tmp_path / "nrrd", fileFormat="nrrd", force=True)
    assert not list((tmp_path / "nrrd").glob("*partial*"))


def test_a_failed_export_writes_nothing(env, first_result, tmp_path):
    """Every export file goes through the engine's one atomic writer (``fileio.atomic.atomic_output``): when one cannot
    be put in place (here a folder holds the provenance file's name), none is, and no temporary is left."""
    blocked = tmp_path / "Oblique_segmentation_provenance.json"
    blocked.mkdir()
    with pytest.raises(definitions.AttentionUNetSegmentError, match="Could not write the export"):
        env["logic"].exportForReport(first_result["result"].segmentation, tmp_path, force=True)
    assert [p.name for p in tmp_path.iterdir()] == [blocked.name] and not list(blocked.iterdir())


def test_report_pdf_export_is_the_engines_report_of_the_segments(env, first_result, tmp_path):
    """Export > Report (PDF): the engine's page (report.write_report_pdf) over the input, with the run's volumes,
    model and device; no node is left behind; an existing report is kept unless replacing is chosen."""
    pytest.importorskip("matplotlib")
    from test_inference_report import page_count, pdf_text

    logic, result, scene = env["logic"], first_result["result"], env["scene"]
    before = _node_ids(scene)
    path = pathlib.Path(logic.exportReportPdf(result.segmentation, tmp_path))
    assert path == tmp_path / "Oblique_segmentation_report.pdf" and page_count(path) == 1
    assert _node_ids(scene) == before
    text = pdf_text(path)
    for row in result.statistics:
        assert row["name"] in text and f"{row['volume_ml']:.3f}" in text
    assert f"{env['bundle'].name} {env['bundle'].version}" in text and "Oblique" in text and "Apache-2.0" in text
    assert f"Device: {result.device}" in text
    with pytest.raises(definitions.AttentionUNetSegmentError, match="exists already"):
        logic.exportReportPdf(result.segmentation, tmp_path)
    modified = path.stat().st_mtime_ns
    logic.exportReportPdf(result.segmentation, tmp_path, force=True)
    assert path.stat().st_mtime_ns != modified and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


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
        sceneNodes.removeNodes([labelmap.GetDisplayNode().GetColorNode(), labelmap])


def test_cancel_leaves_the_scene_unchanged(env):
    scene = env["scene"]
    before = _node_ids(scene)
    job = env["logic"].process(env["volume"],
                               options=Options(model=env["model"], device="cpu"), waitForCompletion=False)
    deadline = time.monotonic() + 120
    while job._engine.progress.stage == "starting" and time.monotonic() < deadline and job.poll():
        time.sleep(0.05)
    started = time.monotonic()
    job.cancel()  # returns at once; the polls (the panel's timer) follow the engine to its end
    job.wait()
    assert time.monotonic() - started < 5
    assert job.done and job.cancelled and job.result is None and job.error is None
    assert _node_ids(scene) == before
    assert job._workDir is None  # temporary files removed


def test_cancelled_batch_reports_every_volume_and_adds_no_segmentation(env):
    scene = env["scene"]
    count = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    job = env["logic"].processBatch([env["volume"], env["volume"]],
                                    options=Options(model=env["model"], device="cpu"), waitForCompletion=False)
    job.cancel()
    assert job.wait().done and job.cancelled
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

    new = logic.process(volume, options=Options(model=env["model"], device="cpu", attentionMaps=True))
    assert new.segmentation.GetID() != first.segmentation.GetID()
    assert new.segmentation.GetName() != first.segmentation.GetName()
    assert not {n.GetID() for n in new.attentionVolumes} & set(first_ids)
    assert first.segmentation.GetAttribute("AttentionUNet.Date") == first_date  # untouched

    count = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    again = logic.process(volume, new.segmentation, options=Options(model=env["model"], device="cpu", overlap=0.25))
    assert again.segmentation is new.segmentation
    assert [n.GetID() for n in again.attentionVolumes] == [n.GetID() for n in new.attentionVolumes]
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == count
    assert json.loads(again.segmentation.GetAttribute("AttentionUNet.Parameters"))["overlap"] == 0.25
    assert again.segmentation.GetSegmentation().GetNumberOfSegments() == len(env["bundle"].labels)

    # Overwriting a run that made attention maps with one that makes none removes that run's maps too.
    without = logic.process(volume, new.segmentation,
                            options=Options(model=env["model"], device="cpu", attentionMaps=False))
    assert without.attentionVolumes == []
    assert all(scene.GetNodeByID(node_id) is None for node_id in (n.GetID() for n in new.attentionVolumes))
    assert new.segmentation.GetNumberOfNodeReferences(definitions.ATTENTION_ROLE) == 0


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
        sceneNodes.removeNodes([unrelated, other])


def test_failed_import_into_a_reused_segmentation_changes_nothing(env, first_result, tmp_path):
    """Results are read into new nodes first: when a file fails to load (here the last attention map), the
    segmentation and the attention volumes the user chose to overwrite keep every voxel, and no node is added."""
    logic, volume, scene = env["logic"], env["volume"], env["scene"]
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
    files = {"segmentation": str(out / "input_seg.nrrd"), "slicer_segmentation": str(out / "input_seg.seg.nrrd"),
             "report": str(out / "input_report.json"), "attention": [str(p) for p in attention]}

    def labels():
        labelmap = logic.exportToLabelMapNode(target, volume)
        voxels = slicer.util.arrayFromVolume(labelmap).copy()
        sceneNodes.removeNodes([labelmap.GetDisplayNode().GetColorNode(), labelmap])
        return voxels

    segments = target.GetSegmentation()
    ids = [segments.GetNthSegmentID(i) for i in range(segments.GetNumberOfSegments())]
    voxels = labels()
    assert voxels.any()
    map_voxels = [slicer.util.arrayFromVolume(node).copy() for node in maps]
    before = _node_ids(scene)

    job = jobs.SegmentationJob(logic, volume, target, Options(model=env["model"], device="cpu"),
                                 env["bundle"])
    with pytest.raises(definitions.AttentionUNetSegmentError, match="input_attention_"):
        logic.importResults(job, files, [])
    assert _node_ids(scene) == before
    assert [segments.GetNthSegmentID(i) for i in range(segments.GetNumberOfSegments())] == ids
    np.testing.assert_array_equal(labels(), voxels)
    for node, expected in zip(maps, map_voxels):
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), expected)


@pytest.mark.slow
def test_probability_maps_on_the_input_grid(env):
    result = env["logic"].process(env["volume"],
                                  options=Options(model=env["model"], device="cpu", attentionMaps=False,
                                                  probabilityMaps=True))
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
    result = logic.process(moved, options=Options(model=env["model"], device="cpu"))
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
    result = env["logic"].process(env["volume"],
                                  options=Options(model=str(bundle_dir), device="cpu", attentionMaps=False))
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
    result = env["logic"].process(volume,
                                  options=Options(model=env["model"], device="cpu", roi=roi, attentionMaps=False))
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
    with pytest.raises(definitions.AttentionUNetSegmentError, match="does not overlap"):
        env["logic"].process(volume, options=Options(model=env["model"], device="cpu", roi=roi))


@pytest.mark.slow
def test_compute_device_is_asked_of_the_engine_process(env):
    import torch

    text = env["logic"].startDeviceQuery().wait().text
    assert text.startswith("GPU found" if torch.cuda.is_available() else "No CUDA GPU found"), text
    env["logic"].enginePython = "/nonexistent/python"
    try:
        assert env["logic"].startDeviceQuery().wait().text.startswith("Could not ask the engine")
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
    updates = []
    options = Options(model=env["model"], device="cpu", attentionMaps=False)
    job = jobs.BatchJob(env["logic"], [second, flat], options, progressCallback=lambda *update: updates.append(update))
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
    # The engine's summary.csv columns, one row per volume.
    assert columns == ["input", "status", "error", "model", "model_version", "Anterior (mL)", "Posterior (mL)",
                       "warnings"]
    done, skipped = (dict(zip(columns, row)) for row in rows)
    result = job.results[0]
    assert (done["input"], done["status"], done["error"]) == ("Second", "done", "")
    assert (done["model"], done["model_version"]) == (result.provenance["Model"], result.provenance["ModelVersion"])
    assert [done[f"{row['name']} (mL)"] for row in result.statistics] == [
        f"{row['volume_ml']:.3f}" for row in result.statistics]
    assert skipped["input"] == "Flat" and skipped["status"] == "skipped" and "2D" in skipped["error"]
    assert skipped["model"] == done["model"] and skipped["Anterior (mL)"] == ""
    assert scene.GetFirstNodeByName("Second segmentation") is not None


# Bad input: a clear message and nothing added to the scene


def _expect_rejected(env, match, volume, **kwargs):
    scene = env["scene"]
    before = _node_ids(scene)
    with pytest.raises(definitions.AttentionUNetSegmentError, match=match):
        env["logic"].process(volume, options=Options(**{"model": env["model"], "device": "cpu", **kwargs}))
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

    from AttentionUNetSegmentLib.model.bundle import create_metadata, save_bundle
    from AttentionUNetSegmentLib.model.network import AttentionUNet

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
    result = logic.process(env["volume"], options=Options(model=str(bundle.path), device="cpu", attentionMaps=False))
    counts = {row["value"]: row["voxels"] for row in result.statistics}
    assert set(counts) == {3, 300} and counts[3] > 0 and counts[300] > 0
    segments = result.segmentation.GetSegmentation()
    assert [segments.GetNthSegment(i).GetLabelValue() for i in range(2)] == [3, 300]

    files = logic.exportForReport(result.segmentation, tmp_path / "export")
    labels = sitk.GetArrayFromImage(sitk.ReadImage(files["labelmap"]))
    assert {int(v): int((labels == v).sum()) for v in np.unique(labels) if v} == counts
    with open(files["volumes"], newline="") as stream:
        assert {int(r["value"]): int(r["voxels"]) for r in csv.DictReader(stream)} == counts

    sceneNodes.removeNodes([result.segmentation])

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
        sceneNodes.removeNodes([labelmap.GetDisplayNode().GetColorNode(), labelmap, imported, source])


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
    monkeypatch.setattr(dependencies, "REQUIREMENTS_FILE", path)
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
    """Slicer 5.12+: the module asks (as on older releases), then ``pip_ensure`` installs without asking again."""
    calls, answers = [], [True]
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kwargs: answers[0], raising=False)
    fake = _fake_packaging(monkeypatch, lambda requirements, **kwargs: calls.append((requirements, kwargs)))
    env["logic"].ensureDependencies()
    assert len(calls) == 1 and calls[0][0] is fake.loaded[0]
    assert calls[0][1] == {"prompt_install": False, "requester": "AttentionUNet"}
    answers[0] = False
    with pytest.raises(definitions.AttentionUNetSegmentError, match="accept the installation"):
        env["logic"].ensureDependencies()
    assert len(calls) == 1  # declined: nothing installed

    def failing(requirements, **kwargs):
        raise RuntimeError("pip exited with status 1")

    answers[0], fake.pip_ensure = True, failing
    with pytest.raises(definitions.AttentionUNetSegmentError, match="Installing .* failed .*pip exited"):
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
    with pytest.raises(definitions.AttentionUNetSegmentError, match="accept the installation"):
        env["logic"].ensureDependencies()


def test_an_installed_torch_older_than_required_is_refused(env, monkeypatch):
    monkeypatch.setattr(dependencies, "TORCH_REQUIREMENT", ">=99")
    with pytest.raises(definitions.AttentionUNetSegmentError, match="too old.*PyTorch Utils"):
        env["logic"].ensureDependencies()


def test_requirement_checks_read_version_pins(env):
    satisfied = dependencies._requirementSatisfied
    assert satisfied("numpy>=1.0") and not satisfied("numpy>=999") and not satisfied("attention-unet-no-such-package")


# Issue 11: the domain guard before Apply, "Locate automatically", localisation boxes, per-side statistics.
# The engine's localiser is on another branch: the located runs below are imported from engine outputs written here
# by hand with exactly the report keys of the contract (ISSUE11 contract: ``segments[].side``, ``sides``,
# ``asymmetry_index``, ``warnings``, ``localization.boxes``), through the Logic's real import on real MRML.

LOCATED_LABELS = [
    {"value": 1, "name": "Left anterior hippocampus", "color": [0.9, 0.6, 0.2], "side": "left"},
    {"value": 2, "name": "Left posterior hippocampus", "color": [0.2, 0.6, 0.9], "side": "left"},
    {"value": 3, "name": "Right anterior hippocampus", "color": [0.9, 0.3, 0.3], "side": "right"},
    {"value": 4, "name": "Right posterior hippocampus", "color": [0.3, 0.9, 0.3], "side": "right"},
]
LEFT_TERMINOLOGY = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical "
                    "Structure~SCT^5976002^Hippocampus~SCT^7771000^Left~Anatomic codes - DICOM master list~^^~^^")
DOMAIN = {"field_of_view_mm": {"median": [20.0, 80.0, 20.0], "min": [18.0, 70.0, 18.0], "max": [22.0, 90.0, 22.0]},
          "spacing_mm": {"median": [1.0, 1.0, 1.0], "min": [1.0, 1.0, 1.0], "max": [1.0, 1.0, 1.0]},
          "modality": "MR T1", "thresholds": {"field_of_view_ratio": 2.0, "spacing_ratio": 2.0}}


@pytest.fixture(scope="module")
def located_bundle(env, tmp_path_factory):
    """The tiny bundle with a ``localization`` section (per-side labels) and a ``domain`` section."""
    path = tmp_path_factory.mktemp("located") / "tiny"
    shutil.copytree(env["model"], path)
    metadata = json.loads((path / "model.json").read_text())
    labels = [dict(label) for label in LOCATED_LABELS]
    labels[0]["terminology"] = LEFT_TERMINOLOGY
    metadata["localization"] = {"method": "template-affine", "template": "template.nii.gz",
                                "sides": {"left": {"box_ras": [-40, -10, -40, 10, -30, 0]},
                                          "right": {"box_ras": [10, 40, -40, 10, -30, 0]}},
                                "labels": labels}
    metadata["domain"] = DOMAIN
    metadata[DIGEST_KEY] = metadata_digest(metadata)
    (path / "model.json").write_text(json.dumps(metadata))
    return env["logic"].resolveModel(str(path))


@pytest.fixture
def moved_volume(env):
    """A volume under a linear transform (30 mm along R) inside the study: its outputs must follow it."""
    scene = env["scene"]
    volume = _add_volume(scene, "Head", _oblique_image(seed=5), directions=_rotation((1, 2, 3), 25))
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "Head shift")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 30.0)
    transform.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    sh = scene.GetSubjectHierarchyNode()
    sh.CreateItem(env["study"], volume)
    yield volume
    sceneNodes.removeNodes([volume, transform])


def _local_box(volume, fraction_lo, fraction_hi):
    bounds = [0.0] * 6
    volume.GetBounds(bounds)  # the volume's own (untransformed) RAS bounds
    return [bounds[2 * a] + (bounds[2 * a + 1] - bounds[2 * a]) * f for a in range(3)
            for f in (fraction_lo, fraction_hi)]


def _write_engine_outputs(env, volume, folder, located=True, warnings=()):
    """What the engine writes for the input (label map on its grid + report), per the issue-11 contract."""
    scene = env["scene"]
    shape = slicer.util.arrayFromVolume(volume).shape
    labels = np.zeros(shape, np.uint8)
    labels[2:6, 3:9, 4:10] = 1
    labels[2:6, 9:14, 4:10] = 2
    if located:
        labels[7:12, 3:9, 16:24] = 3
        labels[7:12, 9:16, 16:24] = 4
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "engine output")
    slicer.util.updateVolumeFromArray(node, labels)
    node.CopyOrientation(volume)
    folder.mkdir(parents=True, exist_ok=True)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(folder / "input_seg.nrrd"))
    assert storage.WriteData(node)
    sceneNodes.removeNodes([node])
    voxel_ml = float(np.prod(volume.GetSpacing())) / 1000.0
    specs = LOCATED_LABELS if located else [{**label, "side": None} for label in
                                             [{"value": 1, "name": "Anterior", "color": [0.9, 0.6, 0.2]},
                                              {"value": 2, "name": "Posterior", "color": [0.2, 0.6, 0.9]}]]
    segments = [{**spec, "voxels": int((labels == spec["value"]).sum()),
                 "volume_ml": int((labels == spec["value"]).sum()) * voxel_ml} for spec in specs]
    report = {"model": {"name": "tiny", "version": "0.0.1", "sha256": env["bundle"].sha256},
              "device": "cpu", "parameters": {}, "segments": segments, "warnings": list(warnings),
              "sides": None, "asymmetry_index": None, "localization": None}
    boxes = {}
    if located:
        sides = {side: {"voxels": sum(s["voxels"] for s in segments if s["side"] == side),
                        "volume_ml": sum(s["volume_ml"] for s in segments if s["side"] == side)}
                 for side in ("left", "right")}
        left, right = sides["left"]["volume_ml"], sides["right"]["volume_ml"]
        boxes = {"left": _local_box(volume, 0.1, 0.45), "right": _local_box(volume, 0.55, 0.9)}
        report.update(sides=sides, asymmetry_index=(left - right) / ((left + right) / 2),
                      localization={"method": "template-affine", "boxes": boxes,
                                    "registration": {"metric": -0.5, "determinant": 1.0, "scales": [1, 1, 1],
                                                     "seconds": 1.0}})
    (folder / "input_report.json").write_text(json.dumps(report))
    # the Slicer segmentation, written by the engine's own writer (names, colours, values, terminology)
    terminology = {1: LEFT_TERMINOLOGY} if located else {}
    image = sitk.ReadImage(str(folder / "input_seg.nrrd"))
    sitk.WriteImage(slicer_segmentation(image, [LabelInfo(s["value"], s["name"], tuple(s["color"]),
                                                          terminology.get(s["value"], "")) for s in specs]),
                    str(folder / "input_seg.seg.nrrd"), useCompression=True)
    files = {"segmentation": str(folder / "input_seg.nrrd"), "slicer_segmentation": str(folder / "input_seg.seg.nrrd"),
             "report": str(folder / "input_report.json")}
    return files, report, labels, boxes


def _import(env, bundle, volume, files, target=None, roi=None):
    job = jobs.SegmentationJob(env["logic"], volume, target, Options(model=str(bundle.path), roi=roi), bundle)
    return env["logic"].importResults(job, files, [])


def _world_bounds(roi):
    bounds = [0.0] * 6
    roi.GetRASBounds(bounds)
    return bounds


def _roi_state(node):
    return (node.GetID(), node.GetName(), _world_bounds(node), node.GetAttribute("AttentionUNet.Role"),
            node.GetTransformNodeID())


def test_located_run_adds_side_segments_boxes_statistics_and_warnings(env, located_bundle, moved_volume, tmp_path):
    """A run the engine located: per-side segments (values, names, side tags, terminology from the bundle's
    localisation labels), one Markups ROI per side over the report's box (in the input's coordinates, so under
    its transform) next to the segmentation, per-side totals and asymmetry in the statistics, the batch table
    and the export, the warnings in the panel's status text and the table. A user's ROI with the very name the
    tool would choose is left alone. (The report is written here by hand with the contract's keys, see above.)"""
    logic, scene, volume = env["logic"], env["scene"], moved_volume
    user_roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Head tiny box left")
    user_roi.SetXYZ(1.0, 2.0, 3.0)
    user_roi.SetRadiusXYZ(4.0, 5.0, 6.0)
    user_before = _roi_state(user_roi)
    warning = "the input's field of view (180 x 220 x 180 mm) is 5.0x larger than the model was trained on"
    files, report, labels, boxes = _write_engine_outputs(env, volume, tmp_path / "out", warnings=[warning])

    result = _import(env, located_bundle, volume, files)

    segments = result.segmentation.GetSegmentation()
    assert [segments.GetNthSegment(i).GetName() for i in range(4)] == [s["name"] for s in LOCATED_LABELS]
    assert [segments.GetNthSegment(i).GetLabelValue() for i in range(4)] == [1, 2, 3, 4]
    assert logic._segmentSides(result.segmentation) == ["left", "left", "right", "right"]
    assert segments.GetNthSegment(0).GetTerminology() == LEFT_TERMINOLOGY
    assert [(row["value"], row["side"], row["voxels"]) for row in result.statistics] == [
        (v, s["side"], int((labels == v).sum())) for v, s in zip((1, 2, 3, 4), LOCATED_LABELS)]
    assert {side: total["voxels"] for side, total in result.sides.items()} == {
        side: report["sides"][side]["voxels"] for side in ("left", "right")}
    assert result.sides["left"]["volume_ml"] == pytest.approx(report["sides"]["left"]["volume_ml"])
    assert result.asymmetryIndex == pytest.approx(report["asymmetry_index"])

    # One box per side, over the report's box (local RAS) moved by the input's transform, next to the result.
    assert [node.GetName() for node in result.localizationBoxes] == ["Head tiny box left_1", "Head tiny box right"]
    sh = scene.GetSubjectHierarchyNode()
    for node, side in zip(result.localizationBoxes, ("left", "right")):
        assert node.IsA("vtkMRMLMarkupsROINode")
        assert node.GetAttribute("AttentionUNet.Role") == "localization box"
        assert node.GetAttribute("AttentionUNet.Side") == side
        assert node.GetAttribute("AttentionUNet.Model") == located_bundle.name
        assert node.GetTransformNodeID() == volume.GetTransformNodeID() is not None
        expected = np.array(boxes[side]) + np.array([30.0, 30.0, 0, 0, 0, 0])
        np.testing.assert_allclose(_world_bounds(node), expected, atol=1e-6)
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == sh.GetItemParent(
            sh.GetItemByDataNode(result.segmentation)) == env["study"]
    assert [result.segmentation.GetNthNodeReference(definitions.LOCALIZATION_BOX_ROLE, i).GetID() for i in range(2)] == [
        node.GetID() for node in result.localizationBoxes]
    # Chosen as the Region of a new run, a box is exactly the box the engine segmented (in the input's coordinates).
    np.testing.assert_allclose(logic.roiBoxInVolumeCoordinates(result.localizationBoxes[0], volume), boxes["left"],
                               atol=1e-6)
    assert _roi_state(user_roi) == user_before

    # Warnings: in the panel's status and on every row of the batch table, with per-side totals.
    assert result.warnings == [warning]
    assert widget.warningText(result.warnings) == f"Warning: {warning}"
    table = logic.createSummaryTable([logic.resultSummaryRow(result)], [result])
    columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    (row,) = [dict(zip(columns, (table.GetCellText(r, c) for c in range(len(columns)))))
              for r in range(table.GetNumberOfRows())]
    assert columns == ["input", "status", "error", "model", "model_version",
                       *(f"{s['name']} (mL)" for s in LOCATED_LABELS), "left (mL)", "right (mL)", "asymmetry index",
                       "warnings"]
    assert row["warnings"] == warning
    assert row["left (mL)"] == f"{report['sides']['left']['volume_ml']:.3f}"
    assert float(row["asymmetry index"]) == pytest.approx(report["asymmetry_index"], abs=1e-4)
    # The engine's summary.csv row of the same report has the same cells.
    from AttentionUNetSegmentLib.inference.outputs import summary_row

    engine = summary_row(volume.GetName(), "done", row["model"], row["model_version"], report)
    assert {name: engine.get(name, "") for name in columns} == row
    batch = jobs.BatchJob(logic, [volume], Options())
    batch.results.append(result)
    batch.rows.append(logic.resultSummaryRow(result))
    assert batch.summary.endswith("1 with warnings (see the table)")  # the panel's status after the batch

    files = logic.exportForReport(result.segmentation, tmp_path / "export", referenceVolume=volume)
    with open(files["volumes"], newline="") as stream:
        volumes = list(csv.DictReader(stream))
    assert [(int(r["value"]), r["side"], int(r["voxels"])) for r in volumes] == [
        (row["value"], row["side"], row["voxels"]) for row in result.statistics]
    with open(files["sides"], newline="") as stream:
        (sides,) = list(csv.DictReader(stream))
    assert int(sides["left_voxels"]) == report["sides"]["left"]["voxels"]
    assert int(sides["right_voxels"]) == report["sides"]["right"]["voxels"]
    assert float(sides["right_volume_ml"]) == pytest.approx(report["sides"]["right"]["volume_ml"], rel=1e-5)
    assert float(sides["asymmetry_index"]) == pytest.approx(report["asymmetry_index"], rel=1e-5)
    sceneNodes.removeNodes([result.segmentation, *result.localizationBoxes, user_roi])


def test_rerun_replaces_only_the_tools_boxes_never_the_region_in_use(env, located_bundle, moved_volume, tmp_path):
    """Re-running into the same segmentation (the panel's overwrite) replaces the boxes the tool added, keeping
    their names; a box the user moved and chose as the Region of the re-run is never modified or removed; a crop
    run's outputs (no sides) stay as before: no side column, no sides file, no side rows."""
    logic, scene, volume = env["logic"], env["scene"], moved_volume
    files, _, _, _ = _write_engine_outputs(env, volume, tmp_path / "first")
    first = _import(env, located_bundle, volume, files)
    names = [node.GetName() for node in first.localizationBoxes]
    count = scene.GetNumberOfNodesByClass("vtkMRMLMarkupsROINode")

    again = _import(env, located_bundle, volume, files, target=first.segmentation)
    assert again.segmentation is first.segmentation
    assert all(scene.GetNodeByID(node.GetID()) is None for node in first.localizationBoxes)
    assert [node.GetName() for node in again.localizationBoxes] == names
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsROINode") == count

    region = again.localizationBoxes[0]
    region.SetXYZ(*(np.array(region.GetCenter()) + np.array([2.0, -1.0, 0.5])))  # the user moves it ...
    region_before = _roi_state(region)
    crop_files, _, _, _ = _write_engine_outputs(env, volume, tmp_path / "crop", located=False)
    crop = _import(env, located_bundle, volume, crop_files, target=first.segmentation, roi=region)  # ... and re-runs
    assert _roi_state(region) == region_before
    assert scene.GetNodeByID(again.localizationBoxes[1].GetID()) is None  # the tool's other box went with its run
    assert crop.localizationBoxes == [] and crop.sides == {} and crop.asymmetryIndex is None and crop.warnings == []
    assert crop.segmentation.GetNumberOfNodeReferences(definitions.LOCALIZATION_BOX_ROLE) == 0
    assert logic._segmentSides(crop.segmentation) == [None, None]
    crop_row = logic.resultSummaryRow(crop)
    assert [name for name in crop_row if name.endswith(" (mL)")] == ["Anterior (mL)", "Posterior (mL)"]
    exported = logic.exportForReport(crop.segmentation, tmp_path / "export", referenceVolume=volume)
    assert "sides" not in exported and not list((tmp_path / "export").glob("*_sides.csv"))
    assert open(exported["volumes"]).readline().strip() == "value,name,voxels,volume_ml"
    sceneNodes.removeNodes([crop.segmentation, region])


def test_segments_are_the_engines_seg_nrrd_and_volumes_its_report(env, located_bundle, moved_volume, tmp_path):
    """The scene shows what the engine wrote, nothing rebuilt or recounted: segment names, colours, values and
    terminology from its ``.seg.nrrd``, volumes and per-side totals from its report."""
    files, report, _, _ = _write_engine_outputs(env, moved_volume, tmp_path / "out")
    terminology = LEFT_TERMINOLOGY.replace("SCT^7771000^Left", "SCT^24028007^Right")
    image = sitk.ReadImage(files["segmentation"])
    written = [LabelInfo(s["value"], f"{s['name']} (engine)", (0.1, 0.2, 0.3), terminology) for s in LOCATED_LABELS]
    sitk.WriteImage(slicer_segmentation(image, written), files["slicer_segmentation"], useCompression=True)
    for index, segment in enumerate(report["segments"]):
        segment.update(voxels=1000 + index, volume_ml=2.5 + index)  # not what the label map holds
    report["sides"] = {"left": {"voxels": 2001, "volume_ml": 6.0}, "right": {"voxels": 2005, "volume_ml": 10.0}}
    report["asymmetry_index"] = -0.5
    pathlib.Path(files["report"]).write_text(json.dumps(report))
    result = _import(env, located_bundle, moved_volume, files)
    try:
        segments = result.segmentation.GetSegmentation()
        assert [segments.GetNthSegment(i).GetName() for i in range(4)] == [label.name for label in written]
        assert all(segments.GetNthSegment(i).GetColor() == pytest.approx((0.1, 0.2, 0.3)) for i in range(4))
        assert all(segments.GetNthSegment(i).GetTerminology() == terminology for i in range(4))
        assert [(row["voxels"], row["volume_ml"]) for row in result.statistics] == [
            (1000 + i, 2.5 + i) for i in range(4)]
        assert result.sides == report["sides"] and result.asymmetryIndex == -0.5
    finally:
        sceneNodes.removeNodes([result.segmentation, *result.localizationBoxes])


def test_engine_command_localizes_only_for_a_localizer_without_a_region(env, located_bundle, tmp_path):
    logic, volume = env["logic"], env["volume"]

    def command(bundle, **options):
        job = jobs.SegmentationJob(logic, volume, None, Options(model=str(bundle.path),
                                                                                     **options), bundle)
        return job.engineCommand(tmp_path / "input.nrrd", tmp_path / "out")

    on, off = command(located_bundle), command(located_bundle, locateAutomatically=False)
    assert on[on.index("--localize") + 1] == "auto" and off[off.index("--localize") + 1] == "off"
    roi = env["scene"].AddNewNodeByClass("vtkMRMLMarkupsROINode", "Region")
    bounds = [0.0] * 6
    volume.GetRASBounds(bounds)
    roi.SetXYZ(*[(bounds[2 * a] + bounds[2 * a + 1]) / 2 for a in range(3)])
    roi.SetRadiusXYZ(5, 5, 5)
    try:
        with_region = command(located_bundle, roi=roi)
        assert "--roi" in with_region and "--localize" not in with_region  # the Region wins over the localiser
    finally:
        sceneNodes.removeNodes([roi])
    assert "--localize" not in command(env["bundle"])  # no localiser: the command is as before


def test_domain_warnings_before_apply_use_the_volumes_own_axes(env, located_bundle):
    """The panel's check before Apply: sizes and spacings along i, j, k with the matching direction columns (an
    input whose i axis runs along A is compared along A), sign flips (RAS vs LPS) irrelevant; a whole-head field
    of view warns unless the localiser will run or a Region of the model's size is chosen; coarse voxels warn
    even with the localiser; a model without a domain record never warns."""
    logic, scene = env["logic"], env["scene"]
    permuted = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # i -> A, j -> -R (L), k -> S
    along_a = _add_volume(scene, "Along A", np.zeros((20, 20, 80), np.uint8), spacing=(1.0, 1.0, 1.0),
                          directions=permuted)
    head = _add_volume(scene, "Whole head", np.zeros((90, 110, 90), np.uint8), spacing=(1.0, 1.0, 1.0))
    coarse = _add_volume(scene, "Coarse", np.zeros((8, 30, 8), np.uint8), spacing=(3.0, 3.0, 3.0))
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Around the structure")
    roi.SetXYZ(40.0, 50.0, 40.0)
    roi.SetRadiusXYZ(9.0, 35.0, 9.0)
    try:
        assert logic.domainWarnings(along_a, located_bundle) == []
        assert logic.domainWarnings(along_a, located_bundle, locateAutomatically=False) == []
        outside = logic.domainWarnings(head, located_bundle, locateAutomatically=False)
        assert len(outside) == 1 and "field of view" in outside[0] and "Locate automatically" in outside[0]
        assert widget.warningText(outside).startswith("Warning: the input's field of view")
        assert logic.domainWarnings(head, located_bundle) == []  # the localiser cuts the model's view out
        assert logic.willLocalize(head, located_bundle)  # ... which the panel says instead
        assert not logic.willLocalize(head, located_bundle, locateAutomatically=False)
        assert not logic.willLocalize(head, located_bundle, roi=roi)
        assert not logic.willLocalize(along_a, located_bundle)  # the model's own field of view: no localisation
        assert not logic.willLocalize(head, env["bundle"])  # no localiser
        assert logic.domainWarnings(head, located_bundle, roi=roi, locateAutomatically=False) == []
        roi.SetRadiusXYZ(40.0, 50.0, 40.0)  # a Region as large as the head warns like the head
        assert "field of view" in logic.domainWarnings(head, located_bundle, roi=roi)[0]
        (coarse_warning,) = logic.domainWarnings(coarse, located_bundle)
        assert "coarser" in coarse_warning
        assert logic.domainWarnings(head, env["bundle"]) == []  # no domain record: nothing to compare with
    finally:
        sceneNodes.removeNodes([along_a, head, coarse, roi])


@pytest.mark.parametrize("damage", [
    lambda report: report["localization"]["boxes"].update(left=[1.0, 2.0, 3.0]),
    lambda report: report["localization"]["boxes"].update(right=[10.0, 0.0, 0.0, 1.0, 0.0, 1.0]),  # R_MIN > R_MAX
    lambda report: report["localization"]["boxes"].update(left=["a"] * 6),
    lambda report: report["segments"][2].update(value=True),
    lambda report: report["segments"][0].pop("volume_ml"),
    lambda report: report.update(segments=[]),
])
def test_a_report_the_module_cannot_read_adds_nothing(env, located_bundle, moved_volume, tmp_path, damage):
    files, report, _, _ = _write_engine_outputs(env, moved_volume, tmp_path / "out")
    damage(report)
    pathlib.Path(files["report"]).write_text(json.dumps(report))
    before = _node_ids(env["scene"])
    with pytest.raises(definitions.AttentionUNetSegmentError, match="reinstall the AttentionUNet extension"):
        _import(env, located_bundle, moved_volume, files)
    assert _node_ids(env["scene"]) == before


def test_a_domain_record_the_module_cannot_read_is_said_not_raised(env, tmp_path):
    """The panel checks before Apply on every input change: a damaged ``domain`` section must give a message,
    never an exception in the panel."""
    path = tmp_path / "damaged"
    shutil.copytree(env["model"], path)
    metadata = json.loads((path / "model.json").read_text())
    for damaged in ({"field_of_view_mm": {"median": "wide"}}, {**DOMAIN, "thresholds": [1, 2]}, {"spacing_mm": 1}):
        metadata["domain"] = damaged
        metadata[DIGEST_KEY] = metadata_digest(metadata)
        (path / "model.json").write_text(json.dumps(metadata))
        bundle = env["logic"].resolveModel(str(path))
        (message,) = env["logic"].domainWarnings(env["volume"], bundle)
        assert "cannot read" in message


@pytest.mark.slow
def test_whole_head_is_located_by_the_real_engine_with_the_bundled_model(env):
    """End to end on a real 2 mm whole-head T1 (``../shared``) with the bundled hippocampus model and the real
    engine: the panel's check says the volume will be located, the run adds per-side segments, one box per side
    inside the head and per-side totals. Skips until the bundled model has a localiser (engine side of issue 11)."""
    from conftest import REPO_ROOT

    head_path = REPO_ROOT.parent / "shared" / "data" / "whole-head" / "images" / "nichart_subj01.nii.gz"
    if not head_path.is_file():
        pytest.skip(f"shared whole-head data not found at {head_path}")
    module, logic, scene = env["module"], env["logic"], env["scene"]
    bundle = logic.resolveModel(definitions.DEFAULT_MODEL)
    if not logic.hasLocalizer(bundle):
        pytest.skip("the bundled model declares no localiser yet")
    head = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Subject 1")
    module.AttentionUNetSegmentLogic._readVolumeFile(head_path, head)
    assert logic.willLocalize(head, bundle) and logic.domainWarnings(head, bundle) == []
    assert "field of view" in logic.domainWarnings(head, bundle, locateAutomatically=False)[0]
    result = logic.process(head, options=Options(model=definitions.DEFAULT_MODEL, device="cpu", attentionMaps=False))
    try:
        assert logic._segmentSides(result.segmentation) == ["left", "left", "right", "right"]
        # standard terminology (SNOMED CT): hippocampus with its laterality, read through Slicer's own accessor
        segments = result.segmentation.GetSegmentation()
        codes = [segments.GetNthSegment(i).GetTerminology().split("~")[2:4] for i in range(4)]
        assert codes == [["SCT^5976002^Hippocampus", "SCT^7771000^Left"]] * 2 + [
            ["SCT^5976002^Hippocampus", "SCT^24028007^Right"]] * 2
        assert set(result.sides) == {"left", "right"} and all(t["voxels"] > 0 for t in result.sides.values())
        assert result.asymmetryIndex is not None and abs(result.asymmetryIndex) < 2
        assert [node.GetName() for node in result.localizationBoxes] == [
            "Subject 1 hippocampus box left", "Subject 1 hippocampus box right"]
        head_bounds = [0.0] * 6
        head.GetRASBounds(head_bounds)
        for node in result.localizationBoxes:
            box = _world_bounds(node)
            assert all(head_bounds[2 * a] - 1 <= box[2 * a] < box[2 * a + 1] <= head_bounds[2 * a + 1] + 1
                       for a in range(3))
        left, right = (np.mean(np.reshape(_world_bounds(node), (3, 2)), axis=1) for node in result.localizationBoxes)
        assert left[0] < right[0]  # the left box lies towards -R
    finally:
        sceneNodes.removeNodes([result.segmentation, *result.localizationBoxes, head])


# Issue 13: Export > DICOM SEG for a volume from the DICOM database. slicer-core has no ctkDICOMDatabase: the two
# calls the module makes (fileForInstance, insert) are stood in for over real files; the volume is read by Slicer's
# own archetype reader from the files sorted as DICOMScalarVolumePlugin sorts them; the engine writes the SEG.


class _DicomDatabase:
    """``slicer.dicomDatabase`` as far as the module uses it: ``isOpen``, ``fileForInstance``, ``insert``."""

    isOpen = True

    def __init__(self, files):
        pydicom = pytest.importorskip("pydicom")
        self.files = {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID): str(path) for path in files}
        self.inserted = []

    def fileForInstance(self, uid):
        return self.files.get(uid, "")

    def insert(self, path):
        self.inserted.append(path)


@pytest.fixture
def dicom_volume(env, tmp_path, monkeypatch):
    pydicom = pytest.importorskip("pydicom")
    from test_fileio_dicom import OBLIQUE, _volume, write_series

    files = write_series(tmp_path / "dicom", _volume((12, 30, 34)), rotation=OBLIQUE, description="T1")
    headers = {path: pydicom.dcmread(path, stop_before_pixels=True) for path in files}
    normal = np.cross(*np.array(headers[files[0]].ImageOrientationPatient, float).reshape(2, 3))
    ordered = sorted(files, key=lambda p: float(np.dot(np.array(headers[p].ImagePositionPatient, float), normal)))
    node = env["scene"].AddNewNodeByClass("vtkMRMLScalarVolumeNode", "T1 from DICOM")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(ordered[0]))
    storage.ResetFileNameList()
    for path in ordered:
        storage.AddFileName(str(path))
    storage.SetSingleFile(0)
    assert storage.ReadData(node)
    node.SetAttribute("DICOM.instanceUIDs", " ".join(str(headers[p].SOPInstanceUID) for p in ordered))
    database = _DicomDatabase(files)
    monkeypatch.setattr(slicer, "dicomDatabase", database, raising=False)
    return {"node": node, "files": files, "database": database}


def test_dicom_seg_export_references_the_series_and_enters_the_database(env, dicom_volume, tmp_path):
    hd = pytest.importorskip("highdicom")
    logic, node = env["logic"], dicom_volume["node"]
    result = logic.process(node, options=Options(model=env["model"], device="cpu", attentionMaps=False))
    assert logic.hasDicomSource(result.segmentation) and not logic.hasDicomSource(_plain_segmentation(env))
    files = logic.exportForReport(result.segmentation, tmp_path / "export", dicomSeg=True)
    seg_path = pathlib.Path(files["dicom_segmentation"])
    assert seg_path.name == "T1_from_DICOM_segmentation_seg.dcm" and seg_path.is_file()
    assert dicom_volume["database"].inserted == [str(seg_path.resolve())]
    seg = hd.seg.segread(str(seg_path))
    uids = node.GetAttribute("DICOM.instanceUIDs").split()
    referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(uids)
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["Anterior", "Posterior"]
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (env["bundle"].name, env["bundle"].version)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(files["labelmap"]))
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True,
                                               skip_overlap_checks=True)
    np.testing.assert_array_equal(pixels, labels)
    with pytest.raises(definitions.AttentionUNetSegmentError, match="exist already"):
        logic.exportForReport(result.segmentation, tmp_path / "export", dicomSeg=True)


def test_a_failed_export_leaves_no_dicom_seg_on_disk_or_in_the_database(env, dicom_volume, tmp_path):
    """The SEG is written with the other files; when putting a later one in place fails (here the provenance's
    place is a folder), the export leaves none of its files and the DICOM database is never told of a SEG."""
    pytest.importorskip("highdicom")
    logic, node = env["logic"], dicom_volume["node"]
    result = logic.process(node, options=Options(model=env["model"], device="cpu", attentionMaps=False))
    export = tmp_path / "export"
    names = logic.exportFileNames(result.segmentation, "nii.gz", dicomSeg=True)
    assert "sides" not in names  # the provenance is then the last file entered, the first one renamed
    (export / names["provenance"] / "kept.txt").parent.mkdir(parents=True)
    (export / names["provenance"] / "kept.txt").write_text("not this tool's")
    with pytest.raises(definitions.AttentionUNetSegmentError, match="Could not write the export"):
        logic.exportForReport(result.segmentation, export, force=True, dicomSeg=True)
    assert dicom_volume["database"].inserted == []
    assert sorted(p.name for p in export.iterdir()) == [names["provenance"]]  # no SEG, no file, no temporary
    assert (export / names["provenance"] / "kept.txt").read_text() == "not this tool's"


def _plain_segmentation(env):
    """A segmentation of the scene's non-DICOM volume."""
    scene = env["scene"]
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "plain")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(env["volume"])
    return segmentation


def test_dicom_seg_export_needs_the_instances_in_the_database(env, dicom_volume, tmp_path):
    logic, node = env["logic"], dicom_volume["node"]
    segmentation = env["scene"].AddNewNodeByClass("vtkMRMLSegmentationNode", "manual")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(node)
    segmentation.GetSegmentation().AddEmptySegment("", "drawn", [1.0, 0.0, 0.0])
    dicom_volume["database"].files.popitem()
    with pytest.raises(definitions.AttentionUNetSegmentError, match="no file for 1 of the 12 images"):
        logic.exportDicomSeg(segmentation, tmp_path / "x_seg.dcm")
    with pytest.raises(definitions.AttentionUNetSegmentError, match="not loaded from the DICOM database"):
        logic.exportDicomSeg(_plain_segmentation(env), tmp_path / "y_seg.dcm")
    assert not list(tmp_path.glob("*.dcm"))
