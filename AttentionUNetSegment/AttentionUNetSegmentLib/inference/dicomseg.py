"""DICOM Segmentation objects (highdicom) of a label map on a DICOM series' grid.

``build_segmentation`` makes one binary SEG referencing the source series and its instances: one segment per label
(segment numbers 1..N in label order, label values mapped onto them), with the label's name, its colour as the
recommended display CIELab value, its terminology codes (category, type, type modifier = laterality, anatomic
region) parsed from the bundle's 3D Slicer terminology string (a generic "Tissue" code where it has none), and the
algorithm identification (model name and version, engine version). It copies the patient and study modules from
the source (the standard requires them); nothing else this tool writes carries them. highdicom and pydicom are the
``[dicom]`` extra: ``require_highdicom`` says how to install them. ``write_dicom_seg`` (the ``dicom-seg`` command,
which the Slicer module's Export runs) writes one from a label map file, e.g. an edited segmentation.
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .. import __version__
from ..errors import AttentionUNetError, OutputExistsError
from ..fileio.atomic import atomic_output
from ..fileio.dicomio import DicomSeries, find_series, is_series_input, series_from_files
from ..fileio.imageio import SHEAR_TOLERANCE_VOXELS, read_label
from ..fileio.jsonfile import read_json
from ..model.bundle import MAX_LABEL_VALUE, LabelInfo

#: The distribution name the ``[dicom]`` extra belongs to (pyproject ``[project] name``).
DISTRIBUTION = "attention-unet-segment"
#: Category and type of a segment whose label has no terminology (DICOM's generic "Tissue").
GENERIC_CODE = ("SCT", "85756007", "Tissue")


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


def _world_corners(size: Sequence[int], origin, spacing, direction) -> np.ndarray:
    """The 8 corner voxel centres (8, 3) in mm."""
    index = np.array(list(itertools.product(*[(0, n - 1) for n in size])), dtype=float)
    return np.asarray(origin) + (np.asarray(direction).reshape(3, 3) @ (index * np.asarray(spacing)).T).T


def on_series_grid(labels: sitk.Image, series: DicomSeries) -> sitk.Image:
    """``labels`` on ``series``' grid: as is, or, when it is the same lattice of voxels indexed along other axes
    (e.g. slices in the opposite order), moved onto it voxel for voxel (nearest neighbour, exact). Corners may
    differ by ``imageio.SHEAR_TOLERANCE_VOXELS`` of the smallest voxel (rounding in the tags and file headers).

    Raises:
        AttentionUNetError: ``labels`` covers other voxels.
    """
    own = _world_corners(labels.GetSize(), labels.GetOrigin(), labels.GetSpacing(), labels.GetDirection())
    theirs = _world_corners(series.size, series.origin, series.spacing, series.direction)
    tolerance = SHEAR_TOLERANCE_VOXELS * min(series.spacing)
    if tuple(labels.GetSize()) == series.size and np.linalg.norm(own - theirs, axis=1).max() <= tolerance:
        return labels
    nearest = np.linalg.norm(own[:, None, :] - theirs[None, :, :], axis=2).min(axis=0).max()
    if sorted(labels.GetSize()) == sorted(series.size) and nearest <= tolerance:
        reference = sitk.Image(list(series.size), labels.GetPixelID())
        reference.SetOrigin(series.origin)
        reference.SetSpacing(series.spacing)
        reference.SetDirection(series.direction)
        return sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    raise AttentionUNetError(
        f"the label map ({' x '.join(map(str, labels.GetSize()))} voxels) is not on the grid of {series.name} "
        f"({' x '.join(map(str, series.size))} voxels; corners up to {nearest:.3g} mm apart); a DICOM SEG needs the "
        "labels on the series' own grid: export them with the DICOM volume as the reference")


def build_segmentation(labels: sitk.Image, segments: Sequence[LabelInfo], series: DicomSeries,
                       algorithm_name: str, algorithm_version: str) -> Any:
    """The ``highdicom.seg.Segmentation`` of ``labels`` (on ``series``' grid, slice ``k`` = ``series.files[k]``).

    Raises:
        AttentionUNetError: highdicom is missing, the grids differ (``on_series_grid``), a voxel holds a value no
            segment has, or the source files cannot be read by pydicom.
    """
    require_highdicom()
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    labels = on_series_grid(labels, series)
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
    """Write ``segmentation`` to ``partial`` (an ``atomic.atomic_output`` path for ``path``).

    Raises:
        OSError: it could not be written (disk full, folder unwritable).
    """
    try:
        segmentation.save_as(str(partial), enforce_file_format=True)
    except OSError as error:
        raise OSError(f"cannot write {path} ({error.strerror or error})") from None


def read_segments(path: Union[str, Path]) -> List[LabelInfo]:
    """The segments of a ``--segments`` file: a JSON list of ``{"value", "name", "color" (RGB 0..1),
    "terminology" (optional 3D Slicer terminology string)}``, values unique in 1..32767."""
    document = read_json(path, "--segments file")
    segments: List[LabelInfo] = []
    try:
        for entry in document:
            value, name, color = entry["value"], entry["name"], [float(c) for c in entry["color"]]
            terminology = entry.get("terminology") or ""
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LABEL_VALUE:
                raise ValueError(f"value {value!r} is not an integer in 1..{MAX_LABEL_VALUE}")
            if not isinstance(name, str) or not name.strip() or not isinstance(terminology, str):
                raise ValueError(f"segment {value}: name and terminology must be text")
            if len(color) != 3 or not all(math.isfinite(c) and 0.0 <= c <= 1.0 for c in color):
                raise ValueError(f"segment {value}: color must be three numbers in 0..1")
            segments.append(LabelInfo(value, name, tuple(color), terminology))
    except (TypeError, KeyError, ValueError, AttributeError) as error:
        raise AttentionUNetError(f"--segments file {path} is not a list of segments ({error}); give "
                                 '[{"value": 1, "name": "...", "color": [r, g, b]}, ...]') from None
    if not segments or len({s.value for s in segments}) < len(segments):
        raise AttentionUNetError(f"--segments file {path} lists no segments, or a label value twice; give each "
                                 "segment once")
    return segments


def write_dicom_seg(labels_path: Union[str, Path], sources: Sequence[Union[str, Path]],
                    segments_path: Union[str, Path], output: Union[str, Path], algorithm: Tuple[str, str],
                    series_uid: Optional[str] = None, force: bool = False) -> Path:
    """Write ``output`` (``.dcm``): the DICOM SEG of the label map ``labels_path`` on the series ``sources`` (its
    folder, or its files in any order) with the segments of ``segments_path`` (``read_segments``) and
    ``algorithm`` = (name, version). Atomic; an existing ``output`` is replaced only with ``force``, a file the
    command reads never.

    Raises:
        AttentionUNetError: highdicom is missing, an input is unreadable or breaks its rules, ``output`` exists
            (``OutputExistsError``) or is a file this command reads.
    """
    from .outputs import check_not_read, check_output_name

    require_highdicom()
    output = Path(output)
    if output.suffix.lower() != ".dcm":
        raise AttentionUNetError(f"--output {output} must end with .dcm (a DICOM file)")
    segments = read_segments(segments_path)
    if len(sources) == 1 and is_series_input(sources[0]):
        series = find_series(sources[0], series_uid)
    else:
        series = series_from_files([Path(source) for source in sources])
        if series_uid is not None and series.uid != series_uid:
            raise AttentionUNetError(f"the DICOM files given are series {series.uid}, not --series {series_uid}")
    check_output_name(output)
    check_not_read([output], [labels_path, segments_path, *series.files])
    if output.exists() and not force:
        raise OutputExistsError(f"{output} already exists; remove it or pass --force to overwrite")
    segmentation = build_segmentation(read_label(labels_path), segments, series, *algorithm)
    with atomic_output(output, force) as partial:
        save_segmentation(segmentation, partial, output)
    return output
