"""Make the bundled sample volume: a crop around the left hippocampus of the MNI ICBM152 2009 T1 template.

The template ships inside the ``nilearn`` wheel (``nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted
.nii.gz``: skull-stripped ICBM 2009a symmetric T1, 1 mm, rescaled to 0..255). The crop mimics the MSD Task04
Hippocampus cases the default model was trained on: RAS orientation, 1 mm voxels, 36 x 50 x 36 voxels (x, y, z),
with the hippocampus centroid at about 42 % / 52 % / 42 % of the box along x / y / z (the mean position measured
on the training labels).

Run from the repository root with the engine's environment::

    python AttentionUNetSegment/Resources/SampleData/make_sample.py

It writes ``MNI152_hippocampus_left_T1.nii.gz`` next to this script (see ``LICENSE-MNI152.txt`` for the
template's copyright notice).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import SimpleITK as sitk

#: Left hippocampus centroid in MNI152 space (RAS mm), checked visually on the template.
CENTROID_RAS = (-26.0, -22.0, -14.0)
#: Crop size in voxels (x, y, z) and where the centroid sits inside it (fractions), as in the MSD cases.
SIZE_XYZ = (36, 50, 36)
CENTROID_FRACTION_XYZ = (0.42, 0.52, 0.42)
OUTPUT = Path(__file__).resolve().parent / "MNI152_hippocampus_left_T1.nii.gz"


def template_path() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise SystemExit("nilearn is not installed; `pip install nilearn` (only needed to rebuild the sample)")
    return Path(spec.origin).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def make_sample(template: Path, output: Path) -> sitk.Image:
    image = sitk.DICOMOrient(sitk.ReadImage(str(template)), "RAS")
    if not np.allclose(image.GetSpacing(), 1.0):
        raise SystemExit(f"expected a 1 mm template, got spacing {image.GetSpacing()}")
    centroid_lps = (-CENTROID_RAS[0], -CENTROID_RAS[1], CENTROID_RAS[2])
    centre_index = np.array(image.TransformPhysicalPointToContinuousIndex(centroid_lps))
    start = np.round(centre_index - np.array(CENTROID_FRACTION_XYZ) * np.array(SIZE_XYZ)).astype(int)
    if np.any(start < 0) or np.any(start + SIZE_XYZ > np.array(image.GetSize())):
        raise SystemExit(f"crop {start.tolist()} + {SIZE_XYZ} leaves the template")
    crop = sitk.RegionOfInterest(image, [int(s) for s in SIZE_XYZ], [int(s) for s in start])
    sitk.WriteImage(crop, str(output), useCompression=True)
    return crop


if __name__ == "__main__":
    crop = make_sample(template_path(), OUTPUT)
    print(f"wrote {OUTPUT} size {crop.GetSize()} origin {crop.GetOrigin()} (LPS mm)")
