"""AttentionUNetSegment: 3D Attention U-Net segmentation with attention maps, as a 3D Slicer module.

The network runs out of process through the engine's command line (``PythonSlicer -m AttentionUNetSegmentLib
segment ... --progress json``), so the GUI stays responsive and Cancel is a clean process termination. Results are
read back into the scene on the main thread only when the engine has finished: a cancelled or failed run leaves the
scene as it was. Torch is never imported at module scope.
"""

import datetime
import hashlib
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Dict, List, Optional, Sequence

import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from AttentionUNetSegmentLib import __version__ as ENGINE_VERSION
from AttentionUNetSegmentLib.runner import (
    EngineProcess,
    EtaEstimator,
    Progress,
    build_dicom_seg_command,
    build_segment_command,
    format_duration,
)

#: The engine's default model (``bundle.DEFAULT_MODEL``; the bundle module is imported only when needed because it
#: loads SimpleITK, which would slow down Slicer's start-up).
DEFAULT_MODEL = "hippocampus"
MODULE_DIR = pathlib.Path(__file__).resolve().parent
RESOURCES_DIR = MODULE_DIR / "Resources"
SAMPLE_DATA_DIR = RESOURCES_DIR / "SampleData"
REQUIREMENTS_FILE = RESOURCES_DIR / "requirements.txt"
#: What Export > DICOM SEG needs besides (highdicom, pydicom: the engine's [dicom] extra), installed on first use.
DICOM_REQUIREMENTS_FILE = RESOURCES_DIR / "requirements-dicom.txt"
#: Attribute of a volume loaded from the DICOM database: its SOP Instance UIDs, space-separated
#: (DICOMScalarVolumePlugin); a DICOM SEG of its segmentation references these instances.
DICOM_INSTANCE_UIDS = "DICOM.instanceUIDs"
#: What Export > Report (PDF) needs besides the engine's requirements (installed on its first use).
REPORT_REQUIREMENTS_FILE = RESOURCES_DIR / "requirements-report.txt"
#: Torch comes from the PyTorch extension (PyTorchUtils) with the right CUDA build, never from pip directly;
#: 2.3 is the first with the device-generic torch.amp.GradScaler that training uses.
TORCH_REQUIREMENT = ">=2.3"

#: Node attributes carrying provenance (model, version, sha256, device, parameters, date).
ATTRIBUTE_PREFIX = "AttentionUNet."
#: Node reference roles from a result segmentation to its attention / probability volumes and to the Markups ROI
#: boxes its run located the structure in (one per side).
ATTENTION_ROLE = "AttentionUNetAttention"
PROBABILITY_ROLE = "AttentionUNetProbability"
LOCALIZATION_BOX_ROLE = "AttentionUNetLocalizationBox"
#: Segment tag (and box attribute) naming the side of a located run's segment: one of SIDES.
SIDE_TAG = ATTRIBUTE_PREFIX + "Side"
SIDES = ("left", "right")
#: ``AttentionUNet.Role`` of the Markups ROI boxes a located run used.
BOX_ROLE = "localization box"
ATTENTION_COLOR_NODE_ID = "vtkMRMLColorTableNodeFileInferno.txt"
#: Attention below this value is drawn transparent, so the overlay shows only where the network looked.
ATTENTION_DISPLAY_THRESHOLD = 0.05
ATTENTION_OPACITY = 0.4
#: Highest sliding-window overlap the panel offers.
MAX_OVERLAP = 0.9
#: The engine writes NRRD for the scene: exact direction cosines (NIfTI stores them as float32 quaternions).
ENGINE_FORMAT = "nrrd"
ENGINE_INPUT_STEM = "input"
EXPORT_FORMATS = ("nii.gz", "nrrd")
DEVICES = ("auto", "cpu", "cuda")
POLL_INTERVAL_MS = 100


class AttentionUNetSegmentError(Exception):
    """A problem the user can act on (what was wrong and how to fix it); shown as is in the panel."""


#
# AttentionUNetSegment
#


class AttentionUNetSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Attention U-Net Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["AttentionUNet contributors"]
        self.parent.helpText = (
            "Segment a 3D volume with a 3D Attention U-Net and show where the network looked (attention maps). "
            "Choose the input volume and a model, then click Apply. See the "
            "<a href='https://github.com/AttentionUNet/SlicerAttentionUNet#using-the-3d-slicer-module'>"
            "user guide</a>.")
        self.parent.acknowledgementText = (
            "Attention U-Net: Oktay et al., 'Attention U-Net: Learning Where to Look for the Pancreas', MIDL 2018. "
            "The bundled hippocampus model was trained on the Medical Segmentation Decathlon Task04 (CC-BY-SA 4.0) and "
            "on crops of five NiChart_Project demo heads (CBICA, University of Pennsylvania).")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Register the bundled sample volume with the Sample Data module."""
    import SampleData

    samples = sorted(SAMPLE_DATA_DIR.glob("*.nii.gz"))
    if not samples:
        return
    sample = samples[0]
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="AttentionUNet",
        sampleName="AttentionUNetHippocampus",
        thumbnailFileName=str(RESOURCES_DIR / "Icons" / "AttentionUNetSegment.png"),
        uris=sample.as_uri(),
        fileNames=sample.name,
        checksums=f"SHA256:{hashlib.sha256(sample.read_bytes()).hexdigest()}",
        nodeNames="AttentionUNetHippocampus",
    )


#
# Parameters
#


@parameterNodeWrapper
class AttentionUNetSegmentParameterNode:
    """Panel state, saved with the scene (``SlicerParameterName`` in the .ui binds each widget to a field)."""

    inputVolume: vtkMRMLScalarVolumeNode
    modelName: str = DEFAULT_MODEL
    roi: vtkMRMLMarkupsROINode
    locateAutomatically: bool = True
    outputSegmentation: vtkMRMLSegmentationNode
    attentionMaps: bool = True
    probabilityMaps: bool = False
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    overlap: Annotated[float, WithinRange(0.0, MAX_OVERLAP)] = 0.5
    testTimeAugmentation: bool = False
    largestComponent: bool = False
    exportDirectory: pathlib.Path
    exportFormat: Annotated[str, Choice(list(EXPORT_FORMATS))] = "nii.gz"
    exportDicomSeg: bool = False
    batchAllVolumes: bool = False


#
# AttentionUNetSegmentWidget
#


class AttentionUNetSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: binds the .ui to the parameter node and drives the Logic (no processing here)."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._lastResult = None
        self._pollTimer = None
        self._models: List["ModelBundle"] = []
        self._domainKey = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AttentionUNetSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = AttentionUNetSegmentLogic()
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPollJob)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.batchApplyButton.connect("clicked(bool)", self.onBatchApplyButton)
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)
        self.ui.exportLabelmapButton.connect("clicked(bool)", self.onExportLabelmapButton)
        self.ui.exportReportButton.connect("clicked(bool)", self.onExportReportButton)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.populateModels)
        self.ui.advancedCollapsibleButton.connect("contentsCollapsed(bool)", self.onAdvancedCollapsed)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputChanged)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onOutputChanged)
        self.ui.progressBar.setVisible(False)

        self.populateModels()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._job is not None and not self._job.done:
            self._job.cancel()
        if self._pollTimer is not None:
            self._pollTimer.stop()
        self.removeObservers()
        self._disconnectParameterNode()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self._disconnectParameterNode()

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None and not self._job.done:
            self._job.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = self.logic.currentVolume()

    def _disconnectParameterNode(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self._parameterNodeGuiTag = None

    def setParameterNode(self, inputParameterNode: Optional[AttentionUNetSegmentParameterNode]) -> None:
        self._disconnectParameterNode()
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self._selectModelInCombo(self._parameterNode.modelName)
            self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        running = self._job is not None and not self._job.done
        node = self._parameterNode
        canRun = bool(node and node.inputVolume and self._models)
        self.ui.applyButton.text = "Cancel" if running else "Apply"
        self.ui.applyButton.enabled = running or canRun
        self.ui.applyButton.toolTip = ("Stop the running segmentation; the scene is left as it was" if running else
                                       "Segment the input volume" if canRun else
                                       "Select an input volume and a model first")
        self.ui.batchApplyButton.enabled = not running and bool(self._models)
        for widget in (self.ui.inputsCollapsibleButton, self.ui.outputsCollapsibleButton,
                       self.ui.advancedCollapsibleButton, self.ui.exportCollapsibleButton):
            widget.enabled = not running
        segmentation = node.outputSegmentation if node else None
        self.ui.exportButton.enabled = bool(segmentation)
        self.ui.exportLabelmapButton.enabled = bool(segmentation)
        canDicomSeg = bool(segmentation) and self.logic.hasDicomSource(segmentation)
        self.ui.exportDicomSegCheckBox.enabled = canDicomSeg
        self.ui.exportDicomSegCheckBox.toolTip = (
            "Also write a DICOM Segmentation object that references the DICOM series and add it to the DICOM "
            "database" if canDicomSeg else "Only for a segmentation of a volume loaded from the DICOM database")
        self.ui.exportReportButton.enabled = bool(segmentation)
        self.ui.show3DButton.setSegmentationNode(segmentation)
        bundle = self._currentBundle()
        hasLocalizer = bool(bundle and self.logic.hasLocalizer(bundle))
        self.ui.locateAutomaticallyCheckBox.visible = hasLocalizer
        self.ui.locateAutomaticallyCheckBox.enabled = hasLocalizer and not (node and node.roi)
        # The engine refuses --tta for a model that records no mirror axes: do not offer it.
        canMirror = bool(bundle and bundle.mirror_axes)
        self.ui.ttaCheckBox.enabled = canMirror
        self.ui.ttaCheckBox.toolTip = ("" if canMirror or not bundle else
                                       "This model records no mirror axes from its training, so it cannot be mirrored")
        if not running:
            self._updateDomainStatus(node, bundle)

    def _currentBundle(self) -> Optional["ModelBundle"]:
        name = self._parameterNode.modelName if self._parameterNode else None
        return next((bundle for bundle in self._models if bundle.name == name), None)

    def _updateDomainStatus(self, node, bundle) -> None:
        """Before Apply, say in the status when the input is far outside the model's training domain. Only when
        the input, model, Region or localisation choice changed: the status of a finished run stays until then."""
        volume = node.inputVolume if node else None
        key = (volume.GetID() if volume else None, bundle.name if bundle else None,
               node.roi.GetID() if node and node.roi else None, bool(node and node.locateAutomatically))
        if key == self._domainKey:
            return
        self._domainKey = key
        if volume is None or bundle is None:
            return
        lines = []
        try:
            if self.logic.willLocalize(volume, bundle, node.roi, node.locateAutomatically):
                lines.append(f"'{volume.GetName()}' is much larger than the model's field of view: Locate "
                             "automatically will find the structure and segment each side in its own box.")
            lines.append(warningText(self.logic.domainWarnings(volume, bundle, node.roi, node.locateAutomatically)))
        except AttentionUNetSegmentError as error:
            lines.append(warningText([str(error)]))
        self.ui.statusLabel.text = "\n".join(line for line in lines if line)

    # Models

    def populateModels(self) -> None:
        self._models, problems = self.logic.availableModels()
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for bundle in self._models:
            combo.addItem(f"{bundle.name} ({bundle.version})", bundle.name)
        combo.blockSignals(wasBlocked)
        for path, reason in problems:
            self.appendLog(f"Model in {path} skipped: {reason}")
        if not self._models:
            self.ui.modelDescriptionLabel.text = (
                "No model is installed. Reinstall the AttentionUNet extension, or add a folder of model bundles "
                "to the ATTENTION_UNET_MODELS environment variable and click Refresh.")
        self._selectModelInCombo(self._parameterNode.modelName if self._parameterNode else DEFAULT_MODEL)

    def _selectModelInCombo(self, name: str) -> None:
        index = self.ui.modelComboBox.findData(name)
        self.ui.modelComboBox.currentIndex = max(index, 0)
        self.onModelChanged(self.ui.modelComboBox.currentIndex)

    def onModelChanged(self, index: int) -> None:
        if not (0 <= index < len(self._models)):
            return
        bundle = self._models[index]
        self.ui.modelDescriptionLabel.text = self.logic.describeModel(bundle)
        if self._parameterNode and self._parameterNode.modelName != bundle.name:
            with slicer.util.NodeModify(self._parameterNode):
                self._parameterNode.modelName = bundle.name
                # The model's own default, within the slider's range (a bundle may declare any overlap below 1).
                self._parameterNode.overlap = min(bundle.overlap, MAX_OVERLAP)
                if not bundle.mirror_axes:
                    self._parameterNode.testTimeAugmentation = False

    def onAdvancedCollapsed(self, collapsed: bool) -> None:
        if not collapsed and not self.ui.deviceInfoLabel.text:
            with slicer.util.WaitCursor():
                self.ui.deviceInfoLabel.text = self.logic.detectComputeDevice()

    def onInputChanged(self, volume) -> None:
        """After a run its result stays selected as the output (for export); a new input must not make the next
        Apply replace another volume's segmentation, so an output made for another volume is deselected."""
        node = self._parameterNode
        if node and node.outputSegmentation and volume and \
                not self.logic.segmentationBelongsTo(node.outputSegmentation, volume):
            node.outputSegmentation = None

    def onOutputChanged(self, node) -> None:
        self.ui.show3DButton.setSegmentationNode(node)

    # Running

    def _options(self) -> "SegmentationOptions":
        node = self._parameterNode
        return SegmentationOptions(
            model=node.modelName, roi=node.roi, locateAutomatically=node.locateAutomatically,
            attentionMaps=node.attentionMaps,
            probabilityMaps=node.probabilityMaps, device=node.device, overlap=node.overlap,
            testTimeAugmentation=node.testTimeAugmentation, largestComponent=node.largestComponent)

    def onApplyButton(self) -> None:
        if self._job is not None and not self._job.done:
            self._job.cancel()
            return
        self.ui.logTextEdit.clear()
        with slicer.util.tryWithErrorDisplay("Segmentation could not start.", waitCursor=True):
            self._startJob(self.logic.startSegmentation(
                self._parameterNode.inputVolume, self._parameterNode.outputSegmentation, options=self._options(),
                progressCallback=self.onProgress, logCallback=self.appendLog))

    def onBatchApplyButton(self) -> None:
        volumes = (self.logic.allInputVolumes() if self._parameterNode.batchAllVolumes
                   else list(self.ui.batchVolumesSelector.checkedNodes()))
        if not volumes:
            slicer.util.errorDisplay("Check the volumes to segment in the Batch section, or tick 'All volumes'.")
            return
        self.ui.logTextEdit.clear()
        with slicer.util.tryWithErrorDisplay("Batch segmentation could not start.", waitCursor=True):
            self._startJob(self.logic.startBatch(volumes, options=self._options(),
                                                 progressCallback=self.onProgress, logCallback=self.appendLog))

    def _startJob(self, job) -> None:
        self._job = job
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = "Starting..."
        self._pollTimer.start()
        self.updateGUIFromParameterNode()

    def onPollJob(self) -> None:
        if self._job is None:
            self._pollTimer.stop()
            return
        self._job.poll()
        if not self._job.done:
            return
        self._pollTimer.stop()
        job, self._job = self._job, None
        self.ui.progressBar.setVisible(False)
        if job.cancelled and isinstance(job, BatchJob):
            self.ui.statusLabel.text = f"Batch cancelled ({job.summary}); finished volumes keep their results."
            self.logic.showTable(job.summaryTable)
        elif job.cancelled:
            self.ui.statusLabel.text = "Cancelled; the scene was left unchanged."
        elif job.error:
            self.ui.statusLabel.text = "Failed (see the log)."
            slicer.util.errorDisplay(job.error, windowTitle="Attention U-Net segmentation failed")
        else:
            self.onJobSucceeded(job)
        self.updateGUIFromParameterNode()

    def onJobSucceeded(self, job) -> None:
        if isinstance(job, BatchJob):
            self.ui.statusLabel.text = f"Batch finished: {job.summary}"
            self.logic.showTable(job.summaryTable)
            return
        result = job.result
        self._lastResult = result
        self._parameterNode.outputSegmentation = result.segmentation
        self.logic.showResults(result)
        self.ui.statusLabel.text = "\n".join(
            line for line in (f"Done in {format_duration(job.seconds)} on {result.device}.",
                              warningText(result.warnings)) if line)

    def onProgress(self, fraction: float, message: str, etaSeconds: Optional[float]) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        eta = format_duration(etaSeconds)
        self.ui.statusLabel.text = f"{message} ({eta} left)" if eta else message

    def appendLog(self, line: str) -> None:
        self.ui.logTextEdit.appendPlainText(line)

    # Export

    def _exportFolder(self) -> str:
        """The export folder, or "" after telling the user what is missing (the folder or the segmentation)."""
        node = self._parameterNode
        directory = str(node.exportDirectory) if str(node.exportDirectory) not in ("", ".") else ""
        if not directory:
            slicer.util.errorDisplay("Choose the folder to export to (Export for reports > Folder).")
            return ""
        if node.outputSegmentation is None:
            slicer.util.errorDisplay("Choose the segmentation to export (Outputs > Segmentation).")
            return ""
        return directory

    def onExportButton(self) -> None:
        node, directory = self._parameterNode, self._exportFolder()
        if not directory:
            return
        existing = None
        with slicer.util.tryWithErrorDisplay("Export failed."):
            dicomSeg = node.exportDicomSeg and self.logic.hasDicomSource(node.outputSegmentation)
            existing = self.logic.existingExportFiles(node.outputSegmentation, directory, node.exportFormat, dicomSeg)
        if existing is None:  # the error was shown
            return
        if existing and not slicer.util.confirmYesNoDisplay(
                "These files exist already:\n" + "\n".join(existing) + "\n\nReplace them?"):
            self.ui.statusLabel.text = "Export cancelled; the existing files were kept."
            return
        with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
            files = self.logic.exportForReport(node.outputSegmentation, directory, fileFormat=node.exportFormat,
                                               force=bool(existing), dicomSeg=dicomSeg)
            self.appendLog("Exported: " + ", ".join(files.values()))
            self.ui.statusLabel.text = f"Exported {len(files)} files to {directory}"

    def onExportReportButton(self) -> None:
        node, directory = self._parameterNode, self._exportFolder()
        if not directory:
            return
        existing = pathlib.Path(directory) / self.logic.reportFileName(node.outputSegmentation)
        if existing.exists() and not slicer.util.confirmYesNoDisplay(f"{existing} exists already.\n\nReplace it?"):
            self.ui.statusLabel.text = "Export cancelled; the existing report was kept."
            return
        with slicer.util.tryWithErrorDisplay("Writing the PDF report failed.", waitCursor=True):
            path = self.logic.exportReportPdf(node.outputSegmentation, directory, force=existing.exists())
            self.appendLog(f"Report: {path}")
            self.ui.statusLabel.text = f"Wrote the report {path}"

    def onExportLabelmapButton(self) -> None:
        with slicer.util.tryWithErrorDisplay("Export to a label map failed.", waitCursor=True):
            labelmap = self.logic.exportToLabelMapNode(self._parameterNode.outputSegmentation)
            self.ui.statusLabel.text = f"Created label map '{labelmap.GetName()}'."


#
# Logic
#


@dataclass
class SegmentationOptions:
    """How to segment: model (installed name or bundle folder), optional ROI node and engine settings.
    ``locateAutomatically``: let a model with a localiser find the structure in a larger volume (``--localize
    auto``); an ROI always wins over it."""

    model: Optional[str] = None
    roi: Any = None
    locateAutomatically: bool = True
    attentionMaps: bool = True
    probabilityMaps: bool = False
    device: str = "auto"
    overlap: Optional[float] = None
    testTimeAugmentation: bool = False
    largestComponent: bool = False

    def parameters(self) -> Dict[str, Any]:
        """JSON-able record of the settings (provenance)."""
        return {"device": self.device, "overlap": self.overlap, "tta": self.testTimeAugmentation,
                "largest_component": self.largestComponent, "attention": self.attentionMaps,
                "probabilities": self.probabilityMaps, "roi": self.roi.GetName() if self.roi else None,
                "locate_automatically": self.locateAutomatically}


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


class SegmentationJob:
    """One engine run for one volume. ``poll()`` on the main thread; results enter the scene only on success."""

    def __init__(self, logic: "AttentionUNetSegmentLogic", inputVolume, outputSegmentation,
                 options: SegmentationOptions, bundle: "ModelBundle",
                 progressCallback: Optional[Callable[[float, str, Optional[float]], None]] = None,
                 logCallback: Optional[Callable[[str], None]] = None) -> None:
        self.logic = logic
        self.inputVolume = inputVolume
        self.outputSegmentation = outputSegmentation
        self.options = options
        self.bundle = bundle
        self.progressCallback = progressCallback
        self.logCallback = logCallback
        self.result: Optional[SegmentationResult] = None
        self.error: Optional[str] = None
        self.cancelled = False
        self.done = False
        self.seconds = 0.0
        self._workDir: Optional[pathlib.Path] = None
        self._engine: Optional[EngineProcess] = None

    def engineCommand(self, inputPath: pathlib.Path, outputDir: pathlib.Path) -> List[str]:
        """The engine's command line for this run. An ROI is passed as ``--roi`` (the engine then never
        localises); otherwise a model with a localiser gets ``--localize auto`` or ``off``."""
        options = self.options
        roiBox = self.logic.roiBoxInVolumeCoordinates(options.roi, self.inputVolume) if options.roi else None
        localize = None
        if roiBox is None and self.logic.hasLocalizer(self.bundle):
            localize = "auto" if options.locateAutomatically else "off"
        return build_segment_command(
            [str(inputPath)], str(outputDir), python=self.logic.pythonExecutable(), model=str(self.bundle.path),
            device=options.device, overlap=options.overlap, tta=options.testTimeAugmentation, roi=roiBox,
            localize=localize, attention=options.attentionMaps, probabilities=options.probabilityMaps,
            largest_component=options.largestComponent, output_format=ENGINE_FORMAT)

    def start(self) -> "SegmentationJob":
        self._workDir = pathlib.Path(tempfile.mkdtemp(prefix="AttentionUNet-"))
        try:
            inputPath = self.logic.writeVolumeForEngine(self.inputVolume, self._workDir / "in")
            command = self.engineCommand(inputPath, self._workDir / "out")
            self._log(f"Segmenting '{self.inputVolume.GetName()}' with {self.bundle.name} {self.bundle.version}")
            self._engine = EngineProcess(command, env=self.logic.engineEnvironment(), cwd=str(self._workDir),
                                         on_progress=self._onProgress, on_log=self._log).start()
        except Exception:
            self._cleanup()
            raise
        return self

    def _log(self, line: str) -> None:
        if self.logCallback is not None:
            self.logCallback(line)

    def _onProgress(self, progress: Progress) -> None:
        if self.progressCallback is not None:
            self.progressCallback(progress.fraction, progress.message or progress.stage, progress.eta_seconds)

    def poll(self) -> bool:
        """Handle engine output; when it has ended, load the results (main thread). ``True`` while running."""
        if self.done:
            return False
        if self._engine.poll():
            return True
        outcome = self._engine.result
        self.seconds = outcome.seconds
        try:
            if outcome.cancelled:
                self.cancelled = True
                self._log("Cancelled: nothing was added to the scene.")
            elif not outcome.ok:
                self.error = outcome.error
                self._log(f"Failed: {outcome.error}")
            else:
                self.result = self.logic.importResults(self, outcome.outputs.get(ENGINE_INPUT_STEM, {}), outcome.log)
                self._log("Results added to the scene.")
        except Exception as error:  # whatever goes wrong, the job ends with a message, never silently
            self.error = str(error) if isinstance(error, AttentionUNetSegmentError) else \
                f"Loading the results into the scene failed: {error}"
            self._log(f"Failed: {self.error}")
        finally:
            self._cleanup()
            self.done = True
        return False

    def wait(self) -> "SegmentationJob":
        while self.poll():
            time.sleep(POLL_INTERVAL_MS / 1000.0)
            if hasattr(slicer, "app"):
                slicer.app.processEvents()
        return self

    def cancel(self) -> None:
        """Stop the engine now; nothing is added to the scene."""
        if not self.done and self._engine is not None:
            self._engine.cancel()
            while self.poll():
                time.sleep(0.01)

    def _cleanup(self) -> None:
        if self._workDir is not None:
            shutil.rmtree(self._workDir, ignore_errors=True)
            self._workDir = None


class BatchJob:
    """Segments several volumes one after the other (one result per volume) and fills a summary table: one row
    per volume with the columns of the engine's ``summary.csv`` (``outputs.summary_columns``)."""

    def __init__(self, logic: "AttentionUNetSegmentLogic", volumes: Sequence[Any], options: SegmentationOptions,
                 progressCallback=None, logCallback=None) -> None:
        self.logic = logic
        self.volumes = list(volumes)
        self.options = options
        self.progressCallback = progressCallback
        self.logCallback = logCallback
        self.results: List[SegmentationResult] = []
        self.rows: List[Dict[str, Any]] = []
        self.summaryTable = None
        self.error: Optional[str] = None
        self.cancelled = False
        self.done = False
        self.seconds = 0.0
        self._index = -1
        self._current: Optional[SegmentationJob] = None
        self._started = time.monotonic()
        self._eta = EtaEstimator()  # over the whole batch: each volume's own ETA covers only that volume
        self.model = (options.model or DEFAULT_MODEL, "")  # (name, version) for the rows of volumes not run

    @property
    def summary(self) -> str:
        failed = sum(1 for row in self.rows if row["status"] != "done")
        warned = sum(1 for result in self.results if result.warnings)
        return (f"{len(self.results)} segmented, {failed} failed or skipped, of {len(self.volumes)} volumes"
                + (f"; {warned} with warnings (see the table)" if warned else ""))

    def start(self) -> "BatchJob":
        try:
            bundle = self.logic.resolveModel(self.options.model)
            self.model = (bundle.name, bundle.version)
        except AttentionUNetSegmentError:  # each volume's row then says why
            pass
        self._next()
        return self

    def _log(self, line: str) -> None:
        if self.logCallback is not None:
            self.logCallback(line)

    def _progress(self, fraction: float, message: str, eta: Optional[float]) -> None:
        if self.progressCallback is not None:
            count = len(self.volumes)
            overall = (self._index + fraction) / count
            self.progressCallback(overall, f"[{self._index + 1}/{count}] {message}", self._eta.update(overall))

    def _next(self) -> None:
        while True:
            self._index += 1
            if self._index >= len(self.volumes):
                self._finish()
                return
            volume = self.volumes[self._index]
            if self.cancelled:
                self.rows.append(self.logic.summaryRow(volume, "not run", self.model, "the batch was cancelled"))
                continue
            try:
                self._current = self.logic.startSegmentation(volume, None, options=self.options,
                                                             progressCallback=self._progress,
                                                             logCallback=self._log)
                return
            except AttentionUNetSegmentError as error:
                self._log(f"Skipped '{volume.GetName()}': {error}")
                self.rows.append(self.logic.summaryRow(volume, "skipped", self.model, str(error)))

    def poll(self) -> bool:
        if self.done:
            return False
        if self._current is not None and self._current.poll():
            return True
        job, self._current = self._current, None
        if job is not None:
            if job.result is not None:
                self.results.append(job.result)
                self.rows.append(self.logic.resultSummaryRow(job.result))
            else:
                status = "cancelled" if job.cancelled else "failed"
                self.rows.append(self.logic.summaryRow(job.inputVolume, status, (job.bundle.name, job.bundle.version),
                                                       job.error or ""))
        self._next()
        return not self.done

    def wait(self) -> "BatchJob":
        while self.poll():
            time.sleep(POLL_INTERVAL_MS / 1000.0)
        return self

    def cancel(self) -> None:
        self.cancelled = True
        if self._current is not None:
            self._current.cancel()
        self.poll()

    def _finish(self) -> None:
        self.summaryTable = self.logic.createSummaryTable(self.rows, self.results)
        self.seconds = time.monotonic() - self._started
        self.done = True
        self._log(f"Batch finished: {self.summary}")


class AttentionUNetSegmentLogic(ScriptedLoadableModuleLogic):
    """Everything the module does, usable without the GUI (Python console, batch scripts, tests).

    ``process(inputVolume, outputSegmentation, ..., waitForCompletion=True)`` segments one volume;
    ``processBatch`` several; ``exportForReport`` writes files for reports.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        #: Python that runs the engine; ``None``: Slicer's ``PythonSlicer`` (or this interpreter outside Slicer).
        self.enginePython: Optional[str] = None
        #: Where installed models are looked for; ``None``: ``$ATTENTION_UNET_MODELS`` then the bundled models.
        self.modelSearchPath: Optional[List[str]] = None

    def getParameterNode(self):
        return AttentionUNetSegmentParameterNode(super().getParameterNode())

    # Environment

    def pythonExecutable(self) -> str:
        return self.enginePython or shutil.which("PythonSlicer") or sys.executable

    def engineEnvironment(self) -> Dict[str, str]:
        """The engine's environment: this one, with the module folder first on ``PYTHONPATH``."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(MODULE_DIR), env.get("PYTHONPATH", "")) if p)
        return env

    def ensureDependencies(self) -> None:
        """Install what the engine needs, only when first needed: torch through the PyTorch extension, the rest
        with ``slicer.packaging.pip_ensure`` (Slicer 5.12+) or a confirmed ``slicer.util.pip_install`` (older)."""
        self._ensureTorch()
        self._ensureRequirements(REQUIREMENTS_FILE, "The segmentation")

    def _ensureRequirements(self, requirementsFile: pathlib.Path, purpose: str) -> None:
        """Install the missing packages of ``requirementsFile`` (asking first); ``purpose`` names what needs them
        in messages."""
        requirements = _read_requirements(requirementsFile)
        missing = [req for req in requirements if not _requirement_satisfied(req)]
        if not missing:
            return
        try:
            import slicer.packaging as packaging
        except ImportError:  # Slicer 5.8/5.10
            packaging = None
        try:
            if packaging is not None:
                # Requirement objects from Slicer's own loader: every pip_ensure release accepts them.
                packaging.pip_ensure(packaging.load_requirements(str(requirementsFile)), requester="AttentionUNet")
            elif slicer.util.confirmOkCancelDisplay(
                    "Attention U-Net needs these Python packages, which will be downloaded and installed now:\n"
                    + "\n".join(missing), windowTitle="Install Python packages"):
                slicer.util.pip_install(missing)
            else:
                raise AttentionUNetSegmentError(
                    f"{purpose} needs these Python packages: " + ", ".join(missing) + ". Click again and accept "
                    "the installation.")
        except AttentionUNetSegmentError:
            raise
        except RuntimeError as error:  # pip_ensure: the user declined the installation
            raise AttentionUNetSegmentError(
                f"{purpose} needs these Python packages: " + ", ".join(missing) + f" ({error}). Click again and "
                "accept the installation.")
        except Exception as error:
            raise AttentionUNetSegmentError(
                f"Installing {', '.join(missing)} failed ({error}). Check the internet connection; behind a "
                "firewall or proxy see the README section 'Troubleshooting'. Restart 3D Slicer if it asks to.")

    def _ensureTorch(self) -> None:
        if _module_available("torch"):
            import importlib.metadata

            try:
                version = importlib.metadata.version("torch")
            except importlib.metadata.PackageNotFoundError:  # a build without package metadata: cannot tell
                return
            if not _requirement_satisfied("torch" + TORCH_REQUIREMENT):
                raise AttentionUNetSegmentError(
                    f"PyTorch {version} is too old: the segmentation needs torch{TORCH_REQUIREMENT}. Update it in "
                    "the PyTorch Utils module (uninstall, then install), restart 3D Slicer, then click Apply again.")
            return
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise AttentionUNetSegmentError(
                "PyTorch is missing. Install the 'PyTorch' extension from the Extensions Manager, restart "
                "3D Slicer, then click Apply again.")
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if torchLogic.torchInstalled():
            return
        if not slicer.util.confirmOkCancelDisplay(
                "Attention U-Net needs PyTorch. It will be downloaded and installed now (this can take several "
                "minutes and about 2 GB of disk space).", windowTitle="Install PyTorch"):
            raise AttentionUNetSegmentError("The segmentation needs PyTorch. Click Apply again and accept the "
                                            "installation, or install it from the PyTorch Utils module.")
        if torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT) is None:
            raise AttentionUNetSegmentError("PyTorch could not be installed. Install it from the PyTorch Utils "
                                            "module (it shows the reason), then restart 3D Slicer.")

    def detectComputeDevice(self) -> str:
        """What the engine will run on, in words. Asked of the engine in its own process (``devices --json``), so
        torch and a CUDA context (hundreds of MB of GPU memory) never load into Slicer."""
        if not _module_available("torch"):
            return "PyTorch is not installed yet; it is installed on the first run. The CPU always works."
        options = {"creationflags": subprocess.CREATE_NO_WINDOW} if sys.platform == "win32" else {}
        try:
            done = subprocess.run([self.pythonExecutable(), "-m", "AttentionUNetSegmentLib", "devices", "--json"],
                                  capture_output=True, text=True, env=self.engineEnvironment(), timeout=60,
                                  **options)
            info = json.loads(done.stdout.strip().splitlines()[-1])
            gpus = info["gpus"]
        except (OSError, subprocess.TimeoutExpired, ValueError, IndexError, KeyError, TypeError):
            return "Could not ask the engine which devices it sees; 'auto' uses a GPU if there is one, else the CPU."
        if gpus:
            return (f"GPU found: {gpus[0]['name']} ({gpus[0]['memory_gb']:.0f} GB), CUDA {info.get('cuda')}. "
                    "'auto' uses it.")
        return "No CUDA GPU found: 'auto' runs on the CPU (slower; an ROI shortens it)."

    # Models

    def modelRegistry(self) -> "ModelRegistry":
        from AttentionUNetSegmentLib.bundle import ModelRegistry

        return ModelRegistry(self.modelSearchPath)

    def availableModels(self):
        """``(bundles, problems)`` of the installed models (metadata only; nothing heavy is imported)."""
        return self.modelRegistry().scan()

    def resolveModel(self, model: Optional[str]) -> "ModelBundle":
        """The bundle for an installed model name or a bundle folder (metadata validated, weights not read)."""
        from AttentionUNetSegmentLib.errors import ModelBundleError

        try:
            return self.modelRegistry().find(model or None)
        except ModelBundleError as error:
            raise AttentionUNetSegmentError(str(error))

    @staticmethod
    def describeModel(bundle: "ModelBundle") -> str:
        """Rich text for the panel: description, segments with their colours, licence."""
        meta = bundle.metadata
        swatches = ", ".join(
            "<span style='color:#{:02x}{:02x}{:02x}'>&#9632;</span> {}".format(
                *(int(round(255 * c)) for c in label.color), label.name) for label in bundle.labels)
        lines = [f"<b>{bundle.name}</b> {bundle.version}: {meta.get('description', '')}",
                 f"Segments: {swatches}", f"Licence: {meta.get('license', 'not stated')}"]
        if meta.get("training_data"):
            lines.append(f"Trained on: {meta['training_data']}")
        if bundle.fold_count > 1:
            crossValidation = (meta.get("metrics") or {}).get("cross_validation") or {}
            meanDice = (crossValidation.get("mean") or {}).get("mean_dice")
            lines.append(f"Fold ensemble of {bundle.fold_count} networks (their probabilities are averaged)"
                         + (f"; cross-validation mean Dice {meanDice:.3f}" if isinstance(meanDice, float) else ""))
        return "<br>".join(lines)

    @staticmethod
    def hasLocalizer(bundle: "ModelBundle") -> bool:
        """Whether the model can locate its structure in a larger volume (a ``localization`` section)."""
        return isinstance(bundle.metadata.get("localization"), dict)

    def domainWarnings(self, volumeNode, bundle: "ModelBundle", roi=None, locateAutomatically: bool = True
                       ) -> List[str]:
        """The domain guard (``domain.domain_warnings``) for segmenting ``volumeNode``, or the part of it in
        ``roi``, with ``bundle``: what differs from the training data and what to do; empty when it looks alike
        or the bundle records no domain. Uses the volume's own grid (what the engine is given): sizes and spacings
        along i, j, k with the matching IJK-to-RAS direction columns."""
        # the localiser cuts the model's field of view out of the volume: only the other checks apply
        localizes = self.hasLocalizer(bundle) and locateAutomatically and not roi
        return self._domainCheck(volumeNode, bundle, roi, fieldOfView=not localizes)

    def willLocalize(self, volumeNode, bundle: "ModelBundle", roi=None, locateAutomatically: bool = True) -> bool:
        """Whether the engine will locate the structure (``--localize auto``): the model has a localiser, no
        Region is chosen and the volume's field of view exceeds the model's (the engine's own test)."""
        from AttentionUNetSegmentLib.domain import exceeds_field_of_view

        image = volumeNode.GetImageData()
        if not (self.hasLocalizer(bundle) and locateAutomatically and not roi and image is not None):
            return False
        domain = bundle.metadata.get("domain")
        patchMm = [p * s for p, s in zip(bundle.patch_size, bundle.preprocessing.target_spacing)]
        try:
            return exceeds_field_of_view(list(image.GetDimensions()), volumeNode.GetSpacing(),
                                         self._ijkToRasDirection(volumeNode),
                                         domain if isinstance(domain, dict) else None, patchMm)
        except (KeyError, TypeError, ValueError):
            return False  # the domain record is unreadable: domainWarnings says so

    @staticmethod
    def _ijkToRasDirection(volumeNode) -> List[float]:
        """The volume's IJK-to-RAS direction cosines, row-major (the domain guard uses their absolute values, so
        RAS vs LPS signs do not matter; the i, j, k column order does)."""
        directions = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASDirectionMatrix(directions)
        return [directions.GetElement(r, c) for r in range(3) for c in range(3)]

    def _domainCheck(self, volumeNode, bundle: "ModelBundle", roi, fieldOfView: bool) -> List[str]:
        """``domain_warnings`` on the volume's grid (or the ROI's part of it); ``fieldOfView=False`` skips the
        field-of-view check."""
        from AttentionUNetSegmentLib.domain import domain_warnings

        domain = bundle.metadata.get("domain")
        image = volumeNode.GetImageData()
        if not isinstance(domain, dict) or image is None:
            return []
        size = self._roiIndexSize(roi, volumeNode) if roi else list(image.GetDimensions())
        try:
            if not fieldOfView:
                domain = {**domain, "thresholds": {**dict(domain.get("thresholds") or {}),
                                                   "field_of_view_ratio": math.inf}}
            return domain_warnings(size, volumeNode.GetSpacing(), self._ijkToRasDirection(volumeNode), domain,
                                   localizer=self.hasLocalizer(bundle))
        except (KeyError, TypeError, ValueError) as error:
            return [f"the model '{bundle.name}' records its training domain in a form this version cannot read "
                    f"({error!r}); the input cannot be checked against it"]

    def _roiIndexSize(self, roiNode, volumeNode) -> List[int]:
        """Voxels along i, j, k of the part of the volume's grid that holds the ROI (what the engine crops)."""
        box = self.roiBoxInVolumeCoordinates(roiNode, volumeNode)
        rasToIjk = vtk.vtkMatrix4x4()
        volumeNode.GetRASToIJKMatrix(rasToIjk)
        corners = [rasToIjk.MultiplyPoint([r, a, s, 1.0])[:3]
                   for r in box[0:2] for a in box[2:4] for s in box[4:6]]
        dims = volumeNode.GetImageData().GetDimensions()
        return [max(1, min(dims[axis], math.ceil(max(c[axis] for c in corners)) + 1)
                    - max(0, math.floor(min(c[axis] for c in corners)))) for axis in range(3)]

    # Inputs

    def currentVolume(self):
        """The volume shown in the slice views (the panel's default input), else the last scalar volume."""
        selection = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSelectionNode")
        if selection is not None and selection.GetActiveVolumeID():
            node = slicer.mrmlScene.GetNodeByID(selection.GetActiveVolumeID())
            if node is not None and self.isInputVolume(node):
                return node
        volumes = self.allInputVolumes()
        return volumes[-1] if volumes else None

    def allInputVolumes(self) -> List[Any]:
        """Every volume that can be segmented (see ``isInputVolume``), in scene order."""
        return [node for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode") if self.isInputVolume(node)]

    @staticmethod
    def isInputVolume(node) -> bool:
        """An intensity volume: not a label map, and not one of this module's outputs (attention and probability
        maps are scalar volumes too, but segmenting them makes no sense)."""
        return (node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode")
                and not node.GetAttribute(ATTRIBUTE_PREFIX + "Role"))

    @staticmethod
    def segmentationBelongsTo(segmentationNode, volumeNode) -> bool:
        """Whether ``segmentationNode``'s reference geometry is ``volumeNode`` (as for a result of segmenting it)."""
        reference = segmentationNode.GetNodeReference(segmentationNode.GetReferenceImageGeometryReferenceRole())
        return reference is not None and reference.GetID() == volumeNode.GetID()

    @staticmethod
    def validateInputVolume(volumeNode) -> None:
        """Raise ``AttentionUNetSegmentError`` (what is wrong + how to fix it) unless the volume can be segmented."""
        if volumeNode is None:
            raise AttentionUNetSegmentError("No input volume: choose the volume to segment in Inputs > Volume.")
        name = volumeNode.GetName()
        if not volumeNode.IsA("vtkMRMLScalarVolumeNode") or volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
            raise AttentionUNetSegmentError(
                f"'{name}' is a {volumeNode.GetClassName()}, not an intensity image: choose a scalar volume.")
        image = volumeNode.GetImageData()
        if image is None or image.GetNumberOfPoints() == 0:
            raise AttentionUNetSegmentError(f"'{name}' has no voxels: load the image data first.")
        components = image.GetNumberOfScalarComponents()
        if components != 1 or volumeNode.IsA("vtkMRMLVectorVolumeNode"):
            raise AttentionUNetSegmentError(
                f"'{name}' has {components} components per voxel (RGB, vector or 4D data); the model needs one "
                "grey value per voxel. Convert it with the 'Vector to Scalar Volume' module, or pick one frame.")
        dims = image.GetDimensions()
        if min(dims) < 2:
            raise AttentionUNetSegmentError(
                f"'{name}' is 2D ({dims[0]} x {dims[1]} x {dims[2]} voxels); the model segments 3D volumes.")
        transform = volumeNode.GetParentTransformNode()
        if transform is not None and not transform.IsTransformToWorldLinear():
            raise AttentionUNetSegmentError(
                f"'{name}' is under the non-linear transform '{transform.GetName()}'. Harden the transform on the "
                "volume (Data module: right-click > Harden transform) or remove it, then run again.")

    @staticmethod
    def roiBoxInVolumeCoordinates(roiNode, volumeNode) -> List[float]:
        """The ROI as a RAS box ``[R_MIN, R_MAX, A_MIN, A_MAX, S_MIN, S_MAX]`` in the volume's own coordinates
        (what the engine sees when the volume sits under a linear transform); raises if it misses the volume."""
        worldBounds = [0.0] * 6
        roiNode.GetRASBounds(worldBounds)
        corners = []
        for r in worldBounds[0:2]:
            for a in worldBounds[2:4]:
                for s in worldBounds[4:6]:
                    local = [0.0, 0.0, 0.0]
                    volumeNode.TransformPointFromWorld([r, a, s], local)
                    corners.append(local)
        box = []
        for axis in range(3):
            box += [min(c[axis] for c in corners), max(c[axis] for c in corners)]
        volumeBounds = [0.0] * 6
        volumeNode.GetBounds(volumeBounds)
        if any(box[2 * a] > volumeBounds[2 * a + 1] or box[2 * a + 1] < volumeBounds[2 * a] for a in range(3)):
            raise AttentionUNetSegmentError(
                f"The ROI '{roiNode.GetName()}' does not overlap '{volumeNode.GetName()}': move the ROI onto the "
                "volume, or clear the ROI to segment the whole volume.")
        return box

    @staticmethod
    def writeVolumeForEngine(volumeNode, folder: pathlib.Path) -> pathlib.Path:
        """Write the volume (its own coordinates, uncompressed NRRD) for the engine; the scene is not touched."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{ENGINE_INPUT_STEM}.nrrd"
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        storage.SetUseCompression(0)
        if not storage.WriteData(volumeNode):
            raise AttentionUNetSegmentError(
                f"Could not write '{volumeNode.GetName()}' to the temporary folder {folder}: check free disk space.")
        return path

    # Running

    def startSegmentation(self, inputVolume, outputSegmentation=None, options: Optional[SegmentationOptions] = None,
                          progressCallback=None, logCallback=None) -> SegmentationJob:
        """Validate, install missing dependencies (first run only, asking first), then start the engine; poll the
        returned job (main thread) until ``job.done``."""
        options = options or SegmentationOptions()
        self.validateInputVolume(inputVolume)
        if outputSegmentation is not None and not outputSegmentation.IsA("vtkMRMLSegmentationNode"):
            raise AttentionUNetSegmentError("The output must be a segmentation node (or None to create one).")
        bundle = self.resolveModel(options.model)
        self.ensureDependencies()
        return SegmentationJob(self, inputVolume, outputSegmentation, options, bundle, progressCallback,
                               logCallback).start()

    def process(self, inputVolume, outputSegmentation=None, model: Optional[str] = None, roi=None,
                attentionMaps: bool = True, probabilityMaps: bool = False, device: str = "auto",
                overlap: Optional[float] = None, testTimeAugmentation: bool = False, largestComponent: bool = False,
                waitForCompletion: bool = True, progressCallback=None, logCallback=None,
                locateAutomatically: bool = True):
        """Segment ``inputVolume``. ``outputSegmentation=None`` creates a segmentation named after the input; a
        given node has its segments replaced. With ``waitForCompletion`` returns a ``SegmentationResult`` (raises
        ``AttentionUNetSegmentError`` on failure), otherwise the running ``SegmentationJob``."""
        options = SegmentationOptions(model=model, roi=roi, locateAutomatically=locateAutomatically,
                                      attentionMaps=attentionMaps,
                                      probabilityMaps=probabilityMaps, device=device, overlap=overlap,
                                      testTimeAugmentation=testTimeAugmentation, largestComponent=largestComponent)
        job = self.startSegmentation(inputVolume, outputSegmentation, options, progressCallback, logCallback)
        if not waitForCompletion:
            return job
        job.wait()
        if job.cancelled:
            raise AttentionUNetSegmentError("The segmentation was cancelled.")
        if job.error:
            raise AttentionUNetSegmentError(job.error)
        return job.result

    def startBatch(self, volumes: Sequence[Any], options: Optional[SegmentationOptions] = None,
                   progressCallback=None, logCallback=None) -> BatchJob:
        return BatchJob(self, volumes, options or SegmentationOptions(), progressCallback, logCallback).start()

    def processBatch(self, volumes: Sequence[Any], waitForCompletion: bool = True, **options):
        """Segment each volume (a new segmentation per volume); returns the summary table node (or the job)."""
        job = self.startBatch(volumes, SegmentationOptions(**options))
        return job.wait().summaryTable if waitForCompletion else job

    # Results into the scene (main thread)

    def importResults(self, job: SegmentationJob, files: Dict[str, Any], log: List[str]) -> SegmentationResult:
        """Load the engine's files (its ``done`` record for the input, see DESIGN.md) into the scene.

        Everything is read into new nodes first; on any problem those are removed and the error raised, so the
        scene is as it was. Only then, when the user chose to reuse a segmentation, are its segments and its
        previous map volumes replaced by the new results."""
        labelPath = pathlib.Path(files.get("segmentation", ""))
        if not labelPath.is_file():
            raise AttentionUNetSegmentError("The engine did not report a label map for the input; see the log.")
        report = self._readReport(files)
        labels, labelSides = _run_labels(job.bundle, report)
        boxes = _localization_boxes(report)
        inputVolume = job.inputVolume
        provenance = self._provenance(job, report)
        probabilityFiles = files.get("probabilities") or {}
        probabilityNames = [label.name for label in labels if label.name in probabilityFiles]
        scene = slicer.mrmlScene
        added: List[Any] = []
        try:
            attention = self._loadMaps([pathlib.Path(path) for path in files.get("attention") or []],
                                       lambda k: f"{inputVolume.GetName()} attention {k}", added)
            probabilities = self._loadMaps([pathlib.Path(probabilityFiles[name]) for name in probabilityNames],
                                           lambda k: f"{inputVolume.GetName()} probability {probabilityNames[k]}",
                                           added)
            labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "AttentionUNet temporary labels")
            added.append(labelmap)
            self._readVolumeFile(labelPath, labelmap)
            statistics = _statistics_rows(labels, labelSides, _voxel_counts(labelmap), _voxel_volume_ml(labelmap))
            segmentation = scene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", scene.GenerateUniqueName(f"{inputVolume.GetName()} segmentation"))
            added.append(segmentation)
            segmentation.CreateDefaultDisplayNodes()
            self._fillSegmentation(segmentation, labelmap, inputVolume, labels, labelSides, added)
            localizationBoxes = self._addBoxes(inputVolume, job.bundle, boxes, added)
        except Exception as error:
            _remove_nodes(reversed(added))
            if isinstance(error, AttentionUNetSegmentError):
                raise
            raise AttentionUNetSegmentError(f"Loading the results into the scene failed: {error}") from error
        _remove_nodes([labelmap])
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
        sides, asymmetry = _side_totals(statistics)
        warnings = [w for w in report.get("warnings") or [] if isinstance(w, str)]
        return SegmentationResult(inputVolume, segmentation, attention, probabilities, statistics, provenance, log,
                                  sides, asymmetry, localizationBoxes, warnings)

    @staticmethod
    def _readReport(files: Dict[str, Any]) -> Dict[str, Any]:
        """The engine's ``<stem>_report.json`` (empty when the engine listed none)."""
        from AttentionUNetSegmentLib.errors import AttentionUNetError
        from AttentionUNetSegmentLib.jsonfile import read_json

        if not files.get("report"):
            return {}
        try:
            report = read_json(files["report"], "the engine's report")
        except AttentionUNetError as error:
            raise AttentionUNetSegmentError(f"Loading the results failed: {error}.")
        return report if isinstance(report, dict) else {}

    @staticmethod
    def _addBoxes(inputVolume, bundle: "ModelBundle", boxes: Dict[str, List[float]], added: List[Any]) -> List[Any]:
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
            _remove_nodes([old])
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

    @staticmethod
    def _readVolumeFile(path: pathlib.Path, node) -> None:
        """Read an image file into ``node`` with Slicer's own reader (ITK LPS -> Slicer RAS handled there)."""
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        if not storage.ReadData(node):
            raise AttentionUNetSegmentError(f"Could not read the engine output {path.name}.")

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
    def _labelColorTable(labels: Sequence[Any], name: str):
        """A colour table whose index is the label value (names and colours of the segments)."""
        table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", slicer.mrmlScene.GenerateUniqueName(name))
        table.SetTypeToUser()
        table.SetNumberOfColors(max([label.value for label in labels] + [0]) + 1)
        table.SetColor(0, "Background", 0.0, 0.0, 0.0, 0.0)
        for label in labels:
            table.SetColor(label.value, label.name, *label.color, 1.0)
        return table

    def _fillSegmentation(self, segmentation, labelmap, inputVolume, labels: Sequence[Any], sides: Dict[int, str],
                          added: List[Any]) -> None:
        """One segment per label of the run (names, colours, label values, terminology, side tag), reference
        geometry = input."""
        colors = self._labelColorTable(labels, "AttentionUNet temporary colors")
        added.append(colors)
        labelmap.CreateDefaultDisplayNodes()
        labelmap.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
        segments = segmentation.GetSegmentation()
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation):
            raise AttentionUNetSegmentError("Importing the label map into the segmentation failed; see the log.")
        byValue = {segments.GetNthSegment(i).GetLabelValue(): segments.GetNthSegmentID(i)
                   for i in range(segments.GetNumberOfSegments())}
        for index, label in enumerate(labels):
            segmentId = byValue.get(label.value)
            if segmentId is None:  # nothing predicted for this label: keep an empty segment so every label shows
                segmentId = segments.AddEmptySegment("", label.name, list(label.color))
            segment = segments.GetSegment(segmentId)
            segment.SetName(label.name)
            segment.SetColor(*label.color)
            segment.SetLabelValue(label.value)
            if label.terminology:
                segment.SetTag(segment.GetTerminologyEntryTagName(), label.terminology)
            if label.value in sides:
                segment.SetTag(SIDE_TAG, sides[label.value])
            segments.SetSegmentIndex(segmentId, index)
        slicer.mrmlScene.RemoveNode(colors)
        added.remove(colors)

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

    # Batch summary

    @staticmethod
    def summaryReport(result: SegmentationResult) -> Dict[str, Any]:
        """A result as the engine's summary reads a ``_report.json``: segments, per-side totals, warnings."""
        return {"segments": result.statistics, "sides": result.sides, "asymmetry_index": result.asymmetryIndex,
                "warnings": list(result.warnings)}

    @staticmethod
    def summaryRow(volume, status: str, model: Sequence[str], message: str = "") -> Dict[str, str]:
        """The row of a volume that was not segmented (``model``: name and version)."""
        from AttentionUNetSegmentLib.outputs import summary_row

        return summary_row(volume.GetName(), status, model[0], model[1], error=message)

    def resultSummaryRow(self, result: SegmentationResult) -> Dict[str, str]:
        """A segmented volume's row: every segment's mL, per-side totals and the asymmetry index for a located
        run, its warnings (the engine's ``summary_row``, as in ``summary.csv``)."""
        from AttentionUNetSegmentLib.outputs import summary_row

        return summary_row(result.inputVolume.GetName(), "done", result.provenance.get("Model", ""),
                           result.provenance.get("ModelVersion", ""), self.summaryReport(result))

    def createSummaryTable(self, rows: Sequence[Dict[str, str]], results: Sequence[SegmentationResult]):
        """A table node with the columns of the engine's ``summary.csv`` for these results (``summary_columns``),
        one row per volume."""
        from AttentionUNetSegmentLib.outputs import summary_columns

        columns = summary_columns([self.summaryReport(result) for result in results])
        table = slicer.mrmlScene.AddNewNodeByClass(
            "vtkMRMLTableNode", slicer.mrmlScene.GenerateUniqueName("AttentionUNet batch summary"))
        for name in columns:
            table.AddColumn().SetName(name)
        for row in rows:
            index = table.AddEmptyRow()
            for column, name in enumerate(columns):
                table.SetCellText(index, column, str(row.get(name, "")))
        return table

    @staticmethod
    def showTable(tableNode) -> None:
        layoutManager = slicer.app.layoutManager()
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(tableNode.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()

    # Export

    @staticmethod
    def _referenceVolume(segmentationNode):
        return segmentationNode.GetNodeReference(segmentationNode.GetReferenceImageGeometryReferenceRole())

    @staticmethod
    def _segmentLabels(segmentationNode) -> List[Any]:
        """``(value, name, color)`` of every segment; values are the stored label values, made unique and within
        1..32767 (a label map is 16-bit signed: Slicer's export would clip larger values)."""
        from AttentionUNetSegmentLib.bundle import MAX_LABEL_VALUE, LabelInfo

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

    def exportToLabelMapNode(self, segmentationNode, referenceVolume=None, labelmapNode=None):
        """All segments into a label map volume node with stable label values (each segment's label value) on the
        reference volume's grid, with a colour table of the segment names and colours."""
        if segmentationNode is None or segmentationNode.GetSegmentation().GetNumberOfSegments() == 0:
            raise AttentionUNetSegmentError("Nothing to export: choose a segmentation that has segments.")
        referenceVolume = referenceVolume or self._referenceVolume(segmentationNode)
        scene = slicer.mrmlScene
        labels = self._segmentLabels(segmentationNode)
        before = _node_ids(scene, "vtkMRMLColorTableNode")
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
        _remove_nodes(scene.GetNodeByID(i) for i in _node_ids(scene, "vtkMRMLColorTableNode") - before
                      if i != colors.GetID())
        if not exported:
            _remove_nodes(reversed(created))
            raise AttentionUNetSegmentError("Exporting the segments to a label map failed; see the log.")
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
        provenance (JSON); with ``dicomSeg`` also a DICOM SEG (``exportDicomSeg``, written first: when it fails
        nothing is). Existing files are kept unless ``force``; nothing partial is left behind. Returns the
        written paths by kind."""
        from AttentionUNetSegmentLib.imageio import check_written_image

        if fileFormat not in EXPORT_FORMATS:
            raise AttentionUNetSegmentError(f"Unknown export format '{fileFormat}': use one of {EXPORT_FORMATS}.")
        outputDirectory = pathlib.Path(outputDirectory)
        outputDirectory.mkdir(parents=True, exist_ok=True)
        existing = self.existingExportFiles(segmentationNode, outputDirectory, fileFormat, dicomSeg)
        if existing and not force:
            raise AttentionUNetSegmentError("These files exist already: " + ", ".join(existing) +
                                            ". Choose another folder or allow overwriting.")
        labelmap = self.exportToLabelMapNode(segmentationNode, referenceVolume)
        colors = labelmap.GetDisplayNode().GetColorNode()
        names = self.exportFileNames(segmentationNode, fileFormat, dicomSeg)
        paths = {kind: outputDirectory / name for kind, name in names.items()}
        partials: List[pathlib.Path] = []
        try:
            labels = self._segmentLabels(segmentationNode)
            sides = {label.value: side for label, side in zip(labels, self._segmentSides(segmentationNode)) if side}
            voxelMl = _voxel_volume_ml(labelmap)
            rows = _statistics_rows(labels, sides, _voxel_counts(labelmap), voxelMl)
            writes = {
                "label_table": "value,name,color\n" + "".join(
                    f"{label.value},{_csv(label.name)},{_hex(label.color)}\n" for label in labels),
                "volumes": _volumes_csv(rows, bool(sides)),
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
                writes["sides"] = _sides_csv(*_side_totals(rows))
            labelPartial = paths["labelmap"].with_name(f"{paths['labelmap'].name}.partial-{os.getpid()}.{fileFormat}")
            partials.append(labelPartial)
            segmentationPartial = paths["segmentation"].with_name(f"{names['segmentation']}.partial-{os.getpid()}"
                                                                   ".seg.nrrd")
            partials.append(segmentationPartial)
            for node, partial, final in ((labelmap, labelPartial, paths["labelmap"]),
                                         (segmentationNode, segmentationPartial, paths["segmentation"])):
                storage = node.CreateDefaultStorageNode()
                storage.SetFileName(str(partial))
                try:
                    if not storage.WriteData(node):
                        raise OSError(f"cannot write {partial.name}")
                    check_written_image(partial, final)  # ITK's NIfTI writer does not report a full disk
                except OSError as error:
                    raise AttentionUNetSegmentError(f"Could not write {final.name} in {outputDirectory} ({error}): "
                                                    "check that the folder is writable and has free space.")
            for kind, text in writes.items():
                partial = paths[kind].with_name(f"{paths[kind].name}.partial-{os.getpid()}")
                partials.append(partial)
                partial.write_text(text, encoding="utf-8")
            if dicomSeg:
                self.exportDicomSeg(segmentationNode, paths["dicom_segmentation"], referenceVolume, force=force)
            for partial, kind in zip(partials, ["labelmap", "segmentation", *writes]):
                os.replace(partial, paths[kind])
        finally:
            for partial in partials:
                if partial.exists():
                    partial.unlink()
            _remove_nodes([labelmap, colors])
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
        from AttentionUNetSegmentLib.imageio import read_image, read_label
        from AttentionUNetSegmentLib.report import write_report_pdf

        referenceVolume = referenceVolume or self._referenceVolume(segmentationNode)
        if referenceVolume is None:
            raise AttentionUNetSegmentError("The report draws the segments over the volume they were made from, "
                                            "and this segmentation has no reference volume: segment the volume "
                                            "again, or set the segmentation's reference geometry to it.")
        path = pathlib.Path(outputDirectory) / self.reportFileName(segmentationNode)
        if path.exists() and not force:
            raise AttentionUNetSegmentError(f"{path} exists already. Choose another folder or allow overwriting.")
        self._ensureRequirements(REPORT_REQUIREMENTS_FILE, "The PDF report")
        labelmap = self.exportToLabelMapNode(segmentationNode, referenceVolume)
        colors = labelmap.GetDisplayNode().GetColorNode()
        workDir = pathlib.Path(tempfile.mkdtemp(prefix="AttentionUNet-report-"))
        try:
            labels = self._segmentLabels(segmentationNode)
            sides = {label.value: side for label, side in zip(labels, self._segmentSides(segmentationNode)) if side}
            rows = _statistics_rows(labels, sides, _voxel_counts(labelmap), _voxel_volume_ml(labelmap))
            for row, label in zip(rows, labels):
                row["color"] = list(label.color)
            totals, asymmetry = _side_totals(rows)

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
        except (AttentionUNetError, OSError) as error:
            raise AttentionUNetSegmentError(f"Could not write the report {path.name} in {outputDirectory}: {error}")
        finally:
            shutil.rmtree(workDir, ignore_errors=True)
            _remove_nodes([labelmap, colors])
        return str(path)


    # DICOM SEG

    def hasDicomSource(self, segmentationNode) -> bool:
        """Whether the segmentation's reference volume came from the DICOM database (its instance UIDs are
        known), so a DICOM SEG can reference its series."""
        reference = self._referenceVolume(segmentationNode) if segmentationNode is not None else None
        return bool(reference is not None and (reference.GetAttribute(DICOM_INSTANCE_UIDS) or "").split())

    @staticmethod
    def dicomSourceFiles(volumeNode) -> List[str]:
        """The files of the DICOM images ``volumeNode`` was loaded from (``slicer.dicomDatabase.fileForInstance``
        of each of its ``DICOM.instanceUIDs``)."""
        name = volumeNode.GetName() if volumeNode is not None else "the reference volume"
        uids = (volumeNode.GetAttribute(DICOM_INSTANCE_UIDS) or "").split() if volumeNode is not None else []
        if not uids:
            raise AttentionUNetSegmentError(
                f"'{name}' was not loaded from the DICOM database, so a DICOM SEG cannot reference it: load the "
                "series with the DICOM module, segment that volume, then export.")
        database = getattr(slicer, "dicomDatabase", None)
        if database is None or not database.isOpen:
            raise AttentionUNetSegmentError("The DICOM database is not open: open it in the DICOM module, then "
                                            "export again.")
        files = [database.fileForInstance(uid) for uid in uids]
        missing = sum(1 for path in files if not path or not os.path.isfile(path))
        if missing:
            raise AttentionUNetSegmentError(
                f"The DICOM database has no file for {missing} of the {len(uids)} images of '{name}' (removed or "
                "moved): import the series into the DICOM database again, load it, then export.")
        return files

    def exportDicomSeg(self, segmentationNode, outputPath, referenceVolume=None, force: bool = False,
                       addToDatabase: bool = True) -> str:
        """Write ``outputPath`` (.dcm), a DICOM Segmentation of every segment (names, colours, terminology, label
        values as segment numbers) referencing the DICOM series of the reference volume, and add it to the DICOM
        database. Written by the engine in its own process (``dicom-seg``: highdicom never loads into Slicer);
        highdicom and pydicom are installed on first use. Returns the path."""
        referenceVolume = referenceVolume or self._referenceVolume(segmentationNode)
        files = self.dicomSourceFiles(referenceVolume)
        self._ensureRequirements(DICOM_REQUIREMENTS_FILE, "The DICOM SEG export")
        work = pathlib.Path(tempfile.mkdtemp(prefix="AttentionUNet-SEG-"))
        labelmap = self.exportToLabelMapNode(segmentationNode, referenceVolume)
        colors = labelmap.GetDisplayNode().GetColorNode()
        try:
            labelsPath = work / "labels.nrrd"
            storage = labelmap.CreateDefaultStorageNode()
            storage.SetFileName(str(labelsPath))
            if not storage.WriteData(labelmap):
                raise AttentionUNetSegmentError(f"Could not write the label map to {work}: check free disk space.")
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
            command = build_dicom_seg_command(str(labelsPath), str(work / "sources.txt"), str(work / "segments.json"),
                                              str(outputPath), algorithm, python=self.pythonExecutable(), force=force)
            outcome = EngineProcess(command, env=self.engineEnvironment(), cwd=str(work)).start().wait()
        finally:
            _remove_nodes([labelmap, colors])
            shutil.rmtree(work, ignore_errors=True)
        if not outcome.ok:
            raise AttentionUNetSegmentError(f"Writing the DICOM SEG failed: {outcome.error}")
        written = str(outcome.outputs.get("dicom_segmentation") or outputPath)
        if addToDatabase:
            slicer.dicomDatabase.insert(written)
        return written


def _node_ids(scene, className: str) -> set:
    return {node.GetID() for node in slicer.util.getNodesByClass(className, scene)}


def _remove_nodes(nodes) -> None:
    """Remove nodes from the scene together with their display nodes (which the scene would otherwise keep)."""
    for node in nodes:
        scene = node.GetScene()
        if scene is None:
            continue
        displays = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())] \
            if node.IsA("vtkMRMLDisplayableNode") else []
        for display in displays:
            if display is not None:
                scene.RemoveNode(display)
        scene.RemoveNode(node)


def _volumes_csv(rows: Sequence[Dict[str, Any]], withSides: bool) -> str:
    """``value,name[,side],voxels,volume_ml`` per segment (the side column only for a located run)."""
    return ("value,name,side,voxels,volume_ml\n" if withSides else "value,name,voxels,volume_ml\n") + "".join(
        f"{row['value']},{_csv(row['name'])}," + (f"{row['side'] or ''}," if withSides else "")
        + f"{row['voxels']},{row['volume_ml']:.6f}\n" for row in rows)


def _sides_csv(sides: Dict[str, Dict[str, Any]], asymmetry: Optional[float]) -> str:
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


def _voxel_volume_ml(volumeNode) -> float:
    sx, sy, sz = volumeNode.GetSpacing()
    return sx * sy * sz / 1000.0


def _voxel_counts(labelmapNode) -> Dict[int, int]:
    import numpy as np

    values, counts = np.unique(slicer.util.arrayFromVolume(labelmapNode), return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts) if v != 0}


def _statistics_rows(labels: Sequence[Any], sides: Dict[int, str], counts: Dict[int, int],
                     voxelMl: float) -> List[Dict[str, Any]]:
    """Per label: value, name, side (``None`` unless the run located each side), voxels and mL."""
    return [{"value": label.value, "name": label.name, "side": sides.get(label.value),
             "voxels": counts.get(label.value, 0), "volume_ml": counts.get(label.value, 0) * voxelMl}
            for label in labels]


def _side_totals(rows: Sequence[Dict[str, Any]]):
    """``(sides, asymmetry)``: the engine's ``side_statistics`` of the segment rows (voxels and mL per side, the
    asymmetry index (L - R) / ((L + R) / 2)), sides in left/right order; ``({}, None)`` when no row has a side (a
    crop), and no index unless both sides are present."""
    from AttentionUNetSegmentLib.outputs import side_statistics

    totals, asymmetry = side_statistics(rows)
    sides = {side: totals[side] for side in SIDES if side in (totals or {})}
    return sides, (asymmetry if len(sides) == len(SIDES) else None)


def _run_labels(bundle: "ModelBundle", report: Dict[str, Any]):
    """``(labels, sides)``: the label set that ran, as the report's ``segments`` list it (a located run has one
    label per side and part), each with its terminology from the bundle's label lists, and ``{value: side}``;
    the bundle's labels when the report lists none."""
    from AttentionUNetSegmentLib.bundle import MAX_LABEL_VALUE, LabelInfo

    segments = report.get("segments")
    if not segments:
        return list(bundle.labels), {}
    terminology = {(label.value, label.name): label.terminology for label in bundle.labels}
    localization = bundle.metadata.get("localization")
    for item in (localization.get("labels") if isinstance(localization, dict) else None) or []:
        if isinstance(item, dict) and isinstance(item.get("terminology"), str):
            terminology.setdefault((item.get("value"), item.get("name")), item["terminology"])
    labels, sides = [], {}
    for item in segments:
        try:
            value, name, color = item["value"], item["name"], tuple(float(c) for c in item["color"])
            valid = (isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_LABEL_VALUE
                     and isinstance(name, str) and len(color) == 3)
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise AttentionUNetSegmentError(
                f"The engine's report lists a segment the module cannot read ({str(item)[:200]}): reinstall the "
                "AttentionUNet extension so that its engine and module match.")
        labels.append(LabelInfo(value, name, color, terminology.get((value, name), "")))
        if item.get("side") in SIDES:
            sides[value] = item["side"]
    return labels, sides


def _localization_boxes(report: Dict[str, Any]) -> Dict[str, List[float]]:
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
                f"The engine's report gives the {side} localisation box as {str(boxes[side])[:200]}, not six RAS "
                "bounds: reinstall the AttentionUNet extension so that its engine and module match.")
        result[side] = box
    return result


def warningText(warnings: Sequence[str]) -> str:
    """The panel's status lines for warnings (the domain guard's before Apply, the engine's after a run)."""
    return "\n".join(f"Warning: {warning}" for warning in warnings)


def _read_requirements(path: pathlib.Path) -> List[str]:
    if not path.is_file():
        return []
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def _requirement_satisfied(requirement: str) -> bool:
    """Whether an installed distribution satisfies ``requirement`` (name and, where ``packaging`` is available,
    its version specifier)."""
    import importlib.metadata
    import re

    try:
        from packaging.requirements import Requirement
    except ImportError:  # only the name can be checked
        Requirement = None
    parsed = Requirement(requirement) if Requirement is not None else None
    name = parsed.name if parsed is not None else re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return parsed is None or parsed.specifier.contains(version, prereleases=True)


def _module_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


#
# AttentionUNetSegmentTest
#


class AttentionUNetSegmentTest(ScriptedLoadableModuleTest):
    """Runs the real Logic on the bundled sample with the bundled model (CPU)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentSample()
        self.setUp()
        self.test_BadInput()

    def _loadSample(self):
        samples = sorted(SAMPLE_DATA_DIR.glob("*.nii.gz"))
        self.assertTrue(samples, f"no sample volume in {SAMPLE_DATA_DIR}")
        volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "AttentionUNetHippocampus")
        AttentionUNetSegmentLogic._readVolumeFile(samples[0], volume)
        volume.CreateDefaultDisplayNodes()
        return volume

    def test_SegmentSample(self):
        self.delayDisplay("Segmenting the bundled sample")
        volume = self._loadSample()
        logic = AttentionUNetSegmentLogic()
        bundle = logic.resolveModel(DEFAULT_MODEL)
        result = logic.process(volume, device="cpu", waitForCompletion=True)

        segments = result.segmentation.GetSegmentation()
        self.assertEqual(segments.GetNumberOfSegments(), len(bundle.labels))
        for index, label in enumerate(bundle.labels):
            segment = segments.GetNthSegment(index)
            self.assertEqual(segment.GetName(), label.name)
            self.assertEqual(segment.GetLabelValue(), label.value)

        # No reference volume passed: the export uses the segmentation's own reference geometry, which the run must
        # have set to the input's grid.
        self.assertTrue(logic.segmentationBelongsTo(result.segmentation, volume))
        labelmap = logic.exportToLabelMapNode(result.segmentation)
        self.assertEqual(labelmap.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
        for actual, expected in zip(_ijk_to_ras(labelmap), _ijk_to_ras(volume)):
            self.assertAlmostEqual(actual, expected, places=4)
        self.assertGreater(sum(_voxel_counts(labelmap).values()), 0, "the model found nothing in the sample")

        self.assertGreaterEqual(len(result.attentionVolumes), 1)
        volumeBounds = [0.0] * 6
        volume.GetRASBounds(volumeBounds)
        for attention in result.attentionVolumes:
            self.assertEqual(attention.GetAttribute("AttentionUNet.Model"), bundle.name)
            bounds = [0.0] * 6
            attention.GetRASBounds(bounds)
            for axis in range(6):  # the coarse grid covers the same physical box (within a coarse voxel)
                self.assertAlmostEqual(bounds[axis], volumeBounds[axis], delta=max(attention.GetSpacing()) * 1.01)
            values = slicer.util.arrayFromVolume(attention)
            self.assertGreaterEqual(float(values.min()), 0.0)
            self.assertLessEqual(float(values.max()), 1.0)
        self.delayDisplay("Sample segmented")

    def test_BadInput(self):
        logic = AttentionUNetSegmentLogic()
        before = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(AttentionUNetSegmentError):
            logic.process(None)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)


def _ijk_to_ras(volumeNode) -> List[float]:
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return [matrix.GetElement(r, c) for r in range(3) for c in range(4)]
