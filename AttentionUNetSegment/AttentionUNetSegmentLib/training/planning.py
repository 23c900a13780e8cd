"""Training plans: the few decisions derived from a dataset before training (like nnU-Net's plans, but small).

A ``TrainingPlan`` fixes target spacing, patch size, intensity normalisation, network widths, batch size and the
axes along which mirroring is anatomically safe. ``plan_training`` derives each from a ``DatasetFingerprint``
(per-case spacing, size and foreground intensities gathered while the dataset is validated); every field can be
overridden by the user and the plan is written into the work directory and the bundle's metadata.

Spatial triples are ITK ``(x, y, z)`` order here, as in the bundle.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

AXES = ("x", "y", "z")
#: Label-name words that tie a label to one side of an axis: mirroring along that axis would swap their meaning.
_SIDED_WORDS = {
    "x": ("left", "right"),
    "y": ("anterior", "posterior", "front", "back"),
    "z": ("superior", "inferior", "upper", "lower", "top", "bottom"),
}
#: Upper bound on the patch's voxel count (about 128 x 128 x 128): beyond it the patch shrinks, largest axis first.
MAX_PATCH_VOXELS = 128 ** 3
#: Spacing ratio above which a dataset counts as anisotropic (its coarse axis then uses the 10th percentile).
ANISOTROPY_RATIO = 3.0


@dataclass
class CaseFingerprint:
    """What planning needs to know about one case (read once while validating the dataset).

    ``spacing`` and ``size`` are ``(x, y, z)`` in the canonical orientation; ``foreground_intensities`` is a small
    random sample of image values inside the label's foreground (for CT normalisation).
    """

    name: str
    spacing: Tuple[float, float, float]
    size: Tuple[int, int, int]
    label_voxels: Dict[int, int]
    foreground_intensities: List[float] = field(default_factory=list)


@dataclass
class DatasetFingerprint:
    """Per-case fingerprints plus the dataset's modality (``"CT"``, ``"MRI"``, ...)."""

    cases: List[CaseFingerprint]
    modality: str = "MRI"

    def median_spacing(self) -> Tuple[float, float, float]:
        spacings = np.array([case.spacing for case in self.cases], dtype=np.float64)
        return tuple(float(v) for v in np.median(spacings, axis=0))  # type: ignore[return-value]


@dataclass
class TrainingPlan:
    """Everything planning decides; serialised with ``to_dict`` into ``plan.json`` and the bundle.

    Attributes:
        orientation: canonical orientation code every case is reoriented to (``"RAS"``).
        target_spacing: resampling target in mm, ``(x, y, z)``.
        patch_size: training and sliding-window patch in voxels, ``(x, y, z)``; each a multiple of
            ``2 ** (len(channels) - 1)``.
        normalization: the bundle's ``normalization`` dict (``{"scheme": "zscore"}`` or the ``"ct"`` scheme).
        channels: network widths per level, finest first.
        batch_size: patches per optimiser step (per process under DDP).
        flip_axes: axes (``"x"``, ``"y"``, ``"z"``) along which random mirroring keeps every label's meaning.
    """

    orientation: str = "RAS"
    target_spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    patch_size: Tuple[int, int, int] = (64, 64, 64)
    normalization: Dict[str, Any] = field(default_factory=lambda: {"scheme": "zscore"})
    channels: Tuple[int, ...] = (16, 32, 64, 128)
    batch_size: int = 2
    flip_axes: Tuple[str, ...] = ()

    @property
    def divisor(self) -> int:
        """Every patch axis must be a multiple of this (one halving per pooling step)."""
        return 2 ** (len(self.channels) - 1)

    def preprocessing(self) -> Dict[str, Any]:
        """The bundle's ``preprocessing`` section."""
        return {"orientation": self.orientation, "target_spacing": [float(s) for s in self.target_spacing],
                "normalization": dict(self.normalization)}

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        for key in ("target_spacing", "patch_size", "channels", "flip_axes"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainingPlan":
        return cls(
            orientation=str(data["orientation"]),
            target_spacing=tuple(float(v) for v in data["target_spacing"]),  # type: ignore[arg-type]
            patch_size=tuple(int(v) for v in data["patch_size"]),  # type: ignore[arg-type]
            normalization=dict(data["normalization"]),
            channels=tuple(int(v) for v in data["channels"]),
            batch_size=int(data["batch_size"]),
            flip_axes=tuple(str(v) for v in data["flip_axes"]),
        )


def plan_target_spacing(fingerprint: DatasetFingerprint) -> Tuple[float, float, float]:
    """Median spacing per axis; on an anisotropic dataset the coarse axis takes its 10th percentile instead,
    so thin-slice cases are not thrown away (nnU-Net's rule)."""
    spacings = np.array([case.spacing for case in fingerprint.cases], dtype=np.float64)
    target = np.median(spacings, axis=0)
    coarse = int(np.argmax(target))
    if target[coarse] > ANISOTROPY_RATIO * np.min(target):
        target[coarse] = np.percentile(spacings[:, coarse], 10)
    return tuple(float(round(v, 4)) for v in target)  # type: ignore[return-value]


def plan_patch_size(fingerprint: DatasetFingerprint, target_spacing: Sequence[float], divisor: int,
                    max_voxels: int = MAX_PATCH_VOXELS) -> Tuple[int, int, int]:
    """The median case size at ``target_spacing``, rounded up to a multiple of ``divisor`` and shrunk (largest
    axis first) until it holds at most ``max_voxels`` voxels. Returns ``(x, y, z)``."""
    sizes = np.array([[s * sp / t for s, sp, t in zip(case.size, case.spacing, target_spacing)]
                      for case in fingerprint.cases], dtype=np.float64)
    median = np.median(sizes, axis=0)
    patch = [max(divisor, int(math.ceil(v / divisor)) * divisor) for v in median]
    while int(np.prod(patch)) > max_voxels and max(patch) > divisor:
        largest = int(np.argmax(patch))
        patch[largest] -= divisor
    return tuple(patch)  # type: ignore[return-value]


#: Normalisation schemes a user may force (``--normalization``); by default the modality decides.
NORMALIZATION_PLANS = ("zscore", "zscore-nonzero", "zscore-central", "ct")


def plan_normalization(fingerprint: DatasetFingerprint, scheme: Optional[str] = None) -> Dict[str, Any]:
    """Per-case z-score for MRI and other relative-intensity modalities; for CT, clip to the 0.5/99.5 percentiles
    of the dataset's foreground intensities and standardise with their mean/std (Hounsfield units are absolute).
    ``scheme`` (one of ``NORMALIZATION_PLANS``) overrides the choice by modality; ``zscore-nonzero`` takes the
    statistics over non-zero voxels only (skull-stripped or masked images); ``zscore-central`` over the central
    block of the cases' median field of view only (``central_mm``), so a larger box around the same structure
    (a localised whole head) is normalised like the training crops."""
    if scheme is None:
        scheme = "ct" if fingerprint.modality.upper() == "CT" else "zscore"
    if scheme not in NORMALIZATION_PLANS:
        raise ValueError(f"normalisation must be one of {NORMALIZATION_PLANS}, got {scheme!r}")
    if scheme == "zscore-central":
        extents = np.array([[n * s for n, s in zip(case.size, case.spacing)] for case in fingerprint.cases])
        return {"scheme": "zscore", "central_mm": [float(round(v)) for v in np.median(extents, axis=0)]}
    if scheme != "ct":
        return {"scheme": "zscore", "nonzero": True} if scheme == "zscore-nonzero" else {"scheme": "zscore"}
    values = np.concatenate([np.asarray(case.foreground_intensities, dtype=np.float64)
                             for case in fingerprint.cases]) if fingerprint.cases else np.zeros(0)
    if values.size == 0:
        raise ValueError("CT normalisation needs foreground intensities, but no case has a labelled voxel")
    low, high = np.percentile(values, [0.5, 99.5])
    clipped = np.clip(values, low, high)
    return {"scheme": "ct", "clip": [float(low), float(high)], "mean": float(clipped.mean()),
            "std": float(max(clipped.std(), 1e-3))}


def plan_flip_axes(label_names: Sequence[str]) -> Tuple[str, ...]:
    """Axes along which mirroring is safe: all three unless a label name ties a label to one side of an axis
    ("Left lung", "Anterior", ...). Mirroring anatomy is a strong assumption, so users may narrow it further."""
    words = set()
    for name in label_names:  # whole words only ("Bright" is not "right"); camelCase counts as two words
        words.update(re.findall(r"[a-z]+", re.sub(r"([a-z])([A-Z])", r"\1 \2", name).lower()))
    return tuple(axis for axis in AXES if not words & set(_SIDED_WORDS[axis]))


def plan_training(fingerprint: DatasetFingerprint, label_names: Sequence[str],
                  overrides: Optional[Mapping[str, Any]] = None) -> TrainingPlan:
    """Derive a ``TrainingPlan`` from the dataset; any non-``None`` entry of ``overrides`` (a ``TrainingPlan``
    field name) replaces the derived value. A patch-size override is rounded up to a multiple of the network's
    divisor; a ``normalization`` override is a scheme name (``NORMALIZATION_PLANS``) whose statistics are taken
    from the dataset, or a complete normalisation dict."""
    overrides = {key: value for key, value in (overrides or {}).items() if value is not None}
    unknown = set(overrides) - set(TrainingPlan.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown plan overrides {sorted(unknown)}")
    plan = replace(TrainingPlan(), **{key: overrides[key] for key in ("orientation", "channels", "batch_size")
                                      if key in overrides})
    plan.channels = tuple(int(c) for c in plan.channels)
    spacing = tuple(float(v) for v in overrides.get("target_spacing", plan_target_spacing(fingerprint)))
    if "patch_size" in overrides:
        patch = tuple(max(plan.divisor, int(math.ceil(int(p) / plan.divisor)) * plan.divisor)
                      for p in overrides["patch_size"])
    else:
        patch = plan_patch_size(fingerprint, spacing, plan.divisor)
    flips = overrides.get("flip_axes", plan_flip_axes(label_names))
    bad_axes = [axis for axis in flips if axis not in AXES]
    if bad_axes:
        raise ValueError(f"flip axes must be among {AXES}, got {bad_axes}")
    return replace(plan, target_spacing=spacing, patch_size=patch,  # type: ignore[arg-type]
                   normalization=_planned_normalization(fingerprint, overrides.get("normalization")),
                   flip_axes=tuple(flips))


def _planned_normalization(fingerprint: DatasetFingerprint, override: Any) -> Dict[str, Any]:
    if isinstance(override, Mapping):
        return dict(override)
    return plan_normalization(fingerprint, override)
