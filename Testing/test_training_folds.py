"""k-fold cross-validation and fold ensembles: seeded fold splits recorded in the plan and the bundle, the
``ensemble`` command and its checks, the format_version 3 bundle (one weights file per fold, each digested), and
inference that averages the folds' softmax inside the sliding window."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from AttentionUNetSegmentLib.model.bundle import (DIGEST_KEY, FOLDS_FORMAT_VERSION, MAX_WINDOW_BYTES, ModelBundle,
                                            ModelRegistry, estimate_memory, file_sha256, load_bundle,
                                            parameter_count, read_metadata, save_bundle, save_ensemble)
from AttentionUNetSegmentLib.cli.commands import main
from AttentionUNetSegmentLib.training.datasets import CaseRecord, load_dataset, plan_split, split_cases
from AttentionUNetSegmentLib.errors import DatasetError, ModelBundleError
from AttentionUNetSegmentLib.inference.predictor import FoldEnsemble, Predictor
from AttentionUNetSegmentLib.preprocessing.localization import Registration
from AttentionUNetSegmentLib.model.network import AttentionUNet
from AttentionUNetSegmentLib.training.trainer import train

from bundle_edits import edit_metadata
from conftest import REPO_ROOT, TINY_LABELS
from test_training_trainer import _config, make_dataset


def _records(count: int):
    return [CaseRecord(f"case_{i:03d}", Path(f"{i}.nii.gz"), Path(f"{i}_seg.nii.gz")) for i in range(count)]


@pytest.mark.parametrize("count, folds, held_out", [(23, 5, 0), (23, 5, 4), (40, 3, 0.25), (5, 5, 0)])
def test_fold_splits_are_seeded_disjoint_and_cover_every_case(count, folds, held_out):
    cases = _records(count)
    splits = [plan_split(cases, 0.2, 7, held_out, folds, k) for k in range(folds)]
    again = [plan_split(cases, 0.2, 7, held_out, folds, k) for k in range(folds)]
    assert [s.to_dict() for s in splits] == [s.to_dict() for s in again]  # separate runs agree
    fold_cases = splits[0].folds
    held = set(splits[0].held_out)
    for k, split in enumerate(splits):
        assert split.folds == fold_cases and set(split.held_out) == held  # every fold run records the same split
        assert split.validation == fold_cases[k]
        assert set(split.training) == set().union(*fold_cases) - set(fold_cases[k])
        assert not (set(split.training) | set(split.validation)) & held
    names = [f for fold in fold_cases for f in fold]
    assert len(names) == len(set(names))  # disjoint
    assert set(names) | held == {c.name for c in cases}  # union: every case that is not held out
    assert max(map(len, fold_cases)) - min(map(len, fold_cases)) <= 1
    if held_out:  # the held-out cases are those --validation COUNT would pick with the same seed
        assert held == {c.name for c in split_cases(cases, held_out, 7)[1]}
    if not held_out:  # the folds do not depend on the listing order
        assert plan_split(cases[::-1], 0.2, 7, 0, folds, 0).folds == fold_cases
    assert plan_split(cases, 0.2, 8, held_out, folds, 0).folds != fold_cases


def test_a_run_without_folds_splits_as_before():
    cases = _records(30)
    training, validation = split_cases(cases, 6, 3)
    split = plan_split(cases, 6, 3)
    assert split.training == [c.name for c in training] and split.validation == [c.name for c in validation]
    assert split.held_out == [] and split.folds is None


def test_too_few_cases_for_the_folds_are_refused():
    with pytest.raises(DatasetError, match="cannot fill 5 folds"):
        plan_split(_records(4), 0.2, 0, 0, 5, 0)
    with pytest.raises(DatasetError, match="too few to hold out"):
        plan_split(_records(6), 0.2, 0, 3, 5, 0)


def _fails(capsys, *argv: str) -> str:
    status = main(list(argv))
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def boxes(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("fold-boxes"), cases=7)


@pytest.mark.parametrize("options, expected", [
    (["--fold", "3", "--folds", "3"], "--fold 3: give a fold in 0..2 (--folds 3)"),
    (["--fold", "-1", "--folds", "3"], "--fold -1: give a fold in 0..2"),
    (["--fold", "0", "--folds", "1"], "--folds 1: give a whole number of folds, at least 2"),
    (["--fold", "0"], "--fold and --folds go together"),
    (["--folds", "3"], "--fold and --folds go together"),
    (["--fold", "all"], "--fold and --folds go together"),
    (["--fold", "first", "--folds", "3"], "invalid fold 'first'"),
    (["--fold", "0", "--folds", "3", "--validation", "2"], "--validation and --folds exclude each other"),
    (["--held-out", "-1"], "--held-out -1"),
    (["--fold", "0", "--folds", "7", "--held-out", "1"], "7 case(s) is too few to hold out 1: 7 folds need"),
    (["--fold", "0", "--folds", "8"], "7 case(s) cannot fill 8 folds"),
])
def test_fold_options_are_checked_before_anything_is_written(boxes, tmp_path, capsys, options, expected):
    message = _fails(capsys, "train", str(boxes), "--output", str(tmp_path / "model"), "--channels", "4", "8",
                     "--epochs", "1", "--progress", "none", *options)
    assert expected in message
    assert not (tmp_path / "model").exists()


@pytest.fixture(scope="module")
def fold_runs(boxes, tmp_path_factory):
    """Two folds of one cross-validation with one held-out case, trained separately (as on two machines)."""
    root = tmp_path_factory.mktemp("folds")
    paths = []
    for fold in (1, 0):
        paths.append(train(_config(boxes, root / f"fold{fold}", epochs=1, iterations_per_epoch=2, folds=2, fold=fold,
                                   held_out=1)))
    return root, [load_bundle(p) for p in paths[::-1]]


def test_fold_runs_record_one_split_in_the_plan_and_the_bundle(boxes, fold_runs):
    root, bundles = fold_runs
    plans = [json.loads((root / f"fold{k}" / "work" / "plan.json").read_text()) for k in (0, 1)]
    splits = [b.metadata["metrics"]["training"]["split"] for b in bundles]
    for k, (plan, split) in enumerate(zip(plans, splits)):
        assert plan["split"] == split and split["fold"] == k and split["folds"] == 2
        assert plan["validation_cases"] == split["fold_cases"][k]
        assert set(plan["training_cases"]) == set(split["fold_cases"][1 - k])
        assert split["held_out_cases"] and not set(split["held_out_cases"]) & set(plan["training_cases"]
                                                                                   + plan["validation_cases"])
        # The held-out case never reached the cache (nor the plan, nor the domain).
        cached = {p.name.split(".")[0] for p in (root / f"fold{k}" / "work" / "cache").rglob("*.npz")}
        assert cached == set(plan["training_cases"] + plan["validation_cases"])
        assert bundles[k].domain["field_of_view_mm"]["median"] is not None
    assert {key: v for key, v in splits[0].items() if key not in ("fold", "validation_cases")} == \
        {key: v for key, v in splits[1].items() if key not in ("fold", "validation_cases")}
    names = {case.name for case in load_dataset(boxes).cases}
    assert set(splits[0]["held_out_cases"]) | set().union(*map(set, splits[0]["fold_cases"])) == names
    assert plans[0]["plan"] == plans[1]["plan"]


def test_resuming_with_another_fold_is_refused(boxes, fold_runs, capsys):
    root, _ = fold_runs
    work = root / "fold0" / "work"
    message = _fails(capsys, "train", str(boxes), "--output", str(root / "fold0" / "model"), "--work-dir", str(work),
                     "--channels", "4", "8", "--progress", "none", "--resume", "--fold", "1", "--folds", "2")
    assert "is for fold 0 of 2, not fold 1 of 2" in message


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "AttentionUNetSegmentLib", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def ensemble(fold_runs, tmp_path_factory):
    _, bundles = fold_runs
    output = tmp_path_factory.mktemp("ensembles") / "boxes-ensemble"
    result = run_cli("ensemble", bundles[1].path, bundles[0].path, "--output", output)
    assert result.returncode == 0, result.stderr
    assert "| **mean** |" in result.stdout and "2 folds" in result.stderr
    return load_bundle(output)


def test_the_ensemble_bundle_holds_every_fold_with_its_digest(fold_runs, ensemble):
    _, bundles = fold_runs
    metadata = ensemble.metadata
    assert metadata["format_version"] == FOLDS_FORMAT_VERSION and ensemble.fold_count == 2
    assert metadata["weights"] == {"folds": [{"file": f"fold{k}.safetensors", "sha256": bundles[k].sha256}
                                             for k in (0, 1)]}
    for k in (0, 1):
        assert file_sha256(ensemble.path / f"fold{k}.safetensors") == bundles[k].sha256
        for key, value in bundles[k].state_dict.items():
            assert torch.equal(ensemble.state_dicts[k][key], value)
    assert sorted(p.name for p in ensemble.path.iterdir()) == ["fold0.safetensors", "fold1.safetensors",
                                                               "model.json"]
    assert ensemble.sha256 == metadata[DIGEST_KEY]  # what reports record: covers every fold's weights
    table = metadata["metrics"]["cross_validation"]
    for k in (0, 1):
        assert table["per_fold"][k]["dice"] == bundles[k].metadata["metrics"]["validation"]["dice"]
    for name in ("Bright", "Dark"):
        values = [bundles[k].metadata["metrics"]["validation"]["dice"][name] for k in (0, 1)]
        assert table["mean"]["dice"][name] == pytest.approx(np.mean(values), abs=1e-5)
    assert metadata["metrics"]["training"]["split"]["fold_cases"] == \
        bundles[0].metadata["metrics"]["training"]["split"]["fold_cases"]
    for key in ("architecture", "labels", "preprocessing", "inference", "domain"):
        assert metadata[key] == bundles[0].metadata[key]


def test_models_lists_the_fold_count_and_prints_the_cross_validation_card(fold_runs, ensemble):
    env = dict(os.environ, ATTENTION_UNET_MODELS=str(ensemble.path.parent))
    listed = run_cli("models", "--json", env=env)
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["boxes"]["folds"] == 2 and rows["boxes"]["status"] == "ok"
    assert rows["boxes"]["size_bytes"] == sum((ensemble.path / f"fold{k}.safetensors").stat().st_size for k in (0, 1))
    assert rows["hippocampus"]["folds"] == 1
    table = run_cli("models", env=env).stdout
    assert "folds" in table.splitlines()[0]
    card = run_cli("models", "--card", ensemble.path).stdout
    dice = ensemble.metadata["metrics"]["cross_validation"]["per_fold"][1]["dice"]["Dark"]
    assert "## Cross-validation" in card and f"| 1 | " in card and f"{dice:.3f}" in card
    assert "2 folds (fold ensemble" in card


@pytest.mark.parametrize("case, expected", [
    ("duplicate", "are both fold 0"),
    ("missing", "fold(s) 1 of 2 are missing"),
    ("not-a-fold", "is not one fold of a cross-validation"),
    ("other-labels", "differ in labels"),
    ("output-is-a-fold", "which it would replace"),
    ("output-exists", "already exists; choose another --output or pass --force"),
    ("force-onto-a-folder", "is not a model bundle"),
])
def test_folds_that_do_not_belong_together_are_refused(fold_runs, tiny_bundle, tmp_path, capsys, case, expected):
    _, bundles = fold_runs
    folds = [bundles[0].path, bundles[1].path]
    output, extra = tmp_path / "ensemble", []
    if case == "duplicate":
        folds = [bundles[0].path, bundles[0].path]
    elif case == "missing":
        folds = [bundles[0].path]
    elif case == "not-a-fold":
        folds = [bundles[0].path, tiny_bundle.path]
    elif case == "other-labels":
        renamed = Path(shutil.copytree(bundles[1].path, tmp_path / "renamed"))
        edit_metadata(renamed, lambda m: m["labels"][0].update(name="Other"))
        folds = [bundles[0].path, renamed]
    elif case == "output-is-a-fold":
        output, extra = bundles[1].path, ["--force"]
    elif case == "output-exists":
        output.mkdir()
    elif case == "force-onto-a-folder":
        output.mkdir()
        (output / "notes.txt").write_text("mine")
        extra = ["--force"]
    assert expected in _fails(capsys, "ensemble", *map(str, folds), "--output", str(output), *extra)
    assert load_bundle(bundles[1].path).sha256 == bundles[1].sha256  # no fold was touched
    if case in ("output-exists", "force-onto-a-folder"):
        assert [p.name for p in output.iterdir()] == ([] if case == "output-exists" else ["notes.txt"])
    elif case != "output-is-a-fold":
        assert not output.exists()
    assert not [p for p in output.parent.iterdir() if p.name.startswith(".ensemble")]


def test_a_tampered_fold_is_refused_naming_its_file(ensemble, tmp_path, capsys):
    copy = Path(shutil.copytree(ensemble.path, tmp_path / "tampered"))
    weights = copy / "fold1.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ModelBundleError, match=r"sha256 of fold1\.safetensors is .* but model\.json expects"):
        load_bundle(copy)
    image = tmp_path / "image.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32)),
                    str(image))
    assert "fold1.safetensors" in _fails(capsys, "segment", str(image), "--output-dir", str(tmp_path / "out"),
                                         "--model", str(copy), "--progress", "none")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["weights"]["folds"][1].update(sha256="0" * 64), "metadata_sha256"),  # without a new digest
    (lambda m: m.update(format_version=2), "weights.folds needs format_version 3"),
    (lambda m: m["weights"]["folds"][1].update(file="fold0.safetensors"), "names a file twice"),
    (lambda m: m["weights"]["folds"].pop(), "list 2..16"),
    (lambda m: m["weights"].update(file="model.safetensors"), "the only key of 'weights'"),
    (lambda m: m["weights"]["folds"][0].update(file="fold0.pt"), r"weights.folds\[0\].file 'fold0.pt' is not a"),
])
def test_malformed_fold_lists_are_refused(ensemble, tmp_path, edit, message):
    copy = Path(shutil.copytree(ensemble.path, tmp_path / "edited"))
    edit_metadata(copy, edit, redigest=message != "metadata_sha256")
    with pytest.raises(ModelBundleError, match=message):
        read_metadata(copy)


def test_an_ensemble_names_its_fold_when_one_network_is_asked_for(ensemble):
    with pytest.raises(ModelBundleError, match="ensemble of 2 folds"):
        ensemble.build_model()
    assert isinstance(ensemble.build_model(fold=1), AttentionUNet)
    with pytest.raises(ModelBundleError, match="fold 2 does not exist"):
        ensemble.build_model(fold=2)


def test_summary_of_an_ensemble_describes_its_network(ensemble, capsys):
    assert main(["summary", "--model", str(ensemble.path)]) == 0
    assert "params" in capsys.readouterr().out.lower()


def test_memory_estimates_count_every_fold(tiny_bundle, tmp_path):
    architecture = tiny_bundle.architecture
    one = estimate_memory(architecture, (32, 32, 32))
    three = estimate_memory(architecture, (32, 32, 32), folds=3)
    assert three - one == 4 * (2 * parameter_count(architecture) + architecture["out_channels"] * 32 ** 3)
    assert estimate_memory(architecture, (32, 32, 32), training=True, folds=3) > three
    # A network whose one copy a bundle may ask for, but not five of them.
    wide = {"in_channels": 1, "out_channels": 2, "channels": [4096, 4096]}
    assert estimate_memory(wide, (2, 2, 2)) < MAX_WINDOW_BYTES < estimate_memory(wide, (2, 2, 2), folds=5)
    metadata = dict(tiny_bundle.metadata, architecture=wide, labels=[TINY_LABELS[0]], format_version=3,
                    weights={"folds": [{"file": f"fold{k}.safetensors", "sha256": "0" * 64} for k in range(5)]})
    metadata["inference"] = dict(metadata["inference"], patch_size=[2, 2, 2])
    metadata.pop(DIGEST_KEY)
    with pytest.raises(ModelBundleError, match=r"\(5 folds\) needs about"):
        ModelBundle(metadata, tmp_path)


# ---------------------------------------------------------------------------------------------------- inference
@pytest.fixture(scope="module")
def random_folds(tiny_bundle, tmp_path_factory):
    """Three tiny random networks saved as single bundles, and their ensemble (``save_ensemble``)."""
    root = tmp_path_factory.mktemp("random-folds")
    bundles = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        model = AttentionUNet(in_channels=1, out_channels=3, channels=(4, 8, 16))
        bundles.append(save_bundle(model, tiny_bundle.metadata, root / f"fold{seed}"))
    return bundles, save_ensemble(bundles, tiny_bundle.metadata, root / "ensemble")


def _image(seed: int = 0, shape=(30, 44, 36)) -> sitk.Image:
    array = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    array[8:22, 10:30, 9:27] += 2.0
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.1, 0.9, 1.3))
    image.SetOrigin((3.0, -7.0, 11.0))
    return image


def _arrays(images) -> np.ndarray:
    return np.stack([sitk.GetArrayFromImage(image) for image in images])


@pytest.mark.parametrize("tta", [False, True])
def test_ensemble_prediction_is_the_mean_of_the_folds_softmax(random_folds, tta):
    folds, ensemble = random_folds
    image = _image()
    predictor = Predictor(ensemble, device="cpu", tta=tta)
    assert isinstance(predictor.model, FoldEnsemble) and len(predictor.model.members) == 3
    combined = predictor.predict(image, probabilities=True)
    singles = [Predictor(fold, device="cpu", tta=tta).predict(image, probabilities=True) for fold in folds]
    values = sorted(combined.probabilities)
    expected = np.mean([_arrays(single.probabilities[v] for v in values) for single in singles], axis=0)
    np.testing.assert_allclose(_arrays(combined.probabilities[v] for v in values), expected, atol=2e-5)
    labels = sitk.GetArrayFromImage(combined.labels)
    np.testing.assert_array_equal(labels, np.array([0, 1, 2])[expected.argmax(0)])
    for level, gate in enumerate(combined.attention):
        mean = np.mean([sitk.GetArrayFromImage(single.attention[level]) for single in singles], axis=0)
        np.testing.assert_allclose(sitk.GetArrayFromImage(gate), mean, atol=2e-5)
        assert gate.GetOrigin() == singles[0].attention[level].GetOrigin()


@pytest.mark.slow
def test_localized_ensemble_prediction_is_the_mean_of_the_folds(random_folds, tmp_path):
    """``predict_localized`` runs the ensemble through the same sliding window: its mapped-back probabilities are
    the folds' mean (a known registration, so no template search is involved)."""
    folds, ensemble = random_folds
    shipped = json.loads((REPO_ROOT / "AttentionUNetSegment" / "Resources" / "Models" / "hippocampus"
                          / "model.json").read_text())
    template = REPO_ROOT / "AttentionUNetSegment" / "Resources" / "Models" / "hippocampus" / "template.nii.gz"
    metadata = dict(ensemble.metadata, localization=shipped["localization"])
    located = save_ensemble(folds, {k: v for k, v in metadata.items() if k not in ("weights", DIGEST_KEY)},
                            tmp_path / "located", extra_files={"template.nii.gz": template})
    head = sitk.ReadImage(str(template), sitk.sitkFloat32)
    transform = sitk.AffineTransform(3)
    transform.SetTranslation((1.5, -2.0, 0.5))
    registration = Registration(transform, -0.5, 0.5, 1.0, (1.0, 1.0, 1.0), 0.0, (0.0, 0.0, 0.0))
    spec = located.localization
    combined = Predictor(located, device="cpu").predict_localized(head, spec, registration, probabilities=True)
    singles = [Predictor(fold, device="cpu").predict_localized(head, spec, registration, probabilities=True)
               for fold in folds]
    values = sorted(combined.probabilities)
    expected = np.mean([_arrays(single.probabilities[v] for v in values) for single in singles], axis=0)
    np.testing.assert_allclose(_arrays(combined.probabilities[v] for v in values), expected, atol=2e-5)


def test_the_slicer_panel_names_a_fold_ensemble(ensemble, tiny_bundle):
    pytest.importorskip("slicer")
    from slicer_module_shims import load_module

    describe = load_module().AttentionUNetSegmentLogic.describeModel
    mean = ensemble.metadata["metrics"]["cross_validation"]["mean"]["mean_dice"]
    assert f"Fold ensemble of 2 networks (their probabilities are averaged); cross-validation mean Dice {mean:.3f}" \
        in describe(ensemble)
    assert "Fold ensemble" not in describe(tiny_bundle)


def test_evaluate_held_out_scores_the_cases_no_fold_saw(boxes, ensemble, tiny_bundle, tmp_path, capsys):
    held = ensemble.metadata["metrics"]["training"]["split"]["held_out_cases"]
    assert main(["evaluate", str(boxes), "--model", str(ensemble.path), "--held-out", "--device", "cpu",
                 "--output", str(tmp_path / "scores"), "--progress", "none"]) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "scores.json").read_text())
    assert [case["case"] for case in report["cases"]] == held
    assert "records no held-out cases" in _fails(capsys, "evaluate", str(boxes), "--model", str(tiny_bundle.path),
                                                 "--held-out", "--output", str(tmp_path / "other"))
    assert not (tmp_path / "other.json").exists()


def test_force_replaces_an_ensemble_and_a_missing_fold_lists_it_as_broken(fold_runs, ensemble, tmp_path, capsys):
    _, bundles = fold_runs
    output = Path(shutil.copytree(ensemble.path, tmp_path / "models" / "boxes"))
    assert main(["ensemble", str(bundles[0].path), str(bundles[1].path), "--output", str(output), "--force",
                 "--model-version", "2.0.0"]) == 0
    capsys.readouterr()
    assert load_bundle(output).version == "2.0.0"
    (output / "fold1.safetensors").unlink()
    bundles_found, problems = ModelRegistry([output.parent]).scan()
    assert not bundles_found and len(problems) == 1 and "fold1.safetensors is missing" in problems[0][1]


def test_fold_all_trains_every_fold_then_writes_their_ensemble(boxes, tmp_path, capsys):
    options = ["train", str(boxes), "--output", str(tmp_path / "ensemble"), "--work-dir", str(tmp_path / "work"),
               "--name", "boxes", "--channels", "4", "8", "16", "--patch-size", "16", "16", "16", "--batch-size", "2",
               "--epochs", "1", "--iterations-per-epoch", "2", "--threads", "1", "--progress", "none", "--seed", "3",
               "--folds", "2", "--fold", "all", "--held-out", "1"]
    assert main(options) == 0
    capsys.readouterr()
    ensemble = load_bundle(tmp_path / "ensemble")
    folds = [load_bundle(tmp_path / "work" / f"fold{k}" / "model") for k in (0, 1)]
    assert ensemble.fold_count == 2 and [e["sha256"] for e in ensemble.weight_entries] == [f.sha256 for f in folds]
    assert [f.metadata["metrics"]["training"]["split"]["fold"] for f in folds] == [0, 1]
    assert "already exists" in _fails(capsys, *options)  # a finished run is not silently redone
    assert main(options + ["--resume"]) == 0  # every fold is complete: only the exports are written again
    capsys.readouterr()
    again = load_bundle(tmp_path / "ensemble")
    for before, after in zip(ensemble.state_dicts, again.state_dicts):
        assert all(torch.equal(before[key], after[key]) for key in before)
