"""Reading and writing 3D volumes with their full geometry.

``read_image`` returns a validated 3D scalar ``sitk.Image`` (geometry in ITK's LPS world). Before anything is
allocated, the file's header is read here (not by ITK) and checked against the input contract below: a size
within ``max_voxels()``, the data it declares actually present, finite geometry. SimpleITK then reads; NIfTI
files it refuses (e.g. non-orthonormal direction cosines) fall back to nibabel, whose RAS affine is converted to
LPS; FreeSurfer ``.mgz``/``.mgh`` are read with nibabel. ``write_image`` is atomic and never overwrites without
``force``.
"""

from __future__ import annotations

import bz2
import gzip
import itertools
import math
import os
import re
import stat
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from ..errors import InputImageError
from .atomic import atomic_output

PathLike = Union[str, "os.PathLike[str]"]

# ------------------------------------------------------------------------------------------------ input contract
#: Extensions ``read_image`` accepts, longest first so ``.nii.gz`` wins over ``.gz``.
READ_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".mgz", ".mgh")
#: Single-file formats ``write_image`` writes (detached headers could not be renamed atomically).
WRITE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")

#: Largest image read, in voxels (times components/frames), unless ``ATTENTION_UNET_MAX_VOXELS`` says otherwise:
#: 2**29 = 512 Mi voxels holds the largest clinical scans (a 512 x 512 x 2000 whole-body CT is 524 M) while one
#: float32 copy of it is already 2 GiB and segmenting it takes several such copies.
DEFAULT_MAX_VOXELS = 2**29
MAX_VOXELS_VARIABLE = "ATTENTION_UNET_MAX_VOXELS"
#: Bytes of a text header (MetaImage, NRRD) read before giving up on finding its end.
MAX_HEADER_BYTES = 1 << 20
#: Largest NIfTI extension area (header end to data): extensions are metadata, and nibabel reads each one whole.
MAX_EXTENSION_BYTES = 16 << 20
#: Largest shear, as voxel displacement at the far corner over the smallest voxel size, that an image may have;
#: ITK images have orthonormal axes only, so up to this much (rounding, as DICOM converters leave) is absorbed.
SHEAR_TOLERANCE_VOXELS = 0.1

#: ITK LPS world = diag(-1, -1, 1) applied to nibabel's RAS world (and back: the matrix is its own inverse).
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])

_NIBABEL_ONLY = (".mgz", ".mgh")
_CHUNK = 1 << 22


def max_voxels() -> int:
    """The largest voxel count ``read_image`` accepts: ``ATTENTION_UNET_MAX_VOXELS`` or ``DEFAULT_MAX_VOXELS``."""
    text = os.environ.get(MAX_VOXELS_VARIABLE, "").strip()
    if not text:
        return DEFAULT_MAX_VOXELS
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value >= 1 and value == int(value)):
        raise InputImageError(f"{MAX_VOXELS_VARIABLE}={text!r} is not a positive whole number of voxels; set it to "
                              f"e.g. {DEFAULT_MAX_VOXELS} or unset it")
    return int(value)


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


def safe_name(name: str) -> str:
    """``name`` reduced to characters that are safe in a file name on every platform (``Left Hippo/1`` ->
    ``Left_Hippo_1``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "label"




@dataclass
class ImageHeader:
    """What a file's header declares, read before any voxel is: the shape (header order), the data's location
    (``files``: ``(path, offset)`` pairs, offset -1 = the data ends the file), encoding (``raw``, ``deflate``,
    ``bzip2``, ``text``, ``hex``), bytes, and the stored dtype where non-finite stored floats must be counted
    (NIfTI, whose ITK reader turns NaN into 0). ``skip``: inflated bytes before the data (a ``.nii.gz`` or
    ``.mgz`` compresses its header too). ``scaling``: a NIfTI's ``(scl_slope, scl_inter)`` when set."""

    shape: Tuple[int, ...]
    files: List[Tuple[Path, int]]
    encoding: str
    data_bytes: int
    scan_dtype: Optional[np.dtype] = None
    skip: int = 0
    scaling: Optional[Tuple[float, float]] = None


def read_header(path: PathLike) -> ImageHeader:
    """Check ``path``'s header against the input contract without reading its voxels.

    Raises:
        InputImageError: the header is unreadable; declares more than ``max_voxels()`` voxels, a negative size or
            non-finite / zero / negative geometry; or its data file is missing, not a regular file, or holds fewer
            bytes than declared (a compressed stream is inflated, counting bytes, never kept, so neither a
            truncated file nor a header promising more than its data is read by ITK, which would zero-fill).
    """
    path = Path(path)
    extension = image_extension(path)
    if extension not in _HEADER_PARSERS:
        raise InputImageError(f"{path} is not a supported image file; give one of {', '.join(READ_EXTENSIONS)}")
    try:
        header = _HEADER_PARSERS[extension](path)
        _check_voxel_count(path, header.shape)
        _check_data_present(path, header)
    except OSError as error:  # e.g. no permission to read
        raise InputImageError(f"cannot read {path} ({error.strerror or error})") from None
    return header


def _check_voxel_count(path: Path, shape: Sequence[int]) -> None:
    if any(n < 0 for n in shape):
        raise InputImageError(f"{path} declares a negative size {tuple(shape)}; its header is damaged, export it again")
    voxels, limit = math.prod(shape), max_voxels()
    if voxels > limit:
        raise InputImageError(
            f"{path} declares size {' x '.join(map(str, shape))} = {voxels:,} voxels, more than the {limit:,} this "
            f"tool reads; crop or downsample it first, or raise the limit with {MAX_VOXELS_VARIABLE}=N if it is "
            "real and this machine has the memory for it")


def _geometry_error(path: Path, what: str) -> InputImageError:
    return InputImageError(f"{path} has {what} in its header, so its voxels have no place in the world; fix the "
                           "header (or export the volume again)")


def _check_finite(path: Path, values: Sequence[float], what: str) -> None:
    if not all(math.isfinite(float(v)) for v in values):
        raise _geometry_error(path, f"a non-finite (NaN/Inf) {what}")


def _nibabel_header(path: Path) -> ImageHeader:
    """NIfTI-1/2 or FreeSurfer MGH header through nibabel (lazy: no voxel is read)."""
    import nibabel as nib

    scaling = _nifti_preflight(path) if image_extension(path) in (".nii", ".nii.gz") else _mgh_preflight(path)
    try:
        loaded = nib.load(str(path))
        header = loaded.header
        shape = tuple(int(n) for n in header.get_data_shape())
        dtype = np.dtype(header.get_data_dtype())
        offset = int(loaded.dataobj.offset)
    except MemoryError:
        raise
    except Exception as error:  # nibabel raises many types for damaged headers
        raise InputImageError(f"cannot read {path}: its header is not a valid "
                              f"{'FreeSurfer MGH' if image_extension(path) in _NIBABEL_ONLY else 'NIfTI'} header "
                              f"({error}); give an uncorrupted volume in one of {', '.join(READ_EXTENSIONS)}") from None
    data_bytes = math.prod(shape) * dtype.itemsize
    if image_extension(path) in (".nii.gz", ".mgz"):
        result = ImageHeader(shape, [(path, 0)], "deflate", data_bytes, skip=offset)
    else:
        result = ImageHeader(shape, [(path, offset)], "raw", data_bytes)
    if image_extension(path) in _NIBABEL_ONLY:
        _check_finite(path, np.asarray(loaded.affine).ravel(), "affine (voxel-to-world matrix)")
        return result
    # Each transform a reader might use (ITK and nibabel choose differently) must be finite.
    for name, (affine, code) in (("sform", header.get_sform(coded=True)), ("qform", header.get_qform(coded=True))):
        if code:
            _check_finite(path, np.asarray(affine).ravel(), f"{name} (voxel-to-world matrix, code {int(code)})")
    _check_finite(path, [float(v) for v in header["pixdim"][1:4]], "voxel size (pixdim)")
    _check_transforms_agree(path, header, shape)
    slope, inter = scaling
    if slope != 0 and not math.isnan(slope):  # 0 or NaN: no scaling (NIfTI standard)
        if not (math.isfinite(slope) and math.isfinite(inter)):
            raise InputImageError(f"{path} has a non-finite intensity scaling in its header (scl_slope={slope}, "
                                  f"scl_inter={inter}); set scl_slope to 1 and scl_inter to 0 (or export it again)")
        if (slope, inter) != (1.0, 0.0):
            result.scaling = (slope, inter)
    if dtype.kind == "f":
        result.scan_dtype = dtype
    return result


def _check_transforms_agree(path: Path, header: Any, shape: Sequence[int]) -> None:
    """Refuse a NIfTI whose sform and qform are both switched on but place the grid differently.

    Readers choose between them by different rules (ITK, and so 3D Slicer, may take the qform where nibabel and FSL
    take the sform), so such a file has no single geometry and outputs would sit elsewhere in another program.
    """
    sform, sform_code = header.get_sform(coded=True)
    qform, qform_code = header.get_qform(coded=True)
    if not (sform_code and qform_code):
        return
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1 if len(shape) > 2 else 0)]).T
    apart_mm = float(np.linalg.norm((np.asarray(sform, float) - np.asarray(qform, float)) @ corners, axis=0).max())
    voxel_mm = float(np.min(np.abs(np.asarray(header["pixdim"][1:4], float))) or 1.0)
    if apart_mm > SHEAR_TOLERANCE_VOXELS * voxel_mm:
        raise InputImageError(
            f"{path} has two voxel-to-world transforms in its header that disagree (sform code {int(sform_code)} and "
            f"qform code {int(qform_code)} place its corners up to {apart_mm:.3g} mm apart); programs choose between "
            "them differently, so its geometry is ambiguous. Make them agree (e.g. FSL's `fslorient "
            "-copysform2qform`, or nibabel's `img.set_qform(img.get_sform())`) or switch the wrong one off (code 0)")


def _prefix(path: Path, size: int) -> bytes:
    """The first ``size`` bytes of ``path``, inflated for ``.gz``/``.mgz`` (fewer where it is shorter)."""
    opener = gzip.open if image_extension(path) in (".nii.gz", ".mgz") else open
    try:
        with opener(path, "rb") as stream:
            return stream.read(size)
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        with open(path, "rb") as stream:
            if stream.read(2) != b"\x1f\x8b":
                raise InputImageError(f"{path} is named {image_extension(path)} but is not gzip-compressed; rename it "
                                      f"(e.g. to {image_extension(path).replace('.gz', '').replace('.mgz', '.mgh')})"
                                      ) from None
        raise InputImageError(f"cannot read {path}: its compressed data is damaged ({error}); export the volume "
                              "again") from None


def _nifti_preflight(path: Path) -> Tuple[float, float]:
    """What must be checked before nibabel parses a NIfTI header: the declared size (nibabel would seek through a
    bomb), the extension area (nibabel reads each extension whole, whatever size it claims). Returns the stored
    ``(scl_slope, scl_inter)`` (nibabel's loaded header no longer holds them, and it drops an infinite slope that
    ITK would apply)."""
    raw = _prefix(path, 544)
    for endian in "<>":
        size = struct.unpack(endian + "i", raw[:4])[0] if len(raw) >= 4 else 0
        if size == 348 and len(raw) >= 352:
            dims = struct.unpack(endian + "8h", raw[40:56])
            offset = struct.unpack(endian + "f", raw[108:112])[0]
            offset = int(offset) if math.isfinite(offset) else 1 << 62  # refused below
            scaling = struct.unpack(endian + "2f", raw[112:120])
            break
        if size == 540 and len(raw) >= 544:
            dims = struct.unpack(endian + "8q", raw[16:80])
            offset = struct.unpack(endian + "q", raw[168:176])[0]
            scaling = struct.unpack(endian + "2d", raw[176:192])
            break
    else:
        raise InputImageError(f"cannot read {path}: it does not start with a NIfTI-1 or NIfTI-2 header; give an "
                              f"uncorrupted volume in one of {', '.join(READ_EXTENSIONS)}")
    _check_voxel_count(path, dims[1:min(max(dims[0], 1), 7) + 1])
    if offset - (size + 4) > MAX_EXTENSION_BYTES:
        raise InputImageError(f"{path} puts its data {offset:,} bytes into the file, leaving {offset - size - 4:,} "
                              f"bytes of header extensions, more than the {MAX_EXTENSION_BYTES:,} read here; the "
                              "header is damaged or hostile — export the volume again")
    if raw[size] != 0 and offset > size + 4:  # extensions present: each must end within the extension area
        area = _prefix(path, offset)
        position = size + 4
        while position + 8 <= offset:
            length = struct.unpack(endian + "i", area[position:position + 4])[0] if len(area) >= position + 4 else 0
            if length < 16 or position + length > offset:
                raise InputImageError(f"{path} has a header extension of {length:,} bytes at byte {position:,}, "
                                      f"which does not fit before its data at byte {offset:,}; the header is "
                                      "damaged — export the volume again")
            position += length
    return scaling


def _mgh_preflight(path: Path) -> Tuple[float, float]:
    """The declared size of a FreeSurfer MGH header (big-endian width, height, depth, frames), checked before
    nibabel seeks past the data to its footer. MGH has no intensity scaling: returns ``(1, 0)``."""
    raw = _prefix(path, 284)
    if len(raw) < 284:
        raise InputImageError(f"cannot read {path}: it is shorter than a FreeSurfer MGH header (284 bytes)")
    _check_voxel_count(path, struct.unpack(">4i", raw[4:20]))
    return 1.0, 0.0


def _text_header(path: Path, last: Optional[Callable[[str], bool]] = None) -> Tuple[List[str], int]:
    """The lines of a text header (within its first ``MAX_HEADER_BYTES``), up to and including the first for which
    ``last`` holds (MetaImage: the ``ElementDataFile`` line; NRRD: the first blank line), and the byte offset just
    after that line, where attached data starts; ``-1`` when no line ends the header."""
    with open(path, "rb") as stream:
        head = stream.read(MAX_HEADER_BYTES)
    lines, position = [], 0
    while position < len(head):
        stop = head.find(b"\n", position)
        if stop < 0:
            if len(head) == MAX_HEADER_BYTES:
                break  # a line cut by the cap
            stop = len(head)
        line = head[position:stop].decode("latin-1").rstrip("\r")
        position = stop + 1
        lines.append(line)
        if last is not None and last(line):
            return lines, position
    return lines, -1


def _fields(lines: Sequence[str], separator: str) -> Dict[str, str]:
    fields = {}
    for line in lines:
        if separator in line and not line.lstrip().startswith("#"):
            key, value = line.split(separator, 1)
            fields.setdefault(key.strip().lower(), value.strip())
    return fields


def _numbers(path: Path, text: str, what: str) -> List[float]:
    try:
        return [float(v) for v in re.findall(r"[-+]?(?:nan|inf(?:inity)?|(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)", text,
                                             re.IGNORECASE)]
    except ValueError:
        raise _geometry_error(path, f"an unreadable {what}") from None


def _whole_numbers(path: Path, text: Optional[str], what: str) -> List[int]:
    try:
        return [int(v) for v in (text or "").split()]
    except ValueError:
        raise InputImageError(f"cannot read {path}: its header's {what} {text!r} is not a list of whole numbers; "
                              "fix the header (or export the volume again)") from None


def _check_spacing(path: Path, spacing: Sequence[float]) -> None:
    _check_finite(path, spacing, "voxel spacing")
    if any(s <= 0 for s in spacing):
        raise _geometry_error(path, f"a zero or negative voxel spacing {list(spacing)}")


def _data_files(path: Path, value: str, key: str, shape: Sequence[int]) -> List[Path]:
    """The data file(s) a detached header names in its ``key`` field: one file, ``LIST`` (one name a line after
    that field) or a printf pattern ``name%03d.raw first last step``; relative names are relative to the
    header's folder. More files than the image's largest axis has slices is refused (a pattern could name
    billions)."""
    words = value.split()
    if words and words[0].upper() == "LIST":
        lines = _text_header(path)[0]
        start = next(i for i, line in enumerate(lines) if line.strip().lower().startswith(key)) + 1
        names: Sequence[str] = [line.strip() for line in lines[start:] if line.strip()]
    elif len(words) >= 4 and "%" in words[0]:
        try:
            first, last, step = (int(w) for w in words[1:4])
            names = range(first, last + (1 if step > 0 else -1), step or 1)  # formatted below, once counted
        except ValueError:
            names = [value]
    else:
        names = [value]
    if len(names) > max(list(shape) + [1]):
        raise InputImageError(f"{path} names {len(names):,} data files, more than its size "
                              f"{' x '.join(map(str, shape))} has slices; fix the header's {key} field")
    if isinstance(names, range):
        try:
            names = [words[0] % i for i in names]
        except (TypeError, ValueError):
            names = [value]
    return [Path(name) if Path(name).is_absolute() else path.parent / name for name in names]


_META_TYPE_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
                    "MET_DOUBLE": 8}


def _metaimage_header(path: Path) -> ImageHeader:
    lines, data_start = _text_header(path, lambda line: line.strip().lower().startswith("elementdatafile"))
    fields = _fields(lines, "=")
    if "elementdatafile" not in fields or "dimsize" not in fields:
        raise InputImageError(f"cannot read {path}: it is not a MetaImage file (no DimSize/ElementDataFile in its "
                              f"header); give an uncorrupted volume in one of {', '.join(READ_EXTENSIONS)}")
    shape = _whole_numbers(path, fields["dimsize"], "DimSize")
    shape += _whole_numbers(path, fields.get("elementnumberofchannels"), "ElementNumberOfChannels")
    for key in ("offset", "origin", "position", "centerofrotation"):
        if key in fields:
            _check_finite(path, _numbers(path, fields[key], key), f"origin ({key})")
    for key in ("transformmatrix", "rotation", "orientation"):
        if key in fields:
            _check_finite(path, _numbers(path, fields[key], key), f"direction ({key})")
    for key in ("elementspacing", "elementsize"):
        if key in fields:
            _check_spacing(path, _numbers(path, fields[key], key))
    item = _META_TYPE_BYTES.get(fields.get("elementtype", "").upper().replace("_ARRAY", ""), 1)
    binary = fields.get("binarydata", "true").lower() == "true"
    compressed = fields.get("compresseddata", "false").lower() == "true"
    value = fields["elementdatafile"]
    if value.upper() == "LOCAL":
        files = [(path, data_start)]
    else:
        skip = (_whole_numbers(path, fields.get("headersize", "0"), "HeaderSize") or [0])[0]
        files = [(file, skip) for file in _data_files(path, value, "elementdatafile", shape)]
    encoding = "deflate" if compressed else ("raw" if binary else "text")
    return ImageHeader(tuple(shape), files, encoding, math.prod(shape) * item)


#: NRRD type names (spaces, ``signed``/``unsigned`` and ``_t`` removed) -> bytes per value.
_NRRD_TYPE_BYTES = {**dict.fromkeys(("char", "uchar", "int8", "uint8"), 1),
                    **dict.fromkeys(("short", "shortint", "ushort", "int16", "uint16"), 2),
                    **dict.fromkeys(("int", "uint", "int32", "uint32", "float"), 4),
                    **dict.fromkeys(("longlong", "longlongint", "ulonglong", "int64", "uint64", "double"), 8)}


def _nrrd_type_bytes(name: str) -> int:
    words = [w for w in name.lower().replace("_t", "").split() if w not in ("signed", "unsigned")]
    return _NRRD_TYPE_BYTES.get("".join(words) or "int", 1)  # unknown (e.g. block): ITK decides


def _nrrd_header(path: Path) -> ImageHeader:
    with open(path, "rb") as stream:
        magic = stream.read(8)
    if not magic.startswith(b"NRRD"):
        raise InputImageError(f"cannot read {path}: it is not a NRRD file (no NRRD magic line); give an uncorrupted "
                              f"volume in one of {', '.join(READ_EXTENSIONS)}")
    lines, data_start = _text_header(path, lambda line: not line.strip())
    fields = {key: value for key, value in _fields(lines[1:], ":").items()
              if not value.startswith("=")}  # key:=value pairs are free-form metadata
    shape = _whole_numbers(path, fields.get("sizes"), "sizes")
    if not shape:
        raise InputImageError(f"cannot read {path}: its NRRD header has no 'sizes' field; fix or re-export it")
    if "space origin" in fields:
        _check_finite(path, _numbers(path, fields["space origin"], "space origin"), "origin (space origin)")
    if "space directions" in fields:
        _check_finite(path, _numbers(path, fields["space directions"], "space directions"),
                      "direction (space directions)")
    if "spacings" in fields:
        _check_spacing(path, [v for v in _numbers(path, fields["spacings"], "spacings") if not math.isnan(v)])
    encoding = {"raw": "raw", "gz": "deflate", "gzip": "deflate", "bz2": "bzip2", "bzip2": "bzip2", "hex": "hex"}.get(
        fields.get("encoding", "raw").lower(), "text")
    key = "data file" if "data file" in fields else "datafile"
    skip = _whole_numbers(path, fields.get("byte skip", fields.get("byteskip", "0")), "byte skip")
    skip = skip[0] if skip else 0
    if key not in fields:
        files = [(path, data_start + skip if skip >= 0 and data_start >= 0 else -1)]
    else:
        files = [(file, skip) for file in _data_files(path, fields[key], key, shape)]
    return ImageHeader(tuple(shape), files, encoding, math.prod(shape) * _nrrd_type_bytes(fields.get("type", "")))


_HEADER_PARSERS: Dict[str, Callable[[Path], ImageHeader]] = {
    ".nii": _nibabel_header, ".nii.gz": _nibabel_header, ".mgz": _nibabel_header, ".mgh": _nibabel_header,
    ".mha": _metaimage_header, ".mhd": _metaimage_header, ".nrrd": _nrrd_header, ".nhdr": _nrrd_header}


def files_read_for(path: PathLike) -> List[Path]:
    """``path`` and, for a MetaImage or NRRD header, the detached data files it names (``ElementDataFile`` /
    ``data file``, also in ``LIST`` and pattern form, as ``read_header`` finds them): every file reading that input
    opens. A folder (a DICOM series input) is the files of its image series (``dicomio.series_files``). Any other
    file (another format, the ROI file, a header that cannot be parsed) is just ``[path]``."""
    path = Path(path)
    if path.is_dir():
        from .dicomio import series_files

        return series_files(path)
    if image_extension(path) not in (".mha", ".mhd", ".nrrd", ".nhdr"):
        return [path]
    try:
        files = [file for file, _ in _HEADER_PARSERS[image_extension(path)](path).files]
    except (InputImageError, OSError):
        return [path]  # unreadable: nothing reads it, so nothing else is at stake
    return [path] + [file for file in files if file != path]


def _check_data_present(path: Path, header: ImageHeader) -> None:
    """Every data file is a regular file and together they hold the bytes the header declares."""
    held = 0
    needed = header.data_bytes
    for file, offset in header.files:
        try:
            info = os.stat(file)
        except OSError as error:
            raise InputImageError(f"the data file {file} that {path} names cannot be opened "
                                  f"({error.strerror or error}); keep the header and its data file together") from None
        if not stat.S_ISREG(info.st_mode):
            raise InputImageError(f"the data file {file} that {path} names is not a regular file (a device, pipe or "
                                  "folder); point the header at the image's data file")
        start = 0 if offset < 0 else offset
        if header.encoding in ("raw", "text", "hex") or offset < 0:
            held += max(info.st_size - start, 0)
        else:
            held += _inflated_bytes(path, file, start, needed - held, header)
    if header.encoding == "hex":
        held //= 2
    if header.encoding == "text":
        needed = math.prod(header.shape)  # at least one character per value
    if held < needed:
        files = [file for file, _ in header.files]
        where = f"{path} holds" if files == [path] else f"data file {files[0]} holds" if len(files) == 1 else \
            f"the {len(files)} data files ({files[0]}, ...) hold"
        raise InputImageError(
            f"{where} {held:,} bytes of image data, but the header {path} declares {needed:,} (size "
            f"{' x '.join(map(str, header.shape))}); the file is truncated or its header is wrong — export the "
            "volume again")
    if header.scan_dtype is not None and header.encoding == "raw":
        for _ in _scan_nonfinite(path, header.scan_dtype, _raw_chunks(*header.files[0], needed)):
            pass


def _raw_chunks(file: Path, offset: int, needed: int) -> Iterator[bytes]:
    with open(file, "rb") as stream:
        stream.seek(offset)
        while needed > 0:
            chunk = stream.read(min(_CHUNK, needed))
            if not chunk:
                return
            needed -= len(chunk)
            yield chunk


def _inflated_bytes(path: Path, file: Path, offset: int, needed: int, header: ImageHeader) -> int:
    """Bytes the compressed stream(s) at ``offset`` of ``file`` inflate to, counted up to ``needed`` (nothing is
    kept); stored floats are counted for non-finite values on the way (see ``ImageHeader.scan_dtype``)."""
    produced = 0
    try:
        inflated = _inflate(file, offset, header.skip + needed, header.encoding == "bzip2")
        for chunk in _scan_nonfinite(path, header.scan_dtype, _skipped(inflated, header.skip)):
            produced += len(chunk)
    except (OSError, EOFError, ValueError, zlib.error) as error:
        raise InputImageError(f"cannot read {path}: its compressed data is damaged ({error}); export the volume "
                              "again") from None
    return produced


def _skipped(chunks: Iterator[bytes], skip: int) -> Iterator[bytes]:
    """``chunks`` without their first ``skip`` bytes."""
    for chunk in chunks:
        if skip >= len(chunk):
            skip -= len(chunk)
            continue
        yield chunk[skip:]
        skip = 0


def _decoder(bzip2: bool):
    return bz2.BZ2Decompressor() if bzip2 else zlib.decompressobj(32 + zlib.MAX_WBITS)  # gzip or zlib header


def _inflate(file: Path, offset: int, needed: int, bzip2: bool) -> Iterator[bytes]:
    """The first ``needed`` inflated bytes of the stream(s) at ``offset``, in chunks of at most ``_CHUNK``; fewer
    where the data ends first. Concatenated streams (multi-member gzip) continue; trailing zero padding ends."""
    with open(file, "rb") as stream:
        stream.seek(offset)
        decoder, data, produced = _decoder(bzip2), b"", 0
        while produced < needed:
            if bzip2 and not decoder.needs_input and not decoder.eof:
                out = decoder.decompress(b"", _CHUNK)  # bz2 keeps unread input inside
            else:
                data = data or stream.read(1 << 20)
                if not data:
                    return
                out = decoder.decompress(data, _CHUNK)
                data = b"" if bzip2 else decoder.unconsumed_tail
            out = out[: needed - produced]
            produced += len(out)
            yield out
            if decoder.eof:
                data = decoder.unused_data or stream.read(1 << 20)  # (zlib's unconsumed_tail repeats it)
                if not data.strip(b"\0"):
                    return
                decoder = _decoder(bzip2)


def _scan_nonfinite(path: Path, dtype: Optional[np.dtype], chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Pass ``chunks`` on, counting NaN/Inf among the stored floats of ``dtype`` (``None``: nothing to count) in
    them: ITK's NIfTI reader silently turns NaN into 0."""
    bad, rest = 0, b""
    for chunk in chunks:
        if dtype is not None:
            data = rest + chunk
            usable = len(data) - len(data) % dtype.itemsize
            values = np.frombuffer(data[:usable], dtype=dtype)
            bad += int(values.size - np.count_nonzero(np.isfinite(values)))
            rest = data[usable:]
        yield chunk
    if bad:
        raise InputImageError(f"{path} has {bad} NaN/Inf voxels; replace them (e.g. with 0) before segmenting")


def read_image(path: PathLike) -> sitk.Image:
    """Read and validate a 3D scalar volume.

    Returns the image with its original pixel type (float64 is narrowed to float32) and full geometry.

    Raises:
        InputImageError: the file is missing or unreadable, breaks the input contract (``read_header``), does not
            fit in memory, or the image is 2D, 4D, multi-component (RGB/vector), empty, constant, sheared, or
            contains NaN/Inf voxels. The message names the file and how to fix it.
    """
    image, header = _read_checked(Path(path))
    try:
        return validate_image(image, str(path), scaling=header.scaling)
    except MemoryError:
        raise _too_large(Path(path), header) from None


def read_label(path: PathLike) -> sitk.Image:
    """Read a label map under the same file, header and geometry checks as ``read_image``, without the intensity
    checks (a label map may be all background). Callers check the label values themselves."""
    return _read_checked(Path(path))[0]


def _read_checked(path: Path) -> Tuple[sitk.Image, ImageHeader]:
    if not path.exists():
        raise InputImageError(f"input image {path} does not exist; check the path")
    if not path.is_file():
        raise InputImageError(f"input image {path} is not a file; give a volume file (.nii.gz, .nrrd, .mha, ...)")
    if path.stat().st_size == 0:
        raise InputImageError(f"input image {path} is an empty file (0 bytes); export the volume again")
    header = read_header(path)
    try:
        if image_extension(path) in _NIBABEL_ONLY:
            image = _read_with_nibabel(path, None)
        else:
            try:
                image = sitk.ReadImage(str(path))
            except RuntimeError as sitk_error:
                if "allocate" in str(sitk_error).lower():
                    raise MemoryError from None
                image = _read_with_nibabel(path, sitk_error)
        image = _squeeze_single_volume(image)
    except MemoryError:
        raise _too_large(path, header) from None
    if image.GetDimension() == 3:  # rounding-level shear becomes exactly orthonormal (the image is ours to change)
        direction = _checked_direction(image, str(path))
        if np.abs(direction.ravel() - image.GetDirection()).max() > 1e-12:
            image.SetDirection([float(d) for d in direction.ravel()])
    return image, header


def _too_large(path: Path, header: ImageHeader) -> InputImageError:
    return InputImageError(
        f"{path} (size {' x '.join(map(str, header.shape))}) does not fit in this machine's free memory; close "
        "other programs, crop or downsample it first, or segment it on a machine with more memory")


def itk_error_reason(error: Exception) -> str:
    """The last line of an ITK exception (the reason; the lines before are ITK's source locations)."""
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__


def _read_with_nibabel(path: Path, sitk_error: Optional[Exception]) -> sitk.Image:
    """nibabel reader (FreeSurfer MGH, and NIfTI files ITK refuses): the RAS affine -> ITK LPS origin, spacing and
    the nearest orthonormal direction (``_orthonormal_direction``)."""
    import nibabel as nib

    try:
        loaded = nib.load(str(path))
        proxy = loaded.dataobj
        slope, inter = float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))
        data = np.asanyarray(proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else proxy)
        affine = np.asarray(loaded.affine, dtype=float)
    except MemoryError:
        raise
    except Exception as nib_error:  # nibabel raises many types for corrupt files
        tried = f"neither SimpleITK ({itk_error_reason(sitk_error)}) nor nibabel ({nib_error}) understands it" \
            if sitk_error is not None else f"nibabel cannot decode it ({nib_error})"
        raise InputImageError(
            f"cannot read {path}: {tried}; give an uncorrupted 3D volume in one of {', '.join(READ_EXTENSIONS)}"
        ) from None
    if data.size == 0:
        raise InputImageError(f"{path} is empty (shape {data.shape}, no voxels); give a volume that holds image data")
    if data.dtype.names is not None:
        raise InputImageError(f"{path} holds RGB/vector voxels; convert it to a single-channel (grey) volume")
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise _dimension_error(path, data.ndim, tuple(data.shape))
    data = data.astype(np.float32 if data.dtype == np.float64 else data.dtype.newbyteorder("="), copy=False)
    if (slope, inter) != (1.0, 0.0):  # scaled in float32 (nibabel would make a float64 volume)
        data = data.astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported by validate_image
            data *= np.float32(slope)
            data += np.float32(inter)
    linear = LPS_FROM_RAS @ affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    direction = _orthonormal_direction(str(path), data.shape, spacing, linear / np.where(spacing > 0, spacing, 1))
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (2, 1, 0))))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in LPS_FROM_RAS @ affine[:3, 3]])
    image.SetDirection([float(d) for d in direction.ravel()])
    return image


def _orthonormal_direction(name: str, size: Sequence[int], spacing: Sequence[float],
                           direction: np.ndarray) -> np.ndarray:
    """The nearest orthonormal direction (polar decomposition) to ``direction`` (3 x 3, columns = index axes).

    ITK images cannot represent shear: rounding-level shear is absorbed, real shear would put every output off
    the input's grid and is refused, as are non-finite or non-positive spacings and degenerate directions.
    """
    spacing = np.asarray(spacing, dtype=float)
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    if not (np.all(np.isfinite(spacing)) and np.all(spacing > 0) and np.all(np.isfinite(direction))):
        raise InputImageError(f"{name} has a degenerate geometry (zero or non-finite voxel size, or non-finite "
                              "direction); fix its header")
    linear = direction * spacing
    if abs(np.linalg.det(direction)) < 1e-6:
        raise InputImageError(f"{name} has a degenerate direction matrix (its axes are parallel); fix its header")
    u, _, vt = np.linalg.svd(direction)
    orthonormal = u @ vt
    corners = np.array(list(itertools.product(*[(0, n - 1) for n in size])), dtype=float).T
    error_mm = float(np.abs((linear - orthonormal * spacing) @ corners).max())
    if error_mm > SHEAR_TOLERANCE_VOXELS * float(spacing.min()):
        raise InputImageError(
            f"{name} has a sheared voxel grid (its axes are not perpendicular; approximating it would move voxels "
            f"by up to {error_mm:.2f} mm); resample it onto an unsheared grid first, e.g. with "
            "nibabel.processing.resample_to_output or 3D Slicer's Resample Scalar Volume"
        )
    return orthonormal


def _checked_direction(image: sitk.Image, name: str) -> np.ndarray:
    """The orthonormal direction of a 3D ``image`` with a finite origin and positive spacing (rounding-level
    shear absorbed, real shear refused: ``_orthonormal_direction``)."""
    if not all(math.isfinite(v) for v in image.GetOrigin()):
        raise InputImageError(f"{name} has a non-finite origin {image.GetOrigin()}; fix its header")
    return _orthonormal_direction(name, image.GetSize(), image.GetSpacing(), np.array(image.GetDirection()))


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


def validate_image(image: sitk.Image, name: str = "input image",
                   scaling: Optional[Tuple[float, float]] = None) -> sitk.Image:
    """Check that ``image`` is a non-empty, non-constant, finite 3D scalar volume on an unsheared grid with finite
    geometry; float64 becomes float32. ``scaling`` (a NIfTI header's ``(scl_slope, scl_inter)``) words the error
    when that scaling is what made voxels non-finite."""
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
    _checked_direction(image, name)
    if image.GetPixelID() == sitk.sitkFloat64:
        image = sitk.Cast(image, sitk.sitkFloat32)
    voxels = sitk.GetArrayViewFromImage(image)
    if voxels.dtype.kind == "f" and not np.isfinite(voxels).all():
        bad = int(np.count_nonzero(~np.isfinite(voxels)))
        if scaling is not None:  # the stored values were finite (checked while reading): the scaling overflowed
            raise InputImageError(
                f"{name}: its header's intensity scaling (scl_slope={scaling[0]:g}, scl_inter={scaling[1]:g}) "
                f"overflows the float32 range in {bad} voxels; fix scl_slope/scl_inter in the header (e.g. 1 and 0)")
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
