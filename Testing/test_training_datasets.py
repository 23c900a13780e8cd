"""Dataset discovery: MSD folders, nnU-Net v2 folders, JSON and CSV pair lists (NIfTI and NRRD)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from AttentionUNetSegmentLib.training.datasets import inspect_dataset, load_dataset, split_cases
from AttentionUNetSegmentLib.errors import DatasetError


def _pair(folder, stem, image_name=None, extension=".nii.gz"):
    label = np.zeros((8, 9, 10), np.uint8)
    label[2:5, 2:6, 3:7] = 1
    image = (label * 50 + np.arange(label.size).reshape(label.shape) % 7).astype(np.int16)
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(exist_ok=True)
    image_path = folder / "imagesTr" / f"{image_name or stem}{extension}"
    label_path = folder / "labelsTr" / f"{stem}{extension}"
    sitk.WriteImage(sitk.GetImageFromArray(image), str(image_path))
    sitk.WriteImage(sitk.GetImageFromArray(label), str(label_path))
    return image_path, label_path


def test_nnunet_v2_layout(tmp_path):
    for stem in ("liver_1", "liver_2"):
        _pair(tmp_path, stem, image_name=f"{stem}_0000")
    (tmp_path / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "Liver": 1}, "numTraining": 2,
        "file_ending": ".nii.gz"}))
    dataset = load_dataset(tmp_path)
    assert [case.name for case in dataset.cases] == ["liver_1", "liver_2"]
    assert dataset.labels == {1: "Liver"} and dataset.modality == "CT"
    assert inspect_dataset(dataset).cases[0].label_voxels == {1: 48}


def test_csv_pairs_of_nrrd_files(tmp_path):
    rows = ["image,label"]
    for stem in ("a", "b", "c"):
        image, label = _pair(tmp_path, stem, extension=".nrrd")
        rows.append(f"{image.relative_to(tmp_path)},{label.relative_to(tmp_path)}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DatasetError, match="label names"):
        load_dataset(tmp_path / "pairs.csv")
    dataset = load_dataset(tmp_path / "pairs.csv", {1: "Lesion"})
    assert [case.name for case in dataset.cases] == ["a", "b", "c"]
    assert len(inspect_dataset(dataset).cases) == 3
    training, validation = split_cases(dataset.cases, 1, seed=0)
    assert len(training) == 2 and len(validation) == 1
    assert split_cases(dataset.cases, 1, seed=0) == (training, validation)  # seeded


def test_listing_errors_are_actionable(tmp_path):
    with pytest.raises(DatasetError, match="no dataset.json"):
        load_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"1": "Lesion"}, "training": []}))
    with pytest.raises(DatasetError, match="no training cases"):
        load_dataset(tmp_path)
    _pair(tmp_path, "x")
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background"}, "training": [
        {"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]}))
    with pytest.raises(DatasetError, match="no foreground label"):
        load_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "40000": "Lesion"}, "training": [
        {"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]}))
    with pytest.raises(DatasetError, match=r"outside 0\.\.32767"):  # label maps are int16 end to end
        load_dataset(tmp_path)


@pytest.mark.parametrize("blocked", ["npz", "json"])
def test_a_failing_cache_write_leaves_no_partial_file(tmp_path, blocked):
    """A cache entry whose arrays or description cannot be put in place (here a folder holds its name) fails with
    no partial or temporary file left behind, and never a description of arrays that are not there."""
    from AttentionUNetSegmentLib.preprocessing.preprocess import PreprocessingSpec
    from AttentionUNetSegmentLib.training.datasets import CaseCache

    _pair(tmp_path / "data", "case_1")
    (tmp_path / "data" / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "A": 1},
                                                                "modality": {"0": "MRI"}}))
    case = load_dataset(tmp_path / "data").cases[0]
    cache = CaseCache(tmp_path / "cache", PreprocessingSpec(target_spacing=(1.0, 1.0, 1.0)))
    blocker = cache.directory / f"case_1.{blocked}"
    blocker.mkdir(parents=True)
    (blocker / "keep").write_text("not the tool's")
    with pytest.raises(OSError):
        cache.load(case)
    left = sorted(path.relative_to(cache.directory).as_posix() for path in cache.directory.rglob("*"))
    if blocked == "npz":
        assert left == ["case_1.npz", "case_1.npz/keep"]
    else:  # the arrays are complete and in place; without their description load() rebuilds them
        assert left == ["case_1.json", "case_1.json/keep", "case_1.npz"]
