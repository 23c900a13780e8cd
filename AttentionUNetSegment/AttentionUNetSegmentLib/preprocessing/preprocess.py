"""Preprocessing: canonical orientation, target spacing, intensity normalisation, regions of interest.

Images are ``SimpleITK.Image`` objects (geometry in ITK's LPS world); arrays taken from them are ``(z, y, x)``.
Spatial triples in a ``PreprocessingSpec`` follow the bundle JSON: ITK ``(x, y, z)`` order, millimetres.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterator, Mapping, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import InputImageError, ModelBundleError

NORMALIZATION_SCHEMES = ("zscore", "ct")

_AXIS_LETTERS = ("RL", "AP", "SI")
#: Voxels per float64 chunk of ``normalize`` (8 MiB).
_CHUNK = 1 << 20
#: Target spacings a model may ask for (mm): finer than 10 micrometres or coarser than 10 cm is no imaging resolution.
MIN_SPACING_MM, MAX_SPACING_MM = 0.01, 100.0
#: Largest grid an image may be resampled to (2**30 voxels = 4 GiB per float32 copy, and inference holds several).
MAX_RESAMPLED_VOXELS = 2 ** 30


def _default_normalization() -> Dict[str, object]:
    return {"scheme": "zscore"}


@dataclass
class PreprocessingSpec:
    """How a model expects its input: what a bundle's ``preprocessing`` section holds.

    Attributes:
        orientation: three-letter DICOM orientation code the volume is permuted/flipped to before resampling
            (``sitk.DICOMOrient`` convention: the direction each index axis points to, e.g. ``"RAS"``).
        target_spacing: voxel spacing in millimetres, ITK ``(x, y, z)`` order.
        normalization: ``{"scheme": "zscore"}`` (optionally ``"nonzero": true`` to use only non-zero voxels for
            the statistics) or ``{"scheme": "ct", "clip": [lo, hi], "mean": m, "std": s}``.
    """

    orientation: str = "RAS"
    target_spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    normalization: Dict[str, object] = field(default_factory=_default_normalization)

    def __post_init__(self) -> None:
        self.orientation = _validated_orientation(self.orientation)
        self.target_spacing = _validated_spacing(self.target_spacing)
        self.normalization = _validated_normalization(self.normalization)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> "PreprocessingSpec":
        """Build from a bundle's ``preprocessing`` dict; anything malformed raises ``ModelBundleError``."""
        if not isinstance(data, Mapping):
            raise ModelBundleError("model.json 'preprocessing' must be an object; fix or re-export the bundle")
        unknown = set(data) - {"orientation", "target_spacing", "normalization"}
        if unknown:
            raise ModelBundleError(
                f"model.json 'preprocessing' has unknown keys {sorted(unknown)}; allowed are orientation, "
                "target_spacing and normalization"
            )
        defaults = cls()
        return cls(
            orientation=data.get("orientation", defaults.orientation),  # type: ignore[arg-type]
            target_spacing=data.get("target_spacing", defaults.target_spacing),  # type: ignore[arg-type]
            normalization=data.get("normalization", defaults.normalization),  # type: ignore[arg-type]
        )

    def to_dict(self) -> Dict[str, object]:
        """The JSON-ready form stored in ``model.json``."""
        return {
            "orientation": self.orientation,
            "target_spacing": list(self.target_spacing),
            "normalization": dict(self.normalization),
        }


def _validated_orientation(value: object) -> str:
    code = str(value).upper() if isinstance(value, str) else ""
    if len(code) != 3 or sorted(_axis_of(letter) for letter in code) != [0, 1, 2]:
        raise ModelBundleError(
            f"preprocessing orientation {value!r} is not a three-letter orientation code with one of R/L, A/P "
            "and S/I each (e.g. 'RAS' or 'LPS')"
        )
    return code


def _axis_of(letter: str) -> int:
    for axis, letters in enumerate(_AXIS_LETTERS):
        if letter in letters:
            return axis
    return -1


def _validated_spacing(value: object) -> Tuple[float, float, float]:
    try:
        spacing = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        spacing = ()
    if len(spacing) != 3 or not all(math.isfinite(s) and MIN_SPACING_MM <= s <= MAX_SPACING_MM for s in spacing):
        raise ModelBundleError(
            f"preprocessing target_spacing {value!r} must be three numbers (x, y, z in mm) in "
            f"{MIN_SPACING_MM:g}..{MAX_SPACING_MM:g} mm"
        )
    return spacing  # type: ignore[return-value]


def _validated_normalization(value: object) -> Dict[str, object]:
    if not isinstance(value, Mapping) or value.get("scheme") not in NORMALIZATION_SCHEMES:
        raise ModelBundleError(
            f"preprocessing normalization {value!r} needs a 'scheme' of {' or '.join(NORMALIZATION_SCHEMES)}"
        )
    norm = dict(value)
    if norm["scheme"] == "zscore":
        unknown = set(norm) - {"scheme", "nonzero", "central_mm"}
        central = norm.get("central_mm")
        if unknown or not isinstance(norm.get("nonzero", False), bool) or central is not None and not (
                isinstance(central, (list, tuple)) and len(central) == 3
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                        for v in central)):
            raise ModelBundleError(
                f"zscore normalization {value!r} accepts only 'nonzero' (true/false) and 'central_mm' (three "
                "positive sizes x, y, z in mm) besides 'scheme'"
            )
        return norm
    unknown = set(norm) - {"scheme", "clip", "mean", "std"}
    try:
        low, high = (float(v) for v in norm["clip"])  # type: ignore[union-attr]
        mean, std = float(norm["mean"]), float(norm["std"])  # type: ignore[arg-type]
        valid = not unknown and low < high and std > 0 and all(map(math.isfinite, (low, high, mean, std)))
    except (KeyError, TypeError, ValueError):
        valid = False
    if not valid:
        raise ModelBundleError(
            f"ct normalization {value!r} needs exactly 'clip': [lo, hi] with lo < hi, 'mean' and a positive 'std'"
        )
    return {"scheme": "ct", "clip": [low, high], "mean": mean, "std": std}


@dataclass
class PreparedImage:
    """A volume ready for the network.

    ``array``: float32 ``(z, y, x)``, normalised. ``grid``: the reoriented, resampled ``sitk.Image`` (before
    normalisation) whose geometry ``array`` lives on; results computed on ``array`` map back through it.
    """

    array: np.ndarray
    grid: sitk.Image

    def image_from_array(self, array: np.ndarray) -> sitk.Image:
        """Wrap a ``(z, y, x)`` array of the grid's size as a ``sitk.Image`` with the grid's geometry."""
        return image_like(array, self.grid)


def image_like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """``sitk.Image`` holding ``array`` (``(z, y, x)``, same size as ``reference``) with ``reference``'s geometry."""
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def orientation_of(image: sitk.Image) -> str:
    """The three-letter orientation code closest to ``image``'s direction cosines (e.g. ``"LPS"``)."""
    return sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(image.GetDirection())


def reorient(image: sitk.Image, orientation: str) -> sitk.Image:
    """Permute/flip ``image``'s axes (no interpolation) so its index axes point as ``orientation`` says."""
    if orientation_of(image) == orientation:
        return image
    return sitk.DICOMOrient(image, orientation)


def resample_to_spacing(image: sitk.Image, spacing: Sequence[float], is_label: bool = False) -> sitk.Image:
    """Resample to ``spacing`` (ITK ``(x, y, z)`` mm) over the same physical extent and direction.

    The new size is ``round(size * old_spacing / spacing)`` (at least 1) and both grids share their centre.
    Images are interpolated linearly into float32; labels with nearest neighbour, keeping their pixel type.
    An image already at ``spacing`` is returned unchanged.
    """
    old_spacing = np.array(image.GetSpacing())
    new_spacing = np.array([float(s) for s in spacing])
    if np.allclose(old_spacing, new_spacing, rtol=1e-5, atol=0):
        return image
    old_size = np.array(image.GetSize())
    new_size = np.maximum(1, np.round(old_size * old_spacing / new_spacing))
    voxels = float(np.prod(new_size))
    if voxels > MAX_RESAMPLED_VOXELS:
        raise InputImageError(
            f"resampling this image ({' x '.join(map(str, old_size))} voxels of "
            f"{' x '.join(f'{s:g}' for s in old_spacing)} mm) to {' x '.join(f'{s:g}' for s in new_spacing)} mm "
            f"would make {voxels:.3g} voxels (about {voxels * 4 / 2**30:.3g} GiB per float32 copy), more than the "
            f"{MAX_RESAMPLED_VOXELS:.3g} voxels allowed; the image or the model's target spacing does not fit (crop "
            "the image to the structure, or use a model made for this resolution)")
    new_size = new_size.astype(int)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    centre = np.array(image.GetOrigin()) + direction @ ((old_size - 1) * old_spacing / 2)
    new_origin = centre - direction @ ((new_size - 1) * new_spacing / 2)

    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(s) for s in new_size])
    resampler.SetOutputSpacing([float(s) for s in new_spacing])
    resampler.SetOutputOrigin([float(o) for o in new_origin])
    resampler.SetOutputDirection(image.GetDirection())
    resampler.SetUseNearestNeighborExtrapolator(True)
    if is_label:
        resampler.SetInterpolator(sitk.sitkNearestNeighbor)
        resampler.SetOutputPixelType(image.GetPixelID())
    else:
        resampler.SetInterpolator(sitk.sitkLinear)
        resampler.SetOutputPixelType(sitk.sitkFloat32)
    return resampler.Execute(image)


def resample_to_reference(
    image: sitk.Image, reference: sitk.Image, is_label: bool = False, default: float = 0.0
) -> sitk.Image:
    """Resample ``image`` onto ``reference``'s grid (size, origin, spacing, direction) through world space.

    Images (and probabilities) are interpolated linearly into float32; labels with nearest neighbour, keeping
    their pixel type. Reference voxels outside ``image``'s extent get ``default``.
    """
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    pixel_type = image.GetPixelID() if is_label else sitk.sitkFloat32
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, float(default), pixel_type)


def normalize(array: np.ndarray, normalization: Mapping[str, object],
              spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Normalise intensities as the bundle says; returns a float32 array of ``array``'s shape.

    ``zscore``: ``(x - mean) / std`` over all voxels, or over the non-zero ones with ``"nonzero": true``; with
    ``"central_mm": [x, y, z]`` the statistics come from the central block of that size only (``spacing``: the
    array's voxel size, x y z mm), so what surrounds the structure (a head's skull, air, neck in a larger box) does
    not shift them.
    ``ct``: clip to ``clip`` then ``(x - mean) / std`` with the dataset statistics from the bundle.
    Statistics and the affine map run in float64 over chunks of ``_CHUNK`` voxels: float32 overflows there for
    intensities near its limit (a variance of 1e38-scale values is 1e76), while no float64 volume is created.
    """
    spec = _validated_normalization(normalization)
    out = np.array(array, dtype=np.float32, order="C")
    flat = out.reshape(-1)
    if spec["scheme"] == "ct":
        low, high = spec["clip"]  # type: ignore[misc]
        np.clip(flat, low, high, out=flat)
        mean, std = float(spec["mean"]), float(spec["std"])  # type: ignore[arg-type]
    else:
        values = flat
        if spec.get("central_mm") is not None:
            block = [max(1, int(round(float(mm) / float(step)))) for mm, step in zip(spec["central_mm"], spacing)]
            values = out[tuple(slice(max(0, (n - b) // 2), max(0, (n - b) // 2) + min(n, b))
                               for n, b in zip(out.shape, block[::-1]))].reshape(-1)
        values = values[values != 0] if spec.get("nonzero", False) else values
        if values.size == 0:
            values = flat
        mean = float(values.mean(dtype=np.float64))
        variance = sum(float(np.square(chunk - mean).sum()) for chunk in _float64_chunks(values)) / values.size
        std = math.sqrt(variance)
    scale = std if std > 0 else 1.0  # one distinct value: nothing to scale
    for start in range(0, flat.size, _CHUNK):
        part = flat[start:start + _CHUNK]
        part[...] = (part.astype(np.float64) - mean) / scale
    return out


def _float64_chunks(values: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, values.size, _CHUNK):
        yield values[start:start + _CHUNK].astype(np.float64)


def preprocess(image: sitk.Image, spec: PreprocessingSpec) -> PreparedImage:
    """Reorient, resample to ``spec.target_spacing`` and normalise ``image`` into a ``PreparedImage``."""
    grid = resample_to_spacing(
        reorient(sitk.Cast(image, sitk.sitkFloat32), spec.orientation), spec.target_spacing, is_label=False
    )
    array = normalize(sitk.GetArrayViewFromImage(grid), spec.normalization, grid.GetSpacing())
    return PreparedImage(array=array, grid=grid)


def ras_box_to_index_box(
    image: sitk.Image, roi: Sequence[float]
) -> Tuple[Tuple[int, int, int], Tuple[int, int, int]]:
    """Voxels of ``image`` inside a world box given in RAS millimetres.

    Args:
        roi: ``(r_min, r_max, a_min, a_max, s_min, s_max)``.

    Returns:
        ``(start, stop)`` ITK ``(x, y, z)`` index bounds (stop exclusive) of the voxels whose centres lie in the
        box's bounding box in index space (exact for axis-aligned images), clipped to the image. A box thinner
        than a voxel still selects the nearest voxel.

    Raises:
        InputImageError: the ROI is malformed or does not overlap the image.
    """
    values = [float(v) for v in roi]
    if len(values) != 6 or not all(map(math.isfinite, values)) or any(
        values[2 * i] > values[2 * i + 1] for i in range(3)
    ):
        raise InputImageError(
            f"ROI {list(roi)} must be six finite numbers R_MIN R_MAX A_MIN A_MAX S_MIN S_MAX (RAS mm, min <= max)"
        )
    corners_ras = np.array(
        [[r, a, s] for r in values[0:2] for a in values[2:4] for s in values[4:6]], dtype=float
    )
    corners_lps = corners_ras * np.array([-1.0, -1.0, 1.0])
    indices = np.array([image.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in corners_lps])
    low, high = indices.min(axis=0), indices.max(axis=0)
    size = np.array(image.GetSize())
    if np.any(high < -0.5) or np.any(low > size - 0.5):
        raise InputImageError(
            f"ROI {values} (RAS mm) does not overlap the image, whose RAS bounds are {ras_bounds(image)}; "
            "move the ROI onto the image"
        )
    start = np.ceil(low - 1e-6).astype(int)
    stop = np.floor(high + 1e-6).astype(int) + 1
    thin = stop <= start
    start[thin] = np.round((low[thin] + high[thin]) / 2).astype(int)
    stop[thin] = start[thin] + 1
    start = np.clip(start, 0, size - 1)
    stop = np.clip(stop, start + 1, size)
    return tuple(int(v) for v in start), tuple(int(v) for v in stop)  # type: ignore[return-value]


def ras_bounds(image: sitk.Image) -> Tuple[float, ...]:
    """``(r_min, r_max, a_min, a_max, s_min, s_max)`` of the voxel centres of ``image`` in RAS millimetres."""
    size = image.GetSize()
    corners = np.array(
        [
            image.TransformContinuousIndexToPhysicalPoint((float(i), float(j), float(k)))
            for i in (0, size[0] - 1)
            for j in (0, size[1] - 1)
            for k in (0, size[2] - 1)
        ]
    ) * np.array([-1.0, -1.0, 1.0])
    low, high = corners.min(axis=0), corners.max(axis=0)
    return tuple(round(float(v), 2) for pair in zip(low, high) for v in pair)


def crop_to_roi(
    image: sitk.Image, roi: Sequence[float], margin: int = 0
) -> Tuple[sitk.Image, Tuple[int, int, int], Tuple[int, int, int]]:
    """Crop ``image`` to a RAS-millimetre box plus ``margin`` voxels of context on each side.

    Returns ``(cropped, start, stop)``: the cropped image (geometry kept, so it overlays ``image``), and the
    ROI's own index bounds in ``cropped``'s index space (ITK ``(x, y, z)``, stop exclusive, margin excluded).
    """
    start, stop = ras_box_to_index_box(image, roi)
    size = np.array(image.GetSize())
    crop_start = np.maximum(0, np.array(start) - margin)
    crop_stop = np.minimum(size, np.array(stop) + margin)
    cropped = sitk.RegionOfInterest(
        image, [int(v) for v in crop_stop - crop_start], [int(v) for v in crop_start]
    )
    inner_start = tuple(int(v) for v in np.array(start) - crop_start)
    inner_stop = tuple(int(v) for v in np.array(stop) - crop_start)
    return cropped, inner_start, inner_stop  # type: ignore[return-value]
