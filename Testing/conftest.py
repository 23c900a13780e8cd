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
