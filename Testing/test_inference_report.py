"""The one-page PDF report and the demo preview: what they show, where, in which orientation (the drawing both
share, ``report.draw_views``), and the PDF's text (extracted from the file the CLI wrote)."""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("matplotlib")

from AttentionUNetSegmentLib.cli import commands as cli  # noqa: E402
from AttentionUNetSegmentLib.model.bundle import LabelInfo  # noqa: E402
from AttentionUNetSegmentLib.inference.outputs import plan_outputs, segment_statistics, side_statistics  # noqa: E402
from AttentionUNetSegmentLib.inference.report import (  # noqa: E402
    EDGE_LETTERS,
    RESEARCH_USE,
    Structure,
    display_volumes,
    draw_views,
    report_figure,
    write_report_pdf,
)

#: A permuted, flipped storage order (index i runs to anterior, j to superior, k to patient right; LPS columns),
#: so only a correct reorientation puts structures on the right side of the screen.
PERMUTED = (0.0, 0.0, -1.0,
            -1.0, 0.0, 0.0,
            0.0, 1.0, 0.0)
RED, GREEN, BLUE = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)


def pdf_text(path: Path) -> str:
    """The text a PDF that matplotlib wrote shows: the string pieces of every ``Tj``/``TJ`` joined per text object
    (kerning numbers dropped), one text object per line. Characters outside the font's encoding (dashes,
    ligatures such as "fi") come out as control bytes."""
    data = path.read_bytes()
    lines = []
    for stream in re.findall(rb"stream\r?\n(.*?)\r?\nendstream", data, re.S):
        try:
            content = zlib.decompress(stream)
        except zlib.error:
            continue
        for block in re.findall(rb"BT(.*?)ET", content, re.S):
            pieces = re.findall(rb"\(((?:\\.|[^\\)])*)\)", block)
            lines.append(b"".join(re.sub(rb"\\(.)", rb"\1", piece) for piece in pieces).decode("latin-1"))
    return "\n".join(lines)


def page_count(path: Path) -> int:
    return len(re.findall(rb"/Type\s*/Page\b(?!s)", path.read_bytes()))


def rendered(figure) -> np.ndarray:
    """The figure as an RGB float array (rows top to bottom), as the PNG of it would hold."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].astype(np.float32) / 255.0


def panels(figure) -> Dict[str, object]:
    """The view axes by their label (``"<layer> <view> <structure>"``)."""
    return {axis.get_label(): axis for axis in figure.axes if axis.get_label()}


def coloured(pixels: np.ndarray, figure, axis, color: Sequence[float]) -> np.ndarray:
    """``(x, y)`` positions, as fractions of the panel (x to the right, y up), of the pixels of ``color`` in it."""
    box = axis.get_window_extent()
    height = pixels.shape[0]
    rows = slice(int(round(height - box.y1)), int(round(height - box.y0)))
    columns = slice(int(round(box.x0)), int(round(box.x1)))
    region = pixels[rows, columns]
    match = np.all(np.abs(region - np.asarray(color)) < 0.15, axis=-1)
    r, c = np.nonzero(match)
    return np.stack([(c + 0.5) / region.shape[1], 1.0 - (r + 0.5) / region.shape[0]], axis=1)


def oriented_image() -> Tuple[sitk.Image, sitk.Image, List[Dict]]:
    """A 40 x 36 x 32 image stored in ``PERMUTED`` order with three bars around its centre (offsets in mm, RAS):
    label 1 along S at (L 10, A 10), label 2 along A at (L 10, S 10), label 3 along L at (A 10, S 10); each crosses
    exactly one of the three centre planes (axial, coronal, sagittal)."""
    size = (40, 36, 32)
    image = sitk.Image(size, sitk.sitkFloat32)
    image.SetSpacing((1.0, 1.25, 1.5))
    image.SetDirection(PERMUTED)
    image.SetOrigin((20.0, -10.0, 5.0))
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in size]))
    labels = np.zeros(size[::-1], np.uint8)
    rng = np.random.default_rng(0)
    array = rng.normal(100, 10, size[::-1]).astype(np.float32)
    for index in np.ndindex(*size):
        lps = np.array(image.TransformIndexToPhysicalPoint(index)) - centre
        left, anterior, superior = lps[0], -lps[1], lps[2]
        near = {axis: abs(value - 10) < 2.6 for axis, value in (("L", left), ("A", anterior), ("S", superior))}
        if near["L"] and near["A"] and abs(superior) < 12:
            labels[index[::-1]] = 1
        elif near["L"] and near["S"] and abs(anterior) < 12:
            labels[index[::-1]] = 2
        elif near["A"] and near["S"] and abs(left) < 12:
            labels[index[::-1]] = 3
    pixels = sitk.GetImageFromArray(array)
    pixels.CopyInformation(image)
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(image)
    segments = [{"value": 1, "name": "bar S", "color": RED}, {"value": 2, "name": "bar A", "color": GREEN},
                {"value": 3, "name": "bar L", "color": BLUE}]
    return pixels, label_image, segments


def test_views_follow_the_radiological_convention_their_letters_name():
    """Axial: patient left on the right, anterior up; coronal: left on the right, superior up; sagittal: anterior
    on the left, superior up, whatever the storage order. Each bar shows only in the view whose plane it crosses,
    in the quadrant the letters say."""
    from matplotlib.figure import Figure

    image, labels, segments = oriented_image()
    volumes = display_volumes(image, labels)
    centre = tuple(int(n) // 2 for n in volumes.image.shape)
    structure = Structure("centre", centre, 25.0, 0)
    figure = Figure(figsize=(9, 3), dpi=100)
    axes = [figure.add_axes([0.02 + 0.33 * c, 0.05, 0.3, 0.9]) for c in range(3)]
    draw_views(axes, volumes, structure, "segmentation", segments)
    pixels = rendered(figure)
    # (view, colour, expected panel position): 10 mm of a 50 mm window from the centre = 0.2 of the panel.
    expected = {"axial": (RED, (0.7, 0.7)), "coronal": (GREEN, (0.7, 0.7)), "sagittal": (BLUE, (0.3, 0.7))}
    assert EDGE_LETTERS == {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"),
                            "sagittal": ("A", "P", "S", "I")}
    for axis, (view, (color, position)) in zip(axes, expected.items()):
        found = coloured(pixels, figure, axis, color)
        assert len(found) > 20, view
        np.testing.assert_allclose(found.mean(axis=0), position, atol=0.06, err_msg=view)
        for other, _ in expected.values():
            if other != color:
                assert len(coloured(pixels, figure, axis, other)) == 0, view
        letters = {text.get_text() for text in axis.texts}
        assert letters == set(EDGE_LETTERS[view])


def _report_for(labels: sitk.Image, segments: Sequence[LabelInfo], warnings=()) -> Dict:
    rows = segment_statistics(labels, segments)
    sides, asymmetry = side_statistics(rows)
    return {"segments": rows, "sides": sides, "asymmetry_index": asymmetry, "warnings": list(warnings),
            "model": {"name": "hippocampus", "version": "1.0.0", "license": "CC-BY-SA 4.0 (weights)"},
            "engine_version": "0.1.0", "device": "cpu"}


def whole_head() -> Tuple[sitk.Image, sitk.Image, sitk.Image, List[LabelInfo]]:
    """A 'head' (RAS-stored, anisotropic) with the four per-side labels of a localised run: left 1/2 at patient
    left (+25 mm), right 3/4 at patient right (-25 mm); anterior labels 8 mm anterior of the posterior ones."""
    size = (70, 80, 60)
    image = sitk.Image(size, sitk.sitkFloat32)
    image.SetSpacing((1.1, 1.0, 1.3))
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))  # RAS storage
    image.SetOrigin((38.0, 40.0, -39.0))
    segments = [LabelInfo(1, "Left anterior hippocampus", (0.9, 0.6, 0.2), side="left"),
                LabelInfo(2, "Left posterior hippocampus", (0.2, 0.6, 0.9), side="left"),
                LabelInfo(3, "Right anterior hippocampus", (0.85, 0.3, 0.55), side="right"),
                LabelInfo(4, "Right posterior hippocampus", (0.3, 0.8, 0.4), side="right")]
    k, j, i = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    direction = np.array(image.GetDirection()).reshape(3, 3)
    lps = (np.stack([i, j, k], -1) * np.array(image.GetSpacing())) @ direction.T + np.array(image.GetOrigin())
    left, anterior, superior = lps[..., 0], -lps[..., 1], lps[..., 2]
    labels = np.zeros(size[::-1], np.uint8)
    for value, (x, a) in zip((1, 2, 3, 4), ((25, 4), (25, -6), (-25, 4), (-25, -6))):
        labels[(np.abs(left - x) < 5) & (np.abs(anterior - a) < 5) & (np.abs(superior) < 4)] = value
    head = 100.0 * ((left / 34) ** 2 + (anterior / 39) ** 2 + (superior / 29) ** 2 < 1)
    pixels = sitk.GetImageFromArray((head + np.random.default_rng(1).normal(0, 5, head.shape)).astype(np.float32))
    pixels.CopyInformation(image)
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(image)
    coarse = sitk.Image([n // 2 for n in size], sitk.sitkFloat32) + 0.5
    coarse.SetSpacing([2 * s for s in image.GetSpacing()])
    coarse.SetDirection(image.GetDirection())
    coarse.SetOrigin(image.TransformContinuousIndexToPhysicalPoint((0.5, 0.5, 0.5)))
    return pixels, label_image, coarse, segments


def test_report_of_a_localised_run_has_a_row_per_side_the_table_and_the_warnings(tmp_path):
    image, labels, attention, segments = whole_head()
    warning = "registration quality is low (interior MI 0.07): check the boxes"
    report = _report_for(labels, segments, [warning])
    figure = report_figure(image, labels, attention, report, "head_case")
    views = panels(figure)
    assert sorted(views) == sorted(f"{layer} {view} {side} side" for layer in ("segmentation", "attention")
                                   for view in ("axial", "coronal", "sagittal") for side in ("Left", "Right"))
    sizes = {tuple(np.round(axis.get_position().bounds[2:], 6)) for axis in views.values()}
    assert len(sizes) == 1  # every panel the same size
    pixels = rendered(figure)
    for side, values in (("Left", (1, 2)), ("Right", (3, 4))):
        for view in ("axial", "sagittal"):  # both labels of a side cross its axial and sagittal centre planes
            axis = views[f"segmentation {view} {side} side"]
            for segment in segments:
                found = coloured(pixels, figure, axis, segment.color)
                if segment.value in values:
                    assert len(found) > 10, (side, view, segment.name)
                    assert np.all(np.abs(found - 0.5) < 0.4)  # around the panel's centre: the structure's
                else:
                    assert len(found) == 0, (side, view, segment.name)  # the other side is 50 mm away
        # Anterior above posterior in the axial view, left of it in the sagittal one.
        anterior, posterior = (s.color for s in segments if s.value in values)
        axial = views[f"segmentation axial {side} side"]
        assert coloured(pixels, figure, axial, anterior)[:, 1].mean() > coloured(pixels, figure, axial,
                                                                                 posterior)[:, 1].mean()
        sagittal = views[f"segmentation sagittal {side} side"]
        assert coloured(pixels, figure, sagittal, anterior)[:, 0].mean() < coloured(pixels, figure, sagittal,
                                                                                    posterior)[:, 0].mean()
    path = write_report_pdf(image, labels, attention, report, tmp_path / "head_case_report.pdf", "head_case")
    text = pdf_text(path)
    assert page_count(path) == 1
    for row in report["segments"]:
        assert row["name"] in text and f"{row['volume_ml']:.3f}" in text
    for side in ("left", "right"):
        assert f"{report['sides'][side]['volume_ml']:.3f}" in text
    assert f"{report['asymmetry_index']:+.4f}" in text and "Asymmetry index" in text
    assert "registration quality is low" in text and "head_case" in text and "Patient" not in text
    assert "hippocampus 1.0.0" in text and "CC-BY-SA 4.0" in text and "Research use only" in text
    assert "radiological convention" in text and "attention coe" in text  # the colour bar ("ffi" is one glyph)
    figure.savefig(str(tmp_path / "head_case_report.png"), dpi=100)  # what a person looks at


def test_report_shows_patient_information_only_when_the_report_carries_it(tmp_path):
    image, labels, attention, segments = whole_head()
    report = dict(_report_for(labels, segments), patient={"name": "Doe^Jane", "id": "PAT-0042"})
    text = pdf_text(write_report_pdf(image, labels, attention, report, tmp_path / "p.pdf", "series_1"))
    assert "Doe^Jane" in text and "PAT-0042" in text


def test_segment_report_pdf_shows_the_reports_volumes(tiny_bundle, tmp_path, capsys):
    """``segment --report-pdf`` on a crop (labels 1-2, no sides): the PDF is written with the other outputs and
    holds the segment names and the volumes of ``<stem>_report.json``; --force rules apply to it too."""
    from test_cli_commands import make_volume

    image = tmp_path / "crop case.nii.gz"
    make_volume(image, (24, 20, 16), (1.0, 1.2, 1.5))
    out = tmp_path / "out"
    args = ["segment", str(image), "--output-dir", str(out), "--model", str(tiny_bundle.path), "--device", "cpu",
            "--report-pdf"]
    assert cli.main(args) == 0, capsys.readouterr().err
    report = json.loads((out / "crop case_report.json").read_text())
    pdf = out / "crop case_report.pdf"
    assert report["files"]["report_pdf"] == pdf.name and page_count(pdf) == 1
    text = pdf_text(pdf)
    for row in report["segments"]:
        assert row["name"] in text and f"{row['volume_ml']:.3f}" in text and row["side"] is None
    assert "crop case" in text and "tiny 0.0.1" in text and "Apache-2.0" in text and "cpu" in text
    assert "Side" not in text and "Asymmetry" not in text
    assert RESEARCH_USE.split(" \u2014")[0] in text
    before = pdf.stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(args) == 2 and "--force" in capsys.readouterr().err and pdf.stat().st_mtime_ns == before
    assert cli.main([*args, "--force"]) == 0 and pdf.stat().st_mtime_ns != before


def test_preview_has_a_legend_orientation_letters_and_equal_panels(tiny_bundle, tmp_path, capsys):
    """The demo preview is drawn by the report's views: a legend naming every segment, the letters of each view,
    six panels of one size in aligned rows and columns."""
    import matplotlib.image

    from AttentionUNetSegmentLib.inference import preview
    from test_cli_commands import make_volume

    image = tmp_path / "case.nii.gz"
    make_volume(image, (20, 18, 12), (1.0, 1.2, 2.0))
    assert cli.main(["segment", str(image), "--output-dir", str(tmp_path / "out"), "--model",
                     str(tiny_bundle.path), "--device", "cpu"]) == 0, capsys.readouterr().err
    paths = plan_outputs(tmp_path / "out", "case", tiny_bundle.labels, num_attention=2)
    figure = preview.preview_figure(image, paths)
    png = preview.write_preview(image, paths, tmp_path / "out" / "case_preview.png")
    views = panels(figure)
    assert len(views) == 6
    boxes = [axis.get_position().bounds for axis in views.values()]
    assert len({tuple(np.round(b[2:], 6)) for b in boxes}) == 1  # one size
    assert len({round(b[0], 6) for b in boxes}) == 3 and len({round(b[1], 6) for b in boxes}) == 2  # aligned grid
    legend = figure.legends[0]
    assert [text.get_text() for text in legend.get_texts()] == ["Anterior", "Posterior"]
    for label, axis in views.items():
        assert {text.get_text() for text in axis.texts} == set(EDGE_LETTERS[label.split()[1]])
    pixels = matplotlib.image.imread(str(png))
    assert pixels.shape[0] > 600 and pixels.shape[1] > 900 and pixels[..., :3].std() > 0.05


WHOLE_HEAD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "whole-head" / "images" / "ixi012.nii.gz"


@pytest.mark.slow
@pytest.mark.skipif(not WHOLE_HEAD.is_file(), reason="shared whole-head data not present")
def test_report_of_a_real_whole_head_with_the_bundled_model(tmp_path, capsys):
    """The default model on a real head: a localised run's PDF names the four per-side segments with their volumes
    and the asymmetry index; the same page drawn to PNG has a row per side with both sides' outlines."""
    from AttentionUNetSegmentLib.fileio.imageio import read_image

    out = tmp_path / "out"
    assert cli.main(["segment", str(WHOLE_HEAD), "--output-dir", str(out), "--device", "cpu",
                     "--report-pdf"]) == 0, capsys.readouterr().err
    report = json.loads((out / "ixi012_report.json").read_text())
    assert [s["side"] for s in report["segments"]] == ["left", "left", "right", "right"]
    text = pdf_text(out / "ixi012_report.pdf")
    for row in report["segments"]:
        assert row["name"] in text and f"{row['volume_ml']:.3f}" in text
    model = f"{report['model']['name']} {report['model']['version']}"
    assert f"{report['asymmetry_index']:+.4f}" in text and model in text and "CC-BY-SA" in text
    figure = report_figure(read_image(WHOLE_HEAD), sitk.ReadImage(str(out / "ixi012_seg.nii.gz")),
                           sitk.ReadImage(str(out / "ixi012_attention_0.nii.gz")), report, "ixi012")
    pixels = rendered(figure)
    views = panels(figure)
    for side in ("left", "right"):
        axis = views[f"segmentation sagittal {side.capitalize()} side"]
        for segment in report["segments"]:
            found = coloured(pixels, figure, axis, segment["color"])
            assert (len(found) > 10) == (segment["side"] == side), (side, segment["name"])
    figure.savefig(str(tmp_path / "ixi012_report.png"), dpi=100)


def test_an_empty_segmentation_still_gets_its_page(tmp_path):
    """Nothing found (a failed model, the wrong image): the page says so, keeps the table of zero volumes."""
    image, labels, attention, segments = whole_head()
    empty = sitk.Image(labels.GetSize(), labels.GetPixelID())
    empty.CopyInformation(labels)
    report = _report_for(empty, segments)
    figure = report_figure(image, empty, attention, report, "empty_case")
    texts = [text.get_text() for text in figure.findobj(match=lambda artist: hasattr(artist, "get_text"))]
    assert not panels(figure) and "No segment was found: nothing to show." in texts
    assert any("no views: Left side, Right side" in text for text in texts)
    text = pdf_text(write_report_pdf(image, empty, attention, report, tmp_path / "empty.pdf", "empty_case"))
    assert "0.000" in text and "n/a" in text  # zero volumes, no asymmetry index
