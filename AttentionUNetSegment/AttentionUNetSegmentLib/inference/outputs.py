"""Writing one input's ``Prediction`` as files (CLI contract in ``DESIGN.md``).

For an input with stem ``<stem>`` and format ``nii.gz`` (or ``nrrd``):

- ``<stem>_seg.nii.gz``: the label map on the input grid;
- ``<stem>_seg.seg.nrrd``: the same labels as a 3D Slicer segmentation (segment names, colours, label values);
- ``<stem>_attention_<k>.nii.gz``: gate ``k``'s attention map (0 = finest) on its own coarse grid;
- ``<stem>_prob_<label name>.nii.gz``: per-class probabilities, when they were computed;
- ``<stem>_report.json``: segment volumes, model identity, parameters, timings and the files written;
- ``<stem>_seg.dcm``: the labels as a DICOM Segmentation of the source series (DICOM input with ``--dicom-seg``;
  ``dicomseg.py``), the only output that carries the source's patient and study data.
- ``<stem>_report.pdf``: the one-page visual report (``report.py``), when asked for.

A run over several inputs also writes ``summary.csv`` (``SUMMARY_NAME``): one row per input, columns from
``summary_columns`` (the Slicer module's batch table uses the same columns).

All files of one input are written under temporary names and renamed only once every one of them is complete; on
any error every partial file is removed, so a folder never holds half a result.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .. import __version__
from ..constants import OUTPUT_FORMATS
from ..errors import AttentionUNetError, OutputExistsError
from ..fileio.atomic import atomic_output, temporary_path
from ..fileio.imageio import files_read_for, safe_name, write_partial
from ..model.bundle import LabelInfo, ModelBundle

if TYPE_CHECKING:
    from ..fileio.dicomio import DicomSeries
    from .predictor import Prediction

PathLike = Union[str, "os.PathLike[str]"]

#: ``Segmentation_*`` fields Slicer's segmentation storage node (and ``slicerio``) read from a ``.seg.nrrd``.
#: Both spellings of the source representation are written: Slicer >= 5.4 reads ``SourceRepresentation``, older
#: Slicer and ``slicerio`` read ``MasterRepresentation``.
_SEGMENTATION_FIELDS = {
    "Segmentation_MasterRepresentation": "Binary labelmap",
    "Segmentation_SourceRepresentation": "Binary labelmap",
    "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
    "Segmentation_ReferenceImageExtentOffset": "0 0 0",
}


@dataclass
class OutputPaths:
    """The files one input produces (all in the same folder)."""

    segmentation: Path
    slicer_segmentation: Path
    report: Path
    attention: List[Path] = field(default_factory=list)
    probabilities: Dict[str, Path] = field(default_factory=dict)
    dicom_segmentation: Optional[Path] = None
    report_pdf: Optional[Path] = None

    def all(self) -> List[Path]:
        return [self.segmentation, self.slicer_segmentation, *self.attention, *self.probabilities.values(),
                *([self.dicom_segmentation] if self.dicom_segmentation is not None else []), self.report,
                *([self.report_pdf] if self.report_pdf else [])]

    def check_writable(self, force: bool = False, reads: Sequence[PathLike] = ()) -> None:
        """Raise unless every file can be written: ``AttentionUNetError`` when the folder is not (and cannot
        become) a writable folder, when a name is too long or not UTF-8 (``check_output_name``), or when an output
        is, or resolves to, a file the run reads (``reads``: the inputs, plus the data files their headers name),
        ``--force`` or not; ``OutputExistsError`` naming the existing files unless ``force``. Checked before
        inference, so no time is spent on a result that could not be written."""
        check_writable(self.all(), force, reads)

    def to_dict(self) -> Dict[str, Any]:
        """Absolute paths as strings (the ``outputs`` of the CLI's final ``done`` progress record);
        ``dicom_segmentation`` and ``report_pdf`` only when written."""
        paths = {
            "segmentation": str(self.segmentation.resolve()),
            "slicer_segmentation": str(self.slicer_segmentation.resolve()),
            "attention": [str(path.resolve()) for path in self.attention],
            "probabilities": {name: str(path.resolve()) for name, path in self.probabilities.items()},
            "report": str(self.report.resolve()),
        }
        if self.dicom_segmentation is not None:
            paths["dicom_segmentation"] = str(self.dicom_segmentation.resolve())
        if self.report_pdf:
            paths["report_pdf"] = str(self.report_pdf.resolve())
        return paths


def check_writable(paths: Sequence[Path], force: bool = False, reads: Sequence[PathLike] = ()) -> None:
    """``OutputPaths.check_writable`` for any files written into one folder (also ``summary.csv``)."""
    for path in paths:
        check_output_name(path)
    _check_folder_writable(paths[0].parent)
    check_not_read(paths, reads)
    existing = [path for path in paths if path.exists()]
    if existing and not force:
        names = ", ".join(path.name for path in existing[:3]) + (" ..." if len(existing) > 3 else "")
        raise OutputExistsError(f"{len(existing)} output file(s) already exist in {existing[0].parent} "
                                f"({names}); choose another --output-dir or pass --force to overwrite")


def _same_file(a: Path, b: Path) -> bool:
    """Same path (case-folded where the platform folds case), same target through links, or the same inode."""
    if os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b)):
        return True
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def check_not_read(outputs: Sequence[Path], reads: Sequence[PathLike]) -> None:
    """Raise ``AttentionUNetError`` if an output is (or resolves to, through symbolic or hard links) one of the
    files ``reads`` opens (``files_read_for`` each). Writing it would destroy that input, so ``--force`` does not
    lift this."""
    for source in reads:
        for read in files_read_for(source):
            for output in outputs:
                if _same_file(output, read):
                    what = "the input" if read == Path(source) else \
                        f"a file of input {source}:" if Path(source).is_dir() else f"the data file of input {source}:"
                    raise AttentionUNetError(
                        f"output {output} would overwrite {what} {read}; an output is never written over a file "
                        "the run reads, --force or not: choose another --output-dir or rename the input")


#: Used where ``os.pathconf`` cannot tell (Windows, or file systems that do not say).
_DEFAULT_NAME_MAX, _DEFAULT_PATH_MAX = 255, 4096 if os.name != "nt" else 260


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # e.g. ENAMETOOLONG: the name is what is being checked
        return False


def _path_limit(folder: Path, name: str, default: int) -> int:
    try:
        return int(os.pathconf(str(folder), name))
    except (AttributeError, ValueError, OSError):
        return default


def check_output_name(path: Path) -> None:
    """Raise ``AttentionUNetError`` unless ``path`` and the temporary path it is written through can exist here:
    UTF-8 (ITK cannot open other names), each name within the file system's ``PC_NAME_MAX`` bytes and the whole
    path within ``PC_PATH_MAX`` (asked of the nearest existing folder)."""
    name = path.name
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise AttentionUNetError(f"output name {name!r} is not valid UTF-8 (its input's file name has bytes of "
                                 "another encoding); rename the input") from None
    written = temporary_path(path).absolute()
    nearest = written.parent
    while not _is_dir(nearest) and nearest != nearest.parent:
        nearest = nearest.parent
    name_max = _path_limit(nearest, "PC_NAME_MAX", _DEFAULT_NAME_MAX)
    path_max = _path_limit(nearest, "PC_PATH_MAX", _DEFAULT_PATH_MAX)
    for part in written.parts[1:]:
        length = len(os.fsencode(part))
        if length > name_max:
            raise AttentionUNetError(
                f"output name {part[:40]}... is {length} bytes long, more than the {name_max} this file system "
                f"allows in one name; rename the input to a shorter name (outputs are named <stem>_seg..., "
                "<stem>_attention_<k>...) or choose a shorter --output-dir")
    length = len(os.fsencode(str(written)))
    if length >= path_max:
        raise AttentionUNetError(
            f"output path {str(path)[:60]}... is {length} bytes long while writing it (through a temporary folder), "
            f"more than the {path_max - 1} this file system allows; choose a shorter --output-dir or rename the input")


def _check_folder_writable(folder: Path) -> None:
    """Raise ``AttentionUNetError`` unless ``folder`` is, or can be created as, a folder this process can write
    to (checked on its nearest existing ancestor, so nothing is created)."""
    nearest = folder
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise AttentionUNetError(f"cannot write outputs to {folder}: {nearest} is a file, not a folder; choose "
                                 "another --output-dir")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise AttentionUNetError(f"cannot write outputs to {folder}: {nearest} is not writable; choose a folder "
                                 "you can write to with --output-dir")


def plan_outputs(output_dir: Union[str, Path], stem: str, labels: Sequence[LabelInfo], fmt: str = "nii.gz",
                 num_attention: int = 0, probabilities: bool = False, dicom_seg: bool = False,
                 report_pdf: bool = False) -> OutputPaths:
    """The paths ``write_prediction`` will write for one input (``dicom_seg``: also ``<stem>_seg.dcm``;
    ``report_pdf``: also ``<stem>_report.pdf``)."""
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {fmt!r}: choose one of {', '.join(OUTPUT_FORMATS)}")
    folder = Path(output_dir)
    return OutputPaths(
        segmentation=folder / f"{stem}_seg.{fmt}",
        slicer_segmentation=folder / f"{stem}_seg.seg.nrrd",
        report=folder / f"{stem}_report.json",
        attention=[folder / f"{stem}_attention_{k}.{fmt}" for k in range(num_attention)],
        probabilities=({label.name: folder / f"{stem}_prob_{file_name}.{fmt}"
                        for label, file_name in zip(labels, _probability_names(labels))} if probabilities else {}),
        dicom_segmentation=folder / f"{stem}_seg.dcm" if dicom_seg else None,
        report_pdf=folder / f"{stem}_report.pdf" if report_pdf else None,
    )


def _probability_names(labels: Sequence[LabelInfo]) -> List[str]:
    """File-name-safe label names; the label value is appended when two names would collide."""
    names = [safe_name(label.name) for label in labels]
    if len(set(names)) < len(names):
        names = [f"{name}_{label.value}" for name, label in zip(names, labels)]
    return names


def segment_statistics(labels: sitk.Image, segments: Sequence[LabelInfo]) -> List[Dict[str, Any]]:
    """Per segment: value, name, colour, side (``"left"``/``"right"``/None), voxel count and volume in
    millilitres (voxels x voxel volume)."""
    counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel())
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    rows = []
    for label in segments:
        voxels = int(counts[label.value]) if label.value < len(counts) else 0
        rows.append({"value": label.value, "name": label.name, "color": list(label.color), "side": label.side,
                     "voxels": voxels, "volume_ml": voxels * voxel_ml})
    return rows


def side_statistics(rows: Sequence[Mapping[str, Any]]) -> Tuple[Optional[Dict[str, Any]], Optional[float]]:
    """Per-side totals ``{side: {"volume_ml", "voxels"}}`` of ``segment_statistics`` rows and the asymmetry
    index ``(L - R) / ((L + R) / 2)`` of the whole-structure volumes; ``(None, None)`` when no row has a side
    (the index is None when both sides are empty)."""
    sides: Dict[str, Dict[str, Any]] = {}
    for row in rows:
        if row.get("side"):
            total = sides.setdefault(row["side"], {"volume_ml": 0.0, "voxels": 0})
            total["volume_ml"] += row["volume_ml"]
            total["voxels"] += row["voxels"]
    if not sides:
        return None, None
    left, right = (sides.get(side, {}).get("volume_ml", 0.0) for side in ("left", "right"))
    asymmetry = (left - right) / ((left + right) / 2.0) if left + right > 0 else None
    return sides, asymmetry


def slicer_segmentation(labels: sitk.Image, segments: Sequence[LabelInfo], source: str = "") -> sitk.Image:
    """The label map with the ``Segment<N>_*`` / ``Segmentation_*`` fields of a 3D Slicer ``.seg.nrrd``
    (one non-overlapping layer; segment ``N`` has its label value, name, colour, non-empty extent and, where the
    bundle gives one, its terminology entry)."""
    image = sitk.Image(labels)
    array = sitk.GetArrayViewFromImage(labels)  # (z, y, x)
    for key, value in _SEGMENTATION_FIELDS.items():
        image.SetMetaData(key, value)
    for index, label in enumerate(segments):
        where = np.nonzero(array == label.value)
        if where[0].size:
            (k0, k1), (j0, j1), (i0, i1) = ((int(axis.min()), int(axis.max())) for axis in where)
            extent = f"{i0} {i1} {j0} {j1} {k0} {k1}"
        else:
            extent = "0 -1 0 -1 0 -1"  # Slicer's spelling of an empty segment
        tags = [f"Source:{source}"] if source else []
        if label.terminology:
            tags.append(f"TerminologyEntry:{label.terminology}")
        fields = {
            "ID": f"Segment_{label.value}",
            "Name": label.name,
            "NameAutoGenerated": "0",
            "Color": " ".join(f"{c:.6g}" for c in label.color),
            "ColorAutoGenerated": "0",
            "LabelValue": str(label.value),
            "Layer": "0",
            "Extent": extent,
            "Tags": "".join(f"{tag}|" for tag in tags) or "|",  # Slicer expects the trailing "|"
        }
        for key, value in fields.items():
            image.SetMetaData(f"Segment{index}_{key}", value)
    return image


def _geometry(image: sitk.Image) -> Dict[str, Any]:
    return {"size": list(image.GetSize()), "spacing": list(image.GetSpacing()), "origin": list(image.GetOrigin()),
            "direction": list(image.GetDirection())}


def build_report(prediction: "Prediction", bundle: ModelBundle, paths: OutputPaths,
                 input_path: Optional[Union[str, Path]] = None,
                 parameters: Optional[Mapping[str, Any]] = None, dicom_series: Optional["DicomSeries"] = None,
                 patient: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """The ``<stem>_report.json`` content; ``files`` are names relative to the report's folder. ``dicom``: the
    series read (UID, description, modality, files; no patient data), null for other inputs; ``patient`` only
    when given (``--keep-patient-info``)."""
    segments = segment_statistics(prediction.labels, prediction.segments or bundle.labels)
    sides, asymmetry = side_statistics(segments)
    files: Dict[str, Any] = {
        "segmentation": paths.segmentation.name,
        "slicer_segmentation": paths.slicer_segmentation.name,
        "attention": [path.name for path in paths.attention],
        "probabilities": {name: path.name for name, path in paths.probabilities.items()},
        "report": paths.report.name,
    }
    if paths.dicom_segmentation is not None:
        files["dicom_segmentation"] = paths.dicom_segmentation.name
    report = {
        "input": str(Path(input_path).resolve()) if input_path is not None else None,
        "dicom": dicom_series.summary() if dicom_series is not None else None,
        "engine_version": __version__,
        "model": {"name": bundle.name, "version": bundle.version, "sha256": bundle.sha256,
                  "path": str(bundle.path.resolve()), "license": bundle.metadata.get("license", "")},
        "device": prediction.device,
        "parameters": dict(parameters or {}),
        "image": _geometry(prediction.labels),
        "warnings": list(prediction.warnings),
        "segments": segments,
        "sides": sides,
        "asymmetry_index": round(asymmetry, 4) if asymmetry is not None else None,
        "localization": prediction.localization,
        "timings": {stage: round(float(seconds), 4) for stage, seconds in prediction.timings.items()},
        "files": {**files, **({"report_pdf": paths.report_pdf.name} if paths.report_pdf else {})},
    }
    if patient is not None:
        report["patient"] = dict(patient)
    return report


def write_prediction(prediction: "Prediction", bundle: ModelBundle, output_dir: Union[str, Path], stem: str,
                     fmt: str = "nii.gz", input_path: Optional[Union[str, Path]] = None,
                     parameters: Optional[Mapping[str, Any]] = None, force: bool = False,
                     dicom_series: Optional["DicomSeries"] = None, dicom_seg: bool = False,
                     patient: Optional[Mapping[str, str]] = None, report_pdf: bool = False,
                     image: Optional[sitk.Image] = None) -> OutputPaths:
    """Write every file of one input, all or nothing, and return their paths.

    Args:
        prediction: ``labels`` (uint8 on the input grid), ``attention`` (finest first, may be empty),
            ``probabilities`` (label value -> float32 image, may be empty; background (0) is not written),
            ``timings``, ``device``.
        bundle: the model that made it (labels, names, colours, identity for the report).
        parameters: the run's settings, recorded verbatim in the report.
        dicom_series: the series the input was read from (DICOM input); with ``dicom_seg`` the labels are also
            written as ``<stem>_seg.dcm`` (a DICOM Segmentation of it). ``patient``: put into the report as is.
        report_pdf: also write ``<stem>_report.pdf``, drawn over ``image`` (the input) with the finest attention map.

    Raises:
        OutputExistsError: an output exists and ``force`` is false (nothing is written).
        OSError: a file could not be written (nothing of this input is kept).
    """
    segments = prediction.segments or bundle.labels
    by_value = {label.value: label.name for label in segments}
    if report_pdf and image is None:
        raise ValueError("report_pdf needs the input image")
    paths = plan_outputs(output_dir, stem, segments, fmt, len(prediction.attention),
                         bool(prediction.probabilities), dicom_seg=dicom_seg, report_pdf=report_pdf)
    paths.check_writable(force, [input_path] if input_path is not None else [])
    segmentation = None
    if paths.dicom_segmentation is not None:
        from .dicomseg import build_segmentation

        if dicom_series is None:
            raise AttentionUNetError(f"{paths.dicom_segmentation.name}: a DICOM SEG needs DICOM series input")
        segmentation = build_segmentation(prediction.labels, segments, dicom_series, bundle.name, bundle.version)
    images = [(paths.segmentation, prediction.labels),
              (paths.slicer_segmentation,
               slicer_segmentation(prediction.labels, segments, f"AttentionUNet {bundle.name} {bundle.version}")),
              *zip(paths.attention, prediction.attention),
              *((paths.probabilities[name], prediction.probabilities[value]) for value, name in by_value.items()
                if prediction.probabilities)]
    report = build_report(prediction, bundle, paths, input_path, parameters, dicom_series, patient)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    # Every atomic_output renames its partial file only when the whole stack exits cleanly; an exception anywhere
    # unwinds the stack and removes all partials.
    with contextlib.ExitStack() as stack:
        for path, volume in images:
            write_partial(volume, stack.enter_context(atomic_output(path, force)), path)
        if segmentation is not None:
            from .dicomseg import save_segmentation

            save_segmentation(segmentation, stack.enter_context(atomic_output(paths.dicom_segmentation, force)),
                              paths.dicom_segmentation)
        partial_report = stack.enter_context(atomic_output(paths.report, force))
        try:
            partial_report.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        except OSError as error:
            raise OSError(f"cannot write {paths.report} ({error.strerror or error})") from None
        if paths.report_pdf:
            from .report import save_report_pdf

            attention = prediction.attention[0] if prediction.attention else None
            partial_pdf = stack.enter_context(atomic_output(paths.report_pdf, force))
            try:
                save_report_pdf(image, prediction.labels, attention, report, stem, partial_pdf)
            except OSError as error:
                raise OSError(f"cannot write {paths.report_pdf} ({error.strerror or error})") from None
    return paths


# ------------------------------------------------------------------------------------------------ batch summary
#: The batch summary a run over several inputs writes into its output folder.
SUMMARY_NAME = "summary.csv"
#: First columns of every summary row; then one ``<segment> (mL)`` column per segment, ``SIDE_COLUMNS`` when
#: segments have sides, and ``warnings``.
SUMMARY_HEAD = ("input", "status", "error", "model", "model_version")
SIDE_COLUMNS = ("left (mL)", "right (mL)", "asymmetry index")
SUMMARY_TAIL = ("warnings",)


def summary_columns(reports: Sequence[Mapping[str, Any]]) -> List[str]:
    """The summary's columns (the CLI's ``summary.csv`` and the Slicer batch table) for the done inputs'
    ``reports`` (``summary_row``'s): every segment name they have, in order, and the per-side columns when one has
    sides."""
    names = list(dict.fromkeys(str(s["name"]) for report in reports for s in report.get("segments", [])))
    sided = any(report.get("sides") for report in reports)
    return [*SUMMARY_HEAD, *(f"{name} (mL)" for name in names), *(SIDE_COLUMNS if sided else ()), *SUMMARY_TAIL]


def summary_row(input_name: str, status: str, model: str, version: str, report: Optional[Mapping[str, Any]] = None,
                error: str = "") -> Dict[str, str]:
    """One input's summary cells by column name: ``report`` (a ``_report.json`` dict, or any mapping with its
    ``segments`` (``name``, ``volume_ml``), ``sides`` and ``asymmetry_index``, ``warnings``) for a done input;
    ``error`` for one that failed. Volumes in mL with 3 decimals, the asymmetry index with 4."""
    row = {"input": input_name, "status": status, "error": error, "model": model, "model_version": version}
    if report is not None:
        for segment in report.get("segments", []):
            row[f"{segment['name']} (mL)"] = f"{segment['volume_ml']:.3f}"
        sides = report.get("sides") or {}
        for side, column in zip(("left", "right"), SIDE_COLUMNS):
            if side in sides:
                row[column] = f"{sides[side]['volume_ml']:.3f}"
        if sides and report.get("asymmetry_index") is not None:
            row[SIDE_COLUMNS[2]] = f"{report['asymmetry_index']:.4f}"
        row["warnings"] = "; ".join(report.get("warnings", []))
    return row


def write_summary(path: Union[str, Path], columns: Sequence[str], rows: Sequence[Mapping[str, str]],
                  force: bool = False) -> Path:
    """Write the summary CSV atomically (a column a row lacks is empty)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(columns), restval="", extrasaction="raise", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_output(path, force) as partial:
        try:
            partial.write_bytes(text.getvalue().encode("utf-8"))
        except OSError as error:
            raise OSError(f"cannot write {path} ({error.strerror or error})") from None
    return Path(path)
