"""The engine's results into the scene (main thread): all read into new nodes first, then placed."""

from __future__ import annotations

import datetime
import json
import math
import pathlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence

import slicer
import vtk
from slicer.i18n import tr as _

from AttentionUNetSegmentLib import __version__ as ENGINE_VERSION
from AttentionUNetSlicer.definitions import (
    ATTENTION_COLOR_NODE_ID,
    ATTENTION_DISPLAY_THRESHOLD,
    ATTENTION_OPACITY,
    ATTENTION_ROLE,
    ATTRIBUTE_PREFIX,
    BOX_ROLE,
    LOCALIZATION_BOX_ROLE,
    PROBABILITY_ROLE,
    SIDE_TAG,
    SIDES,
    AttentionUNetSegmentError,
)
from AttentionUNetSlicer.sceneNodes import removeNodes

if TYPE_CHECKING:  # annotations only: jobs.py imports this module
    from AttentionUNetSegmentLib.model.bundle import ModelBundle
    from AttentionUNetSlicer.jobs import SegmentationJob


@dataclass
class SegmentationResult:
    """What one run added to the scene (all nodes are in ``slicer.mrmlScene``).

    ``statistics``: one row per segment (value, name, side, voxels, volume_ml); ``sides``: per-side totals
    ``{"left": {"voxels", "volume_ml"}, ...}`` and ``asymmetryIndex`` (L - R) / ((L + R) / 2), only when the run
    located each side (else empty / ``None``); ``localizationBoxes``: the Markups ROI nodes of the boxes it used;
    ``warnings``: the engine's (domain guard, localisation)."""

    inputVolume: Any
    segmentation: Any
    attentionVolumes: List[Any] = field(default_factory=list)
    probabilityVolumes: List[Any] = field(default_factory=list)
    statistics: List[Dict[str, Any]] = field(default_factory=list)
    provenance: Dict[str, str] = field(default_factory=dict)
    log: List[str] = field(default_factory=list)
    sides: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    asymmetryIndex: Optional[float] = None
    localizationBoxes: List[Any] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)

    @property
    def device(self) -> str:
        return self.provenance.get("Device", "")


class SceneImport:
    """Logic part: ``importResults`` and the scene placement of a run's outputs."""

    def importResults(self, job: SegmentationJob, files: Dict[str, Any], log: List[str]) -> SegmentationResult:
        """Load the engine's files (its ``done`` record for the input, see DESIGN.md) into the scene.

        Everything is read into new nodes first; on any problem those are removed and the error raised, so the
        scene is as it was. Only then, when the user chose to reuse a segmentation, are its segments and its
        previous map volumes replaced by the new results."""
        segmentationPath = pathlib.Path(files.get("slicer_segmentation", ""))
        if not segmentationPath.is_file():
            raise AttentionUNetSegmentError(_("The engine did not report a segmentation for the input; see the log."))
        report = self._readReport(files)
        statistics = _reportSegments(report)
        sides, asymmetry = _reportSides(report)
        boxes = _localizationBoxes(report)
        inputVolume = job.inputVolume
        provenance = self._provenance(job, report)
        probabilityFiles = files.get("probabilities") or {}
        probabilityNames = [row["name"] for row in statistics if row["name"] in probabilityFiles]
        scene = slicer.mrmlScene
        added: List[Any] = []
        try:
            attention = self._loadMaps([pathlib.Path(path) for path in files.get("attention") or []],
                                       lambda k: f"{inputVolume.GetName()} attention {k}", added)
            probabilities = self._loadMaps([pathlib.Path(probabilityFiles[name]) for name in probabilityNames],
                                           lambda k: f"{inputVolume.GetName()} probability {probabilityNames[k]}",
                                           added)
            segmentation = scene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", scene.GenerateUniqueName(f"{inputVolume.GetName()} segmentation"))
            added.append(segmentation)
            self._readSegmentation(segmentationPath, segmentation, inputVolume, statistics)
            localizationBoxes = self._addBoxes(inputVolume, job.bundle, boxes, added)
        except Exception as error:
            removeNodes(reversed(added))
            if isinstance(error, AttentionUNetSegmentError):
                raise
            raise AttentionUNetSegmentError(
                _("Loading the results into the scene failed: {error}").format(error=error)) from error
        previousOwner = job.outputSegmentation
        if previousOwner is not None:
            attention = self._replaceMaps(previousOwner, ATTENTION_ROLE, attention)
            probabilities = self._replaceMaps(previousOwner, PROBABILITY_ROLE, probabilities)
            segmentation = self._replaceSegments(previousOwner, segmentation, inputVolume)
            self._replaceBoxes(previousOwner, localizationBoxes, job.options.roi)

        roles = ((ATTENTION_ROLE, attention), (PROBABILITY_ROLE, probabilities),
                 (LOCALIZATION_BOX_ROLE, localizationBoxes))
        for role, nodes in roles:
            segmentation.RemoveNodeReferenceIDs(role)
            for node in nodes:
                segmentation.AddNodeReferenceID(role, node.GetID())
        for node, role in [(segmentation, "segmentation")] + [(n, "attention") for n in attention] + \
                [(n, "probability") for n in probabilities] + [(n, BOX_ROLE) for n in localizationBoxes]:
            for key, value in provenance.items():
                node.SetAttribute(ATTRIBUTE_PREFIX + key, value)
            node.SetAttribute(ATTRIBUTE_PREFIX + "Role", role)
            node.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
        for index, node in enumerate(attention):
            node.SetAttribute(ATTRIBUTE_PREFIX + "Gate", str(index))
        self._placeInSubjectHierarchy(inputVolume, segmentation, attention + probabilities, localizationBoxes)
        warnings = [w for w in report.get("warnings") or [] if isinstance(w, str)]
        return SegmentationResult(inputVolume, segmentation, attention, probabilities, statistics, provenance, log,
                                  sides, asymmetry, localizationBoxes, warnings)

    @staticmethod
    def _readReport(files: Dict[str, Any]) -> Dict[str, Any]:
        """The engine's ``<stem>_report.json`` (empty when the engine listed none)."""
        from AttentionUNetSegmentLib.errors import AttentionUNetError
        from AttentionUNetSegmentLib.fileio.jsonfile import read_json

        if not files.get("report"):
            return {}
        try:
            report = read_json(files["report"], "the engine's report")
        except AttentionUNetError as error:
            raise AttentionUNetSegmentError(_("Loading the results failed: {error}.").format(error=error))
        return report if isinstance(report, dict) else {}

    @staticmethod
    def _addBoxes(inputVolume, bundle: ModelBundle, boxes: Dict[str, List[float]], added: List[Any]) -> List[Any]:
        """One Markups ROI per located side over the box the engine segmented (RAS in the input's own
        coordinates: the node goes under the input's transform like the other outputs), for the user to see,
        move and choose as the Region of a new run."""
        scene = slicer.mrmlScene
        nodes = []
        for side, box in boxes.items():
            node = scene.AddNewNodeByClass(
                "vtkMRMLMarkupsROINode", scene.GenerateUniqueName(f"{inputVolume.GetName()} {bundle.name} box {side}"))
            added.append(node)
            node.CreateDefaultDisplayNodes()
            node.SetXYZ(*[(box[2 * a] + box[2 * a + 1]) / 2 for a in range(3)])
            node.SetRadiusXYZ(*[(box[2 * a + 1] - box[2 * a]) / 2 for a in range(3)])
            node.SetAttribute(SIDE_TAG, side)
            nodes.append(node)
        return nodes

    @staticmethod
    def _replaceBoxes(previousOwner, fresh: Sequence[Any], regionInUse) -> None:
        """The user chose to overwrite ``previousOwner``'s run: the boxes that run added are removed and a new
        box of the same side takes the old one's name. A box chosen as this run's Region is the user's now and is
        left as it is (it only stops being listed as the run's box)."""
        names = {}
        previous = [previousOwner.GetNthNodeReference(LOCALIZATION_BOX_ROLE, i)  # removing one drops its reference
                    for i in range(previousOwner.GetNumberOfNodeReferences(LOCALIZATION_BOX_ROLE))]
        for old in previous:
            if (old is None or old.GetAttribute(ATTRIBUTE_PREFIX + "Role") != BOX_ROLE
                    or (regionInUse is not None and old.GetID() == regionInUse.GetID())):
                continue
            names[old.GetAttribute(SIDE_TAG)] = old.GetName()
            removeNodes([old])
        for node in fresh:
            if node.GetAttribute(SIDE_TAG) in names:
                node.SetName(names[node.GetAttribute(SIDE_TAG)])

    def _provenance(self, job: SegmentationJob, report: Dict[str, Any]) -> Dict[str, str]:
        model = report.get("model", {})
        return {
            "Model": str(model.get("name", job.bundle.name)),
            "ModelVersion": str(model.get("version", job.bundle.version)),
            "ModelSha256": str(model.get("sha256", job.bundle.sha256)),
            "ModelLicense": str(model.get("license", job.bundle.metadata.get("license", ""))),
            "EngineVersion": str(report.get("engine_version", ENGINE_VERSION)),
            "Device": str(report.get("device", job.options.device)),
            "Parameters": json.dumps({**job.options.parameters(), **report.get("parameters", {})}, sort_keys=True),
            "Date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "InputVolume": job.inputVolume.GetName(),
            "Warnings": json.dumps([w for w in report.get("warnings") or [] if isinstance(w, str)]),
        }

    def _loadMaps(self, paths: Sequence[pathlib.Path], nameFor: Callable[[int], str], added: List[Any]) -> List[Any]:
        """Float maps as new scalar volumes at their own resolution, shown as a heat map over [0, 1]."""
        scene = slicer.mrmlScene
        nodes = []
        for index, path in enumerate(paths):
            node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(nameFor(index)))
            added.append(node)
            self._readVolumeFile(path, node)
            self._showAsMap(node)
            nodes.append(node)
        return nodes

    @staticmethod
    def _showAsMap(node) -> None:
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetAndObserveColorNodeID(ATTENTION_COLOR_NODE_ID)
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 1.0)
        display.SetThreshold(ATTENTION_DISPLAY_THRESHOLD, 1.0)
        display.ApplyThresholdOn()

    def _replaceMaps(self, previousOwner, role: str, fresh: Sequence[Any]) -> List[Any]:
        """The user chose to overwrite ``previousOwner``'s run: move each new map into the node of the previous
        run in the same place (same node, new voxels and geometry) and drop the new node; maps without a previous
        counterpart stay new nodes, and previous maps without a new one are removed."""
        previous = [previousOwner.GetNthNodeReference(role, i)
                    for i in range(previousOwner.GetNumberOfNodeReferences(role))]
        for old in previous[len(fresh):]:  # maps the new run no longer makes (e.g. switched off)
            if old is not None:
                slicer.mrmlScene.RemoveNode(old)
        nodes = []
        for index, node in enumerate(fresh):
            old = previous[index] if index < len(previous) else None
            if old is None:
                nodes.append(node)
                continue
            matrix = vtk.vtkMatrix4x4()
            node.GetIJKToRASMatrix(matrix)
            old.SetIJKToRASMatrix(matrix)
            old.SetAndObserveImageData(node.GetImageData())
            self._showAsMap(old)
            slicer.mrmlScene.RemoveNode(node)
            nodes.append(old)
        return nodes

    @staticmethod
    def _replaceSegments(target, fresh, inputVolume):
        """The user chose to overwrite ``target``: its segments become ``fresh``'s (which is then removed)."""
        target.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
        target.CreateDefaultDisplayNodes()
        segments, source = target.GetSegmentation(), fresh.GetSegmentation()
        segments.RemoveAllSegments()
        for segmentId in [source.GetNthSegmentID(i) for i in range(source.GetNumberOfSegments())]:
            segments.CopySegmentFromSegmentation(source, segmentId, True)  # moved, in order: no voxel copy
        slicer.mrmlScene.RemoveNode(fresh)
        return target

    @staticmethod
    def _readSegmentation(path: pathlib.Path, segmentation, inputVolume, statistics: Sequence[Dict[str, Any]]) -> None:
        """Read the engine's ``.seg.nrrd`` (its segments' names, colours, label values and terminology, as the
        engine wrote them) into ``segmentation`` with Slicer's reader; reference geometry = input; each segment of a
        located run gets its side tag from the report."""
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(str(path))
        if not storage.ReadData(segmentation):
            raise AttentionUNetSegmentError(_("Could not read the engine output {name}.").format(name=path.name))
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
        segmentation.CreateDefaultDisplayNodes()
        segments = segmentation.GetSegmentation()
        byValue = {segments.GetNthSegment(i).GetLabelValue(): segments.GetNthSegment(i)
                   for i in range(segments.GetNumberOfSegments())}
        if sorted(byValue) != sorted(row["value"] for row in statistics):
            raise AttentionUNetSegmentError(
                _("The engine's {name} holds the label values {values}, its report lists {listed}: reinstall the "
                  "AttentionUNet extension so that its engine and module match.").format(
                      name=path.name, values=sorted(byValue), listed=sorted(row["value"] for row in statistics)))
        for row in statistics:
            if row["side"] is not None:
                byValue[row["value"]].SetTag(SIDE_TAG, row["side"])

    @staticmethod
    def _placeInSubjectHierarchy(inputVolume, segmentation, maps: Sequence[Any], boxes: Sequence[Any] = ()) -> None:
        """Outputs go under the input's study (its parent item): the segmentation and its localisation boxes
        there, maps in a folder next to them."""
        shNode = slicer.mrmlScene.GetSubjectHierarchyNode()
        inputItem = shNode.GetItemByDataNode(inputVolume)
        parent = shNode.GetItemParent(inputItem) if inputItem else shNode.GetSceneItemID()

        def place(node, parentItem):
            item = shNode.GetItemByDataNode(node)
            if item:
                shNode.SetItemParent(item, parentItem)
            else:
                shNode.CreateItem(parentItem, node)

        place(segmentation, parent)
        for node in boxes:
            place(node, parent)
        if maps:
            folderName = f"{inputVolume.GetName()} attention maps"
            folder = shNode.GetItemChildWithName(parent, folderName) or shNode.CreateFolderItem(parent, folderName)
            for node in maps:
                place(node, folder)

    def showResults(self, result: SegmentationResult) -> None:
        """Input in the background, the finest attention map as a semi-transparent heat overlay."""
        foreground = result.attentionVolumes[0] if result.attentionVolumes else None
        slicer.util.setSliceViewerLayers(background=result.inputVolume, foreground=foreground,
                                         foregroundOpacity=ATTENTION_OPACITY)
        result.segmentation.CreateDefaultDisplayNodes()
        result.segmentation.GetDisplayNode().SetVisibility(True)


def _reportSegments(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The run's segments as its report lists them (a located run has one per side and part): value, name, side
    (``None`` unless located), voxels and mL, as the engine counted them on the input's grid."""
    from AttentionUNetSegmentLib.model.bundle import MAX_LABEL_VALUE

    rows = []
    for item in report.get("segments") or []:
        try:
            row = {key: item[key] for key in ("value", "name", "voxels", "volume_ml")}
            row["side"] = item.get("side") if item.get("side") in SIDES else None
            valid = (isinstance(row["value"], int) and not isinstance(row["value"], bool)
                     and 0 < row["value"] <= MAX_LABEL_VALUE and isinstance(row["name"], str)
                     and isinstance(row["voxels"], int) and not isinstance(row["voxels"], bool)
                     and isinstance(row["volume_ml"], (int, float)) and math.isfinite(row["volume_ml"]))
        except (KeyError, TypeError):
            valid = False
        if not valid:
            raise AttentionUNetSegmentError(
                _("The engine's report lists a segment the module cannot read ({segment}): reinstall the "
                  "AttentionUNet extension so that its engine and module match.").format(segment=str(item)[:200]))
        rows.append(row)
    if not rows:
        raise AttentionUNetSegmentError(_("The engine's report lists no segments: reinstall the AttentionUNet "
                                          "extension so that its engine and module match."))
    return rows


def _reportSides(report: Dict[str, Any]):
    """``(sides, asymmetry)``: the report's per-side totals ``{side: {"voxels", "volume_ml"}}`` in left/right order
    and its asymmetry index (L - R) / ((L + R) / 2); ``({}, None)`` for a run that was not located."""
    totals = report.get("sides")
    if not isinstance(totals, dict):
        return {}, None
    sides = {side: totals[side] for side in SIDES if isinstance(totals.get(side), dict)}
    asymmetry = report.get("asymmetry_index")
    return sides, (float(asymmetry) if isinstance(asymmetry, (int, float)) and len(sides) == len(SIDES) else None)


def _localizationBoxes(report: Dict[str, Any]) -> Dict[str, List[float]]:
    """``{side: [R_MIN, R_MAX, A_MIN, A_MAX, S_MIN, S_MAX]}`` of the boxes a located run segmented (the
    report's ``localization.boxes``, RAS mm in the input's coordinates); empty without localisation."""
    localization = report.get("localization")
    boxes = localization.get("boxes") if isinstance(localization, dict) else None
    if not isinstance(boxes, dict):
        return {}
    result = {}
    for side in SIDES:
        if boxes.get(side) is None:
            continue
        try:
            box = [float(v) for v in boxes[side]]
        except (TypeError, ValueError):
            box = []
        if len(box) != 6 or not all(math.isfinite(v) for v in box) or any(box[2 * a] > box[2 * a + 1]
                                                                             for a in range(3)):
            raise AttentionUNetSegmentError(
                _("The engine's report gives the {side} localisation box as {box}, not six RAS bounds: reinstall "
                  "the AttentionUNet extension so that its engine and module match.").format(
                      side=side, box=str(boxes[side])[:200]))
        result[side] = box
    return result
