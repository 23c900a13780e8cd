"""Preprocessing: spec validation, reorientation, resampling, normalisation, ROI boxes."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from AttentionUNetSegmentLib.errors import InputImageError, ModelBundleError
from AttentionUNetSegmentLib.fileio.imageio import read_image
from AttentionUNetSegmentLib.preprocessing.preprocess import (
    PreprocessingSpec,
    crop_to_roi,
    normalize,
    orientation_of,
    preprocess,
    ras_box_to_index_box,
    reorient,
    resample_to_reference,
    resample_to_spacing,
)
from test_fileio_imageio import oblique_image


def linear_ramp(image: sitk.Image) -> sitk.Image:
    """An image whose voxel value is a linear function of its world position (linear resampling is exact)."""
    size = image.GetSize()
    ramp = np.zeros(size[::-1], dtype=np.float32)
    for index in np.ndindex(*size):
        x, y, z = image.TransformIndexToPhysicalPoint(index)
        ramp[index[::-1]] = 0.5 * x - 0.25 * y + 2.0 * z
    out = sitk.GetImageFromArray(ramp)
    out.CopyInformation(image)
    return out


def value_at(image: sitk.Image, point) -> float:
    return float(image[image.TransformPhysicalPointToIndex(point)])


def test_spec_round_trips_through_dict():
    spec = PreprocessingSpec.from_dict(
        {"orientation": "lps", "target_spacing": [0.5, 0.75, 2],
         "normalization": {"scheme": "ct", "clip": [-100, 300], "mean": 40, "std": 80}}
    )
    assert spec.orientation == "LPS" and spec.target_spacing == (0.5, 0.75, 2.0)
    assert PreprocessingSpec.from_dict(spec.to_dict()) == spec
    assert PreprocessingSpec.from_dict({}).to_dict() == {
        "orientation": "RAS", "target_spacing": [1.0, 1.0, 1.0], "normalization": {"scheme": "zscore"}}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"orientation": "RAR"}, "orientation"),
        ({"orientation": "RA"}, "orientation"),
        ({"target_spacing": [1, 1]}, "target_spacing"),
        ({"target_spacing": [1, 0, 1]}, "target_spacing"),
        ({"target_spacing": "1mm"}, "target_spacing"),
        ({"normalization": {"scheme": "minmax"}}, "scheme"),
        ({"normalization": {"scheme": "zscore", "clip": [0, 1]}}, "nonzero"),
        ({"normalization": {"scheme": "ct", "clip": [300, -100], "mean": 0, "std": 1}}, "clip"),
        ({"normalization": {"scheme": "ct", "clip": [-100, 300], "mean": 0, "std": 0}}, "std"),
        ({"normalization": {"scheme": "ct", "clip": [-100, 300], "mean": 0}}, "std"),
        ({"spacing": [1, 1, 1]}, "unknown keys"),
        ([1, 2, 3], "must be an object"),
    ],
)
def test_malformed_spec_is_a_bundle_error(bad, message):
    with pytest.raises(ModelBundleError, match=message):
        PreprocessingSpec.from_dict(bad)


@pytest.mark.shared_data
def test_real_case_reorients_by_permuting_voxels_only(hippocampus_dir):
    image = read_image(sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))[0])
    assert orientation_of(image) == "RAS"
    assert reorient(image, "RAS") is image
    for code in ("LPS", "SAR", "ILP"):
        turned = reorient(image, code)
        assert orientation_of(turned) == code
        assert sorted(turned.GetSize()) == sorted(image.GetSize())
        np.testing.assert_array_equal(np.sort(sitk.GetArrayViewFromImage(turned), axis=None),
                                      np.sort(sitk.GetArrayViewFromImage(image), axis=None))
        # Every voxel keeps its world position: same value at the same physical point.
        size = image.GetSize()
        for index in [(0, 0, 0), (size[0] - 1, 3, 7), (5, size[1] - 1, size[2] - 1), (11, 17, 13)]:
            point = image.TransformIndexToPhysicalPoint(index)
            assert value_at(turned, point) == float(image[index])
        back = reorient(turned, "RAS")
        np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-6)
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))


def test_resampling_keeps_extent_centre_and_direction_of_an_oblique_volume():
    image = linear_ramp(oblique_image())
    resampled = resample_to_spacing(image, (1.0, 1.5, 1.25))
    assert resampled.GetPixelID() == sitk.sitkFloat32
    assert resampled.GetSize() == (14, 10, 24)  # round(20*0.7/1), round(16*0.9/1.5), round(12*2.5/1.25)
    assert resampled.GetDirection() == image.GetDirection()

    def centre(img):
        return np.array(img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()]))

    np.testing.assert_allclose(centre(resampled), centre(image), atol=1e-6)
    # Linear interpolation reproduces a linear ramp exactly at interior voxels.
    interior = sitk.GetArrayViewFromImage(resampled)[2:-2, 2:-2, 2:-2]
    expected = sitk.GetArrayViewFromImage(linear_ramp(resampled))[2:-2, 2:-2, 2:-2]
    np.testing.assert_allclose(interior, expected, atol=1e-3)
    assert resample_to_spacing(image, image.GetSpacing()) is image


def test_label_resampling_is_nearest_neighbour_and_keeps_the_type():
    labels = sitk.Modulus(sitk.Cast(oblique_image(), sitk.sitkUInt8), 4)
    resampled = resample_to_spacing(labels, (0.35, 0.45, 1.25), is_label=True)
    assert resampled.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayViewFromImage(resampled))) <= {0, 1, 2, 3}
    # Halving the spacing splits each voxel in two per axis: back on the original grid, nothing changed.
    back = resample_to_reference(resampled, labels, is_label=True)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(labels))


def test_resample_to_reference_fills_outside_with_default():
    image = oblique_image() + 1.0
    shifted = sitk.Image(image)
    shifted.SetOrigin(np.array(image.GetOrigin()) + 1000.0)
    out = resample_to_reference(image, shifted, default=-5.0)
    assert out.GetPixelID() == sitk.sitkFloat32
    assert np.all(sitk.GetArrayViewFromImage(out) == -5.0)


def test_zscore_and_ct_normalisation():
    rng = np.random.default_rng(1)
    array = rng.normal(100.0, 20.0, size=(10, 12, 14)).astype(np.float32)
    z = normalize(array, {"scheme": "zscore"})
    assert z.dtype == np.float32 and abs(z.mean()) < 1e-4 and abs(z.std() - 1) < 1e-4

    array[:, :, :7] = 0
    nonzero = normalize(array, {"scheme": "zscore", "nonzero": True})
    inside = nonzero[:, :, 7:]
    assert abs(inside.mean()) < 1e-4 and abs(inside.std() - 1) < 1e-4

    ct = normalize(np.array([-2000, -100, 0, 300, 5000], dtype=np.int16), {
        "scheme": "ct", "clip": [-100, 300], "mean": 100, "std": 200})
    np.testing.assert_allclose(ct, [-1.0, -1.0, -0.5, 1.0, 1.0])


@pytest.mark.shared_data
def test_preprocess_real_case_at_anisotropic_spacing(hippocampus_dir):
    image = read_image(sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))[0])
    image.SetSpacing((0.7, 0.9, 2.5))
    spec = PreprocessingSpec(orientation="LPS", target_spacing=(1.0, 1.0, 2.0))
    prepared = preprocess(image, spec)
    assert orientation_of(prepared.grid) == "LPS"
    assert prepared.grid.GetSpacing() == (1.0, 1.0, 2.0)
    assert prepared.array.dtype == np.float32
    assert prepared.array.shape == prepared.grid.GetSize()[::-1]
    assert abs(float(prepared.array.mean())) < 1e-3
    wrapped = prepared.image_from_array(prepared.array)
    assert wrapped.GetOrigin() == prepared.grid.GetOrigin()


def axis_aligned(size=(30, 20, 10)) -> sitk.Image:
    """LPS-identity grid, 2 mm voxels, origin (10, 20, 30): RAS of index (i, j, k) is (-10-2i, -20-2j, 30+2k)."""
    image = sitk.GetImageFromArray(np.random.default_rng(0).random(size[::-1]).astype(np.float32))
    image.SetSpacing((2.0, 2.0, 2.0))
    image.SetOrigin((10.0, 20.0, 30.0))
    return image


def test_ras_box_selects_the_voxels_whose_centres_are_inside():
    image = axis_aligned()
    # R from -20 to -14 -> i in 2..5 ; A from -30 to -25 -> j in 5..7 (j=7 at -34 is outside, j=5 at -30 inside)
    start, stop = ras_box_to_index_box(image, (-20, -14, -30, -25, 30, 34))
    assert start == (2, 3, 0) and stop == (6, 6, 3)
    # A box thinner than a voxel still gives one voxel; a box partly outside is clipped.
    assert ras_box_to_index_box(image, (-15.2, -15.1, -30, -30, 40, 40)) == ((3, 5, 5), (4, 6, 6))
    assert ras_box_to_index_box(image, (-1000, 1000, -25, -21, 20, 33)) == ((0, 1, 0), (30, 3, 2))


@pytest.mark.parametrize("roi", [(100, 200, -30, -20, 30, 40), (-20, -14, -30, -25, -100, 0)])
def test_roi_outside_the_image_is_refused(roi):
    with pytest.raises(InputImageError, match="does not overlap"):
        ras_box_to_index_box(axis_aligned(), roi)


def test_malformed_roi_is_refused():
    with pytest.raises(InputImageError, match="six finite numbers"):
        ras_box_to_index_box(axis_aligned(), (1, 0, 0, 1, 0, 1))


def test_crop_keeps_geometry_and_reports_the_roi_inside_the_crop():
    image = axis_aligned()
    cropped, inner_start, inner_stop = crop_to_roi(image, (-20, -14, -30, -25, 30, 34), margin=2)
    assert cropped.GetSize() == (8, 7, 5)  # i 0..7, j 1..7, k 0..4 (clipped at 0)
    assert inner_start == (2, 2, 0) and inner_stop == (6, 5, 3)
    np.testing.assert_allclose(cropped.GetOrigin(), image.TransformIndexToPhysicalPoint((0, 1, 0)))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(cropped),
                                  sitk.GetArrayViewFromImage(image)[0:5, 1:8, 0:8])


def test_central_zscore_is_not_disturbed_by_what_surrounds_the_structure():
    """The same 12 x 16 x 10 mm crop, alone or inside a larger box of skull-bright and air-dark surroundings (at
    0.5 mm in z), normalises to the same values."""
    rng = np.random.default_rng(2)
    crop = rng.normal(300.0, 40.0, size=(20, 16, 12)).astype(np.float32)  # (z, y, x) at 0.5 x 1 x 1 mm
    normalization = {"scheme": "zscore", "central_mm": [12.0, 16.0, 10.0]}
    alone = normalize(crop, normalization, spacing=(1.0, 1.0, 0.5))
    surrounded = np.zeros((40, 36, 30), np.float32)
    surrounded[:, :18] = 900.0
    surrounded[10:30, 10:26, 9:21] = crop
    inside = normalize(surrounded, normalization, spacing=(1.0, 1.0, 0.5))[10:30, 10:26, 9:21]
    np.testing.assert_allclose(inside, alone, atol=1e-5)
    assert abs(alone.mean()) < 1e-4 and abs(alone.std() - 1) < 1e-4
    plain = normalize(surrounded, {"scheme": "zscore"})[10:30, 10:26, 9:21]
    assert abs(float(plain.mean())) > 0.3  # what central statistics avoid
    # A box smaller than the central block uses all of it; bad sizes are refused as bundle errors.
    np.testing.assert_allclose(normalize(crop[:4], normalization, (1.0, 1.0, 0.5)),
                               normalize(crop[:4], {"scheme": "zscore"}), atol=1e-5)
    for bad in ([12.0, 16.0], [0, 1, 1], [1, 1, float("nan")], "12"):
        with pytest.raises(ModelBundleError, match="central_mm"):
            normalize(crop, {"scheme": "zscore", "central_mm": bad})


def test_planned_central_zscore_covers_the_median_field_of_view():
    from AttentionUNetSegmentLib.training.planning import CaseFingerprint, DatasetFingerprint, plan_normalization

    cases = [CaseFingerprint(f"c{i}", (1.0, 1.0, 2.0), (35 + i, 50, 18), {1: 10}, [1.0]) for i in range(3)]
    assert plan_normalization(DatasetFingerprint(cases), "zscore-central") == {
        "scheme": "zscore", "central_mm": [36.0, 50.0, 36.0]}
