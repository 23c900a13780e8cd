"""Automatic localisation: where the structure a model was trained on lies in a whole-head image.

A bundle may declare a ``localization`` section (format in ``DESIGN.md``). The one method, ``template-affine``,
registers the input to a T1 template shipped in the bundle folder (affine, SimpleITK's registration framework:
an upper-head initialiser, several starting rotations, Mattes mutual information over the template's brain at
8, 4 and 2 mm) and maps each side's template-space box into the input. ``segment`` then resamples the input onto
the model's field of view centred on each box in template space (the model's spacing, upright as the training crops
were), segments it with one window and maps the class probabilities back onto the input grid
(``inference.predictor.Predictor.predict_localized``).

Registration that fails or looks implausible (mutual information too low, a determinant or scaling no head has, a
box outside the image) raises ``LocalizationError`` with what to do: give an ROI.

Geometry: the registration transform maps template points to input points (ITK LPS mm, fixed = template, moving =
input), so resampling the input through it yields the input on a template-space grid.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import AttentionUNetError

METHODS = ("template-affine",)
SIDES = ("left", "right")
#: Plausibility limits where a bundle's ``localization.plausibility`` does not set them.
DEFAULT_PLAUSIBILITY = {
    # Mutual information (nats, ``mutual_information``) inside the template's brain: below the first the fit is
    # refused, below the second it is kept with a warning. Real heads at 1-2 mm give 0.10-0.41 (0.065 for one
    # turned 20 degrees further), noise ~0.002, a head-sized cube phantom ~0.05, failed fits 0.035-0.056.
    "min_mutual_information": 0.055,
    "warn_mutual_information": 0.08,
    # Determinant of the template -> input linear map (head volume ratio) and the per-axis scalings.
    "determinant": [0.5, 2.0],
    "scale": [0.7, 1.45],
    # Share of each box (in template space) that must lie inside the input.
    "min_box_inside": 0.9,
}
#: Starting rotations (degrees about the R-L, A-P, S-I axes) tried at the coarsest level (heads tilted by up to
#: ~20 degrees from any of them converge); the best ones are refined.
START_ROTATIONS_DEG = ((0.0, 0.0, 0.0), (-20.0, 0.0, 0.0), (20.0, 0.0, 0.0), (0.0, 0.0, -15.0), (0.0, 0.0, 15.0),
                       (0.0, -15.0, 0.0), (0.0, 15.0, 0.0))
#: The three levels (template grid in mm, input grid in mm, smoothing sigma in mm of both): similarity fits of every
#: start, affine fits of the ``REFINED_STARTS`` best (judged at 2 mm), and the best of those refined. Each level's
#: images are smoothed and subsampled once, not by ITK's pyramid inside every fit: the input's finer grid keeps
#: the optimiser's gradients smooth, and the fits cost a third of what ITK's per-fit pyramid did (same boxes
#: within 0.5 mm on the shared heads).
COARSE_LEVEL, MEDIUM_LEVEL, FINE_LEVEL = (8.0, 4.0, 4.0), (4.0, 2.0, 2.0), (2.0, 2.0, 1.0)
#: Optimiser iterations and the share of the template's brain voxels the metric samples, per level.
COARSE_ITERATIONS, MEDIUM_ITERATIONS, FINE_ITERATIONS = 40, 40, 20
COARSE_SAMPLING, FINE_SAMPLING = 0.25, 0.15
REFINED_STARTS = 2
#: Starting scale (template -> input): the template's brain is larger than most (e.g. 0.7-0.8 in volume for
#: older adults), and starting small keeps it from growing onto the skull.
START_SCALE = 0.9
#: The optimiser stops once its step (mm-scaled) falls below this.
MIN_STEP = 1e-3
#: Erosion (template voxels) of the brain for ``Registration.interior_information``.
INTERIOR_EROSION_VOXELS = 2
#: Depth of the head (from its top, in mm) used to place the initial translation: skull to the skull base, so a
#: neck or shoulders in the field of view do not pull the start away.
HEAD_DEPTH_MM = 110.0
#: Grid of the moving image during registration (mm): finer inputs are smoothed and subsampled to it (the
#: template's own grid is ``FINE_LEVEL``'s).
REGISTRATION_SPACING_MM = 2.0


class LocalizationError(AttentionUNetError):
    """Automatic localisation failed or gave an implausible result; the message says what to do."""


@dataclass
class LocalizerSpec:
    """A bundle's ``localization`` section.

    Attributes:
        method: ``"template-affine"``.
        template: path of the template image (in the bundle folder).
        boxes: side -> ``(r_min, r_max, a_min, a_max, s_min, s_max)`` in template RAS mm.
        labels: the segments with localisation: dicts ``{value, name, color, terminology, side, source}`` where
            ``source`` is the model label value the segment comes from.
        plausibility: limits (``DEFAULT_PLAUSIBILITY`` keys).
    """

    method: str
    template: Path
    boxes: Dict[str, Tuple[float, ...]]
    labels: List[Dict[str, Any]]
    plausibility: Dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_PLAUSIBILITY))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], directory: Path) -> "LocalizerSpec":
        """Build from ``model.json``'s ``localization`` (``ValueError`` naming the problem when malformed)."""
        if not isinstance(data, Mapping):
            raise ValueError("'localization' must be an object")
        method = data.get("method")
        if method not in METHODS:
            raise ValueError(f"localization.method {method!r} is not one of {', '.join(METHODS)}")
        template = data.get("template")
        if not isinstance(template, str) or Path(template).name != template:
            raise ValueError("localization.template must be a file name in the bundle folder")
        sides = data.get("sides")
        if not isinstance(sides, Mapping) or not sides or not set(sides) <= set(SIDES):
            raise ValueError("localization.sides must map 'left' and/or 'right' to {\"box_ras\": [6 numbers]}")
        boxes = {}
        for side, entry in sides.items():
            box = entry.get("box_ras") if isinstance(entry, Mapping) else None
            if (not isinstance(box, list) or len(box) != 6
                    or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
                    or any(box[2 * i] >= box[2 * i + 1] for i in range(3))):
                raise ValueError(f"localization.sides.{side}.box_ras must be six numbers R_MIN R_MAX A_MIN A_MAX "
                                 "S_MIN S_MAX with each minimum below its maximum")
            boxes[side] = tuple(float(v) for v in box)
        labels = data.get("labels")
        if not isinstance(labels, list) or not labels or not all(
                isinstance(label, Mapping) and label.get("side") in boxes and isinstance(label.get("source"), int)
                for label in labels):
            raise ValueError("localization.labels must list {value, name, color, side, source} per side and "
                             "model label")
        plausibility = {**DEFAULT_PLAUSIBILITY, **dict(data.get("plausibility") or {})}
        return cls(method=method, template=directory / template, boxes=boxes, labels=[dict(x) for x in labels],
                   plausibility=plausibility)


@dataclass
class Registration:
    """An affine ``transform`` mapping template points to input points (LPS mm) and how good it looks."""

    transform: sitk.AffineTransform
    metric: float
    #: Mutual information inside the template's brain only (its outline left out): what tells a head's anatomy
    #: from a mere blob of the right size and shape.
    interior_information: float
    determinant: float
    scales: Tuple[float, float, float]
    seconds: float
    start_rotation_deg: Tuple[float, float, float]

    def quality(self) -> Dict[str, Any]:
        """The report's ``localization.registration``."""
        return {"metric": round(self.metric, 4), "mutual_information": round(-self.metric, 4),
                "interior_mutual_information": round(self.interior_information, 4),
                "determinant": round(self.determinant, 4), "scales": [round(s, 4) for s in self.scales],
                "start_rotation_deg": list(self.start_rotation_deg), "seconds": round(self.seconds, 3),
                # ITK affine, LPS mm: input point = matrix @ (template point - center) + center + translation.
                "template_to_input": {"matrix": [round(v, 6) for v in self.transform.GetMatrix()],
                                      "translation": [round(v, 4) for v in self.transform.GetTranslation()],
                                      "center": [round(v, 4) for v in self.transform.GetCenter()]}}


# ------------------------------------------------------------------------------------------------- registration
def _as_float(image: sitk.Image) -> sitk.Image:
    return sitk.Cast(image, sitk.sitkFloat32)


def _shrink_factors(image: sitk.Image, spacing_mm: float) -> List[int]:
    """Whole subsampling factors per axis that take ``image`` to a grid no finer than ``spacing_mm``."""
    return [max(1, int(math.floor(spacing_mm / s + 1e-6))) for s in image.GetSpacing()]


def _shrunk(image: sitk.Image, factors: Sequence[int]) -> sitk.Image:
    return sitk.Shrink(image, list(factors)) if max(factors) > 1 else image


def _subsampled(image: sitk.Image, spacing_mm: float, sigma: Optional[Sequence[float]] = None) -> sitk.Image:
    """``image`` smoothed by ``sigma`` (mm per axis; 0 = none; ``None``: just enough against aliasing, half the
    removed spacing) and subsampled by whole factors to a grid no finer than ``spacing_mm``."""
    factors = _shrink_factors(image, spacing_mm)
    if sigma is None:
        sigma = [s * (f - 1) / 2.0 for s, f in zip(image.GetSpacing(), factors)]
    if any(s > 0 for s in sigma):
        image = sitk.SmoothingRecursiveGaussian(image, [max(float(s), 1e-3) for s in sigma])
    return _shrunk(image, factors)


def _level(fixed: sitk.Image, moving: sitk.Image, mask: sitk.Image, level: Tuple[float, float, float]
           ) -> Tuple[sitk.Image, sitk.Image, sitk.Image]:
    """``(fixed, moving, mask)`` for one registration level (``COARSE_LEVEL``...: grids and smoothing in mm); the
    mask is subsampled with the template's factors, so it stays on the template's grid."""
    fixed_mm, moving_mm, sigma = level
    return (_subsampled(fixed, fixed_mm, [sigma] * 3), _subsampled(moving, moving_mm, [sigma] * 3),
            _shrunk(mask, _shrink_factors(fixed, fixed_mm)))


def _registration_copy(image: sitk.Image) -> sitk.Image:
    """``image`` as float32 on a grid no finer than ``REGISTRATION_SPACING_MM`` (smoothed first, so no aliasing),
    intensities clipped to their 0.5-99.5 percentiles (bright fat or vessels would squeeze the histogram)."""
    image = _subsampled(_as_float(image), REGISTRATION_SPACING_MM)
    array = sitk.GetArrayViewFromImage(image)
    low, high = np.percentile(array[::2, ::2, ::2], [0.5, 99.5])
    return sitk.Clamp(image, lowerBound=float(low), upperBound=float(max(high, low + 1e-3)))


def _physical_points(image: sitk.Image, mask: np.ndarray) -> np.ndarray:
    """World (LPS mm) points ``(N, 3)`` of the voxels where ``mask`` ``(z, y, x)`` is true."""
    index_zyx = np.argwhere(mask).astype(float)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return (direction @ (index_zyx[:, ::-1] * np.array(image.GetSpacing())).T).T + np.array(image.GetOrigin())


def _largest_component(mask: sitk.Image) -> sitk.Image:
    components = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    return components == 1


def head_mask(image: sitk.Image) -> sitk.Image:
    """The largest connected region above Otsu's threshold (the head, or a skull-stripped brain)."""
    return _largest_component(sitk.OtsuThreshold(image, 0, 1, 128))


def _upper_centroid(image: sitk.Image, mask: sitk.Image, depth_mm: float) -> Tuple[np.ndarray, float]:
    """The centroid of ``mask`` within ``depth_mm`` of its highest (superior, LPS +z) point, and that point's z."""
    points = _physical_points(image, sitk.GetArrayViewFromImage(mask) > 0)
    if len(points) == 0:
        raise LocalizationError("the image has no foreground to register")
    top = float(points[:, 2].max())
    upper = points[points[:, 2] > top - depth_mm]
    return upper.mean(axis=0), top


def _rotation_matrix(degrees_ras: Sequence[float]) -> np.ndarray:
    """Rotation by the given angles about the world R-L, A-P and S-I axes (applied in that order)."""
    ax, ay, az = (math.radians(d) for d in degrees_ras)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _method(fixed_mask: sitk.Image, iterations: int, sampling: float) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(sampling, seed=1)
    method.SetMetricFixedMask(fixed_mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=MIN_STEP, numberOfIterations=iterations,
                                                    relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    # One level, no pyramid: ``_level`` prepared the images once for every fit.
    method.SetShrinkFactorsPerLevel([1])
    method.SetSmoothingSigmasPerLevel([0.0])
    return method


def _optimise(transform: sitk.Transform, level: Tuple[sitk.Image, sitk.Image, sitk.Image], iterations: int,
              sampling: float) -> None:
    """Optimise ``transform`` in place on one ``_level``'s ``(fixed, moving, mask)``."""
    fixed, moving, mask = level
    method = _method(mask, iterations=iterations, sampling=sampling)
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed, moving)


def mutual_information(transform: sitk.Transform, fixed: sitk.Image, moving: sitk.Image, mask: sitk.Image,
                       bins: int = 32) -> float:
    """Mutual information (nats) of the template and the input mapped onto it, over the template's mask.

    A plain joint histogram: one resampling and a ``bincount``, ~10x cheaper than ITK's ``MetricEvaluate`` (which
    recomputes the moving image's gradient), used to compare candidate fits and to judge the result. Template
    voxels that map outside the input are left out.
    """
    mapped = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, float("nan"), sitk.sitkFloat32)
    inside = sitk.GetArrayViewFromImage(mask) > 0
    a = sitk.GetArrayViewFromImage(fixed)[inside]
    b = sitk.GetArrayViewFromImage(mapped)[inside]
    keep = np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size < 1000:
        return 0.0

    def binned(values: np.ndarray) -> np.ndarray:
        low, high = float(values.min()), float(values.max())
        return np.clip(((values - low) / max(high - low, 1e-6) * bins).astype(np.int64), 0, bins - 1)

    joint = np.bincount(binned(a) * bins + binned(b), minlength=bins * bins).reshape(bins, bins) / a.size
    pa, pb = joint.sum(axis=1, keepdims=True), joint.sum(axis=0, keepdims=True)
    nonzero = joint > 0
    return float(np.sum(joint[nonzero] * np.log(joint[nonzero] / (pa @ pb)[nonzero])))


def register(image: sitk.Image, template: sitk.Image) -> Registration:
    """Affine registration of ``image`` (the moving image) to ``template``; ``Registration.transform`` maps template
    points to image points. Raises ``LocalizationError`` when ITK's optimiser fails.

    Every starting rotation is fitted (similarity) at ``COARSE_LEVEL`` and judged at 2 mm; the ``REFINED_STARTS``
    best become affine fits at ``MEDIUM_LEVEL``, and the one with the highest mutual information is refined at
    ``FINE_LEVEL``. (A single start sometimes
    ends with the template's brain stretched onto the skull, a fit that smoothed images favour; at 2 mm its
    mutual information is clearly lower, so competing candidates catch it.)
    """
    started = time.perf_counter()
    moving = _registration_copy(image)
    fixed = _as_float(template)
    brain = sitk.Cast(template > 0, sitk.sitkUInt8)
    mask = sitk.BinaryDilate(brain, [1, 1, 1])
    # Candidates are compared inside the brain only: a fit that stretches the brain onto the skull, or a blob of
    # a head's size and shape, matches the outline but not the anatomy within.
    interior = sitk.BinaryErode(brain, [INTERIOR_EROSION_VOXELS] * 3)
    fixed_centre, fixed_top = _upper_centroid(template, mask, HEAD_DEPTH_MM - 10.0)
    moving_centre, moving_top = _upper_centroid(moving, head_mask(moving), HEAD_DEPTH_MM)
    # The template has no scalp: its top is ~5 mm below a head's (half-way between a head and a stripped brain).
    shift = moving_centre - fixed_centre
    shift[2] = (moving_top - 5.0) - fixed_top
    try:
        coarse, medium, fine = (_level(fixed, moving, mask, level)
                                for level in (COARSE_LEVEL, MEDIUM_LEVEL, FINE_LEVEL))
        candidates = []
        for degrees in START_ROTATIONS_DEG:
            start = sitk.Similarity3DTransform()
            start.SetCenter([float(c) for c in fixed_centre])
            lps_degrees = (-degrees[0], -degrees[1], degrees[2])  # a rotation about -x equals minus one about +x
            start.SetMatrix([float(v) for v in _rotation_matrix(lps_degrees).ravel()])
            start.SetTranslation([float(v) for v in shift])
            start.SetScale(START_SCALE)
            _optimise(start, coarse, COARSE_ITERATIONS, COARSE_SAMPLING)
            # Judged on the 2 mm grid: at 8 mm a brain grown onto the scalp can look better than the right fit.
            candidates.append((-mutual_information(start, fixed, moving, interior), degrees, start))
        refined = []
        for _, degrees, start in sorted(candidates, key=lambda item: item[0])[:REFINED_STARTS]:
            affine = sitk.AffineTransform(3)
            affine.SetCenter(start.GetCenter())
            affine.SetMatrix(start.GetMatrix())
            affine.SetTranslation(start.GetTranslation())
            _optimise(affine, medium, MEDIUM_ITERATIONS, FINE_SAMPLING)
            refined.append((-mutual_information(affine, fixed, moving, interior), degrees, affine))
        _, best_degrees, affine = min(refined, key=lambda item: item[0])
        _optimise(affine, fine, FINE_ITERATIONS, FINE_SAMPLING)
    except RuntimeError as error:
        raise LocalizationError(f"the registration to the model's template failed ({str(error).strip()[-200:]}); "
                                "give a Region (--roi) around the structure instead") from None
    linear = np.array(affine.GetMatrix()).reshape(3, 3)
    scales = tuple(float(s) for s in np.linalg.svd(linear, compute_uv=False))
    return Registration(transform=affine, metric=-mutual_information(affine, fixed, moving, mask),
                        interior_information=mutual_information(affine, fixed, moving, interior),
                        determinant=float(np.linalg.det(linear)),
                        scales=scales, seconds=time.perf_counter() - started, start_rotation_deg=best_degrees)


# ---------------------------------------------------------------------------------------------------- boxes
def box_corners_lps(box_ras: Sequence[float]) -> np.ndarray:
    """The 8 corners ``(8, 3)`` of a RAS box, in LPS mm."""
    return np.array([[-r, -a, s] for r in box_ras[0:2] for a in box_ras[2:4] for s in box_ras[4:6]], dtype=float)


def map_box(transform: sitk.Transform, box_ras: Sequence[float]) -> Tuple[float, ...]:
    """The RAS bounding box, in the input's world, of a template-space RAS box mapped by ``transform``."""
    mapped = np.array([transform.TransformPoint(tuple(p)) for p in box_corners_lps(box_ras)])
    ras = mapped * np.array([-1.0, -1.0, 1.0])
    low, high = ras.min(axis=0), ras.max(axis=0)
    return tuple(round(float(v), 2) for pair in zip(low, high) for v in pair)


def box_grid(box_ras: Sequence[float], spacing_xyz: Sequence[float]) -> sitk.Image:
    """An empty RAS-oriented grid covering ``box_ras`` (template space) at ``spacing_xyz``."""
    spacing = np.asarray(spacing_xyz, float)
    low = np.array(box_ras[0::2], float)
    high = np.array(box_ras[1::2], float)
    size = np.maximum(1, np.round((high - low) / spacing)).astype(int)
    grid = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    grid.SetSpacing([float(s) for s in spacing])
    grid.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    first_ras = low + spacing / 2.0
    grid.SetOrigin([float(-first_ras[0]), float(-first_ras[1]), float(first_ras[2])])
    return grid


def fraction_inside(image: sitk.Image, transform: sitk.Transform, box_ras: Sequence[float],
                    step_mm: float = 4.0) -> float:
    """Share of a template-space box whose mapped points lie inside ``image``'s voxel grid."""
    grid = box_grid(box_ras, [step_mm] * 3)
    size = np.array(grid.GetSize())
    inside = 0
    points = [grid.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))
              for i in range(size[0]) for j in range(size[1]) for k in range(size[2])]
    limit = np.array(image.GetSize()) - 0.5
    for point in points:
        index = np.array(image.TransformPhysicalPointToContinuousIndex(transform.TransformPoint(point)))
        inside += bool(np.all(index >= -0.5) and np.all(index <= limit))
    return inside / len(points)


def check_plausible(registration: Registration, image: sitk.Image, spec: LocalizerSpec
                    ) -> Tuple[Dict[str, float], List[str]]:
    """Raise ``LocalizationError`` unless the registration looks like a head's; returns each box's share inside
    the image and warnings (a weak but acceptable match)."""
    limits = spec.plausibility
    advice = "give a Region (--roi R_MIN R_MAX A_MIN A_MAX S_MIN S_MAX around the structure) instead"
    information = registration.interior_information
    if information < float(limits["min_mutual_information"]):
        raise LocalizationError(
            f"automatic localisation failed: the image does not match the model's head template (mutual "
            f"information {information:.3f} < {limits['min_mutual_information']}); is it a T1-weighted head MRI? "
            f"{advice}")
    low, high = limits["determinant"]
    scale_low, scale_high = limits["scale"]
    if not low <= registration.determinant <= high or not all(scale_low <= s <= scale_high
                                                              for s in registration.scales):
        raise LocalizationError(
            f"automatic localisation gave an implausible head size (volume ratio {registration.determinant:.2f}, "
            f"scalings {', '.join(f'{s:.2f}' for s in registration.scales)} against the template); {advice}")
    inside = {side: fraction_inside(image, registration.transform, box) for side, box in spec.boxes.items()}
    for side, share in inside.items():
        if share < float(limits["min_box_inside"]):
            raise LocalizationError(
                f"automatic localisation placed the {side} box {100 * (1 - share):.0f}% outside the image (is the "
                f"structure in the field of view?); {advice}")
    warnings = []
    if information < float(limits["warn_mutual_information"]):
        warnings.append(f"automatic localisation matched the model's head template only weakly (mutual "
                        f"information {information:.3f} < {limits['warn_mutual_information']}): check that the "
                        "boxes (report 'localization.boxes') lie on the structure, or give a Region (--roi)")
    return inside, warnings


def read_template(spec: LocalizerSpec) -> sitk.Image:
    """The bundle's template image."""
    try:
        return sitk.ReadImage(str(spec.template))
    except RuntimeError:
        raise LocalizationError(f"the model's localisation template {spec.template} cannot be read; reinstall "
                                "the model, or give a Region (--roi)") from None
