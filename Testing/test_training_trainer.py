"""Training on tiny synthetic datasets: the loss falls, resume is exact, DDP runs under torchrun, and bad
datasets are refused (naming the case) before any training starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from AttentionUNetSegmentLib.model.bundle import load_bundle
from AttentionUNetSegmentLib.cli.commands import main
from AttentionUNetSegmentLib.training.datasets import CaseCache, load_dataset
from AttentionUNetSegmentLib.errors import AttentionUNetError, DatasetError
from AttentionUNetSegmentLib.preprocessing.preprocess import PreprocessingSpec
from AttentionUNetSegmentLib.inference.predictor import Predictor
from AttentionUNetSegmentLib.training.trainer import TrainingConfig, epoch_label, to_channel_labels, train

SHAPE = (20, 24, 20)  # (z, y, x)


def _write(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 1.0)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((-10.0, 4.0, 2.0))
    sitk.WriteImage(image, str(path))


def make_dataset(root: Path, cases: int = 6, seed: int = 0, values=(1, 2)) -> Path:
    """An MSD-layout dataset of noisy boxes: label ``values[0]`` a bright box, ``values[1]`` a darker box next to
    it."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for index in range(cases):
        label = np.zeros(SHAPE, np.uint8)
        z, y, x = rng.integers(3, 7), rng.integers(3, 9), rng.integers(3, 7)
        label[z:z + 8, y:y + 9, x:x + 5] = values[0]
        label[z:z + 8, y:y + 9, x + 5:x + 10] = values[1]
        image = (rng.normal(0.0, 0.3, SHAPE) + np.select([label == values[0], label == values[1]], [2.0, 1.0], 0.0)) \
            * 100 + 400
        name = f"case_{index:03d}.nii.gz"
        _write(image.astype(np.float32), root / "imagesTr" / name)
        _write(label, root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (root / "dataset.json").write_text(json.dumps({
        "name": "boxes", "labels": {"0": "background", str(values[0]): "Bright", str(values[1]): "Dark"},
        "modality": {"0": "MRI"},
        "numTraining": cases, "training": training}))
    return root


def _config(dataset: Path, out: Path, **changes) -> TrainingConfig:
    settings = dict(dataset=str(dataset), output=str(out / "model"), work_dir=str(out / "work"), name="boxes",
                    channels=(4, 8, 16), patch_size=(16, 16, 16), batch_size=2, epochs=2, iterations_per_epoch=3,
                    validation=2, learning_rate=1e-2, progress="none", threads=1, seed=3)
    settings.update(changes)
    return TrainingConfig(**settings)


@pytest.fixture(scope="module")
def boxes(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("boxes"))


def test_label_values_become_consecutive_channels(tmp_path):
    dataset = load_dataset(make_dataset(tmp_path / "gaps", cases=2, values=(1, 3)))
    cache = CaseCache(tmp_path / "cache", PreprocessingSpec(target_spacing=(1.0, 1.0, 1.0)))
    raw = cache.load_all(dataset.cases)
    mapped = to_channel_labels(raw, [1, 3])
    for before, after in zip(raw, mapped):
        np.testing.assert_array_equal(after.label, np.select([before.label == 1, before.label == 3], [1, 2], 0))
        assert sorted(after.foreground) == [1, 2]
        np.testing.assert_array_equal(after.foreground[2], before.foreground[3])
    assert all(a is b for a, b in zip(to_channel_labels(raw, [1, 2, 3]), raw))  # already channels: untouched


def test_training_with_label_values_that_have_gaps(tmp_path):
    """Labels {1, 3}: a 3-channel network, validation scored per label, and a bundle that writes 1 and 3 back."""
    dataset = make_dataset(tmp_path / "gaps", values=(1, 3))
    bundle = load_bundle(train(_config(dataset, tmp_path)))
    assert [(label.value, label.name) for label in bundle.labels] == [(1, "Bright"), (3, "Dark")]
    assert bundle.architecture["out_channels"] == 3
    log = json.loads((tmp_path / "work" / "training_log.json").read_text())
    assert {"val_dice_Bright", "val_dice_Dark"} <= set(log[-1])
    labels = Predictor(bundle, device="cpu").predict(sitk.ReadImage(str(dataset / "imagesTr" / "case_000.nii.gz")),
                                                     attention=False).labels
    assert set(np.unique(sitk.GetArrayViewFromImage(labels)).tolist()) <= {0, 1, 3}


def test_training_lowers_the_loss_and_exports_a_loadable_bundle(boxes, tmp_path):
    bundle_path = train(_config(boxes, tmp_path, epochs=4, iterations_per_epoch=6))
    log = json.loads((tmp_path / "work" / "training_log.json").read_text())
    assert len(log) == 4
    assert log[-1]["train_loss"] < 0.8 * log[0]["train_loss"]
    assert (tmp_path / "work" / "training_curves.png").stat().st_size > 1000
    assert (tmp_path / "work" / "training_log.csv").read_text().startswith("epoch,step,")

    bundle = load_bundle(bundle_path)
    assert [label.name for label in bundle.labels] == ["Bright", "Dark"]
    assert bundle.patch_size == (16, 16, 16)
    assert bundle.architecture["deep_supervision"] is False  # the heads are training-only
    validation = bundle.metadata["metrics"]["validation"]
    assert validation["cases"] == 2 and set(validation["dice"]) == {"Bright", "Dark"}
    plan = json.loads((tmp_path / "work" / "plan.json").read_text())
    assert len(plan["validation_cases"]) == 2 and not set(plan["validation_cases"]) & set(plan["training_cases"])
    assert plan["plan"]["flip_axes"] == ["x", "y", "z"]
    assert bundle.mirror_axes == ("x", "y", "z")  # what TTA may flip is what training flipped
    # The domain guard's record of the training data: every case's field of view and spacing, along world axes.
    size_xyz = [float(n) for n in SHAPE[::-1]]
    assert bundle.domain["field_of_view_mm"]["median"] == size_xyz
    assert bundle.domain["spacing_mm"]["max"] == [1.0, 1.0, 1.0] and bundle.domain["modality"] == "MRI"
    assert plan["domain"] == bundle.domain


def test_resume_continues_identically(boxes, tmp_path):
    train(_config(boxes, tmp_path / "straight"))
    # The same run cut short by its time budget after one step, then resumed.
    train(_config(boxes, tmp_path / "cut", max_time=1e-9))
    cut = torch.load(tmp_path / "cut" / "work" / "checkpoints" / "last.pt", weights_only=True)
    assert cut["step"] == 1
    train(_config(boxes, tmp_path / "cut", resume=True))
    straight = torch.load(tmp_path / "straight" / "work" / "checkpoints" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "cut" / "work" / "checkpoints" / "last.pt", weights_only=True)
    assert resumed["step"] == straight["step"] == 6
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    # The cut epoch is logged as the fraction it reached; the resumed run then logs the whole epochs.
    assert [row["epoch"] for row in resumed["history"]] == [0.33, 1, 2]
    assert [row["epoch"] for row in straight["history"]] == [1, 2]


def test_checkpoint_final_exports_the_last_epoch_and_may_change_on_resume(boxes, tmp_path):
    bundle = load_bundle(train(_config(boxes, tmp_path, epochs=3, checkpoint="final")))
    checkpoints = tmp_path / "work" / "checkpoints"
    last = torch.load(checkpoints / "last.pt", weights_only=True)
    assert bundle.state_dict.keys() <= last["model"].keys()
    assert all(torch.equal(value, last["model"][key]) for key, value in bundle.state_dict.items())
    validation = bundle.metadata["metrics"]["validation"]
    assert (validation["epoch"], validation["checkpoint"]) == (3, "final")
    assert validation["mean_dice"] == last["history"][-1]["val_dice_mean"]
    # The finished run resumed with --checkpoint best re-exports its best epoch (no further training).
    best = torch.load(checkpoints / "best.pt", weights_only=True)
    assert best["epoch"] < 3  # this seeded run peaks before its end, so the two exports differ
    bundle = load_bundle(train(_config(boxes, tmp_path, epochs=3, checkpoint="best", resume=True)))
    assert all(torch.equal(value, best["model"][key]) for key, value in bundle.state_dict.items())
    validation = bundle.metadata["metrics"]["validation"]
    assert (validation["epoch"], validation["checkpoint"]) == (best["epoch"], "best")
    with pytest.raises(AttentionUNetError, match="--checkpoint must be one of best, final"):
        train(_config(boxes, tmp_path / "other", checkpoint="last"))
    assert not (tmp_path / "other").exists()


def test_cache_is_reused_and_rebuilt_when_a_source_changes(boxes, tmp_path):
    dataset = load_dataset(boxes)
    cache = CaseCache(tmp_path / "cache", PreprocessingSpec())
    first = cache.load(dataset.cases[0])
    arrays = next(cache.directory.glob("*.npz"))
    stamp = arrays.stat().st_mtime_ns
    again = cache.load(dataset.cases[0])
    assert arrays.stat().st_mtime_ns == stamp and np.array_equal(first.label, again.label)
    assert abs(float(first.image.mean())) < 1e-3 and first.image.dtype == np.float32  # z-scored
    os.utime(dataset.cases[0].image, ns=(stamp + 10**9, stamp + 10**9))
    cache.load(dataset.cases[0])
    assert arrays.stat().st_mtime_ns != stamp


@pytest.mark.slow
def test_ddp_with_two_gloo_processes_under_torchrun(boxes, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "AttentionUNetSegmentLib", "train",
               str(boxes), "--output", str(tmp_path / "model"), "--work-dir", str(tmp_path / "work"),
               "--channels", "4", "8", "16", "--patch-size", "16", "16", "16", "--batch-size", "1",
               "--epochs", "2", "--iterations-per-epoch", "2", "--validation", "2", "--threads", "1",
               "--device", "cpu", "--progress", "none"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    bundle = load_bundle(tmp_path / "model")
    assert "2 process(es)" in bundle.metadata["metrics"]["training"]["hardware"]
    log = json.loads((tmp_path / "work" / "training_log.json").read_text())
    assert [row["step"] for row in log] == [2, 4]
    state = torch.load(tmp_path / "work" / "checkpoints" / "last.pt", weights_only=True)
    assert len(state["samplers"]) == 2  # one sampler state per process, so a resume is exact under DDP too
    assert state["samplers"][0] != state["samplers"][1]


def _break(dataset: Path, how: str) -> str:
    """Damage ``case_001`` (or the whole set) in one way; returns what the error must mention."""
    image = dataset / "imagesTr" / "case_001.nii.gz"
    label = dataset / "labelsTr" / "case_001.nii.gz"
    if how == "geometry":
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(label)))
        _write(array, label, spacing=(1.0, 1.0, 2.0))
        return "spacing"
    if how == "unknown label":
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(label)))
        array[0, 0, 0] = 7
        _write(array, label)
        return "[7]"
    if how == "empty label":
        _write(np.zeros(SHAPE, np.uint8), label)
        return "empty"
    if how == "unreadable":
        image.write_bytes(b"not an image at all")
        return "unusable"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["geometry", "unknown label", "empty label", "unreadable"])
def test_bad_cases_are_refused_before_training(tmp_path, how, capsys):
    dataset = make_dataset(tmp_path / "data", cases=3)
    expected = _break(dataset, how)
    status = main(["train", str(dataset), "--output", str(tmp_path / "model"), "--channels", "4", "8",
                   "--epochs", "1", "--progress", "none"])
    assert status == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: case case_001") and expected in message
    assert not (tmp_path / "model").exists()
    assert not (tmp_path / "model.work" / "checkpoints").exists()


def test_too_few_cases_for_the_split(tmp_path):
    dataset = make_dataset(tmp_path / "data", cases=2)
    with pytest.raises(DatasetError, match="too few"):
        train(_config(dataset, tmp_path, validation=2))


def test_bf16_autocast_checkpointing_attention_loss_and_elastic_run(boxes, tmp_path):
    bundle_path = train(_config(boxes, tmp_path, epochs=1, iterations_per_epoch=2, amp="bf16",
                                gradient_checkpointing=True, attention_loss_weight=0.1, elastic=True))
    assert load_bundle(bundle_path).metadata["metrics"]["training"]["steps"] == 2


def test_forced_ct_normalisation_reaches_the_bundle(boxes, tmp_path):
    bundle = load_bundle(train(_config(boxes, tmp_path, normalization="ct", epochs=1, iterations_per_epoch=1)))
    normalization = bundle.preprocessing.normalization
    assert normalization["scheme"] == "ct" and normalization["clip"][0] < normalization["clip"][1]


def _train_fails(capsys, dataset: Path, output: Path, *options: str) -> str:
    """Run ``attention-unet train`` expecting a clean refusal; returns its one error line."""
    status = main(["train", str(dataset), "--output", str(output), "--channels", "4", "8", "--epochs", "1",
                   "--progress", "none", *options])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and lines and lines[-1].startswith("error: "), lines
    return lines[-1]


@pytest.mark.parametrize("options, expected", [
    (["--epochs", "0"], "--epochs must be positive"),
    (["--iterations-per-epoch", "0"], "--iterations-per-epoch must be positive"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--learning-rate", "-0.001"], "--learning-rate must be positive"),
    (["--validation", "1.5"], "--validation 1.5"),
    (["--foreground-fraction", "2"], "--foreground-fraction"),
    (["--label-names", "0=background", "1=Bright", "2=Dark"], "0 is the background"),
    (["--label-names", "1=Bright", "40000=Dark"], "1..32767"),
    (["--label-names", "1=Bright", "1=Dark"], "label 1 twice"),
])
def test_unusable_options_are_refused_before_anything_is_written(boxes, tmp_path, capsys, options, expected):
    message = _train_fails(capsys, boxes, tmp_path / "model", *options)
    assert expected in message
    assert not (tmp_path / "model").exists() and not (tmp_path / "model.work").exists()


@pytest.mark.parametrize("output, options, expected", [
    ("my model", [], "'name' 'my model'"),
    ("model", ["--model-version", " "], "'version' must be a non-empty string"),
    ("model", ["--label-names", "1=Same", "2=Same"], "repeats value 2 or name 'Same'"),
    ("model", ["--channels", "8"], "--channels 8: give 2..8 levels"),
])
def test_what_the_bundle_export_would_refuse_is_refused_before_training(boxes, tmp_path, capsys, output, options,
                                                                          expected):
    message = _train_fails(capsys, boxes, tmp_path / output, *options)
    assert expected in message and "model.json" not in message
    assert not (tmp_path / output).exists() and not (tmp_path / f"{output}.work").exists()


@pytest.mark.parametrize("step, label", [(1, 0.01), (5251, 21.01), (5499, 21.99), (5500, 22), (5360, 21.44)])
def test_epoch_labels_of_time_budget_cuts_stay_between_whole_epochs(step, label):
    assert epoch_label(step, 250) == label


@pytest.mark.parametrize("kind", ["bar", "json"])
def test_the_runs_lines_go_through_its_progress_reporter(boxes, tmp_path, capsys, kind):
    """Preparation, epoch and export lines are the reporter's ``log``: whole lines above a bar (never inside one
    of its frames); with ``json`` stdout holds only the records and stderr nothing."""
    train(_config(boxes, tmp_path, progress=kind))
    captured = capsys.readouterr()
    if kind == "json":
        records = [json.loads(line) for line in captured.out.splitlines()]
        assert [r["stage"] for r in records] == ["train", "train"] and captured.err == ""
        return
    frames = [frame for line in captured.err.split("\n") for frame in line.split("\r")]
    bars = [frame for frame in frames if "% [" in frame]  # "{stage:<28.28}|{bar}| {n}% [{elapsed}<{eta}]"
    lines = [frame for frame in frames if frame.strip() and frame not in bars]
    starts = ("checking 6 cases", "plan: spacing", "epoch 1: loss", "epoch 2: loss", "wrote bundle")
    assert [[line for line in lines if line.startswith(start)] != [] for start in starts] == [True] * 5, lines
    assert len(lines) == 5 and bars and not [f for f in bars if any(w in f for w in ("checking", "plan:", "(best",
                                                                                   "wrote"))]
