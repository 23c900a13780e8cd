"""Draw the extension icon (``Resources/AttentionUNet.png``) and the module icon
(``AttentionUNetSegment/Resources/Icons/AttentionUNetSegment.png``), both 128x128 PNG.

The design: a U-Net's encoder/decoder blocks drawn as a "U" on a dark tile, with a warm attention glow where the
skip connections meet the decoder. Run from the repository root: ``python Resources/make_icons.py``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (ROOT / "Resources" / "AttentionUNet.png",
           ROOT / "AttentionUNetSegment" / "Resources" / "Icons" / "AttentionUNetSegment.png")
SIZE_PX = 128


def draw(path: Path) -> None:
    fig = plt.figure(figsize=(SIZE_PX / 100, SIZE_PX / 100), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")
    ax.add_patch(FancyBboxPatch((0.04, 0.04), 0.92, 0.92, boxstyle="round,pad=0,rounding_size=0.16",
                                facecolor="#1d2b45", edgecolor="none"))
    # Attention glow: a Gaussian heat spot behind the bottom of the U.
    yy, xx = np.mgrid[0:1:256j, 0:1:256j]
    glow = np.exp(-(((xx - 0.5) / 0.2) ** 2 + ((yy - 0.36) / 0.16) ** 2))
    rgba = plt.get_cmap("inferno")(0.35 + 0.6 * glow)
    rgba[..., 3] = 0.95 * glow
    ax.imshow(rgba, extent=(0.08, 0.92, 0.08, 0.92), origin="lower", interpolation="bilinear", zorder=1)
    # Encoder (left, going down) and decoder (right, going up): block height shrinks with depth.
    levels = [(0.78, 0.16), (0.58, 0.12), (0.40, 0.09)]
    for side, color in ((0.2, "#9ec9ff"), (0.8, "#ffffff")):
        for y, height in levels:
            ax.add_patch(FancyBboxPatch((side - 0.06, y - height / 2), 0.12, height,
                                        boxstyle="round,pad=0,rounding_size=0.03", facecolor=color,
                                        edgecolor="none", zorder=3))
    ax.add_patch(FancyBboxPatch((0.41, 0.20), 0.18, 0.08, boxstyle="round,pad=0,rounding_size=0.03",
                                facecolor="#ffd27a", edgecolor="none", zorder=3))
    # Skip connections with their attention gates (dots).
    for y, _ in levels:
        ax.plot([0.27, 0.73], [y, y], color="#ffd27a", linewidth=1.6, zorder=2, alpha=0.9)
        ax.add_patch(plt.Circle((0.5, y), 0.035, color="#ff7b39", zorder=4))
    fig.savefig(path, dpi=100, transparent=True)
    plt.close(fig)


if __name__ == "__main__":
    for target in TARGETS:
        target.parent.mkdir(parents=True, exist_ok=True)
        draw(target)
        print(target)
