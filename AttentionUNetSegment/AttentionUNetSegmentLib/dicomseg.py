"""DICOM Segmentation objects (highdicom) of a label map on a DICOM series' grid.

``build_segmentation`` makes one binary SEG referencing the source series and its instances: one segment per label
(segment numbers 1..N in label order, label values mapped onto them), with the label's name, its colour as the
recommended display CIELab value, its terminology codes (category, type, type modifier = laterality, anatomic
region) parsed from the bundle's 3D Slicer terminology string (a generic "Tissue" code where it has none), and the
algorithm identification (model name and version, engine version). It copies the patient and study modules from
the source (the standard requires them); nothing else this tool writes carries them. highdicom and pydicom are the
``[dicom]`` extra: ``require_highdicom`` says how to install them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from . import __version__
from .bundle import LabelInfo
from .dicomio import DicomSeries
from .errors import AttentionUNetError

#: The distribution name the ``[dicom]`` extra belongs to (pyproject ``[project] name``).
DISTRIBUTION = "attention-unet-segment"
#: Category and type of a segment whose label has no terminology (DICOM's generic "Tissue").
GENERIC_CODE = ("SCT", "85756007", "Tissue")
#: Largest difference, in mm, between the label map's grid and the series' that is still the same grid.
GRID_TOLERANCE_MM = 1e-3


def require_highdicom() -> None:
    """Raise ``AttentionUNetError`` (how to install it) unless highdicom and pydicom can be imported."""
    try:
        import highdicom  # noqa: F401
        import pydicom  # noqa: F401
    except ImportError as error:
        python = "" if sys.version_info >= (3, 10) else " (highdicom needs Python 3.10 or newer)"
        raise AttentionUNetError(f"--dicom-seg needs highdicom and pydicom ({error}); install them with "
                                 f'pip install "{DISTRIBUTION}[dicom]"{python}') from None


def _code(part: str) -> Optional[Tuple[str, str, str]]:
    """``"SCT^5976002^Hippocampus"`` -> ``("SCT", "5976002", "Hippocampus")``; ``None`` for an empty part."""
    fields = (part.split("^") + ["", "", ""])[:3]
    return tuple(f.strip() for f in fields) if fields[0].strip() and fields[1].strip() else None


def terminology_codes(entry: str) -> dict:
    """The codes of a 3D Slicer terminology string (``context~category~type~type modifier~anatomic context~
    region~region modifier``): ``{"category", "type", "modifier", "region", "region_modifier"}``, each a
    ``(scheme, value, meaning)`` triple or ``None``; category and type fall back to ``GENERIC_CODE``."""
    parts = (entry.split("~") + [""] * 7)[:7] if entry else [""] * 7
    category, kind = _code(parts[1]), _code(parts[2])
    if category is None or kind is None:
        category, kind = GENERIC_CODE, GENERIC_CODE
    return {"category": category, "type": kind, "modifier": _code(parts[3]), "region": _code(parts[5]),
            "region_modifier": _code(parts[6])}


def _check_grid(labels: sitk.Image, series: DicomSeries) -> None:
    corners = [(0, 0, 0), tuple(n - 1 for n in series.size)]

    def world(origin, spacing, direction, index):
        return np.asarray(origin) + np.asarray(direction).reshape(3, 3) @ (np.asarray(spacing) * index)

    apart = max(float(np.linalg.norm(world(labels.GetOrigin(), labels.GetSpacing(), labels.GetDirection(), c)
                                     - world(series.origin, series.spacing, series.direction, c))) for c in corners)
    if tuple(labels.GetSize()) != series.size or apart > GRID_TOLERANCE_MM:
        raise AttentionUNetError(
            f"the label map ({' x '.join(map(str, labels.GetSize()))} voxels) is not on the grid of {series.name} "
            f"({' x '.join(map(str, series.size))} voxels, corners up to {apart:.3g} mm apart); a DICOM SEG needs the "
            "labels on the series' own grid: export them with the DICOM volume as the reference")


def build_segmentation(labels: sitk.Image, segments: Sequence[LabelInfo], series: DicomSeries,
                       algorithm_name: str, algorithm_version: str) -> Any:
    """The ``highdicom.seg.Segmentation`` of ``labels`` (on ``series``' grid, slice ``k`` = ``series.files[k]``).

    Raises:
        AttentionUNetError: highdicom is missing, the grids differ, a voxel holds a value no segment has, or the
            source files cannot be read by pydicom.
    """
    require_highdicom()
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    _check_grid(labels, series)
    array = sitk.GetArrayViewFromImage(labels)  # (z, y, x) = (frames, rows, columns)
    values = [label.value for label in segments]
    present = np.unique(array)
    stray = sorted(set(present.tolist()) - set(values) - {0})
    if stray:
        raise AttentionUNetError(f"the label map holds value(s) {stray[:5]} that no segment has; give every label "
                                 "value a segment")
    lookup = np.zeros(int(max(values + [int(present.max())])) + 1, dtype=np.uint16 if len(values) > 255 else np.uint8)
    lookup[values] = np.arange(1, len(values) + 1)
    pixels = lookup[array]
    try:
        sources = [pydicom.dcmread(str(path), stop_before_pixels=True) for path in series.files]
    except (OSError, pydicom.errors.InvalidDicomError) as error:
        raise AttentionUNetError(f"cannot read the source files of {series.name} with pydicom ({error}); export the "
                                 "series again") from None
    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=algorithm_version,
        parameters={"engine": f"AttentionUNet {__version__}"})
    descriptions: List[Any] = []
    for number, label in enumerate(segments, start=1):
        terms = terminology_codes(label.terminology)
        concept = {key: hd.sr.CodedConcept(value=code[1], scheme_designator=code[0], meaning=code[2])
                   for key, code in terms.items() if code is not None}
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=label.name, segmented_property_category=concept["category"],
            segmented_property_type=concept["type"], algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification, tracking_uid=hd.UID(), tracking_id=label.name,
            anatomic_regions=[concept["region"]] if "region" in concept else None,
            display_color=hd.color.CIELabColor.from_rgb(*(round(255 * min(max(c, 0.0), 1.0)) for c in label.color)))
        if "modifier" in concept:
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                concept["modifier"]]
        if "region" in concept and "region_modifier" in concept:
            description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [concept["region_modifier"]]
        descriptions.append(description)
    try:
        source_number = int(getattr(sources[0], "SeriesNumber", 0) or 0)
    except (TypeError, ValueError):
        source_number = 0
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=source_number + 1000,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="AttentionUNet",
        manufacturer_model_name=f"{algorithm_name} {algorithm_version}"[:64], software_versions=__version__,
        device_serial_number="0", series_description=f"AttentionUNet {algorithm_name}"[:64],
        content_label="ATTENTIONUNET", content_description=f"{algorithm_name} {algorithm_version}"[:64],
        content_creator_name="AttentionUNet^")


def save_segmentation(segmentation: Any, partial: Path, path: Path) -> None:
    """Write ``segmentation`` to ``partial`` (an ``imageio.atomic_output`` path for ``path``).

    Raises:
        OSError: it could not be written (disk full, folder unwritable).
    """
    try:
        segmentation.save_as(str(partial), enforce_file_format=True)
    except OSError as error:
        raise OSError(f"cannot write {path} ({error.strerror or error})") from None
