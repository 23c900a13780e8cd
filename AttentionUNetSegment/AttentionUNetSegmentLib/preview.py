"""A PNG preview of one segmented volume: three orthogonal slices with the segmentation outlined over the image,
and the same slices with the finest attention map over the image.

The attention map is resampled onto the image grid *for display only* (the written map stays on its own coarse
grid). Slices go through the segmentation's centre and are shown in radiological convention (patient right on
the left of axial and coronal views, superior up), with the voxel aspect ratio honoured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from .errors import AttentionUNetError
from .imageio import atomic_output, read_image
from .outputs import OutputPaths

#: Display orientation: index i runs to patient Left, j to Posterior, k to Superior.
DISPLAY_ORIENTATION = "LPS"


def require_matplotlib() -> None:
    """Fail early, before any segmentation work, when the preview cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise AttentionUNetError("the preview needs matplotlib; install it with "
                                 "`pip install \"attention-unet-segment[demo]\"`") from None


def _views(volume: np.ndarray, centre: Sequence[int]) -> List[np.ndarray]:
    """Axial, coronal and sagittal slices of a ``(k, j, i)`` array, rows ordered so that ``origin='lower'``
    puts superior (coronal/sagittal) or posterior (axial: flipped below) at the top."""
    k, j, i = centre
    return [volume[k, ::-1, :], volume[:, j, :], volume[:, :, i]]


def write_preview(image_path: Union[str, Path], paths: OutputPaths, preview_path: Union[str, Path],
                  force: bool = False, title: Optional[str] = None) -> Path:
    """Draw the preview of one input's outputs to ``preview_path`` (PNG, written atomically)."""
    require_matplotlib()
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    image = read_image(image_path)
    labels = sitk.ReadImage(str(paths.segmentation))
    report = json.loads(paths.report.read_text(encoding="utf-8"))
    attention = None
    if paths.attention:
        coarse = sitk.ReadImage(str(paths.attention[0]))
        attention = sitk.Resample(coarse, image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)

    def array(volume: sitk.Image) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.DICOMOrient(volume, DISPLAY_ORIENTATION))

    pixels = array(sitk.Cast(image, sitk.sitkFloat32))
    label_array = array(labels)
    spacing = sitk.DICOMOrient(image, DISPLAY_ORIENTATION).GetSpacing()  # (i, j, k)
    foreground = np.argwhere(label_array > 0)
    centre = (foreground.mean(axis=0) if len(foreground) else np.array(label_array.shape) / 2).astype(int)
    low, high = np.percentile(pixels, [1, 99])
    aspects = [spacing[1] / spacing[0], spacing[2] / spacing[0], spacing[2] / spacing[1]]
    names = ["axial", "coronal", "sagittal"]

    figure = Figure(figsize=(10, 7), dpi=110, layout="constrained")
    axes = figure.subplots(2 if attention is not None else 1, 3, squeeze=False)
    segments = report["segments"]
    lookup = np.zeros((max([s["value"] for s in segments] + [0]) + 1, 4))
    for segment in segments:
        lookup[segment["value"]] = [*segment["color"], 0.45]
    overlay = ListedColormap(lookup)
    for column, (background, segmentation) in enumerate(zip(_views(pixels, centre), _views(label_array, centre))):
        axis = axes[0][column]
        axis.imshow(background, cmap="gray", vmin=low, vmax=high, origin="lower", aspect=aspects[column])
        axis.imshow(segmentation, cmap=overlay, vmin=0, vmax=len(lookup) - 1, origin="lower", aspect=aspects[column],
                    interpolation="nearest")
        for segment in segments:
            mask = (segmentation == segment["value"]).astype(float)
            if mask.any():
                axis.contour(mask, levels=[0.5], colors=[segment["color"]], linewidths=1.0, origin="lower")
        axis.set_title(f"{names[column]}: segmentation")
    if attention is not None:
        for column, (background, alpha) in enumerate(zip(_views(pixels, centre), _views(array(attention), centre))):
            axis = axes[1][column]
            axis.imshow(background, cmap="gray", vmin=low, vmax=high, origin="lower", aspect=aspects[column])
            shown = axis.imshow(alpha, cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.55, origin="lower",
                                aspect=aspects[column])
            axis.set_title(f"{names[column]}: attention (gate 0)")
        figure.colorbar(shown, ax=axes[1].tolist(), shrink=0.8, label="attention coefficient")
    for axis in axes.ravel():
        axis.set_xticks([])
        axis.set_yticks([])
    volumes = ", ".join(f"{s['name']} {s['volume_ml']:.2f} mL" for s in segments)
    model = report["model"]
    figure.suptitle(title or f"{Path(image_path).name} - {model['name']} {model['version']}: {volumes}")
    with atomic_output(preview_path, force) as partial:
        figure.savefig(str(partial), format="png")
    return Path(preview_path)
