"""Render the extension's catalogue screenshot (``Resources/Screenshot.png``) from a real engine run.

It segments an image (default: the bundled sample) with a model (default: the installed ``hippocampus`` bundle)
through the same command line the Slicer module uses, then draws an axial slice through the segmentation four
ways, in radiological convention: the image, the segmentation outline, and the finest and the coarsest attention
gate as heat overlays (each gate resampled linearly onto the image grid for display only).

Run from the repository root: ``python Resources/make_screenshot.py [--image PATH] [--model NAME|PATH]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = ROOT / "AttentionUNetSegment" / "Resources" / "SampleData"
TARGET = ROOT / "Resources" / "Screenshot.png"


def _display(image: sitk.Image) -> np.ndarray:
    """``(z, y, x)`` array in LPS order: axial slices with anterior up and patient left on the right."""
    return sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=None, help="3D image (default: the bundled sample)")
    parser.add_argument("--model", default="hippocampus", help="installed model name or bundle folder")
    parser.add_argument("--output", type=Path, default=TARGET)
    args = parser.parse_args()
    image_path = args.image or sorted(SAMPLE_DIR.glob("*.nii.gz"))[0]

    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-m", "AttentionUNetSegmentLib", "segment", str(image_path), "--output-dir",
                        folder, "--model", args.model, "--device", "cpu", "--progress", "none"], check=True)
        image = sitk.ReadImage(str(image_path), sitk.sitkFloat32)
        labels = sitk.ReadImage(str(next(Path(folder).glob("*_seg.nii.gz"))))
        report = json.loads(next(Path(folder).glob("*_report.json")).read_text())
        gates = sorted(Path(folder).glob("*_attention_*.nii.gz"), key=lambda p: int(p.name.split("_")[-1][:-7]))
        attention = [sitk.Resample(sitk.ReadImage(str(p)), image, sitk.Transform(), sitk.sitkLinear, 0.0)
                     for p in (gates[0], gates[-1])]

    volume, label_array = _display(image), _display(labels)
    maps = [_display(a) for a in attention]
    z = int(np.argmax((label_array > 0).sum(axis=(1, 2))))
    low, high = np.percentile(volume[z], [1, 99])
    colors = {segment["value"]: segment["color"] for segment in report["segments"]}

    fig, axes = plt.subplots(1, 4, figsize=(12, 3.6), facecolor="black")
    titles = ["Input (axial)", "Segmentation", "Attention, finest gate", "Attention, coarsest gate"]
    for ax, title in zip(axes, titles):
        ax.imshow(volume[z], cmap="gray", vmin=low, vmax=high, interpolation="nearest")
        ax.set_title(title, color="white", fontsize=11)
        ax.axis("off")
    for value, color in colors.items():
        axes[1].contour(label_array[z] == value, levels=[0.5], colors=[color], linewidths=1.5)
    for ax, heat in zip(axes[2:], maps):
        shown = np.ma.masked_less(heat[z], 0.05)
        ax.imshow(shown, cmap="inferno", vmin=0, vmax=1, alpha=0.6, interpolation="nearest")
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=100, facecolor="black")
    print(args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
