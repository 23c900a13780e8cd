"""Engine runs as jobs polled on the main thread: one volume (``SegmentationJob``), several (``BatchJob``)."""

from __future__ import annotations

import pathlib
import shutil
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence

import slicer
from slicer.i18n import tr as _

from AttentionUNetSlicer.definitions import (
    DEFAULT_MODEL,
    ENGINE_FORMAT,
    ENGINE_INPUT_STEM,
    POLL_INTERVAL_MS,
    AttentionUNetSegmentError,
)
from AttentionUNetSlicer.dependencies import moduleAvailable
from AttentionUNetSlicer.engineProcess import (
    EngineProcess,
    EtaEstimator,
    Progress,
    buildDevicesCommand,
    buildSegmentCommand,
    jsonRecord,
)
from AttentionUNetSlicer.sceneImport import SegmentationResult
from AttentionUNetSlicer.volumeFiles import workDirectory

if TYPE_CHECKING:  # annotations only: logic.py imports this module
    from AttentionUNetSegmentLib.model.bundle import ModelBundle
    from AttentionUNetSlicer.logic import AttentionUNetSegmentLogic


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


class PolledRun:
    """What the runs share (``SegmentationJob``, ``BatchJob``, ``DeviceQuery``): ``poll()`` on the main thread
    (``True`` while running) until ``done``; ``wait``; ``cancel`` of a run of one engine process (``_engine``)."""

    def wait(self) -> "PolledRun":
        """Poll until the run has ended, letting Slicer's GUI handle its events meanwhile."""
        while self.poll():
            time.sleep(POLL_INTERVAL_MS / 1000.0)
            if hasattr(slicer, "app"):
                slicer.app.processEvents()
        return self

    def cancel(self) -> None:
        """Tell the engine to stop and return at once (the GUI thread never waits for the process): the run ends,
        with nothing added to the scene, at a later ``poll()`` (the panel's timer), once the engine has exited or
        was killed after its grace period."""
        if not self.done and self._engine is not None:
            self._engine.cancel()


class SegmentationJob(PolledRun):
    """One engine run for one volume. ``poll()`` on the main thread; results enter the scene only on success."""

    def __init__(self, logic: AttentionUNetSegmentLogic, inputVolume, outputSegmentation,
                 options: SegmentationOptions, bundle: ModelBundle,
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
        return buildSegmentCommand(
            [str(inputPath)], str(outputDir), python=self.logic.pythonExecutable(), model=str(self.bundle.path),
            device=options.device, overlap=options.overlap, tta=options.testTimeAugmentation, roi=roiBox,
            localize=localize, attention=options.attentionMaps, probabilities=options.probabilityMaps,
            largestComponent=options.largestComponent, outputFormat=ENGINE_FORMAT)

    def start(self) -> "SegmentationJob":
        self._workDir = workDirectory("segment")
        try:
            inputPath = self.logic.writeVolumeForEngine(self.inputVolume, self._workDir / "in")
            command = self.engineCommand(inputPath, self._workDir / "out")
            self._log(f"Segmenting '{self.inputVolume.GetName()}' with {self.bundle.name} {self.bundle.version}")
            self._engine = self.logic.engineProcessFactory(command, env=self.logic.engineEnvironment(),
                                                           cwd=str(self._workDir), onProgress=self._onProgress,
                                                           onLog=self._log).start()
        except Exception:
            self._cleanup()
            raise
        return self

    def _log(self, line: str) -> None:
        if self.logCallback is not None:
            self.logCallback(line)

    def _onProgress(self, progress: Progress) -> None:
        if self.progressCallback is not None:
            self.progressCallback(progress.fraction, progress.message or progress.stage, progress.etaSeconds)

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
                _("Loading the results into the scene failed: {error}").format(error=error)
            self._log(f"Failed: {self.error}")
        finally:
            self._cleanup()
            self.done = True
        return False

    def _cleanup(self) -> None:
        if self._workDir is not None:
            shutil.rmtree(self._workDir, ignore_errors=True)
            self._workDir = None


class BatchJob(PolledRun):
    """Segments several volumes one after the other (one result per volume) and fills a summary table: one row
    per volume with the columns of the engine's ``summary.csv`` (``outputs.summary_columns``)."""

    def __init__(self, logic: AttentionUNetSegmentLogic, volumes: Sequence[Any], options: SegmentationOptions,
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
        self._sceneClosing = False
        self._eta = EtaEstimator()  # over the whole batch: each volume's own ETA covers only that volume
        self.model = (options.model or DEFAULT_MODEL, "")  # (name, version) for the rows of volumes not run

    @property
    def summary(self) -> str:
        failed = sum(1 for row in self.rows if row["status"] != "done")
        warned = sum(1 for result in self.results if result.warnings)
        if warned:  # one sentence each, for the translators
            return _("{segmented} segmented, {failed} failed or skipped, of {total} volumes; {warned} with warnings "
                     "(see the table)").format(segmented=len(self.results), failed=failed, total=len(self.volumes),
                                               warned=warned)
        return _("{segmented} segmented, {failed} failed or skipped, of {total} volumes").format(
            segmented=len(self.results), failed=failed, total=len(self.volumes))

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
                self.rows.append(self.logic.summaryRow(volume, "not run", self.model, _("the batch was cancelled")))
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

    def cancel(self, sceneClosing: bool = False) -> None:
        """Stop the running volume's engine (returning at once, as ``SegmentationJob.cancel``); once it has ended
        the others are listed as not run. ``sceneClosing``: the scene is being closed (``StartCloseEvent``), so no
        summary table is added to it."""
        self.cancelled = True
        self._sceneClosing = sceneClosing
        if self._current is not None:
            self._current.cancel()

    def _finish(self) -> None:
        if not self._sceneClosing:
            self.summaryTable = self.logic.createSummaryTable(self.rows, self.results)
        self.seconds = time.monotonic() - self._started
        self.done = True
        self._log(f"Batch finished: {self.summary}")


class DeviceQuery(PolledRun):
    """The engine's ``devices --json`` in its own process (torch and a CUDA context never load into Slicer),
    polled like the jobs; ``text`` says in words what the engine will run on once ``done``."""

    def __init__(self, logic) -> None:
        self.logic = logic
        self.text = ""
        self.done = False
        self._engine = None
        self._deadline = time.monotonic() + DEVICE_QUERY_TIMEOUT_SECONDS

    def start(self) -> "DeviceQuery":
        if not moduleAvailable("torch"):
            self._finish(_("PyTorch is not installed yet; it is installed on the first run. The CPU always works."))
            return self
        try:
            self._engine = self.logic.engineProcessFactory(buildDevicesCommand(self.logic.pythonExecutable()),
                                                           env=self.logic.engineEnvironment()).start()
        except OSError:
            self._finish(deviceQueryFailed())
        return self

    def poll(self) -> bool:
        if self.done:
            return False
        if self._engine.poll():
            if time.monotonic() >= self._deadline:
                self._engine.cancel()  # a hung engine (e.g. a stuck GPU driver): stopped, then said so below
            return True
        self._finish(describeDevices(self._engine.result))
        return False

    def _finish(self, text: str) -> None:
        self.text, self.done = text, True


#: Seconds the device query may take (importing torch and initialising CUDA) before it is given up.
DEVICE_QUERY_TIMEOUT_SECONDS = 60.0


def deviceQueryFailed() -> str:
    """The panel's sentence when the engine could not say which devices it sees."""
    return _("Could not ask the engine which devices it sees; 'auto' uses a GPU if there is one, else the CPU.")


def describeDevices(outcome) -> str:
    """The panel's sentence for a finished ``devices --json`` run (its last output line is the JSON record)."""
    try:
        if outcome.cancelled or outcome.returncode != 0:
            raise ValueError(outcome.error)
        info = next(record for record in map(jsonRecord, reversed(outcome.log)) if record and "gpus" in record)
        gpus = info["gpus"]
        if gpus:
            return _("GPU found: {name} ({memory} GB), CUDA {cuda}. 'auto' uses it.").format(
                name=gpus[0]["name"], memory=f"{gpus[0]['memory_gb']:.0f}", cuda=info.get("cuda"))
    except (ValueError, StopIteration, KeyError, TypeError):
        return deviceQueryFailed()
    return _("No CUDA GPU found: 'auto' runs on the CPU (slower; an ROI shortens it).")
