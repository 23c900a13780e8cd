"""Augmentation keeps image and label aligned and label values exact; patch sampling behaves as documented."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from AttentionUNetSegmentLib.augmentation import (AugmentationConfig, PatchSampler, extract_patch,
                                                  random_spatial_matrix, sampling_grid)
from AttentionUNetSegmentLib.datasets import PreprocessedCase, foreground_samples
from AttentionUNetSegmentLib.planning import plan_flip_axes


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
