"""Post-processing that keeps the right component of a localised structure."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from AttentionUNetSegmentLib.inference.postprocessing import keep_central_component


def test_the_component_near_the_box_centre_wins_over_a_larger_one_at_the_edge():
    array = np.zeros((40, 40, 40), np.uint8)
    array[17:23, 15:20, 17:23] = 1  # the structure at the centre, in two labelled parts (6x10x6 voxels)
    array[17:23, 20:25, 17:23] = 2
    array[0:8, 0:12, 0:12] = 1  # a larger false positive in a corner (8x12x12 voxels)
    array[30:34, 30:34, 30:34] = 2
    array[35:38, 2:5, 35:38] = 3  # another structure's label is left alone
    labels = sitk.GetImageFromArray(array)
    labels.SetSpacing((2.0, 2.0, 2.0))
    labels.SetOrigin((10.0, -5.0, 3.0))
    labels.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    centre = labels.TransformContinuousIndexToPhysicalPoint((19.5, 19.5, 19.5))
    kept = keep_central_component(labels, [1, 2], centre)
    out = sitk.GetArrayFromImage(kept)
    assert kept.GetOrigin() == labels.GetOrigin() and kept.GetDirection() == labels.GetDirection()
    assert (out == 1).sum() == 6 * 5 * 6 and (out == 2).sum() == 6 * 5 * 6  # both parts of the structure kept
    assert not out[0:8, 0:12, 0:12].any() and not out[30:34, 30:34, 30:34].any()
    assert (out == 3).sum() == 27
    # Where both lie near the centre, size decides.
    array[:] = 0
    array[15:25, 15:25, 15:25] = 1
    array[15:18, 27:30, 15:18] = 2
    out = sitk.GetArrayFromImage(keep_central_component(sitk.GetImageFromArray(array), [1, 2], (21.0, 21.0, 19.5)))
    assert (out == 1).sum() == 1000 and (out == 2).sum() == 0
