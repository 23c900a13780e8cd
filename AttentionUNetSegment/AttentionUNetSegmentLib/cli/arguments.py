"""Command-line value parsers shared by the commands (``positive_int``: ``segment``, ``summary``, ``gradcheck``;
``label_name``/``label_names``: ``train``, ``evaluate``): a bad value is refused by argparse (exit status 2, one line
naming the option) before any work starts."""

from __future__ import annotations

import argparse
from typing import Dict, Optional, Sequence

from ..errors import DatasetError
from ..model.bundle import MAX_LABEL_VALUE


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def label_name(text: str) -> str:
    """One ``VALUE=NAME`` item of ``--label-names`` (checked here, collected by ``label_names``)."""
    value, _, name = text.partition("=")
    if not value.strip().isdigit() or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} must look like VALUE=NAME, e.g. 1=Liver")
    if not 1 <= int(value) <= MAX_LABEL_VALUE:
        raise argparse.ArgumentTypeError(
            f"{text!r}: name foreground labels only, with values 1..{MAX_LABEL_VALUE} (0 is the background)")
    return text


def label_names(items: Optional[Sequence[str]]) -> Optional[Dict[int, str]]:
    """``{value: name}`` from ``--label-names`` items already checked by ``label_name``; ``None`` when absent."""
    if not items:
        return None
    names: Dict[int, str] = {}
    for item in items:
        value, _, name = item.partition("=")
        if int(value) in names:
            raise DatasetError(f"--label-names names label {int(value)} twice; give each value once")
        names[int(value)] = name.strip()
    return names
