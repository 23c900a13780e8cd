"""The module's Logic: the one entry point for scripts and the panel, composed of the concern classes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence

from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from AttentionUNetSlicer.batchSummary import BatchSummary
from AttentionUNetSlicer.definitions import MODULE_DIR, AttentionUNetSegmentError
from AttentionUNetSlicer.dependencies import DependencyInstaller, _module_available
from AttentionUNetSlicer.export import Export
from AttentionUNetSlicer.inputChecks import InputChecks
from AttentionUNetSlicer.jobs import BatchJob, SegmentationJob, SegmentationOptions
from AttentionUNetSlicer.models import ModelCatalog
from AttentionUNetSlicer.parameters import AttentionUNetSegmentParameterNode
from AttentionUNetSlicer.sceneImport import SceneImport
from AttentionUNetSlicer.volumeFiles import VolumeFiles


class AttentionUNetSegmentLogic(ScriptedLoadableModuleLogic, DependencyInstaller, ModelCatalog, InputChecks,
                                VolumeFiles, SceneImport, BatchSummary, Export):
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

    def pythonExecutable(self) -> str:
        return self.enginePython or shutil.which("PythonSlicer") or sys.executable

    def engineEnvironment(self) -> Dict[str, str]:
        """The engine's environment: this one, with the module folder first on ``PYTHONPATH``."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(MODULE_DIR), env.get("PYTHONPATH", "")) if p)
        return env

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
