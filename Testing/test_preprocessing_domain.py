"""The domain guard: what a bundle records of its training data, and when an input is warned about."""

from __future__ import annotations

import numpy as np

from AttentionUNetSegmentLib.preprocessing.domain import domain_warnings, exceeds_field_of_view, measure_domain, world_extent

CROPS = measure_domain([(36, 50, 36), (34, 52, 38), (38, 48, 34)], [(1.0, 1.0, 1.0)] * 3, modality="MRI")


def test_measure_domain_records_median_and_range_along_world_axes():
    assert CROPS["field_of_view_mm"]["median"] == [36.0, 50.0, 36.0]
    assert CROPS["field_of_view_mm"]["min"] == [34.0, 48.0, 34.0]
    assert CROPS["spacing_mm"]["max"] == [1.0, 1.0, 1.0]
    assert CROPS["modality"] == "MRI" and CROPS["thresholds"]["field_of_view_ratio"] > 1


def test_a_crop_like_the_training_data_gets_no_warning():
    assert domain_warnings((40, 52, 40), (1.0, 1.0, 1.0), None, CROPS) == []


def test_a_whole_head_is_warned_about_with_what_to_do():
    warnings = domain_warnings((197, 233, 189), (1.0, 1.0, 1.0), None, CROPS, localizer=True)
    assert len(warnings) == 1
    assert "field of view" in warnings[0] and "5.5x" in warnings[0]
    assert "--roi" in warnings[0] and "--localize auto" in warnings[0]
    assert "--localize" not in domain_warnings((197, 233, 189), (1.0,) * 3, None, CROPS)[0]


def test_coarse_voxels_are_warned_about():
    warnings = domain_warnings((18, 25, 18), (2.5, 2.5, 2.5), None, CROPS)
    assert len(warnings) == 1 and "coarser" in warnings[0]


def test_extent_follows_the_world_axes_not_the_voxel_axes():
    # Axes permuted (x stored along the third voxel axis): the world extent is the same box.
    direction = (0, 0, 1, 1, 0, 0, 0, 1, 0)
    assert np.allclose(world_extent((50, 36, 36), (1.0, 1.0, 1.0), direction), (36, 50, 36))
    assert domain_warnings((50, 36, 36), (1.0, 1.0, 1.0), direction, CROPS) == []


def test_thresholds_come_from_the_bundle_and_no_domain_means_no_warning():
    strict = {**CROPS, "thresholds": {"field_of_view_ratio": 1.05}}
    assert domain_warnings((40, 52, 40), (1.0, 1.0, 1.0), None, strict)
    assert domain_warnings((400, 400, 400), (3.0, 3.0, 3.0), None, None) == []


def test_the_localisation_test_uses_the_training_median_or_else_the_patch():
    head, crop = ((197, 233, 189), (1.0,) * 3, None), ((40, 52, 40), (1.0,) * 3, None)
    patch_mm = (40.0, 56.0, 40.0)
    assert exceeds_field_of_view(*head, CROPS, patch_mm) and not exceeds_field_of_view(*crop, CROPS, patch_mm)
    # No domain recorded: the patch's extent stands in for it (a 100 mm cube is 2.5x the patch along x and z).
    assert exceeds_field_of_view((100, 100, 100), (1.0,) * 3, None, None, patch_mm)
    assert not exceeds_field_of_view((60, 60, 60), (1.0,) * 3, None, None, patch_mm)
