"""A PNG preview of one segmented volume (the demo's ``<stem>_preview.png``): three orthogonal slices through the
segmentation's centre with the segments outlined over the image, and the same slices with the finest attention map
over the image; a legend, orientation letters and a colour bar.

Drawn by ``report.draw_views``, the code that draws the PDF report's views (same display convention: radiological,
see ``report.CONVENTION``; square panels of equal size at one scale).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import SimpleITK as sitk

from ..fileio.atomic import atomic_output
from ..errors import AttentionUNetError
from ..fileio.imageio import read_image
from ..fileio.jsonfile import read_json
from .outputs import OutputPaths
from .report import CONVENTION, display_volumes, draw_views, legend_handles, require_matplotlib, whole_image

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Panel side, margins and the colour bar's column, in inches.
_PANEL, _GAP, _MARGIN, _LABEL, _BAR = 2.6, 0.1, 0.3, 0.35, 0.95


def write_preview(image_path: Union[str, Path], paths: OutputPaths, preview_path: Union[str, Path],
                  force: bool = False, title: Optional[str] = None) -> Path:
    """Draw the preview of one input's outputs to ``preview_path`` (PNG, written atomically)."""
    figure = preview_figure(image_path, paths, title)
    with atomic_output(preview_path, force) as partial:
        figure.savefig(str(partial), format="png")
    return Path(preview_path)


def preview_figure(image_path: Union[str, Path], paths: OutputPaths, title: Optional[str] = None) -> "Figure":
    """The preview as a matplotlib ``Figure``: rows of three square views (segmentation; attention when written)."""
    require_matplotlib()
    from matplotlib.figure import Figure

    image = read_image(image_path)
    labels = sitk.ReadImage(str(paths.segmentation))
    report = read_json(paths.report, "segmentation report", AttentionUNetError)
    attention = sitk.ReadImage(str(paths.attention[0])) if paths.attention else None
    volumes = display_volumes(image, labels, attention)
    structure = whole_image(volumes)
    segments = report["segments"]
    layers = ["segmentation", "attention"] if attention is not None else ["segmentation"]

    title_height, row_title, legend_height, footer = 0.75, 0.25, 0.55, 0.3
    width = _MARGIN * 2 + _LABEL + 3 * _PANEL + 2 * _GAP + _BAR
    height = title_height + len(layers) * (_PANEL + row_title) + legend_height + footer
    figure = Figure(figsize=(width, height), dpi=110)
    shown = None
    y = height - title_height
    for layer in layers:
        y -= row_title + _PANEL
        axes = [figure.add_axes([(_MARGIN + _LABEL + column * (_PANEL + _GAP)) / width, y / height,
                                 _PANEL / width, _PANEL / height]) for column in range(3)]
        drawn = draw_views(axes, volumes, structure, layer, segments, letter_size=9)
        shown = drawn if drawn is not None else shown
        figure.text((_MARGIN + _LABEL / 2) / width, (y + _PANEL / 2) / height,
                    "segmentation" if layer == "segmentation" else "attention (gate 0)", rotation=90, ha="center",
                    va="center", fontsize=10)
    if shown is not None:
        left = _MARGIN + _LABEL + 3 * _PANEL + 2 * _GAP + 0.15
        colorbar = figure.colorbar(shown, cax=figure.add_axes([left / width, y / height, 0.15 / width,
                                                                _PANEL / height]))
        colorbar.set_label("attention coefficient", fontsize=9)
        colorbar.solids.set_alpha(1.0)
    figure.legend(handles=legend_handles(segments), loc="upper center", ncol=min(len(segments), 4), fontsize=9,
                  frameon=False, bbox_to_anchor=(0.5, (y - 0.08) / height))
    volumes_text = ", ".join(f"{s['name']} {s['volume_ml']:.2f} mL" for s in segments)
    model = report["model"]
    figure.suptitle(title or f"{Path(image_path).name} - {model['name']} {model['version']}: {volumes_text}",
                    y=1 - 0.25 / height, fontsize=11)
    figure.text(0.5, 0.12 / height, f"Views in {CONVENTION}.", ha="center", va="bottom", fontsize=7.5)
    return figure
