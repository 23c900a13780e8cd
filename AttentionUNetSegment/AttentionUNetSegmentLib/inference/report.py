"""The one-page visual report (``<stem>_report.pdf``) and the drawing it shares with the demo's preview PNG.

Views are orthogonal slices of the image with the segmentation outlined, and the same slices with the finest
attention map over the image. Every view is drawn by ``draw_views``: square panels of equal size with the same
millimetre scale, orientation letters at the edges and the same display convention, in the PDF and in the PNG.

Display convention (radiological): volumes are reoriented to LPS (permute/flip only, no interpolation) and shown
with the patient's right on the left of axial and coronal views, anterior up in axial views, superior up in coronal
and sagittal views, and anterior on the left of sagittal views. The letters name the nearest patient axis of each
edge (an oblique input is shown along its nearest axes). The attention map is resampled onto the image grid for
display only. matplotlib is imported only when something is drawn (``require_matplotlib``).
"""

from __future__ import annotations

import datetime
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .. import __version__
from ..errors import AttentionUNetError
from ..fileio.atomic import atomic_output

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Index i of a displayed array runs to patient Left, j to Posterior, k to Superior.
DISPLAY_ORIENTATION = "LPS"
CONVENTION = ("radiological convention: patient right on the left of axial and coronal views, anterior on the left "
              "of sagittal views")
VIEWS = ("axial", "coronal", "sagittal")
#: Letters at the (left, right, top, bottom) edges of each view.
EDGE_LETTERS = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"), "sagittal": ("A", "P", "S", "I")}
RESEARCH_USE = "Research use only \u2014 not for diagnosis."
ATTENTION_CMAP = "inferno"
ATTENTION_ALPHA = 0.55
OUTLINE_WIDTH = 1.4
#: At most this many structures get a row of views on the one page (the largest ones).
MAX_REPORT_ROWS = 3
#: Half the side of a report view's square window: at least this many mm, else 0.8 x the structure's extent.
MIN_HALF_WINDOW_MM = 20.0
PAGE_INCHES = (11.69, 8.27)  # A4 landscape


def require_matplotlib() -> None:
    """Fail early, before any segmentation work, when the preview or the report cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise AttentionUNetError("the preview and --report-pdf need matplotlib; install it with "
                                 "`pip install \"attention-unet-segment[demo]\"`") from None


@dataclass
class DisplayVolumes:
    """Arrays ``(k, j, i)`` in ``DISPLAY_ORIENTATION`` with the voxel size ``spacing`` (i, j, k) in mm.

    ``image`` float32, ``labels`` integer, ``attention`` float32 in [0, 1] on the image grid (or None);
    ``window``: the grey-level range shown (0.5-99.5 percentiles of the image)."""

    image: np.ndarray
    labels: np.ndarray
    attention: Optional[np.ndarray]
    spacing: Tuple[float, float, float]
    window: Tuple[float, float]


def display_volumes(image: sitk.Image, labels: sitk.Image, attention: Optional[sitk.Image] = None) -> DisplayVolumes:
    """Reorient the image, its label map (same grid) and an attention map (any grid overlaying it) for display."""

    def oriented(volume: sitk.Image) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.DICOMOrient(volume, DISPLAY_ORIENTATION))

    pixels = oriented(sitk.Cast(image, sitk.sitkFloat32))
    attention_array = None
    if attention is not None:
        attention_array = oriented(sitk.Resample(attention, image, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                 sitk.sitkFloat32))
    sample = pixels[::2, ::2, ::2]
    low, high = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    spacing = tuple(float(s) for s in sitk.DICOMOrient(image, DISPLAY_ORIENTATION).GetSpacing())
    return DisplayVolumes(pixels, oriented(labels), attention_array, spacing, (low, high if high > low else low + 1))


@dataclass
class Structure:
    """A row of views: its title, the voxel ``(k, j, i)`` the slices go through, half the side of the square
    window in mm, and its size in voxels."""

    title: str
    centre: Tuple[int, int, int]
    half_mm: float
    voxels: int


def locate(volumes: DisplayVolumes, title: str, values: Sequence[int], half_mm: Optional[float] = None
           ) -> Optional[Structure]:
    """The structure made of ``values``: slices through its voxel nearest to its centroid (a curved structure's
    centroid may lie outside it), a window of ``half_mm`` (default: from its extent); None when it is empty."""
    where = np.argwhere(np.isin(volumes.labels, list(values)))
    if not len(where):
        return None
    centroid = where.mean(axis=0)
    centre = tuple(int(v) for v in where[np.argmin(((where - centroid) ** 2).sum(axis=1))])
    if half_mm is None:
        extent_mm = (where.max(axis=0) - where.min(axis=0) + 1) * np.array(volumes.spacing[::-1])
        half_mm = max(MIN_HALF_WINDOW_MM, 0.8 * float(extent_mm.max()))
    return Structure(title, centre, half_mm, len(where))


def whole_image(volumes: DisplayVolumes) -> Structure:
    """The preview's single row: through the whole segmentation's centre (the image centre when it is empty),
    with a window that holds the whole image."""
    values = [int(v) for v in np.unique(volumes.labels) if v != 0]
    extent_mm = np.array(volumes.image.shape) * np.array(volumes.spacing[::-1])
    half = float(extent_mm.max()) / 2.0
    found = locate(volumes, "segmentation", values, half) if values else None
    if found is not None:
        return found
    return Structure("image", tuple(int(n) // 2 for n in volumes.image.shape), half, 0)


def report_structures(volumes: DisplayVolumes, segments: Sequence[Mapping[str, Any]]) -> Tuple[List[Structure], str]:
    """The report's rows: one per side when the segments have sides (the centre of that side's structure), else
    one per segment; the ``MAX_REPORT_ROWS`` largest when there are more, and a note saying what was left out."""
    sides = [side for side in ("left", "right") if any(s.get("side") == side for s in segments)]
    if sides:
        groups = [(f"{side.capitalize()} side", [int(s["value"]) for s in segments if s.get("side") == side])
                  for side in sides]
    else:
        groups = [(str(s["name"]), [int(s["value"])]) for s in segments]
    found = [structure for title, values in groups if (structure := locate(volumes, title, values)) is not None]
    missing = [title for title, _ in groups if title not in {s.title for s in found}]
    notes = []
    if missing:
        notes.append("empty, no views: " + ", ".join(missing))
    if len(found) > MAX_REPORT_ROWS:
        kept = sorted(found, key=lambda s: -s.voxels)[:MAX_REPORT_ROWS]
        notes.append(f"views through the {MAX_REPORT_ROWS} largest of {len(found)} structures")
        found = [s for s in found if s in kept]
    return found, "; ".join(notes)


def _slice(volume: np.ndarray, view: str, centre: Sequence[int]) -> np.ndarray:
    k, j, i = centre
    return {"axial": lambda: volume[k], "coronal": lambda: volume[:, j, :], "sagittal": lambda: volume[:, :, i]}[view]()


def _placement(view: str, volumes: DisplayVolumes, centre: Sequence[int]) -> Tuple[Tuple[float, ...], str]:
    """``(extent, origin)`` for ``imshow``/``contour``: millimetres from the centre voxel, so that the right of
    the screen is patient left (axial, coronal) or posterior (sagittal), and the top anterior (axial) or superior."""
    nk, nj, ni = volumes.image.shape
    si, sj, sk = volumes.spacing
    k, j, i = centre
    columns_i = ((-0.5 - i) * si, (ni - 0.5 - i) * si)
    rows_k = ((-0.5 - k) * sk, (nk - 0.5 - k) * sk)
    if view == "axial":  # rows j run to posterior: row 0 (anterior) at the top
        return (*columns_i, -(nj - 0.5 - j) * sj, (0.5 + j) * sj), "upper"
    if view == "coronal":
        return (*columns_i, *rows_k), "lower"
    return ((-0.5 - j) * sj, (nj - 0.5 - j) * sj, *rows_k), "lower"


def _letters(axis: "Axes", view: str, size: float) -> None:
    import matplotlib.patheffects as effects

    stroke = [effects.withStroke(linewidth=2.0, foreground="black")]
    left, right, top, bottom = EDGE_LETTERS[view]
    for text, x, y, ha, va in ((left, 0.03, 0.5, "left", "center"), (right, 0.97, 0.5, "right", "center"),
                               (top, 0.5, 0.97, "center", "top"), (bottom, 0.5, 0.03, "center", "bottom")):
        axis.text(x, y, text, transform=axis.transAxes, ha=ha, va=va, color="white", fontsize=size,
                  fontweight="bold", path_effects=stroke)


def draw_views(axes: Sequence["Axes"], volumes: DisplayVolumes, structure: Structure, layer: str,
               segments: Sequence[Mapping[str, Any]], letter_size: float = 7.0, titles: bool = True):
    """Draw the axial, coronal and sagittal views of ``structure`` into three (square) axes: the image with the
    outline of every segment (``layer="segmentation"``) or with the attention map (``layer="attention"``).
    Returns the attention image (for a colour bar) or None."""
    shown = None
    low, high = volumes.window
    for axis, view in zip(axes, VIEWS):
        extent, origin = _placement(view, volumes, structure.centre)
        axis.set_facecolor("black")
        axis.imshow(_slice(volumes.image, view, structure.centre), cmap="gray", vmin=low, vmax=high, origin=origin,
                    extent=extent, interpolation="nearest")
        if layer == "attention" and volumes.attention is not None:
            shown = axis.imshow(_slice(volumes.attention, view, structure.centre), cmap=ATTENTION_CMAP, vmin=0.0,
                                vmax=1.0, alpha=ATTENTION_ALPHA, origin=origin, extent=extent,
                                interpolation="bilinear")
        elif layer == "segmentation":
            labels = _slice(volumes.labels, view, structure.centre)
            for segment in segments:
                mask = (labels == int(segment["value"])).astype(np.float32)
                if mask.any():
                    axis.contour(mask, levels=[0.5], colors=[tuple(segment["color"])], linewidths=OUTLINE_WIDTH,
                                 origin=origin, extent=extent)
        half = structure.half_mm
        axis.set_xlim(-half, half)
        axis.set_ylim(-half, half)
        axis.set_aspect("equal")
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_label(f"{layer} {view} {structure.title}")  # lets tests find a panel
        if titles:
            axis.set_title(view, fontsize=8, pad=2)
        _letters(axis, view, letter_size)
    return shown


def legend_handles(segments: Sequence[Mapping[str, Any]]) -> List[Any]:
    """One outline-coloured patch per segment, named as in the model."""
    from matplotlib.patches import Patch

    return [Patch(facecolor="none", edgecolor=tuple(s["color"]), linewidth=2.0, label=str(s["name"]))
            for s in segments]


def _inches(figure: "Figure", left: float, bottom: float, width: float, height: float) -> List[float]:
    w, h = figure.get_size_inches()
    return [left / w, bottom / h, width / w, height / h]


# ------------------------------------------------------------------------------------------------------ report
def _header_lines(report: Mapping[str, Any], input_name: str, created: datetime.datetime) -> List[str]:
    model = report.get("model", {})
    lines = [f"Input: {input_name}"]
    patient = report.get("patient")
    if patient:  # only with --keep-patient-info
        lines.append("Patient: " + ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in patient.items()
                                             if value not in (None, "")))
    lines.append(f"Model: {model.get('name', '?')} {model.get('version', '')}".rstrip()
                 + f"    Date: {created.strftime('%Y-%m-%d %H:%M UTC')}"
                 + f"    Engine: AttentionUNet {report.get('engine_version', __version__)}"
                 + f"    Device: {report.get('device', '?')}")
    licence = str(model.get("license") or "not stated in the model")
    lines += textwrap.wrap(f"Model licence: {licence}", width=170)[:3]
    return lines


def volume_rows(report: Mapping[str, Any]) -> List[Tuple[str, str, str, str, Optional[Sequence[float]]]]:
    """The volume table: ``(name, side, mL, voxels, colour)`` per segment, then per side and the asymmetry index."""
    rows: List[Tuple[str, str, str, str, Optional[Sequence[float]]]] = [
        (str(s["name"]), str(s.get("side") or ""), f"{s['volume_ml']:.3f}", str(s["voxels"]), s["color"])
        for s in report.get("segments", [])]
    for side, total in (report.get("sides") or {}).items():
        rows.append((f"{side.capitalize()} total", side, f"{total['volume_ml']:.3f}", str(total["voxels"]), None))
    if report.get("sides"):
        index = report.get("asymmetry_index")
        rows.append(("Asymmetry index (L \u2212 R) / mean", "", "n/a" if index is None else f"{index:+.4f}", "",
                     None))
    return rows


def _draw_table(figure: "Figure", rect: List[float], report: Mapping[str, Any], size: float) -> None:
    from matplotlib.patches import Rectangle

    axis = figure.add_axes(rect)
    axis.set_axis_off()
    rows = volume_rows(report)
    height_inches = rect[3] * figure.get_size_inches()[1]
    line = min(1.0 / (len(rows) + 1.6), 0.19 / height_inches)
    # name, [side], mL (right-aligned), voxels (right-aligned)
    sided = bool(report.get("sides"))
    cells = [(0.05, "Segment", "left"), *([(0.6, "Side", "left")] if sided else []), (0.84, "Volume (mL)", "right"),
             (0.99, "Voxels", "right")]
    y = 1.0 - line / 2
    for x, text, ha in cells:
        axis.text(x, y, text, ha=ha, va="center", fontsize=size, fontweight="bold", transform=axis.transAxes)
    axis.plot([0, 1], [1.0 - line, 1.0 - line], color="black", linewidth=0.8, transform=axis.transAxes)
    for index, (name, side, volume, voxels, color) in enumerate(rows):
        y = 1.0 - (index + 1.5) * line
        if color is not None:
            axis.add_patch(Rectangle((0.0, y - 0.3 * line), 0.032, 0.6 * line, facecolor=tuple(color),
                                     edgecolor="black", linewidth=0.4, transform=axis.transAxes))
        texts = (name, side, volume, voxels) if sided else (name, volume, voxels)
        for (x, _, ha), text in zip(cells, texts):
            axis.text(x, y, text, ha=ha, va="center", fontsize=size, transform=axis.transAxes,
                      fontweight="normal" if color is not None else "bold")


def _draw_warnings(figure: "Figure", rect: List[float], warnings: Sequence[str], note: str, size: float) -> None:
    axis = figure.add_axes(rect)
    axis.set_axis_off()
    lines: List[str] = []
    for text in warnings:
        wrapped = textwrap.wrap(str(text), width=88)
        lines += ["\u2022 " + wrapped[0], *("   " + part for part in wrapped[1:])]
    lines = lines or ["none"]
    limit = 9
    if len(lines) > limit:
        lines = lines[:limit - 1] + ["\u2026 (more than fit on the page: see the run's report.json)"]
    axis.text(0.0, 1.0, "Warnings (domain guard, localisation)", ha="left", va="top", fontsize=size,
              fontweight="bold", transform=axis.transAxes, color="#b00000" if warnings else "black")
    below = 1.0 - 0.22 / (rect[3] * figure.get_size_inches()[1])  # a line under the heading
    axis.text(0.0, below, "\n".join(lines), ha="left", va="top", fontsize=size - 0.5, transform=axis.transAxes,
              linespacing=1.35)
    if note:
        axis.text(0.0, 0.0, f"Views: {note}.", ha="left", va="bottom", fontsize=size - 0.5, style="italic",
                  transform=axis.transAxes)


def report_figure(image: sitk.Image, labels: sitk.Image, attention: Optional[sitk.Image],
                  report: Mapping[str, Any], input_name: str,
                  created: Optional[datetime.datetime] = None) -> "Figure":
    """The report page (A4 landscape) as a matplotlib ``Figure``, drawn from the image, its label map (same grid),
    the finest attention map (or None) and a ``<stem>_report.json`` dict (``segments``, ``sides``,
    ``asymmetry_index``, ``warnings``, ``model``, ``engine_version``, ``device``; ``patient`` only when the user
    asked to keep patient information). ``input_name``: the input's stem, never read from the data."""
    require_matplotlib()
    from matplotlib.figure import Figure

    created = created or datetime.datetime.now(datetime.timezone.utc)
    segments = list(report.get("segments", []))
    volumes = display_volumes(image, labels, attention)
    structures, note = report_structures(volumes, segments)
    with_attention = volumes.attention is not None

    width, height = PAGE_INCHES
    margin = 0.45
    figure = Figure(figsize=PAGE_INCHES, dpi=100)
    figure.text(margin / width, 1 - margin / height, "Attention U-Net segmentation report", ha="left", va="top",
                fontsize=15, fontweight="bold")
    figure.text(1 - margin / width, 1 - margin / height, RESEARCH_USE, ha="right", va="top", fontsize=11,
                fontweight="bold", color="#b00000")
    lines = _header_lines(report, input_name, created)
    figure.text(margin / width, 1 - (margin + 0.36) / height, "\n".join(lines), ha="left", va="top", fontsize=8.5,
                linespacing=1.45)

    # Panels: a row per structure; segmentation views, a gap, attention views, the colour bar.
    top = height - margin - 0.45 - 0.185 * len(lines) - 0.3
    bottom_area = 2.45
    label_column, gap, group_gap, bar = 0.32, 0.07, 0.3, 0.75
    groups = 2 if with_attention else 1
    # Panels are sized for both groups either way, so a page without attention maps looks the same.
    available = width - 2 * margin - label_column - 4 * gap - group_gap - bar
    rows = max(len(structures), 1)
    row_title = 0.22
    side = min(available / 6, (top - bottom_area - row_title * rows - 0.25) / rows)
    shown = None
    panel_left = margin + label_column
    group_width = 3 * side + 2 * gap
    if structures:
        figure.text((panel_left + group_width / 2) / width, top / height, "Segmentation outlines", ha="center",
                    va="bottom", fontsize=9.5, fontweight="bold")
    if with_attention and structures:
        figure.text((panel_left + group_width + group_gap + group_width / 2) / width, top / height,
                    "Attention map (gate 0, finest)", ha="center", va="bottom", fontsize=9.5, fontweight="bold")
    elif structures:
        figure.text((panel_left + group_width + group_gap) / width, top / height,
                    "No attention map: none was written for this run.", ha="left", va="bottom", fontsize=9.5)
    y = top - 0.08
    first_row_bottom = None
    for structure in structures:
        y -= row_title + side
        first_row_bottom = first_row_bottom or y
        figure.text((margin + label_column * 0.45) / width, (y + side / 2) / height, structure.title,
                    rotation=90, ha="center", va="center", fontsize=9, fontweight="bold")
        x = panel_left
        for layer in ("segmentation", "attention")[:groups]:
            axes = []
            for _ in VIEWS:
                axes.append(figure.add_axes(_inches(figure, x, y, side, side)))
                x += side + gap
            x += group_gap - gap
            drawn = draw_views(axes, volumes, structure, layer, segments)
            shown = drawn if drawn is not None else shown
    if not structures:
        figure.text(0.5, (top - 1.0) / height, "No segment was found: nothing to show.", ha="center", fontsize=11)
    panels_bottom = y if structures else top - 1.2
    if shown is not None:
        bar_axis = figure.add_axes(_inches(figure, width - margin - bar + 0.1, panels_bottom, 0.14,
                                           top - 0.08 - row_title - panels_bottom))
        colorbar = figure.colorbar(shown, cax=bar_axis)
        colorbar.set_label("attention coefficient (0\u20131)", fontsize=8)
        colorbar.ax.tick_params(labelsize=7)
        colorbar.solids.set_alpha(1.0)
    if segments:
        figure.legend(handles=legend_handles(segments), loc="upper left", ncol=min(len(segments), 4), fontsize=8,
                      frameon=False, bbox_to_anchor=((panel_left - 0.05) / width, (panels_bottom - 0.04) / height),
                      handlelength=1.4, columnspacing=1.6, title="Segments", title_fontsize=8)

    table_top = panels_bottom - 0.62
    table_height = table_top - (margin + 0.3)
    _draw_table(figure, _inches(figure, margin, margin + 0.3, 5.2, table_height), report, 8)
    _draw_warnings(figure, _inches(figure, margin + 5.6, margin + 0.3, width - 2 * margin - 5.6, table_height),
                   report.get("warnings", []), note, 8)
    figure.text(margin / width, margin / height, f"{RESEARCH_USE}\nViews in {CONVENTION}; each panel is a square "
                "window centred on its structure, one scale per row.", ha="left", va="bottom", fontsize=7.5,
                linespacing=1.4)
    return figure


def save_report_pdf(image: sitk.Image, labels: sitk.Image, attention: Optional[sitk.Image],
                    report: Mapping[str, Any], input_name: str, path: Union[str, Path]) -> None:
    """Draw ``report_figure`` into the PDF file ``path`` (one page; ``write_report_pdf`` writes it atomically)."""
    figure = report_figure(image, labels, attention, report, input_name)
    model = report.get("model", {})
    metadata: Dict[str, str] = {"Title": f"Attention U-Net segmentation report: {input_name}",
                                "Creator": f"AttentionUNet {report.get('engine_version', __version__)}",
                                "Subject": f"{model.get('name', '')} {model.get('version', '')}".strip()}
    figure.savefig(str(path), format="pdf", metadata=metadata)


def write_report_pdf(image: sitk.Image, labels: sitk.Image, attention: Optional[sitk.Image],
                     report: Mapping[str, Any], path: Union[str, Path], input_name: str,
                     force: bool = False) -> Path:
    """``save_report_pdf`` to ``path``, written atomically (the Slicer module's Export > Report (PDF))."""
    with atomic_output(path, force) as partial:
        save_report_pdf(image, labels, attention, report, input_name, partial)
    return Path(path)
