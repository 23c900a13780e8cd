"""Shared pytest fixtures. Tests run outside Slicer; MSD data tests skip cleanly when ../shared is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_HIPPOCAMPUS = REPO_ROOT.parent / "shared" / "data" / "msd-hippocampus"

# Two cores are shared by everything in CI; one intra-op thread keeps small-tensor tests fast and predictable.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def hippocampus_dir() -> Path:
    """The shared MSD Task04 Hippocampus folder, or a clean skip where it is absent."""
    if not (SHARED_HIPPOCAMPUS / "dataset.json").is_file():
        pytest.skip(f"shared MSD hippocampus data not found at {SHARED_HIPPOCAMPUS}")
    return SHARED_HIPPOCAMPUS


TINY_LABELS = (
    {"value": 1, "name": "Anterior", "color": [0.9, 0.6, 0.2]},
    {"value": 2, "name": "Posterior", "color": [0.2, 0.6, 0.9]},
)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A random-weight bundle (channels (4, 8, 16), 3 classes, patch (32, 32, 32) xyz, 1 mm RAS, z-score, TTA
    mirror axes x),
    saved with ``save_bundle``: fast enough for any test that needs a real model. Returns the ``ModelBundle``;
    its directory is ``tiny_bundle.path``."""
    import torch

    from AttentionUNetSegmentLib.model.bundle import create_metadata, save_bundle
    from AttentionUNetSegmentLib.model.network import AttentionUNet

    torch.manual_seed(0)
    model = AttentionUNet(in_channels=1, out_channels=3, channels=(4, 8, 16), norm="instance")
    metadata = create_metadata(
        name="tiny",
        version="0.0.1",
        labels=TINY_LABELS,
        patch_size=(32, 32, 32),
        preprocessing={"orientation": "RAS", "target_spacing": [1.0, 1.0, 1.0],
                       "normalization": {"scheme": "zscore"}},
        description="random weights for tests",
        license="Apache-2.0",
        mirror_axes=("x",),
    )
    return save_bundle(model, metadata, tmp_path_factory.mktemp("models") / "tiny")
