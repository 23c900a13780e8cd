"""A built wheel (what ``pip install .`` without ``-e`` installs) carries the default model and the sample."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest


REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_wheel_install_finds_the_bundled_model_and_sample(tmp_path):
    # Built from a copy: setuptools leaves build/ behind, which must not touch the checkout.
    source = tmp_path / "source"
    shutil.copytree(REPOSITORY / "AttentionUNetSegment", source / "AttentionUNetSegment",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPOSITORY / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", ".",
                            "-w", str(tmp_path / "dist")], cwd=source, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    engine = REPOSITORY / "AttentionUNetSegment"
    modules = {path.relative_to(engine).as_posix() for path in (engine / "AttentionUNetSegmentLib").rglob("*.py")}
    assert "AttentionUNetSegmentLib/constants.py" in modules and modules <= set(names)  # every stage's subpackage
    assert not [name for name in names if name.startswith("AttentionUNetSlicer")]  # the wheel is the engine only
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("import json, AttentionUNetSegmentLib as lib; from AttentionUNetSegmentLib.model.bundle import ModelRegistry,"
             " DEFAULT_MODEL; from AttentionUNetSegmentLib.cli.commands import SAMPLE_DATA_DIR;"
             " bundle = ModelRegistry().resolve(DEFAULT_MODEL); bundle.build_model('cpu');"
             " print(json.dumps({'package': lib.__file__, 'model': str(bundle.path),"
             " 'samples': [p.name for p in SAMPLE_DATA_DIR.glob('*.nii.gz')]}))")
    env = {key: value for key, value in os.environ.items() if key != "ATTENTION_UNET_MODELS"}
    env["PYTHONPATH"] = str(site)
    probed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=300)
    assert probed.returncode == 0, probed.stderr
    found = json.loads(probed.stdout)
    assert found["package"].startswith(str(site))  # the wheel's copy, not the source tree
    assert found["model"].startswith(str(site / "AttentionUNetSegmentLib" / "resources" / "Models"))
    assert found["samples"] == ["MNI152_hippocampus_left_T1.nii.gz"]
