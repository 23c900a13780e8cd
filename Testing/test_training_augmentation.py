"""Augmentation keeps image and label aligned and label values exact; patch sampling behaves as documented."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from AttentionUNetSegmentLib.training.augmentation import (AugmentationConfig, PatchSampler, extract_patch,
                                                  random_spatial_matrix, sampling_grid)
from AttentionUNetSegmentLib.training.datasets import PreprocessedCase, foreground_samples
from AttentionUNetSegmentLib.training.planning import plan_flip_axes


def _phantom(shape=(30, 36, 32)) -> PreprocessedCase:
    """Two adjacent boxes (labels 1 and 2) in a smooth background; the image is brightest inside label 1 and
    mid-grey inside label 2, so a thresholded image patch must coincide with the label patch."""
    label = np.zeros(shape, np.uint8)
    label[8:20, 10:24, 9:18] = 1
    label[8:20, 10:24, 18:24] = 2
    image = np.select([label == 1, label == 2], [2.0, 1.0], 0.0).astype(np.float32)
    return PreprocessedCase("phantom", image, label, foreground_samples(label))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_identity_grid_is_an_exact_crop():
    case = _phantom()
    patch = (16, 20, 12)  # (z, y, x)
    centre = np.array([14.5, 17.5, 15.5])  # even patch sizes: centres fall between voxels
    grid = sampling_grid(case.image.shape, centre, patch, np.eye(3))
    image, label = extract_patch(torch.from_numpy(case.image)[None, None],
                                 torch.from_numpy(case.label.astype(np.float32))[None, None], grid)
    expected = (slice(7, 23), slice(8, 28), slice(10, 22))
    assert torch.equal(label, torch.from_numpy(case.label[expected].astype(np.int64)))
    assert torch.allclose(image[0], torch.from_numpy(case.image[expected]), atol=1e-5)


def test_spatial_augmentation_keeps_image_and_label_aligned():
    case = _phantom()
    config = AugmentationConfig(rotation_probability=1.0, scale_probability=1.0, flip_axes=("x", "y", "z"),
                                elastic_probability=1.0, noise_probability=0.0, brightness_probability=0.0,
                                contrast_probability=0.0, gamma_probability=0.0)
    sampler = PatchSampler([case], patch_size=(24, 28, 24), batch_size=4, config=config, foreground_fraction=1.0,
                           seed=1)
    images, labels, _ = sampler.next_batch()
    assert images.shape == (4, 1, 24, 28, 24) and labels.shape == (4, 24, 28, 24)
    assert labels.dtype == torch.int64
    assert set(labels.unique().tolist()) <= {0, 1, 2}  # nearest neighbour: no blended label values
    for image, label in zip(images[:, 0].numpy(), labels.numpy()):
        assert (label == 1).sum() > 50 and (label == 2).sum() > 50
        assert _dice(image > 1.5, label == 1) > 0.9
        assert _dice(image > 0.5, label > 0) > 0.9  # the whole object, label 2 included


def test_rotation_is_within_fifteen_degrees_and_mirroring_only_on_allowed_axes():
    rng = np.random.default_rng(0)
    config = AugmentationConfig(rotation_probability=1.0, scale_probability=0.0, flip_axes=("x",),
                                flip_probability=1.0)
    for _ in range(20):
        matrix = random_spatial_matrix(config, rng)
        assert np.linalg.det(matrix) == pytest.approx(-1.0)  # exactly one mirror
        rotation = matrix @ np.diag([1.0, 1.0, -1.0])  # undo the x mirror (last array axis)
        # Each elementary rotation is at most 15 degrees, so the diagonal stays close to 1.
        assert np.all(np.diag(rotation) > np.cos(np.radians(15.0)) ** 2 - 1e-9)


def test_label_names_restrict_mirroring():
    assert plan_flip_axes(["Anterior", "Posterior"]) == ("x", "z")
    assert plan_flip_axes(["Left kidney", "Right kidney"]) == ("y", "z")
    assert plan_flip_axes(["Liver", "Tumour"]) == ("x", "y", "z")
    assert plan_flip_axes(["Bright", "LeftLung"]) == ("y", "z")  # whole words, camelCase split


def test_foreground_oversampling_and_intensity_augmentation():
    case = _phantom((40, 40, 40))
    config = AugmentationConfig.none()
    sampler = PatchSampler([case], patch_size=(8, 8, 8), batch_size=6, config=config, foreground_fraction=0.5, seed=0)
    _, labels, _ = sampler.next_batch()
    assert all(labels[i].any() for i in range(3, 6))  # the last half are centred on foreground voxels

    intensity = AugmentationConfig(rotation_probability=0.0, scale_probability=0.0, noise_probability=1.0,
                                   brightness_probability=1.0, contrast_probability=1.0, gamma_probability=1.0)
    # One patch each: the same seed gives the same spatial draws, which come before the intensity draws.
    augmented = PatchSampler([case], (16, 16, 16), 1, intensity, 1.0, seed=0).next_batch()
    plain = PatchSampler([case], (16, 16, 16), 1, AugmentationConfig.none(), 1.0, seed=0).next_batch()
    assert torch.equal(augmented[1], plain[1])  # intensity changes never touch the labels
    assert not torch.allclose(augmented[0], plain[0])
    assert torch.isfinite(augmented[0]).all()


def test_sampler_is_reproducible_from_its_state():
    case = _phantom()
    config = AugmentationConfig(flip_axes=("x",), elastic_probability=0.5)
    sampler = PatchSampler([case], (16, 16, 16), 2, config, seed=5)
    sampler.next_batch()
    state = sampler.state_dict()
    expected = sampler.next_batch()
    restored = PatchSampler([case], (16, 16, 16), 2, config, seed=123)
    restored.load_state_dict(state)
    actual = restored.next_batch()
    assert torch.equal(expected[0], actual[0]) and torch.equal(expected[1], actual[1])


def _ramp(shape=(24, 28, 20)) -> torch.Tensor:
    """A smooth ramp plus a sharp bright cube: blur and low resolution soften the cube's edges."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    image = (x + 0.5 * y).astype(np.float32)
    image[8:16, 10:18, 6:14] += 3.0
    return torch.from_numpy(image)[None]


def _edge_energy(patch: torch.Tensor) -> float:
    return float(sum(patch.diff(dim=axis).abs().max() for axis in (1, 2, 3)))


def test_gaussian_blur_smooths_keeps_the_mean_and_a_constant():
    from AttentionUNetSegmentLib.training.augmentation import gaussian_blur

    patch = _ramp()
    blurred = gaussian_blur(patch, (1.0, 1.0, 1.0))
    assert blurred.shape == patch.shape
    assert _edge_energy(blurred) < 0.6 * _edge_energy(patch)
    assert abs(float(blurred[0, 12, 14, 10]) - float(patch[0, 12, 14, 10])) < 0.5  # the cube's inside survives
    constant = torch.full((1, 8, 8, 8), 2.5)
    assert torch.allclose(gaussian_blur(constant, (0.7, 1.0, 0.5)), constant)


def test_simulated_low_resolution_is_the_coarse_scan_interpolated_back():
    from AttentionUNetSegmentLib.training.augmentation import simulate_low_resolution

    patch = _ramp((24, 28, 20))
    low = simulate_low_resolution(patch, (0.5, 0.5, 0.5))
    assert low.shape == patch.shape
    assert _edge_energy(low) < 0.8 * _edge_energy(patch)
    assert abs(float(low.mean()) - float(patch.mean())) < 0.05  # averaging down keeps the mean intensity
    # Zoom 1 changes nothing; a 2x2x2 block image survives an exact halving.
    assert torch.allclose(simulate_low_resolution(patch, (1.0, 1.0, 1.0)), patch, atol=1e-6)
    blocks = torch.arange(8, dtype=torch.float32).reshape(1, 2, 2, 2)
    coarse = blocks.repeat_interleave(4, 1).repeat_interleave(4, 2).repeat_interleave(4, 3)
    halved = torch.nn.functional.adaptive_avg_pool3d(coarse[None], (4, 4, 4))[0]
    assert torch.allclose(halved, blocks.repeat_interleave(2, 1).repeat_interleave(2, 2).repeat_interleave(2, 3))


def test_bias_field_is_smooth_positive_and_seeded():
    from AttentionUNetSegmentLib.training.augmentation import bias_field

    field = bias_field((20, 24, 16), 0.2, np.random.default_rng(4))
    assert field.shape == (1, 20, 24, 16) and float(field.min()) > 0
    assert float(field.max() / field.min()) > 1.05  # it does vary ...
    assert float(field.diff(dim=3).abs().max()) < 0.1  # ... smoothly (a gradient across the patch)
    assert torch.equal(field, bias_field((20, 24, 16), 0.2, np.random.default_rng(4)))


def test_strong_set_changes_intensities_keeps_labels_and_is_deterministic():
    from AttentionUNetSegmentLib.training.augmentation import augment_intensity

    case = _phantom()
    assert AugmentationConfig.robust().low_resolution_probability > 0
    robust = AugmentationConfig.strong(flip_axes=("x",))
    assert robust.low_resolution_probability > 0 and robust.bias_field_probability > 0
    assert robust.scale[0] <= 0.7 and robust.scale[1] >= 1.4
    first = PatchSampler([case], (16, 16, 16), 4, robust, 1.0, seed=9).next_batch()
    again = PatchSampler([case], (16, 16, 16), 4, robust, 1.0, seed=9).next_batch()
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert set(first[1].unique().tolist()) <= {0, 1, 2} and torch.isfinite(first[0]).all()
    # Each intensity augmentation on its own, forced: it changes the patch, deterministically under a seed.
    patch = _ramp()
    for change in ({"blur_probability": 1.0}, {"low_resolution_probability": 1.0},
                   {"bias_field_probability": 1.0}, {"gamma_probability": 1.0, "gamma_invert_probability": 1.0}):
        config = AugmentationConfig(**{**vars(AugmentationConfig.none()), **change})
        out = augment_intensity(patch, config, np.random.default_rng(1))
        assert not torch.allclose(out, patch), change
        assert torch.equal(out, augment_intensity(patch, config, np.random.default_rng(1)))
    # Inverted gamma keeps the patch's range and brightens dark voxels where plain gamma > 1 darkens them.
    plain = AugmentationConfig(**{**vars(AugmentationConfig.none()), "gamma_probability": 1.0, "gamma": (2.0, 2.0)})
    inverted = AugmentationConfig(**{**vars(plain), "gamma_invert_probability": 1.0})
    a = augment_intensity(patch, plain, np.random.default_rng(0))
    b = augment_intensity(patch, inverted, np.random.default_rng(0))
    assert torch.isclose(a.min(), patch.min()) and torch.isclose(b.max(), patch.max())
    assert float(a.mean()) < float(patch.mean()) < float(b.mean())


def test_anisotropic_scaling_stays_in_range():
    config = AugmentationConfig(rotation_probability=0.0, scale_probability=1.0, scale=(1.0, 1.0),
                                scale_anisotropy=0.1)
    for _ in range(10):
        diagonal = np.diag(random_spatial_matrix(config, np.random.default_rng(_)))
        assert np.all(np.abs(diagonal - 1) <= 0.1) and np.ptp(diagonal) > 0
