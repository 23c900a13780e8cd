"""The module panel: binds the .ui to the parameter node and drives the Logic (no processing here)."""

from __future__ import annotations

import logging
import pathlib
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Sequence

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from AttentionUNetSlicer.definitions import DEFAULT_MODEL, MAX_OVERLAP, POLL_INTERVAL_MS, AttentionUNetSegmentError
from AttentionUNetSlicer.engineProcess import formatDuration
from AttentionUNetSlicer.jobs import BatchJob, SegmentationOptions
from AttentionUNetSlicer.logic import AttentionUNetSegmentLogic

if TYPE_CHECKING:  # annotations only: the engine's bundle module loads on first use
    from AttentionUNetSegmentLib.model.bundle import ModelBundle


class PanelWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: binds the .ui to the parameter node and drives the Logic (no processing here)."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._deviceQuery = None
        self._stopping: List[Any] = []  # cancelled runs the poll timer follows to their end, away from the panel
        self._lastResult = None
        self._pollTimer = None
        self._models: List[ModelBundle] = []
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
        if self._pollTimer is not None:
            self._pollTimer.stop()
        for running in (self._job, self._deviceQuery, *self._stopping):
            if running is not None and not running.done:
                running.cancel()
                running.wait()  # the panel goes away: no timer would follow the engine to its end (seconds)
        self.removeObservers()
        self.setParameterNode(None)

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        pass  # the widgets stay bound: binding the same wrapper again on enter() would wire them twice (Slicer 5.8)

    def onSceneStartClose(self, caller, event) -> None:
        """A running batch stops without adding its summary table: the scene is being cleared, and the table
        (and the layout showing it) would refer to a removed node."""
        job, self._job = self._job, None
        if job is not None and not job.done:
            if isinstance(job, BatchJob):
                job.cancel(sceneClosing=True)
            else:
                job.cancel()
            self._stopping.append(job)  # the timer polls it until its engine has gone
        self.ui.progressBar.setVisible(False)
        self.ui.statusLabel.text = _("Cancelled: the scene was closed.") if job is not None else ""

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

    def setParameterNode(self, inputParameterNode) -> None:
        """Bind the widgets to ``inputParameterNode`` (the Logic's one wrapper of the node), once: the same
        wrapper again changes nothing."""
        if inputParameterNode is self._parameterNode:
            return
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
        combo = self.ui.modelComboBox
        if node and combo.itemData(combo.currentIndex) != node.modelName:
            self._selectModelInCombo(node.modelName)  # e.g. a loaded scene's model: what Apply will use
        bundle = self._currentBundle()
        missing = self._missingModelText()
        canRun = bool(node and node.inputVolume and bundle)
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.enabled = running or canRun
        self.ui.applyButton.toolTip = (_("Stop the running segmentation; the scene is left as it was") if running
                                       else _("Segment the input volume") if canRun else missing or
                                       _("Select an input volume and a model first"))
        self.ui.batchApplyButton.enabled = not running and bool(bundle)
        self.ui.batchApplyButton.toolTip = missing
        for widget in (self.ui.inputsCollapsibleButton, self.ui.outputsCollapsibleButton,
                       self.ui.advancedCollapsibleButton, self.ui.exportCollapsibleButton):
            widget.enabled = not running
        segmentation = node.outputSegmentation if node else None
        self.ui.exportButton.enabled = bool(segmentation)
        self.ui.exportLabelmapButton.enabled = bool(segmentation)
        canDicomSeg = bool(segmentation) and self.logic.hasDicomSource(segmentation)
        self.ui.exportDicomSegCheckBox.enabled = canDicomSeg
        self.ui.exportDicomSegCheckBox.toolTip = (
            _("Also write a DICOM Segmentation object that references the DICOM series and add it to the DICOM "
              "database") if canDicomSeg else _("Only for a segmentation of a volume loaded from the DICOM database"))
        self.ui.exportReportButton.enabled = bool(segmentation)
        self.ui.show3DButton.setSegmentationNode(segmentation)
        hasLocalizer = bool(bundle and self.logic.hasLocalizer(bundle))
        self.ui.locateAutomaticallyCheckBox.visible = hasLocalizer
        self.ui.locateAutomaticallyCheckBox.enabled = hasLocalizer and not (node and node.roi)
        # The engine refuses --tta for a model that records no mirror axes: do not offer it.
        canMirror = bool(bundle and bundle.mirror_axes)
        self.ui.ttaCheckBox.enabled = canMirror
        self.ui.ttaCheckBox.toolTip = ("" if canMirror or not bundle else
                                       _("This model records no mirror axes from its training, so it cannot be "
                                         "mirrored"))
        if not running:
            self._updateDomainStatus(node, bundle)

    def _currentBundle(self) -> Optional[ModelBundle]:
        name = self._parameterNode.modelName if self._parameterNode else None
        return next((bundle for bundle in self._models if bundle.name == name), None)

    def _missingModelText(self) -> str:
        """What to say when the parameter node asks for a model that is not installed (a scene saved where it
        was): the panel keeps the scene's choice and refuses to run rather than use another model unasked, as
        that would give other results under the same settings. Empty when the model is installed, or when no
        model is (the model description says so)."""
        node = self._parameterNode
        if not (node and self._models) or self._currentBundle() is not None:
            return ""
        return _("The model '{model}' that this scene uses is not installed, so nothing runs with it. Install it "
                 "(add its folder to ATTENTION_UNET_MODELS, then click Refresh), or choose an installed model "
                 "under Model.").format(model=node.modelName)

    def _updateDomainStatus(self, node, bundle) -> None:
        """Before Apply, say in the status when the input is far outside the model's training domain. Only when
        the input, model, Region or localisation choice changed: the status of a finished run stays until then."""
        volume = node.inputVolume if node else None
        key = (volume.GetID() if volume else None, node.modelName if node else None,
               node.roi.GetID() if node and node.roi else None, bool(node and node.locateAutomatically))
        if key == self._domainKey:
            return
        self._domainKey = key
        missing = self._missingModelText() if bundle is None else ""
        if missing:
            self.ui.statusLabel.text = missing
            return
        if volume is None or bundle is None:
            return
        lines = []
        try:
            if self.logic.willLocalize(volume, bundle, node.roi, node.locateAutomatically):
                lines.append(_("'{name}' is much larger than the model's field of view: Locate automatically will "
                               "find the structure and segment each side in its own box.").format(
                                   name=volume.GetName()))
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
            self.appendLog(_("Model in {path} skipped: {reason}").format(path=path, reason=reason))
        if not self._models:
            self.ui.modelDescriptionLabel.text = _(
                "No model is installed. Reinstall the AttentionUNet extension, or add a folder of model bundles "
                "to the ATTENTION_UNET_MODELS environment variable and click Refresh.")
        self._selectModelInCombo(self._parameterNode.modelName if self._parameterNode else DEFAULT_MODEL)

    def _selectModelInCombo(self, name: str) -> None:
        """Show the model ``name``; one that is not installed selects none (index -1) and leaves the parameter
        node as it is: only the user's own choice in the combo box (``onModelChanged``) changes its model."""
        index = self.ui.modelComboBox.findData(name)
        self.ui.modelComboBox.currentIndex = index
        self.onModelChanged(index)

    def onModelChanged(self, index: int) -> None:
        if not (0 <= index < len(self._models)):
            missing = self._missingModelText()
            if missing:
                self.ui.modelDescriptionLabel.text = missing
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
        """The first time Advanced opens, ask the engine's process which devices it sees (polled by the timer:
        the GUI never waits for it)."""
        if not collapsed and not self.ui.deviceInfoLabel.text and self._deviceQuery is None:
            self.ui.deviceInfoLabel.text = _("Asking the engine which devices it sees...")
            self._deviceQuery = self.logic.startDeviceQuery()
            self._pollTimer.start()

    def onInputChanged(self, volume) -> None:
        """This module's own outputs (attention and probability maps) are refused as inputs. After a run its
        result stays selected as the output (for export); a new input must not make the next Apply replace
        another volume's segmentation, so an output made for another volume is deselected."""
        node = self._parameterNode
        if node and volume and not self.logic.isInputVolume(volume):
            self.ui.statusLabel.text = self.logic.inputProblem(volume)
            # after the selector's parameter binding has stored the choice (it may run after this slot)
            qt.QTimer.singleShot(0, lambda: setattr(node, "inputVolume", None))
            return
        if node and node.outputSegmentation and volume and \
                not self.logic.segmentationBelongsTo(node.outputSegmentation, volume):
            node.outputSegmentation = None

    def onOutputChanged(self, node) -> None:
        self.ui.show3DButton.setSegmentationNode(node)

    # Running

    def _options(self) -> SegmentationOptions:
        node = self._parameterNode
        return SegmentationOptions(
            model=node.modelName, roi=node.roi, locateAutomatically=node.locateAutomatically,
            attentionMaps=node.attentionMaps,
            probabilityMaps=node.probabilityMaps, device=node.device, overlap=node.overlap,
            testTimeAugmentation=node.testTimeAugmentation, largestComponent=node.largestComponent)

    def onApplyButton(self) -> None:
        if self._job is not None and not self._job.done:
            self._job.cancel()  # returns at once; the poll timer sees the run end
            self.ui.statusLabel.text = _("Cancelling...")
            return
        self.ui.logTextEdit.clear()
        node = self._parameterNode
        self._runShowingErrors(_("Segmentation could not start."), lambda: self._startJob(
            self.logic.startSegmentation(node.inputVolume, node.outputSegmentation, self._options(),
                                         progressCallback=self.onProgress, logCallback=self.appendLog)),
            dependencies=self.logic.ensureDependencies)

    def onBatchApplyButton(self) -> None:
        volumes = (self.logic.allInputVolumes() if self._parameterNode.batchAllVolumes
                   else list(self.ui.batchVolumesSelector.checkedNodes()))
        if not volumes:
            slicer.util.errorDisplay(_("Check the volumes to segment in the Batch section, or tick 'All volumes'."))
            return
        self.ui.logTextEdit.clear()
        self._runShowingErrors(_("Batch segmentation could not start."), lambda: self._startJob(
            self.logic.startBatch(volumes, self._options(), progressCallback=self.onProgress,
                                  logCallback=self.appendLog)),
            dependencies=self.logic.ensureDependencies)

    def _runShowingErrors(self, failure: str, action: Callable[[], Any],
                          dependencies: Optional[Callable[..., None]] = None) -> bool:
        """Run ``action`` under a wait cursor; a problem is shown (``failure`` and what went wrong) and ``False``
        returned. ``dependencies`` installs what the action needs first, outside the wait cursor (it may ask
        before installing) and with its progress in the status line."""
        try:
            if dependencies is not None:
                dependencies(statusCallback=self._showInstallStatus)
            with slicer.util.WaitCursor():
                action()
            return True
        except Exception as error:  # shown, never lost: a Qt slot has no caller to raise to
            if not isinstance(error, AttentionUNetSegmentError):
                logging.exception(failure)
            self.ui.statusLabel.text = failure
            slicer.util.errorDisplay(f"{failure}\n\n{error}", windowTitle=_("Attention U-Net"))
            return False

    def _showInstallStatus(self, message: str) -> None:
        self.ui.statusLabel.text = message
        slicer.app.processEvents()  # shown before the installation blocks

    def _startJob(self, job) -> None:
        self._job = job
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = _("Starting...")
        self._pollTimer.start()
        self.updateGUIFromParameterNode()

    def onPollJob(self) -> None:
        """The poll timer: the device query, the running job and the cancelled runs, each until it is done."""
        query = self._deviceQuery
        if query is not None and not query.poll():
            self.ui.deviceInfoLabel.text = query.text
            self._deviceQuery = query = None
        self._stopping = [job for job in self._stopping if job.poll()]
        if self._job is not None:
            self._job.poll()
        if (self._job is None or self._job.done) and query is None and not self._stopping:
            self._pollTimer.stop()
        if self._job is None or not self._job.done:
            return
        job, self._job = self._job, None
        self.ui.progressBar.setVisible(False)
        if job.cancelled and isinstance(job, BatchJob):
            self.ui.statusLabel.text = _("Batch cancelled ({summary}); finished volumes keep their results.").format(
                summary=job.summary)
            self.logic.showTable(job.summaryTable)
        elif job.cancelled:
            self.ui.statusLabel.text = _("Cancelled; the scene was left unchanged.")
        elif job.error:
            self.ui.statusLabel.text = _("Failed (see the log).")
            slicer.util.errorDisplay(job.error, windowTitle=_("Attention U-Net segmentation failed"))
        else:
            self.onJobSucceeded(job)
        self.updateGUIFromParameterNode()

    def onJobSucceeded(self, job) -> None:
        if isinstance(job, BatchJob):
            self.ui.statusLabel.text = _("Batch finished: {summary}").format(summary=job.summary)
            self.logic.showTable(job.summaryTable)
            return
        result = job.result
        self._lastResult = result
        self._parameterNode.outputSegmentation = result.segmentation
        self.logic.showResults(result)
        self.ui.statusLabel.text = "\n".join(
            line for line in (_("Done in {duration} on {device}.").format(duration=formatDuration(job.seconds),
                                                                             device=result.device),
                              warningText(result.warnings)) if line)

    def onProgress(self, fraction: float, message: str, etaSeconds: Optional[float]) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        eta = formatDuration(etaSeconds)
        self.ui.statusLabel.text = _("{message} ({eta} left)").format(message=message, eta=eta) if eta else message

    def appendLog(self, line: str) -> None:
        self.ui.logTextEdit.appendPlainText(line)

    # Export

    def _exportFolder(self) -> str:
        """The export folder, or "" after telling the user what is missing (the folder or the segmentation)."""
        node = self._parameterNode
        directory = str(node.exportDirectory) if str(node.exportDirectory) not in ("", ".") else ""
        if not directory:
            slicer.util.errorDisplay(_("Choose the folder to export to (Export for reports > Folder)."))
            return ""
        if node.outputSegmentation is None:
            slicer.util.errorDisplay(_("Choose the segmentation to export (Outputs > Segmentation)."))
            return ""
        return directory

    def onExportButton(self) -> None:
        node, directory = self._parameterNode, self._exportFolder()
        if not directory:
            return
        dicomSeg = node.exportDicomSeg and self.logic.hasDicomSource(node.outputSegmentation)
        existing = []
        if not self._runShowingErrors(_("Export failed."), lambda: existing.extend(self.logic.existingExportFiles(
                node.outputSegmentation, directory, node.exportFormat, dicomSeg))):
            return
        if existing and not slicer.util.confirmYesNoDisplay(
                _("These files exist already:\n{files}\n\nReplace them?").format(files="\n".join(existing))):
            self.ui.statusLabel.text = _("Export cancelled; the existing files were kept.")
            return

        def export():
            files = self.logic.exportForReport(node.outputSegmentation, directory, fileFormat=node.exportFormat,
                                               force=bool(existing), dicomSeg=dicomSeg)
            self.appendLog("Exported: " + ", ".join(files.values()))
            self.ui.statusLabel.text = _("Exported {count} files to {folder}").format(count=len(files),
                                                                                    folder=directory)

        self._runShowingErrors(_("Export failed."), export,
                               dependencies=self.logic.ensureDicomSegDependencies if dicomSeg else None)

    def onExportReportButton(self) -> None:
        node, directory = self._parameterNode, self._exportFolder()
        if not directory:
            return
        existing = pathlib.Path(directory) / self.logic.reportFileName(node.outputSegmentation)
        if existing.exists() and not slicer.util.confirmYesNoDisplay(
                _("{path} exists already.\n\nReplace it?").format(path=existing)):
            self.ui.statusLabel.text = _("Export cancelled; the existing report was kept.")
            return

        def export():
            path = self.logic.exportReportPdf(node.outputSegmentation, directory, force=existing.exists())
            self.appendLog(f"Report: {path}")
            self.ui.statusLabel.text = _("Wrote the report {path}").format(path=path)

        self._runShowingErrors(_("Writing the PDF report failed."), export,
                               dependencies=self.logic.ensureReportDependencies)

    def onExportLabelmapButton(self) -> None:
        def export():
            labelmap = self.logic.exportToLabelMapNode(self._parameterNode.outputSegmentation)
            self.ui.statusLabel.text = _("Created label map '{name}'.").format(name=labelmap.GetName())

        self._runShowingErrors(_("Export to a label map failed."), export)


def warningText(warnings: Sequence[str]) -> str:
    """The panel's status lines for warnings (the domain guard's before Apply, the engine's after a run)."""
    return "\n".join(_("Warning: {warning}").format(warning=warning) for warning in warnings)
