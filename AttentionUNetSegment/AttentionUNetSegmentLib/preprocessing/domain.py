"""What a model was trained on, and whether an input looks like it: the domain guard.

``train`` records ``measure_domain(...)`` in the bundle's ``domain`` section; ``segment`` and the Slicer panel call
``domain_warnings(...)`` with an input's geometry and warn (never refuse) when it is far outside. Pure Python +
numpy, no torch: the Slicer module calls it inside Slicer before Apply.

Extents and spacings are compared along the world axes (R-L, A-P, S-I), whatever the input's axis order, as the
absolute direction matrix times the voxel-axis quantities.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

#: Values of ``segment --localize``: locate the structure with the bundle's localiser when the input needs it, or not.
LOCALIZE_MODES = ("auto", "off")

#: Thresholds used where a bundle's ``domain.thresholds`` does not set them.
DEFAULT_THRESHOLDS = {
    # Input field of view / the training median, along any world axis, above which the input is "a larger view".
    "field_of_view_ratio": 2.0,
    # Input voxel size / the training median, along any world axis, above which voxels are "too coarse".
    "spacing_ratio": 2.0,
}


def world_extent(size_xyz: Sequence[int], spacing_xyz: Sequence[float],
                 direction: Optional[Sequence[float]] = None) -> np.ndarray:
    """Field of view in mm along the world axes (x, y, z) of a grid of ``size_xyz`` voxels of ``spacing_xyz``."""
    return _world(np.asarray(size_xyz, float) * np.asarray(spacing_xyz, float), direction)


def world_spacing(spacing_xyz: Sequence[float], direction: Optional[Sequence[float]] = None) -> np.ndarray:
    """Voxel size in mm along the world axes (x, y, z)."""
    return _world(np.asarray(spacing_xyz, float), direction)


def _world(per_axis: np.ndarray, direction: Optional[Sequence[float]]) -> np.ndarray:
    if direction is None:
        return per_axis
    return np.abs(np.asarray(direction, float).reshape(3, 3)) @ per_axis


def _summary(values: np.ndarray) -> Dict[str, List[float]]:
    return {"median": [round(float(v), 3) for v in np.median(values, axis=0)],
            "min": [round(float(v), 3) for v in values.min(axis=0)],
            "max": [round(float(v), 3) for v in values.max(axis=0)]}


def measure_domain(sizes_xyz: Sequence[Sequence[int]], spacings_xyz: Sequence[Sequence[float]],
                   directions: Optional[Sequence[Optional[Sequence[float]]]] = None,
                   modality: str = "") -> Dict[str, Any]:
    """The ``domain`` section of a bundle from the training cases' geometry (one entry per case).

    Returns ``{"field_of_view_mm": {"median", "min", "max"}, "spacing_mm": {...}, "modality", "thresholds"}``,
    each triple along the world axes (x, y, z) in mm.
    """
    if not sizes_xyz:
        raise ValueError("measure_domain needs at least one case")
    directions = directions or [None] * len(sizes_xyz)
    extents = np.array([world_extent(s, p, d) for s, p, d in zip(sizes_xyz, spacings_xyz, directions)])
    spacings = np.array([world_spacing(p, d) for p, d in zip(spacings_xyz, directions)])
    return {"field_of_view_mm": _summary(extents), "spacing_mm": _summary(spacings), "modality": modality,
            "thresholds": dict(DEFAULT_THRESHOLDS)}


def exceeds_field_of_view(size_xyz: Sequence[int], spacing_xyz: Sequence[float],
                          direction: Optional[Sequence[float]], domain: Optional[Mapping[str, Any]],
                          fallback_extent_mm: Sequence[float]) -> bool:
    """Whether an input's world extent exceeds ``field_of_view_ratio`` x the model's field of view along some axis:
    the test ``--localize auto`` (and the Slicer panel) apply. The model's field of view is the training median,
    or ``fallback_extent_mm`` (its patch in mm) for a bundle that records no ``domain``."""
    domain = domain or {}
    trained = (domain.get("field_of_view_mm") or {}).get("median") or fallback_extent_mm
    ratio = {**DEFAULT_THRESHOLDS, **dict(domain.get("thresholds") or {})}["field_of_view_ratio"]
    extent = world_extent(size_xyz, spacing_xyz, direction)
    return bool(np.any(extent > ratio * np.asarray(trained, float)))


def _triple(values: Sequence[float]) -> str:
    return " x ".join(f"{v:.3g}" for v in values)


def domain_warnings(size_xyz: Sequence[int], spacing_xyz: Sequence[float],
                    direction: Optional[Sequence[float]], domain: Optional[Mapping[str, Any]],
                    localizer: bool = False) -> List[str]:
    """Warnings (empty when the input looks like the training data, or the bundle records no domain).

    Each warning says what differs and what to do; ``localizer`` says whether the bundle can locate the structure
    itself (so the advice names ``--localize auto`` / "Locate automatically").
    """
    if not domain:
        return []
    thresholds = {**DEFAULT_THRESHOLDS, **dict(domain.get("thresholds") or {})}
    fix = ("give a Region (--roi) around the structure" +
           (", or let the model locate it (--localize auto, 'Locate automatically' in Slicer)" if localizer else ""))
    warnings = []
    extent = world_extent(size_xyz, spacing_xyz, direction)
    trained_extent = np.asarray(domain["field_of_view_mm"]["median"], float)
    ratio = float(np.max(extent / trained_extent))
    if ratio > thresholds["field_of_view_ratio"]:
        warnings.append(f"the input's field of view ({_triple(extent)} mm) is {ratio:.1f}x larger than the model "
                        f"was trained on ({_triple(trained_extent)} mm): the result is likely wrong; {fix}")
    spacing = world_spacing(spacing_xyz, direction)
    trained_spacing = np.asarray(domain["spacing_mm"]["median"], float)
    coarse = float(np.max(spacing / trained_spacing))
    if coarse > thresholds["spacing_ratio"]:
        warnings.append(f"the input's voxels ({_triple(spacing)} mm) are {coarse:.1f}x coarser than the model's "
                        f"training data ({_triple(trained_spacing)} mm): small structures may be missed; use a "
                        f"finer acquisition, or check the result carefully")
    return warnings
