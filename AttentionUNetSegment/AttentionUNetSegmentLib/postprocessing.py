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
