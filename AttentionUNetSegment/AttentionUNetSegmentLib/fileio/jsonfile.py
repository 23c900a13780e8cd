"""Reading JSON documents that users or other tools wrote (bundles, ROIs, dataset lists, plans, reports).

One reader for every JSON input, so each gets the same limits: a regular file, at most ``MAX_JSON_BYTES``, valid
UTF-8 JSON no deeper than Python's parser can take. Anything else is one user error naming the file and the fix.
``read_text`` applies the same file limits to the plain-text lists read beside them (a list of case names).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Type, Union

from ..errors import AttentionUNetError

#: Largest JSON document read (bytes). Every JSON the engine reads is metadata: kilobytes, never gigabytes.
MAX_JSON_BYTES = 16 * 1024 * 1024


def read_text(path: Union[str, Path], what: str, error: Type[AttentionUNetError] = AttentionUNetError,
              max_bytes: int = MAX_JSON_BYTES) -> str:
    """The UTF-8 text at ``path``; ``what`` names it in messages (e.g. ``"case list"``).

    Raises ``error(message)`` when the path is not a regular file (a folder, a pipe), is larger than
    ``max_bytes`` or is not UTF-8.
    """
    return _read(Path(path), what, error, max_bytes, "text")


def _read(path: Path, what: str, error: Type[AttentionUNetError], max_bytes: int, kind: str) -> str:
    try:
        info = os.stat(path)
    except OSError as failure:
        raise error(f"{what} {path} cannot be read ({failure.strerror or failure})") from None
    too_large = (f"more than the {max_bytes / 2**20:.0f} MiB a {kind} document may have here; it is not a file "
                 f"this tool wrote, or it is damaged")
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{what} {path} is not a regular file; give the path of a {kind} file")
    if info.st_size > max_bytes:
        raise error(f"{what} {path} is {info.st_size / 2**20:.1f} MiB, {too_large}")
    try:
        with open(path, "rb") as handle:
            raw = handle.read(max_bytes + 1)
        if len(raw) > max_bytes:  # it grew after the stat
            raise error(f"{what} {path} is {too_large}")
        return raw.decode("utf-8")
    except OSError as failure:
        raise error(f"{what} {path} cannot be read ({failure.strerror or failure})") from None
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not UTF-8 text; save it as UTF-8 {kind}") from None


def read_json(path: Union[str, Path], what: str, error: Type[AttentionUNetError] = AttentionUNetError,
              max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The parsed document at ``path``; ``what`` names it in messages (e.g. ``"model metadata"``).

    Raises ``error(message)`` when the path is not a regular file, is larger than ``max_bytes``, is not UTF-8, is
    not JSON, or nests too deeply to parse (``RecursionError``).
    """
    text = _read(Path(path), what, error, max_bytes, "JSON")
    try:
        return json.loads(text)
    except RecursionError:
        raise error(f"{what} {path} nests too deeply to read; it is not a file this tool wrote, or it is "
                    f"damaged") from None
    except ValueError as failure:
        raise error(f"{what} {path} is not valid JSON ({failure}); fix or re-create it") from None
