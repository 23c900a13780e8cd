"""Editing a saved bundle's ``model.json`` in tests, as an author (or an attacker) would."""

from __future__ import annotations

import json
from pathlib import Path

from AttentionUNetSegmentLib.model.bundle import DIGEST_KEY, metadata_digest


def edit_metadata(directory: Path, edit, redigest: bool = True) -> None:
    """Apply ``edit`` to the bundle's model.json; ``redigest`` recomputes its metadata_sha256, as an author who
    re-exports would (so a test exercises the schema check, not the digest's), ``False`` leaves it as a tamperer
    would."""
    path = Path(directory) / "model.json"
    metadata = json.loads(path.read_text())
    edit(metadata)
    if redigest and DIGEST_KEY in metadata:
        metadata[DIGEST_KEY] = metadata_digest(metadata)
    path.write_text(json.dumps(metadata))
