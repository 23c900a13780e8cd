"""The input contract of model bundles, the model registry, training and evaluation inputs, in one place.

Sections: what ``--force`` may replace; what the integrity digests cover (and the pinned shipped bundle); resource
limits (metadata size, non-regular files, weights hashed in bounded chunks); a broken bundle on the search path;
architecture bounds and memory estimates; ``train --resume`` on a damaged work folder; ``evaluate`` on 2D/4D label
maps; which bundle ran. Real subprocesses where the process boundary is the point (exit status, one ``error:`` line,
memory limits).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from bundle_edits import edit_metadata
from AttentionUNetSegmentLib.model import bundle as bundle_module
from AttentionUNetSegmentLib.model.bundle import (
    BUNDLED_MODELS_DIR,
    DIGEST_KEY,
    MAX_METADATA_BYTES,
    MODELS_ENV,
    SHIPPED_DIGESTS,
    ModelRegistry,
    check_replaceable,
    estimate_memory,
    file_sha256,
    load_bundle,
    metadata_digest,
    parameter_count,
    read_metadata,
    save_bundle,
)
from AttentionUNetSegmentLib.cli.commands import main
from AttentionUNetSegmentLib.errors import InputImageError, ModelBundleError
from AttentionUNetSegmentLib.model.network import AttentionUNet
from AttentionUNetSegmentLib.preprocessing.preprocess import resample_to_spacing
from AttentionUNetSegmentLib.training.trainer import train

from test_training_trainer import _config, make_dataset

GIB = 1 << 30
SHIPPED = BUNDLED_MODELS_DIR / "hippocampus"


def run_cli(*args: str, env: Dict[str, str] = None, memory_limit: int = 0) -> subprocess.CompletedProcess:
    """``attention-unet ARGS`` in a fresh process, optionally under an address-space limit (bytes)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    return subprocess.run([sys.executable, "-m", "AttentionUNetSegmentLib", *args], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})), timeout=300,
                          preexec_fn=limit if memory_limit else None)


def one_error_line(result_or_err, after_log: bool = False) -> str:
    """The single ``error:`` line of a failed run (asserts exit status 2 and nothing else on stderr; with
    ``after_log``, training's progress log lines may come before it)."""
    if isinstance(result_or_err, subprocess.CompletedProcess):
        assert result_or_err.returncode == 2, result_or_err.stderr
        err = result_or_err.stderr
    else:
        err = result_or_err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and (after_log or len(lines) == 1) and "Traceback" not in err, err
    assert "Warning" not in err, err
    return lines[-1]


def snapshot(folder: Path) -> Dict[str, str]:
    """Relative path -> sha256 of every regular file below ``folder`` (anything else by its kind)."""
    def state(path: Path) -> str:
        if path.is_symlink() or not path.is_file():
            return "link" if path.is_symlink() else "dir" if path.is_dir() else "special"
        return hashlib.sha256(path.read_bytes()).hexdigest()

    return {str(p.relative_to(folder)): state(p) for p in sorted(folder.rglob("*"))}


def deep_json(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_bundle.path, tmp_path / "models" / "tiny"))


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "case.nii.gz"
    rng = np.random.default_rng(0)
    sitk.WriteImage(sitk.GetImageFromArray(rng.normal(100, 20, (12, 12, 12)).astype(np.float32)), str(path))
    return path


# ------------------------------------------------------------------------------- what --force may replace
def test_train_force_never_replaces_its_dataset(tmp_path):
    """The data-loss case of issue 10: ``train DATA --output DATA --force`` through the real CLI."""
    dataset = make_dataset(tmp_path / "data", cases=3)
    before = snapshot(dataset)
    result = run_cli("train", str(dataset), "--output", str(dataset), "--force", "--channels", "4", "8",
                     "--epochs", "1", "--progress", "none")
    assert "training dataset" in one_error_line(result)
    assert snapshot(dataset) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


@pytest.mark.parametrize("target", ["parent of the dataset", "work folder", "folder of other files", "file",
                                    "link to a bundle", "bundle with an extra file"])
def test_train_force_replaces_nothing_but_a_bundle(tiny_bundle, tmp_path, capsys, target):
    dataset = make_dataset(tmp_path / "area" / "data", cases=3)
    work = tmp_path / "work"
    output = {"parent of the dataset": tmp_path / "area", "work folder": work,
              "folder of other files": tmp_path / "notes", "file": tmp_path / "notes.txt",
              "link to a bundle": tmp_path / "link", "bundle with an extra file": tmp_path / "bundle"}[target]
    (work / "checkpoints").mkdir(parents=True)
    (work / "plan.json").write_text("{}")
    if target == "folder of other files":
        output.mkdir()
        (output / "model.json").write_text(json.dumps({"format": "something else"}))
    elif target == "file":
        output.write_text("my notes")
    elif target == "link to a bundle":
        output.symlink_to(tiny_bundle.path, target_is_directory=True)
    elif target == "bundle with an extra file":
        shutil.copytree(tiny_bundle.path, output)
        (output / "my_notes.txt").write_text("keep me")
    before = snapshot(tmp_path)
    status = main(["train", str(dataset), "--output", str(output), "--work-dir", str(work), "--force",
                   "--channels", "4", "8", "--epochs", "1", "--progress", "none"])
    line = one_error_line(capsys.readouterr().err)
    assert status == 2 and ("is (or holds)" in line or "force replaces only a model bundle" in line), line
    assert snapshot(tmp_path) == before


def test_save_bundle_force_replaces_a_bundle_or_an_empty_folder_only(tiny_bundle, tmp_path):
    model = tiny_bundle.build_model()
    dataset = make_dataset(tmp_path / "data", cases=2)
    before = snapshot(dataset)
    with pytest.raises(ModelBundleError, match="is not a model bundle"):
        save_bundle(model, tiny_bundle.metadata, dataset, force=True)
    assert snapshot(dataset) == before
    (tmp_path / "empty").mkdir()
    assert save_bundle(model, tiny_bundle.metadata, tmp_path / "empty", force=True).name == "tiny"
    save_bundle(model, tiny_bundle.metadata, tmp_path / "empty", force=True)  # a bundle replaces a bundle
    check_replaceable(tmp_path / "empty")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_force_replaces_a_localised_bundle_with_its_template_but_nothing_else(tmp_path):
    """The shipped bundle holds its localiser's template and notice besides the weights: still a bundle."""
    shipped = load_bundle(BUNDLED_MODELS_DIR / "hippocampus")
    copy = tmp_path / "hippocampus"
    shutil.copytree(shipped.path, copy)
    check_replaceable(copy)
    extras = {name: shipped.path / name for name in ("template.nii.gz", "LICENSE-MNI152.txt")}
    saved = save_bundle(shipped.build_model(), shipped.metadata, copy, force=True, extra_files=extras)
    assert saved.has_localizer and (copy / "template.nii.gz").is_file()
    (copy / "notes.txt").write_text("the user's")
    with pytest.raises(ModelBundleError, match="is not a model bundle"):
        check_replaceable(copy)


KILL_ON_THE_SECOND_RENAME = """
import os, signal, sys
from pathlib import Path
from AttentionUNetSegmentLib.model.bundle import load_bundle, save_bundle
target = Path(sys.argv[1])
rename = os.replace
def killed_on_the_staged_rename(source, destination):
    if Path(destination) == target:  # the old bundle is out of the way, the new one not yet in: die here
        os.kill(os.getpid(), signal.SIGKILL)
    rename(source, destination)
os.replace = killed_on_the_staged_rename
bundle = load_bundle(Path(sys.argv[2]))
save_bundle(bundle.build_model(), bundle.metadata, target, force=True)
"""


def test_a_save_killed_between_its_two_renames_is_undone_by_the_next_clean_up(tiny_bundle, tmp_path):
    """Replacing a bundle takes two renames (the old one out of the way, the staged one in). A process killed
    between them leaves the old bundle in the atomic module's retired folder and the new one staged: the next
    clean-up in that folder (any save or output there) moves the old bundle back and removes both, so the bundle
    is never lost; a live process's retired folder, and a retired copy whose replacement arrived, are not kept
    back: the first is left alone, the second removed."""
    from AttentionUNetSegmentLib.fileio.atomic import RETIRED_SUFFIX, TEMP_DIR_PREFIX, remove_stale_temporaries

    models = tmp_path / "models"
    old = save_bundle(tiny_bundle.build_model(), tiny_bundle.metadata, models / "tiny")
    killed = subprocess.run([sys.executable, "-c", KILL_ON_THE_SECOND_RENAME, str(old.path), str(tiny_bundle.path)],
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    retired = [p for p in models.iterdir() if p.name.endswith(RETIRED_SUFFIX)]
    assert not old.path.exists() and len(retired) == 1 and (retired[0] / "tiny" / "model.json").is_file()
    assert len(list(models.iterdir())) == 2  # and the staged new bundle

    host = retired[0].name[len(TEMP_DIR_PREFIX):].split("-")[0]
    living = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = models / f"{TEMP_DIR_PREFIX}{host}-{living.pid}{RETIRED_SUFFIX}"
        shutil.copytree(retired[0] / "tiny", alive / "other")  # mid-save in a live process
        remove_stale_temporaries(models)
        assert sorted(p.name for p in models.iterdir()) == sorted(["tiny", alive.name])
        assert (alive / "other" / "model.json").is_file() and not (models / "other").exists()
    finally:
        living.kill()
        living.wait()
    assert load_bundle(models / "tiny").sha256 == old.sha256
    # Killed after the second rename: the retired copy is the replaced bundle (pid 1 lives: stale by age here).
    arrived = models / f"{TEMP_DIR_PREFIX}{host}-1{RETIRED_SUFFIX}"
    shutil.copytree(models / "tiny", arrived / "tiny")
    (arrived / "tiny" / "model.json").write_text("{}")
    os.utime(arrived, (0, 0))
    remove_stale_temporaries(models)
    assert not arrived.exists() and load_bundle(models / "tiny").sha256 == old.sha256



def test_a_save_whose_second_rename_fails_puts_the_old_bundle_back(tiny_bundle, tmp_path, monkeypatch):
    """The staged bundle cannot be renamed in (injected: e.g. the disk was removed): the old bundle is moved back
    and the error raised; nothing of the save is left."""
    models = tmp_path / "models"
    old = save_bundle(tiny_bundle.build_model(), tiny_bundle.metadata, models / "tiny")
    rename = os.replace

    def failing(source, destination):
        if Path(destination) == old.path and "retired" not in str(source):
            raise OSError(5, "Input/output error (injected)")
        rename(source, destination)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="injected"):
        save_bundle(tiny_bundle.build_model(), tiny_bundle.metadata, models / "tiny", force=True)
    monkeypatch.undo()
    assert [p.name for p in models.iterdir()] == ["tiny"] and load_bundle(models / "tiny").sha256 == old.sha256


# ------------------------------------------------------------------------------------- integrity digests
def test_edited_metadata_is_refused_and_listed_as_broken(bundle_copy):
    def swap(metadata):
        first, second = metadata["labels"]
        first["name"], second["name"] = second["name"], first["name"]

    edit_metadata(bundle_copy, swap, redigest=False)
    with pytest.raises(ModelBundleError, match="does not match its metadata_sha256"):
        load_bundle(bundle_copy)
    bundles, problems = ModelRegistry([bundle_copy.parent]).scan()
    assert bundles == [] and "edited or damaged" in problems[0][1]


def test_format_version_1_bundle_loads_with_a_warning(bundle_copy, image, tmp_path, capsys):
    edit_metadata(bundle_copy, lambda m: (m.update(format_version=1), m.pop(DIGEST_KEY)))
    bundle = load_bundle(bundle_copy)
    assert bundle.labels[0].name == "Anterior" and "its weights are checked" in bundle.integrity_warning
    status = main(["segment", str(image), "--output-dir", str(tmp_path / "out"), "--model", str(bundle_copy),
                   "--device", "cpu", "--no-attention", "--progress", "none"])
    err = capsys.readouterr().err
    assert status == 0 and "warning: model bundle" in err and "format_version 1" in err
    # A current bundle must carry the digest: removing it is not a way around the check.
    edit_metadata(bundle_copy, lambda m: m.update(format_version=2))
    with pytest.raises(ModelBundleError, match="lacks metadata_sha256"):
        load_bundle(bundle_copy)


def test_shipped_bundle_matches_its_pinned_digest():
    metadata = json.loads((SHIPPED / "model.json").read_text())
    assert metadata[DIGEST_KEY] == metadata_digest(metadata) == SHIPPED_DIGESTS["hippocampus"]
    assert file_sha256(SHIPPED / metadata["weights"]["file"]) == metadata["weights"]["sha256"]
    assert load_bundle(SHIPPED).integrity_warning == ""


def test_shipped_bundle_that_does_not_match_its_pin_is_refused(tmp_path, monkeypatch):
    models = tmp_path / "Models"
    shutil.copytree(SHIPPED, models / "hippocampus")
    monkeypatch.setattr(bundle_module, "BUNDLED_MODELS_DIR", models)
    assert read_metadata(models / "hippocampus")["name"] == "hippocampus"
    # Consistent in itself (the digest recomputed after the edit), but not what this release shipped.
    edit_metadata(models / "hippocampus", lambda m: m["labels"][0].update(name="Tail"))
    with pytest.raises(ModelBundleError, match="this engine release pins"):
        read_metadata(models / "hippocampus")
    # The same bundle anywhere else is an ordinary user bundle.
    assert read_metadata(shutil.copytree(models / "hippocampus", tmp_path / "mine" / "hippocampus"))


def test_refresh_digest_rewrites_metadata_and_pin_but_never_the_weights(tmp_path):
    sys.path.insert(0, str(BUNDLED_MODELS_DIR))
    try:
        from finalize_hippocampus import refresh_digest
    finally:
        sys.path.remove(str(BUNDLED_MODELS_DIR))
    copy = Path(shutil.copytree(SHIPPED, tmp_path / "hippocampus"))
    pin_file = tmp_path / "bundle.py"
    shutil.copy(bundle_module.__file__, pin_file)
    weights = snapshot(copy)["model.safetensors"]
    edit_metadata(copy, lambda m: m["inference"].update(overlap=0.25), redigest=False)
    digest = refresh_digest(copy, "hippocampus", pin_file)
    metadata = json.loads((copy / "model.json").read_text())
    assert metadata[DIGEST_KEY] == digest == metadata_digest(metadata) and metadata["inference"]["overlap"] == 0.25
    assert f'"hippocampus": "{digest}"' in pin_file.read_text()
    assert snapshot(copy)["model.safetensors"] == weights


def test_finalize_scores_the_held_out_cases_and_says_which_cases_chose_the_weights():
    sys.path.insert(0, str(BUNDLED_MODELS_DIR))
    try:
        from finalize_hippocampus import msd_case_roles, selection_text
    finally:
        sys.path.remove(str(BUNDLED_MODELS_DIR))
    # --held-out 2 --validation 1: the held-out cases are scored, the validation case only chose the epoch.
    apart = {"validation_cases": ["v1"], "split": {"seed": 0, "held_out_cases": ["h1", "h2"], "validation_cases": 1}}
    assert msd_case_roles(apart) == (["h1", "h2"], ["v1"])
    text = selection_text(["h1", "h2"], ["v1"], (20, 40, 80, 144))
    assert "best mean Dice on 1 MSD validation cases" in text and "2 held-out MSD cases reported here played no " \
        "part" in text and "20-40-80-144" in text
    # --validation 2 (the v2 model's run): its validation cases are the held-out ones, and the card says so.
    same = {"validation_cases": ["h1", "h2"]}  # plan.json before --held-out had no "split"
    assert msd_case_roles(same) == (["h1", "h2"], ["h1", "h2"])
    assert "which are also the held-out MSD cases" in selection_text(["h1", "h2"], ["h1", "h2"], (16, 32))
    # --checkpoint final: no cases chose the weights.
    assert "final epoch of the training schedule" in selection_text(["h1", "h2"], ["v1"], (16, 32), "final")


# ------------------------------------------------------------------------- resource limits on the files
def test_huge_sparse_weights_are_refused_without_being_read(bundle_copy, image, tmp_path):
    os.truncate(bundle_copy / "model.safetensors", 16 * GIB)  # sparse: no disk used
    result = run_cli("segment", str(image), "--output-dir", str(tmp_path / "out"), "--model", str(bundle_copy),
                     "--device", "cpu", memory_limit=4 * GIB)
    line = one_error_line(result)
    assert "16384.0 MiB" in line and "tensors take at most" in line
    assert not (tmp_path / "out").exists()


def test_weights_are_hashed_in_bounded_chunks(tmp_path):
    big = tmp_path / "big.bin"
    with open(big, "wb") as stream:
        stream.truncate(GIB)
    code = ("import resource, sys; from AttentionUNetSegmentLib.model.bundle import file_sha256; "
            "used = int(open('/proc/self/status').read().split('VmSize:')[1].split()[0]) * 1024; "
            "resource.setrlimit(resource.RLIMIT_AS, (used + (256 << 20),) * 2); print(file_sha256(sys.argv[1]))")
    result = subprocess.run([sys.executable, "-c", code, str(big)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    expected = hashlib.sha256()
    for _ in range(1024):
        expected.update(bytes(1 << 20))
    assert result.stdout.strip() == expected.hexdigest()


def _make_broken(kind: str, folder: Path, tiny: Path) -> str:
    """A broken bundle ``folder/<kind>``; returns the words its problem must contain."""
    directory = folder / kind
    if kind == "no-weights":
        shutil.copytree(tiny, directory)
        (directory / "model.safetensors").unlink()
        return "missing"
    directory.mkdir(parents=True)
    metadata = directory / "model.json"
    if kind == "junk-16g":
        with open(metadata, "wb") as stream:
            stream.truncate(16 * GIB)
        return "MiB"
    if kind == "bad-json":
        metadata.write_text("{not json")
        return "not valid JSON"
    if kind == "deep":
        metadata.write_text(deep_json())
        return "nests too deeply"
    if kind == "fifo":
        os.mkfifo(metadata)
        return "not a regular file"
    if kind == "folder":
        metadata.mkdir()
        return "not a regular file"
    if kind == "device":
        metadata.symlink_to("/dev/zero")
        return "not a regular file"
    raise ValueError(kind)


BROKEN_KINDS = ("no-weights", "junk-16g", "bad-json", "deep", "fifo", "folder", "device")


@pytest.mark.parametrize("kind", BROKEN_KINDS)
def test_malformed_model_json_or_weights_file_is_one_error(tiny_bundle, tmp_path, kind):
    expected = _make_broken(kind, tmp_path, tiny_bundle.path)
    with pytest.raises(ModelBundleError, match=expected):
        load_bundle(tmp_path / kind)


@pytest.mark.parametrize("kind", ["fifo", "folder", "device"])
def test_weights_that_are_no_regular_file_are_refused(bundle_copy, kind):
    weights = bundle_copy / "model.safetensors"
    weights.unlink()
    {"fifo": lambda: os.mkfifo(weights), "folder": weights.mkdir,
     "device": lambda: weights.symlink_to("/dev/zero")}[kind]()
    with pytest.raises(ModelBundleError, match="not a regular file"):
        load_bundle(bundle_copy)


def test_metadata_size_is_capped(bundle_copy):
    edit_metadata(bundle_copy, lambda m: m.update(description="x" * MAX_METADATA_BYTES))
    with pytest.raises(ModelBundleError, match="more than the 1 MiB"):
        load_bundle(bundle_copy)


# ------------------------------------------------------------------- one broken bundle breaks nothing else
def test_broken_bundles_are_listed_and_other_models_still_run(tiny_bundle, image, tmp_path):
    folder = tmp_path / "models"
    shutil.copytree(tiny_bundle.path, folder / "tiny")
    expected = {kind: _make_broken(kind, folder, tiny_bundle.path) for kind in BROKEN_KINDS}
    not_a_folder = tmp_path / "not-a-folder"
    not_a_folder.write_text("")
    env = {MODELS_ENV: os.pathsep.join([str(folder), str(not_a_folder)])}
    result = run_cli("models", "--json", env=env, memory_limit=4 * GIB)
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["tiny"]["status"] == "ok" and rows["hippocampus"]["status"] == "ok"
    for kind, words in expected.items():
        assert rows[kind]["status"] == "broken" and words in rows[kind]["problem"], rows[kind]
    text = run_cli("models", env=env)
    assert text.returncode == 0 and f"broken: {folder / 'bad-json'}:" in text.stdout
    result = run_cli("segment", str(image), "--output-dir", str(tmp_path / "out"), "--model", "tiny",
                     "--device", "cpu", "--no-attention", env=env, memory_limit=4 * GIB)
    assert result.returncode == 0, result.stderr
    assert "is broken" in one_error_line(run_cli("segment", str(image), "--output-dir", str(tmp_path / "o2"),
                                                 "--model", "bad-json", env=env))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders without read permission")
def test_unreadable_model_folder_is_listed_as_broken(tiny_bundle, tmp_path):
    folder = tmp_path / "models"
    shutil.copytree(tiny_bundle.path, folder / "tiny")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0)
    try:
        bundles, problems = ModelRegistry([locked, folder]).scan()
    finally:
        locked.chmod(0o755)
    assert [b.name for b in bundles] == ["tiny"] and "cannot be listed" in problems[0][1]


# --------------------------------------------------------------------- architecture bounds, memory estimate
@pytest.mark.parametrize("edit, message", [
    (lambda a, i: a.update(in_channels=2), "scalar volumes"),
    (lambda a, i: a.update(in_channels=0), "scalar volumes"),
    (lambda a, i: a.update(out_channels=-3), "out_channels must be an integer in 2..32768"),
    (lambda a, i: a.update(out_channels=10 ** 12), "out_channels must be an integer"),
    (lambda a, i: a.update(channels=[-4, 8, 16]), "architecture.channels"),
    (lambda a, i: a.update(channels=[0, 8, 16]), "architecture.channels"),
    (lambda a, i: a.update(channels=[2 ** 40, 8, 16]), "architecture.channels"),
    (lambda a, i: a.update(channels=[4.5, 8, 16]), "architecture.channels"),
    (lambda a, i: a.update(channels=[4] * 40), "2..8 integers"),
    (lambda a, i: a.update(inter_channels_ratio=0), "inter_channels_ratio"),
    (lambda a, i: a.update(norm="group"), "norm"),
    (lambda a, i: i.update(patch_size=[100_000, 32, 32]), "patch_size must be three integers"),
    (lambda a, i: i.update(patch_size=[2, 32, 32]), "pools 2 times"),
    (lambda a, i: (a.update(channels=[4096, 4096]), i.update(patch_size=[1024, 1024, 1024])), "GiB, more than"),
])
def test_absurd_architectures_are_refused_before_anything_is_built(bundle_copy, edit, message):
    edit_metadata(bundle_copy, lambda m: edit(m["architecture"], m["inference"]))
    with pytest.raises(ModelBundleError, match=message):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("spacing", [[1e-6, 1, 1], [1, 1, 1e6], [1, float("nan"), 1]])
def test_absurd_target_spacing_in_a_bundle_is_refused(bundle_copy, spacing):
    # NaN cannot be put in canonical JSON, so that bundle carries the old digest: the schema refuses it first.
    edit_metadata(bundle_copy, lambda m: m["preprocessing"].update(target_spacing=spacing),
                  redigest=spacing[1] == spacing[1])
    with pytest.raises(ModelBundleError, match=r"target_spacing .* must be three numbers \(x, y, z in mm\) in 0.01..100 mm"):
        load_bundle(bundle_copy)


def test_resampling_to_a_grid_too_large_is_refused_with_its_size():
    image = sitk.Image(64, 64, 64, sitk.sitkFloat32)
    with pytest.raises(InputImageError, match=r"GiB per float32 copy"):
        resample_to_spacing(image, (0.01, 0.01, 0.01))


def test_segment_refuses_a_batch_of_windows_larger_than_memory(tiny_bundle, image, tmp_path, capsys):
    status = main(["segment", str(image), "--output-dir", str(tmp_path / "out"), "--model", str(tiny_bundle.path),
                   "--device", "cpu", "--batch-size", "100000000", "--progress", "none"])
    line = one_error_line(capsys.readouterr().err)
    assert status == 2 and "GiB (estimate), more than the" in line and "--batch-size" in line
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("deep_supervision", [False, True])
def test_parameter_count_is_exact(deep_supervision):
    architecture = {"in_channels": 1, "out_channels": 4, "channels": [5, 12, 20], "inter_channels_ratio": 0.3,
                    "deep_supervision": deep_supervision}
    model = AttentionUNet(**architecture)
    assert parameter_count(architecture) == sum(p.numel() for p in model.parameters())
    assert estimate_memory(architecture, (32, 32, 32), training=True) > estimate_memory(architecture, (32, 32, 32))


@pytest.mark.parametrize("options, message", [
    (["--patch-size", "100000", "16", "16"], "at most 1024 voxels per axis"),
    (["--spacing", "0.00001", "1", "1"], "0.01..100 mm"),
    (["--channels", "4"] * 5, "2..8 levels"),
    (["--channels", "99999", "8"], "at most 4096 channels"),
    (["--channels", "2048", "4096", "--patch-size", "512", "512", "512", "--batch-size", "64"], "GiB (estimate)"),
])
def test_absurd_train_options_are_refused_with_the_memory_they_need(tmp_path, capsys, options, message):
    dataset = make_dataset(tmp_path / "data", cases=3)
    status = main(["train", str(dataset), "--output", str(tmp_path / "model"), "--epochs", "1",
                   "--progress", "none", "--channels", "4", "8", *options])
    assert status == 2 and message in one_error_line(capsys.readouterr().err, after_log=True)
    assert not (tmp_path / "model").exists() and not (tmp_path / "model.work" / "checkpoints").exists()


# --------------------------------------------------------------------------- train --resume, damaged files
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished one-step training run: ``(dataset, folder)`` with ``folder/model`` and ``folder/work``."""
    root = tmp_path_factory.mktemp("run")
    dataset = make_dataset(root / "data", cases=4)
    train(_config(dataset, root, epochs=1, iterations_per_epoch=1))
    return dataset, root


def _resume(capsys, dataset: Path, folder: Path, in_subprocess: bool = False) -> str:
    """``train --resume`` of the run in ``folder`` (the options it started with); returns its error line."""
    args = ["train", str(dataset), "--output", str(folder / "model"), "--work-dir", str(folder / "work"),
            "--resume", "--name", "boxes", "--channels", "4", "8", "16", "--patch-size", "16", "16", "16",
            "--batch-size", "2", "--epochs", "2", "--iterations-per-epoch", "1", "--validation", "2",
            "--seed", "3", "--threads", "1", "--progress", "none"]
    if in_subprocess:
        return one_error_line(run_cli(*args), after_log=True)
    status = main(args)
    line = one_error_line(capsys.readouterr().err, after_log=True)
    assert status == 2
    return line


def _malicious_pickle(marker: Path) -> bytes:
    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    return pickle.dumps({"model": Exploit()})


@pytest.mark.parametrize("damage, message", [
    ("plan: bad JSON", "not valid JSON"),
    ("plan: nested", "nests too deeply"),
    ("plan: wrong types", "is damaged"),
    ("plan: a list", "is damaged"),
    ("checkpoint: malicious pickle", "cannot be loaded"),
    ("checkpoint: truncated", "cannot be loaded"),
    ("checkpoint: random bytes", "cannot be loaded"),
    ("checkpoint: wrong shapes", "does not fit this run"),
    ("checkpoint: no training state", "does not hold a training state"),
    ("checkpoint: a fifo", "not a regular file"),
])
def test_resume_with_a_damaged_work_folder_is_one_error_and_destroys_nothing(finished_run, tmp_path, capsys,
                                                                             damage, message):
    dataset, run = finished_run
    folder = Path(shutil.copytree(run, tmp_path / "run", symlinks=True, ignore=shutil.ignore_patterns("data")))
    plan, last = folder / "work" / "plan.json", folder / "work" / "checkpoints" / "last.pt"
    saved = json.loads(plan.read_text())
    saved["config"]["output"] = str(folder / "model")  # this copy is the run that exported folder/model
    plan.write_text(json.dumps(saved))
    marker = tmp_path / "executed"
    if damage == "plan: bad JSON":
        plan.write_text("{not json")
    elif damage == "plan: nested":
        plan.write_text(deep_json())
    elif damage == "plan: wrong types":
        plan.write_text(json.dumps(dict(saved, plan=dict(saved["plan"], patch_size="big"))))
    elif damage == "plan: a list":
        plan.write_text("[]")
    elif damage == "checkpoint: malicious pickle":
        last.write_bytes(_malicious_pickle(marker))
    elif damage == "checkpoint: truncated":
        last.write_bytes(last.read_bytes()[:1000])
    elif damage == "checkpoint: random bytes":
        last.write_bytes(np.random.default_rng(0).bytes(5000))
    elif damage == "checkpoint: wrong shapes":
        state = torch.load(last, weights_only=True)
        key = next(k for k, v in state["model"].items() if v.dim() == 5)
        state["model"][key] = torch.zeros(3, 3, 3, 3, 3)
        torch.save(state, last)
    elif damage == "checkpoint: no training state":
        torch.save([1, 2, 3], last)
    elif damage == "checkpoint: a fifo":
        last.unlink()
        os.mkfifo(last)
    before = snapshot(folder)
    # The pickle goes through a real process: nothing but the error line (no torch warning) may reach stderr.
    assert message in _resume(capsys, dataset, folder, in_subprocess=damage == "checkpoint: malicious pickle")
    assert snapshot(folder) == before
    assert not marker.exists()


# ------------------------------------------------------------------------------ evaluate: 2D and 4D labels
@pytest.mark.parametrize("which, shape", [("prediction", (12, 12)), ("prediction", (2, 12, 12, 12)),
                                          ("reference", (12, 12))])
def test_evaluate_names_the_case_of_a_2d_or_4d_label_map(tmp_path, capsys, which, shape):
    references, predictions = tmp_path / "references", tmp_path / "predictions"
    references.mkdir()
    predictions.mkdir()
    good = np.zeros((12, 12, 12), np.uint8)
    good[3:8, 3:8, 3:8] = 1
    bad = sitk.GetImageFromArray(np.ones(shape[-2:], np.uint8) if len(shape) == 2 else np.ones(shape[1:], np.uint8))
    if len(shape) == 4:  # a series of 3D label maps
        bad = sitk.JoinSeries([bad] * shape[0])
    sitk.WriteImage(bad if which == "reference" else sitk.GetImageFromArray(good), str(references / "c1.nii.gz"))
    sitk.WriteImage(bad if which == "prediction" else sitk.GetImageFromArray(good),
                    str(predictions / "c1_seg.nii.gz"))
    status = main(["evaluate", str(references), "--predictions", str(predictions), "--label-names", "1=Box",
                   "--output", str(tmp_path / "scores")])
    line = one_error_line(capsys.readouterr().err)
    assert status == 2 and line.startswith("error: case c1:") and f"{len(shape)}D" in line and which in line
    assert not list(tmp_path.glob("scores*"))


# --------------------------------------------------------------------------------------- which bundle ran
def test_default_model_overridden_through_the_environment_is_named(tiny_bundle, image, tmp_path):
    models = tmp_path / "models"
    saved = save_bundle(tiny_bundle.build_model(), dict(tiny_bundle.metadata, name="hippocampus"),
                        models / "hippocampus")
    result = run_cli("segment", str(image), "--output-dir", str(tmp_path / "out"), "--device", "cpu",
                     "--no-attention", "--progress", "none", env={MODELS_ENV: str(models)})
    assert result.returncode == 0, result.stderr
    assert f"model: hippocampus 0.0.1 from {saved.path.resolve()}" in result.stderr.splitlines()
    report = json.loads((tmp_path / "out" / "case_report.json").read_text())
    assert report["model"]["path"] == str(saved.path.resolve()) and report["model"]["sha256"] == saved.sha256
