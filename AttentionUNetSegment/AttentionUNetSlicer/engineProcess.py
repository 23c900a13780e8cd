"""Run the engine's command line in a child process and follow its ``--progress json`` output.

The 3D Slicer module segments out of process (as MONAIAuto3DSeg does): the GUI stays responsive, a crash or an
out-of-memory kill cannot take Slicer down, and Cancel is a prompt, clean process termination. This module is the
pure-Python part of that: it builds the ``segment`` command, starts it, parses its JSON progress lines, estimates
the remaining time, cancels, and turns a failure into a message the user can act on. It never imports ``slicer``;
callbacks run only inside ``poll``/``wait``, i.e. on the caller's thread (Slicer's main thread).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from AttentionUNetSegmentLib.preprocessing.domain import LOCALIZE_MODES

#: Seconds a cancelled engine gets to exit after SIGTERM before it is killed.
CANCEL_GRACE_SECONDS = 3.0
#: Lines of engine output kept for error messages.
ERROR_CONTEXT_LINES = 8
#: The ETA is not shown before this fraction/elapsed time (early estimates are noise: imports, model loading).
ETA_MIN_FRACTION = 0.03
ETA_MIN_SECONDS = 2.0

_STDOUT = "stdout"
_STDERR = "stderr"
_EOF = object()


@dataclass(frozen=True)
class Progress:
    """One progress update of the engine: ``fraction`` in 0..1 and the seconds it still needs (``None``: unknown)."""

    stage: str
    fraction: float
    message: str
    etaSeconds: Optional[float]


@dataclass
class RunResult:
    """How an engine run ended. ``error`` is a user-facing sentence when it failed (``None`` on success)."""

    returncode: Optional[int]
    cancelled: bool
    outputs: Dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None
    log: List[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.cancelled and self.error is None


def buildSegmentCommand(
    inputs: Sequence[str],
    outputDir: str,
    *,
    python: Optional[str] = None,
    model: Optional[str] = None,
    device: str = "auto",
    overlap: Optional[float] = None,
    tta: bool = False,
    roi: Optional[Sequence[float]] = None,
    localize: Optional[str] = None,
    attention: bool = True,
    probabilities: bool = False,
    largestComponent: bool = False,
    outputFormat: str = "nrrd",
    force: bool = False,
) -> List[str]:
    """The ``python -m AttentionUNetSegmentLib segment ... --progress json`` command (CLI contract in DESIGN.md).

    ``roi`` is a RAS box ``(R_MIN, R_MAX, A_MIN, A_MAX, S_MIN, S_MAX)`` in millimetres. ``localize`` is
    ``"auto"``/``"off"`` (``--localize``), or ``None`` to leave the engine's default (older engines lack the option).
    """
    if not inputs:
        raise ValueError("buildSegmentCommand needs at least one input image")
    command = [python or sys.executable, "-m", "AttentionUNetSegmentLib", "segment", *map(str, inputs),
               "--output-dir", str(outputDir), "--device", device, "--format", outputFormat,
               "--progress", "json"]
    if model:
        command += ["--model", str(model)]
    if overlap is not None:
        command += ["--overlap", f"{float(overlap):g}"]
    if tta:
        command.append("--tta")
    if roi is not None:
        if len(roi) != 6:
            raise ValueError(f"roi needs six numbers (R_MIN R_MAX A_MIN A_MAX S_MIN S_MAX), got {len(roi)}")
        command += ["--roi", *(f"{float(v):.6g}" for v in roi)]
    if localize is not None:
        if localize not in LOCALIZE_MODES:
            raise ValueError(f"localize must be one of {LOCALIZE_MODES}, got {localize!r}")
        command += ["--localize", localize]
    if not attention:
        command.append("--no-attention")
    if probabilities:
        command.append("--probabilities")
    if largestComponent:
        command.append("--largest-component")
    if force:
        command.append("--force")
    return command


def buildDicomSegCommand(labels: str, sourcesFile: str, segments: str, output: str, algorithm: Sequence[str],
                         *, python: Optional[str] = None, force: bool = False) -> List[str]:
    """The ``python -m AttentionUNetSegmentLib dicom-seg ... --progress json`` command: a DICOM SEG of the label map
    ``labels`` on the series whose files ``sourcesFile`` lists (one path a line, read as ``@sourcesFile``), with
    the segments of ``segments`` (JSON) and ``algorithm`` = (name, version)."""
    if len(algorithm) != 2:
        raise ValueError(f"algorithm needs a name and a version, got {list(algorithm)}")
    command = [python or sys.executable, "-m", "AttentionUNetSegmentLib", "dicom-seg", str(labels),
               "--source", f"@{sourcesFile}", "--segments", str(segments), "--algorithm", *map(str, algorithm),
               "--output", str(output), "--progress", "json"]
    return command + (["--force"] if force else [])


def buildDevicesCommand(python: Optional[str] = None) -> List[str]:
    """The ``python -m AttentionUNetSegmentLib devices --json`` command: one JSON line naming the GPUs the engine
    sees (no progress lines)."""
    return [python or sys.executable, "-m", "AttentionUNetSegmentLib", "devices", "--json"]


def formatDuration(seconds: Optional[float]) -> str:
    """``"1 h 02 min"``, ``"3 min 05 s"``, ``"12 s"``; empty for ``None``."""
    if seconds is None:
        return ""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


class EtaEstimator:
    """Remaining time from the progress rate since the first update (linear extrapolation)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._start: Optional[float] = None
        self._startFraction = 0.0

    def update(self, fraction: float) -> Optional[float]:
        now = self._clock()
        if self._start is None:
            self._start, self._startFraction = now, fraction
            return None
        done = fraction - self._startFraction
        elapsed = now - self._start
        if fraction >= 1.0:
            return 0.0
        if done < ETA_MIN_FRACTION or elapsed < ETA_MIN_SECONDS:
            return None
        return elapsed * (1.0 - fraction) / done


def describeFailure(returncode: Optional[int], log: Sequence[str]) -> str:
    """A sentence for the user about why the engine exited with ``returncode`` (its output lines in ``log``)."""
    for line in reversed(log):
        if line.startswith("error: "):  # the engine's own actionable message (exit status 2)
            return line[len("error: "):].strip()
    text = "\n".join(log)
    tail = "\n".join(log[-ERROR_CONTEXT_LINES:])
    if "out of memory" in text.lower():
        return ("The computer ran out of memory while segmenting, even after the engine retried with smaller "
                "batches. Choose the CPU device under Advanced, restrict the region with an ROI, or close other "
                f"programs, then run again.\nLast engine messages:\n{tail}")
    missing = [line for line in log if "No module named" in line]
    if missing:
        return (f"A Python package the engine needs is not installed ({missing[-1].strip()}). Click Apply again "
                "to install it (internet access is needed once), or install it from the Python console with "
                f"slicer.util.pip_install, then restart 3D Slicer.\nLast engine messages:\n{tail}")
    if returncode is not None and returncode < 0:
        return (f"The segmentation engine was stopped by the operating system (signal {-returncode}), usually "
                "because memory ran out. Restrict the region with an ROI or choose the CPU device and run again."
                f"\nLast engine messages:\n{tail}")
    return (f"The segmentation engine stopped unexpectedly (exit status {returncode}). The full log is shown "
            f"in the panel; please report it if the problem persists.\nLast engine messages:\n{tail}")


class EngineProcess:
    """One engine run in a child process.

    ``start()`` launches it; ``poll()`` (non-blocking) handles what it printed since the last call, calling
    ``onProgress(Progress)`` and ``onLog(str)``, and returns whether it still runs; ``wait()`` polls until it ends;
    ``cancel()`` tells it (and its children) to stop and returns at once: the polls that follow kill it if it is
    still there after ``CANCEL_GRACE_SECONDS`` and end the run. ``result`` is set once it has ended.
    """

    def __init__(
        self,
        command: Sequence[str],
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        onProgress: Optional[Callable[[Progress], None]] = None,
        onLog: Optional[Callable[[str], None]] = None,
    ) -> None:
        self.command = [str(part) for part in command]
        self.env = dict(os.environ if env is None else env)
        self.env["PYTHONUNBUFFERED"] = "1"  # progress lines must arrive as they are printed
        self.cwd = cwd
        self.onProgress = onProgress
        self.onLog = onLog
        self.progress = Progress(stage="starting", fraction=0.0, message="Starting the engine", etaSeconds=None)
        self.result: Optional[RunResult] = None
        self._log: List[str] = []
        self._outputs: Dict[str, Any] = {}
        self._lines: "queue.Queue[Any]" = queue.Queue()
        self._openStreams = 0
        self._process: Optional[subprocess.Popen] = None
        self._cancelled = False
        self._cancelledAt = 0.0
        self._killed = False
        self._stopper: Optional[subprocess.Popen] = None  # Windows: cancel's taskkill, held while it runs
        self._eta = EtaEstimator()
        self._startedAt = 0.0

    @property
    def running(self) -> bool:
        return self._process is not None and self.result is None

    def start(self) -> "EngineProcess":
        if self._process is not None:
            raise RuntimeError("this engine run was already started")
        options: Dict[str, Any] = {}
        if sys.platform == "win32":
            options["creationflags"] = subprocess.CREATE_NO_WINDOW  # no console window flashing up
        else:
            options["start_new_session"] = True  # own process group, so cancel reaches any child process
        self._startedAt = time.monotonic()
        self._process = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env,
            cwd=self.cwd, text=True, encoding="utf-8", errors="replace", bufsize=1, **options)
        for name, stream in ((_STDOUT, self._process.stdout), (_STDERR, self._process.stderr)):
            self._openStreams += 1
            threading.Thread(target=self._pump, args=(name, stream), daemon=True).start()
        return self

    def _pump(self, name: str, stream: Any) -> None:
        """Reader thread: forward each line to the queue (no parsing, no callbacks here)."""
        try:
            for line in iter(stream.readline, ""):
                self._lines.put((name, line.rstrip("\r\n")))
        finally:
            stream.close()
            self._lines.put((name, _EOF))

    def poll(self) -> bool:
        """Handle the engine's new output; ``True`` while it still runs."""
        if self._process is None:
            raise RuntimeError("start() the engine run before polling it")
        if self.result is not None:
            return False
        while True:
            try:
                name, line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is _EOF:
                self._openStreams -= 1
            elif name == _STDOUT:
                self._handleStdout(line)
            else:
                self._addLog(line)
        if self._process.poll() is None:
            if self._graceOver() and not self._killed:
                self._killed = True
                self._kill()
            return True
        if self._openStreams == 0 or self._graceOver():  # not waiting on pipes a surviving grandchild holds
            self._finish()
            return False
        return True

    def _graceOver(self) -> bool:
        """A cancel's grace period has passed: the engine still running is killed, and output pipes a surviving
        grandchild might still hold open are no longer waited for."""
        return self._cancelled and time.monotonic() - self._cancelledAt > CANCEL_GRACE_SECONDS

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05) -> RunResult:
        """Poll until the run ends (``TimeoutError`` after ``timeout`` seconds, the run keeps going)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the engine did not finish within {timeout} s")
            time.sleep(interval)
        assert self.result is not None
        return self.result

    def cancel(self) -> None:
        """Tell the engine to stop, without waiting for it (Slicer calls this on its GUI thread): SIGTERM to its
        process group; on Windows ``taskkill /F /T`` on the launcher's tree, started and not waited for. ``poll()``
        kills what is still there ``CANCEL_GRACE_SECONDS`` later and ends the run once the engine has exited."""
        if self._process is None or self.result is not None or self._cancelled:
            return
        self._cancelled = True
        self._cancelledAt = time.monotonic()
        if self._process.poll() is None:
            self._stop()

    def _stop(self) -> None:
        assert self._process is not None
        try:
            if sys.platform == "win32":
                # The process is Slicer's launcher (PythonSlicer): kill() alone would leave the Python it started
                # running, holding the output pipes; taskkill /T ends the whole tree.
                self._stopper = subprocess.Popen(
                    ["taskkill", "/F", "/T", "/PID", str(self._process.pid)], stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
            else:
                os.killpg(self._process.pid, signal.SIGTERM)
        except OSError:  # already gone, or no taskkill: the kill after the grace period remains
            pass

    def _kill(self) -> None:
        """The engine outlived the grace period after a cancel: kill its process group (Windows: the launcher)."""
        assert self._process is not None
        try:
            if sys.platform == "win32":
                self._process.kill()
            else:
                os.killpg(self._process.pid, signal.SIGKILL)
        except OSError:  # already gone
            pass

    def _handleStdout(self, line: str) -> None:
        event = jsonRecord(line)
        if event is None or "stage" not in event:  # any other output line, JSON or not
            self._addLog(line)
            return
        stage = str(event.get("stage", ""))
        fraction = min(max(float(event.get("fraction", self.progress.fraction)), 0.0), 1.0)
        message = str(event.get("message", ""))
        if stage == "done":
            self._outputs = dict(event.get("outputs") or {})
            message = message or "Done"
        if message and (stage != self.progress.stage or message != self.progress.message):
            self._addLog(f"[{stage}] {message}" if stage else message)
        self.progress = Progress(stage, fraction, message, self._eta.update(fraction))
        if self.onProgress is not None:
            self.onProgress(self.progress)

    def _addLog(self, line: str) -> None:
        if not line.strip():
            return
        self._log.append(line)
        if self.onLog is not None:
            self.onLog(line)

    def _finish(self) -> None:
        assert self._process is not None
        returncode = self._process.returncode
        error = None
        if not self._cancelled and returncode != 0:
            error = describeFailure(returncode, self._log)
        elif not self._cancelled and self.progress.stage != "done":
            error = describeFailure(returncode, self._log + ["the engine exited without reporting its outputs"])
        self.result = RunResult(returncode=returncode, cancelled=self._cancelled, outputs=self._outputs,
                                error=error, log=list(self._log), seconds=time.monotonic() - self._startedAt)


def jsonRecord(line: str) -> Optional[Dict[str, Any]]:
    """The JSON object an output line holds (a ``--progress json`` line, the ``devices --json`` record), or
    ``None`` for any other line."""
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None
