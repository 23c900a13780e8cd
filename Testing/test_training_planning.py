"""Planning rules: spacing, patch size, normalisation and mirroring derived from a dataset fingerprint."""

from __future__ import annotations

import pytest

from AttentionUNetSegmentLib.training.planning import CaseFingerprint, DatasetFingerprint, TrainingPlan, plan_training


def _fingerprint(spacings, sizes, modality="MRI", intensities=()):
    cases = [CaseFingerprint(f"c{i}", spacing, size, {1: 100}, list(intensities))
             for i, (spacing, size) in enumerate(zip(spacings, sizes))]
    return DatasetFingerprint(cases, modality)


def test_isotropic_mri_plan_matches_the_hippocampus_choice():
    fingerprint = _fingerprint([(1.0, 1.0, 1.0)] * 3, [(35, 50, 36), (34, 52, 35), (36, 49, 37)])
    plan = plan_training(fingerprint, ["Anterior", "Posterior"], {"channels": (8, 16, 32, 64)})
    assert plan.target_spacing == (1.0, 1.0, 1.0)
    assert plan.patch_size == (40, 56, 40)  # median size rounded up to multiples of 8
    assert plan.normalization == {"scheme": "zscore"}
    assert plan.flip_axes == ("x", "z")  # anterior/posterior labels: never mirror along y


def test_anisotropic_ct_plan():
    spacings = [(0.8, 0.8, 5.0), (0.7, 0.7, 1.25), (0.9, 0.9, 5.0), (0.8, 0.8, 2.5)]
    sizes = [(512, 512, 40)] * 4
    fingerprint = _fingerprint(spacings, sizes, "CT", intensities=[-50.0, 40.0, 60.0, 300.0] * 50)
    plan = plan_training(fingerprint, ["Liver"], {"channels": (16, 32, 64, 128)})
    assert plan.target_spacing[:2] == (0.8, 0.8)
    assert plan.target_spacing[2] == pytest.approx(1.625)  # 10th percentile of z, not the median 3.75
    assert all(p % 8 == 0 for p in plan.patch_size)
    assert plan.patch_size[0] * plan.patch_size[1] * plan.patch_size[2] <= 128 ** 3
    assert plan.normalization["scheme"] == "ct" and plan.normalization["clip"][0] < plan.normalization["clip"][1]


def test_overrides_win_and_round_to_the_network_divisor():
    fingerprint = _fingerprint([(1.0, 1.0, 1.0)] * 2, [(30, 30, 30)] * 2)
    plan = plan_training(fingerprint, ["Tumour"], {"channels": (4, 8, 16), "patch_size": (30, 17, 16),
                                                 "target_spacing": (2.0, 2.0, 2.0), "flip_axes": ()})
    assert plan.patch_size == (32, 20, 16)
    assert plan.target_spacing == (2.0, 2.0, 2.0) and plan.flip_axes == ()
    assert TrainingPlan.from_dict(plan.to_dict()) == plan
    with pytest.raises(ValueError, match="flip axes"):
        plan_training(fingerprint, ["Tumour"], {"flip_axes": ("w",)})


def test_normalisation_can_be_forced_with_statistics_from_the_dataset():
    intensities = [-50.0, 40.0, 60.0, 300.0] * 50
    mri = _fingerprint([(1.0, 1.0, 1.0)] * 2, [(30, 30, 30)] * 2, "MRI", intensities)
    forced_ct = plan_training(mri, ["Liver"], {"normalization": "ct"}).normalization
    assert forced_ct["scheme"] == "ct" and forced_ct["clip"][0] < forced_ct["clip"][1] and forced_ct["std"] > 0
    ct = _fingerprint([(1.0, 1.0, 1.0)] * 2, [(30, 30, 30)] * 2, "CT", intensities)
    assert plan_training(ct, ["Liver"], {"normalization": "zscore-nonzero"}).normalization == \
        {"scheme": "zscore", "nonzero": True}
    assert plan_training(ct, ["Liver"], {"normalization": "zscore"}).normalization == {"scheme": "zscore"}
    given = {"scheme": "ct", "clip": [-100.0, 200.0], "mean": 50.0, "std": 60.0}
    assert plan_training(mri, ["Liver"], {"normalization": given}).normalization == given
    with pytest.raises(ValueError, match="normalisation must be one of"):
        plan_training(mri, ["Liver"], {"normalization": "minmax"})
    with pytest.raises(ValueError, match="no case has a labelled voxel"):
        plan_training(_fingerprint([(1.0, 1.0, 1.0)], [(30, 30, 30)]), ["Liver"], {"normalization": "ct"})
