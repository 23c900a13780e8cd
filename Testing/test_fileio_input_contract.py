"""The input contract (README "Input contract"): what an image, ROI or dataset file may do to the engine.

Hostile files (headers promising more than their data, data files that are devices, NaN geometry, shear, scaling
that overflows, truncated or damaged streams, nested JSON) each get one actionable ``error:`` line and exit status 2
with nothing written, and reach no allocation: the subprocess cases run under an address-space limit
(``RLIMIT_AS``) well below what trusting the header would take.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from AttentionUNetSegmentLib.cli import commands as cli
from AttentionUNetSegmentLib.training.datasets import inspect_dataset, load_dataset
from AttentionUNetSegmentLib.errors import DatasetError, InputImageError
from AttentionUNetSegmentLib.fileio.imageio import (DEFAULT_MAX_VOXELS, LPS_FROM_RAS, MAX_VOXELS_VARIABLE, read_image,
                                             read_label)
from AttentionUNetSegmentLib.preprocessing.preprocess import normalize

try:
    import resource
except ImportError:  # Windows: no address-space limits, no FIFOs or /dev/urandom
    resource = None
posix_only = pytest.mark.skipif(resource is None, reason="needs POSIX resource limits and FIFOs")

#: Address-space limit of the hostile-file subprocesses: the engine's imports take about 0.45 GB; each hostile
#: file would take from 1 GB (the gzip bomb) to 5 GB (1100^3 float32) if its header were trusted.
MEMORY_LIMIT = 2 * 2**30


def run_limited(*args: str, env: dict = None, limit: int = MEMORY_LIMIT) -> subprocess.CompletedProcess:
    """``attention-unet ARGS`` in a subprocess whose address space is capped at ``limit`` bytes."""
    if resource is None:
        pytest.skip("needs POSIX resource limits")

    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return subprocess.run([sys.executable, "-m", "AttentionUNetSegmentLib", *args], capture_output=True, text=True,
                          timeout=300, preexec_fn=cap_memory, env={**os.environ, **(env or {})})


def assert_one_error(result: subprocess.CompletedProcess, pattern: str, output_dir: Path) -> None:
    """Exit status 2, stderr exactly one ``error:`` line matching ``pattern``, nothing written."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert not output_dir.exists() or not any(output_dir.iterdir())


def nifti_bytes(shape, dtype=np.float32, data: bytes = b"", **header_fields) -> bytes:
    """A single-file NIfTI-1 (header + 4 extension bytes + ``data``) declaring ``shape`` of ``dtype``."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_sform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    header.set_qform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    header["vox_offset"] = 352
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    for key, value in header_fields.items():
        header[key] = value
    return header.binaryblock + b"\0" * 4 + data


def smooth_volume(size_zyx=(20, 22, 24), seed=0) -> np.ndarray:
    """A non-constant float32 volume (z, y, x) with smooth structure."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in size_zyx], indexing="ij")
    noise = np.random.default_rng(seed).random(size_zyx)
    return (100 * np.exp(-4 * (x**2 + y**2 + z**2)) + 10 * noise).astype(np.float32)


def volume_nifti(path: Path, dtype=np.float32, **header_fields) -> Path:
    data = smooth_volume().astype(dtype).transpose(2, 1, 0)
    image = nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0]))
    for key, value in header_fields.items():
        image.header[key] = value
    nib.save(image, str(path))
    return path


# ------------------------------------------------------------------------------ header sizes are never trusted
@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    """The issue's memory bombs: 4 KB .nii declaring 1100^3 float32, 4 KB .nii.gz declaring 1300^3, a 132-byte
    .mhd pointing at /dev/urandom (plus one within the voxel limit), a ~1 MB gzip that inflates to 1 GiB."""
    folder = tmp_path_factory.mktemp("hostile")
    (folder / "big.nii").write_bytes(nifti_bytes((1100, 1100, 1100)).ljust(4096, b"\0"))
    (folder / "big.nii.gz").write_bytes(gzip.compress(nifti_bytes((1300, 1300, 1300), data=bytes(64 << 10))))
    mhd = ("ObjectType = Image\nNDims = 3\nDimSize = 1024 1024 1024\nElementType = MET_UCHAR\n"
           "ElementDataFile = /dev/urandom\n")
    (folder / "urandom.mhd").write_text(mhd)
    (folder / "urandom_small.mhd").write_text(mhd.replace("1024 1024 1024", "512 512 512"))
    # 64 gzip members of 16 MiB zeros each (a member compresses once; gzip readers concatenate members).
    member = gzip.compress(bytes(16 << 20), compresslevel=9)
    header = gzip.compress(nifti_bytes((1024, 1024, 1024), dtype=np.uint8))
    (folder / "bomb.nii.gz").write_bytes(header + member * 64)
    return folder


@pytest.mark.parametrize("name", ["big.nii", "big.nii.gz", "urandom.mhd", "bomb.nii.gz"])
def test_a_header_declaring_more_voxels_than_the_limit_is_refused_before_reading(hostile, tmp_path, name):
    assert (hostile / name).stat().st_size < 2 << 20
    result = run_limited("segment", str(hostile / name), "--output-dir", str(tmp_path / "out"))
    assert_one_error(result, rf"declares size .* voxels, more than the {DEFAULT_MAX_VOXELS:,} .*"
                             rf"{MAX_VOXELS_VARIABLE}", tmp_path / "out")


@pytest.mark.parametrize("name, message", [
    ("big.nii", r"big.nii holds 3,744 bytes of image data, but the header .* declares 5,324,000,000"),
    ("big.nii.gz", r"big.nii.gz holds 65,536 bytes of image data, but the header .* declares 8,788,000,000"),
    ("urandom_small.mhd", r"data file /dev/urandom .* is not a regular file"),
])
def test_a_header_promising_more_than_its_data_is_refused_even_within_the_limit(hostile, tmp_path, name, message):
    result = run_limited("segment", str(hostile / name), "--output-dir", str(tmp_path / "out"),
                         env={MAX_VOXELS_VARIABLE: str(10**10)})
    assert_one_error(result, message, tmp_path / "out")


def test_an_image_larger_than_the_memory_gets_one_error_line(hostile, tmp_path):
    """The bomb's data is all there (1 GiB of zeros): with the limit raised it is inflated (counted, never kept),
    then ITK cannot allocate it under a 1 GiB address-space cap: one error line saying so, not a traceback."""
    result = run_limited("segment", str(hostile / "bomb.nii.gz"), "--output-dir", str(tmp_path / "out"),
                         env={MAX_VOXELS_VARIABLE: str(2**31)}, limit=2**30)
    assert_one_error(result, r"does not fit in this machine's free memory", tmp_path / "out")


@pytest.mark.parametrize("extension", [".nii", ".nii.gz"])
def test_nifti_header_extensions_are_bounded(tmp_path, extension):
    """nibabel reads each extension whole, whatever size it claims: a 2 GiB claim in a small file is refused."""
    opener = gzip.compress if extension == ".nii.gz" else bytes
    bomb = bytearray(nifti_bytes((8, 8, 8), data=bytes(2048), vox_offset=368))
    bomb[348] = 1  # extensions follow
    bomb[352:360] = np.array([2**31 - 16, 4], "<i4").tobytes()
    (tmp_path / f"ext{extension}").write_bytes(opener(bytes(bomb)))
    with pytest.raises(InputImageError, match=r"header extension of 2,147,483,632 bytes at byte 352, which does not "
                                              r"fit before its data at byte 368"):
        read_image(tmp_path / f"ext{extension}")
    far = nifti_bytes((8, 8, 8), vox_offset=2.0**40)
    (tmp_path / f"far{extension}").write_bytes(opener(far))
    with pytest.raises(InputImageError, match=r"puts its data 1,099,511,627,776 bytes into the file"):
        read_image(tmp_path / f"far{extension}")


def test_the_voxel_limit_is_configurable_and_checked(tmp_path, monkeypatch):
    path = volume_nifti(tmp_path / "small.nii.gz")
    monkeypatch.setenv(MAX_VOXELS_VARIABLE, "1000")
    with pytest.raises(InputImageError, match=r"24 x 22 x 20 = 10,560 voxels, more than the 1,000"):
        read_image(path)
    monkeypatch.setenv(MAX_VOXELS_VARIABLE, "lots")
    with pytest.raises(InputImageError, match="not a positive whole number"):
        read_image(path)
    monkeypatch.setenv(MAX_VOXELS_VARIABLE, "10560")
    assert read_image(path).GetSize() == (24, 22, 20)


def _metaimage(folder: Path, data: bytes, element="MET_SHORT", name="case", **fields) -> Path:
    lines = {"ObjectType": "Image", "NDims": "3", "DimSize": "10 10 10", "ElementType": element,
             "ElementSpacing": "1 1 1", "Offset": "0 0 0", "TransformMatrix": "1 0 0 0 1 0 0 0 1", **fields,
             "ElementDataFile": f"{name}.raw"}
    (folder / f"{name}.mhd").write_text("".join(f"{k} = {v}\n" for k, v in lines.items()))
    (folder / f"{name}.raw").write_bytes(data)
    return folder / f"{name}.mhd"


def test_metaimage_data_files_are_checked_against_the_header(tmp_path):
    short = _metaimage(tmp_path, b"\1" * 10)
    with pytest.raises(InputImageError, match=r"data file .*case.raw holds 10 bytes of image data, but the header "
                                              r".*case.mhd declares 2,000"):
        read_image(short)
    short.with_suffix(".raw").unlink()
    with pytest.raises(InputImageError, match=r"data file .*case.raw that .*case.mhd names cannot be opened "
                                              r"\(No such file or directory\)"):
        read_image(short)
    full = _metaimage(tmp_path, np.arange(1000, dtype="<i2").tobytes(), name="full")
    assert read_image(full).GetSize() == (10, 10, 10)
    local = tmp_path / "local.mha"
    local.write_bytes(full.read_bytes().replace(b"full.raw", b"LOCAL") + b"\0" * 1999)
    with pytest.raises(InputImageError, match=r"local.mha holds 1,999 bytes of image data"):
        read_image(local)


@posix_only
def test_metaimage_slice_lists_are_checked_file_by_file(tmp_path):
    volume = (np.arange(400) % 17).astype("<i2").reshape(4, 10, 10)
    for index in range(4):
        (tmp_path / f"s{index}.raw").write_bytes(volume[index].tobytes())
    (tmp_path / "list.mhd").write_text("ObjectType = Image\nNDims = 3\nDimSize = 10 10 4\nElementType = MET_SHORT\n"
                                       "ElementDataFile = LIST 2D\ns0.raw\ns1.raw\ns2.raw\ns3.raw\n")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(tmp_path / "list.mhd")), volume)
    (tmp_path / "s2.raw").write_bytes(b"12")
    with pytest.raises(InputImageError, match=r"the 4 data files \(.*s0.raw, ...\) hold 602 bytes of image data, "
                                              r"but the header .*list.mhd declares 800"):
        read_image(tmp_path / "list.mhd")
    (tmp_path / "s2.raw").unlink()
    os.mkfifo(tmp_path / "s2.raw")
    with pytest.raises(InputImageError, match=r"data file .*s2.raw that .*list.mhd names is not a regular file"):
        read_image(tmp_path / "list.mhd")


def test_a_data_file_pattern_naming_billions_of_files_is_refused(tmp_path):
    (tmp_path / "pattern.mhd").write_text("ObjectType = Image\nNDims = 3\nDimSize = 10 10 4\nElementType = MET_SHORT\n"
                                          "ElementDataFile = s%09d.raw 0 999999999 1 2\n")
    with pytest.raises(InputImageError, match=r"names 1,000,000,000 data files, more than its size 10 x 10 x 4"):
        read_image(tmp_path / "pattern.mhd")


def test_a_misnamed_uncompressed_nifti_is_told_to_be_renamed(tmp_path):
    volume_nifti(tmp_path / "plain.nii").rename(tmp_path / "plain.nii.gz")
    with pytest.raises(InputImageError, match=r"plain.nii.gz is named .nii.gz but is not gzip-compressed; rename it "
                                              r"\(e.g. to .nii\)"):
        read_image(tmp_path / "plain.nii.gz")


def test_compressed_metaimage_and_nrrd_data_are_inflated_and_counted(tmp_path):
    image = sitk.GetImageFromArray(smooth_volume())
    for extension in (".mha", ".nrrd"):
        path = tmp_path / f"case{extension}"
        sitk.WriteImage(image, str(path), useCompression=True)
        assert read_image(path).GetSize() == (24, 22, 20)
        cut = tmp_path / f"cut{extension}"
        cut.write_bytes(path.read_bytes()[:-2000])
        with pytest.raises(InputImageError, match=r"cut\.(mha|nrrd) holds [\d,]+ bytes of image data|damaged"):
            read_image(cut)


# -------------------------------------------------------------------------- decoder failures: one error line
@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_a_truncated_nifti_gz_is_one_error_line(tmp_path, dtype):
    """ITK reads a truncated .nii.gz without complaint, zero-filling the rest (and nibabel's check raised an
    EOFError traceback for float data)."""
    full = volume_nifti(tmp_path / "full.nii.gz", dtype)
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    result = run_limited("segment", str(cut), "--output-dir", str(tmp_path / "out"))
    assert_one_error(result, r"cut.nii.gz holds [\d,]+ bytes of image data, but the header .* declares "
                             r"[\d,]+ .*truncated", tmp_path / "out")


def test_damaged_compressed_data_is_refused(tmp_path):
    full = volume_nifti(tmp_path / "full.nii.gz")
    data = bytearray(full.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64
    (tmp_path / "damaged.nii.gz").write_bytes(bytes(data))
    with pytest.raises(InputImageError, match="compressed data is damaged"):
        read_image(tmp_path / "damaged.nii.gz")


# ------------------------------------------------------------------------- geometry: finite, unsheared, every reader
def test_a_nan_sform_with_the_qform_off_is_refused(tmp_path):
    image = nib.Nifti1Image(smooth_volume().transpose(2, 1, 0), np.eye(4))
    affine = np.eye(4)
    affine[0, 3] = np.nan
    image.set_sform(affine, code=1)
    image.set_qform(None, code=0)
    nib.save(image, str(tmp_path / "nan.nii.gz"))
    result = run_limited("segment", str(tmp_path / "nan.nii.gz"), "--output-dir", str(tmp_path / "out"))
    assert_one_error(result, r"nan.nii.gz has a non-finite \(NaN/Inf\) sform", tmp_path / "out")


def test_a_nifti_whose_sform_and_qform_disagree_is_refused(tmp_path):
    # ITK (and so Slicer) reads this qform, nibabel and FSL the sform: 10 mm apart, so no output can be right.
    image = nib.Nifti1Image(smooth_volume().transpose(2, 1, 0), np.eye(4))
    shifted = np.eye(4)
    shifted[0, 3] = 10.0
    image.set_sform(shifted, code=2)
    image.set_qform(np.eye(4), code=1)
    nib.save(image, str(tmp_path / "two.nii.gz"))
    result = run_limited("segment", str(tmp_path / "two.nii.gz"), "--output-dir", str(tmp_path / "out"))
    assert_one_error(result, r"two.nii.gz has two voxel-to-world transforms .* 10 mm apart.*copysform2qform",
                     tmp_path / "out")
    image.set_qform(shifted, code=1)  # the same transform twice (as most writers store it): read as usual
    nib.save(image, str(tmp_path / "agree.nii.gz"))
    assert read_image(tmp_path / "agree.nii.gz").GetOrigin()[0] == pytest.approx(-10.0)


def _sheared(path: Path, shear: float) -> Path:
    """``path``'s image with the y axis tilted ``shear`` (tangent) towards x, written by ITK (which keeps it)."""
    image = sitk.GetImageFromArray(smooth_volume())
    image.SetSpacing((0.8, 0.9, 1.5))
    direction = np.array([[1.0, shear, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    image.SetDirection((direction / np.linalg.norm(direction, axis=0)).ravel().tolist())
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize("extension", [".mha", ".mhd", ".nrrd", ".nhdr"])
def test_sheared_metaimage_and_nrrd_are_refused_like_sheared_nifti(tmp_path, extension):
    with pytest.raises(InputImageError, match="sheared voxel grid.*resample it onto an unsheared grid"):
        read_image(_sheared(tmp_path / f"shear{extension}", 0.3))
    nearly = read_image(_sheared(tmp_path / f"nearly{extension}", 1e-6))  # rounding level: absorbed, exact
    direction = np.array(nearly.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(direction @ direction.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(direction, np.eye(3), atol=1e-5)


@pytest.mark.parametrize("field, value, message", [
    ("Offset", "nan 0 0", r"non-finite \(NaN/Inf\) origin"),
    ("TransformMatrix", "1 0 0 0 inf 0 0 0 1", r"non-finite \(NaN/Inf\) direction"),
    ("ElementSpacing", "1 nan 1", r"non-finite \(NaN/Inf\) voxel spacing"),
    ("ElementSpacing", "1 0 1", r"zero or negative voxel spacing"),
    ("ElementSpacing", "1 -1 1", r"zero or negative voxel spacing"),
])
def test_non_finite_or_non_positive_metaimage_geometry_is_refused(tmp_path, field, value, message):
    """ITK itself reads a NaN Offset as 0 and a negative spacing as a flipped axis, without a word."""
    path = _metaimage(tmp_path, np.arange(1000, dtype="<i2").tobytes(), **{field: value})
    with pytest.raises(InputImageError, match=message):
        read_image(path)


@pytest.mark.parametrize("line, message", [
    (b"space origin: (nan,0,0)", r"non-finite \(NaN/Inf\) origin"),
    (b"space directions: (1,0,0) (0,inf,0) (0,0,1)", r"non-finite \(NaN/Inf\) direction"),
])
def test_non_finite_nrrd_geometry_is_refused(tmp_path, line, message):
    path = tmp_path / "case.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(smooth_volume()), str(path))
    key = line.split(b":")[0]
    data = path.read_bytes()
    start = data.index(key)
    path.write_bytes(data[:start] + line + data[data.index(b"\n", start):])
    with pytest.raises(InputImageError, match=message):
        read_image(path)


# ------------------------------------------------------------------------------------- intensities and scaling
def test_header_scaling_that_overflows_is_reported_as_the_headers_scaling(tmp_path):
    path = volume_nifti(tmp_path / "scaled.nii.gz", np.int16, scl_slope=1e38, scl_inter=0.0)
    with pytest.raises(InputImageError, match=r"header's intensity scaling \(scl_slope=1e\+38, scl_inter=0\) "
                                              r"overflows the float32 range in \d+ voxels"):
        read_image(path)
    volume_nifti(tmp_path / "inf.nii.gz", np.int16, scl_slope=np.inf)
    with pytest.raises(InputImageError, match=r"non-finite intensity scaling in its header \(scl_slope=inf"):
        read_image(tmp_path / "inf.nii.gz")


def test_the_nibabel_reader_scales_like_itk_in_float32(tmp_path):
    from AttentionUNetSegmentLib.fileio.imageio import _read_with_nibabel

    nifti = nib.Nifti1Image(smooth_volume().astype(np.int16).transpose(2, 1, 0), np.diag([1.0, 1.0, 2.0, 1.0]))
    nifti.header.set_slope_inter(2.0, 1.0)
    nib.save(nifti, str(tmp_path / "scaled.nii.gz"))
    fallback = _read_with_nibabel(tmp_path / "scaled.nii.gz", None)
    assert fallback.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(fallback),
                                  sitk.GetArrayFromImage(read_image(tmp_path / "scaled.nii.gz")))


@pytest.mark.parametrize("normalization", [{"scheme": "zscore"}, {"scheme": "zscore", "nonzero": True}])
def test_zscore_is_scale_invariant_up_to_the_float32_limit(normalization):
    """The float32 variance of 1e37-scale intensities overflowed (std = inf): the network got all zeros."""
    volume = smooth_volume()
    expected = normalize(volume, normalization)
    assert abs(float(expected.std()) - 1.0) < 1e-3
    for scale in (1e34, 1e-20):
        np.testing.assert_allclose(normalize(volume * np.float32(scale), normalization), expected, atol=1e-5)


def test_ct_normalization_of_extreme_intensities_stays_finite():
    """``x - mean`` overflowed float32 here (1e38 + 3e38) although the normalised value is about 4."""
    volume = smooth_volume()
    out = normalize(volume * np.float32(1e36), {"scheme": "ct", "clip": [-3e38, 3e38], "mean": -3e38, "std": 1e38})
    np.testing.assert_allclose(out, volume / 100 + 3, rtol=1e-5)


def test_a_1e37_scaled_image_segments_like_the_original(tiny_bundle, tmp_path):
    volume = smooth_volume((34, 36, 38))
    for name, scale in (("plain", 1.0), ("scaled", 1e35)):
        sitk.WriteImage(sitk.GetImageFromArray(volume * np.float32(scale)), str(tmp_path / f"{name}.nrrd"))
    assert cli.main(["segment", str(tmp_path / "plain.nrrd"), str(tmp_path / "scaled.nrrd"), "--output-dir",
                     str(tmp_path / "out"), "--model", str(tiny_bundle.path), "--device", "cpu", "--no-attention",
                     "--progress", "none"]) == 0
    plain, scaled = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / f"{n}_seg.nii.gz")))
                     for n in ("plain", "scaled"))
    assert len(np.unique(plain)) > 1  # the comparison means something
    np.testing.assert_array_equal(scaled, plain)


# ----------------------------------------------------------------------------------------------- ROI and JSON
def test_negative_roi_numbers_in_scientific_notation_are_accepted(tiny_bundle, tmp_path):
    image = sitk.GetImageFromArray(smooth_volume((34, 36, 38)))
    image.SetOrigin((-10.0, -10.0, -10.0))
    sitk.WriteImage(image, str(tmp_path / "case.nrrd"))
    result = subprocess.run([sys.executable, "-m", "AttentionUNetSegmentLib", "segment", str(tmp_path / "case.nrrd"),
                             "--output-dir", str(tmp_path / "out"), "--model", str(tiny_bundle.path), "--device",
                             "cpu", "--no-attention", "--progress", "none",
                             "--roi", "-1e3", "1e3", "-50", "50", "-2E+1", "2.5e1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "case_report.json").read_text())
    assert report["parameters"]["roi"] == [-1000.0, 1000.0, -50.0, 50.0, -20.0, 25.0]


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("[" * 100000 + "]" * 100000), "nests too deeply"),
    (lambda p: p.mkdir(), "not a regular file"),
    pytest.param(lambda p: os.mkfifo(p), "not a regular file", marks=posix_only),
    (lambda p: p.write_bytes(b"\xff\xfe{}"), "not UTF-8"),
    (lambda p: p.write_text('{"markups": [{"type": "ROI", "center": [1, 2], "size": [1, 1, 1]}]}'),
     "not a readable Slicer Markups ROI file"),
])
def test_bad_roi_files_are_one_error_line(tmp_path, capsys, make, message):
    make(tmp_path / "roi.mrk.json")
    image = tmp_path / "case.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(smooth_volume()), str(image))
    assert cli.main(["segment", str(image), "--output-dir", str(tmp_path / "out"), "--roi",
                     str(tmp_path / "roi.mrk.json")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: --roi") and message in error[0], error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("{" + '"a":{' * 100000 + "}" * 100001), "nests too deeply"),
    (lambda p: p.mkdir(), "not a regular file"),
    (lambda p: p.write_text("{'labels': 1}"), "not valid JSON"),
])
def test_bad_dataset_listings_are_dataset_errors(tmp_path, make, message):
    make(tmp_path / "dataset.json")
    with pytest.raises(DatasetError, match=message):
        load_dataset(tmp_path)


def test_dataset_images_and_labels_go_through_the_reader_checks(tmp_path):
    for index in range(2):
        (tmp_path / "imagesTr").mkdir(exist_ok=True)
        (tmp_path / "labelsTr").mkdir(exist_ok=True)
        volume_nifti(tmp_path / "imagesTr" / f"case{index}.nii.gz")
        label = (smooth_volume() > 50).astype(np.uint8).transpose(2, 1, 0)
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(tmp_path / "labelsTr" / f"case{index}.nii.gz"))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "Blob"}, "training": [
        {"image": f"./imagesTr/case{i}.nii.gz", "label": f"./labelsTr/case{i}.nii.gz"} for i in range(2)]}))
    assert len(inspect_dataset(load_dataset(tmp_path)).cases) == 2
    (tmp_path / "labelsTr" / "case1.nii.gz").write_bytes(gzip.compress(nifti_bytes((1300, 1300, 1300), np.uint8)))
    with pytest.raises(DatasetError, match=r"case case1: label file .*case1.nii.gz is unusable: .*declares size "
                                           r"1300 x 1300 x 1300"):
        inspect_dataset(load_dataset(tmp_path))


@posix_only
def test_a_pairs_csv_that_is_not_a_regular_file_is_refused(tmp_path):
    os.mkfifo(tmp_path / "pairs.csv")
    with pytest.raises(DatasetError, match="not a regular file"):
        load_dataset(tmp_path / "pairs.csv", {1: "Blob"})


def test_evaluation_references_go_through_the_reader_checks(tmp_path):
    from AttentionUNetSegmentLib.evaluation.evaluate import EvaluationCase, evaluate

    (tmp_path / "case.nii.gz").write_bytes(gzip.compress(nifti_bytes((1300, 1300, 1300), np.uint8)))
    with pytest.raises(DatasetError, match=r"case case: .*case.nii.gz declares size 1300 x 1300 x 1300"):
        evaluate([EvaluationCase("case", tmp_path / "case.nii.gz")], {1: "Blob"}, predictions=tmp_path)


# ------------------------------------------------------------------------------------------- FreeSurfer .mgz
def _ras_affine(image: sitk.Image) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = LPS_FROM_RAS @ np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    affine[:3, 3] = LPS_FROM_RAS @ np.array(image.GetOrigin())
    return affine


def _oblique_affine() -> np.ndarray:
    angle = np.deg2rad(15.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.0, 1.1, 0.9])
    affine[:3, 3] = (-17.0, 22.5, 4.0)
    return affine


@pytest.mark.parametrize("extension", [".mgz", ".mgh"])
def test_freesurfer_volumes_read_with_full_geometry(tmp_path, extension):
    data = smooth_volume().transpose(2, 1, 0)
    nib.save(nib.MGHImage(data, _oblique_affine()), str(tmp_path / f"brain{extension}"))
    image = read_image(tmp_path / f"brain{extension}")
    assert image.GetSize() == data.shape
    np.testing.assert_allclose(_ras_affine(image), nib.load(str(tmp_path / f"brain{extension}")).affine, atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image).transpose(2, 1, 0), data)
    assert read_label(tmp_path / f"brain{extension}").GetSize() == data.shape


def test_freesurfer_headers_are_checked_like_any_other(tmp_path):
    nib.save(nib.MGHImage(smooth_volume().transpose(2, 1, 0), _oblique_affine()), str(tmp_path / "brain.mgz"))
    raw = gzip.decompress((tmp_path / "brain.mgz").read_bytes())
    (tmp_path / "cut.mgz").write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(InputImageError, match=r"cut.mgz holds [\d,]+ bytes of image data"):
        read_image(tmp_path / "cut.mgz")
    huge = raw[:4] + np.array([2000, 2000, 2000, 1], ">i4").tobytes() + raw[20:284]
    (tmp_path / "huge.mgz").write_bytes(gzip.compress(huge))
    with pytest.raises(InputImageError, match=r"declares size 2000 x 2000 x 2000"):
        read_image(tmp_path / "huge.mgz")


def test_an_mgz_segments_onto_its_own_grid(tiny_bundle, tmp_path, capsys):
    data = smooth_volume((34, 36, 38)).transpose(2, 1, 0)
    nib.save(nib.MGHImage(data, _oblique_affine()), str(tmp_path / "brain.mgz"))
    assert cli.main(["segment", str(tmp_path / "brain.mgz"), "--output-dir", str(tmp_path / "out"), "--model",
                     str(tiny_bundle.path), "--device", "cpu", "--no-attention", "--progress", "none"]) == 0
    labels = nib.load(str(tmp_path / "out" / "brain_seg.nii.gz"))
    assert labels.shape == data.shape
    np.testing.assert_allclose(labels.affine, _oblique_affine(), atol=1e-4)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "brain_report.json", "brain_seg.nii.gz", "brain_seg.seg.nrrd"]
