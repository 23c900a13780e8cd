"""Reading and writing 3D volumes with their full geometry.

``read_image`` returns a validated 3D scalar ``sitk.Image`` (geometry in ITK's LPS world). SimpleITK reads first;
NIfTI files it refuses (e.g. non-orthonormal direction cosines) fall back to nibabel, whose RAS affine is
converted to LPS. ``write_image`` is atomic and never overwrites without ``force``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import itertools
import os
import re
import shutil
import socket
import struct
import time
import zlib
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import SimpleITK as sitk

from .errors import InputImageError, OutputExistsError

PathLike = Union[str, "os.PathLike[str]"]

#: Extensions ``read_image`` accepts, longest first so ``.nii.gz`` wins over ``.gz``.
READ_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Single-file formats ``write_image`` writes (detached headers could not be renamed atomically).
WRITE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")

#: ITK LPS world = diag(-1, -1, 1) applied to nibabel's RAS world (and back: the matrix is its own inverse).
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


def image_extension(path: PathLike) -> str:
    """The recognised image extension of ``path`` (``".nii.gz"``, ``".nrrd"``, ...), or its last suffix."""
    name = Path(path).name.lower()
    for extension in READ_EXTENSIONS:
        if name.endswith(extension):
            return extension
    return Path(path).suffix.lower()


def image_stem(path: PathLike) -> str:
    """File name without its image extension: ``/data/case_01.nii.gz`` -> ``case_01``."""
    name = Path(path).name
    extension = image_extension(path)
    return name[: len(name) - len(extension)] if extension else name


def read_image(path: PathLike) -> sitk.Image:
    """Read and validate a 3D scalar volume.

    Returns the image with its original pixel type (float64 is narrowed to float32) and full geometry.

    Raises:
        InputImageError: the file is missing or unreadable, or the image is 2D, 4D, multi-component (RGB/vector),
            empty, constant, or contains NaN/Inf voxels. The message names the file and how to fix it.
    """
    path = Path(path)
    if not path.exists():
        raise InputImageError(f"input image {path} does not exist; check the path")
    if not path.is_file():
        raise InputImageError(f"input image {path} is not a file; give a volume file (.nii.gz, .nrrd, .mha, ...)")
    if path.stat().st_size == 0:
        raise InputImageError(f"input image {path} is an empty file (0 bytes); export the volume again")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as sitk_error:
        image = _read_with_nibabel(path, sitk_error)
    else:
        _check_nifti_finite(path)
    return validate_image(_squeeze_single_volume(image), str(path))

#: Largest shear, as voxel displacement at the far corner over the smallest voxel size, that a NIfTI read through
#: nibabel may have; ITK images have orthonormal axes only.
SHEAR_TOLERANCE_VOXELS = 0.1


def _check_nifti_finite(path: Path) -> None:
    """ITK's NIfTI reader silently turns NaN voxels into 0, so float NIfTI data is checked with nibabel."""
    if image_extension(path) not in (".nii", ".nii.gz"):
        return
    import nibabel as nib

    nifti = nib.load(str(path))
    if np.dtype(nifti.get_data_dtype()).kind != "f":
        return
    data = nifti.dataobj.get_unscaled()  # the stored floats: scaling would make a float64 copy
    if not np.isfinite(data).all():
        bad = int(np.count_nonzero(~np.isfinite(data)))
        raise InputImageError(f"{path} has {bad} NaN/Inf voxels; replace them (e.g. with 0) before segmenting")


def itk_error_reason(error: Exception) -> str:
    """The last line of an ITK exception (the reason; the lines before are ITK's source locations)."""
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__


def _read_with_nibabel(path: Path, sitk_error: Exception) -> sitk.Image:
    """NIfTI fallback: nibabel's RAS affine -> ITK LPS origin/spacing/direction (nearest orthonormal frame)."""
    import nibabel as nib

    reason = itk_error_reason(sitk_error)
    try:
        nifti = nib.load(str(path))
        data = np.asanyarray(nifti.dataobj)
        affine = np.asarray(nifti.affine, dtype=float)
    except Exception as nib_error:  # nibabel raises many types for corrupt files
        raise InputImageError(
            f"cannot read {path}: neither SimpleITK ({reason}) nor nibabel ({nib_error}) understands it; "
            f"give an uncorrupted 3D volume in one of {', '.join(READ_EXTENSIONS)}"
        ) from None
    if data.size == 0:
        raise InputImageError(f"{path} is empty (shape {data.shape}, no voxels); give a volume that holds image data")
    if data.dtype.names is not None:
        raise InputImageError(f"{path} holds RGB/vector voxels; convert it to a single-channel (grey) volume")
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise _dimension_error(path, data.ndim, tuple(data.shape))
    if data.dtype == np.float64:
        data = data.astype(np.float32)
    linear = LPS_FROM_RAS @ affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(affine)):
        raise InputImageError(f"{path} has a degenerate affine (zero or non-finite voxel size); fix its header")
    # Nearest orthonormal direction (polar decomposition); ITK images cannot represent shear. Rounding-level shear
    # (as DICOM converters leave) is absorbed; real shear would put every output off the input's grid.
    u, _, vt = np.linalg.svd(linear / spacing)
    direction = u @ vt
    corners = np.array(list(itertools.product(*[(0, n - 1) for n in data.shape])), dtype=float).T
    error_mm = float(np.abs((linear - direction * spacing) @ corners).max())
    if error_mm > SHEAR_TOLERANCE_VOXELS * float(spacing.min()):
        raise InputImageError(
            f"{path} has a sheared voxel grid (its affine's axes are not perpendicular; approximating it would move "
            f"voxels by up to {error_mm:.2f} mm); resample it onto an unsheared grid first, e.g. with "
            "nibabel.processing.resample_to_output or 3D Slicer's Resample Scalar Volume"
        )
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (2, 1, 0))))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in LPS_FROM_RAS @ affine[:3, 3]])
    image.SetDirection([float(d) for d in direction.ravel()])
    return image


def _dimension_error(path: PathLike, dimension: int, size: tuple) -> InputImageError:
    if dimension < 3:
        return InputImageError(
            f"{path} is a {dimension}D image (size {size}); the model segments 3D volumes, give a 3D scan"
        )
    return InputImageError(
        f"{path} is a {dimension}D image (size {size}), e.g. a time series or multi-channel stack; extract one "
        "3D volume first (e.g. with SimpleITK's image[:, :, :, t] or fslroi)"
    )


def _squeeze_single_volume(image: sitk.Image) -> sitk.Image:
    """A 4D image with a single volume (size 1 along the 4th axis) is that 3D volume."""
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        return image[:, :, :, 0]
    return image


def validate_image(image: sitk.Image, name: str = "input image") -> sitk.Image:
    """Check that ``image`` is a non-empty, non-constant, finite 3D scalar volume; float64 becomes float32."""
    size = tuple(image.GetSize())
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise InputImageError(
            f"{name} has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB/vector image); "
            "convert it to a single-channel (grey) volume"
        )
    if image.GetDimension() != 3:
        raise _dimension_error(name, image.GetDimension(), size)
    if min(size) == 0:
        raise InputImageError(f"{name} is empty (size {size}, no voxels); give a volume that holds image data")
    if 1 in size:
        raise InputImageError(
            f"{name} is a single slice (size {size}); the model segments 3D volumes, give a 3D scan"
        )
    if "complex" in image.GetPixelIDTypeAsString():
        raise InputImageError(f"{name} has complex voxels; give a real-valued (magnitude) volume")
    if image.GetPixelID() == sitk.sitkFloat64:
        image = sitk.Cast(image, sitk.sitkFloat32)
    voxels = sitk.GetArrayViewFromImage(image)
    if voxels.dtype.kind == "f" and not np.isfinite(voxels).all():
        bad = int(np.count_nonzero(~np.isfinite(voxels)))
        raise InputImageError(
            f"{name} has {bad} NaN/Inf voxels; replace them (e.g. with 0) before segmenting"
        )
    low, high = voxels.min(), voxels.max()
    if low == high:
        raise InputImageError(
            f"{name} is constant (every voxel is {low}); it holds no image to segment — check that the right "
            "file was exported"
        )
    return image


#: Hidden folder ``atomic_output`` writes into, next to the outputs (same file system, so ``os.replace`` is atomic),
#: named ``<prefix><host>-<pid>``: the file inside keeps its final name (ITK picks the format by extension), and
#: neither the folder nor its content matches a glob such as ``*.nii.gz`` in the output folder.
TEMP_DIR_PREFIX = ".attention-unet-tmp-"
#: A temporary folder this old is stale whatever its pid (pids get reused; other hosts' pids cannot be checked).
STALE_TEMP_SECONDS = 24 * 3600
_HOST = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
_TEMP_DIR = re.compile(re.escape(TEMP_DIR_PREFIX) + r"([0-9a-f]{8})-([0-9]+)$")


def temporary_path(path: PathLike) -> Path:
    """Where ``atomic_output`` writes ``path`` until it is complete: ``<folder>/.attention-unet-tmp-<host>-<pid>/
    <name>``."""
    path = Path(path)
    return path.parent / f"{TEMP_DIR_PREFIX}{_HOST}-{os.getpid()}" / path.name


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would terminate the process there; such folders go by age only
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: a process of another user has this pid
        return True
    return True


def remove_stale_temporaries(folder: PathLike) -> None:
    """Remove the temporary folders ``atomic_output`` left in ``folder`` when its process was killed: only this
    tool's (named ``TEMP_DIR_PREFIX<host>-<pid>``), only when that process (on this host) is gone or the folder is
    older than ``STALE_TEMP_SECONDS``. Anything else in ``folder`` is never touched."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        match = _TEMP_DIR.match(entry.name)
        if not match or not entry.is_dir(follow_symlinks=False):
            continue
        host, pid = match.group(1), int(match.group(2))
        if host == _HOST and pid == os.getpid():
            continue
        try:
            age = time.time() - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if (host == _HOST and not _pid_alive(pid)) or age > STALE_TEMP_SECONDS:
            shutil.rmtree(entry.path, ignore_errors=True)


@contextlib.contextmanager
def atomic_output(path: PathLike, force: bool = False) -> Iterator[Path]:
    """Yield ``temporary_path(path)`` (in a hidden folder next to ``path``); on success it is renamed onto
    ``path``, on error removed. Stale temporaries of killed runs in that folder are removed first.

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is false.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; remove it or pass --force to overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    partial = temporary_path(path)
    partial.parent.mkdir(exist_ok=True)
    if partial.parent.is_symlink():
        raise OSError(f"cannot write {path}: {partial.parent} is a symbolic link, not this tool's temporary folder")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()
        with contextlib.suppress(OSError):  # still holds other outputs being written, or already gone
            partial.parent.rmdir()


def write_image(image: sitk.Image, path: PathLike, force: bool = False) -> Path:
    """Write ``image`` atomically (compressed where the format allows) and return ``path``.

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is false.
        ValueError: ``path`` has no single-file image extension (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``).
    """
    path = Path(path)
    if image_extension(path) not in WRITE_EXTENSIONS:
        raise ValueError(f"cannot write {path}: use one of {', '.join(WRITE_EXTENSIONS)}")
    with atomic_output(path, force) as partial:
        write_partial(image, partial, path)
    return path


def write_partial(image: sitk.Image, partial: Path, path: Path) -> None:
    """Write ``image`` to ``partial`` (an ``atomic_output`` path for ``path``), compressed where the format allows.

    Raises:
        OSError: ITK could not write (disk full, file too large, folder unwritable); ITK reports that as a
            ``RuntimeError``, which would otherwise read like a bug.
    """
    try:
        sitk.WriteImage(image, str(partial), useCompression=image_extension(path) != ".nii")
    except RuntimeError as error:
        raise OSError(f"cannot write {path} ({itk_error_reason(error)})") from None
    check_written_image(partial, path)


def check_written_image(written: Path, path: Path) -> None:
    """Raise ``OSError`` if ``written`` (the file being written for ``path``) came out incomplete.

    ITK's NIfTI writer ignores failed writes (a full disk leaves a truncated file and no error; its NRRD and
    MetaImage writers do report them), so for .nii/.nii.gz the file's bytes (decompressed for .nii.gz) are counted
    against what its header promises.
    """
    if image_extension(Path(path)) not in (".nii", ".nii.gz"):
        return
    opener = gzip.open if written.name.endswith(".gz") else open
    try:
        with opener(written, "rb") as stream:
            header = stream.read(540)
            total = len(header) + sum(len(chunk) for chunk in iter(lambda: stream.read(1 << 20), b""))
    except (OSError, EOFError, zlib.error) as error:
        raise OSError(f"cannot write {path}: the file came out truncated ({error}; disk full?)") from None
    expected = _nifti_size(header)
    if expected is None or total < expected:
        raise OSError(f"cannot write {path}: only {total} of {expected or 'at least 348'} bytes were written "
                      "(disk full?)")


def _nifti_size(header: bytes) -> Optional[int]:
    """Bytes of a complete uncompressed NIfTI-1 or NIfTI-2 file, from the start of its header (either byte
    order); ``None`` if the header is cut short or is not NIfTI."""
    for endian in "<>":
        size = struct.unpack(endian + "i", header[:4])[0] if len(header) >= 4 else 0
        if size == 348 and len(header) >= 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
        elif size == 540 and len(header) >= 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
        else:
            continue
        rank = min(max(int(dims[0]), 0), 7)
        return offset + int(np.prod(dims[1:rank + 1], dtype=np.int64)) * bitpix // 8
    return None
