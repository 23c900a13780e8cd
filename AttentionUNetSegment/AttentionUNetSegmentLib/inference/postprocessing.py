"""Post-processing of label maps."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage


def keep_largest_component(labels: sitk.Image, values: Optional[Sequence[int]] = None) -> sitk.Image:
    """Keep only the largest 26-connected component of each label value; the rest becomes background (0).

    Args:
        labels: integer label map.
        values: label values to clean (default: every non-zero value present).

    Returns:
        A label map with ``labels``' pixel type and geometry.
    """
    array = sitk.GetArrayFromImage(labels)
    if values is None:
        values = [int(v) for v in np.unique(array) if v != 0]
    structure = ndimage.generate_binary_structure(3, 3)
    for value in values:
        mask = array == value
        components, count = ndimage.label(mask, structure=structure)
        if count <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        array[mask & (components != int(sizes.argmax()))] = 0
    cleaned = sitk.GetImageFromArray(array)
    cleaned.CopyInformation(labels)
    return cleaned


def keep_central_component(labels: sitk.Image, values: Sequence[int], centre_lps: Sequence[float],
                           sigma_mm: float = 12.0) -> sitk.Image:
    """Keep one 26-connected component of the union of ``values`` (one structure labelled in parts, e.g. a side's
    anterior and posterior hippocampus): the one with the largest size x ``exp(-d^2 / (2 sigma^2))``, ``d`` the
    distance (mm) from its centroid to ``centre_lps`` (the localisation box's centre: the structure lies near it,
    false positives lie towards the box's edges, and may be larger). Other voxels of ``values`` become 0; the kept
    component keeps its labels.

    Args:
        labels: integer label map.
        values: the label values forming the structure.
        centre_lps: the expected centre, world (LPS) mm.
        sigma_mm: how fast closeness stops counting.

    Returns:
        A label map with ``labels``' pixel type and geometry.
    """
    array = sitk.GetArrayFromImage(labels)
    mask = np.isin(array, list(values))
    components, count = ndimage.label(mask, structure=ndimage.generate_binary_structure(3, 3))
    if count <= 1:
        return labels
    sizes = np.bincount(components.ravel())[1:]
    centroids = ndimage.center_of_mass(mask, components, range(1, count + 1))
    centre = np.asarray(centre_lps, float)
    scores = []
    for size, (z, y, x) in zip(sizes, centroids):
        point = np.array(labels.TransformContinuousIndexToPhysicalPoint((float(x), float(y), float(z))))
        scores.append(size * np.exp(-float(np.sum((point - centre) ** 2)) / (2.0 * sigma_mm ** 2)))
    array[mask & (components != int(np.argmax(scores)) + 1)] = 0
    cleaned = sitk.GetImageFromArray(array)
    cleaned.CopyInformation(labels)
    return cleaned
