"""Progress reporters: callables ``(stage, fraction, message)`` that the engine calls as work advances.

``fraction`` is the share of the *whole run* done so far, in 0..1. Three kinds, chosen with ``--progress``:

- ``bar``: a tqdm progress bar with elapsed time and ETA on stderr (for people at a terminal);
- ``json``: one JSON object per line on stdout, ``{"stage": str, "fraction": float, "message": str}`` (for programs
  such as the Slicer module that drive the engine);
- ``none``: silent.
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
    """Reports nothing."""

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        pass

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

    def close(self) -> None:
        pass


class BarProgress:
    """A tqdm bar over 0..100 % with elapsed time and ETA; the description shows the current stage."""

    def __init__(self, stream: Optional[IO[str]] = None) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=100, unit="%", file=stream if stream is not None else sys.stderr, leave=True,
                         bar_format="{desc:<28.28}|{bar}| {n:.0f}% [{elapsed}<{remaining}]")

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        self._bar.set_description_str(message or stage, refresh=False)
        self._bar.update(100.0 * _clamp(fraction) - self._bar.n)

    def close(self) -> None:
        self._bar.close()


def make_progress(kind: str, stream: Optional[IO[str]] = None):
    """The reporter for ``kind`` (``bar``, ``json`` or ``none``); call ``close()`` on it when the run ends."""
    if kind == "bar":
        return BarProgress(stream)
    if kind == "json":
        return JsonProgress(stream)
    if kind == "none":
        return NullProgress()
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
