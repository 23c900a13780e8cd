"""Reading a DICOM series (a folder, or a list of files) as one 3D volume under the input contract.

Series are found with SimpleITK/GDCM (``ImageSeriesReader.GetGDCMSeriesIDs`` / ``GetGDCMSeriesFileNames``). Every
file's header is read (no pixels) and checked before anything is allocated: one series, single-frame images of one
size, pixel spacing and orientation, slice positions along the slice normal on a regular grid (no missing or
duplicated slice, no gantry tilt), and at most ``imageio.max_voxels()`` voxels. The files are then read in the
order of their positions and the volume gets the geometry of the headers (LPS, as DICOM patient coordinates are);
``imageio.validate_image`` applies as to every input. The volume carries no DICOM tags: patient data stays in the
source files and, when asked for, the DICOM SEG (``dicomseg.py``) and ``patient_info``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from ..errors import InputImageError
from .imageio import SHEAR_TOLERANCE_VOXELS, _check_voxel_count, _orthonormal_direction, safe_name, validate_image

PathLike = Union[str, Path]

#: Modalities of DICOM objects that are not images to segment (a SEG written earlier next to its series, structure
#: sets, reports, presentation states, key objects, registrations).
NON_IMAGE_MODALITIES = frozenset({"SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "SR", "PR", "KO", "REG", "DOC"})
#: Largest difference between two files' direction cosines that is still one orientation (rounding in the tags).
ORIENTATION_TOLERANCE = 1e-4

_TAGS = {"series_uid": "0020|000e", "description": "0008|103e", "modality": "0008|0060", "sop_uid": "0008|0018",
         "position": "0020|0032", "orientation": "0020|0037", "spacing": "0028|0030", "rows": "0028|0010",
         "columns": "0028|0011", "frames": "0028|0008", "samples": "0028|0002"}
#: The tags ``patient_info`` reads (only with ``--keep-patient-info``).
PATIENT_TAGS = {"name": "0010|0010", "id": "0010|0020", "birth_date": "0010|0030", "study_date": "0008|0020"}


@dataclass(frozen=True)
class SliceHeader:
    """What one file's header says (tags as GDCM reads them; numbers parsed, geometry in LPS mm)."""

    path: Path
    fields: Dict[str, str]

    def text(self, key: str) -> str:
        return self.fields.get(_TAGS[key], "").strip()

    def numbers(self, key: str) -> List[float]:
        try:
            return [float(v) for v in self.text(key).split("\\") if v.strip()]
        except ValueError:
            return []

    def integer(self, key: str, default: int = 0) -> int:
        values = self.numbers(key)
        return int(values[0]) if values else default


@dataclass
class DicomSeries:
    """One validated series: its files in slice order (index ``k`` of the volume is ``files[k]``) and the geometry
    of the volume they make (ITK conventions: size ``(columns, rows, slices)``, LPS origin and direction)."""

    uid: str
    description: str
    modality: str
    files: List[Path]
    instance_uids: List[str]
    size: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: Tuple[float, ...]
    folder: Optional[Path] = None
    _first: Optional[SliceHeader] = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """How messages name it (never with patient data)."""
        where = f" in {self.folder}" if self.folder is not None else ""
        return f"DICOM series {self.description or self.uid}{where}"

    @property
    def stem(self) -> str:
        """The output file name stem: the series description, else its UID, made safe for file names."""
        return safe_name(self.description or self.uid)

    def summary(self) -> Dict[str, object]:
        """For ``<stem>_report.json``: what was read, without patient data."""
        return {"series_instance_uid": self.uid, "series_description": self.description, "modality": self.modality,
                "files": len(self.files)}

    def patient_info(self) -> Dict[str, str]:
        """Name, ID, birth date and study date of the first file (``--keep-patient-info`` only)."""
        fields = self._first.fields if self._first is not None else _read_header(self.files[0]).fields
        return {key: fields.get(tag, "").strip() for key, tag in PATIENT_TAGS.items()}


@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
    """ITK prints warnings (e.g. "No Series were found") to stderr; a failed run's stderr is its one error line."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def is_series_input(path: PathLike) -> bool:
    """Whether ``segment`` reads ``path`` as a DICOM series (a folder)."""
    return Path(path).is_dir()


def _read_header(path: Path) -> SliceHeader:
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    try:
        with _quiet_itk():
            reader.ReadImageInformation()
    except RuntimeError:
        raise InputImageError(f"{path} is not a DICOM image GDCM can read; remove it from the series folder (or "
                              "export the series again)") from None
    return SliceHeader(path, {key: reader.GetMetaData(key) for key in reader.GetMetaDataKeys()})


def _series_files(folder: Path) -> List[Tuple[str, List[Path]]]:
    """``(series UID, files)`` of every series GDCM finds directly in ``folder`` (subfolders are not searched)."""
    found = []
    with _quiet_itk():
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
            files = [Path(name) for name in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)]
            if files:
                found.append((uid, files))
    return found


def _image_series(folder: Path) -> List[Tuple[str, List[Path], SliceHeader]]:
    """The series of ``folder`` that are images (not a SEG, structure set, report ...), each with its first
    file's header."""
    series = []
    for uid, files in _series_files(folder):
        try:
            first = _read_header(files[0])
        except InputImageError:
            continue
        if first.text("modality").upper() not in NON_IMAGE_MODALITIES:
            series.append((uid, files, first))
    return series


def series_files(folder: PathLike) -> List[Path]:
    """Every file of every image series directly in ``folder``: what segmenting that folder may read
    (``imageio.files_read_for``), so no output may replace one."""
    return [file for _, files, _ in _image_series(Path(folder)) for file in files]


#: How many folder levels below a folder of studies ``study_folders`` searches for series folders.
MAX_STUDY_DEPTH = 4


def study_folders(folder: PathLike, uid: Optional[str] = None) -> List[Path]:
    """What ``segment`` reads for an input folder: the folder itself when it directly holds an image series (with
    ``uid``: that one), else every folder below it (at most ``MAX_STUDY_DEPTH`` levels, hidden ones skipped, in
    sorted order) that does, so a folder of studies is one input per series folder. ``[folder]`` when none does
    (``find_series`` then says why)."""
    folder = Path(folder)

    def holds(path: Path) -> bool:
        return any(uid is None or entry[0] == uid for entry in _image_series(path))

    if not folder.is_dir() or holds(folder):
        return [folder]
    found: List[Path] = []

    def search(path: Path, depth: int) -> None:
        for child in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if holds(child):
                found.append(child)
            elif depth < MAX_STUDY_DEPTH:
                search(child, depth + 1)

    search(folder, 1)
    return found or [folder]


def _listing(series: Sequence[Tuple[str, List[Path], SliceHeader]]) -> str:
    return "; ".join(f"{uid} ({first.text('description') or 'no description'}, {len(files)} files)"
                     for uid, files, first in series)


def find_series(folder: PathLike, uid: Optional[str] = None) -> DicomSeries:
    """The one image series in ``folder`` (or the one with ``uid``), validated (``series_from_files``).

    Raises:
        InputImageError: no readable image series; several and no ``uid`` (the message lists each: UID,
            description, number of files, and says to pass ``--series UID``); ``uid`` not among them; or the
            series breaks the rules of ``series_from_files``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputImageError(f"{folder} is not a folder; give the folder that holds the DICOM series' files")
    candidates = _image_series(folder)
    if uid is not None:
        chosen = [entry for entry in candidates if entry[0] == uid]
        if not chosen:
            listed = f"it holds {_listing(candidates)}" if candidates else "it holds no DICOM image series"
            raise InputImageError(f"--series {uid} is not a DICOM image series in {folder}: {listed}; pass one of "
                                  "those UIDs with --series")
        candidates = chosen
    if not candidates:
        raise InputImageError(
            f"{folder} holds no DICOM image series that GDCM can read, nor do its subfolders; give the folder that "
            "holds the series' files (with or without .dcm), a folder of such folders, or a volume file (.nii.gz, "
            ".nrrd, ...)")
    if len(candidates) > 1:
        raise InputImageError(f"{folder} holds {len(candidates)} DICOM series: {_listing(candidates)}; choose one "
                              "with --series UID")
    return series_from_files(candidates[0][1], folder=folder)


def _vector(header: SliceHeader, key: str, count: int, name: str) -> np.ndarray:
    values = header.numbers(key)
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise InputImageError(f"{header.path} has no valid {name} ({_TAGS[key].replace('|', ',')}) in its header, so "
                              "its pixels have no place in the patient; export the series again")
    return np.array(values, dtype=float)


def series_from_files(files: Sequence[PathLike], folder: Optional[Path] = None) -> DicomSeries:
    """Validate the headers of one series' files (any order) and return it with the files in slice order.

    Raises:
        InputImageError: a file is not a readable DICOM image, or the files are not one regular volume: several
            series, multi-frame images, differing image sizes, pixel spacings or orientations (e.g. a localizer
            among them), two images at one position, positions off a regular grid (a missing slice), slices not
            stacked along their normal (gantry tilt), or more voxels than ``imageio.max_voxels()``.
    """
    if not files:
        raise InputImageError("no DICOM files were given; give the folder that holds the series' files")
    first = _read_header(Path(files[0]))
    where = folder if folder is not None else first.path.parent
    # the size the first header implies for the whole series, before thousands of headers are read
    _check_voxel_count(where, (first.integer("columns"), first.integer("rows"), len(files),
                               first.integer("samples", 1)))
    headers = [first] + [_read_header(Path(file)) for file in files[1:]]
    uids = sorted({h.text("series_uid") for h in headers})
    if len(uids) > 1:
        raise InputImageError(f"the DICOM files given belong to {len(uids)} series ({', '.join(uids)}); give the "
                              "files of one series (or its folder with --series UID)")
    name = f"DICOM series {first.text('description') or uids[0]} in {where}"
    multi = [h for h in headers if h.integer("frames", 1) > 1]
    if multi:
        raise InputImageError(f"{name}: {multi[0].path} is a multi-frame image ({multi[0].integer('frames')} frames); "
                              "this tool reads series of single-frame images: convert it (e.g. with dcm2niix) and "
                              "segment the NIfTI volume")
    shapes = sorted({(h.integer("rows"), h.integer("columns"), h.integer("samples", 1)) for h in headers})
    if len(shapes) > 1:
        raise InputImageError(f"{name}: its images differ in size ({', '.join(f'{r} x {c}' for r, c, _ in shapes)}); "
                              "a volume needs images of one size: remove the odd files or export the series again")
    rows, columns, samples = shapes[0]
    _check_voxel_count(where, (columns, rows, len(headers), samples))
    spacing = _vector(first, "spacing", 2, "pixel spacing")
    orientation = _vector(first, "orientation", 6, "image orientation")
    for header in headers[1:]:
        if np.abs(_vector(header, "orientation", 6, "image orientation") - orientation).max() > ORIENTATION_TOLERANCE:
            raise InputImageError(
                f"{name} mixes image orientations ({header.path} differs from {first.path}), e.g. a localizer or "
                "several stacks in one series; remove the odd images or segment each stack as its own series")
        if np.abs(_vector(header, "spacing", 2, "pixel spacing") - spacing).max() > 1e-4 * spacing.max():
            raise InputImageError(f"{name}: {header.path} has another pixel spacing than {first.path}; a volume "
                                  "needs one pixel spacing, export the series again")
    if spacing.min() <= 0:
        raise InputImageError(f"{name} has a zero or negative pixel spacing {list(spacing)}; export it again")
    row, column = orientation[:3], orientation[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(column) - 1) > 1e-3:
        raise InputImageError(f"{name} has an image orientation {list(orientation)} that is not two unit vectors "
                              "(direction cosines); its headers are damaged, export the series again")
    row, column = row / np.linalg.norm(row), column / np.linalg.norm(column)
    normal = np.cross(row, column)
    if np.linalg.norm(normal) < 0.5:
        raise InputImageError(f"{name} has a degenerate image orientation {list(orientation)}; export it again")
    normal /= np.linalg.norm(normal)
    positions = np.array([_vector(h, "position", 3, "image position") for h in headers])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    positions, along, headers = positions[order], along[order], [headers[i] for i in order]
    if len(headers) < 2:
        raise InputImageError(f"{name} is a single image; the model segments 3D volumes, give a series of slices")
    gaps = np.diff(along)
    if gaps.min() <= 1e-3 * spacing.min():
        at = int(np.argmin(gaps))
        raise InputImageError(
            f"{name} has several images at one position ({headers[at].path.name} and {headers[at + 1].path.name}), "
            "e.g. several echoes, time points or a repeated slice; split them into one series each (or remove the "
            "repeats)")
    step = (along[-1] - along[0]) / (len(headers) - 1)
    off_grid = np.abs(along - (along[0] + step * np.arange(len(headers))))
    if off_grid.max() > SHEAR_TOLERANCE_VOXELS * step:
        at = int(np.argmax(gaps))
        raise InputImageError(
            f"{name} has uneven slice positions: {gaps[at]:.3g} mm between {headers[at].path.name} and "
            f"{headers[at + 1].path.name} where most slices are {float(np.median(gaps)):.3g} mm apart, so slices "
            "are missing (or the spacing varies); export the complete series again")
    drift = positions - positions[0] - np.outer(along - along[0], normal)
    if np.linalg.norm(drift, axis=1).max() > SHEAR_TOLERANCE_VOXELS * min(spacing.min(), step):
        raise InputImageError(
            f"{name} is not stacked along its slice normal (a tilted gantry or a sheared acquisition), so it is not "
            "a regular volume; resample it onto a regular grid first (e.g. dcm2niix corrects gantry tilt)")
    size = (columns, rows, len(headers))
    voxel = (float(spacing[1]), float(spacing[0]), float(step))
    direction = _orthonormal_direction(name, size, voxel, np.column_stack([row, column, normal]))
    return DicomSeries(uid=uids[0], description=first.text("description"), modality=first.text("modality"),
                       files=[h.path for h in headers], instance_uids=[h.text("sop_uid") for h in headers],
                       size=size, spacing=voxel, origin=tuple(float(v) for v in positions[0]),
                       direction=tuple(float(v) for v in direction.ravel()), folder=folder, _first=first)


def read_series(series: DicomSeries) -> sitk.Image:
    """The series' voxels (GDCM, files in slice order) with the validated geometry and no DICOM tags, checked by
    ``imageio.validate_image``.

    Raises:
        InputImageError: GDCM cannot decode the pixels, the volume does not fit in memory, or it breaks the input
            contract (constant, NaN, RGB ...).
    """
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames([str(path) for path in series.files])
    try:
        with _quiet_itk():
            image = reader.Execute()
    except MemoryError:
        raise _too_large(series) from None
    except RuntimeError as error:
        if "allocate" in str(error).lower():
            raise _too_large(series) from None
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown reason"
        raise InputImageError(f"cannot read the pixels of {series.name} ({reason}); export the series again, e.g. "
                              "uncompressed") from None
    if tuple(image.GetSize()) != series.size:
        raise InputImageError(f"{series.name}: GDCM read {image.GetSize()} voxels where the headers declare "
                              f"{series.size}; export the series again")
    for key in image.GetMetaDataKeys():  # the tags of the first file: no output may carry them
        image.EraseMetaData(key)
    image.SetOrigin(series.origin)
    image.SetSpacing(series.spacing)
    image.SetDirection(series.direction)
    return validate_image(image, series.name)


def _too_large(series: DicomSeries) -> InputImageError:
    return InputImageError(f"{series.name} ({' x '.join(map(str, series.size))} voxels) does not fit in this "
                           "machine's free memory; close other programs or segment it on a machine with more memory")
