"""Progress reporters: the one progress system of ``segment``, ``train`` and ``evaluate``.

A reporter is a callable ``(stage, fraction, message)`` the engine calls at each milestone (an input segmented, an
epoch validated, a case scored); ``fraction`` is the share of the *whole run* done so far, in 0..1. Two more calls
serve people rather than programs: ``advance(stage, fraction, message)``, a passing state that only a bar shows
(a training step's loss), and ``log(message)``, a line for the reader (an epoch's scores: above the bar, on stderr
without one, not among the JSON records). Three kinds, chosen with ``--progress``:

- ``bar``: a tqdm progress bar with elapsed time and ETA on stderr (for people at a terminal);
- ``json``: one JSON object per milestone and line on stdout, ``{"stage": str, "fraction": float, "message": str}``
  (for programs such as the Slicer module that drive the engine);
- ``none``: no progress; ``log`` lines still go to stderr.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any, Callable, Dict, Optional

#: What every reporter is: ``reporter(stage, fraction, message)``.
ProgressCallback = Callable[[str, float, str], None]

PROGRESS_KINDS = ("bar", "json", "none")


def _clamp(fraction: float) -> float:
    return min(1.0, max(0.0, float(fraction)))


class NullProgress:
    """Reports no progress; ``log`` lines go to ``stream`` (stderr)."""

    def __init__(self, stream: Optional[IO[str]] = None) -> None:
        self.stream = stream

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        pass

    def advance(self, stage: str, fraction: float, message: str = "") -> None:
        pass

    def log(self, message: str) -> None:
        print(message, file=self.stream if self.stream is not None else sys.stderr, flush=True)

    def close(self) -> None:
        pass


class JsonProgress:
    """One JSON object per line, flushed at once so a reading process sees it immediately."""

    def __init__(self, stream: Optional[IO[str]] = None) -> None:
        self.stream = stream if stream is not None else sys.stdout

    def emit(self, record: Dict[str, Any]) -> None:
        self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        self.emit({"stage": stage, "fraction": round(_clamp(fraction), 4), "message": message})

    def advance(self, stage: str, fraction: float, message: str = "") -> None:
        pass  # milestones only: a program reading the lines needs no per-step records

    def log(self, message: str) -> None:
        pass  # stdout holds the records, stderr only errors; a milestone's message carries the text

    def close(self) -> None:
        pass


class BarProgress:
    """A tqdm bar over 0..100 % with elapsed time and ETA; the description shows the current stage. The first
    report sets where the bar starts (a resumed run) and starts its clock (lines logged before it, such as a
    training run's preparation, are not work the rate counts), so the ETA counts only the work done since.
    ``mininterval``: the least seconds between redraws."""

    def __init__(self, stream: Optional[IO[str]] = None, mininterval: float = 0.1) -> None:
        from tqdm import tqdm

        self._started = False
        self._bar = tqdm(total=100, unit="%", file=stream if stream is not None else sys.stderr, leave=True,
                         mininterval=mininterval, bar_format="{desc:<28.28}|{bar}| {n:.0f}% [{elapsed}<{remaining}]")

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        self._bar.set_description_str(message or stage, refresh=False)
        percent = 100.0 * _clamp(fraction)
        if not self._started:
            self._started = True
            self._bar.reset()
            if percent > 0:
                self._bar.initial = self._bar.n = self._bar.last_print_n = percent
                self._bar.refresh()
                return
        self._bar.update(percent - self._bar.n)

    advance = __call__

    def log(self, message: str) -> None:
        self._bar.write(message, file=self._bar.fp)

    def close(self) -> None:
        self._bar.close()


def make_progress(kind: str, stream: Optional[IO[str]] = None, mininterval: float = 0.1):
    """The reporter for ``kind`` (``bar``, ``json`` or ``none``); call ``close()`` on it when the run ends.
    ``stream`` replaces stderr (bar, none) or stdout (json); ``mininterval`` is the bar's (see ``BarProgress``)."""
    if kind == "bar":
        return BarProgress(stream, mininterval)
    if kind == "json":
        return JsonProgress(stream)
    if kind == "none":
        return NullProgress(stream)
    raise ValueError(f"unknown progress kind {kind!r}: choose one of {', '.join(PROGRESS_KINDS)}")


def default_progress_kind() -> str:
    """``bar`` when stderr is a terminal, else ``none`` (logs stay free of control characters)."""
    return "bar" if sys.stderr.isatty() else "none"


def scaled(progress: Optional[ProgressCallback], start: float, stop: float) -> ProgressCallback:
    """A callback that maps a sub-task's own 0..1 onto ``start..stop`` of ``progress`` (e.g. input i of n)."""

    def report(stage: str, fraction: float, message: str = "") -> None:
        if progress is not None:
            progress(stage, start + (stop - start) * _clamp(fraction), message)

    return report
