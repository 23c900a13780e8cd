"""Export for reports: label map node, files (label map, .seg.nrrd, CSV tables, provenance), PDF report,
DICOM SEG (written by the engine process)."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import shutil
from typing import Any, Dict, List, Optional, Sequence

import slicer
import vtk
from slicer.i18n import tr as _

from AttentionUNetSegmentLib import __version__ as ENGINE_VERSION
from AttentionUNetSlicer.definitions import (
    ATTENTION_ROLE,
    ATTRIBUTE_PREFIX,
    DICOM_INSTANCE_UIDS,
    OUTPUT_FORMATS,
    SIDE_TAG,
    SIDES,
    AttentionUNetSegmentError,
)
from AttentionUNetSlicer.engineProcess import buildDicomSegCommand
from AttentionUNetSlicer.sceneNodes import nodeIds, removeNodes
from AttentionUNetSlicer.segmentStatistics import sideTotals, statisticsRows, voxelCounts, voxelVolumeMl
from AttentionUNetSlicer.volumeFiles import workDirectory


class Export:
    """Logic part: everything Export writes."""

    @staticmethod
    def _referenceVolume(segmentationNode):
        return segmentationNode.GetNodeReference(segmentationNode.GetReferenceImageGeometryReferenceRole())

    @staticmethod
    def _segmentLabels(segmentationNode) -> List[Any]:
        """``(value, name, color)`` of every segment; values are the stored label values, made unique and within
        1..32767 (a label map is 16-bit signed: Slicer's export would clip larger values)."""
        from AttentionUNetSegmentLib.model.bundle import MAX_LABEL_VALUE, LabelInfo

        segments = segmentationNode.GetSegmentation()
        labels, used = [], set()
        for i in range(segments.GetNumberOfSegments()):
            segment = segments.GetNthSegment(i)
            value = segment.GetLabelValue()
            if not 0 < value <= MAX_LABEL_VALUE or value in used:
                value = max(used | {0}) + 1
            used.add(value)
            labels.append(LabelInfo(value, segment.GetName(), tuple(segment.GetColor())))
        return labels

    @staticmethod
    def _segmentSides(segmentationNode) -> List[Optional[str]]:
        """Each segment's side tag (``None`` where it has none), in segment order."""
        segments = segmentationNode.GetSegmentation()
        sides = []
        for i in range(segments.GetNumberOfSegments()):
            side = vtk.reference("")
            found = segments.GetNthSegment(i).GetTag(SIDE_TAG, side)
            sides.append(str(side) if found and str(side) in SIDES else None)
        return sides

    @staticmethod
    def _labelColorTable(labels: Sequence[Any], name: str):
        """A colour table whose index is the label value (names and colours of the segments)."""
        table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", slicer.mrmlScene.GenerateUniqueName(name))
        table.SetTypeToUser()
        table.SetNumberOfColors(max([label.value for label in labels] + [0]) + 1)
        table.SetColor(0, "Background", 0.0, 0.0, 0.0, 0.0)
        for label in labels:
            table.SetColor(label.value, label.name, *label.color, 1.0)
        return table

    def exportToLabelMapNode(self, segmentationNode, referenceVolume=None, labelmapNode=None):
        """All segments into a label map volume node with stable label values (each segment's label value) on the
        reference volume's grid, with a colour table of the segment names and colours."""
        if segmentationNode is None or segmentationNode.GetSegmentation().GetNumberOfSegments() == 0:
            raise AttentionUNetSegmentError(_("Nothing to export: choose a segmentation that has segments."))
        referenceVolume = referenceVolume or self._referenceVolume(segmentationNode)
        scene = slicer.mrmlScene
        labels = self._segmentLabels(segmentationNode)
        before = nodeIds(scene, "vtkMRMLColorTableNode")
        colors = self._labelColorTable(labels, f"{segmentationNode.GetName()} label colors")
        created = [colors]
        if labelmapNode is None:
            labelmapNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode",
                                                   scene.GenerateUniqueName(f"{segmentationNode.GetName()} labels"))
            created.append(labelmapNode)
        segmentIds = vtk.vtkStringArray()
        segmentationNode.GetSegmentation().GetSegmentIDs(segmentIds)
        extent = (slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY if referenceVolume is not None
                  else slicer.vtkSegmentation.EXTENT_UNION_OF_EFFECTIVE_SEGMENTS)
        exported = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentationNode, segmentIds, labelmapNode, referenceVolume, extent, colors)
        # the export also makes a "<segmentation>_ColorTable" copy; ours (with stable values) replaces it
        removeNodes(scene.GetNodeByID(i) for i in nodeIds(scene, "vtkMRMLColorTableNode") - before
                      if i != colors.GetID())
        if not exported:
            removeNodes(reversed(created))
            raise AttentionUNetSegmentError(_("Exporting the segments to a label map failed; see the log."))
        labelmapNode.CreateDefaultDisplayNodes()
        labelmapNode.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
        for name in segmentationNode.GetAttributeNames() or ():
            if name.startswith(ATTRIBUTE_PREFIX):
                labelmapNode.SetAttribute(name, segmentationNode.GetAttribute(name))
        return labelmapNode

    @staticmethod
    def _exportBase(segmentationNode) -> str:
        base = "".join(c if c.isalnum() or c in "-_." else "_" for c in segmentationNode.GetName()).strip("._")
        return base or "segmentation"

    def exportFileNames(self, segmentationNode, fileFormat: str, dicomSeg: bool = False) -> Dict[str, str]:
        """Names of the exported files by kind; ``sides`` (per-side totals) only for a segmentation with sides,
        ``dicom_segmentation`` only with ``dicomSeg``."""
        base = self._exportBase(segmentationNode)
        names = {"labelmap": f"{base}_labels.{fileFormat}", "segmentation": f"{base}.seg.nrrd",
                 "label_table": f"{base}_labels.csv",
                 "volumes": f"{base}_volumes.csv", "provenance": f"{base}_provenance.json"}
        if any(self._segmentSides(segmentationNode)):
            names["sides"] = f"{base}_sides.csv"
        if dicomSeg:
            names["dicom_segmentation"] = f"{base}_seg.dcm"
        return names

    def existingExportFiles(self, segmentationNode, outputDirectory, fileFormat: str = "nii.gz",
                            dicomSeg: bool = False) -> List[str]:
        names = self.exportFileNames(segmentationNode, fileFormat, dicomSeg).values()
        return [str(pathlib.Path(outputDirectory) / name) for name in names
                if (pathlib.Path(outputDirectory) / name).exists()]

    def exportForReport(self, segmentationNode, outputDirectory, referenceVolume=None, fileFormat: str = "nii.gz",
                        force: bool = False, dicomSeg: bool = False) -> Dict[str, str]:
        """Write a label map (NIfTI or NRRD, label value = segment label value), the segmentation (.seg.nrrd),
        a CSV label table (value, name, colour), per-segment volumes in mL (CSV; with a ``side`` column when the
        segments have sides, plus per-side totals and the asymmetry index in ``<name>_sides.csv``) and the
        provenance (JSON); with ``dicomSeg`` also a DICOM SEG (``exportDicomSeg``), renamed into place last and
        added to the DICOM database only once every file is in place. Existing files are kept unless ``force``;
        nothing partial is left behind. Returns the written paths by kind."""
        from AttentionUNetSegmentLib.errors import AttentionUNetError
        from AttentionUNetSegmentLib.fileio.atomic import atomic_output
        from AttentionUNetSegmentLib.fileio.imageio import check_written_image

        if fileFormat not in OUTPUT_FORMATS:
            raise AttentionUNetSegmentError(_("Unknown export format '{format}': use one of {formats}.").format(
                format=fileFormat, formats=OUTPUT_FORMATS))
        outputDirectory = pathlib.Path(outputDirectory)
        outputDirectory.mkdir(parents=True, exist_ok=True)
        existing = self.existingExportFiles(segmentationNode, outputDirectory, fileFormat, dicomSeg)
        if existing and not force:
            raise AttentionUNetSegmentError(_("These files exist already: {files}. Choose another folder or allow "
                                              "overwriting.").format(files=", ".join(existing)))
        labelmap = self.exportToLabelMapNode(segmentationNode, referenceVolume)
        colors = labelmap.GetDisplayNode().GetColorNode()
        names = self.exportFileNames(segmentationNode, fileFormat, dicomSeg)
        paths = {kind: outputDirectory / name for kind, name in names.items()}
        try:
            labels = self._segmentLabels(segmentationNode)
            sides = {label.value: side for label, side in zip(labels, self._segmentSides(segmentationNode)) if side}
            voxelMl = voxelVolumeMl(labelmap)
            rows = statisticsRows(labels, sides, voxelCounts(labelmap), voxelMl)
            writes = {
                "label_table": "value,name,color\n" + "".join(
                    f"{label.value},{_csv(label.name)},{_hex(label.color)}\n" for label in labels),
                "volumes": _volumesCsv(rows, bool(sides)),
                "provenance": json.dumps({
                    "segmentation": segmentationNode.GetName(),
                    "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "attributes": {name[len(ATTRIBUTE_PREFIX):]: segmentationNode.GetAttribute(name)
                                   for name in (segmentationNode.GetAttributeNames() or ())
                                   if name.startswith(ATTRIBUTE_PREFIX)},
                    "voxel_volume_ml": voxelMl,
                    "files": names}, indent=2) + "\n",
            }
            if sides:
                writes["sides"] = _sidesCsv(*sideTotals(rows))
            # All or nothing: every file goes to its atomic_output temporary; the stack renames them all at the
            # end, or removes them all when anything fails (the DICOM SEG included). The SEG is entered first, so
            # it is renamed last, and enters the DICOM database only after the stack has put every file in place.
            with contextlib.ExitStack() as stack:
                dicomPartial = stack.enter_context(atomic_output(paths["dicom_segmentation"], force)) \
                    if dicomSeg else None
                for node, kind in ((labelmap, "labelmap"), (segmentationNode, "segmentation")):
                    partial = stack.enter_context(atomic_output(paths[kind], force))
                    storage = node.CreateDefaultStorageNode()
                    storage.SetFileName(str(partial))
                    if not storage.WriteData(node):
                        raise OSError(f"cannot write {paths[kind].name}")
                    check_written_image(partial, paths[kind])  # ITK's NIfTI writer does not report a full disk
                for kind, text in writes.items():
                    stack.enter_context(atomic_output(paths[kind], force)).write_text(text, encoding="utf-8")
                if dicomSeg:
                    self.exportDicomSeg(segmentationNode, dicomPartial, referenceVolume, addToDatabase=False)
            if dicomSeg:
                slicer.dicomDatabase.insert(str(paths["dicom_segmentation"].resolve()))
        except AttentionUNetSegmentError:
            raise
        except (OSError, AttentionUNetError) as error:
            raise AttentionUNetSegmentError(_("Could not write the export in {folder} ({error}): check that the "
                                              "folder is writable and has free space.").format(
                                                  folder=outputDirectory, error=error))
        finally:
            removeNodes([labelmap, colors])
        return {kind: str(path) for kind, path in paths.items()}

    def reportFileName(self, segmentationNode) -> str:
        return f"{self._exportBase(segmentationNode)}_report.pdf"

    def exportReportPdf(self, segmentationNode, outputDirectory, referenceVolume=None, force: bool = False) -> str:
        """Write ``<name>_report.pdf`` into ``outputDirectory``: the engine's one-page report
        (``report.write_report_pdf``, the drawing of ``segment --report-pdf``) of the segments over the reference
        volume (the input), with the finest attention map of the run when the scene still has it; volumes from the
        segments as they are now, model, device and warnings from the run's provenance. Existing files are kept
        unless ``force``. Returns the path."""
        from AttentionUNetSegmentLib.errors import AttentionUNetError
        from AttentionUNetSegmentLib.fileio.imageio import read_image, read_label
        from AttentionUNetSegmentLib.inference.report import write_report_pdf

        referenceVolume = referenceVolume or self._referenceVolume(segmentationNode)
        if referenceVolume is None:
            raise AttentionUNetSegmentError(_("The report draws the segments over the volume they were made from, "
                                              "and this segmentation has no reference volume: segment the volume "
                                              "again, or set the segmentation's reference geometry to it."))
        path = pathlib.Path(outputDirectory) / self.reportFileName(segmentationNode)
        if path.exists() and not force:
            raise AttentionUNetSegmentError(
                _("{path} exists already. Choose another folder or allow overwriting.").format(path=path))
        self.ensureReportDependencies()
        labelmap = self.exportToLabelMapNode(segmentationNode, referenceVolume)
        colors = labelmap.GetDisplayNode().GetColorNode()
        workDir = workDirectory("report")
        try:
            labels = self._segmentLabels(segmentationNode)
            sides = {label.value: side for label, side in zip(labels, self._segmentSides(segmentationNode)) if side}
            rows = statisticsRows(labels, sides, voxelCounts(labelmap), voxelVolumeMl(labelmap))
            for row, label in zip(rows, labels):
                row["color"] = list(label.color)
            totals, asymmetry = sideTotals(rows)

            def attribute(key: str) -> str:
                return segmentationNode.GetAttribute(ATTRIBUTE_PREFIX + key) or ""

            try:
                warnings = [w for w in json.loads(attribute("Warnings") or "[]") if isinstance(w, str)]
            except ValueError:
                warnings = []
            report = {"segments": rows, "sides": totals or None, "asymmetry_index": asymmetry, "warnings": warnings,
                      "model": {"name": attribute("Model") or "unknown", "version": attribute("ModelVersion"),
                                "license": attribute("ModelLicense")},
                      "engine_version": attribute("EngineVersion") or ENGINE_VERSION,
                      "device": attribute("Device") or "unknown"}
            attention = segmentationNode.GetNodeReference(ATTENTION_ROLE)  # the first is gate 0, the finest
            files = {name: self.writeVolumeForEngine(node, workDir / name) for name, node in
                     (("image", referenceVolume), ("labels", labelmap), ("attention", attention)) if node is not None}
            write_report_pdf(read_image(files["image"]), read_label(files["labels"]),
                             read_label(files["attention"]) if "attention" in files else None, report, path,
                             referenceVolume.GetName(), force=force)
        except AttentionUNetSegmentError:
            raise
        except (AttentionUNetError, OSError) as error:
            raise AttentionUNetSegmentError(_("Could not write the report {name} in {folder}: {error}").format(
                name=path.name, folder=outputDirectory, error=error))
        finally:
            shutil.rmtree(workDir, ignore_errors=True)
            removeNodes([labelmap, colors])
        return str(path)

    def hasDicomSource(self, segmentationNode) -> bool:
        """Whether the segmentation's reference volume came from the DICOM database (its instance UIDs are
        known), so a DICOM SEG can reference its series."""
        reference = self._referenceVolume(segmentationNode) if segmentationNode is not None else None
        return bool(reference is not None and (reference.GetAttribute(DICOM_INSTANCE_UIDS) or "").split())

    @staticmethod
    def dicomSourceFiles(volumeNode) -> List[str]:
        """The files of the DICOM images ``volumeNode`` was loaded from (``slicer.dicomDatabase.fileForInstance``
        of each of its ``DICOM.instanceUIDs``)."""
        name = volumeNode.GetName() if volumeNode is not None else _("the reference volume")
        uids = (volumeNode.GetAttribute(DICOM_INSTANCE_UIDS) or "").split() if volumeNode is not None else []
        if not uids:
            raise AttentionUNetSegmentError(
                _("'{name}' was not loaded from the DICOM database, so a DICOM SEG cannot reference it: load the "
                  "series with the DICOM module, segment that volume, then export.").format(name=name))
        database = getattr(slicer, "dicomDatabase", None)
        if database is None or not database.isOpen:
            raise AttentionUNetSegmentError(_("The DICOM database is not open: open it in the DICOM module, then "
                                              "export again."))
        files = [database.fileForInstance(uid) for uid in uids]
        missing = sum(1 for path in files if not path or not os.path.isfile(path))
        if missing:
            raise AttentionUNetSegmentError(
                _("The DICOM database has no file for {missing} of the {count} images of '{name}' (removed or "
                  "moved): import the series into the DICOM database again, load it, then export.").format(
                      missing=missing, count=len(uids), name=name))
        return files

    def exportDicomSeg(self, segmentationNode, outputPath, referenceVolume=None, force: bool = False,
                       addToDatabase: bool = True) -> str:
        """Write ``outputPath`` (.dcm), a DICOM Segmentation of every segment (names, colours, terminology, label
        values as segment numbers) referencing the DICOM series of the reference volume, and add it to the DICOM
        database. Written by the engine in its own process (``dicom-seg``: highdicom never loads into Slicer);
        highdicom and pydicom are installed on first use. Returns the path."""
        referenceVolume = referenceVolume or self._referenceVolume(segmentationNode)
        files = self.dicomSourceFiles(referenceVolume)
        self.ensureDicomSegDependencies()
        work = workDirectory("SEG")
        labelmap = self.exportToLabelMapNode(segmentationNode, referenceVolume)
        colors = labelmap.GetDisplayNode().GetColorNode()
        try:
            labelsPath = work / "labels.nrrd"
            storage = labelmap.CreateDefaultStorageNode()
            storage.SetFileName(str(labelsPath))
            if not storage.WriteData(labelmap):
                raise AttentionUNetSegmentError(
                    _("Could not write the label map to {folder}: check free disk space.").format(folder=work))
            segments = segmentationNode.GetSegmentation()
            entries = []
            for index, label in enumerate(self._segmentLabels(segmentationNode)):
                segment = segments.GetNthSegment(index)
                terminology = vtk.reference("")
                found = segment.GetTag(segment.GetTerminologyEntryTagName(), terminology)
                entries.append({"value": label.value, "name": label.name, "color": list(label.color),
                                "terminology": str(terminology) if found else ""})
            (work / "segments.json").write_text(json.dumps(entries), encoding="utf-8")
            (work / "sources.txt").write_text("".join(f"{path}\n" for path in files), encoding="utf-8")
            algorithm = (segmentationNode.GetAttribute(ATTRIBUTE_PREFIX + "Model") or "AttentionUNet",
                         segmentationNode.GetAttribute(ATTRIBUTE_PREFIX + "ModelVersion") or ENGINE_VERSION)
            command = buildDicomSegCommand(str(labelsPath), str(work / "sources.txt"), str(work / "segments.json"),
                                           str(outputPath), algorithm, python=self.pythonExecutable(), force=force)
            outcome = self.engineProcessFactory(command, env=self.engineEnvironment(), cwd=str(work)).start().wait()
        finally:
            removeNodes([labelmap, colors])
            shutil.rmtree(work, ignore_errors=True)
        if not outcome.ok:
            raise AttentionUNetSegmentError(_("Writing the DICOM SEG failed: {error}").format(error=outcome.error))
        written = str(outcome.outputs.get("dicom_segmentation") or outputPath)
        if addToDatabase:
            slicer.dicomDatabase.insert(written)
        return written


def _volumesCsv(rows: Sequence[Dict[str, Any]], withSides: bool) -> str:
    """``value,name[,side],voxels,volume_ml`` per segment (the side column only for a located run)."""
    return ("value,name,side,voxels,volume_ml\n" if withSides else "value,name,voxels,volume_ml\n") + "".join(
        f"{row['value']},{_csv(row['name'])}," + (f"{row['side'] or ''}," if withSides else "")
        + f"{row['voxels']},{row['volume_ml']:.6f}\n" for row in rows)


def _sidesCsv(sides: Dict[str, Dict[str, Any]], asymmetry: Optional[float]) -> str:
    """One row: voxels and mL per side and the asymmetry index (L - R) / ((L + R) / 2) (empty when undefined),
    so the files of several subjects concatenate into one table."""
    empty = {"voxels": 0, "volume_ml": 0.0}
    cells = []
    for side in SIDES:
        total = sides.get(side, empty)
        cells += [str(total["voxels"]), f"{total['volume_ml']:.6f}"]
    cells.append("" if asymmetry is None else f"{asymmetry:.6f}")
    return ("left_voxels,left_volume_ml,right_voxels,right_volume_ml,asymmetry_index\n" + ",".join(cells) + "\n")


def _csv(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def _hex(color: Sequence[float]) -> str:
    return "#" + "".join(f"{int(round(255 * min(max(c, 0.0), 1.0))):02x}" for c in color[:3])
