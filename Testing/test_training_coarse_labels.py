"""Coarse labels (region-based training): datasets whose labels merge several model classes, declared in
``dataset.json`` ``label_groups``, trained on together with fully labelled ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from AttentionUNetSegmentLib.model.bundle import load_bundle
from AttentionUNetSegmentLib.cli.commands import main
from AttentionUNetSegmentLib.training.datasets import CaseCache, load_datasets, split_cases
from AttentionUNetSegmentLib.errors import DatasetError
from AttentionUNetSegmentLib.training.losses import DiceCELoss, SegmentationLoss
from AttentionUNetSegmentLib.model.network import NetworkOutput
from AttentionUNetSegmentLib.preprocessing.preprocess import PreprocessingSpec
from AttentionUNetSegmentLib.training.trainer import to_channel_labels, train

from test_training_trainer import _config, make_dataset


def _coarsen(fine: Path, root: Path, groups, per_case=None, labels=None) -> Path:
    """A copy of the fine boxes dataset whose labels merge Bright (1) and Dark (2) into value 1."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    listing = json.loads((fine / "dataset.json").read_text())
    training = []
    for entry in listing["training"]:
        name = "coarse_" + Path(entry["image"]).name
        image = sitk.ReadImage(str(fine / entry["image"]))
        label = sitk.ReadImage(str(fine / entry["label"]))
        sitk.WriteImage(image, str(root / "imagesTr" / name))
        sitk.WriteImage(sitk.Cast(label > 0, sitk.sitkUInt8), str(root / "labelsTr" / name))
        training.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}", **(per_case or {})})
    listing = {"labels": labels or {"0": "background", "1": "Whole"}, "training": training}
    if groups is not None:
        listing["label_groups"] = groups
    (root / "dataset.json").write_text(json.dumps(listing))
    return root


@pytest.fixture(scope="module")
def fine(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("fine"))


@pytest.mark.parametrize("groups, expected", [
    ({"1": ["Bright", "Grey"]}, "'Grey', which is not a model class"),
    ({"1": ["Bright"], "2": ["Bright", "Dark"]}, "label_groups overlap: model label 'Bright'"),
    ({"3": ["Bright", "Dark"]}, "names value 3, which 'labels' does not list"),
    ({"1": []}, "must be a non-empty list of model label names"),
    (["Bright", "Dark"], "'label_groups' must map a label value"),
])
def test_bad_declarations_are_refused_naming_the_listing(fine, tmp_path, capsys, groups, expected):
    coarse = _coarsen(fine, tmp_path / "coarse", groups, labels={"0": "background", "1": "A", "2": "B"})
    status = main(["train", str(fine), str(coarse), "--output", str(tmp_path / "model"), "--channels", "4", "8",
                   "--progress", "none"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and lines[-1].startswith("error: ") and expected in lines[-1], lines
    assert str(coarse / "dataset.json") in lines[-1]
    assert not (tmp_path / "model").exists() and not (tmp_path / "model.work").exists()


def test_a_case_holding_overlapping_classes_is_refused(fine, tmp_path):
    """Value 1 = Bright and value 3 = Bright + Dark in one label map: no voxel could say which it is."""
    coarse = _coarsen(fine, tmp_path / "coarse", {"3": ["Bright", "Dark"]},
                      labels={"0": "background", "1": "Bright", "3": "Whole"})
    label_path = coarse / "labelsTr" / "coarse_case_000.nii.gz"
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path))) * 3
    label[0, 0, 0] = 1
    written = sitk.GetImageFromArray(label.astype(np.uint8))
    written.CopyInformation(sitk.ReadImage(str(label_path)))
    sitk.WriteImage(written, str(label_path))
    with pytest.raises(DatasetError, match="case coarse_case_000: .* values 1 and 3, which both stand for"):
        train(_config(fine, tmp_path, extra_datasets=(str(coarse),)))


def test_merged_loss_equals_the_loss_on_summed_probabilities():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, 6, requires_grad=True)
    target = torch.randint(0, 2, (2, 4, 5, 6))
    space = ((0,), (1, 2))
    probabilities = torch.softmax(logits, dim=1)
    merged = torch.stack([probabilities[:, 0], probabilities[:, 1] + probabilities[:, 2]], dim=1)
    one_hot = (target == 1).float()
    dice = (2 * (merged[:, 1] * one_hot).sum() + 1e-5) / (merged[:, 1].sum() + one_hot.sum() + 1e-5)
    expected = (1 - dice) + torch.nn.functional.nll_loss(merged.log(), target)
    actual = DiceCELoss()(logits, target, space)
    assert torch.allclose(actual, expected, atol=1e-5)
    actual.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # The network's own space is today's loss, and a mixed batch weighs each space by its share of the batch.
    fine_target = torch.randint(0, 3, (2, 4, 5, 6))
    assert torch.allclose(DiceCELoss()(logits, fine_target, ((0,), (1,), (2,))), DiceCELoss()(logits, fine_target),
                          atol=1e-5)
    mixed_target = torch.stack([fine_target[0], target[1]])
    output = NetworkOutput(logits, [], [])
    mixed = SegmentationLoss()(output, mixed_target, [None, space])
    parts = 0.5 * DiceCELoss()(logits[:1], fine_target[:1]) + 0.5 * DiceCELoss()(logits[1:], target[1:], space)
    assert torch.allclose(mixed, parts, atol=1e-6)
    assert torch.allclose(SegmentationLoss()(output, fine_target, [None, None]),
                          SegmentationLoss()(output, fine_target))


def test_coarse_cases_get_their_label_space(fine, tmp_path):
    coarse = _coarsen(fine, tmp_path / "coarse", {"1": ["Dark", "Bright"]})
    dataset = load_datasets([fine, coarse])
    assert dataset.labels == {1: "Bright", 2: "Dark"}
    assert dataset.training_only == [f"coarse_case_{i:03d}" for i in range(6)]
    records = dataset.cases
    assert records[0].classes == () and records[6].classes == ((1, (1, 2)),) and records[6].coarse
    cache = CaseCache(tmp_path / "cache", PreprocessingSpec(target_spacing=(1.0, 1.0, 1.0)))
    mapped = to_channel_labels(cache.load_all(records), [1, 2], records)
    assert mapped[0].space is None and mapped[6].space == ((0,), (1, 2))
    np.testing.assert_array_equal(mapped[6].label, mapped[0].label > 0)  # the same boxes, merged


def test_training_on_fine_and_coarse_datasets_together(fine, tmp_path):
    coarse = _coarsen(fine, tmp_path / "coarse", {"1": ["Bright", "Dark"]})
    bundle = load_bundle(train(_config(fine, tmp_path, extra_datasets=(str(coarse),), epochs=2,
                                       iterations_per_epoch=4, batch_size=4)))
    assert [label.name for label in bundle.labels] == ["Bright", "Dark"]
    plan = json.loads((tmp_path / "work" / "plan.json").read_text())
    expected_validation = [c.name for c in split_cases(load_datasets([fine]).cases, 2, 3)[1]]
    assert plan["validation_cases"] == expected_validation  # the first dataset's split, as if trained alone
    assert {f"coarse_case_{i:03d}" for i in range(6)} <= set(plan["training_cases"])
    log = json.loads((tmp_path / "work" / "training_log.json").read_text())
    assert np.isfinite(log[-1]["train_loss"]) and log[-1]["val_dice_Bright"] is not None


def test_one_dataset_whose_cases_differ_is_validated_on_the_classes_each_has(fine, tmp_path):
    """Per-case label_groups in one listing: coarse validation cases are scored on the merged class."""
    listing = json.loads((fine / "dataset.json").read_text())
    coarse = _coarsen(fine, tmp_path / "coarse", None, per_case={"label_groups": {"1": ["Bright", "Dark"]}},
                      labels={"0": "background", "1": "Bright", "2": "Dark"})
    mixed = json.loads((coarse / "dataset.json").read_text())
    for entry in listing["training"][:3]:
        entry["image"], entry["label"] = str(fine / entry["image"]), str(fine / entry["label"])
    mixed["training"] = listing["training"][:3] + mixed["training"][3:]
    (coarse / "dataset.json").write_text(json.dumps(mixed))
    validation = [c.name for c in split_cases(load_datasets([coarse]).cases, 3, 1)[1]]
    assert any(n.startswith("coarse") for n in validation) and not all(n.startswith("coarse") for n in validation)
    bundle = load_bundle(train(_config(coarse, tmp_path, validation=3, seed=1)))
    log = json.loads((tmp_path / "work" / "training_log.json").read_text())
    assert log[-1]["val_dice_Bright+Dark"] is not None and log[-1]["val_dice_Bright"] is not None
    assert "Bright+Dark" in bundle.metadata["metrics"]["validation"]["region_dice"]


def test_a_run_on_several_datasets_resumes_identically(fine, tmp_path):
    coarse = _coarsen(fine, tmp_path / "coarse", {"1": ["Bright", "Dark"]})
    extra = {"extra_datasets": (str(coarse),), "batch_size": 4}
    train(_config(fine, tmp_path / "straight", **extra))
    train(_config(fine, tmp_path / "cut", max_time=1e-9, **extra))
    train(_config(fine, tmp_path / "cut", resume=True, **extra))
    straight = torch.load(tmp_path / "straight" / "work" / "checkpoints" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "cut" / "work" / "checkpoints" / "last.pt", weights_only=True)
    assert resumed["step"] == straight["step"] == 6
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
