"""Per-segment voxel counts and volumes, per-side totals (the engine's ``side_statistics``)."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import slicer

from AttentionUNetSlicer.definitions import SIDES


def voxelVolumeMl(volumeNode) -> float:
    sx, sy, sz = volumeNode.GetSpacing()
    return sx * sy * sz / 1000.0


def voxelCounts(labelmapNode) -> Dict[int, int]:
    import numpy as np

    values, counts = np.unique(slicer.util.arrayFromVolume(labelmapNode), return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts) if v != 0}


def statisticsRows(labels: Sequence[Any], sides: Dict[int, str], counts: Dict[int, int],
                     voxelMl: float) -> List[Dict[str, Any]]:
    """Per label: value, name, side (``None`` unless the run located each side), voxels and mL."""
    return [{"value": label.value, "name": label.name, "side": sides.get(label.value),
             "voxels": counts.get(label.value, 0), "volume_ml": counts.get(label.value, 0) * voxelMl}
            for label in labels]


def sideTotals(rows: Sequence[Dict[str, Any]]):
    """``(sides, asymmetry)``: the engine's ``side_statistics`` of the segment rows (voxels and mL per side, the
    asymmetry index (L - R) / ((L + R) / 2)), sides in left/right order; ``({}, None)`` when no row has a side (a
    crop), and no index unless both sides are present."""
    from AttentionUNetSegmentLib.inference.outputs import side_statistics

    totals, asymmetry = side_statistics(rows)
    sides = {side: totals[side] for side in SIDES if side in (totals or {})}
    return sides, (asymmetry if len(sides) == len(SIDES) else None)
