"""The module's Logic: the one entry point for scripts and the panel, composed of the concern classes."""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from AttentionUNetSlicer.batchSummary import BatchSummary
from AttentionUNetSlicer.definitions import MODULE_DIR, AttentionUNetSegmentError
from AttentionUNetSlicer.dependencies import DependencyInstaller
from AttentionUNetSlicer.engineProcess import EngineProcess
from AttentionUNetSlicer.export import Export
from AttentionUNetSlicer.inputChecks import InputChecks
from AttentionUNetSlicer.jobs import BatchJob, DeviceQuery, SegmentationJob, SegmentationOptions
from AttentionUNetSlicer.models import ModelCatalog
from AttentionUNetSlicer.parameters import parameterNodeClass
from AttentionUNetSlicer.sceneImport import SceneImport
from AttentionUNetSlicer.volumeFiles import VolumeFiles


class AttentionUNetSegmentLogic(ScriptedLoadableModuleLogic, DependencyInstaller, ModelCatalog, InputChecks,
                                VolumeFiles, SceneImport, BatchSummary, Export):
    """Everything the module does, usable without the GUI (Python console, batch scripts, tests).

    ``process(inputVolume, outputSegmentation, options)`` segments one volume; ``processBatch(volumes, options)``
    several; ``exportForReport`` writes files for reports. ``engineProcessFactory`` makes the engine runs (called
    as ``EngineProcess`` is: command, ``env``, ``cwd``, ``onProgress``, ``onLog``): tests of the scene import,
    export and batch bookkeeping pass one that needs no child process.
    """

    def __init__(self, engineProcessFactory: Callable[..., EngineProcess] = EngineProcess) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.engineProcessFactory = engineProcessFactory
        #: Python that runs the engine; ``None``: Slicer's ``PythonSlicer`` (or this interpreter outside Slicer).
        self.enginePython: Optional[str] = None
        #: Where installed models are looked for; ``None``: ``$ATTENTION_UNET_MODELS`` then the bundled models.
        self.modelSearchPath: Optional[List[str]] = None
        self._parameterWrapper = None

    def getParameterNode(self):
        """The one wrapper of the module's parameter node: the same object while the node is the same, so the
        panel connects its widgets once (Slicer 5.8's ``disconnectGui`` cannot undo a second ``connectGui``)."""
        node = super().getParameterNode()
        if self._parameterWrapper is None or self._parameterWrapper.parameterNode is not node:
            self._parameterWrapper = parameterNodeClass()(node)
        return self._parameterWrapper

    def pythonExecutable(self) -> str:
        return self.enginePython or shutil.which("PythonSlicer") or sys.executable

    def engineEnvironment(self) -> Dict[str, str]:
        """The engine's environment: this one, with the module folder first on ``PYTHONPATH``."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(MODULE_DIR), env.get("PYTHONPATH", "")) if p)
        return env

    def startDeviceQuery(self) -> DeviceQuery:
        """Ask the engine, in its own process, what it will run on; poll the query until ``done``, then read its
        ``text``."""
        return DeviceQuery(self).start()

    def startSegmentation(self, inputVolume, outputSegmentation=None, options: Optional[SegmentationOptions] = None,
                          progressCallback=None, logCallback=None) -> SegmentationJob:
        """Validate, install missing dependencies (first run only, asking first), then start the engine; poll the
        returned job (main thread) until ``job.done``. ``outputSegmentation=None`` creates a segmentation named
        after the input; a given node has its segments replaced."""
        options = options or SegmentationOptions()
        self.validateInputVolume(inputVolume)
        if outputSegmentation is not None and not outputSegmentation.IsA("vtkMRMLSegmentationNode"):
            raise AttentionUNetSegmentError(_("The output must be a segmentation node (or None to create one)."))
        bundle = self.resolveModel(options.model)
        self.ensureDependencies()
        return SegmentationJob(self, inputVolume, outputSegmentation, options, bundle, progressCallback,
                               logCallback).start()

    def process(self, inputVolume, outputSegmentation=None, options: Optional[SegmentationOptions] = None,
                waitForCompletion: bool = True, progressCallback=None, logCallback=None):
        """``startSegmentation``, then with ``waitForCompletion`` wait and return the ``SegmentationResult``
        (raises ``AttentionUNetSegmentError`` on failure); otherwise return the running ``SegmentationJob``."""
        job = self.startSegmentation(inputVolume, outputSegmentation, options, progressCallback, logCallback)
        if not waitForCompletion:
            return job
        job.wait()
        if job.cancelled:
            raise AttentionUNetSegmentError(_("The segmentation was cancelled."))
        if job.error:
            raise AttentionUNetSegmentError(job.error)
        return job.result

    def startBatch(self, volumes: Sequence[Any], options: Optional[SegmentationOptions] = None,
                   progressCallback=None, logCallback=None) -> BatchJob:
        return BatchJob(self, volumes, options or SegmentationOptions(), progressCallback, logCallback).start()

    def processBatch(self, volumes: Sequence[Any], options: Optional[SegmentationOptions] = None,
                     waitForCompletion: bool = True, progressCallback=None, logCallback=None):
        """Segment each volume (a new segmentation per volume) with the same ``options``; returns the summary
        table node, or without ``waitForCompletion`` the running ``BatchJob``."""
        job = self.startBatch(volumes, options, progressCallback, logCallback)
        return job.wait().summaryTable if waitForCompletion else job
