"""Model bundles: round trip, tamper detection, schema errors, pickle refusal, registry."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bundle_edits import edit_metadata
from AttentionUNetSegmentLib.model.bundle import (
    DEFAULT_MODEL,
    FORMAT_VERSION,
    MODELS_ENV,
    LabelInfo,
    ModelRegistry,
    create_metadata,
    load_bundle,
    save_bundle,
)
from AttentionUNetSegmentLib.errors import ModelBundleError
from AttentionUNetSegmentLib.model.network import AttentionUNet


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    """A private copy of the tiny bundle that a test may damage."""
    return Path(shutil.copytree(tiny_bundle.path, tmp_path / "tiny"))


def test_round_trip_reproduces_outputs_and_metadata(tiny_bundle):
    bundle = load_bundle(tiny_bundle.path)
    assert bundle.name == "tiny" and bundle.version == "0.0.1"
    assert bundle.patch_size == (32, 32, 32)
    assert bundle.labels == [LabelInfo(1, "Anterior", (0.9, 0.6, 0.2)), LabelInfo(2, "Posterior", (0.2, 0.6, 0.9))]
    assert bundle.architecture["channels"] == [4, 8, 16]
    assert bundle.sha256 == tiny_bundle.sha256 and len(bundle.sha256) == 64
    assert bundle.preprocessing.orientation == "RAS" and bundle.preprocessing.target_spacing == (1.0, 1.0, 1.0)
    assert bundle.overlap == 0.5
    model = bundle.build_model()
    assert not model.training
    x = torch.randn(1, 1, 12, 16, 20)
    with torch.no_grad():
        original = tiny_bundle.build_model()(x)
        assert torch.equal(model(x), original)


def test_save_refuses_existing_directory_unless_forced(tiny_bundle, tmp_path):
    model = tiny_bundle.build_model()
    target = tmp_path / "again"
    save_bundle(model, tiny_bundle.metadata, target)
    with pytest.raises(ModelBundleError, match="already exists"):
        save_bundle(model, tiny_bundle.metadata, target)
    other = AttentionUNet(out_channels=3, channels=(4, 8))
    saved = save_bundle(other, tiny_bundle.metadata, target, force=True)
    assert saved.architecture["channels"] == [4, 8]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no staging or retired directories left


def test_saved_bundle_is_readable_by_other_users(tiny_bundle, tmp_path):
    umask = os.umask(0o022)
    try:
        saved = save_bundle(tiny_bundle.build_model(), tiny_bundle.metadata, tmp_path / "shared")
    finally:
        os.umask(umask)
    assert saved.path.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in saved.path.iterdir()} == {"model.json": 0o644,
                                                                                 "model.safetensors": 0o644}


def test_save_writes_nothing_when_metadata_is_invalid(tiny_bundle, tmp_path):
    bad = dict(tiny_bundle.metadata, labels=[])
    with pytest.raises(ModelBundleError, match="labels"):
        save_bundle(tiny_bundle.build_model(), bad, tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []


def test_tampered_weights_are_refused(bundle_copy):
    weights = bundle_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelBundleError, match="sha256"):
        load_bundle(bundle_copy)


def test_missing_weights_are_refused(bundle_copy):
    (bundle_copy / "model.safetensors").unlink()
    with pytest.raises(ModelBundleError, match="missing"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.pop("labels"), "lacks required keys"),
        (lambda m: m.update(format="something-else"), "format"),
        (lambda m: m.update(format_version=FORMAT_VERSION + 1), "newer than this engine"),
        (lambda m: m["labels"].pop(), "out_channels=3"),
        (lambda m: m["labels"][0].update(color=[1.5, 0, 0]), "color"),
        (lambda m: m["labels"][1].update(value=1), "unique"),
        (lambda m: m["labels"][1].update(value=40000), r"1\.\.32767"),
        (lambda m: m["labels"][0].update(terminology="Anatomy~SCT^1^x"), "terminology"),
        (lambda m: m["inference"].update(patch_size=[32, 32]), "patch_size"),
        (lambda m: m["weights"].update(file="../model.safetensors"), "plain file name"),
        (lambda m: m["weights"].update(file="model.pt"), "pickle"),
        (lambda m: m["weights"].update(sha256="abc"), "sha256"),
        (lambda m: m["architecture"].update(channels=[8, 16, 32]), "does not fit the weights"),
        (lambda m: m["architecture"].update(out_channels=4), "labels listed"),
        (lambda m: m["architecture"].update(bogus=1), "architecture"),
        (lambda m: m["preprocessing"].update(target_spacing=[1, 0, 1]), "target_spacing"),
        (lambda m: m["preprocessing"]["normalization"].update(scheme="minmax"), "normalization"),
        (lambda m: m["preprocessing"].update(orientation="RAR"), "orientation"),
    ],
)
def test_malformed_metadata_is_refused(bundle_copy, edit, message):
    edit_metadata(bundle_copy, edit)
    with pytest.raises(ModelBundleError, match=message):
        load_bundle(bundle_copy)


def test_architecture_mismatch_names_the_tensor(bundle_copy):
    edit_metadata(bundle_copy, lambda m: m["architecture"].update(channels=[4, 8, 32]))
    with pytest.raises(ModelBundleError) as caught:
        load_bundle(bundle_copy)
    assert "shape mismatch" in str(caught.value) and "architecture (" in str(caught.value)


def test_unreadable_metadata_is_refused(bundle_copy):
    (bundle_copy / "model.json").write_text("{not json")
    with pytest.raises(ModelBundleError, match="not valid JSON"):
        load_bundle(bundle_copy)


def test_pickle_checkpoint_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "executed"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(ModelBundleError, match="pickle"):
        load_bundle(checkpoint)
    assert not marker.exists()


def test_missing_bundle_is_refused(tmp_path):
    with pytest.raises(ModelBundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


def test_label_terminology_round_trips(tiny_bundle, tmp_path):
    entry = "Context~SCT^123037004^Anatomical Structure~SCT^5976002^Hippocampus~^^~Anatomic codes~^^~^^"
    labels = [LabelInfo(1, "Anterior", (0.9, 0.6, 0.2), entry), LabelInfo(2, "Posterior", (0.2, 0.6, 0.9))]
    metadata = dict(tiny_bundle.metadata, labels=[label.to_dict() for label in labels])
    saved = save_bundle(tiny_bundle.build_model(), metadata, tmp_path / "with-terminology")
    assert saved.labels == labels
    assert "terminology" not in saved.metadata["labels"][1]


def test_create_metadata_accepts_label_info():
    metadata = create_metadata("m", [LabelInfo(3, "A", (0.0, 1.0, 0.0))], (8, 8, 8),
                               {"orientation": "RAS", "target_spacing": [1, 1, 1],
                                "normalization": {"scheme": "zscore"}})
    assert metadata["labels"] == [{"value": 3, "name": "A", "color": [0.0, 1.0, 0.0]}]
    assert metadata["inference"] == {"patch_size": [8, 8, 8], "overlap": 0.5}


def test_registry_lists_and_resolves(tiny_bundle, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(tiny_bundle.path, models / "tiny")
    (models / "broken").mkdir()
    (models / "broken" / "model.json").write_text("[]")
    (models / "not-a-bundle").mkdir()
    registry = ModelRegistry([models, tmp_path / "absent"])
    bundles, problems = registry.scan()
    assert [b.name for b in bundles] == ["tiny"]
    assert [p.name for p, _ in problems] == ["broken"]
    assert registry.resolve("tiny").sha256 == tiny_bundle.sha256
    assert registry.resolve(str(models / "tiny")).name == "tiny"
    with pytest.raises(ModelBundleError, match=r"no installed model named 'missing' \(available: tiny \(0.0.1\)"):
        registry.resolve("missing")
    # find checks the metadata only (the Slicer panel must not read weights); resolve verifies the weights too.
    weights = models / "tiny" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    assert registry.find("tiny").path == models / "tiny" and registry.find(str(models / "tiny")).name == "tiny"
    with pytest.raises(ModelBundleError, match="sha256"):
        registry.resolve("tiny")
    with pytest.raises(ModelBundleError, match="model.json is missing"):
        registry.find(str(models / "not-a-bundle"))


def test_registry_search_path_puts_environment_first(tmp_path, monkeypatch):
    monkeypatch.setenv(MODELS_ENV, os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")]))
    registry = ModelRegistry()
    assert registry.search_path[:2] == [tmp_path / "a", tmp_path / "b"]
    assert registry.search_path[-1].parts[-2:] == ("Resources", "Models")
    assert DEFAULT_MODEL == "hippocampus"


def test_registry_listing_and_cli_import_do_not_import_torch(tiny_bundle):
    code = (
        "import sys; from AttentionUNetSegmentLib.model.bundle import ModelRegistry; import AttentionUNetSegmentLib.cli.commands; "
        f"names = [b.name for b in ModelRegistry([{str(tiny_bundle.path.parent)!r}]).list()]; "
        "assert names == ['tiny'], names; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
