"""Whole-hippocampus Dice of a bundle on head crops (``make_head_crops.py`` datasets), crop by crop.

Each crop is what localised inference segments for one side, so this measures the model inside the box without
registration or pasting back (fast: one ``Predictor.predict`` per crop). The prediction's classes are merged as
the dataset's ``label_groups`` say (anterior + posterior = hippocampus) and scored against the crop's label;
It also scores the prediction reduced to its largest connected component, and to the component that
localised ``--largest-component`` keeps (``keep_central_component``: large and near the box centre, which is the
crop's centre). Prints one row
per crop and the median; ``--json`` writes them::

    PYTHONPATH=AttentionUNetSegment python Testing/benchmarks/eval_head_crops.py /work/runs/headcrops-heldout \\
        --model /work/runs/short/B/model --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk


KEYS = ("dice", "dice_largest_component", "dice_central_component")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from AttentionUNetSegmentLib.model.bundle import ModelRegistry
    from AttentionUNetSegmentLib.inference.predictor import Predictor
    from AttentionUNetSegmentLib.fileio.jsonfile import read_json
    from AttentionUNetSegmentLib.inference.postprocessing import keep_central_component, keep_largest_component

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("crops", type=Path, help="a make_head_crops.py dataset folder")
    parser.add_argument("--model", help="bundle (default: the shipped hippocampus model)")
    parser.add_argument("--json", type=Path, help="also write the rows and medians here")
    args = parser.parse_args(argv)
    listing = read_json(args.crops / "dataset.json", "dataset listing")
    predictor = Predictor(ModelRegistry().resolve(args.model or "hippocampus"), device="cpu")
    rows = []
    for entry in listing["training"]:
        image = sitk.ReadImage(str(args.crops / entry["image"]))
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(args.crops / entry["label"]))) > 0
        labels = predictor.predict(image, attention=False).labels
        largest = keep_largest_component(sitk.Cast(labels > 0, sitk.sitkUInt8), [1])
        centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in image.GetSize()])
        central = keep_central_component(labels, [1, 2], centre)
        name = Path(entry["image"]).name.split(".")[0]
        rows.append({"crop": name, "dice": round(dice(sitk.GetArrayFromImage(labels) > 0, reference), 4),
                     "dice_largest_component": round(dice(sitk.GetArrayFromImage(largest) > 0, reference), 4),
                     "dice_central_component": round(dice(sitk.GetArrayFromImage(central) > 0, reference), 4)})
        print(f"{name:28s} " + " ".join(f"{rows[-1][key]:.3f}" for key in KEYS), flush=True)
    summary = {key: round(statistics.median(row[key] for row in rows), 4) for key in KEYS}
    print(f"{'median':28s} " + " ".join(f"{summary[key]:.3f}" for key in KEYS))
    if args.json:
        args.json.write_text(json.dumps({"model": str(predictor.bundle.path), "crops": str(args.crops),
                                         "rows": rows, "median": summary}, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
