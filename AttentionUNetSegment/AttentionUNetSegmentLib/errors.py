"""Errors the user can act on.

Every engine function that rejects input raises one of these with a message that says what was wrong and how to
fix it; the CLI prints it as one ``error:`` line and exits with status 2 (no traceback). ``AttentionUNetError`` is
the one root (the Slicer package's own error class is a kind of it too); ``error_message`` words every error a user
can act on, these and the operating system's (a full disk, running out of memory), in one line.
"""

from __future__ import annotations

import re
from typing import Any, List, Optional


class AttentionUNetError(Exception):
    """Base class of every error meant for the user (exit status 2 in the CLI)."""


class InputImageError(AttentionUNetError):
    """An input image is missing, unreadable or unsuitable (2D/4D/RGB, NaN/Inf, empty, constant)."""


class ModelBundleError(AttentionUNetError):
    """A model bundle is missing, corrupt, tampered with or incompatible with this engine. ``problem`` is what is
    wrong without the advice on fixing the bundle (for callers that give their own advice)."""

    def __init__(self, message: str, problem: str = "") -> None:
        super().__init__(message)
        self.problem = problem or message


class OutputExistsError(AttentionUNetError):
    """An output file exists and overwriting was not asked for (``--force``)."""


class DatasetError(AttentionUNetError):
    """A training or evaluation dataset is malformed (named case, what is wrong, how to fix it)."""


class CancelledError(AttentionUNetError):
    """The run was cancelled by the caller; nothing was written."""


class InputsFailedError(AttentionUNetError):
    """Some inputs of a run over several failed while the others were segmented: ``failed`` maps each failed
    input's stem to its error, ``written`` the others to their outputs, ``summary`` is the ``summary.csv``."""

    def __init__(self, message: str, failed, written, summary) -> None:
        super().__init__(message)
        self.failed, self.written, self.summary = failed, written, summary


class UsageError(AttentionUNetError):
    """A command-line option is missing or malformed."""


#: Messages of allocation failures in host memory (torch's CPU allocator on Linux/macOS and Windows, ITK, numpy).
_HOST_MEMORY_ERRORS = ("DefaultCPUAllocator", "can't allocate memory", "not enough memory",
                       "Failed to allocate memory", "Unable to allocate")


def memory_error_kind(error: BaseException) -> Optional[str]:
    """``"host"`` (RAM), ``"gpu"`` or ``None`` (not an allocation failure) for an exception that ended a run."""
    if isinstance(error, MemoryError):
        return "host"
    text = str(error)
    if any(marker in text for marker in _HOST_MEMORY_ERRORS):
        return "host"
    if "out of memory" in text.lower():
        return "gpu" if any(word in text.lower() for word in ("cuda", "gpu", "mps", "hip")) else "host"
    return None


def out_of_memory_message(error: BaseException, kind: str, args: Any = None) -> str:
    """One line on what ran out and the advice that fits the command and device (never "use --device cpu" for
    RAM: the CPU is what already ran out)."""
    command = getattr(args, "command", None)
    amount = re.search(r"allocate (\d+) bytes", str(error))
    needed = f" (an allocation of {int(amount.group(1)) / 2**30:.2f} GiB failed)" if amount else ""
    advice: List[str] = []
    if command == "segment":
        if (getattr(args, "batch_size", None) or 1) > 1:
            advice.append("a smaller --batch-size")
        advice.append("a --roi around the structure")
        if getattr(args, "probabilities", False):
            advice.append("no --probabilities")
        if kind == "gpu":
            advice.append("--device cpu")
    elif command == "train":
        advice.append("a smaller --batch-size or --patch-size")
        if kind == "gpu":
            advice.append("--amp bf16 or --gradient-checkpointing")
    elif kind == "gpu":
        advice.append("--device cpu")
    if kind == "host":
        advice.append("closing other programs")
        return f"out of memory (RAM){needed}; try {', '.join(advice)}, or a machine with more memory"
    return f"the GPU ran out of memory{needed}; try {', '.join(advice)}"


def error_message(error: BaseException, args: Any = None) -> Optional[str]:
    """The one-line message (without ``error:``) for an error the user can act on, None for any other (a bug,
    whose traceback must show): an ``AttentionUNetError``, an ``OSError`` (the disk filled up or a folder became
    unwritable while writing), running out of memory. ``args`` (the parsed command line, or any object with its
    ``command``, ``batch_size`` and ``probabilities``) picks the advice. The CLI prints it; a batch records it per
    input."""
    if isinstance(error, AttentionUNetError):
        return str(error)
    if isinstance(error, OSError):
        return (f"{error}; check that the output folder is writable and has free space (no partial outputs were "
                "kept)")
    kind = memory_error_kind(error) if isinstance(error, (MemoryError, RuntimeError)) else None
    if kind is None:
        return None
    return f"{out_of_memory_message(error, kind, args)} (no partial outputs were kept)"

