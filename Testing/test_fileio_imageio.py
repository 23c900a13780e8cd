"""Image I/O: geometry round trips (SimpleITK and nibabel), validation of bad inputs, atomic writes."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from AttentionUNetSegmentLib.errors import InputImageError, OutputExistsError
from AttentionUNetSegmentLib.fileio.atomic import atomic_output
from AttentionUNetSegmentLib.fileio.imageio import (
    LPS_FROM_RAS,
    _read_with_nibabel,
    image_stem,
    read_image,
    write_image,
)

SPACING = (0.7, 0.9, 2.5)
ORIGIN = (12.5, -30.25, 47.0)


def oblique_image(size=(20, 16, 12), pixel_type=sitk.sitkFloat32) -> sitk.Image:
    """A non-constant volume rotated 20 degrees about z (and 7 about x) with anisotropic spacing."""
    rotation = sitk.Euler3DTransform()
    rotation.SetRotation(np.deg2rad(7.0), 0.0, np.deg2rad(20.0))
    array = np.arange(np.prod(size), dtype=np.float32).reshape(size[::-1]) % 97
    image = sitk.Cast(sitk.GetImageFromArray(array), pixel_type)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(rotation.GetMatrix())
    return image


def ras_affine(image: sitk.Image) -> np.ndarray:
    """The nibabel (RAS) affine equivalent to an ITK (LPS) image's geometry."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = LPS_FROM_RAS @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = LPS_FROM_RAS @ np.array(image.GetOrigin())
    return affine


def assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-5)


@pytest.mark.parametrize("extension", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_oblique_anisotropic_round_trip_keeps_geometry_and_voxels(tmp_path, extension):
    image = oblique_image()
    path = write_image(image, tmp_path / f"case{extension}")
    back = read_image(path)
    assert_same_geometry(image, back)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    assert os.listdir(tmp_path) == [path.name]  # no partial file left behind


@pytest.mark.parametrize("extension", [".nhdr", ".mhd"])
def test_detached_header_formats_read_with_full_geometry(tmp_path, extension):
    """Header + separate data file (NRRD .nhdr/.raw, MetaImage .mhd/.raw), as written by SimpleITK itself."""
    image = oblique_image()
    path = tmp_path / f"case{extension}"
    sitk.WriteImage(image, str(path))
    assert len(os.listdir(tmp_path)) == 2  # the header and its data file
    back = read_image(path)
    assert_same_geometry(image, back)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_written_nifti_has_the_right_affine_for_nibabel(tmp_path):
    image = oblique_image()
    path = write_image(image, tmp_path / "case.nii.gz")
    loaded = nib.load(str(path))
    np.testing.assert_allclose(loaded.affine, ras_affine(image), atol=1e-4)
    # nibabel's array is (x, y, z); SimpleITK's is (z, y, x).
    np.testing.assert_array_equal(np.asarray(loaded.dataobj).transpose(2, 1, 0), sitk.GetArrayFromImage(image))


def test_nibabel_written_oblique_volume_reads_with_full_geometry(tmp_path):
    expected = oblique_image()
    data = sitk.GetArrayFromImage(expected).transpose(2, 1, 0)
    nib.save(nib.Nifti1Image(data, ras_affine(expected)), str(tmp_path / "nib.nii.gz"))
    # Both readers of the engine agree with the geometry nibabel was given.
    assert_same_geometry(expected, read_image(tmp_path / "nib.nii.gz"))
    fallback = _read_with_nibabel(tmp_path / "nib.nii.gz", RuntimeError("not used"))
    assert_same_geometry(expected, fallback)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(fallback), sitk.GetArrayFromImage(expected))


def test_a_sheared_nifti_is_refused_with_how_to_fix_it(tmp_path):
    """ITK refuses a sheared affine; approximating it would misplace every output, so the reader says so."""
    sheared = np.array([[0.7, 0.2, 0.0, 5.0], [0.0, 0.9, 0.0, 6.0], [0.0, 0.0, 2.5, 7.0], [0, 0, 0, 1.0]])
    data = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, sheared), str(tmp_path / "shear.nii.gz"))
    with pytest.raises(RuntimeError):
        sitk.ReadImage(str(tmp_path / "shear.nii.gz"))
    with pytest.raises(InputImageError, match="sheared voxel grid.*resample it onto an unsheared grid"):
        read_image(tmp_path / "shear.nii.gz")


def test_rounding_level_shear_is_absorbed_by_the_nibabel_reader(tmp_path):
    affine = np.array([[0.7, 1e-5, 0.0, 5.0], [0.0, 0.9, 0.0, 6.0], [0.0, 0.0, 2.5, 7.0], [0, 0, 0, 1.0]])
    data = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "nearly.nii.gz"))
    image = _read_with_nibabel(tmp_path / "nearly.nii.gz", RuntimeError("not used"))
    assert image.GetSize() == (6, 7, 8)
    np.testing.assert_allclose(image.GetOrigin(), (-5.0, -6.0, 7.0))
    np.testing.assert_allclose(ras_affine(image), affine, atol=1e-4)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(direction @ direction.T, np.eye(3), atol=1e-12)


@pytest.mark.shared_data
def test_real_msd_case_reads_the_same_as_nibabel(hippocampus_dir):
    path = sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))[0]
    image = read_image(path)
    loaded = nib.load(str(path))
    np.testing.assert_allclose(ras_affine(image), loaded.affine, atol=1e-4)
    assert image.GetSize() == loaded.shape[:3]


def test_float64_is_narrowed_to_float32(tmp_path):
    path = write_image(oblique_image(pixel_type=sitk.sitkFloat64), tmp_path / "f64.nrrd")
    assert read_image(path).GetPixelID() == sitk.sitkFloat32


def test_4d_file_with_a_single_volume_is_read_as_3d(tmp_path):
    sitk.WriteImage(sitk.JoinSeries(oblique_image()), str(tmp_path / "single.nii.gz"))
    assert read_image(tmp_path / "single.nii.gz").GetDimension() == 3


def _write(image: sitk.Image, path) -> str:
    sitk.WriteImage(image, str(path))
    return str(path)


def _bytes(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _with_voxel(value: float, suffix: str = ".nrrd"):
    def make(path):
        array = sitk.GetArrayFromImage(oblique_image())
        array[3, 4, 5] = value
        return _write(sitk.GetImageFromArray(array), path / f"bad{suffix}")

    return make


BAD_INPUTS = {
    "missing": (lambda p: str(p / "nope.nii.gz"), "does not exist"),
    "directory": (lambda p: str(p), "not a file"),
    "zero bytes": (lambda p: _bytes(p / "zero.nii.gz", b""), "empty file"),
    "corrupt": (lambda p: _bytes(p / "junk.nii.gz", b"\x1f\x8b junk" * 50), "cannot read"),
    "truncated": (lambda p: _bytes(p / "cut.nrrd", b"NRRD0004\ntype: float\ndimension: 3\nsizes: 9 9 9\n"
                                                   b"encoding: raw\n\n\x00\x00"), "holds 2 bytes of image data"),
    "2d": (lambda p: _write(sitk.Image([8, 9], sitk.sitkFloat32) + sitk.GaussianSource(sitk.sitkFloat32, [8, 9]),
                            p / "flat.nrrd"), "2D image"),
    "single slice": (lambda p: _write(sitk.GaussianSource(sitk.sitkFloat32, [8, 9, 1]), p / "slice.nrrd"),
                     "single slice"),
    "4d": (lambda p: _write(sitk.JoinSeries([oblique_image(), oblique_image()]), p / "series.nii.gz"), "4D image"),
    "rgb": (lambda p: _write(sitk.Compose([sitk.Cast(oblique_image(), sitk.sitkUInt8)] * 3), p / "rgb.nrrd"),
            "RGB/vector"),
    "nan": (_with_voxel(float("nan")), "NaN/Inf"),
    "inf": (_with_voxel(float("inf")), "NaN/Inf"),
    # ITK's NIfTI reader turns NaN into 0 on its own; the engine must still refuse such a file.
    "nan nifti": (_with_voxel(float("nan"), ".nii.gz"), "NaN/Inf"),
    "constant": (lambda p: _write(sitk.Image([8, 9, 10], sitk.sitkInt16) + 7, p / "const.nrrd"), "constant"),
    "no voxels": (lambda p: nib.save(nib.Nifti1Image(np.zeros((0, 4, 4), np.float32), np.eye(4)),
                                     str(p / "empty.nii.gz")) or str(p / "empty.nii.gz"), "no voxels"),
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_inputs_get_a_clear_error(tmp_path, kind):
    make, message = BAD_INPUTS[kind]
    path = make(tmp_path)
    with pytest.raises(InputImageError, match=message) as raised:
        read_image(path)
    assert str(tmp_path) in str(raised.value)  # the message names the file


def test_write_refuses_to_overwrite_unless_forced(tmp_path):
    first = write_image(oblique_image(), tmp_path / "out.nrrd")
    with pytest.raises(OutputExistsError, match="--force"):
        write_image(oblique_image(size=(6, 6, 6)), first)
    assert read_image(first).GetSize() == (20, 16, 12)
    write_image(oblique_image(size=(6, 6, 6)), first, force=True)
    assert read_image(first).GetSize() == (6, 6, 6)


def test_failed_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as partial:
            sitk.WriteImage(oblique_image(), str(partial))
            raise RuntimeError("simulated failure after writing")
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="use one of"):
        write_image(oblique_image(), tmp_path / "out.mhd")


@pytest.mark.parametrize(
    "name, stem",
    [("/d/case_01.nii.gz", "case_01"), ("a.b.nii", "a.b"), ("x.NRRD", "x"), ("v.nhdr", "v"), ("m.mha", "m"),
     ("h.mhd", "h"), ("plain", "plain")],
)
def test_image_stem(name, stem):
    assert image_stem(name) == stem


@pytest.mark.parametrize("extension", [".nii.gz", ".nii"])
@pytest.mark.parametrize("version", [1, 2])
def test_a_truncated_nifti_is_caught(tmp_path, extension, version):
    """ITK's NIfTI writer leaves a short file without an error when the disk fills up; the check catches it (NIfTI-1
    as ITK writes it; NIfTI-2, as other writers make it, is read too)."""
    from AttentionUNetSegmentLib.fileio.imageio import check_written_image

    data = np.random.default_rng(0).random((12, 10, 8)).astype(np.float32)
    path = tmp_path / f"full{extension}"
    image_class = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    nib.save(image_class(data, np.diag([0.8, 0.9, 2.0, 1.0])), str(path))
    check_written_image(path, path)  # complete: no error
    data = path.read_bytes()
    for cut in (200, len(data) // 2, len(data) - 1):
        truncated = tmp_path / f"cut{extension}"
        truncated.write_bytes(data[:cut])
        with pytest.raises(OSError, match="cannot write"):
            check_written_image(truncated, truncated)


def test_nan_in_a_scaled_float_nifti_is_found(tmp_path):
    data = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)
    data[2, 3, 4] = np.nan
    nifti = nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0]))
    nifti.header.set_slope_inter(2.0, 1.0)  # the stored floats are scaled on reading
    nib.save(nifti, str(tmp_path / "scaled.nii.gz"))
    with pytest.raises(InputImageError, match="1 NaN/Inf voxels"):
        read_image(tmp_path / "scaled.nii.gz")
