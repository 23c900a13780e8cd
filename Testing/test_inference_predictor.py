"""Sliding-window inference and the Predictor: blending, geometry of labels and attention maps, ROI, TTA, cancel."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from AttentionUNetSegmentLib.constants import PRECISIONS
from AttentionUNetSegmentLib.devices import autocast_dtype, resolve_device
from AttentionUNetSegmentLib.errors import AttentionUNetError, CancelledError, InputImageError
from AttentionUNetSegmentLib.fileio.imageio import read_image
from AttentionUNetSegmentLib.inference.predictor import (
    IMPORTANCE_FLOOR,
    ROI_MARGIN_VOXELS,
    Predictor,
    gaussian_importance_map,
    label_dtype,
    mirror_sets,
    sliding_window_inference,
    window_starts,
)
from AttentionUNetSegmentLib.model.network import AttentionUNet
from AttentionUNetSegmentLib.inference.postprocessing import keep_largest_component
from AttentionUNetSegmentLib.preprocessing.preprocess import crop_to_roi, preprocess
from test_fileio_imageio import oblique_image


@pytest.fixture(scope="module")
def model() -> AttentionUNet:
    torch.manual_seed(3)
    return AttentionUNet(in_channels=1, out_channels=3, channels=(4, 8, 16)).eval()


@pytest.fixture(scope="module")
def predictor(tiny_bundle) -> Predictor:
    return Predictor(tiny_bundle, device="cpu")


@pytest.fixture(scope="module")
def hippocampus_image(hippocampus_dir) -> sitk.Image:
    return read_image(sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))[0])


@pytest.fixture(scope="module", params=["synthetic", "msd"])
def one_mm_ras_image(request) -> sitk.Image:
    """A 1 mm RAS volume, the tiny bundle's own grid, so gate voxels are exact blocks of input voxels: a synthetic
    blob volume (always) and a real MSD hippocampus case (when ``../shared`` is present)."""
    if request.param == "msd":
        return request.getfixturevalue("hippocampus_image")
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in (35, 50, 36)], indexing="ij")
    blob = 400 * np.exp(-(i**2 + (1.3 * j) ** 2 + k**2) * 3) + 20 * np.sin(7 * i + 3 * j)
    image = sitk.GetImageFromArray(blob.astype(np.float32))
    image.SetOrigin((13.0, 27.5, -40.0))
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))  # RAS (ITK directions are LPS)
    return image


def continuous_index(image: sitk.Image, point) -> np.ndarray:
    return np.array(image.TransformPhysicalPointToContinuousIndex(tuple(float(p) for p in point)))


def corner_indices(size):
    return list(itertools.product(*[(0, s - 1) for s in size]))


# --- building blocks -------------------------------------------------------------------------------------------


def test_gaussian_importance_map_shape_peak_sigma_floor_and_cache():
    patch = (33, 17, 9)
    weights = gaussian_importance_map(patch, torch.device("cpu"))
    assert weights.shape == patch and weights.dtype == torch.float32
    assert float(weights[16, 8, 4]) == pytest.approx(1.0)
    # sigma = patch / 8 along each axis
    assert float(weights[16 + 4, 8, 4]) == pytest.approx(np.exp(-0.5 * (4 / (33 / 8)) ** 2), rel=1e-5)
    assert float(weights.min()) == pytest.approx(IMPORTANCE_FLOOR)
    assert torch.equal(weights, weights.flip(0, 1, 2))
    assert gaussian_importance_map(patch, torch.device("cpu")) is weights


@pytest.mark.parametrize("size, patch, overlap, align", [(96, 32, 0.5, 8), (40, 32, 0.5, 4), (32, 32, 0.5, 8),
                                                         (208, 48, 0.25, 16), (64, 16, 0.9, 8)])
def test_window_starts_are_aligned_even_and_cover_the_volume(size, patch, overlap, align):
    starts = window_starts(size, patch, overlap, align)
    assert starts[0] == 0 and starts[-1] == size - patch
    assert all(s % align == 0 for s in starts)
    assert all(b > a for a, b in zip(starts, starts[1:]))
    assert all(b - a <= max(align, patch * (1 - overlap)) + align for a, b in zip(starts, starts[1:]))


def test_one_window_equals_a_single_forward_pass(model):
    x = torch.randn(1, 1, 32, 24, 16)
    result = sliding_window_inference(x, model, (32, 24, 16), overlap=0.5)
    with torch.no_grad():
        direct = model.forward_with_aux(x)
    torch.testing.assert_close(result.scores, torch.softmax(direct.logits, 1)[0], atol=1e-5, rtol=1e-5)
    assert len(result.attention) == model.num_gates
    for k, (blended, alpha) in enumerate(zip(result.attention, direct.attention)):
        torch.testing.assert_close(blended, alpha[0, 0], atol=1e-5, rtol=1e-5)
        assert result.attention_start[k] == (0, 0, 0)
    logits = sliding_window_inference(x[0], model, (32, 24, 16), softmax=False, attention=False)
    torch.testing.assert_close(logits.scores, direct.logits[0], atol=1e-4, rtol=1e-4)
    assert logits.attention == []


def test_mirror_tta_averages_the_flipped_predictions_of_the_given_axes(model):
    x = torch.randn(1, 1, 16, 16, 16)
    for axes, flips in ((("x", "y", "z"), [dims for n in range(4) for dims in itertools.combinations((2, 3, 4), n)]),
                        (("x",), [(), (4,)])):
        result = sliding_window_inference(x, model, (16, 16, 16), mirror_axes=axes)
        with torch.no_grad():
            outputs = [model.forward_with_aux(x.flip(dims) if dims else x) for dims in flips]
        expected = torch.stack([torch.softmax(o.logits, 1).flip(dims) for o, dims in zip(outputs, flips)]).mean(0)
        torch.testing.assert_close(result.scores, expected[0], atol=1e-5, rtol=1e-5)
        expected_alpha = torch.stack([o.attention[1].flip(dims) for o, dims in zip(outputs, flips)]).mean(0)
        torch.testing.assert_close(result.attention[1], expected_alpha[0, 0], atol=1e-5, rtol=1e-5)


def test_mirror_axes_are_the_canonical_itk_axes_mapped_to_zyx_tensor_dims():
    assert mirror_sets(()) == [()]
    assert mirror_sets(("x",)) == [(), (4,)]
    assert mirror_sets(("z",)) == [(), (2,)]
    assert mirror_sets(("x", "y")) == [(), (3,), (4,), (3, 4)]
    # ITK's x index axis is the last array axis (GetArrayFromImage is z, y, x), so a flip of the image along ITK x
    # is a flip of tensor dim 4 ...
    ramp = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6))
    flipped_x = sitk.GetArrayFromImage(sitk.Flip(ramp, (True, False, False)))
    tensor = torch.from_numpy(sitk.GetArrayFromImage(ramp))[None, None]
    np.testing.assert_array_equal(flipped_x, tensor.flip(mirror_sets(("x",))[1])[0, 0].numpy())
    # ... and training's "x" flip (augmentation on the same z, y, x arrays) is that same flip.
    from AttentionUNetSegmentLib.training.augmentation import (AugmentationConfig, extract_patch, random_spatial_matrix,
                                                      sampling_grid)

    config = AugmentationConfig(rotation_probability=0.0, scale_probability=0.0, flip_axes=("x",),
                                flip_probability=1.0)
    matrix = random_spatial_matrix(config, np.random.default_rng(0))
    grid = sampling_grid((4, 5, 6), np.array([1.5, 2.0, 2.5]), (4, 5, 6), matrix)
    patch, _ = extract_patch(tensor, torch.zeros_like(tensor), grid)
    np.testing.assert_allclose(patch[0].numpy(), flipped_x, atol=1e-4)


def test_tta_is_refused_for_a_bundle_that_does_not_record_safe_mirror_axes(tiny_bundle, tmp_path):
    from AttentionUNetSegmentLib.model.bundle import create_metadata, save_bundle

    for axes, match in ((None, "does not record which axes"), ((), "trained without mirroring")):
        metadata = create_metadata("old", [label.to_dict() for label in tiny_bundle.labels], tiny_bundle.patch_size,
                                   tiny_bundle.metadata["preprocessing"], mirror_axes=axes)
        bundle = save_bundle(tiny_bundle.build_model(), metadata, tmp_path / f"old-{axes}")
        assert bundle.mirror_axes == axes
        with pytest.raises(AttentionUNetError, match=match):
            Predictor(bundle, device="cpu", tta=True)
        assert Predictor(bundle, device="cpu").mirror_axes == ()  # without TTA nothing changes


def test_many_windows_blend_into_probabilities_and_batching_does_not_change_them(model):
    x = torch.randn(1, 45, 38, 29)
    single = sliding_window_inference(x, model, (16, 16, 16), overlap=0.5, batch_size=1)
    batched = sliding_window_inference(x, model, (16, 16, 16), overlap=0.5, batch_size=5)
    assert single.scores.shape == (3, 45, 38, 29)
    torch.testing.assert_close(single.scores.sum(0), torch.ones(45, 38, 29), atol=1e-5, rtol=0)
    torch.testing.assert_close(single.scores, batched.scores, atol=1e-5, rtol=1e-5)
    # Padded to 48 x 40 x 32 (multiple of 4), centred: 1, 1 and 1 voxels before the data.
    for k, (alpha, start) in enumerate(zip(single.attention, single.attention_start)):
        f = 2**k
        assert float(alpha.min()) >= 0 and float(alpha.max()) <= 1
        assert all(-f < s <= 0 for s in start)
        assert all(s + n * f >= size for s, n, size in zip(start, alpha.shape, (45, 38, 29)))
        assert all(s + (n - 1) * f < size for s, n, size in zip(start, alpha.shape, (45, 38, 29)))


def test_half_precision_accumulator_is_safe(model):
    """The CUDA default (float16 accumulation of probability x weight, as nnU-Net does) stays within a few 1e-3 of
    float32 and gives the same labels almost everywhere."""
    x = torch.randn(1, 40, 36, 28)
    full = sliding_window_inference(x, model, (16, 16, 16), accumulate_dtype=torch.float32, attention=False)
    half = sliding_window_inference(x, model, (16, 16, 16), accumulate_dtype=torch.float16, attention=False)
    assert half.scores.dtype == torch.float32
    error = (half.scores - full.scores).abs()
    assert float(error.max()) < 5e-3 and float(error.mean()) < 5e-4
    agree = (half.scores.argmax(0) == full.scores.argmax(0)).float().mean()
    assert float(agree) > 0.999


def test_label_map_type_fits_every_label_value():
    assert label_dtype([0, 1, 2, 255]) == np.uint8
    assert label_dtype([0, 256]) == np.int16
    assert label_dtype([0, 32767]) == np.int16


def test_precision_choice_reaches_the_forward_passes(model):
    """``auto`` is float32 on the CPU; ``bf16`` really runs the network in bfloat16 (outputs stay float32 and close);
    an unknown precision is refused before any work."""
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) == torch.bfloat16 and autocast_dtype("fp16", cpu) == torch.float16
    x = torch.randn(1, 20, 16, 16)
    full = sliding_window_inference(x, model, (16, 16, 16), precision="fp32", attention=False)
    auto = sliding_window_inference(x, model, (16, 16, 16), attention=False)
    reduced = sliding_window_inference(x, model, (16, 16, 16), precision="bf16", attention=False)
    assert torch.equal(auto.scores, full.scores)
    assert reduced.scores.dtype == torch.float32
    error = (reduced.scores - full.scores).abs()
    assert 0 < float(error.max()) < 0.1
    with pytest.raises(AttentionUNetError, match="unknown precision 'tf32'"):
        sliding_window_inference(x, model, (16, 16, 16), precision="tf32")


def test_cli_offers_the_engine_precisions():
    from AttentionUNetSegmentLib.cli.commands import build_parser

    parser = build_parser()
    for precision in PRECISIONS:
        args = parser.parse_args(["segment", "in.nii.gz", "--output-dir", "out", "--precision", precision])
        assert args.precision == precision
    assert parser.parse_args(["segment", "in.nii.gz", "--output-dir", "out"]).precision == "auto"


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(AttentionUNetError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(AttentionUNetError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_bad_predictor_settings_are_refused(tiny_bundle):
    with pytest.raises(AttentionUNetError, match="overlap"):
        Predictor(tiny_bundle, device="cpu", overlap=1.0)
    with pytest.raises(AttentionUNetError, match="batch size"):
        Predictor(tiny_bundle, device="cpu", batch_size=-1)


def test_keep_largest_component_per_label():
    array = np.zeros((10, 10, 10), dtype=np.uint8)
    array[1:4, 1:4, 1:4] = 1  # 27 voxels
    array[6:8, 6:8, 6:8] = 1  # 8 voxels, removed
    array[5, 5, 5] = 1  # 26-connected to the small block only -> removed with it
    array[0:2, 7:9, 0:2] = 2
    array[9, 0, 9] = 2  # removed
    labels = sitk.GetImageFromArray(array)
    labels.SetSpacing((0.5, 1, 2))
    cleaned = keep_largest_component(labels)
    out = sitk.GetArrayFromImage(cleaned)
    assert cleaned.GetSpacing() == labels.GetSpacing() and out.dtype == np.uint8
    assert (out == 1).sum() == 27 and (out == 2).sum() == 8
    array[4, 4, 4] = 1  # corner-to-corner bridge: everything is one 26-connected component and stays
    assert (sitk.GetArrayFromImage(keep_largest_component(sitk.GetImageFromArray(array), [1])) == 1).sum() == 37


# --- Predictor on real and synthetic images -----------------------------------------------------------------------


@pytest.mark.shared_data
def test_prediction_lives_on_the_input_grid_with_probabilities(predictor, hippocampus_image):
    prediction = predictor.predict(hippocampus_image, probabilities=True)
    labels = prediction.labels
    assert labels.GetPixelID() == sitk.sitkUInt8
    assert labels.GetSize() == hippocampus_image.GetSize()
    assert labels.GetOrigin() == hippocampus_image.GetOrigin()
    assert labels.GetSpacing() == hippocampus_image.GetSpacing()
    assert labels.GetDirection() == hippocampus_image.GetDirection()
    assert sorted(prediction.probabilities) == [0, 1, 2]
    probs = np.stack([sitk.GetArrayFromImage(prediction.probabilities[v]) for v in (0, 1, 2)])
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(probs.argmax(0), sitk.GetArrayFromImage(labels))
    assert prediction.device == "cpu"
    assert {"preprocess", "inference", "resample", "postprocess", "total"} <= set(prediction.timings)


def test_attention_maps_sit_on_each_gates_own_grid(predictor, one_mm_ras_image):
    """On the bundle's own grid (RAS, 1 mm), gate k's voxel j is the mean of a 2**k block of input voxels, and the
    coarse grid covers the whole input."""
    hippocampus_image = one_mm_ras_image
    prediction = predictor.predict(hippocampus_image)
    assert len(prediction.attention) == 2
    size = np.array(hippocampus_image.GetSize())
    for k, gate in enumerate(prediction.attention):
        f = 2**k
        assert gate.GetPixelID() == sitk.sitkFloat32
        values = sitk.GetArrayViewFromImage(gate)
        assert values.min() >= 0 and values.max() <= 1
        assert gate.GetDirection() == hippocampus_image.GetDirection()
        np.testing.assert_allclose(gate.GetSpacing(), np.array(hippocampus_image.GetSpacing()) * f)
        # Centre of coarse voxel 0 in the input's continuous index: start + (f - 1) / 2 with an integer start in
        # (-f, 0] (the block may straddle the padding); every coarse step is exactly f input voxels.
        first = continuous_index(hippocampus_image, gate.TransformIndexToPhysicalPoint((0, 0, 0)))
        start = first - (f - 1) / 2
        np.testing.assert_allclose(start, np.round(start), atol=1e-6)
        assert np.all(start > -f) and np.all(start <= 0)
        n = np.array(gate.GetSize())
        last = continuous_index(hippocampus_image, gate.TransformIndexToPhysicalPoint(tuple(int(v) for v in n - 1)))
        np.testing.assert_allclose(last - first, (n - 1) * f, atol=1e-6)
        assert np.all(start + n * f >= size) and np.all(start + (n - 1) * f < size)


def test_attention_maps_equal_the_network_maps_when_one_window_fits(predictor, tiny_bundle, one_mm_ras_image):
    region = sitk.RegionOfInterest(one_mm_ras_image, (32, 32, 32), (1, 5, 2))
    prediction = predictor.predict(region)
    x = torch.from_numpy(preprocess(region, tiny_bundle.preprocessing).array)[None, None]
    with torch.no_grad():
        maps = predictor.model.forward_with_aux(x).attention
    for k, (gate, alpha) in enumerate(zip(prediction.attention, maps)):
        f = 2**k
        np.testing.assert_allclose(sitk.GetArrayViewFromImage(gate), alpha[0, 0].numpy(), atol=1e-5)
        for j in corner_indices(gate.GetSize()):
            # Coarse voxel j summarises input voxels j*f .. j*f + f - 1: its centre is their mean position.
            block_centre = region.TransformContinuousIndexToPhysicalPoint([i * f + (f - 1) / 2 for i in j])
            np.testing.assert_allclose(gate.TransformIndexToPhysicalPoint(j), block_centre, atol=1e-6)


def test_oblique_anisotropic_input_gets_labels_on_its_exact_grid(predictor, tiny_bundle):
    image = oblique_image(size=(30, 26, 11))
    prediction = predictor.predict(image)
    labels = prediction.labels
    assert labels.GetSize() == image.GetSize()
    assert labels.GetOrigin() == image.GetOrigin()
    assert labels.GetSpacing() == image.GetSpacing()
    assert labels.GetDirection() == image.GetDirection()
    # The network saw the resampled grid (bundle spacing, axes parallel to the input's); gate k's voxel j is the
    # mean of a 2**k block of that grid's voxels, so its centre is the block's centre, and the blocks tile it.
    grid = preprocess(image, tiny_bundle.preprocessing).grid
    size = np.array(grid.GetSize())
    for k, gate in enumerate(prediction.attention):
        f = 2**k
        np.testing.assert_allclose(gate.GetDirection(), image.GetDirection(), atol=1e-6)
        np.testing.assert_allclose(gate.GetSpacing(), np.array(grid.GetSpacing()) * f)
        starts = []
        for j in corner_indices(gate.GetSize()):
            centre = continuous_index(grid, gate.TransformIndexToPhysicalPoint(j))
            start = centre - (f - 1) / 2  # the block's first fine voxel, in the resampled grid's index
            np.testing.assert_allclose(start, np.round(start), atol=1e-5)
            starts.append(np.round(start))
        starts = np.array(starts)
        assert len({tuple(s % f) for s in starts}) == 1  # one block lattice
        assert np.all(starts.min(0) > -f) and np.all(starts.min(0) <= 0)
        assert np.all(starts.max(0) < size) and np.all(starts.max(0) + f >= size)


def test_image_smaller_than_one_patch_is_padded_and_segmented(predictor):
    small = oblique_image(size=(10, 12, 9))
    prediction = predictor.predict(small)
    assert prediction.labels.GetSize() == (10, 12, 9)
    assert len(prediction.attention) == 2
    assert set(np.unique(sitk.GetArrayViewFromImage(prediction.labels))) <= {0, 1, 2}


def _blob_volume(size, direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)) -> sitk.Image:
    """A smooth 1 mm volume (x, y, z ``size``) that a random-weight model segments into uneven labels."""
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in size[::-1]], indexing="ij")
    array = 400 * np.exp(-(i**2 + (1.3 * j) ** 2 + k**2) * 3) + 20 * np.sin(7 * i + 3 * j) + 5 * np.cos(5 * k)
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetOrigin((3.0, -7.0, 11.0))
    image.SetDirection(direction)
    return image


def _ras_roi(image: sitk.Image, first, last):
    """The RAS box whose voxel centres are ``first`` .. ``last`` (x, y, z indices, inclusive)."""
    a, b = (image.TransformIndexToPhysicalPoint(index) for index in (first, last))
    return (min(-a[0], -b[0]), max(-a[0], -b[0]), min(-a[1], -b[1]), max(-a[1], -b[1]), min(a[2], b[2]),
            max(a[2], b[2]))


def _windows(events):
    return [message for _, _, message in events if message.startswith("Window")]


def test_a_roi_about_the_models_size_is_one_window_centred_on_it(predictor):
    image = _blob_volume((70, 64, 60))
    first, last = (20, 16, 14), (49, 51, 43)  # 30 x 36 x 30 mm: the tiny model sees 32 mm, 1.25 x that is 40
    roi = _ras_roi(image, first, last)
    events = []
    prediction = predictor.predict(image, roi=roi, probabilities=True, progress=lambda *event: events.append(event))
    assert _windows(events) == ["Window 1/1 on cpu"]  # tiling the ROI plus its margin would take 8
    labels = sitk.GetArrayFromImage(prediction.labels)
    assert prediction.labels.GetSize() == image.GetSize() and prediction.labels.GetOrigin() == image.GetOrigin()
    inside = np.zeros(labels.shape, dtype=bool)
    inside[tuple(slice(a, b + 1) for a, b in zip(first[::-1], last[::-1]))] = True
    assert not labels[~inside].any() and len(np.unique(labels[inside])) > 1
    probabilities = {v: sitk.GetArrayViewFromImage(p) for v, p in prediction.probabilities.items()}
    np.testing.assert_array_equal(probabilities[0][~inside], 1.0)
    np.testing.assert_allclose(sum(probabilities.values())[inside], 1.0, atol=1e-4)

    # Attention maps lie on the ROI's region (plus its margin) and are 0 outside the one view: 32 mm centred on it.
    region = crop_to_roi(image, roi, ROI_MARGIN_VOXELS)[0]
    fine = prediction.attention[0]
    assert fine.GetSize() == region.GetSize()
    np.testing.assert_allclose(fine.GetOrigin(), region.GetOrigin(), atol=1e-6)
    centre = np.array([(roi[0] + roi[1]) / 2, (roi[2] + roi[3]) / 2, (roi[4] + roi[5]) / 2])
    values = sitk.GetArrayViewFromImage(fine)
    seen = np.argwhere(values > 0)[:, ::-1]
    ras = np.array([fine.TransformIndexToPhysicalPoint([int(v) for v in index]) for index in seen]) * [-1, -1, 1]
    assert np.all(np.abs(ras - centre) <= 16.5), np.abs(ras - centre).max(0)
    assert 0 < (values > 0).mean() < 1


def test_a_roi_that_is_the_models_view_segments_as_that_view(predictor):
    # An upright RAS 1 mm grid of exactly the tiny model's 32 mm field of view: the one view is this very grid.
    image = _blob_volume((32, 32, 32), direction=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    whole = predictor.predict(image, probabilities=True)
    view = predictor.predict(image, roi=_ras_roi(image, (0, 0, 0), (31, 31, 31)), probabilities=True)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(view.labels), sitk.GetArrayViewFromImage(whole.labels))
    for value, probability in whole.probabilities.items():
        np.testing.assert_allclose(sitk.GetArrayViewFromImage(view.probabilities[value]),
                                   sitk.GetArrayViewFromImage(probability), atol=1e-5)


def test_a_larger_roi_is_tiled_as_its_crop_and_pasted_back(predictor):
    image = _blob_volume((90, 80, 70))
    first, last = (10, 12, 8), (59, 61, 52)  # 50 x 50 x 45 mm: more than 1.25 x the 32 mm view
    roi = _ras_roi(image, first, last)
    events = []
    prediction = predictor.predict(image, roi=roi, progress=lambda *event: events.append(event))
    assert len(_windows(events)) > 1
    labels = sitk.GetArrayFromImage(prediction.labels)
    inside = np.zeros(labels.shape, dtype=bool)
    inside[tuple(slice(a, b + 1) for a, b in zip(first[::-1], last[::-1]))] = True
    assert not labels[~inside].any()
    # Inside the box, it is exactly the prediction of the cropped region (ROI plus its context margin).
    region, start, stop = crop_to_roi(image, roi, ROI_MARGIN_VOXELS)
    direct = sitk.GetArrayFromImage(predictor.predict(region).labels)
    box = tuple(slice(lo, hi) for lo, hi in zip(start[::-1], stop[::-1]))
    np.testing.assert_array_equal(labels[inside].reshape(direct[box].shape), direct[box])
    assert prediction.attention[0].GetSize() == region.GetSize()

    with pytest.raises(InputImageError, match="does not overlap"):
        predictor.predict(image, roi=(500, 510, 500, 510, 500, 510))


def test_tta_prediction_runs_and_stays_on_the_grid(tiny_bundle):
    image = oblique_image(size=(14, 12, 10))
    prediction = Predictor(tiny_bundle, device="cpu", tta=True).predict(image, probabilities=True)
    assert prediction.labels.GetSize() == image.GetSize()
    total = sum(sitk.GetArrayFromImage(p) for p in prediction.probabilities.values())
    np.testing.assert_allclose(total, 1.0, atol=1e-4)


def test_progress_is_monotonic_and_cancel_stops_promptly(tiny_bundle):
    predictor = Predictor(tiny_bundle, device="cpu", overlap=0.5)
    image = oblique_image(size=(60, 50, 16))
    events = []
    predictor.predict(image, progress=lambda stage, fraction, message: events.append((stage, fraction, message)))
    fractions = [fraction for _, fraction, _ in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and fractions[0] == 0.0
    assert [s for s, _, _ in events if s != "inference"] == ["preprocess", "resample", "postprocess", "postprocess"]
    windows = [m for s, _, m in events if s == "inference" and m.startswith("Window")]
    assert len(windows) > 3

    polls = []

    def cancel_after_two_batches() -> bool:
        polls.append(len(events))
        # Polled at the preprocess and inference stage starts, then before every window batch: stop before batch 3.
        return len(polls) > 4

    events.clear()
    with pytest.raises(CancelledError):
        predictor.predict(image, progress=lambda *e: events.append(e), cancel=cancel_after_two_batches)
    assert sum(1 for e in events if e[2].startswith("Window")) == 2
    assert predictor.predict(image[:20, :20, :8]).labels.GetSize() == (20, 20, 8)  # still usable


def test_cuda_out_of_memory_halves_the_batch_then_falls_back_to_the_cpu(tiny_bundle, monkeypatch):
    """Out-of-memory is injected where CUDA would raise it (the window loop), on a predictor that believes it runs
    on a GPU with 4 windows per batch: 4 -> 2 -> 1 window(s), then the CPU in fp32 with the tuned CPU model."""
    from AttentionUNetSegmentLib.inference import predictor as predictor_module
    from AttentionUNetSegmentLib.model.acceleration import OneDNNConv3d, cpu_optimizations_available

    real = predictor_module.sliding_window_inference
    attempts = []

    def windows(volume, model, patch, overlap, batch_size, **options):
        attempts.append((options["device"].type, batch_size, options["precision"]))
        if options["device"].type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(volume, model, patch, overlap, batch_size, **options)

    monkeypatch.setattr(predictor_module, "sliding_window_inference", windows)
    logged = []
    predictor = Predictor(tiny_bundle, device="cpu", log=logged.append)
    expected = predictor.predict(oblique_image(size=(14, 12, 10)), attention=False).labels
    predictor.device, predictor.batch_size = torch.device("cuda"), 4
    messages = []
    prediction = predictor.predict(oblique_image(size=(14, 12, 10)), attention=False,
                                   progress=lambda stage, fraction, message: messages.append(message))
    assert attempts[1:] == [("cuda", 4, "auto"), ("cuda", 2, "auto"), ("cuda", 1, "auto"), ("cpu", 1, "fp32")]
    assert any("retrying with 2 window(s)" in m for m in messages)
    assert any("falling back to the CPU" in m for m in messages)
    assert len(logged) == 3 and logged == [m for m in messages if "CUDA out of memory" in m]  # lines for people
    assert predictor.device.type == "cpu"
    tuned = any(isinstance(module, OneDNNConv3d) for module in predictor.model.modules())
    assert tuned == cpu_optimizations_available()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(prediction.labels), sitk.GetArrayFromImage(expected))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_prediction_matches_the_cpu(tiny_bundle):
    """Autocast (bf16/fp16) and float16 accumulation on the GPU give the CPU's labels almost everywhere."""
    image = oblique_image(size=(50, 44, 14))
    on_cpu = Predictor(tiny_bundle, device="cpu").predict(image)
    on_gpu = Predictor(tiny_bundle, device="cuda", batch_size=3).predict(image)
    assert on_gpu.device.startswith("cuda:")
    agree = sitk.GetArrayFromImage(on_gpu.labels) == sitk.GetArrayFromImage(on_cpu.labels)
    assert agree.mean() > 0.98
    for cpu_map, gpu_map in zip(on_cpu.attention, on_gpu.attention):
        assert cpu_map.GetSize() == gpu_map.GetSize() and cpu_map.GetOrigin() == gpu_map.GetOrigin()
        np.testing.assert_allclose(sitk.GetArrayViewFromImage(gpu_map), sitk.GetArrayViewFromImage(cpu_map), atol=0.05)
